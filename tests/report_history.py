"""A recorded trading history for the report's tests, made by the real pipeline.

Synthetic 1-minute bars for a few tickers go minute by minute through the feature computer, the
signal engine, the dispatcher (simulated broker and option chain) and the position manager, as
in production; a desk recommendation adds an option entry. At the end the book is flattened, so
the broker's equity change is the realized P&L. Everything is written to one database.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import date, timedelta
from decimal import Decimal

from services.adapters.option_data import OptionData
from services.adapters.postgres import exits_repo
from services.adapters.sim.broker import SimBroker
from services.adapters.sim.market import Move, SimMarket, SimOptionMarket, TickerSpec, write_bars
from services.common.clock import FixedClock
from services.common.db import connect, make_pool
from services.common.market_calendar import nyse_calendar
from services.dispatcher.main import Dispatcher
from services.feature_computer.main import compute_features
from services.position_manager.main import run_position_cycle
from services.signal_engine.main import run_signal_cycle
from tests.factories import ACCOUNT, pinned_params

DAY = date(2026, 11, 30)  # a Monday session
MINUTES = 150             # 09:30 .. 12:00 ET
TICKERS = [
    TickerSpec("AAPL", 231.0, 0.0008, 40_000, 1.0),
    TickerSpec("AMD", 152.0, 0.0012, 30_000, 1.0),
    TickerSpec("MSFT", 421.0, 0.0007, 25_000, 1.0),
    TickerSpec("NVDA", 181.0, 0.0013, 80_000, 1.0),
]
MOVES = [
    Move(("AAPL", "NVDA"), 52, 80, 0.012, volume_factor=3.0),
    Move(("AMD",), 60, 90, -0.015, volume_factor=3.0),
    Move(("MSFT",), 85, 115, 0.010, volume_factor=3.0),
]
# Stock signals, shorts not allowed (the bearish ones are blocked), room for three positions, and
# exits tight enough that positions turn over within the morning.
PARAMS = {
    "signal": {"default_instrument": "STOCK", "signal_cooldown_minutes": 5},
    "risk": {"max_open_positions": 3, "max_notional_exposure": 100_000, "max_notional_per_trade": 2_000,
             "max_trades_per_ticker_per_day": 6, "ticker_cooldown_minutes": 5},
    "exits": {"day_trade": {"stock": {"stop_loss_pct": 0.004, "take_profit_pct": 0.006, "trailing_stop_pct": 0.003,
                                      "trailing_activation_pct": 0.003},
                            "max_holding_minutes": 30}},
    "fees": {"per_share": "0.01", "per_contract": "0.65"},
}
OPTION_DESK_MINUTE = 20   # a desk call on NVDA, as an operator would insert one


@dataclass
class History:
    url: str
    start_equity: Decimal
    end_equity: Decimal
    end_last_equity: Decimal


def _seed_iv_history(conn, calendar) -> None:
    rng = random.Random(3)
    sessions = calendar.sessions_between(DAY - timedelta(days=60), DAY - timedelta(days=1))[-30:]
    rows = [(t.ticker, s.day, round(rng.uniform(0.22, 0.38), 4), s.close) for t in TICKERS for s in sessions]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO iv_history (ticker, session_day, atm_iv, recorded_at) VALUES (%s, %s, %s, %s)",
                        rows)


def run_history(url: str, seed: int = 5) -> History:
    calendar = nyse_calendar()
    session = calendar.session_on(DAY)
    clock = FixedClock(session.open)
    params = pinned_params(PARAMS)
    in_force = params.current()
    fees = in_force.params.fees
    pool = make_pool(url, min_size=1, max_size=3)
    try:
        broker = SimBroker(pool, ACCOUNT, clock, slippage_bps=5, universe=[t.ticker for t in TICKERS],
                           fee_per_share=fees.per_share, fee_per_contract=fees.per_contract)
        options = SimOptionMarket(pool, seed=seed)
        dispatcher = Dispatcher(pool, broker, params, ACCOUNT, clock=clock, calendar=calendar,
                                option_data=OptionData(options.chain))
        market = SimMarket(TICKERS, session, MOVES, seed=seed)
        start = broker.get_account()
        with connect(url) as conn:
            _seed_iv_history(conn, calendar)
            for minute in range(MINUTES):
                bars = market.next_bars(minute)
                clock.set(market.bar_time(minute) + timedelta(minutes=1))
                now = clock.now()
                write_bars(conn, bars)
                compute_features(conn, now=now)
                run_signal_cycle(conn, ACCOUNT, in_force, now)
                options.mark_held(conn, now)
                broker.match_resting(now)
                dispatcher.reprice_working()
                if minute == OPTION_DESK_MINUTE:
                    conn.execute(
                        """INSERT INTO dispatch_recommendations (account_id, ticker, action, instrument, strategy,
                                                                 confidence, reason, created_at)
                           VALUES (%s, 'NVDA', 'BUY', 'OPTION', 'day_trade', 0.8, '{"source": "desk"}', %s)""",
                        (ACCOUNT, now))
                dispatcher.refresh_account()
                dispatcher.drain()
                run_position_cycle(conn, ACCOUNT, in_force, now, calendar,
                                   lambda symbols, at: {s: broker.quote(s, "OPTION", at) for s in symbols})
                dispatcher.drain()
            # Flat at the end: the broker's equity change is then the realized P&L.
            clock.set(clock.now() + timedelta(minutes=1))
            options.mark_held(conn, clock.now())
            exits_repo.flatten(conn, ACCOUNT, exits_repo.OPERATOR_FLATTEN, "end of the test history", clock.now())
            dispatcher.refresh_account(force=True)
            dispatcher.drain()
        end = broker.get_account()
    finally:
        pool.close()
    return History(url, start.equity, end.equity, end.last_equity)
