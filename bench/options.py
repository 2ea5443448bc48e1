"""Time to choose and validate an option contract from a 2,000-contract chain.

Target: under 5 ms per decision. Run: `python -m bench.options [--runs N]`.

Each case builds a simulated chain (seven weekly expiries, ~143 strikes, calls and puts) cut
to exactly 2,000 contracts, then times `choose_contract` followed by `validate_option_contract`
on the chosen contract, as the dispatcher runs them. Cases:
  day/swing       the normal chain (the calendar cache warm, as in a running dispatcher)
  no-greeks       deltas removed, so every delta in the window is estimated from the IV
  all-illiquid    every contract fails the liquidity pre-check
  all-stale       every quote is an hour old: it passes the pre-check but fails the full
                  gates, so the full gates run on every candidate (the slowest path)
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from datetime import datetime, timedelta

from services.common.market_calendar import ET, nyse_calendar
from services.common.params import default_params
from services.dispatcher.alpaca.options import choose_contract, validate_option_contract
from services.adapters.sim.options import SimChainSpec, simulate_chain

CHAIN_SIZE = 2000
TARGET_MS = 5.0


def _chain(now: datetime, spot: float) -> list:
    chain = simulate_chain("SPY", spot, now, seed=7, spec=SimChainSpec(strikes_each_side=71))
    if len(chain) < CHAIN_SIZE:
        raise SystemExit(f"simulated chain has {len(chain)} contracts, fewer than {CHAIN_SIZE}")
    return chain[:CHAIN_SIZE]


def _time(label: str, chain: list, direction: str, strategy: str, spot: float, now: datetime, runs: int) -> float:
    params = default_params()
    cal = nyse_calendar()
    iv = (42.0, "OK")
    wall, cpu = [], []
    result = None
    for _ in range(runs):
        t0, c0 = time.perf_counter(), time.thread_time()
        selection = choose_contract(chain, direction, strategy, spot, params, now, cal, iv_percentile=iv)
        if selection.choice is not None:
            validate_option_contract(selection.choice.contract, params, now=now, iv_percentile=iv, calendar=cal)
        cpu.append((time.thread_time() - c0) * 1000)
        wall.append((time.perf_counter() - t0) * 1000)
        result = selection
    wall.sort()
    cpu.sort()

    def p99(xs: list[float]) -> float:
        return xs[min(len(xs) - 1, int(len(xs) * 0.99))]

    print(
        f"{label:<13} wall median={statistics.median(wall):6.3f} p99={p99(wall):6.3f} max={wall[-1]:6.3f} ms | "
        f"cpu median={statistics.median(cpu):6.3f} p99={p99(cpu):6.3f} ms | runs={runs} -> {result.reason[:60]}"
    )
    return p99(cpu)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=2000)
    args = ap.parse_args()
    now = datetime(2026, 11, 24, 11, 0, tzinfo=ET)
    spot = 450.0
    chain = _chain(now, spot)
    no_greeks = [dataclasses.replace(c, delta=None) for c in chain]
    illiquid = [dataclasses.replace(c, volume=5, open_interest=5) for c in chain]
    stale = [dataclasses.replace(c, quote_time=now - timedelta(hours=1)) for c in chain]
    print(f"chain: {len(chain)} contracts, {len({c.expiration for c in chain})} expiries, spot={spot}")
    worst = max(
        _time("day_trade", chain, "BULL", "day_trade", spot, now, args.runs),
        _time("swing_trade", chain, "BEAR", "swing_trade", spot, now, args.runs),
        _time("no-greeks", no_greeks, "BULL", "swing_trade", spot, now, args.runs),
        _time("all-illiquid", illiquid, "BULL", "swing_trade", spot, now, args.runs),
        _time("all-stale", stale, "BULL", "swing_trade", spot, now, args.runs),
    )
    verdict = "meets" if worst < TARGET_MS else "MISSES"
    # The verdict uses CPU time: on a shared 2-core machine the wall-clock tail measures the
    # neighbours' load (preemption), not this code. Both are printed.
    print(f"worst cpu p99 {worst:.3f} ms {verdict} the {TARGET_MS:.0f} ms target")
    return 0 if worst < TARGET_MS else 1


if __name__ == "__main__":
    raise SystemExit(main())
