"""The dispatcher's SQL, one named query each, with what it is for and why it is shaped so.

`now` and the ET day bounds are always parameters: SQL's now() is the database's wall clock,
not the injected clock, and CURRENT_DATE is a UTC date.
"""

# -- claim_and_gather --
# Claims the oldest PENDING recommendations of one account (up to `limit`, a batch) and gathers
# every input their gates need, in one round trip. FOR UPDATE SKIP LOCKED: a row another dispatcher is deciding is
# skipped, not waited for; the lock lasts until this dispatcher's transaction ends.
# The LATERAL subqueries use the (ticker, ts) keys and the per-account partial indexes. What is
# the account's, not the row's (open positions and exposure, account state, kill switch), is read
# once per batch: the MATERIALIZED CTE keeps the planner from re-running the aggregate per row.
# A ticker's trades (the last one, today's count) come from one scan of its executions.
CLAIM_AND_GATHER = """
WITH claimed AS (
    SELECT r.*
    FROM dispatch_recommendations r
    WHERE r.account_id = %(account_id)s AND r.status = 'PENDING'
    ORDER BY r.created_at, r.id
    LIMIT %(limit)s
    FOR UPDATE SKIP LOCKED
), cap AS MATERIALIZED (
    SELECT count(*)::int AS open_positions,
           coalesce(sum(p.qty * coalesce(p.market_price, p.avg_price) * p.multiplier), 0) AS exposure
    FROM active_positions p
    WHERE p.account_id = %(account_id)s AND p.status IN ('PENDING', 'OPEN', 'CLOSING')
)
SELECT c.id, c.account_id, c.ticker, c.action, c.instrument, c.strategy, c.confidence,
       c.bar_ts, c.created_at, c.reason, c.position_id, c.exit_reason,
       b.ts AS bar_ts_latest, b.open AS bar_open, b.high AS bar_high, b.low AS bar_low,
       b.close AS bar_close, b.volume AS bar_volume,
       f.ts AS features_ts,
       t.last_trade_time, t.ticker_count_today,
       (SELECT to_jsonb(p) FROM active_positions p
         WHERE p.account_id = c.account_id AND p.ticker = c.ticker
           AND p.status IN ('PENDING', 'OPEN', 'CLOSING')) AS open_position,
       cap.open_positions, cap.exposure,
       a.equity, a.last_equity, a.as_of AS account_as_of, a.orders_reconciled_at,
       k.state AS kill_state, k.changed_by AS kill_changed_by, k.tripped_session AS kill_tripped_session,
       coalesce(k.flatten, false) AS kill_flatten
FROM claimed c
LEFT JOIN LATERAL (
    SELECT * FROM lane_telemetry b WHERE b.ticker = c.ticker AND b.ts <= %(now)s
    ORDER BY b.ts DESC LIMIT 1) b ON true
LEFT JOIN LATERAL (
    SELECT f.ts FROM lane_features f WHERE f.ticker = c.ticker AND f.ts <= %(now)s
    ORDER BY f.ts DESC LIMIT 1) f ON true
CROSS JOIN LATERAL (
    SELECT max(e.submitted_at) AS last_trade_time,
           count(*) FILTER (WHERE e.submitted_at >= %(day_start)s AND e.submitted_at < %(day_end)s)::int
               AS ticker_count_today
    FROM dispatch_executions e
    WHERE e.account_id = c.account_id AND e.ticker = c.ticker
      AND e.status NOT IN ('REJECTED', 'FAILED', 'CANCELED')) t
CROSS JOIN cap
LEFT JOIN account_state a ON a.account_id = %(account_id)s
LEFT JOIN kill_switch k ON k.account_id = %(account_id)s
ORDER BY c.created_at, c.id
"""

# -- capacity_lock --
# Serialises the capacity check of one account (positions, exposure, one position per
# ticker) until the transaction ends, without blocking other accounts. It must be its own
# statement: in READ COMMITTED a statement's snapshot is taken when it starts, so the counts
# are read by the next statement, after the lock is held.
CAPACITY_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended('capacity:' || %(account_id)s, 0))"

# -- capacity_recheck --
# The inputs of the capacity gates, read again under the account lock.
CAPACITY_RECHECK = """
SELECT count(*)::int AS open_positions,
       coalesce(sum(p.qty * coalesce(p.market_price, p.avg_price) * p.multiplier), 0) AS exposure,
       coalesce(bool_or(p.ticker = %(ticker)s), false) AS has_open_position,
       (SELECT k.state FROM kill_switch k WHERE k.account_id = %(account_id)s) AS kill_state
FROM active_positions p
WHERE p.account_id = %(account_id)s AND p.status IN ('PENDING', 'OPEN', 'CLOSING')
"""

# -- claim_id --
# The claim alone, returning nothing but the id: used when the full claim failed to load its row
# (a value the driver cannot decode), so that row can still be failed by id.
CLAIM_ID = """
SELECT r.id FROM dispatch_recommendations r
WHERE r.account_id = %(account_id)s AND r.status = 'PENDING'
ORDER BY r.created_at, r.id
LIMIT 1
FOR UPDATE SKIP LOCKED
"""

# The recommendation status behind an order, for a caller whose event was refused.
RECOMMENDATION_STATUS_BY_ORDER = """
SELECT r.status FROM dispatch_executions e JOIN dispatch_recommendations r ON r.id = e.recommendation_id
WHERE e.account_id = %(account_id)s AND e.client_order_id = %(client_order_id)s
"""

# -- in_flight --
# SUBMITTING recommendations whose dispatcher is gone: no backend of the database carries
# its application_name any more (a killed process's connections close with it), or it is
# this process's own from before a restart. Ask the broker what became of each.
IN_FLIGHT = """
SELECT r.id AS recommendation_id, r.claimed_by, e.client_order_id, e.ticker, e.instrument, e.submitted_at
FROM dispatch_recommendations r
JOIN dispatch_executions e ON e.account_id = r.account_id AND e.recommendation_id = r.id
WHERE r.account_id = %(account_id)s AND r.status = 'SUBMITTING' AND e.status = 'SUBMITTING'
  AND NOT EXISTS (
      SELECT 1 FROM pg_stat_activity a
      WHERE a.application_name LIKE 'ops-dispatcher:' || r.claimed_by || '%%' AND r.claimed_by <> %(worker)s)
ORDER BY r.id
"""

# -- record_unknown_orders --
# The broker's recent orders that no execution row knows, recorded once each; returns the new ones.
RECORD_UNKNOWN_ORDERS = """
INSERT INTO unknown_broker_orders (account_id, broker_order_id, client_order_id, symbol, side, qty, status,
                                   submitted_at, found_at)
SELECT %(account_id)s, o.broker_order_id, o.client_order_id, o.symbol, o.side, o.qty, o.status, o.submitted_at, %(now)s
FROM jsonb_to_recordset(%(orders)s) AS o(broker_order_id text, client_order_id text, symbol text, side text,
                                          qty numeric, status text, submitted_at timestamptz)
WHERE NOT EXISTS (SELECT 1 FROM dispatch_executions e
                  WHERE e.account_id = %(account_id)s AND e.client_order_id = o.client_order_id)
ON CONFLICT (account_id, broker_order_id) DO NOTHING
RETURNING broker_order_id, client_order_id, symbol, side, qty
"""

# The broker's orders were compared with ours at `now`.
ORDERS_RECONCILED = "UPDATE account_state SET orders_reconciled_at = %(now)s WHERE account_id = %(account_id)s"

# Orders accepted but not yet filled, to poll for their fill.
UNFILLED = """
SELECT e.client_order_id FROM dispatch_executions e
WHERE e.account_id = %(account_id)s AND e.status IN ('ACCEPTED', 'PARTIALLY_FILLED')
ORDER BY e.id LIMIT 100
"""

UPSERT_ACCOUNT_STATE = """
INSERT INTO account_state (account_id, equity, last_equity, cash, buying_power, as_of, source)
VALUES (%(account_id)s, %(equity)s, %(last_equity)s, %(cash)s, %(buying_power)s, %(as_of)s, %(source)s)
ON CONFLICT (account_id) DO UPDATE
SET equity = EXCLUDED.equity, last_equity = EXCLUDED.last_equity, cash = EXCLUDED.cash,
    buying_power = EXCLUDED.buying_power, as_of = EXCLUDED.as_of, source = EXCLUDED.source
"""

# -- reconcile_positions --
# Live positions as this database has them, and every position with local activity since the
# broker's snapshot was asked for (those symbols are not judged on that snapshot).
RECONCILE_POSITIONS = """
SELECT id, ticker, symbol, status, opened_at, coalesce(updated_at, closed_at, opened_at) AS updated_at
FROM active_positions
WHERE account_id = %(account_id)s
  AND (status IN ('PENDING', 'OPEN', 'CLOSING') OR coalesce(updated_at, closed_at, opened_at) >= %(since)s)
"""

NOTIFY_CHANNEL = "recommendations"
