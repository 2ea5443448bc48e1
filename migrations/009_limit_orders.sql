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
