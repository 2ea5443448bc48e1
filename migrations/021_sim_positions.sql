-- 021: the simulated broker's positions, kept as its orders fill.
--
-- The simulated broker answered every account and positions request by aggregating every filled
-- order the account ever had: twice per account refresh, a cost that grew with the history (a
-- replay of 20 sessions refreshes ~3,200 times over ~1,500 orders). A row trigger on sim_orders
-- keeps, per (account, symbol, asset class, multiplier), what that aggregate computed: the net
-- filled quantity, and the quantity and cost of the filled buys (the average entry price is their
-- ratio, as before). Only orders whose status is 'filled' count, as before; an order leaving or
-- entering that status, or deleted, moves the sums by its own contribution. Exact: numeric sums.

CREATE TABLE sim_positions (
    account_id  text    NOT NULL,
    symbol      text    NOT NULL,
    asset_class text    NOT NULL,
    multiplier  integer NOT NULL,
    qty         numeric NOT NULL,  -- filled buys minus filled sells
    bought_qty  numeric NOT NULL,  -- filled quantity of the buys
    bought_cost numeric NOT NULL,  -- sum of filled_qty * filled_avg_price of the buys
    PRIMARY KEY (account_id, symbol, asset_class, multiplier)
);

CREATE FUNCTION sim_positions_add(o sim_orders, sign integer) RETURNS void LANGUAGE sql AS $$
    INSERT INTO sim_positions AS p (account_id, symbol, asset_class, multiplier, qty, bought_qty, bought_cost)
    VALUES (o.account_id, o.symbol, o.asset_class, o.multiplier,
            sign * CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE -o.filled_qty END,
            sign * CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE 0 END,
            sign * CASE WHEN o.side = 'buy' THEN coalesce(o.filled_qty * o.filled_avg_price, 0) ELSE 0 END)
    ON CONFLICT (account_id, symbol, asset_class, multiplier) DO UPDATE SET
        qty = p.qty + EXCLUDED.qty, bought_qty = p.bought_qty + EXCLUDED.bought_qty,
        bought_cost = p.bought_cost + EXCLUDED.bought_cost
$$;

CREATE FUNCTION sim_positions_on_order() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.status = 'filled' THEN
        PERFORM sim_positions_add(OLD, -1);
    END IF;
    IF TG_OP IN ('INSERT', 'UPDATE') AND NEW.status = 'filled' THEN
        PERFORM sim_positions_add(NEW, 1);
    END IF;
    RETURN NULL;
END
$$;

CREATE FUNCTION sim_positions_on_truncate() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    DELETE FROM sim_positions;
    RETURN NULL;
END
$$;

CREATE TRIGGER sim_positions_on_order AFTER INSERT OR UPDATE OR DELETE ON sim_orders
    FOR EACH ROW EXECUTE FUNCTION sim_positions_on_order();
CREATE TRIGGER sim_positions_on_truncate AFTER TRUNCATE ON sim_orders
    FOR EACH STATEMENT EXECUTE FUNCTION sim_positions_on_truncate();

INSERT INTO sim_positions (account_id, symbol, asset_class, multiplier, qty, bought_qty, bought_cost)
SELECT o.account_id, o.symbol, o.asset_class, o.multiplier,
       sum(CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE -o.filled_qty END),
       sum(CASE WHEN o.side = 'buy' THEN o.filled_qty ELSE 0 END),
       sum(CASE WHEN o.side = 'buy' THEN coalesce(o.filled_qty * o.filled_avg_price, 0) ELSE 0 END)
FROM sim_orders o WHERE o.status = 'filled'
GROUP BY 1, 2, 3, 4;
