-- 015: per ticker, the newest bar and a revision number, kept by statement triggers on
-- lane_telemetry, so the feature cycle finds the tickers with something new by reading ~500
-- small rows instead of probing every ticker's bars each minute.
--
-- latest_ts moves forward as bars are appended. revision changes whenever the stored history
-- changed other than by an append: a bar revised or deleted, or one that arrived at or before the
-- newest stored bar (late or out of order). The cycle keeps each ticker's recent bars in memory
-- and extends them on an append; on a new revision it reads that ticker's window again. Revisions
-- come from one sequence, so a ticker deleted (or truncated) and loaded again never shows a
-- revision a cycle has already seen.

CREATE SEQUENCE lane_bar_revision;

CREATE TABLE lane_bar_heads (
    ticker    text        PRIMARY KEY,
    latest_ts timestamptz,              -- NULL once every bar of the ticker is deleted
    revision  bigint      NOT NULL
);

-- Appends keep the revision; anything at or before the newest stored bar takes a new one.
-- Tickers are taken in order so two loaders writing the same tickers cannot deadlock here.
CREATE FUNCTION lane_bar_heads_on_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    WITH arrived AS (
        SELECT n.ticker, min(n.ts) AS first_ts, max(n.ts) AS last_ts FROM new_bars n GROUP BY n.ticker
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

-- A revised or deleted bar: a new revision, and the newest bar looked up again (one probe).
CREATE FUNCTION lane_bar_heads_on_change() RETURNS trigger LANGUAGE plpgsql AS $$
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
    SELECT t.ticker, (SELECT max(b.ts) FROM lane_telemetry b WHERE b.ticker = t.ticker),
           nextval('lane_bar_revision')
    FROM unnest(touched) AS t(ticker) ORDER BY t.ticker
    ON CONFLICT (ticker) DO UPDATE SET latest_ts = EXCLUDED.latest_ts, revision = EXCLUDED.revision;
    RETURN NULL;
END
$$;

CREATE FUNCTION lane_bar_heads_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM lane_bar_heads;
    RETURN NULL;
END
$$;

CREATE TRIGGER lane_bar_heads_insert AFTER INSERT ON lane_telemetry
    REFERENCING NEW TABLE AS new_bars FOR EACH STATEMENT EXECUTE FUNCTION lane_bar_heads_on_insert();
CREATE TRIGGER lane_bar_heads_update AFTER UPDATE ON lane_telemetry
    REFERENCING OLD TABLE AS old_bars NEW TABLE AS new_bars FOR EACH STATEMENT EXECUTE FUNCTION lane_bar_heads_on_change();
CREATE TRIGGER lane_bar_heads_delete AFTER DELETE ON lane_telemetry
    REFERENCING OLD TABLE AS old_bars FOR EACH STATEMENT EXECUTE FUNCTION lane_bar_heads_on_change();
CREATE TRIGGER lane_bar_heads_truncate AFTER TRUNCATE ON lane_telemetry
    FOR EACH STATEMENT EXECUTE FUNCTION lane_bar_heads_on_truncate();

INSERT INTO lane_bar_heads (ticker, latest_ts, revision)
SELECT b.ticker, max(b.ts), nextval('lane_bar_revision') FROM lane_telemetry b GROUP BY b.ticker;
