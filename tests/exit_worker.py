"""One position manager or one dispatcher process for the multi-process exit tests.

    python -m tests.exit_worker ROLE DB_URL ACCOUNT WORKER_ID OFFSET_SECONDS JUMP_FILE PARAMS_JSON

ROLE:
- "manager": `run_loop` of the position manager, a cycle every 0.2 s;
- "dispatcher": the Dispatcher on the simulated broker, `run_forever` (LISTEN, poll, recover);
- "dispatcher-stall": the same, but once the broker has accepted its first order the process
  prints "stalled" and stops before recording the answer, for the test to kill it there: the
  worst moment (the order is out, the database still says SUBMITTING).

Each is wired as the service wires it (its own pool named ops-<role>:<worker id>, the simulated
broker shared through Postgres), prints "ready", waits for a line on stdin, and runs until
SIGTERM. Waiting lets the test start every process at once (start-up, mostly the exchange
calendar, costs seconds on a busy machine) and start a replacement's loop the moment it kills a
process. The clock is real time
shifted into a session by OFFSET_SECONDS plus the seconds in JUMP_FILE (tests/chaos_worker.py's
JumpingClock), so the test moves every process past a grace period at once. PARAMS_JSON holds
overrides of the reviewed defaults (as_params keys).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from datetime import timedelta
from pathlib import Path
from typing import Any

from services.adapters.sim.broker import SimBroker
from services.common.db import make_pool
from services.common.logs import configure_logging
from services.common.market_calendar import nyse_calendar
from services.common.params import ParamsInForce, as_params
from services.dispatcher.main import Dispatcher, StaticParams
from services.dispatcher.wiring import option_quotes_source, start_trade_updates
from services.position_manager.main import run_loop
from tests.chaos_worker import JumpingClock


class _StallAfterSubmit:
    """The simulated broker, but the process stops once the broker has its first order."""

    paper = True

    def __init__(self, inner: SimBroker):
        self._inner = inner

    def submit_order(self, order):
        result = self._inner.submit_order(order)
        print("stalled", flush=True)
        threading.Event().wait()  # until SIGKILL: the answer is never recorded by this process
        return result

    def __getattr__(self, name):
        return getattr(self._inner, name)


def ready() -> None:
    print("ready", flush=True)
    sys.stdin.readline()


def main(argv: list[str]) -> int:
    role, url, account, worker_id, offset, jump_file, overrides = argv[1:8]
    configure_logging("WARNING", stream=sys.stderr)
    params = as_params(json.loads(overrides))
    provider = StaticParams(ParamsInForce(params, "test", "1", params.content_hash()))
    clock = JumpingClock(timedelta(seconds=float(offset)), Path(jump_file))
    stop = threading.Event()

    def on_stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    service = "position-manager" if role == "manager" else "dispatcher"
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-{service}:{worker_id}"[:63], check=False)
    try:
        calendar = nyse_calendar()
        broker = SimBroker(pool, account, clock, slippage_bps=params.execution.slippage_bps, calendar=calendar)
        pool.wait(timeout=10)
        if role == "manager":
            ready()
            return run_loop(url, account, provider, calendar, interval=0.2, stop=stop, clock=clock,
                            option_quotes=option_quotes_source(broker))
        if role not in ("dispatcher", "dispatcher-stall"):
            raise SystemExit(f"unknown role {role!r}")
        stall = role == "dispatcher-stall"
        dispatcher = Dispatcher(pool, _StallAfterSubmit(broker) if stall else broker, provider, account, clock=clock,
                                calendar=calendar, worker_id=worker_id)
        ready()
        # The staller hears no trade updates: its fill is left for another process to find.
        stop_updates = (lambda: None) if stall else start_trade_updates(dispatcher, broker)
        try:
            dispatcher.run_forever(url, stop)
        finally:
            stop_updates()
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
