-- The reservation of store.reserve in one statement: the row lock, the window, the
-- decision and the ring's update happen in the database, so a relayed message costs
-- one round trip here instead of four (BEGIN, SELECT ... FOR UPDATE, UPDATE, COMMIT).
-- domain.reserve is the specification; tests/test_smtp_quota_store.py checks that this
-- function decides exactly as it does, ring included.
CREATE FUNCTION reserve_slots(
    p_service text, p_count int, p_now timestamptz, p_limit int, p_window interval,
    OUT known boolean, OUT suspended boolean, OUT granted boolean, OUT used int,
    OUT frees_at timestamptz, OUT warn boolean
) LANGUAGE plpgsql AS $$
DECLARE
    current_sends timestamptz[];
    is_suspended boolean;
    live timestamptz[];
    n int;
BEGIN
    known := false; suspended := false; granted := false; used := 0; warn := false;
    SELECT s.suspended, s.sends INTO is_suspended, current_sends
    FROM services s WHERE s.service_id = p_service FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    known := true;
    IF is_suspended THEN
        suspended := true;
        RETURN;
    END IF;
    -- The entries still in the window (t > now - window), the newest `limit` of them, oldest first.
    SELECT coalesce(array_agg(t ORDER BY t), '{}') INTO live
    FROM (SELECT t FROM unnest(current_sends) AS t WHERE t > p_now - p_window ORDER BY t DESC LIMIT p_limit) AS w;
    n := cardinality(live);
    IF n + p_count <= p_limit THEN
        UPDATE services
        SET sends = (SELECT array_agg(t ORDER BY t)
                     FROM (SELECT unnest(live) AS t UNION ALL SELECT p_now FROM generate_series(1, p_count)) AS r),
            last_send_at = greatest(last_send_at, p_now)
        WHERE service_id = p_service;
        granted := true;
        used := n + p_count;
        warn := n < p_limit * 4 / 5 AND p_limit * 4 / 5 <= n + p_count;
        RETURN;
    END IF;
    used := n;
    IF p_count <= p_limit THEN
        -- The (used + count - limit)-th oldest entry must leave before `count` slots are free.
        frees_at := live[n + p_count - p_limit] + p_window;
    END IF;
END
$$;
