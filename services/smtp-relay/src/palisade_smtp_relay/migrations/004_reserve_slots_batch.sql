-- The reservations of several sessions in one statement (relay.Reservations): one round trip
-- and one commit for all of them, each decided by reserve_slots exactly as alone. Rows are
-- locked in service order, so two relay processes' batches never wait on each other in a
-- cycle; a service's reservations keep their order in the batch (ord), so the earlier
-- session is decided first.
CREATE FUNCTION reserve_slots_batch(
    p_services text[], p_counts int[], p_nows timestamptz[], p_limit int, p_window interval
) RETURNS TABLE (
    ord int, known boolean, suspended boolean, granted boolean, used int, frees_at timestamptz, warn boolean
) LANGUAGE plpgsql AS $$
DECLARE
    i int;
    r record;
BEGIN
    FOR i IN SELECT u.o FROM unnest(p_services) WITH ORDINALITY AS u(s, o) ORDER BY u.s, u.o LOOP
        SELECT * INTO r FROM reserve_slots(p_services[i], p_counts[i], p_nows[i], p_limit, p_window);
        ord := i;
        known := r.known;
        suspended := r.suspended;
        granted := r.granted;
        used := r.used;
        frees_at := r.frees_at;
        warn := r.warn;
        RETURN NEXT;
    END LOOP;
END
$$;
