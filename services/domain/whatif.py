"""What another params document would have decided, on the inputs each decision was made from.

Each recorded decision carries its gathered inputs (services/domain/snapshot.py). `redecide`
runs `decide` on them with the candidate params (and the capacity recheck on the counts read
under the account lock, as the dispatcher did); `flip` says whether the outcome changed and how
(TAKEN -> DENIED by a gate, DENIED -> TAKEN, or DENIED by one gate -> by another).

One decision at a time, on the path that happened: a candidate that takes a trade the recorded
params denied would have changed the positions, exposure and cooldowns every later decision
saw, and this does not re-run that path (`replay --compare` does). Pure: no I/O.

An option entry that a contract-independent gate denied was decided without its chain (the
dispatcher does not spend the request budget on it); where the candidate would pass that gate,
the contract it would choose is unknown, and the flip says UNDETERMINED rather than guess.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from services.common.market_calendar import SessionCalendar
from services.common.params import TradingParams
from services.domain.decision import CHAIN_NOT_FETCHED, Decision, decide, recheck_capacity
from services.domain.snapshot import restore

TAKEN = "TAKEN"
DENIED = "DENIED"
# An option entry recorded without its chain (a contract-independent gate denied it first) that
# the candidate would let through to the contract choice: what it would choose is not known.
UNDETERMINED = "UNDETERMINED"


def redecide(inputs: Mapping[str, Any], params: TradingParams, calendar: SessionCalendar | None) -> Decision:
    ctx, now, option_inputs, exit_quote, capacity = restore(dict(inputs))
    decision = decide(ctx, params, now, calendar, option_inputs, exit_quote=exit_quote)
    if capacity is not None and decision.is_order and decision.plan.opens_position:
        decision = recheck_capacity(decision, ctx, capacity, params)
    return decision


def recorded_outcome(ordered: bool, code: str | None) -> tuple[str, str | None]:
    """(TAKEN, None) for a decision that sent an order (whatever became of it), else (DENIED, its code)."""
    return (TAKEN, None) if ordered else (DENIED, code)


def candidate_outcome(decision: Decision) -> tuple[str, str | None]:
    if decision.code == CHAIN_NOT_FETCHED:
        return UNDETERMINED, CHAIN_NOT_FETCHED
    return (TAKEN, None) if decision.is_order else (DENIED, decision.code)


@dataclass(frozen=True)
class Flip:
    recommendation_id: int
    ticker: str
    action: str
    at: Any
    before: tuple[str, str | None]
    after: tuple[str, str | None]
    forward: dict[str, Decimal | None]  # directional return at each horizon, None when no bar

    @property
    def label(self) -> str:
        def say(o: tuple[str, str | None]) -> str:
            if o[0] == UNDETERMINED:
                return f"{UNDETERMINED} (no chain was fetched for it)"
            return o[0] if o[1] is None else f"{o[0]} by {o[1]}"
        return f"{say(self.before)} -> {say(self.after)}"


def directional(action: str, base: Any, later: Any) -> Decimal | None:
    """The move from `base` to `later` as a return, signed so that a gain for the recommendation is positive."""
    if base is None or later is None:
        return None
    b, c = Decimal(str(base)), Decimal(str(later))
    if b <= 0:
        return None
    move = c / b - 1
    return -move if action == "SELL" else move


def whatif(decisions: Iterable[Mapping[str, Any]], params: TradingParams, calendar: SessionCalendar | None,
           horizons: Sequence[int]) -> dict[str, Any]:
    """Every recorded decision with inputs, decided again: the flips, counted and listed.

    Each decision row has: id, ticker, action, ordered (an order was recorded for it),
    outcome_code, inputs (the snapshot), base_close (its bar's close) and forward_closes (one
    close or None per horizon).
    """
    flips: list[Flip] = []
    seen = unchanged = 0
    for d in decisions:
        seen += 1
        before = recorded_outcome(d["ordered"], d["outcome_code"])
        after = candidate_outcome(redecide(d["inputs"], params, calendar))
        if before == after:
            unchanged += 1
            continue
        forward = {f"{h}m": directional(d["action"], d.get("base_close"), c)
                   for h, c in zip(horizons, d.get("forward_closes") or [None] * len(horizons))}
        flips.append(Flip(d["id"], d["ticker"], d["action"], d.get("created_at"), before, after, forward))
    by_label = Counter(f.label for f in flips)
    undetermined = sum(1 for f in flips if f.after[0] == UNDETERMINED)
    return {"decisions": seen, "unchanged": unchanged, "flipped": len(flips), "undetermined": undetermined,
            "by_kind": dict(by_label.most_common()), "flips": flips}
