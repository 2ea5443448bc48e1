"""The trading report, pure: closed trades, fills and decisions in; tables and totals out.

The inputs are rows as the Postgres gather reads them (services/adapters/postgres/report_data.py)
from the live or paper tables, or from a replay's own tables: the same computation serves both.
Nothing here reads a clock or a database.

Money and returns are Decimal throughout, so a total is the exact sum of its rows: the report's
realized P&L equals the sum of its trade rows and the sum of its day rows, to the last digit.
What the inputs do not hold is said, never shown as zero: a signal whose 60-minute bar does not
exist has no 60-minute forward return (None), and the aggregates count it as missing.

Definitions (the README's "Report" section documents the JSON shape built from them):
- A trade is a CLOSED position whose close falls in the period; its P&L is the position's
  realized_pnl (net of the fees of its entry and exit fills). Its day is the ET date of its close.
- The equity curve is the running sum of realized P&L in close order, from 0; the drawdown at a
  point is the running peak (at least 0) minus the curve; the maximum drawdown is its largest value.
- Exposure over time steps at every open and close: the sum of qty x avg_price x multiplier of
  the positions held.
- Execution: the mid at decision time is the mid of the option quote recorded with the order
  when there is one, otherwise the price the order was sized at (the bar close of a stock entry,
  the position's mark of an exit). Slippage is what the fill paid beyond that mid, in the
  order's disfavour (positive = cost); the spread paid is half the recorded quote's width, known
  only where a quote was recorded.
- A signal is a signal-engine recommendation (it carries bar_ts and the rules' reason). Its
  forward return at N minutes is close(bar beginning bar_ts + N) / close(bar at bar_ts) - 1,
  from exactly that bar, never a neighbour's. The directional return is signed by the signal's
  direction (SELL / BEAR negates it); a hit is a directional return above 0. The rule is the
  momentum horizon that confirmed it: momentum_5m, momentum_15m or momentum_5m_15m.
- Gate attribution covers entries (BUY, SELL) that ended SKIPPED with a failed gate. A gate's
  blocked set counts each such entry under every gate that failed; `sole` counts those it alone
  blocked (without it, they would have traded). The forward return of a blocked entry is taken
  from the bar it was decided on (its signal bar, or the last bar before it was written). A
  positive sum of directional returns is what the gate cost (gains not taken), a negative one
  what it saved.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from services.common.market_calendar import et_date
from services.common.numbers import to_decimal

HORIZONS = (5, 15, 60)
ENTRY_ACTIONS = ("BUY", "SELL")
ZERO = Decimal(0)
ONE = Decimal(1)
BPS = Decimal(10_000)
RATIO = Decimal("0.0001")  # win rate, hit rate, profit factor: shown to 4 places


@dataclass(frozen=True)
class ReportInputs:
    """Everything one report is computed from, as gathered.

    positions: every position held at some time in the period (CLOSED, OPEN or CLOSING).
    fills: executions with a filled quantity and price, filled in the period.
    recommendations: every recommendation written in the period, with `base_ts` / `base_close`
    (the bar it is measured from) and `forward_closes` (one close or None per HORIZONS entry).
    """

    account_id: str
    start: date
    end: date
    positions: Sequence[Mapping[str, Any]] = ()
    fills: Sequence[Mapping[str, Any]] = ()
    recommendations: Sequence[Mapping[str, Any]] = ()
    source: str = "live"
    horizons: tuple[int, ...] = HORIZONS


@dataclass
class Report:
    """The computed report; `as_json()` is the documented shape, Decimals as strings."""

    account_id: str
    source: str
    start: date
    end: date
    horizons: tuple[int, ...]
    totals: dict[str, Any]
    trades: list[dict[str, Any]]
    days: list[dict[str, Any]]
    equity_curve: list[dict[str, Any]]
    exposure: list[dict[str, Any]]
    open_positions: list[dict[str, Any]]
    execution: dict[str, Any]
    signals: dict[str, Any]
    gates: dict[str, Any]
    params: list[dict[str, Any]]
    missing: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        return to_json({
            "account_id": self.account_id, "source": self.source,
            "period": {"from": self.start, "to": self.end}, "horizons_minutes": list(self.horizons),
            "totals": self.totals, "trades": self.trades, "days": self.days,
            "equity_curve": self.equity_curve, "exposure": self.exposure, "open_positions": self.open_positions,
            "execution": self.execution, "signals": self.signals, "gates": self.gates, "params": self.params,
            "missing": self.missing,
        })


def to_json(value: Any) -> Any:
    """Decimal as its exact string, dates and datetimes as ISO text, None kept as null."""
    if isinstance(value, Mapping):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_json(v) for v in value]
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _ratio(num: Decimal | int, den: Decimal | int) -> Decimal | None:
    return None if not den else (Decimal(num) / Decimal(den)).quantize(RATIO)


def _sum(values: Iterable[Decimal | None]) -> Decimal:
    return sum((v for v in values if v is not None), ZERO)


# --- P&L ---------------------------------------------------------------------------------------


def trade_rows(positions: Iterable[Mapping[str, Any]], start: date, end: date) -> list[dict[str, Any]]:
    """The CLOSED positions whose close (ET date) falls in [start, end], in close order."""
    rows = []
    for p in positions:
        if p["status"] != "CLOSED" or p.get("closed_at") is None or not start <= et_date(p["closed_at"]) <= end:
            continue
        qty, mult = Decimal(p["qty"]), int(p["multiplier"])
        sign = -1 if p["side"] == "short" else 1
        close_price = to_decimal(p.get("close_price"))
        gross = None if close_price is None else (close_price - Decimal(p["avg_price"])) * qty * mult * sign
        rows.append({
            "position_id": p["id"], "ticker": p["ticker"], "instrument": p["instrument"], "symbol": p["symbol"],
            "side": p["side"], "qty": qty, "multiplier": mult, "strategy": p.get("strategy"),
            "entry_at": p["opened_at"], "entry_price": Decimal(p["avg_price"]),
            "exit_at": p["closed_at"], "exit_price": close_price, "exit_reason": p.get("exit_reason"),
            "fees": Decimal(p.get("fees") or 0), "gross_pnl": gross,
            "realized_pnl": to_decimal(p.get("realized_pnl")),
            "day": et_date(p["closed_at"]),
        })
    rows.sort(key=lambda r: (r["exit_at"], r["position_id"]))
    return rows


def day_rows(trades: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Realized P&L per ET day of close: the sums of that day's trade rows."""
    by_day: dict[date, list[Mapping[str, Any]]] = defaultdict(list)
    for t in trades:
        by_day[t["day"]].append(t)
    return [{
        "day": day, "trades": len(ts),
        "wins": sum(1 for t in ts if (t["realized_pnl"] or ZERO) > 0),
        "losses": sum(1 for t in ts if (t["realized_pnl"] or ZERO) < 0),
        "fees": _sum(t["fees"] for t in ts),
        "realized_pnl": _sum(t["realized_pnl"] for t in ts),
    } for day, ts in sorted(by_day.items())]


def equity_curve(trades: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], Decimal]:
    """The running realized P&L in close order with its drawdown, and the maximum drawdown."""
    curve, running, peak, worst = [], ZERO, ZERO, ZERO
    for t in trades:
        running += t["realized_pnl"] or ZERO
        peak = max(peak, running)
        drawdown = peak - running
        worst = max(worst, drawdown)
        curve.append({"at": t["exit_at"], "position_id": t["position_id"], "cumulative_pnl": running,
                      "drawdown": drawdown})
    return curve, worst


def exposure_series(positions: Iterable[Mapping[str, Any]], period_end: datetime | None = None) -> list[dict[str, Any]]:
    """Notional held over time: one point after every open and close (qty x avg_price x multiplier)."""
    events: list[tuple[datetime, int, Decimal, int]] = []
    for p in positions:
        notional = Decimal(p["qty"]) * Decimal(p["avg_price"]) * int(p["multiplier"])
        events.append((p["opened_at"], 1, notional, p["id"]))
        if p.get("closed_at") is not None and (period_end is None or p["closed_at"] <= period_end):
            events.append((p["closed_at"], -1, notional, p["id"]))
    events.sort(key=lambda e: (e[0], e[1], e[3]))  # at one instant, closes before opens
    series, held, count = [], ZERO, 0
    for at, step, notional, _ in events:
        held += notional * step
        count += step
        if series and series[-1]["at"] == at:
            series[-1].update(notional=held, positions=count)
        else:
            series.append({"at": at, "notional": held, "positions": count})
    return series


def pnl_totals(trades: Sequence[Mapping[str, Any]], days: Sequence[Mapping[str, Any]],
               max_drawdown: Decimal) -> tuple[dict[str, Any], list[str]]:
    """Totals over the trade rows, and what could not be computed, said in words."""
    missing = []
    pnls = [t["realized_pnl"] for t in trades]
    known = [p for p in pnls if p is not None]
    if len(known) != len(pnls):
        missing.append(f"{len(pnls) - len(known)} closed trade(s) without a realized P&L: left out of the totals")
    wins = [p for p in known if p > 0]
    losses = [p for p in known if p < 0]
    gross_win, gross_loss = _sum(wins), -_sum(losses)
    profit_factor = _ratio(gross_win, gross_loss)
    if not trades:
        missing.append("no closed trade in the period: win rate and profit factor are undefined")
    elif profit_factor is None:
        missing.append("no losing trade in the period: the profit factor is undefined")
    totals = {
        "trades": len(trades), "wins": len(wins), "losses": len(losses),
        "realized_pnl": _sum(pnls), "fees": _sum(t["fees"] for t in trades),
        "gross_profit": gross_win, "gross_loss": gross_loss,
        "win_rate": _ratio(len(wins), len(known)), "profit_factor": profit_factor,
        "max_drawdown": max_drawdown, "days": len(days),
    }
    return totals, missing


# --- execution quality ---------------------------------------------------------------------------


def _quote_mid(quote: Any) -> tuple[Decimal, Decimal] | None:
    if not isinstance(quote, Mapping):
        return None
    bid, ask = to_decimal(quote.get("bid")), to_decimal(quote.get("ask"))
    if bid is None or ask is None or bid <= 0 or ask < bid:
        return None
    return bid, ask


def execution_rows(fills: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Each fill against the mid at its decision: slippage (positive = paid), and the half spread
    of the recorded quote (None when the order carried no quote)."""
    rows = []
    for f in fills:
        qty = Decimal(f["filled_qty"])
        mult = int(f["multiplier"])
        price = Decimal(f["filled_avg_price"])
        sign = 1 if f["side"] == "buy" else -1
        quoted = _quote_mid(f.get("quote"))
        if quoted is not None:
            mid, source = (quoted[0] + quoted[1]) / 2, "quote"
            half_spread = (quoted[1] - quoted[0]) / 2
        else:
            mid, source, half_spread = Decimal(f["est_price"]), "decision_price", None
        slip = (price - mid) * sign
        limit = to_decimal(f.get("limit_price"))
        rows.append({
            "execution_id": f["id"], "recommendation_id": f["recommendation_id"], "role": f["role"],
            "ticker": f["ticker"], "instrument": f["instrument"], "symbol": f["symbol"], "side": f["side"],
            "qty": qty, "multiplier": mult, "filled_at": f.get("filled_at"), "order_type": f.get("order_type"),
            "limit_price": limit, "fill_price": price, "mid": mid, "mid_source": source,
            "slippage_per_unit": slip, "slippage_bps": (slip / mid * BPS) if mid else None,
            "slippage_cost": slip * qty * mult,
            "half_spread": half_spread,
            "spread_cost": None if half_spread is None else half_spread * qty * mult,
            "spread_bps": None if half_spread is None or not mid else half_spread / mid * BPS,
        })
    rows.sort(key=lambda r: (r["filled_at"] is None, r["filled_at"] or datetime.min, r["execution_id"]))
    return rows


def execution_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    quoted = [r for r in rows if r["spread_cost"] is not None]
    bps = [r["slippage_bps"] for r in rows if r["slippage_bps"] is not None]
    return {
        "fills": len(rows),
        "slippage_cost": _sum(r["slippage_cost"] for r in rows),
        "mean_slippage_bps": (_sum(bps) / len(bps)) if bps else None,
        "fills_with_quote": len(quoted),
        "fills_without_quote": len(rows) - len(quoted),
        "spread_cost": _sum(r["spread_cost"] for r in quoted) if quoted else None,
    }


# --- signal quality and gate attribution ----------------------------------------------------------


def direction_sign(rec: Mapping[str, Any]) -> int | None:
    reason = rec.get("reason") or {}
    direction = reason.get("direction") if isinstance(reason, Mapping) else None
    if direction in ("BULL", "BEAR"):
        return 1 if direction == "BULL" else -1
    return {"BUY": 1, "SELL": -1}.get(rec.get("action"))


def rule_of(reason: Any) -> str:
    """The momentum horizon that confirmed a signal, from its momentum filter's value and threshold."""
    if not isinstance(reason, Mapping):
        return "unknown"
    m = (reason.get("filters") or {}).get("momentum") or {}
    value, threshold = m.get("value") or {}, m.get("threshold") or {}
    bull = reason.get("direction") == "BULL"
    hit = []
    for h in ("5m", "15m"):
        v, t = to_decimal(value.get(f"ret_{h}")), to_decimal(threshold.get(f"ret_{h}"))
        if v is not None and t is not None and (v >= t if bull else v <= t):
            hit.append(h)
    return "momentum_" + "_".join(hit) if hit else "unknown"


def is_signal(rec: Mapping[str, Any]) -> bool:
    """A signal-engine recommendation: written for a bar, with the rules' filters in its reason."""
    reason = rec.get("reason")
    return (rec.get("bar_ts") is not None and rec.get("action") in ENTRY_ACTIONS
            and isinstance(reason, Mapping) and "filters" in reason)


def forward_returns(rec: Mapping[str, Any], horizons: Sequence[int]) -> dict[str, dict[str, Any] | None]:
    """{"5": {close, return, directional, hit} or None when that bar (or the base) does not exist}."""
    base = to_decimal(rec.get("base_close"))
    closes = list(rec.get("forward_closes") or [None] * len(horizons))
    sign = direction_sign(rec) or 1
    out: dict[str, dict[str, Any] | None] = {}
    for h, close in zip(horizons, closes):
        close = to_decimal(close)
        if base is None or base <= 0 or close is None:
            out[str(h)] = None
            continue
        ret = close / base - ONE
        directional = ret * sign
        out[str(h)] = {"close": close, "return": ret, "directional": directional, "hit": directional > 0}
    return out


def _horizon_stats(forwards: Sequence[Mapping[str, Any]], horizons: Sequence[int]) -> dict[str, dict[str, Any]]:
    stats = {}
    for h in horizons:
        known = [f[str(h)] for f in forwards if f.get(str(h)) is not None]
        hits = sum(1 for k in known if k["hit"])
        total = _sum(k["directional"] for k in known)
        stats[str(h)] = {"n": len(known), "missing": len(forwards) - len(known), "hits": hits,
                         "hit_rate": _ratio(hits, len(known)), "sum_directional": total,
                         "mean_directional": (total / len(known)) if known else None}
    return stats


def signal_quality(recs: Iterable[Mapping[str, Any]], horizons: Sequence[int]) -> dict[str, Any]:
    rows = []
    for r in recs:
        if not is_signal(r):
            continue
        rows.append({
            "recommendation_id": r["id"], "ticker": r["ticker"], "action": r["action"],
            "direction": (r.get("reason") or {}).get("direction"), "rule": rule_of(r.get("reason")),
            "bar_ts": r["bar_ts"], "base_close": to_decimal(r.get("base_close")), "status": r.get("status"),
            "outcome_code": r.get("outcome_code"), "forward": forward_returns(r, horizons),
        })
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[(row["rule"], row["direction"] or "?")].append(row["forward"])
    by_rule = [{"rule": rule, "direction": direction, "signals": len(fw), "horizons": _horizon_stats(fw, horizons)}
               for (rule, direction), fw in sorted(groups.items())]
    return {"rows": rows, "by_rule": by_rule,
            "overall": {"signals": len(rows), "horizons": _horizon_stats([r["forward"] for r in rows], horizons)}}


def _failed_gates(rec: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [g for g in (rec.get("gate_results") or []) if g.get("passed") is False]


def gate_attribution(recs: Iterable[Mapping[str, Any]], horizons: Sequence[int]) -> dict[str, Any]:
    """The funnel of decided entries through the gates, and per gate what it blocked and what
    those entries would have returned."""
    decided = [r for r in recs if r.get("action") in ENTRY_ACTIONS and r.get("gate_results") is not None]
    order: list[str] = []
    for r in decided:
        for g in r["gate_results"]:
            if g.get("name") not in order:
                order.append(g["name"])
    blocked: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    sole: dict[str, int] = defaultdict(int)
    codes: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    forwards: dict[int, dict[str, Any]] = {}
    for r in decided:
        if r.get("status") != "SKIPPED":
            continue
        failed = _failed_gates(r)
        names = list(dict.fromkeys(g["name"] for g in failed))
        forwards[r["id"]] = forward_returns(r, horizons)
        for g in failed:
            codes[g["name"]][g.get("code") or str(g.get("reason", "")).split(":", 1)[0]] += 1
        for name in names:
            blocked[name].append(r)
        if len(names) == 1:
            sole[names[0]] += 1
    # The funnel: decided entries, then those left after each gate in order, then executed.
    funnel = [{"stage": "decided", "count": len(decided)}]
    remaining = [r for r in decided]
    for name in order:
        remaining = [r for r in remaining if not (r.get("status") == "SKIPPED" and
                                                  any(g["name"] == name for g in _failed_gates(r)))]
        if name in blocked:
            funnel.append({"stage": f"after {name}", "count": len(remaining)})
    funnel.append({"stage": "executed", "count": sum(1 for r in decided if r.get("status") == "EXECUTED")})
    attribution = []
    for name in [n for n in order if n in blocked]:
        fw = [forwards[r["id"]] for r in blocked[name]]
        stats = _horizon_stats(fw, horizons)
        attribution.append({
            "gate": name, "blocked": len(blocked[name]), "sole": sole.get(name, 0),
            "codes": dict(sorted(codes[name].items())),
            "recommendation_ids": [r["id"] for r in blocked[name]],
            "horizons": {h: {**s, "verdict": _verdict(s["sum_directional"], s["n"])} for h, s in stats.items()},
        })
    return {"funnel": funnel, "attribution": attribution,
            "decided_entries": len(decided), "blocked_entries": len(forwards)}


def _verdict(total: Decimal, n: int) -> str:
    if n == 0:
        return "unknown"
    return "cost" if total > 0 else "saved" if total < 0 else "neutral"


def params_versions(recs: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """The params documents in force over the period, by the decisions made under each."""
    seen: dict[tuple, dict[str, Any]] = {}
    for r in recs:
        if r.get("params_hash") is None:
            continue
        key = (r.get("params_source"), r.get("params_version"), r["params_hash"])
        at = r.get("decided_at") or r.get("created_at")
        row = seen.setdefault(key, {"source": key[0], "version": key[1], "hash": key[2],
                                    "first_at": at, "last_at": at, "decisions": 0})
        row["decisions"] += 1
        if at is not None:
            row["first_at"] = min(row["first_at"] or at, at)
            row["last_at"] = max(row["last_at"] or at, at)
    return sorted(seen.values(), key=lambda r: (r["first_at"] is None, r["first_at"] or datetime.min, r["hash"]))


# --- the report ------------------------------------------------------------------------------------


def build_report(inputs: ReportInputs, period_end: datetime | None = None) -> Report:
    trades = trade_rows(inputs.positions, inputs.start, inputs.end)
    days = day_rows(trades)
    curve, max_dd = equity_curve(trades)
    totals, missing = pnl_totals(trades, days, max_dd)
    held = [p for p in inputs.positions if p["status"] in ("OPEN", "CLOSING")]
    totals["open_positions"] = len(held)
    if held:
        missing.append(f"{len(held)} position(s) still open: their P&L is not realized and not in the totals")
    fills = execution_rows(inputs.fills)
    execution = {"rows": fills, "summary": execution_summary(fills)}
    if execution["summary"]["fills_without_quote"]:
        missing.append(f"{execution['summary']['fills_without_quote']} fill(s) without a recorded quote "
                       "(stock orders record the bar close only): no spread paid for them")
    signals = signal_quality(inputs.recommendations, inputs.horizons)
    for h, s in signals["overall"]["horizons"].items():
        if s["missing"]:
            missing.append(f"{s['missing']} signal(s) without the bar {h} minutes later: no {h}-minute forward return")
    gates = gate_attribution(inputs.recommendations, inputs.horizons)
    params = params_versions(inputs.recommendations)
    open_rows = [{"position_id": p["id"], "ticker": p["ticker"], "instrument": p["instrument"], "symbol": p["symbol"],
                  "side": p["side"], "qty": Decimal(p["qty"]), "entry_at": p["opened_at"],
                  "entry_price": Decimal(p["avg_price"]), "market_price": to_decimal(p.get("market_price")),
                  "status": p["status"]} for p in held]
    return Report(
        account_id=inputs.account_id, source=inputs.source, start=inputs.start, end=inputs.end,
        horizons=tuple(inputs.horizons), totals=totals, trades=trades, days=days, equity_curve=curve,
        exposure=exposure_series(inputs.positions, period_end), open_positions=open_rows,
        execution=execution, signals=signals, gates=gates, params=params, missing=missing,
    )
