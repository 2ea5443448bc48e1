-- 006: orders the broker has that this database does not.
--
-- Every order of ours is recorded (with its client_order_id) before it is sent, so an order the
-- broker reports that no execution row knows came from elsewhere: a database restored from an
-- older backup, or someone trading the account by hand. Its exposure is invisible to the gates,
-- so reconciliation records it here and stops new entries until an operator has looked.
CREATE TABLE unknown_broker_orders (
    account_id       text        NOT NULL,
    broker_order_id  text        NOT NULL,
    client_order_id  text,
    symbol           text        NOT NULL,
    side             text        NOT NULL,
    qty              numeric     NOT NULL,
    status           text        NOT NULL,
    submitted_at     timestamptz,
    found_at         timestamptz NOT NULL,
    PRIMARY KEY (account_id, broker_order_id)
);
