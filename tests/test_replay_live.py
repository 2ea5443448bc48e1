"""A replay equals the live services fed the same bars minute by minute.

The four S&P 500 sessions of ../shared/data (a copy in tests/data) run twice: once through
`services.replay.run_replay`, once through the services' own loop entry points, each run for one
pass a minute (`run_loop(once=True)` with the clock at the minute's end: its own connection, its
own state, as a freshly started service would), the dispatcher's pass as `dispatcher --once`
makes it. The feature rows and the recommendations they lead to are the same, row for row.

The replay computes a session's features at once and runs the signal engine only in the minutes
its screen (rules.could_emit) leaves open; the live loop runs every service every minute. With
the repo's params the S&P 500 sessions emit nothing; with looser thresholds they emit, and the
recommendations, their decisions and their orders must still be the same.
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from services.adapters.option_data import OptionData
from services.adapters.option_liquidity import OptionLiquiditySource
from services.adapters.sim.broker import SimBroker
from services.adapters.sim.market import SimOptionMarket
from services.common.clock import FixedClock
from services.common.db import connect, make_pool
from services.common.market_calendar import nyse_calendar
from services.common.params import ParamsInForce, as_params, load_params_file
from services.dispatcher.main import Dispatcher, StaticParams, start_trade_updates
from services.dispatcher.wiring import option_quotes_source
from services.feature_computer import main as feature_computer
from services.ingest import _write_bars
from services.position_manager import main as position_manager
from services.replay import REPLAY_ACCOUNT, STARTING_CASH, WATCHLIST_EVERY_MINUTES, bars_from_csv, run_replay
from services.signal_engine import main as signal_engine
from services.watchlist_engine.main import run_watchlist_cycle

SP500 = Path(__file__).parent / "data" / "sp500_2019-11-05_08_1min.csv"
# Every column but computed_at, the wall-clock instant the row was written.
FEATURES = """
SELECT ticker, ts, close, sma20, sma50, distance_sma20, distance_sma50, recent_vol, baseline_vol, vol_ratio,
       volume_ratio, volume_surge, trend_state, short_inputs, close_5m_ago, close_15m_ago, prev_close, volume,
       session_day
FROM lane_features ORDER BY ticker, ts
"""
RECOMMENDATIONS = """
SELECT ticker, action, instrument, strategy, confidence, bar_ts, created_at, status, outcome_code
FROM dispatch_recommendations ORDER BY created_at, ticker
"""

ORDERS = """
SELECT ticker, symbol, side, qty, status, filled_qty, filled_avg_price, submitted_at
FROM dispatch_executions ORDER BY submitted_at, symbol
"""


def live_services(url: str, rows: list[tuple], in_force) -> None:
    calendar = nyse_calendar()
    provider = StaticParams(in_force)
    by_minute: dict = {}
    for r in rows:
        by_minute.setdefault(r[1], []).append(r)
    sessions = sorted({calendar.session_at(ts) for ts in by_minute}, key=lambda s: s.day)
    clock = FixedClock(sessions[0].open)
    pool = make_pool(url, min_size=1, max_size=2)
    params = in_force.params
    try:
        # The paper broker and its market as the replay sets them up: the params' slippage and
        # fees, the same starting cash and seed, its fills streamed to the dispatcher.
        broker = SimBroker(pool, REPLAY_ACCOUNT, clock, slippage_bps=params.execution.slippage_bps,
                           fee_per_share=params.fees.per_share, fee_per_contract=params.fees.per_contract,
                           starting_cash=STARTING_CASH)
        options = SimOptionMarket(pool, seed=7)
        liquidity = OptionLiquiditySource(options.near_chain, source="simulated option market")
        dispatcher = Dispatcher(pool, broker, provider, REPLAY_ACCOUNT, clock=clock, calendar=calendar,
                                worker_id="live", option_data=OptionData(options.chain))
        quotes = option_quotes_source(broker)
        stop_updates = start_trade_updates(dispatcher, broker)
        with connect(url) as conn:
            for session in sessions:
                ts, minute = session.open, 0
                while ts < session.close:
                    now = ts + timedelta(minutes=1)
                    clock.set(now)
                    if by_minute.get(ts):
                        _write_bars(conn, by_minute[ts])  # the telemetry task's write
                    assert feature_computer.run_loop(url, once=True, clock=clock) == 0
                    if minute % WATCHLIST_EVERY_MINUTES == 0:
                        run_watchlist_cycle(conn, REPLAY_ACCOUNT, in_force, now, liquidity_source=liquidity)
                    assert signal_engine.run_loop(url, REPLAY_ACCOUNT, provider, once=True, clock=clock) == 0
                    options.mark_held(conn, now)          # the market moves the held contracts
                    broker.match_resting(now)             # the broker fills the limits it reached
                    dispatcher.reprice_working()          # the dispatcher's periodic duty
                    assert position_manager.run_loop(url, REPLAY_ACCOUNT, provider, calendar, once=True, clock=clock,
                                                      option_quotes=quotes) == 0
                    dispatcher.refresh_account(force=True)  # `dispatcher --once`
                    dispatcher.drain()
                    ts, minute = now, minute + 1
        stop_updates()
    finally:
        pool.close()


def emitting_params() -> ParamsInForce:
    """The repo's params with thresholds the S&P 500 sessions pass a few dozen times."""
    doc = load_params_file().params.model_dump(mode="json")
    doc["signal"].update(min_volume_ratio=1.2, breakout_min_distance_sma20=0.0003, bull_min_ret_5m=0.0005,
                         bull_min_ret_15m=0.001, bear_max_ret_5m=-0.0005, bear_max_ret_15m=-0.001)
    params = as_params(doc)
    return ParamsInForce(params, "test", None, params.content_hash())


@pytest.mark.slow
@pytest.mark.parametrize("params", ["repo", "emitting"])
def test_a_replay_of_the_four_sp500_sessions_equals_the_live_services_fed_minute_by_minute(db_url, second_db_url,
                                                                                           params):
    rows, names = bars_from_csv([SP500])
    in_force = load_params_file() if params == "repo" else emitting_params()
    if params == "emitting":  # a symbol the asset gate takes and a price its options fit the budget at
        rows = [("SPX", r[1], *(p / 10 for p in r[2:6]), *r[6:]) for r in rows]
    replay = run_replay(rows, in_force, inputs={"source": "csv", "files": names}, url=db_url, run_id="sp500")
    live_services(second_db_url, rows, in_force)
    with connect(db_url) as replayed, connect(second_db_url) as live:
        features = replayed.execute(FEATURES).fetchall()
        assert features == live.execute(FEATURES).fetchall()
        assert replayed.execute(RECOMMENDATIONS).fetchall() == live.execute(RECOMMENDATIONS).fetchall()
    # Every session minute computed: the four sessions' regular bars (the 16:00 prints are flagged).
    assert replay.sessions == sorted(replay.sessions) and len(replay.sessions) == 4
    assert len(features) == replay.bars == 4 * 390
    assert replay.counts["signal_cycles"] + replay.counts["signal_cycles_skipped"] == 4 * 390
    if params == "emitting":
        assert replay.counts["emitted"] > 0 and replay.counts["signal_cycles_skipped"] > 3 * 390
        with connect(db_url) as replayed, connect(second_db_url) as live:
            orders = replayed.execute(ORDERS).fetchall()
            assert orders and orders == live.execute(ORDERS).fetchall()
    else:
        assert replay.counts["signal_cycles"] == 0
