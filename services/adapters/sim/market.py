"""A seeded synthetic market of 1-minute bars for the demo and the benchmarks.

Prices follow a geometric random walk with scripted moves on top (a trend, a sell-off, a
recovery), so a session has setups the signal rules can find and losses the kill switches
must catch. Volume follows the usual U-shaped intraday profile and surges during moves.
The same seed gives the same bars.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

from services.common.market_calendar import Session, option_expiry_instant


@dataclass(frozen=True)
class TickerSpec:
    ticker: str
    start_price: float
    minute_vol: float  # stdev of 1-minute log returns
    avg_volume: int  # average shares per minute
    option_liquidity: float = 1.0  # scales the simulated chain's volume and open interest


@dataclass(frozen=True)
class Move:
    """A scripted move: `total_return` spread evenly over [start_minute, end_minute) of the session."""

    tickers: tuple[str, ...]
    start_minute: int
    end_minute: int
    total_return: float
    volume_factor: float = 2.5


class SimMarket:
    def __init__(self, specs: list[TickerSpec], session: Session, moves: list[Move], seed: int = 7):
        self.specs = {s.ticker: s for s in specs}
        self.session = session
        self.moves = moves
        self._rng = random.Random(seed)
        self._price = {s.ticker: s.start_price for s in specs}
        self.minutes = int((session.close - session.open).total_seconds() // 60)

    def _drift(self, ticker: str, minute: int) -> tuple[float, float]:
        drift, volume = 0.0, 1.0
        for move in self.moves:
            if ticker in move.tickers and move.start_minute <= minute < move.end_minute:
                drift += math.log1p(move.total_return) / (move.end_minute - move.start_minute)
                volume = max(volume, move.volume_factor)
        return drift, volume

    def _profile(self, minute: int) -> float:
        # U-shaped: heavy at the open and the close, light at midday.
        x = minute / max(self.minutes - 1, 1)
        return 0.6 + 1.6 * (x - 0.5) ** 2 * 4 / 2

    def bar_time(self, minute: int) -> datetime:
        return self.session.open + timedelta(minutes=minute)

    def next_bars(self, minute: int) -> list[dict]:
        """The bars that began at `minute` after the open, one per ticker, in ticker order."""
        bars = []
        for ticker in sorted(self.specs):
            spec = self.specs[ticker]
            drift, volume_factor = self._drift(ticker, minute)
            open_ = self._price[ticker]
            ret = drift + self._rng.gauss(0, spec.minute_vol)
            close = open_ * math.exp(ret)
            wiggle = abs(self._rng.gauss(0, spec.minute_vol / 2))
            high = max(open_, close) * (1 + wiggle)
            low = min(open_, close) * (1 - wiggle)
            volume = int(spec.avg_volume * self._profile(minute) * volume_factor * self._rng.uniform(0.7, 1.3))
            self._price[ticker] = close
            q = Decimal("0.01")
            bars.append({
                "ticker": ticker, "ts": self.bar_time(minute),
                "open": Decimal(str(open_)).quantize(q), "high": Decimal(str(high)).quantize(q),
                "low": Decimal(str(low)).quantize(q), "close": Decimal(str(close)).quantize(q),
                "volume": volume,
            })
        return bars

    def price(self, ticker: str) -> float:
        return self._price[ticker]


INSERT_BARS = """
INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume)
VALUES (%(ticker)s, %(ts)s, %(open)s, %(high)s, %(low)s, %(close)s, %(volume)s)
ON CONFLICT (ticker, ts) DO NOTHING
"""


def write_bars(conn, bars: list[dict]) -> None:
    with conn.cursor() as cur:
        cur.executemany(INSERT_BARS, bars)


# -- Options ------------------------------------------------------------------------------------

# One statement for a chain's marks: a chain lists hundreds of contracts.
UPSERT_OPTION_MARKS = """
INSERT INTO sim_option_marks (symbol, ts, bid, ask)
SELECT m.symbol, %(ts)s, m.bid, m.ask FROM unnest(%(symbol)s::text[], %(bid)s::numeric[], %(ask)s::numeric[]) AS m(symbol, bid, ask)
ON CONFLICT (symbol, ts) DO UPDATE SET bid = EXCLUDED.bid, ask = EXCLUDED.ask
"""


def _write_marks(conn, quotes, now: datetime) -> int:
    """Publish the two-sided quotes among `quotes` at `now`; return how many."""
    sided = [q for q in quotes if q.bid is not None and q.ask is not None]
    if sided:
        conn.execute(UPSERT_OPTION_MARKS, {"ts": now, "symbol": [q.symbol for q in sided],
                                           "bid": [q.bid for q in sided], "ask": [q.ask for q in sided]})
    return len(sided)

# Live option positions and the latest close of their underlying, to re-mark them each minute.
HELD_OPTIONS = """
SELECT DISTINCT p.symbol, p.ticker,
       (SELECT b.close FROM lane_telemetry b WHERE b.ticker = p.ticker AND b.ts <= %(now)s
        ORDER BY b.ts DESC LIMIT 1) AS spot
FROM active_positions p
WHERE p.instrument = 'OPTION' AND p.status IN ('PENDING', 'OPEN', 'CLOSING')
"""


class SimOptionMarket:
    """The simulated option market: Black-Scholes chains around the simulated underlying.

    A chain that is looked at publishes its quotes (sim_option_marks), so the simulated broker
    fills an option order at the quote the dispatcher chose from; held contracts are re-marked
    as the underlying moves. `liquidity` scales a ticker's option volume and open interest:
    below 1, more strikes fail the liquidity gates.
    """

    def __init__(self, pool, seed: int = 11, liquidity: dict[str, float] | None = None):
        self.pool = pool
        self.seed = seed
        self.liquidity = liquidity or {}

    def spec_for(self, ticker: str):
        from services.adapters.sim.options import SimChainSpec

        factor = self.liquidity.get(ticker, 1.0)
        base = SimChainSpec()
        return SimChainSpec(
            base_volume=max(1, int(base.base_volume * factor)),
            base_open_interest=max(1, int(base.base_open_interest * factor)),
            illiquid_share=min(0.9, base.illiquid_share / max(factor, 0.05)),
        )

    def chain(self, ticker: str, spot, now: datetime, window=None):
        """The simulated chain, only the expiries inside `window` (first, last) when given."""
        from services.adapters.sim.options import simulate_chain

        chain = simulate_chain(ticker, spot, now, seed=self.seed, spec=self.spec_for(ticker), window=window)
        with self.pool.connection() as conn:
            _write_marks(conn, chain, now)
        return chain

    def near_chain(self, ticker: str, spot, now: datetime, window) -> list:
        """The chain inside `window` (first, last expiration) without publishing its marks: what
        the watchlist's liquidity inputs read. No spot, no simulated chain."""
        if spot is None:
            return []
        from services.adapters.sim.options import simulate_chain

        return simulate_chain(ticker, spot, now, seed=self.seed, spec=self.spec_for(ticker), window=tuple(window))

    def mark_held(self, conn, now: datetime) -> int:
        """Re-mark every held contract from its underlying's latest close, priced by its own symbol."""
        from services.adapters.sim.options import contract_quote
        from services.domain.market_data import parse_occ_symbol

        marks = []
        for h in conn.execute(HELD_OPTIONS, {"now": now}).fetchall():
            if h["spot"] is None:
                continue
            occ = parse_occ_symbol(h["symbol"])
            if now >= option_expiry_instant(occ.expiration):
                continue  # expired: no market, as for a listed contract after 16:00 ET on its day
            q = contract_quote(h["ticker"], occ.expiration, occ.strike, occ.right, float(h["spot"]), now,
                               seed=self.seed, spec=self.spec_for(h["ticker"]))
            marks.append(q)
        return _write_marks(conn, marks, now)
