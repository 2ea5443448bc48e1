"""The signal engine: latest features + sentiment -> PENDING dispatch_recommendations.

One cycle for one account:
1. gather, in one round trip: the universe (the account's selected watchlist tickers; when
   the account has no selected ticker at all, every ticker with features, so a fresh install
   or a demo without a watchlist still trades its data), each ticker's latest features
   complete by `now`, its sentiment over the lookback, and the account's last recommendation
   time for it;
2. decide with the pure rules (rules.evaluate_signal), skipping stale features (older than
   risk.max_feature_age_seconds, measured from the bar's end) and tickers in cooldown;
3. write, in one transaction: for each emit, claim the per-ticker cooldown in signal_state
   (a conditional upsert, so two engines running at once cannot both pass it), insert the
   recommendation with ON CONFLICT DO NOTHING on (account_id, ticker, bar_ts) (one
   recommendation per bar, whatever runs twice), then NOTIFY recommendations with the account
   id so the dispatchers wake up; the notification is delivered only if the rows commit.
"""

from __future__ import annotations

import argparse
import json
import logging
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.common.params import ParamsInForce, TradingParams, as_params
from services.signal_engine.rules import SignalDecision, evaluate_signal

log = logging.getLogger(__name__)

BAR = timedelta(minutes=1)
NOTIFY_CHANNEL = "recommendations"
# Outcome counters of a cycle, in the order the demo prints them.
COUNTERS = ("evaluated", "no_features", "stale", "trend", "volume", "breakout", "momentum",
            "confidence", "cooldown", "duplicate", "emitted")

# -- gather_signal_inputs --
# Everything one cycle decides on, in one round trip. The universe is the account's selected
# watchlist, or (when nothing is selected) every ticker with features, found by a skip scan of
# lane_features' (ticker, ts) key. Per ticker: its latest features with ts <= cutoff (complete
# by now; a replay with the whole day loaded must not see the future), the confidence-weighted
# mean sentiment score over (now - lookback, now], and the account's last recommendation time.
GATHER_SIGNAL_INPUTS = """
WITH RECURSIVE selected AS (
    SELECT w.ticker FROM watchlist_state w WHERE w.account_id = %(account_id)s AND w.selected
),
skip AS (
    (SELECT f.ticker FROM lane_features f WHERE NOT EXISTS (SELECT 1 FROM selected) ORDER BY f.ticker LIMIT 1)
    UNION ALL
    SELECT (SELECT f.ticker FROM lane_features f WHERE f.ticker > s.ticker ORDER BY f.ticker LIMIT 1)
    FROM skip s WHERE s.ticker IS NOT NULL
),
universe AS (
    SELECT ticker, true AS from_watchlist FROM selected
    UNION ALL
    SELECT ticker, false FROM skip WHERE ticker IS NOT NULL
)
SELECT u.ticker, u.from_watchlist,
       f.ts, f.close, f.close_5m_ago, f.close_15m_ago, f.sma20, f.sma50, f.distance_sma20,
       f.distance_sma50, f.vol_ratio, f.volume_ratio, f.volume_surge, f.trend_state, f.short_inputs,
       s.score AS sentiment_score, s.n AS sentiment_n, s.latest AS sentiment_latest,
       r.last_created_at
FROM universe u
LEFT JOIN LATERAL (
    SELECT * FROM lane_features f
    WHERE f.ticker = u.ticker AND f.ts <= %(cutoff)s
    ORDER BY f.ts DESC LIMIT 1
) f ON true
LEFT JOIN LATERAL (
    SELECT CASE WHEN sum(s.confidence) > 0 THEN sum(s.score * s.confidence) / sum(s.confidence)
                ELSE avg(s.score) END AS score,
           count(*) AS n, max(s.ts) AS latest
    FROM sentiment s
    WHERE s.ticker = u.ticker AND s.ts > %(sentiment_since)s AND s.ts <= %(now)s
) s ON true
LEFT JOIN LATERAL (
    SELECT max(r.created_at) AS last_created_at FROM dispatch_recommendations r
    WHERE r.account_id = %(account_id)s AND r.ticker = u.ticker AND r.bar_ts IS NOT NULL
) r ON true
ORDER BY u.ticker
"""

# -- claim_signal_cooldown --
# Take the ticker's cooldown for this account, or return nothing if another recommendation
# was emitted within it. The row lock of the upsert serializes two engines on one ticker: the
# second re-checks the WHERE against the first's committed row.
CLAIM_SIGNAL_COOLDOWN = """
INSERT INTO signal_state (account_id, ticker, last_signal_at, last_bar_ts)
VALUES (%(account_id)s, %(ticker)s, %(now)s, %(bar_ts)s)
ON CONFLICT (account_id, ticker) DO UPDATE
    SET last_signal_at = EXCLUDED.last_signal_at, last_bar_ts = EXCLUDED.last_bar_ts
    WHERE signal_state.last_signal_at <= EXCLUDED.last_signal_at - %(cooldown)s
RETURNING 1
"""

# -- insert_recommendation --
# One PENDING recommendation per (account, ticker, bar): a second writer for the same bar gets
# no row back and writes nothing (the partial unique index of migration 004).
INSERT_RECOMMENDATION = """
INSERT INTO dispatch_recommendations
    (account_id, ticker, action, instrument, strategy, confidence, bar_ts, reason, created_at, status)
VALUES (%(account_id)s, %(ticker)s, %(action)s, %(instrument)s, %(strategy)s, %(confidence)s,
        %(bar_ts)s, %(reason)s, %(now)s, 'PENDING')
ON CONFLICT (account_id, ticker, bar_ts) WHERE bar_ts IS NOT NULL DO NOTHING
RETURNING id
"""

# -- notify_recommendations --
# Wakes the account's dispatchers; Postgres delivers it at commit, and only if we commit.
NOTIFY_RECOMMENDATIONS = "SELECT pg_notify('recommendations', %(account_id)s)"


@dataclass(frozen=True)
class TickerOutcome:
    """What happened to one ticker in a cycle: the counter it landed in, and why."""

    ticker: str
    outcome: str                         # one of COUNTERS except "evaluated"
    decision: SignalDecision | None
    recommendation_id: int | None = None
    detail: str = ""


@dataclass(frozen=True)
class CycleResult:
    """A cycle's summary: counts by rule outcome and every ticker's outcome."""

    account_id: str
    now: datetime
    counts: Mapping[str, int]
    outcomes: tuple[TickerOutcome, ...] = field(default=())

    @property
    def emitted(self) -> int:
        return self.counts.get("emitted", 0)

    @property
    def recommendation_ids(self) -> tuple[int, ...]:
        return tuple(o.recommendation_id for o in self.outcomes if o.recommendation_id is not None)


def _json_safe(value: Any) -> Any:
    """Reason documents go to jsonb: Decimal as a JSON number, datetimes as ISO text."""
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    return value


def _params(params_in_force: ParamsInForce | TradingParams | Mapping[str, Any]) -> tuple[TradingParams, dict]:
    if isinstance(params_in_force, ParamsInForce):
        return params_in_force.params, {"source": params_in_force.source, "version": params_in_force.version,
                                        "hash": params_in_force.content_hash}
    params = as_params(params_in_force)
    return params, {"source": "inline", "version": None, "hash": params.content_hash()}


def run_signal_cycle(conn: psycopg.Connection, account_id: str,
                     params_in_force: ParamsInForce | TradingParams | Mapping[str, Any],
                     now: datetime) -> CycleResult:
    """Evaluate the account's universe at `now` and write the recommendations it earns."""
    if not account_id:
        raise ValueError("account_id is required")
    if now.tzinfo is None:
        raise ValueError("naive datetime: run_signal_cycle needs an aware `now`")
    params, params_meta = _params(params_in_force)
    s = params.signal
    rows = conn.execute(GATHER_SIGNAL_INPUTS, {
        "account_id": account_id, "cutoff": now - BAR, "now": now,
        "sentiment_since": now - timedelta(minutes=s.sentiment_lookback_minutes),
    }).fetchall()

    max_age = timedelta(seconds=params.risk.max_feature_age_seconds)
    cooldown = timedelta(minutes=s.signal_cooldown_minutes)
    outcomes: list[TickerOutcome] = []
    to_write: list[SignalDecision] = []
    for row in rows:
        ticker = row["ticker"]
        if row["ts"] is None:
            outcomes.append(TickerOutcome(ticker, "no_features", None, detail="NO_FEATURES: no features complete by now"))
            continue
        age = now - (row["ts"] + BAR)  # a bar's data is as old as its end
        if age > max_age:
            outcomes.append(TickerOutcome(ticker, "stale", None, detail=(
                f"STALE_FEATURES: age={age.total_seconds():.0f}s limit={max_age.total_seconds():.0f}s")))
            continue
        sentiment = None if not row["sentiment_n"] else {
            "score": row["sentiment_score"], "n": row["sentiment_n"], "latest": row["sentiment_latest"],
            "lookback_minutes": s.sentiment_lookback_minutes}
        decision = evaluate_signal(row, sentiment, params)
        if not decision.emit:
            outcomes.append(TickerOutcome(ticker, decision.failed_filter or "trend", decision, detail=decision.outcome))
            continue
        last = row["last_created_at"]
        if last is not None and cooldown and now - last < cooldown:
            outcomes.append(TickerOutcome(ticker, "cooldown", decision, detail=(
                f"SIGNAL_COOLDOWN: last={last.isoformat()} cooldown={s.signal_cooldown_minutes}m")))
            continue
        to_write.append(decision)

    if to_write:
        outcomes.extend(_write(conn, account_id, to_write, params, params_meta, now, cooldown))

    counts = Counter(o.outcome for o in outcomes)
    result = CycleResult(
        account_id=account_id, now=now,
        counts={"evaluated": len(rows), **{k: counts.get(k, 0) for k in COUNTERS if k != "evaluated"}},
        outcomes=tuple(sorted(outcomes, key=lambda o: o.ticker)),
    )
    for o in result.outcomes:
        if o.outcome == "emitted":
            log.info("signal emitted", extra={"decision": "EMIT", "account_id": account_id, "ticker": o.ticker,
                                              "recommendation_id": o.recommendation_id,
                                              "action": o.decision.action, "confidence": o.decision.confidence})
    log.info("signal cycle", extra={"account_id": account_id, "now": now, **result.counts})
    return result


def _write(conn: psycopg.Connection, account_id: str, decisions: list[SignalDecision], params: TradingParams,
           params_meta: dict, now: datetime, cooldown: timedelta) -> list[TickerOutcome]:
    """Claim cooldowns, insert recommendations and notify, all in one transaction.

    Tickers are handled in sorted order so two engines lock signal_state rows in the same
    order and cannot deadlock.
    """
    outcomes = []
    inserted = False
    with conn.transaction():
        for d in sorted(decisions, key=lambda d: d.ticker):
            claimed = conn.execute(CLAIM_SIGNAL_COOLDOWN, {
                "account_id": account_id, "ticker": d.ticker, "now": now, "bar_ts": d.bar_ts,
                "cooldown": cooldown}).fetchone()
            if claimed is None:
                outcomes.append(TickerOutcome(d.ticker, "cooldown", d, detail="SIGNAL_COOLDOWN: claimed by another engine"))
                continue
            reason = {**d.reason, "params": params_meta, "now": now}
            row = conn.execute(INSERT_RECOMMENDATION, {
                "account_id": account_id, "ticker": d.ticker, "action": d.action,
                "instrument": params.signal.default_instrument, "strategy": params.signal.default_strategy,
                "confidence": d.confidence, "bar_ts": d.bar_ts,
                "reason": Jsonb(_json_safe(reason)), "now": now}).fetchone()
            if row is None:
                outcomes.append(TickerOutcome(d.ticker, "duplicate", d, detail="DUPLICATE_BAR: already recommended"))
                continue
            inserted = True
            outcomes.append(TickerOutcome(d.ticker, "emitted", d, recommendation_id=row["id"] if isinstance(row, Mapping) else row[0]))
        if inserted:
            conn.execute(NOTIFY_RECOMMENDATIONS, {"account_id": account_id})
    return outcomes


# --- the loop and the command line -------------------------------------------------------------


def run_loop(conninfo: str, account_id: str, provider, *, interval: float = 5.0, once: bool = False,
             stop: threading.Event | None = None, clock=None) -> int:
    """Run a cycle every `interval` seconds with the params the provider has in force."""
    from services.common.clock import SystemClock
    from services.common.params import ParamsError
    from services.runtime import run_periodic

    clock = clock or SystemClock()
    return run_periodic("signal-engine", conninfo,
                        lambda conn: run_signal_cycle(conn, account_id, provider.current(), clock.now()),
                        interval=interval, once=once, stop=stop, retry_on=(ParamsError,),
                        health_checks={"params": provider})


def run_command(args: argparse.Namespace) -> int:
    from services.runtime import bootstrap, stop_on_sigterm

    _, account_id, url, provider = bootstrap(args.account)
    in_force = provider.current()
    log.info("signal engine starting", extra={"account_id": account_id, "params_source": in_force.source,
                                              "params_version": in_force.version,
                                              "signal_params": json.loads(in_force.params.signal.model_dump_json())})
    return run_loop(url, account_id, provider, interval=args.interval, once=args.once, stop=stop_on_sigterm())
