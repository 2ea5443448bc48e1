-- 016: bars outside the regular session are kept but flagged, so features and signals use the
-- session only. A loader decides the flag from the exchange calendar (holidays, early closes):
-- a bar is in the session when session open <= ts < session close on its ET date. Bars written
-- before this migration, and by writers that do not say, count as in the session, as before.

ALTER TABLE lane_telemetry ADD COLUMN extended_hours boolean NOT NULL DEFAULT false;

-- lane_bar_heads (012) follows session bars only: an after-hours bar is nothing new for the
-- feature cycle. A flag flipped by a revision takes a new revision like any other change.
CREATE OR REPLACE FUNCTION lane_bar_heads_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH arrived AS (
        SELECT n.ticker, min(n.ts) AS first_ts, max(n.ts) AS last_ts
        FROM new_bars n WHERE NOT n.extended_hours GROUP BY n.ticker
    )
    INSERT INTO lane_bar_heads AS h (ticker, latest_ts, revision)
    SELECT a.ticker, a.last_ts, nextval('lane_bar_revision') FROM arrived a ORDER BY a.ticker
    ON CONFLICT (ticker) DO UPDATE SET
        latest_ts = greatest(h.latest_ts, EXCLUDED.latest_ts),
        revision = CASE WHEN (SELECT a.first_ts FROM arrived a WHERE a.ticker = h.ticker) > h.latest_ts
                        THEN h.revision ELSE EXCLUDED.revision END;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION lane_bar_heads_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    touched text[];
BEGIN
    IF TG_OP = 'UPDATE' THEN  -- new_bars exists only for an UPDATE
        SELECT array_agg(DISTINCT t.ticker) INTO touched
        FROM (SELECT o.ticker FROM old_bars o UNION ALL SELECT n.ticker FROM new_bars n) t;
    ELSE
        SELECT array_agg(DISTINCT o.ticker) INTO touched FROM old_bars o;
    END IF;
    INSERT INTO lane_bar_heads AS h (ticker, latest_ts, revision)
    SELECT t.ticker, (SELECT max(b.ts) FROM lane_telemetry b WHERE b.ticker = t.ticker AND NOT b.extended_hours),
           nextval('lane_bar_revision')
    FROM unnest(touched) AS t(ticker) ORDER BY t.ticker
    ON CONFLICT (ticker) DO UPDATE SET latest_ts = EXCLUDED.latest_ts, revision = EXCLUDED.revision;
    RETURN NULL;
END
$$;
