-- 005: options: IV history for the IV percentile gate, and the option details of an execution.

-- One at-the-money IV per underlying and ET session day, recorded by the dispatcher the first
-- time it looks at the underlying's chain that day (later values the same day do not replace it).
CREATE TABLE iv_history (
    ticker      text        NOT NULL,
    session_day date        NOT NULL,   -- the ET trading day, never a UTC date
    atm_iv      numeric     NOT NULL CHECK (atm_iv > 0),
    recorded_at timestamptz NOT NULL,
    PRIMARY KEY (ticker, session_day)
);

-- The option an execution traded and the market it was chosen in. `symbol` already holds the
-- OCC symbol of an option order, so there is no separate option_symbol column.
ALTER TABLE dispatch_executions
    ADD COLUMN strike       numeric,
    ADD COLUMN expiration   date,
    ADD COLUMN option_right text,
    ADD COLUMN premium      numeric,     -- per-share premium the contract was priced at (the ask for a buy)
    ADD COLUMN quote        jsonb,       -- bid, ask, bid_size, ask_size, quote_time at the decision
    ADD COLUMN greeks       jsonb,       -- implied_volatility, delta, gamma, theta, vega
    ADD COLUMN option_gates jsonb,       -- every option gate: name, passed, code, reason, observed, limit
    ADD CONSTRAINT execution_option_right CHECK (option_right IS NULL OR option_right IN ('call', 'put'));

-- decision_log selects explicit columns; recreate it so "why did it (not) trade?" shows the contract.
DROP VIEW decision_log;
CREATE VIEW decision_log AS
    SELECT r.account_id, r.id AS recommendation_id, r.created_at, r.decided_at, r.ticker,
           r.action, r.instrument, r.strategy, r.confidence, r.status, r.outcome_code,
           r.outcome_detail, r.gate_results, r.params_source, r.params_version,
           e.client_order_id, e.broker_order_id, e.symbol, e.qty, e.filled_avg_price, e.notional,
           e.strike, e.expiration, e.option_right, e.premium, e.option_gates
    FROM dispatch_recommendations r
    LEFT JOIN dispatch_executions e ON e.recommendation_id = r.id AND e.account_id = r.account_id;
