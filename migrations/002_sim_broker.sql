-- 002: state of the simulated paper broker.
--
-- The simulated broker keeps its book in Postgres so that several dispatcher processes share
-- one broker, and so that a reused client_order_id is refused across processes exactly as
-- Alpaca refuses it (HTTP 422).

CREATE TABLE sim_account (
    account_id    text        PRIMARY KEY,
    cash          numeric     NOT NULL,
    last_equity   numeric     NOT NULL,   -- equity at the previous session's close
    session_day   date        NOT NULL,   -- the ET trading day last_equity was rolled for
    updated_at    timestamptz NOT NULL
);

CREATE TABLE sim_orders (
    id               uuid        PRIMARY KEY,
    account_id       text        NOT NULL,
    client_order_id  text        NOT NULL,
    symbol           text        NOT NULL,
    underlying       text        NOT NULL,
    asset_class      text        NOT NULL,   -- us_equity / us_option
    side             text        NOT NULL,
    position_intent  text,
    qty              numeric     NOT NULL,
    multiplier       integer     NOT NULL,
    status           text        NOT NULL,
    filled_qty       numeric     NOT NULL,
    filled_avg_price numeric,
    reject_reason    text,
    submitted_at     timestamptz NOT NULL,
    filled_at        timestamptz,
    CONSTRAINT sim_orders_client_order_id UNIQUE (account_id, client_order_id)
);
CREATE INDEX sim_orders_symbol ON sim_orders (account_id, symbol);

-- Option marks for the simulated chain, written by the simulated market.
CREATE TABLE sim_option_marks (
    symbol      text        NOT NULL,
    ts          timestamptz NOT NULL,
    bid         numeric     NOT NULL,
    ask         numeric     NOT NULL,
    PRIMARY KEY (symbol, ts)
);
