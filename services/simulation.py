"""The production loops stepped one minute at a time on a fixed clock: what the demo and a replay run.

Each service runs its own cycle function, the one its loop runs live, in the order a minute's
work flows: the feature computer (incremental), the watchlist engine (every
`watchlist_every_minutes`), the signal engine, the simulated option market's marks of held
contracts, the simulated broker's resting orders and the dispatcher's re-pricing, then the
position manager. The caller writes the minute's bars before, and runs the order phase
(`orders`: the account refresh, then the dispatcher's drain) after, with whatever it interleaves
(the demo's desk, an operator's halt).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from services.adapters.option_data import OptionData
from services.adapters.option_liquidity import OptionLiquiditySource
from services.adapters.sim.broker import SimBroker
from services.adapters.sim.market import SimOptionMarket
from services.common.clock import FixedClock
from services.common.market_calendar import SessionCalendar
from services.common.params import ParamsInForce
from services.dispatcher.main import Dispatcher, Outcome, StaticParams
from services.dispatcher.wiring import option_quotes_source
from services.feature_computer.main import FeatureCycle, compute_features
from services.position_manager.main import run_position_cycle
from services.signal_engine.main import CycleResult, run_signal_cycle
from services.watchlist_engine.main import VolumeHistory, run_watchlist_cycle


def sim_liquidity_source(options: SimOptionMarket, cls: type[OptionLiquiditySource] = OptionLiquiditySource
                         ) -> OptionLiquiditySource:
    """The watchlist's option liquidity from the simulated market's near-expiry chains."""
    return cls(options.near_chain, source="simulated option market")


@dataclass
class Pipeline:
    """One account's services over one database, on one fixed clock, with the simulated broker."""

    conn: Any
    account_id: str
    in_force: ParamsInForce
    calendar: SessionCalendar
    clock: FixedClock
    broker: SimBroker
    options: SimOptionMarket
    dispatcher: Dispatcher
    watchlist_every_minutes: int = 30
    features: FeatureCycle = field(default_factory=FeatureCycle)
    liquidity: OptionLiquiditySource | None = None
    signals: Counter = field(default_factory=Counter)
    volumes: VolumeHistory = field(default_factory=VolumeHistory)

    def __post_init__(self) -> None:
        # The watchlist reads spread quality and open interest from the near-expiry chains, as in production.
        self.liquidity = self.liquidity or sim_liquidity_source(self.options)
        self._option_quotes = option_quotes_source(self.broker)

    @classmethod
    def simulated(cls, conn, pool, account_id: str, in_force: ParamsInForce, calendar: SessionCalendar,
                  clock: FixedClock, *, seed: int, broker_options: dict[str, Any] | None = None,
                  option_liquidity: dict[str, float] | None = None, worker_id: str = "simulation",
                  watchlist_every_minutes: int = 30) -> Pipeline:
        """The simulated broker (charging the params' fees), option market and a dispatcher on `pool`."""
        params = in_force.params
        broker = SimBroker(pool, account_id, clock, slippage_bps=params.execution.slippage_bps,
                           fee_per_share=params.fees.per_share, fee_per_contract=params.fees.per_contract,
                           **(broker_options or {}))
        options = SimOptionMarket(pool, seed=seed, liquidity=option_liquidity)
        dispatcher = Dispatcher(pool, broker, StaticParams(in_force), account_id, clock=clock, calendar=calendar,
                                worker_id=worker_id, option_data=OptionData(options.chain))
        return cls(conn, account_id, in_force, calendar, clock, broker, options, dispatcher,
                   watchlist_every_minutes=watchlist_every_minutes)

    def before_orders(self, minute: int, now: datetime) -> None:
        """Every service's cycle for the minute that ends at `now`, up to the order phase."""
        self.signals_phase(minute, now)
        self.book(now)

    def signals_phase(self, minute: int, now: datetime, *, features: bool = True,
                      signals: bool = True) -> CycleResult | None:
        """The feature computer, the watchlist engine (on its minutes) and the signal engine for
        the minute that ends at `now`; the signal engine's result, None when it did not run.

        features=False: the caller has written this minute's features itself (a replay computes
        a session's at once, with the same definitions). signals=False: the caller knows that no
        ticker can emit this minute (a replay's screen, rules.could_emit), so the cycle would
        write nothing.
        """
        conn, in_force = self.conn, self.in_force
        if features:
            compute_features(conn, now=now, cycle=self.features)
        if minute % self.watchlist_every_minutes == 0:
            run_watchlist_cycle(conn, self.account_id, in_force, now, liquidity_source=self.liquidity,
                                history=self.volumes)
        result = None
        if signals:
            result = run_signal_cycle(conn, self.account_id, in_force, now)
            self.signals.update(result.counts)
        return result

    def book(self, now: datetime, *, working: bool = True, positions: bool = True) -> None:
        """The minute's work on the book: held contracts re-marked, resting orders matched and
        re-priced, the position manager's judgement. working=False / positions=False: the caller
        knows there is no working order / no live position, so those steps would do nothing."""
        conn, in_force = self.conn, self.in_force
        if positions:
            self.options.mark_held(conn, now)
        if working:
            # Resting limit orders the moved market has reached fill (the broker's events record
            # them); those still unfilled are re-priced, or given up after their last attempt.
            self.broker.match_resting(now)
            self.dispatcher.reprice_working()
        if positions:
            # The position manager judges the book on this minute's marks; its EXITs go out in the order phase.
            run_position_cycle(conn, self.account_id, in_force, now, self.calendar, self._option_quotes)

    def orders(self) -> list[Outcome]:
        """The order phase: the account refreshed (a loss past the limit trips the switch here,
        and the trip flattens the book), then every pending recommendation decided."""
        self.dispatcher.refresh_account()
        return self.dispatcher.drain()
