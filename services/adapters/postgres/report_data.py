"""The report's inputs from Postgres: positions, fills and decisions of one account and period.

Three named queries, read in one repeatable-read snapshot so the rows agree with each other.
They read only the tables every run writes (active_positions, dispatch_executions,
dispatch_recommendations, lane_telemetry), so a replay's database or schema feeds the same code:
point the connection at it.
"""

from __future__ import annotations

from datetime import date

import psycopg

from services.common.market_calendar import et_day_bounds
from services.domain.report import HORIZONS, ReportInputs

# -- report_positions --
# Every position held at some time in [start, end): opened before the end, not closed before the
# start. PENDING and CANCELLED ones never held anything.
REPORT_POSITIONS = """
SELECT p.id, p.ticker, p.instrument, p.symbol, p.side, p.qty, p.multiplier, p.avg_price, p.market_price,
       p.status, p.strategy, p.opened_at, p.closed_at, p.close_price, p.exit_reason, p.fees, p.realized_pnl
FROM active_positions p
WHERE p.account_id = %(account_id)s AND p.status IN ('OPEN', 'CLOSING', 'CLOSED')
  AND p.opened_at < %(end)s AND (p.closed_at IS NULL OR p.closed_at >= %(start)s)
ORDER BY p.opened_at, p.id
"""

# -- report_fills --
# Executions that filled (wholly or in part) in the period, with the price each was decided at
# (est_price) and the option quote recorded with it.
REPORT_FILLS = """
SELECT e.id, e.recommendation_id, e.role, e.ticker, e.instrument, e.symbol, e.side, e.qty, e.filled_qty,
       e.multiplier, e.est_price, e.filled_avg_price, e.order_type, e.limit_price, e.quote, e.attempt,
       coalesce(e.filled_at, e.updated_at) AS filled_at
FROM dispatch_executions e
WHERE e.account_id = %(account_id)s AND e.filled_qty > 0 AND e.filled_avg_price IS NOT NULL
  AND coalesce(e.filled_at, e.updated_at) >= %(start)s AND coalesce(e.filled_at, e.updated_at) < %(end)s
ORDER BY coalesce(e.filled_at, e.updated_at), e.id
"""

# -- report_recommendations --
# Every recommendation written in the period, and for an entry the bar it is measured from (its
# signal bar; without one, the last bar that began at least a minute before it was written) and
# the closes of the bars that began exactly N minutes after that bar, NULL where no such bar is
# stored. Each bar is one probe of lane_telemetry's (ticker, ts) key.
REPORT_RECOMMENDATIONS = """
SELECT r.id, r.ticker, r.action, r.instrument, r.strategy, r.confidence, r.bar_ts, r.reason, r.created_at,
       r.decided_at, r.status, r.outcome_code, r.gate_results, r.params_source, r.params_version, r.params_hash,
       r.position_id, r.exit_reason,
       b.ts AS base_ts, b.close AS base_close, fw.closes AS forward_closes
FROM dispatch_recommendations r
LEFT JOIN LATERAL (
    SELECT t.ts, t.close FROM lane_telemetry t
    WHERE r.action IN ('BUY', 'SELL') AND t.ticker = r.ticker
      AND t.ts <= coalesce(r.bar_ts, r.created_at - interval '1 minute')
    ORDER BY t.ts DESC LIMIT 1
) b ON true
LEFT JOIN LATERAL (
    SELECT array_agg(t.close ORDER BY h.ord) AS closes
    FROM unnest(%(horizons)s::int[]) WITH ORDINALITY AS h(minutes, ord)
    LEFT JOIN lane_telemetry t ON t.ticker = r.ticker AND t.ts = b.ts + make_interval(mins => h.minutes)
    WHERE b.ts IS NOT NULL
) fw ON true
WHERE r.account_id = %(account_id)s AND r.created_at >= %(start)s AND r.created_at < %(end)s
ORDER BY r.created_at, r.id
"""


def gather_report_inputs(conn: psycopg.Connection, account_id: str, start: date, end: date,
                         source: str = "live") -> ReportInputs:
    """The rows of one account from the ET day `start` to the ET day `end`, both included."""
    if end < start:
        raise ValueError(f"report period ends ({end}) before it starts ({start})")
    params = {"account_id": account_id, "start": et_day_bounds(start)[0], "end": et_day_bounds(end)[1],
              "horizons": list(HORIZONS)}
    own_snapshot = conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    with conn.transaction():
        if own_snapshot:  # inside a caller's transaction, its snapshot is the one in force
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        positions = conn.execute(REPORT_POSITIONS, params).fetchall()
        fills = conn.execute(REPORT_FILLS, params).fetchall()
        recs = conn.execute(REPORT_RECOMMENDATIONS, params).fetchall()
    return ReportInputs(account_id=account_id, start=start, end=end, positions=positions, fills=fills,
                        recommendations=recs, source=source)
