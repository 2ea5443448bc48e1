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

from services.common.market_calendar import Session


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
