"""The watchlist engine: scores candidate tickers for one account and stores the selection.

Inputs, gathered in one round trip:
- candidates: every ticker with session bars in the 10 ET days before today, or today;
- average daily volume and dollar volume (sum of volume * close) from lane_telemetry: the mean
  of the per-ET-day sums of those days BEFORE today's ET date (complete sessions; read once per
  ET day, `VolumeHistory`); a ticker with bars only today uses today's so far;
- its latest close (the spot its option liquidity is measured around);
- the latest features complete by `now` (trend_state, distance_sma20, vol_ratio);
- the confidence-weighted mean sentiment over params.signal.sentiment_lookback_minutes;
- the account's current selection (for hysteresis).
Spread quality and the option open-interest proxy are not in the database. Either the caller
passes them as `liquidity_inputs` ({ticker: {"spread_quality": x, "oi_proxy": y}}, higher is
better, any scale), or a `liquidity_source` fetches them from the option chains, after the
gather and outside any transaction (`services/adapters/option_liquidity.py`: cached, within
the rate budget, failing closed per ticker). A ticker without them gets no credit for those
two terms, and its components say "missing" and why.

Every candidate's row is upserted with its score, rank, components and selected flag; rows of
the account's tickers that are no longer candidates are deselected. One transaction.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from services.common.market_calendar import et_date, et_day_bounds
from services.common.params import ParamsInForce, TradingParams, as_params
from services.watchlist_engine.scoring import WatchlistInput, WatchlistScore, as_float, score_watchlist

log = logging.getLogger(__name__)

# The average daily volume is taken over the complete ET days among the 10 before today.
AVG_VOLUME_LOOKBACK_DAYS = 10
BAR = timedelta(minutes=1)
# {ticker: spot} at `now` -> {ticker: {"spread_quality", "oi_proxy", "detail"}}; see the module doc.
LiquiditySource = Callable[[Mapping[str, Decimal | None], datetime], Mapping[str, Mapping[str, Any]]]

# -- complete_days_volume --
# Per ticker with session bars since %(since)s: the volume and dollar volume of each complete ET
# day from %(since)s (an ET midnight) up to today's. One index range per ticker (lane_bar_heads
# lists them), so it reads the lookback's bars, never the whole table. A complete day does not
# change: a cycle reads these once per ET day (`VolumeHistory`).
COMPLETE_DAYS_VOLUME = """
SELECT h.ticker, d.day, d.volume, d.dollar_volume
FROM lane_bar_heads h
CROSS JOIN LATERAL (
    SELECT (b.ts AT TIME ZONE 'America/New_York')::date AS day, sum(b.volume) AS volume,
           sum(b.volume * b.close) AS dollar_volume
    FROM lane_telemetry b
    WHERE b.ticker = h.ticker AND b.ts >= %(since)s AND b.ts < %(today_start)s
    GROUP BY 1
) d
WHERE h.latest_ts >= %(since)s
ORDER BY 1, 2
"""

# -- gather_watchlist_inputs --
# Per candidate (a ticker with bars in the lookback: a complete day of `history`, or today): the
# average daily volume and dollar volume of the complete ET days (today's partial day only when
# there is no earlier day), the latest complete bar's close, the latest features complete by
# now, the weighted sentiment over the lookback, and whether the account holds it selected.
# Today's sums come from one index range per ticker with a bar today.
GATHER_WATCHLIST_INPUTS = """
WITH daily AS (
    SELECT p.ticker, p.day, p.volume, p.dollar_volume
    FROM unnest(%(past_ticker)s::text[], %(past_day)s::date[], %(past_volume)s::numeric[],
                %(past_dollar_volume)s::numeric[]) AS p(ticker, day, volume, dollar_volume)
    UNION ALL
    SELECT h.ticker, %(today)s::date, t.volume, t.dollar_volume
    FROM lane_bar_heads h
    CROSS JOIN LATERAL (
        SELECT sum(b.volume) AS volume, sum(b.volume * b.close) AS dollar_volume
        FROM lane_telemetry b
        WHERE b.ticker = h.ticker AND b.ts >= %(today_start)s AND b.ts <= %(now)s
    ) t
    WHERE h.latest_ts >= %(today_start)s AND t.volume IS NOT NULL
),
candidates AS (
    SELECT d.ticker,
           coalesce(avg(d.volume) FILTER (WHERE d.day < %(today)s), avg(d.volume)) AS avg_daily_volume,
           coalesce(avg(d.dollar_volume) FILTER (WHERE d.day < %(today)s), avg(d.dollar_volume))
               AS avg_daily_dollar_volume
    FROM daily d
    GROUP BY d.ticker
)
SELECT c.ticker, c.avg_daily_volume, c.avg_daily_dollar_volume, spot.close AS spot,
       f.trend_state, f.distance_sma20, f.vol_ratio,
       s.score AS sentiment_score,
       coalesce(w.selected, false) AS incumbent
FROM candidates c
LEFT JOIN LATERAL (
    SELECT b.close FROM lane_telemetry b
    WHERE b.ticker = c.ticker AND b.ts <= %(cutoff)s ORDER BY b.ts DESC LIMIT 1
) spot ON true
LEFT JOIN LATERAL (
    SELECT f.trend_state, f.distance_sma20, f.vol_ratio FROM lane_features f
    WHERE f.ticker = c.ticker AND f.ts <= %(cutoff)s ORDER BY f.ts DESC LIMIT 1
) f ON true
LEFT JOIN LATERAL (
    SELECT CASE WHEN sum(s.confidence) > 0 THEN sum(s.score * s.confidence) / sum(s.confidence)
                ELSE avg(s.score) END AS score
    FROM sentiment s
    WHERE s.ticker = c.ticker AND s.ts > %(sentiment_since)s AND s.ts <= %(now)s
) s ON true
LEFT JOIN watchlist_state w ON w.account_id = %(account_id)s AND w.ticker = c.ticker
ORDER BY c.ticker
"""


@dataclass
class VolumeHistory:
    """The volume sums of the lookback's complete ET days, read at the first cycle of each ET day
    and kept for the day's other cycles (a long-running engine holds one). A day's bars loaded
    after that first cycle (a backfill of a past day) count from the next ET day: until then a
    ticker whose whole history was loaded that way is averaged on today's volume so far, as a
    ticker new today is. A ticker's candidacy follows its session bars (lane_bar_heads)."""

    day: date | None = None
    rows: dict[str, list[Any]] = field(default_factory=dict)

    def for_day(self, conn: psycopg.Connection, today: date) -> dict[str, list[Any]]:
        if self.day != today:
            found = conn.execute(COMPLETE_DAYS_VOLUME, {
                "since": et_day_bounds(today - timedelta(days=AVG_VOLUME_LOOKBACK_DAYS))[0],
                "today_start": et_day_bounds(today)[0]}).fetchall()
            self.rows = {"past_ticker": [r["ticker"] for r in found], "past_day": [r["day"] for r in found],
                         "past_volume": [r["volume"] for r in found],
                         "past_dollar_volume": [r["dollar_volume"] for r in found]}
            self.day = today
        return self.rows


# -- upsert_watchlist_row --
UPSERT_WATCHLIST_ROW = """
INSERT INTO watchlist_state (account_id, ticker, selected, score, components, rank, updated_at)
VALUES (%(account_id)s, %(ticker)s, %(selected)s, %(score)s, %(components)s, %(rank)s, %(now)s)
ON CONFLICT (account_id, ticker) DO UPDATE SET
    selected = EXCLUDED.selected, score = EXCLUDED.score, components = EXCLUDED.components,
    rank = EXCLUDED.rank, updated_at = EXCLUDED.updated_at
"""

# -- deselect_vanished --
# Tickers the account had that are no longer candidates (no bars in the lookback).
DESELECT_VANISHED = """
UPDATE watchlist_state SET selected = false, rank = NULL, updated_at = %(now)s
WHERE account_id = %(account_id)s AND NOT (ticker = ANY(%(tickers)s::text[])) AND (selected OR rank IS NOT NULL)
"""


def _params(params: ParamsInForce | TradingParams | Mapping[str, Any]) -> TradingParams:
    return params.params if isinstance(params, ParamsInForce) else as_params(params)


def run_watchlist_cycle(conn: psycopg.Connection, account_id: str,
                        params: ParamsInForce | TradingParams | Mapping[str, Any], now: datetime, *,
                        liquidity_inputs: Mapping[str, Mapping[str, Any]] | None = None,
                        liquidity_source: LiquiditySource | None = None,
                        history: VolumeHistory | None = None) -> list[WatchlistScore]:
    """Score the candidates at `now`, store them for the account, return them by rank.

    `history`: the complete days' volumes kept from an earlier cycle of the same ET day (a
    fresh one reads them)."""
    if not account_id:
        raise ValueError("account_id is required")
    if now.tzinfo is None:
        raise ValueError("naive datetime: run_watchlist_cycle needs an aware `now`")
    p = _params(params)
    liquidity_inputs = liquidity_inputs or {}
    today = et_date(now)
    past = (history or VolumeHistory()).for_day(conn, today)
    rows = conn.execute(GATHER_WATCHLIST_INPUTS, {
        "account_id": account_id, "now": now, "cutoff": now - BAR, "today": today, "today_start": et_day_bounds(today)[0],
        "sentiment_since": now - timedelta(minutes=p.signal.sentiment_lookback_minutes), **past,
    }).fetchall()
    if liquidity_source is not None:
        liquidity_inputs = {**liquidity_source({r["ticker"]: r["spot"] for r in rows}, now), **liquidity_inputs}
    candidates = [
        WatchlistInput(
            ticker=r["ticker"],
            sentiment_score=as_float(r["sentiment_score"]),
            avg_daily_volume=as_float(r["avg_daily_volume"]),
            spread_quality=as_float(liquidity_inputs.get(r["ticker"], {}).get("spread_quality")),
            oi_proxy=as_float(liquidity_inputs.get(r["ticker"], {}).get("oi_proxy")),
            trend_state=r["trend_state"],
            distance_sma20=as_float(r["distance_sma20"]),
            vol_ratio=as_float(r["vol_ratio"]),
            avg_daily_dollar_volume=as_float(r["avg_daily_dollar_volume"]),
            liquidity_detail=liquidity_inputs.get(r["ticker"], {}).get("detail"),
        )
        for r in rows
    ]
    scores = score_watchlist(candidates, p, incumbents=[r["ticker"] for r in rows if r["incumbent"]])
    with conn.transaction():
        with conn.cursor() as cur:
            cur.executemany(UPSERT_WATCHLIST_ROW, [
                {"account_id": account_id, "ticker": s.ticker, "selected": s.selected, "score": s.score,
                 "components": Jsonb(dict(s.components)), "rank": s.rank, "now": now}
                for s in scores])
        conn.execute(DESELECT_VANISHED, {"account_id": account_id, "now": now,
                                         "tickers": [s.ticker for s in scores]})
    log.info("watchlist scored", extra={"account_id": account_id, "candidates": len(scores),
                                        "selected": [s.ticker for s in scores if s.selected]})
    return scores


def liquidity_source_from_settings(conninfo: str, account_id: str):
    """Option liquidity from Alpaca's chains when OPS_BROKER=alpaca, else from the simulated market.

    Alpaca's contract lookups spend the account's request budget shared through Postgres with
    its dispatchers, whose reads leave a reserve to orders; the snapshots spend the data API's.
    """
    import os

    from services.adapters.option_liquidity import OptionLiquiditySource

    if os.environ.get("OPS_BROKER", "sim") == "alpaca":
        from services.adapters.alpaca.client import AlpacaMarketData, postgres_trading_budget
        from services.adapters.alpaca.settings import AlpacaSettings

        settings = AlpacaSettings()
        market = AlpacaMarketData(settings, trading_budget=postgres_trading_budget(settings, conninfo, account_id))
        return OptionLiquiditySource(
            lambda ticker, spot, now, window: market.option_chain(
                ticker, expiration_gte=window[0], expiration_lte=window[1]),
            source="alpaca option snapshots and contracts")
    from services.adapters.sim.market import SimOptionMarket

    return OptionLiquiditySource(SimOptionMarket(None).near_chain, source="simulated option market")


def run_command(args: argparse.Namespace) -> int:
    from services.common.clock import SystemClock
    from services.common.params import ParamsError
    from services.runtime import bootstrap, run_periodic, stop_on_sigterm

    _, account_id, url, provider = bootstrap(args.account)
    clock = SystemClock()
    liquidity = liquidity_source_from_settings(url, account_id)
    history = VolumeHistory()
    return run_periodic(
        "watchlist-engine", url,
        lambda conn: run_watchlist_cycle(conn, account_id, provider.current(), clock.now(),
                                         liquidity_source=liquidity, history=history),
        interval=args.interval, once=args.once, stop=stop_on_sigterm(), retry_on=(ParamsError,),
        health_checks={"params": provider})
