"""The dispatcher's SQL, one named query each, with what it is for and why it is shaped so.

`now` and the ET day bounds are always parameters: SQL's now() is the database's wall clock,
not the injected clock, and CURRENT_DATE is a UTC date.
"""

# -- claim_and_gather --
# Claims the oldest PENDING recommendation of one account and gathers every input its gates
# need, in one round trip. FOR UPDATE SKIP LOCKED: a row another dispatcher is deciding is
# skipped, not waited for; the lock lasts until this dispatcher's transaction ends.
# The LATERAL subqueries use the (ticker, ts) keys and the per-account partial indexes.
CLAIM_AND_GATHER = """
WITH claimed AS (
    SELECT r.*
    FROM dispatch_recommendations r
    WHERE r.account_id = %(account_id)s AND r.status = 'PENDING'
    ORDER BY r.created_at, r.id
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
SELECT c.id, c.account_id, c.ticker, c.action, c.instrument, c.strategy, c.confidence,
       c.bar_ts, c.created_at, c.reason,
       b.ts AS bar_ts_latest, b.open AS bar_open, b.high AS bar_high, b.low AS bar_low,
       b.close AS bar_close, b.volume AS bar_volume,
       f.ts AS features_ts,
       (SELECT max(e.submitted_at) FROM dispatch_executions e
         WHERE e.account_id = c.account_id AND e.ticker = c.ticker
           AND e.status NOT IN ('REJECTED', 'FAILED', 'CANCELED')) AS last_trade_time,
       (SELECT count(*) FROM dispatch_executions e
         WHERE e.account_id = c.account_id AND e.ticker = c.ticker
           AND e.status NOT IN ('REJECTED', 'FAILED', 'CANCELED')
           AND e.submitted_at >= %(day_start)s AND e.submitted_at < %(day_end)s)::int AS ticker_count_today,
       (SELECT to_jsonb(p) FROM active_positions p
         WHERE p.account_id = c.account_id AND p.ticker = c.ticker
           AND p.status IN ('PENDING', 'OPEN', 'CLOSING')) AS open_position,
       cap.open_positions, cap.exposure,
       a.equity, a.last_equity, a.as_of AS account_as_of,
       k.state AS kill_state, k.changed_by AS kill_changed_by, k.tripped_session AS kill_tripped_session
FROM claimed c
LEFT JOIN LATERAL (
    SELECT * FROM lane_telemetry b WHERE b.ticker = c.ticker AND b.ts <= %(now)s
    ORDER BY b.ts DESC LIMIT 1) b ON true
LEFT JOIN LATERAL (
    SELECT f.ts FROM lane_features f WHERE f.ticker = c.ticker AND f.ts <= %(now)s
    ORDER BY f.ts DESC LIMIT 1) f ON true
CROSS JOIN LATERAL (
    SELECT count(*)::int AS open_positions,
           coalesce(sum(p.qty * coalesce(p.market_price, p.avg_price) * p.multiplier), 0) AS exposure
    FROM active_positions p
    WHERE p.account_id = c.account_id AND p.status IN ('PENDING', 'OPEN', 'CLOSING')) cap
LEFT JOIN account_state a ON a.account_id = c.account_id
LEFT JOIN kill_switch k ON k.account_id = c.account_id
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

# -- record_outcome --
# Terminal status of a recommendation that did not produce an order, with every gate result.
RECORD_OUTCOME = """
UPDATE dispatch_recommendations
SET status = %(status)s, decided_at = %(now)s, claimed_by = %(worker)s, claimed_at = coalesce(claimed_at, %(now)s),
    outcome_code = %(code)s, outcome_detail = %(detail)s, gate_results = %(gates)s, decision = %(decision)s,
    params_source = %(params_source)s, params_version = %(params_version)s, params_hash = %(params_hash)s
WHERE id = %(id)s AND account_id = %(account_id)s
"""

# -- record_intent --
# Before the order leaves: the execution row (with its deterministic client_order_id), the
# reserved position for an entry, and the recommendation moved to SUBMITTING, all in the
# claiming transaction. A crash after this commit leaves a SUBMITTING row that recovery
# resolves by asking the broker for that client_order_id; a crash before it leaves the
# recommendation PENDING, and nothing was sent.
RECORD_INTENT = """
WITH rec AS (
    UPDATE dispatch_recommendations
    SET status = 'SUBMITTING', claimed_by = %(worker)s, claimed_at = %(now)s,
        gate_results = %(gates)s, decision = %(decision)s,
        params_source = %(params_source)s, params_version = %(params_version)s, params_hash = %(params_hash)s
    WHERE id = %(recommendation_id)s AND account_id = %(account_id)s
    RETURNING id
), exec AS (
    INSERT INTO dispatch_executions (
        account_id, recommendation_id, leg, client_order_id, ticker, instrument, symbol, side,
        position_intent, qty, multiplier, est_price, notional, status, submitted_at, updated_at,
        strike, expiration, option_right, premium, quote, greeks, option_gates, order_type, limit_price, attempt)
    SELECT %(account_id)s, rec.id, %(leg)s, %(client_order_id)s, %(ticker)s, %(instrument)s, %(symbol)s,
           %(side)s, %(position_intent)s, %(qty)s, %(multiplier)s, %(est_price)s, %(notional)s,
           'SUBMITTING', %(now)s, %(now)s,
           %(strike)s, %(expiration)s, %(option_right)s, %(premium)s, %(quote)s, %(greeks)s, %(option_gates)s,
           %(order_type)s, %(limit_price)s, %(attempt)s
    FROM rec
    RETURNING id
)
INSERT INTO active_positions (account_id, ticker, instrument, symbol, side, qty, multiplier, avg_price,
                              status, recommendation_id, execution_id, opened_at)
SELECT %(account_id)s, %(ticker)s, %(instrument)s, %(symbol)s, %(position_side)s, %(qty)s, %(multiplier)s,
       %(est_price)s, 'PENDING', %(recommendation_id)s, exec.id, %(now)s
FROM exec
WHERE %(opens_position)s
RETURNING execution_id
"""

# -- record_fill --
# The broker's answer for an order: execution, position and the recommendation's terminal
# status in one transaction.
UPDATE_EXECUTION = """
UPDATE dispatch_executions
SET status = %(status)s, broker_order_id = %(broker_order_id)s, filled_qty = %(filled_qty)s,
    filled_avg_price = %(filled_avg_price)s,
    notional = coalesce(%(filled_qty)s::numeric * %(filled_avg_price)s::numeric * multiplier, notional),
    broker_message = %(message)s, filled_at = %(filled_at)s, updated_at = %(now)s
WHERE account_id = %(account_id)s AND client_order_id = %(client_order_id)s
RETURNING id, recommendation_id, ticker, instrument, side, multiplier,
          EXISTS (SELECT 1 FROM active_positions p
                  WHERE p.account_id = dispatch_executions.account_id
                    AND p.execution_id = dispatch_executions.id) AS opens_position
"""

# An entry's reserved position becomes OPEN at the fill price, or is released.
OPEN_POSITION = """
UPDATE active_positions
SET status = 'OPEN', qty = %(qty)s, avg_price = %(price)s, market_price = %(price)s
WHERE account_id = %(account_id)s AND execution_id = %(execution_id)s AND status = 'PENDING'
"""
RELEASE_POSITION = """
UPDATE active_positions SET status = 'CANCELLED', closed_at = %(now)s
WHERE account_id = %(account_id)s AND execution_id = %(execution_id)s AND status = 'PENDING'
"""
# -- mark_closing --
# An exit takes the ticker's OPEN position for itself, under the row lock: a second exit finds
# nothing to close. Runs in the transaction that records the exit order.
MARK_CLOSING = """
UPDATE active_positions SET status = 'CLOSING'
WHERE account_id = %(account_id)s AND ticker = %(ticker)s AND status = 'OPEN'
RETURNING id
"""
# An exit's fill closes the position and realizes its P&L.
CLOSE_POSITION = """
UPDATE active_positions
SET status = 'CLOSED', closed_at = %(now)s, close_price = %(price)s,
    realized_pnl = (%(price)s::numeric - avg_price) * qty * multiplier * CASE WHEN side = 'short' THEN -1 ELSE 1 END
WHERE account_id = %(account_id)s AND ticker = %(ticker)s AND status IN ('OPEN', 'CLOSING')
"""
# An exit that ended without closing everything: the position is OPEN again with what is left.
REOPEN_POSITION = """
UPDATE active_positions
SET status = 'OPEN', qty = qty - %(filled)s::numeric,
    realized_pnl = coalesce(realized_pnl, 0)
                   + (coalesce(%(price)s::numeric, avg_price) - avg_price) * %(filled)s::numeric * multiplier
                     * CASE WHEN side = 'short' THEN -1 ELSE 1 END
WHERE account_id = %(account_id)s AND ticker = %(ticker)s AND status = 'CLOSING'
"""

# -- in_flight --
# SUBMITTING recommendations whose dispatcher is gone: no backend of the database carries
# its application_name any more (a killed process's connections close with it), or it is
# this process's own from before a restart. Ask the broker what became of each.
IN_FLIGHT = """
SELECT r.id AS recommendation_id, r.claimed_by, e.client_order_id, e.ticker, e.instrument, e.submitted_at
FROM dispatch_recommendations r
JOIN dispatch_executions e ON e.account_id = r.account_id AND e.recommendation_id = r.id
WHERE r.account_id = %(account_id)s AND r.status = 'SUBMITTING'
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

# Marks live positions to the broker's current prices, all in one statement.
MARK_POSITIONS = """
UPDATE active_positions p SET market_price = m.price
FROM unnest(%(symbols)s::text[], %(prices)s::numeric[]) AS m(symbol, price)
WHERE p.account_id = %(account_id)s AND p.symbol = m.symbol AND p.status IN ('OPEN', 'CLOSING')
"""

# -- reconcile_positions --
# Live positions as this database has them, to compare with the broker's.
LIVE_POSITIONS = """
SELECT id, ticker, symbol, status, opened_at FROM active_positions
WHERE account_id = %(account_id)s AND status IN ('PENDING', 'OPEN', 'CLOSING')
"""
# A position the broker no longer holds (expired, exercised, assigned, closed by hand).
CLOSE_VANISHED = """
UPDATE active_positions SET status = 'CLOSED', closed_at = %(now)s
WHERE account_id = %(account_id)s AND id = ANY(%(ids)s) AND status = 'OPEN'
"""

NOTIFY_CHANNEL = "recommendations"
