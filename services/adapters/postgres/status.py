"""The operator's first question, answered from the database: is it trading, what does it hold,
what did it decide today. Read by `ops-pipeline status` and by the demo's summary."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from services.adapters.postgres.params_store import params_in_force
from services.common.market_calendar import et_date, et_day_bounds


def status_report(conn, account_id: str, now: datetime) -> dict[str, Any]:
    """What an operator asks first: is it trading, what does it hold, what did it decide today."""
    day_start, day_end = et_day_bounds(et_date(now))
    switch = conn.execute(
        "SELECT state, reason, changed_by, changed_at, tripped_session FROM kill_switch WHERE account_id = %s",
        (account_id,),
    ).fetchone()
    account = conn.execute(
        "SELECT equity, last_equity, equity - last_equity AS daily_pnl, as_of FROM account_state WHERE account_id = %s",
        (account_id,),
    ).fetchone()
    positions = conn.execute(
        """SELECT ticker, instrument, symbol, side, qty, avg_price, market_price, multiplier, status,
                  qty * coalesce(market_price, avg_price) * multiplier AS notional
           FROM active_positions WHERE account_id = %s AND status IN ('PENDING', 'OPEN', 'CLOSING') ORDER BY ticker""",
        (account_id,),
    ).fetchall()
    closed = conn.execute(
        """SELECT ticker, instrument, symbol, side, qty, avg_price, close_price, exit_reason, fees, realized_pnl,
                  opened_at, closed_at
           FROM active_positions
           WHERE account_id = %s AND status = 'CLOSED' AND closed_at >= %s AND closed_at < %s ORDER BY closed_at, id""",
        (account_id, day_start, day_end),
    ).fetchall()
    by_status = conn.execute(
        """SELECT status, count(*)::int AS n FROM dispatch_recommendations
           WHERE account_id = %s AND created_at >= %s AND created_at < %s GROUP BY status ORDER BY status""",
        (account_id, day_start, day_end),
    ).fetchall()
    by_gate = conn.execute(
        """SELECT outcome_code, count(*)::int AS n FROM dispatch_recommendations
           WHERE account_id = %s AND created_at >= %s AND created_at < %s AND status IN ('SKIPPED', 'REJECTED', 'FAILED')
           GROUP BY outcome_code ORDER BY n DESC, outcome_code""",
        (account_id, day_start, day_end),
    ).fetchall()
    return {
        "account_id": account_id,
        "kill_switch": switch or {"state": "ACTIVE", "reason": "never set"},
        "account": account,
        "positions": positions,
        "exposure": sum((p["notional"] for p in positions), 0),
        "closed_today": closed,
        "realized_today": sum((c["realized_pnl"] for c in closed if c["realized_pnl"] is not None), 0),
        "decisions_by_status": {r["status"]: r["n"] for r in by_status},
        "blocked_by": {r["outcome_code"]: r["n"] for r in by_gate},
        "params_in_force": params_in_force(conn),
    }
