-- 003: momentum inputs for the signal rules, and the bar index the feature computer relies on.
--
-- close_5m_ago / close_15m_ago are the closes of the bars that began exactly 5 / 15 minutes
-- before the features' bar, in the same ET session day; NULL when that bar does not exist (a gap,
-- or the first minutes of a session). They are never a neighbouring bar's close, and never the
-- previous session's.

ALTER TABLE lane_features
    ADD COLUMN close_5m_ago  numeric,
    ADD COLUMN close_15m_ago numeric,
    ADD COLUMN prev_close    numeric,     -- the close of the bar that began 1 minute earlier, same session
    ADD COLUMN volume        bigint,      -- the features' bar's own volume (volume_ratio's numerator)
    ADD COLUMN session_day   date;        -- the ET date of `ts`; windows never reach past its start

-- Postgres expanded `f.*` when 001 created the view, so it would not show the new columns:
-- drop it and create it again.
DROP VIEW latest_features;
CREATE VIEW latest_features AS
    SELECT DISTINCT ON (f.ticker) f.*
    FROM lane_features f
    ORDER BY f.ticker, f.ts DESC;

-- lane_telemetry's primary key (ticker, ts) is the btree every feature lookup uses: the last N
-- bars of a ticker (a backward range scan), the bar exactly 5 / 15 minutes earlier (an equality
-- probe) and the distinct tickers (a skip scan). Without it one cycle takes seconds; the check
-- below fails the migration if that key was ever dropped or reshaped.
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        JOIN pg_class c ON c.oid = i.indrelid
        WHERE c.relname = 'lane_telemetry'
          AND i.indisunique
          AND (SELECT array_agg(a.attname::text ORDER BY k.ord)
               FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
               JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = k.attnum) = ARRAY['ticker', 'ts']
    ) THEN
        RAISE EXCEPTION 'lane_telemetry needs a unique btree on (ticker, ts)';
    END IF;
END
$$;
