-- 017: replay runs. A replay writes into a database of its own; this table, there, says what
-- was replayed: the run's id, the params (source, version, content hash), the simulated
-- market's seed, the inputs (files or the recorded period, tickers, sessions, a digest of the
-- bars) and, when it finished, its counts. In the live database it stays empty.
CREATE TABLE replay_runs (
    run_id          text        PRIMARY KEY,
    started_at      timestamptz NOT NULL,
    finished_at     timestamptz,
    params_source   text        NOT NULL,
    params_version  text,
    params_hash     text        NOT NULL,
    seed            integer     NOT NULL,
    inputs          jsonb       NOT NULL,
    counts          jsonb
);
