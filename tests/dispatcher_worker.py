"""One dispatcher process for the multi-process tests.

    python -m tests.dispatcher_worker DB_URL ACCOUNT ISO_NOW INDEX [PARAMS_JSON] [MODE]

Builds its own pool (application_name ops-dispatcher:<worker id>, as the service does),
simulated broker and Dispatcher on a FixedClock at ISO_NOW, prints "ready", waits for a line
on stdin (so that every process starts deciding at the same moment), then:
- MODE "drain" (default): decides until nothing is pending and prints one JSON line
  {"worker": ..., "decided": n, "statuses": {...}};
- MODE "crash-after-submit": the process dies (os._exit(9)) right after the broker accepted
  its first order, before the answer is recorded.
PARAMS_JSON holds overrides of the reviewed defaults (as_params keys).
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from datetime import datetime

from services.common.clock import FixedClock
from services.common.db import make_pool
from services.common.params import ParamsInForce, as_params, load_params_file
from services.dispatcher.main import Dispatcher, StaticParams
from services.adapters.sim.broker import SimBroker


class _DieAfterSubmit:
    """The simulated broker, but the process is killed once the broker has the order."""

    paper = True

    def __init__(self, inner: SimBroker):
        self._inner = inner

    def submit_order(self, order):
        self._inner.submit_order(order)
        os._exit(9)

    def __getattr__(self, name):
        return getattr(self._inner, name)


def main(argv: list[str]) -> int:
    url, account, iso_now, index = argv[1:5]
    overrides = json.loads(argv[5]) if len(argv) > 5 and argv[5] else {}
    mode = argv[6] if len(argv) > 6 else "drain"
    if overrides:
        params = as_params(overrides)
        in_force = ParamsInForce(params, "test", "1", params.content_hash())
    else:
        in_force = load_params_file()
    clock = FixedClock(datetime.fromisoformat(iso_now))
    worker_id = f"test-worker-{index}"
    pool = make_pool(url, min_size=1, max_size=2, application_name=f"ops-dispatcher:{worker_id}")
    try:
        broker = SimBroker(pool, account, clock)
        if mode == "crash-after-submit":
            broker = _DieAfterSubmit(broker)
        elif mode != "drain":
            raise SystemExit(f"unknown mode {mode!r}")
        dispatcher = Dispatcher(pool, broker, StaticParams(in_force), account, clock=clock, worker_id=worker_id)
        pool.wait(timeout=10)
        print("ready", flush=True)
        sys.stdin.readline()
        outcomes = dispatcher.drain()
        print(json.dumps({"worker": worker_id, "decided": len(outcomes),
                          "ids": [o.recommendation_id for o in outcomes],
                          "statuses": Counter(o.status for o in outcomes)}), flush=True)
    finally:
        pool.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
