-- reserve_slots without sorting: the ring is kept sorted by every writer (this function,
-- store.release, domain.reserve), so the window's start is a binary search and a
-- reservation at or after the newest entry, the usual case, is an append. The version of
-- migration 002 unnested, filtered, sorted and aggregated the ring twice per reservation,
-- in the database's CPU, which the relay shares with it (bench/smtp.py). Same signature,
-- same decisions: tests/test_smtp_quota_store.py checks them against domain.reserve.
CREATE OR REPLACE FUNCTION reserve_slots(
    p_service text, p_count int, p_now timestamptz, p_limit int, p_window interval,
    OUT known boolean, OUT suspended boolean, OUT granted boolean, OUT used int,
    OUT frees_at timestamptz, OUT warn boolean
) LANGUAGE plpgsql AS $$
DECLARE
    ring timestamptz[];
    is_suspended boolean;
    cutoff timestamptz := p_now - p_window;
    total int;
    lo int;
    hi int;
    mid int;
    first_live int;  -- the oldest entry that counts: inside the window, among the newest `limit`
    n int;
    new_ring timestamptz[];
BEGIN
    known := false; suspended := false; granted := false; used := 0; warn := false;
    SELECT s.suspended, s.sends INTO is_suspended, ring
    FROM services s WHERE s.service_id = p_service FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    known := true;
    IF is_suspended THEN
        suspended := true;
        RETURN;
    END IF;
    total := cardinality(ring);
    -- The first entry inside the window (t > cutoff); total + 1 when there is none.
    lo := 1;
    hi := total + 1;
    WHILE lo < hi LOOP
        mid := (lo + hi) / 2;
        IF ring[mid] > cutoff THEN
            hi := mid;
        ELSE
            lo := mid + 1;
        END IF;
    END LOOP;
    first_live := greatest(lo, total - p_limit + 1);
    n := total - first_live + 1;
    IF n + p_count <= p_limit THEN
        IF n = 0 OR ring[total] <= p_now THEN
            new_ring := ring[first_live:total] || array_fill(p_now, ARRAY[p_count]);
        ELSE
            -- Another relay's clock is a little ahead of ours: a sorted insert.
            SELECT array_agg(t ORDER BY t) INTO new_ring
            FROM (SELECT unnest(ring[first_live:total]) AS t
                  UNION ALL SELECT p_now FROM generate_series(1, p_count)) AS r;
        END IF;
        UPDATE services
        SET sends = new_ring, last_send_at = greatest(last_send_at, p_now)
        WHERE service_id = p_service;
        granted := true;
        used := n + p_count;
        warn := n < p_limit * 4 / 5 AND p_limit * 4 / 5 <= n + p_count;
        RETURN;
    END IF;
    used := n;
    IF p_count <= p_limit THEN
        -- The (used + count - limit)-th oldest entry must leave before `count` slots are free.
        frees_at := ring[first_live + n + p_count - p_limit - 1] + p_window;
    END IF;
END
$$;
