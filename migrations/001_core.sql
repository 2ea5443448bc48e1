-- 001: the core schema.
--
-- Timestamps are timestamptz (stored in UTC). Every account-scoped table carries the same
-- NOT NULL key, `account_id`; market data (bars, features) is shared by all accounts and keyed
-- by ticker.

-- Market data ---------------------------------------------------------------------------------

-- 1-minute bars. `ts` labels the minute the bar begins; the bar covers [ts, ts + 60 s).
CREATE TABLE lane_telemetry (
    ticker      text        NOT NULL,
    ts          timestamptz NOT NULL,
    open        numeric     NOT NULL,
    high        numeric     NOT NULL,
    low         numeric     NOT NULL,
    close       numeric     NOT NULL,
    volume      bigint      NOT NULL,
    ingested_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticker, ts)
);

-- Features as of a bar. `ts` is the time of the latest bar used (the data's own time);
-- `computed_at` is when the row was written and is never used for freshness.
CREATE TABLE lane_features (
    ticker          text        NOT NULL,
    ts              timestamptz NOT NULL,
    close           numeric     NOT NULL,
    sma20           numeric,
    sma50           numeric,
    distance_sma20  numeric,
    distance_sma50  numeric,
    recent_vol      numeric,
    baseline_vol    numeric,
    vol_ratio       numeric,
    volume_ratio    numeric,
    volume_surge    boolean,
    trend_state     smallint,
    short_inputs    text[]      NOT NULL DEFAULT '{}',
    computed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (ticker, ts)
);

-- The latest features per ticker. Postgres expands `f.*` when the view is created, so any
-- migration that adds a column to lane_features must recreate this view.
CREATE VIEW latest_features AS
    SELECT DISTINCT ON (f.ticker) f.*
    FROM lane_features f
    ORDER BY f.ticker, f.ts DESC;

-- Recommendations -----------------------------------------------------------------------------

CREATE TABLE dispatch_recommendations (
    id               bigserial   PRIMARY KEY,
    account_id       text        NOT NULL,
    ticker           text        NOT NULL,
    action           text        NOT NULL,          -- BUY (bullish entry), SELL (bearish entry), EXIT
    instrument       text        NOT NULL,          -- STOCK or OPTION
    strategy         text        NOT NULL,          -- day_trade or swing_trade
    confidence       numeric,
    bar_ts           timestamptz,                   -- the bar the signal was computed from
    reason           jsonb       NOT NULL DEFAULT '{}',
    created_at       timestamptz NOT NULL,
    status           text        NOT NULL DEFAULT 'PENDING',
    claimed_by       text,
    claimed_at       timestamptz,
    decided_at       timestamptz,
    outcome_code     text,                          -- reason code of the decision (first failing gate, ORDER_FILLED, ...)
    outcome_detail   text,
    gate_results     jsonb,                         -- every gate: name, passed, reason, observed, limit
    decision         jsonb,                         -- sizing, instrument actually traded, fallback, ...
    params_source    text,
    params_version   text,
    params_hash      text,
    CONSTRAINT recommendation_status CHECK (
        status IN ('PENDING', 'SUBMITTING', 'EXECUTED', 'SKIPPED', 'REJECTED', 'FAILED'))
);
-- The claim: oldest PENDING first, per account.
CREATE INDEX dispatch_recommendations_pending
    ON dispatch_recommendations (account_id, created_at, id) WHERE status = 'PENDING';
-- Recovery of in-flight recommendations.
CREATE INDEX dispatch_recommendations_submitting
    ON dispatch_recommendations (account_id, id) WHERE status = 'SUBMITTING';
CREATE INDEX dispatch_recommendations_decided
    ON dispatch_recommendations (account_id, decided_at);

-- Executions and positions --------------------------------------------------------------------

CREATE TABLE dispatch_executions (
    id                bigserial   PRIMARY KEY,
    account_id        text        NOT NULL,
    recommendation_id bigint      NOT NULL REFERENCES dispatch_recommendations (id),
    leg               smallint    NOT NULL DEFAULT 0,
    client_order_id   text        NOT NULL,
    broker_order_id   text,
    ticker            text        NOT NULL,
    instrument        text        NOT NULL,
    symbol            text        NOT NULL,          -- ticker, or OCC symbol for an option
    side              text        NOT NULL,          -- buy / sell
    position_intent   text,
    qty               numeric     NOT NULL CHECK (qty > 0),
    multiplier        integer     NOT NULL DEFAULT 1,
    est_price         numeric     NOT NULL,          -- the price the order was sized at
    status            text        NOT NULL,
    filled_qty        numeric,
    filled_avg_price  numeric,
    notional          numeric,                       -- qty x price x multiplier
    broker_message    text,
    submitted_at      timestamptz NOT NULL,
    filled_at         timestamptz,
    updated_at        timestamptz NOT NULL,
    CONSTRAINT execution_status CHECK (
        status IN ('SUBMITTING', 'ACCEPTED', 'FILLED', 'PARTIALLY_FILLED', 'REJECTED', 'CANCELED', 'FAILED')),
    CONSTRAINT execution_client_order_id UNIQUE (account_id, client_order_id),
    CONSTRAINT execution_per_leg UNIQUE (account_id, recommendation_id, leg)
);
-- Last trade time and trades today for a ticker.
CREATE INDEX dispatch_executions_ticker ON dispatch_executions (account_id, ticker, submitted_at DESC);

-- A position is PENDING from the moment an entry is decided (it reserves capacity under the
-- account lock) until the broker fills or rejects the order.
CREATE TABLE active_positions (
    id                bigserial   PRIMARY KEY,
    account_id        text        NOT NULL,
    ticker            text        NOT NULL,
    instrument        text        NOT NULL,
    symbol            text        NOT NULL,
    side              text        NOT NULL,          -- long / short
    qty               numeric     NOT NULL CHECK (qty > 0),
    multiplier        integer     NOT NULL DEFAULT 1,
    avg_price         numeric     NOT NULL,
    market_price      numeric,
    status            text        NOT NULL,
    recommendation_id bigint      REFERENCES dispatch_recommendations (id),
    execution_id      bigint      REFERENCES dispatch_executions (id),
    opened_at         timestamptz NOT NULL,
    closed_at         timestamptz,
    close_price       numeric,
    realized_pnl      numeric,
    CONSTRAINT position_status CHECK (status IN ('PENDING', 'OPEN', 'CLOSED', 'CANCELLED'))
);
-- No ticker holds two live positions in one account.
CREATE UNIQUE INDEX active_positions_one_per_ticker
    ON active_positions (account_id, ticker) WHERE status IN ('PENDING', 'OPEN');
CREATE INDEX active_positions_live ON active_positions (account_id) WHERE status IN ('PENDING', 'OPEN');

-- Account state and kill switch ---------------------------------------------------------------

-- The broker's account snapshot, refreshed on a schedule and after fills (the trading API
-- allows 200 requests a minute). equity - last_equity is the day's P&L, as Alpaca reports it.
CREATE TABLE account_state (
    account_id   text        PRIMARY KEY,
    equity       numeric     NOT NULL,
    last_equity  numeric     NOT NULL,
    cash         numeric,
    buying_power numeric,
    as_of        timestamptz NOT NULL,
    source       text        NOT NULL
);

-- ACTIVE: trading. REDUCING: only risk-reducing orders (a daily-loss trip latches here until
-- `latched_until_session`). HALTED: nothing goes out until an operator resumes.
CREATE TABLE kill_switch (
    account_id            text        PRIMARY KEY,
    state                 text        NOT NULL,
    reason                text        NOT NULL,
    changed_by            text        NOT NULL,
    changed_at            timestamptz NOT NULL,
    tripped_session       date,       -- the ET trading day a daily-loss trip belongs to
    CONSTRAINT kill_switch_state CHECK (state IN ('ACTIVE', 'REDUCING', 'HALTED'))
);

CREATE TABLE kill_switch_history (
    id          bigserial   PRIMARY KEY,
    account_id  text        NOT NULL,
    from_state  text,
    to_state    text        NOT NULL,
    reason      text        NOT NULL,
    changed_by  text        NOT NULL,
    changed_at  timestamptz NOT NULL
);
CREATE INDEX kill_switch_history_account ON kill_switch_history (account_id, changed_at);

-- "Why did it (not) trade?" from the database alone.
CREATE VIEW decision_log AS
    SELECT r.account_id, r.id AS recommendation_id, r.created_at, r.decided_at, r.ticker,
           r.action, r.instrument, r.strategy, r.confidence, r.status, r.outcome_code,
           r.outcome_detail, r.gate_results, r.params_source, r.params_version,
           e.client_order_id, e.broker_order_id, e.symbol, e.qty, e.filled_avg_price, e.notional
    FROM dispatch_recommendations r
    LEFT JOIN dispatch_executions e ON e.recommendation_id = r.id AND e.account_id = r.account_id;
