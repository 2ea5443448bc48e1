"""One dispatcher process on the Alpaca adapter, wired as `run_dispatcher` wires the service.

    python -m tests.chaos_worker DB_URL ACCOUNT WORKER_ID OFFSET_SECONDS JUMP_FILE PARAMS_JSON

The ALPACA_* environment points the real SDK at the local server (tests/fake_alpaca.py run as
its own process). Builds its pool, `build_broker` (OPS_BROKER=alpaca: the shared Postgres
request budget), `build_market`, the Dispatcher and `start_trade_updates`, prints "ready", then
`run_forever` until SIGTERM. Its clock is real time shifted into a trading session by
OFFSET_SECONDS, plus the seconds written in JUMP_FILE (re-read every 0.2 s): the test moves every
process past a grace period at once instead of waiting it out. PARAMS_JSON holds overrides of
the reviewed defaults (as_params keys).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from services.common.db import make_pool
from services.common.logs import configure_logging
from services.common.params import ParamsInForce, as_params
from services.dispatcher.main import Dispatcher, StaticParams, build_broker, build_market, start_trade_updates


class JumpingClock:
    """Real time + a fixed offset + a jump the test writes to a file."""

    def __init__(self, offset: timedelta, jump_file: Path):
        self._offset = offset
        self._jump_file = jump_file
        self._jump = timedelta(0)
        self._read_at = -1.0
        self._lock = threading.Lock()

    def now(self) -> datetime:
        with self._lock:
            if time.monotonic() - self._read_at > 0.2:
                self._read_at = time.monotonic()
                try:
                    self._jump = timedelta(seconds=float(self._jump_file.read_text() or 0))
                except (OSError, ValueError):
                    pass
            return datetime.now(timezone.utc) + self._offset + self._jump


def main(argv: list[str]) -> int:
    url, account, worker_id, offset, jump_file, overrides = argv[1:7]
    configure_logging("WARNING", stream=sys.stderr)
    params = as_params(json.loads(overrides))
    provider = StaticParams(ParamsInForce(params, "test", "1", params.content_hash()))
    clock = JumpingClock(timedelta(seconds=float(offset)), Path(jump_file))
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-dispatcher:{worker_id}"[:63], check=False)
    broker = build_broker(pool, account, clock, provider.current())
    option_data, quotes = build_market(broker)
    dispatcher = Dispatcher(pool, broker, provider, account, clock=clock, worker_id=worker_id,
                            option_data=option_data, quotes=quotes)
    stop = threading.Event()

    def on_stop(*_: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_stop)
    stop_updates = start_trade_updates(dispatcher, broker)
    try:
        pool.wait(timeout=10)
        print("ready", flush=True)
        dispatcher.run_forever(url, stop)
    finally:
        stop_updates()
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
