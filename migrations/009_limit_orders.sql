-- 009: limit orders and re-pricing.
--
-- An execution records how its order was priced: market, or limit at `limit_price`, and which
-- attempt of its (recommendation, leg) it is. Attempt 0 is the first order; a re-priced order
-- is attempt 1, 2, ... with its own deterministic client_order_id. Rows written before this
-- migration were market orders, attempt 0.

ALTER TABLE dispatch_executions
    ADD COLUMN order_type  text     NOT NULL DEFAULT 'market',
    ADD COLUMN limit_price numeric,
    ADD COLUMN attempt     smallint NOT NULL DEFAULT 0,
    ADD CONSTRAINT execution_order_type CHECK (order_type IN ('market', 'limit')),
    ADD CONSTRAINT execution_limit_price CHECK (
        (order_type = 'limit') = (limit_price IS NOT NULL) AND (limit_price IS NULL OR limit_price > 0)),
    ADD CONSTRAINT execution_attempt CHECK (attempt >= 0);

-- The simulated broker keeps resting limit orders until its quote reaches them or they are canceled.
ALTER TABLE sim_orders
    ADD COLUMN order_type  text    NOT NULL DEFAULT 'market',
    ADD COLUMN limit_price numeric;
CREATE INDEX sim_orders_resting ON sim_orders (account_id) WHERE status IN ('new', 'accepted');

-- Re-pricing: every attempt of one (recommendation, leg) is its own execution row.
ALTER TABLE dispatch_executions DROP CONSTRAINT execution_per_leg;
ALTER TABLE dispatch_executions ADD CONSTRAINT execution_per_attempt UNIQUE (account_id, recommendation_id, leg, attempt);

-- Why this process asked the broker to cancel an order, recorded before the cancel is sent, so a
-- crash between the cancel and what follows it is finished by whoever sees the cancel next:
-- REPRICE: the order is replaced by the next attempt at `replace_price`; GIVE_UP: it ends.
ALTER TABLE dispatch_executions
    ADD COLUMN cancel_reason text,
    ADD COLUMN replace_price numeric,
    ADD CONSTRAINT execution_cancel_reason CHECK (cancel_reason IS NULL OR cancel_reason IN ('REPRICE', 'GIVE_UP')),
    ADD CONSTRAINT execution_replace_price CHECK ((cancel_reason = 'REPRICE') = (replace_price IS NOT NULL));
