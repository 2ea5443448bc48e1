-- 011: the broker's asset records, shared by every process for the session they were read in.
--
-- Each dispatcher used to ask the broker for the record of every ticker it met, so N tasks
-- spent N requests per ticker of the account's 200 a minute at every start. The first process
-- to ask records the answer here (a missing asset too: record IS NULL); the others read it.
CREATE TABLE asset_records (
    symbol       text        NOT NULL,
    session_day  date        NOT NULL,          -- the ET day the answer holds for
    record       jsonb,                         -- NULL: the broker has no such asset
    fetched_at   timestamptz NOT NULL,
    PRIMARY KEY (symbol, session_day)
);
