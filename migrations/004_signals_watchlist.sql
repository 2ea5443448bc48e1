-- 004: sentiment (market data), the watchlist and the signal engine's per-ticker state
-- (per account), and the constraint that makes a signal for one bar idempotent.

-- News sentiment, written by the upstream classifier. Market data: shared by every account.
-- score is signed (-1 bearish .. +1 bullish); confidence is the classifier's own, 0..1.
CREATE TABLE sentiment (
    ticker      text        NOT NULL,
    ts          timestamptz NOT NULL,
    score       numeric     NOT NULL CHECK (score BETWEEN -1 AND 1),
    confidence  numeric     NOT NULL CHECK (confidence BETWEEN 0 AND 1),
    source      text        NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    -- Its prefix (ticker, ts) serves the engines' lookback reads: one range scan per ticker.
    PRIMARY KEY (ticker, ts, source)
);

-- The scored watchlist of an account. components holds every term of the score, so a
-- selection can be explained from this row alone.
CREATE TABLE watchlist_state (
    account_id  text        NOT NULL,
    ticker      text        NOT NULL,
    selected    boolean     NOT NULL DEFAULT false,
    score       numeric,
    components  jsonb       NOT NULL DEFAULT '{}',
    rank        integer,
    updated_at  timestamptz NOT NULL,
    PRIMARY KEY (account_id, ticker)
);
CREATE INDEX watchlist_state_selected ON watchlist_state (account_id) WHERE selected;

-- The signal cooldown of an account's ticker. Engines claim it with a conditional upsert, so two
-- engines running at once cannot both emit inside one cooldown window.
CREATE TABLE signal_state (
    account_id      text        NOT NULL,
    ticker          text        NOT NULL,
    last_signal_at  timestamptz NOT NULL,     -- created_at of the last recommendation emitted
    last_bar_ts     timestamptz NOT NULL,     -- the bar it was computed from
    PRIMARY KEY (account_id, ticker)
);

-- One recommendation per account, ticker and bar: a second engine (or a re-run of a cycle)
-- inserts with ON CONFLICT DO NOTHING and writes nothing. Rows without a bar (manual entries)
-- are not constrained.
CREATE UNIQUE INDEX dispatch_recommendations_one_per_bar
    ON dispatch_recommendations (account_id, ticker, bar_ts) WHERE bar_ts IS NOT NULL;
