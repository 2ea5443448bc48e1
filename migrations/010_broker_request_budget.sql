-- 010: one broker request budget per account, shared by every process trading it.
--
-- Alpaca allows 200 trading-API requests a minute per account, not per process: four
-- dispatchers with a bucket each asked up to 340 a minute and got 429s, order submits among
-- them. The bucket lives here so that all of them spend the same tokens; one UPDATE takes a
-- token under the row lock (see request_budget.TAKE_TOKEN).
CREATE TABLE broker_request_budget (
    account_id   text             NOT NULL PRIMARY KEY,
    tokens       double precision NOT NULL,
    refilled_at  timestamptz      NOT NULL
);

-- The last time any process asked the broker about an order by client_order_id. Recovery in
-- every dispatcher polls the same orphaned or unfilled orders; the first to claim a lookup asks,
-- the others skip it for a while (request_budget.CLAIM_LOOKUPS).
CREATE TABLE broker_order_lookups (
    account_id       text        NOT NULL,
    client_order_id  text        NOT NULL,
    looked_at        timestamptz NOT NULL,
    PRIMARY KEY (account_id, client_order_id)
);
