"""Deciding one recommendation: pure, over the inputs the dispatcher gathered.

Gather, then decide: `decide` reads only its arguments (the gathered context, the params, the
option chain when the recommendation is for an option, and `now`) and returns a Decision: an
order plan with every gate result, or a denial with every gate result. No I/O here.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any

from services.common.market_calendar import SessionCalendar
from services.common.params import TradingParams
from services.dispatcher.risk.gates import (
    ASSET_NOT_GATHERED,
    GateResult,
    NamedGate,
    ProposedOrder,
    check_kill_switch,
    check_max_exposure,
    check_max_positions,
    check_no_open_position,
    evaluate_all_gates,
    first_denial,
)
from services.dispatcher.alpaca.options import choose_contract
from services.domain.order_pricing import LimitPrice, Quote, limit_price, offset_limit_price
from services.common.numbers import to_decimal
from services.domain.sizing import contract_multiplier, size_order


@dataclass(frozen=True)
class Context:
    """Everything the gates need about one recommendation, gathered in one round trip."""

    recommendation: dict[str, Any]
    bar: dict[str, Any] | None
    features: dict[str, Any] | None
    last_trade_time: datetime | None
    ticker_count_today: int
    open_position: dict[str, Any] | None
    open_positions: int
    exposure: Decimal
    account_state: dict[str, Any] | None
    kill_state: str
    # The broker's record of the ticker: an AssetRecord, None (no such asset) or AssetUnavailable.
    asset: Any = ASSET_NOT_GATHERED
    # HALTED with `halt --flatten`: every exit goes out (the operator asked for the book closed).
    kill_flatten: bool = False

    @property
    def ticker(self) -> str:
        return self.recommendation["ticker"]

    @property
    def action(self) -> str:
        return self.recommendation["action"]


@dataclass(frozen=True)
class OrderPlan:
    """An order the gates let through; the dispatcher records it, then submits it."""

    instrument: str
    symbol: str
    underlying: str
    side: str  # buy / sell
    qty: int
    est_price: Decimal
    position_intent: str | None
    opens_position: bool
    position_side: str  # long / short
    option: dict[str, Any] | None = None  # strike, expiration, right, quote, greeks, gates of an option
    order_type: str = "market"  # market / limit
    limit_price: Decimal | None = None

    @property
    def multiplier(self) -> int:
        return contract_multiplier(self.instrument)

    @property
    def notional(self) -> Decimal:
        return Decimal(self.qty) * self.est_price * self.multiplier


@dataclass(frozen=True)
class Decision:
    code: str
    detail: str
    gates: list[NamedGate]
    plan: OrderPlan | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def is_order(self) -> bool:
        return self.plan is not None

    def gates_json(self) -> list[dict[str, Any]]:
        return [g.as_json() for g in self.gates] + list(self.info.get("option_gates", []))


def _denied(gates: list[NamedGate], info: dict[str, Any] | None = None) -> Decision:
    failed = first_denial(gates)
    assert failed is not None
    return Decision(failed.result.code, failed.result.reason, gates, None, info or {})


def _evaluate(ctx: Context, rec: dict[str, Any], params: TradingParams, now: datetime,
              calendar: SessionCalendar | None, proposed: ProposedOrder | None) -> tuple[bool, list[NamedGate]]:
    return evaluate_all_gates(
        rec, ctx.bar, ctx.features, ctx.ticker_count_today, ctx.last_trade_time,
        ctx.open_position is not None, params,
        now=now, account_state=ctx.account_state, kill_switch_state=ctx.kill_state, kill_switch_flatten=ctx.kill_flatten,
        open_positions_count=ctx.open_positions, total_notional=ctx.exposure,
        proposed_order=proposed, calendar=calendar, asset=ctx.asset,
    )


def _propose(instrument: str, price: Decimal | None, ctx: Context, params: TradingParams,
             info: dict[str, Any]) -> ProposedOrder | None:
    """The order sized from the account's equity and exposure (noted in `info`); None for zero units."""
    equity = to_decimal((ctx.account_state or {}).get("equity"))
    if price is None or equity is None:
        return None
    size = size_order(instrument, price, equity, ctx.exposure, params)
    info["sizing"] = size.reason
    return ProposedOrder(instrument, size.qty, price) if size.qty > 0 else None


def _stock_entry(ctx: Context, rec: dict[str, Any], params: TradingParams, now: datetime,
                 calendar: SessionCalendar | None, info: dict[str, Any]) -> Decision:
    proposed = _propose("STOCK", to_decimal((ctx.bar or {}).get("close")), ctx, params, info)
    passed, gates = _evaluate(ctx, rec, params, now, calendar, proposed)
    if not passed:
        return _denied(gates, info)
    assert proposed is not None  # the exposure gate denies when sizing gave nothing
    bullish = rec["action"] == "BUY"
    side = "buy" if bullish else "sell"
    priced = _stock_limit(side, proposed.price, params)
    if priced is not None and priced.price is None:
        return _denied(gates + [NamedGate("limit_price", GateResult(False, priced.reason, None, None))], info)
    plan = OrderPlan(
        instrument="STOCK", symbol=ctx.ticker, underlying=ctx.ticker,
        side=side, qty=proposed.qty, est_price=proposed.price,
        position_intent=None, opens_position=True, position_side="long" if bullish else "short",
        **_order_type(priced),
    )
    return Decision("ORDER_PLANNED", f"{plan.side} {plan.qty} {plan.symbol} @~{plan.est_price}", gates, plan, info)


def _stock_limit(side: str, reference: Decimal | None, params: TradingParams) -> LimitPrice | None:
    """A stock's limit when the params ask for limit orders; None for a market order."""
    execution = params.execution
    if execution.stock_order_type != "limit":
        return None
    return offset_limit_price(side, reference, execution.stock_limit_offset_bps)


def _order_type(priced: LimitPrice | None) -> dict[str, Any]:
    if priced is None:
        return {"order_type": "market", "limit_price": None}
    return {"order_type": "limit", "limit_price": priced.price}


def _exit(ctx: Context, rec: dict[str, Any], params: TradingParams, now: datetime,
          calendar: SessionCalendar | None, quote: Quote | None = None) -> Decision:
    passed, gates = _evaluate(ctx, rec, params, now, calendar, None)
    if not passed:
        return _denied(gates)
    pos = ctx.open_position or {}
    wanted = rec.get("position_id")
    if wanted is not None and pos and pos.get("id") != wanted:
        # The position this exit was written for is gone; the ticker's live one is another (a
        # new entry since): closing it would act on a decision never made about it.
        gone = GateResult(False, f"EXIT_POSITION_GONE: position {wanted} is no longer live; "
                                 f"{ctx.ticker}'s live position is {pos.get('id')}", pos.get("id"), wanted)
        return _denied(gates + [NamedGate("exit_position", gone)])
    qty = to_decimal(pos.get("qty"))
    price = to_decimal(pos.get("market_price")) or to_decimal((ctx.bar or {}).get("close"))
    if pos.get("status") in ("CLOSING", "PENDING"):
        return exit_unavailable(Decision("ORDER_PLANNED", "", gates), pos.get("status"))
    if pos.get("status") != "OPEN" or qty is None or qty != qty.to_integral_value() or price is None:
        gates = gates + [NamedGate("exit_position", check_no_open_position(False, "EXIT"))]
        return _denied(gates)
    long = pos.get("side") == "long"
    side = "sell" if long else "buy"
    info: dict[str, Any] = {}
    if pos["instrument"] == "OPTION":
        priced = _exit_option_limit(side, quote, params, rec.get("exit_reason"))
        if priced.price is None:
            # An exit reduces risk: it is not held back for want of a quote to price a limit.
            info["order_type"] = f"market: {priced.reason}"
            priced = None
    else:
        priced = _stock_limit(side, price, params)
        if priced is not None and priced.price is None:
            info["order_type"] = f"market: {priced.reason}"
            priced = None
    plan = OrderPlan(
        instrument=pos["instrument"], symbol=pos["symbol"], underlying=ctx.ticker,
        side=side, qty=int(qty), est_price=price,
        position_intent=("sell_to_close" if long else "buy_to_close") if pos["instrument"] == "OPTION" else None,
        opens_position=False, position_side=pos.get("side", "long"), **_order_type(priced),
    )
    return Decision("ORDER_PLANNED", f"exit {plan.qty} {plan.symbol}", gates, plan, info)


# Exits with a deadline: the last trading day's cut-off, the flatten before the close, a kill
# switch's flatten. They are priced at the touch (the bid for a sale) from the first attempt:
# filling before the deadline is worth more than the half-spread, and re-pricing toward the bid
# would spend the minutes the deadline leaves.
DEADLINE_EXITS = frozenset({"EXPIRY_CUTOFF", "EXPIRY_APPROACHING", "END_OF_DAY", "DAILY_LOSS_FLATTEN",
                            "OPERATOR_FLATTEN"})


def _exit_option_limit(side: str, quote: Quote | None, params: TradingParams, exit_reason: str | None = None) -> LimitPrice:
    if quote is None:
        return LimitPrice(None, "NO_QUOTE", "NO_QUOTE: no quote gathered for the exit")
    aggressiveness = 1 if exit_reason in DEADLINE_EXITS else params.execution.option_limit_aggressiveness
    return limit_price(side, quote.bid, quote.ask, aggressiveness)


@dataclass(frozen=True)
class OptionInputs:
    """What was gathered for an option entry: the underlying's chain and its IV percentile.

    `error` says why the chain could not be had (an outage, no market data configured); the
    option is then denied with NO_OPTION_CHAIN and stock does not stand in: missing inputs
    fail closed.
    """

    chain: list[Any] | None
    iv_percentile: Any = None
    error: str | None = None
    # The chain was not fetched: a contract-independent gate denied the entry (the reason in `error`).
    not_fetched: bool = False

    @classmethod
    def skipped(cls, decision: Decision) -> OptionInputs:
        return cls(None, error=f"not fetched: {decision.code} denied the entry first", not_fetched=True)


def is_option_entry(rec: dict[str, Any]) -> bool:
    return rec.get("instrument") == "OPTION" and rec.get("action") in ("BUY", "SELL")


def decide(
    ctx: Context,
    params: TradingParams,
    now: datetime,
    calendar: SessionCalendar | None = None,
    option_inputs: OptionInputs | None = None,
    exit_quote: Quote | None = None,
) -> Decision:
    """Gates, sizing and, for an option entry, contract choice with the stock fallback.

    An option exit is a limit priced from `exit_quote` (the held contract's quote); without one
    it goes at market rather than not at all.
    """
    rec = ctx.recommendation
    if rec.get("action") == "EXIT":
        return _exit(ctx, rec, params, now, calendar, exit_quote)
    if rec.get("instrument") != "OPTION":
        return _stock_entry(ctx, rec, params, now, calendar, {})
    early = denied_whatever_the_contract(ctx, params, now, calendar)
    if early is not None:
        return early
    if option_inputs is not None and option_inputs.not_fetched:
        return _undetermined(ctx, rec, params, now, calendar, option_inputs)
    return _option_entry(ctx, rec, params, now, calendar, option_inputs)


# The entry gates whose verdict depends on neither the instrument nor the order: the account's
# state, the ticker's day, the recommendation's and its data's age, the clock. When one of them
# denies an option entry, no contract, and no stock fallback, could change the outcome.
CONTRACT_INDEPENDENT_GATES = frozenset({
    "kill_switch", "confidence", "recommendation_age", "bar_freshness", "feature_freshness", "trading_hours",
    "daily_loss", "broker_reconciliation", "ticker_trades_today", "ticker_cooldown", "open_position",
    "max_positions",
})
# The reason an option entry's chain was not fetched; `params whatif` cannot choose a contract
# for such a decision, and says so rather than deciding it without one.
CHAIN_NOT_FETCHED = "CHAIN_NOT_FETCHED"


def denied_whatever_the_contract(ctx: Context, params: TradingParams, now: datetime,
                                 calendar: SessionCalendar | None) -> Decision | None:
    """The denial of an option entry that a contract-independent gate refuses; None when the
    contract could matter.

    The dispatcher asks before it fetches the chain: a kill switch in force or the ticker's
    trades used up deny the entry whatever the chain holds, and the chain would cost requests
    of the account's budget for nothing. The gates are those of an entry with no order yet
    (the code is the first denial among them); the option's own gates are not evaluated.
    """
    rec = ctx.recommendation
    passed, gates = _evaluate(ctx, rec, params, now, calendar, None)
    if passed:
        return None
    blocking = next((g for g in gates if not g.result.passed and g.name in CONTRACT_INDEPENDENT_GATES), None)
    if blocking is None:
        return None
    info = {"option": {"code": CHAIN_NOT_FETCHED,
                       "reason": f"{CHAIN_NOT_FETCHED}: {blocking.name} denies the entry whatever the contract"}}
    return _denied(gates, info)


def _undetermined(ctx: Context, rec: dict[str, Any], params: TradingParams, now: datetime,
                  calendar: SessionCalendar | None, inputs: OptionInputs) -> Decision:
    """An entry recorded without its chain, decided again (`params whatif`) where no
    contract-independent gate denies it: what the contract, its sizing or a stock fallback would
    have made of it is not known. Not an order; the code says why."""
    _, gates = _evaluate(ctx, rec, params, now, calendar, None)
    reason = f"{CHAIN_NOT_FETCHED}: {inputs.error}"
    return Decision(CHAIN_NOT_FETCHED, reason, gates, None, {"option": {"code": CHAIN_NOT_FETCHED, "reason": reason}})


def plan_option(ctx: Context, params: TradingParams, now: datetime, calendar: SessionCalendar | None,
                inputs: OptionInputs | None) -> OptionOutcome:
    """Choose and validate a contract from the gathered chain (calls for BUY, puts for SELL)."""
    if inputs is None or inputs.error is not None or inputs.chain is None:
        reason = (inputs.error if inputs and inputs.error else "no option market data configured")
        return OptionOutcome(False, "NO_OPTION_CHAIN", f"NO_OPTION_CHAIN: {reason}", False)
    rec = ctx.recommendation
    spot = to_decimal((ctx.bar or {}).get("close"))
    selection = choose_contract(inputs.chain, rec["action"], rec.get("strategy"), spot, params, now, calendar,
                                iv_percentile=inputs.iv_percentile)
    choice = selection.choice
    if choice is None:
        code = selection.reason.split(":", 1)[0]
        # No contract in the window or band is a market without a usable option: stock may stand in.
        return OptionOutcome(False, code, selection.reason, code in _NO_CONTRACT_FALLBACK)
    contract = choice.contract
    details = {"contract": choice.as_json(), "iv_percentile": _iv_json(inputs.iv_percentile)}
    if not choice.passed:
        return OptionOutcome(False, choice.reason.split(":", 1)[0], choice.reason, choice.fallback_to_stock,
                             contract.symbol, contract.ask, details, choice.gate_results())
    option = {
        "strike": contract.strike, "expiration": contract.expiration, "right": contract.right,
        "quote": {"bid": contract.bid, "ask": contract.ask, "bid_size": contract.bid_size,
                  "ask_size": contract.ask_size, "quote_time": contract.quote_time},
        "greeks": {"implied_volatility": contract.implied_volatility, "delta": contract.delta,
                   "gamma": contract.gamma, "theta": contract.theta, "vega": contract.vega},
        "gates": choice.gate_results(),
    }
    return OptionOutcome(True, "OPTION_CHOSEN", choice.reason, False, contract.symbol, contract.ask,
                         {**details, "order": option}, choice.gate_results())


_NO_CONTRACT_FALLBACK = frozenset({"NO_CANDIDATE", "NO_PASSING_CONTRACT"})


def _iv_json(iv: Any) -> Any:
    if isinstance(iv, tuple) and len(iv) == 2:
        return {"percentile": iv[0], "reason": iv[1]}
    return iv


@dataclass(frozen=True)
class OptionOutcome:
    """What the option planner found: a valid contract to buy, or why not, and whether stock may stand in."""

    passed: bool
    code: str
    reason: str
    fallback_to_stock: bool
    symbol: str | None = None
    ask: Decimal | None = None
    details: dict[str, Any] = field(default_factory=dict)
    option_gates: list[dict[str, Any]] = field(default_factory=list)


def _option_entry(ctx: Context, rec: dict[str, Any], params: TradingParams, now: datetime,
                  calendar: SessionCalendar | None, inputs: OptionInputs | None) -> Decision:
    outcome = plan_option(ctx, params, now, calendar, inputs)
    details = {k: v for k, v in outcome.details.items() if k != "order"}
    info: dict[str, Any] = {"option": {"code": outcome.code, "reason": outcome.reason, **details},
                            "option_gates": [{**g, "name": f"option.{g['name']}"} for g in outcome.option_gates]}
    if outcome.passed and outcome.ask is not None and outcome.symbol:
        proposed = _propose("OPTION", outcome.ask, ctx, params, info)
        if proposed is None:
            # The option costs more than the budget allows: a size-zero skip, never rounded up.
            _, gates = _evaluate(ctx, rec, params, now, calendar, ProposedOrder("OPTION", 1, outcome.ask))
            sizing = info.get("sizing") or "SIZE_ZERO: no account equity to size against"
            return _denied(gates + [NamedGate("option_sizing", GateResult(False, sizing, None, None))], info)
        passed, gates = _evaluate(ctx, rec, params, now, calendar, proposed)
        if not passed:
            return _denied(gates, info)
        quote = (outcome.details.get("order") or {}).get("quote") or {}
        priced = limit_price("buy", to_decimal(quote.get("bid")), to_decimal(quote.get("ask")),
                             params.execution.option_limit_aggressiveness)
        if priced.price is None:
            return _denied(gates + [NamedGate("option_limit_price", GateResult(False, priced.reason, None, None))], info)
        info["limit"] = priced.reason
        # Sized at the ask, so a limit at or below it never buys more than the budget.
        plan = OrderPlan(
            instrument="OPTION", symbol=outcome.symbol, underlying=ctx.ticker, side="buy",
            qty=proposed.qty, est_price=outcome.ask, position_intent="buy_to_open",
            opens_position=True, position_side="long", option=outcome.details.get("order"),
            order_type="limit", limit_price=priced.price,
        )
        return Decision("ORDER_PLANNED", f"buy {plan.qty} {plan.symbol} @~{plan.est_price}", gates, plan, info)

    # The option failed its gates. Stock may stand in, re-gated as a stock order in full.
    allow = params.instruments
    if not outcome.fallback_to_stock or not allow.allow_stock_fallback or "STOCK" not in allow.allowed_instruments:
        passed, gates = _evaluate(ctx, rec, params, now, calendar, None)
        code = outcome.code if passed else _denied(gates).code
        return Decision(code, outcome.reason, gates, None, {**info, "fallback": "not allowed"})
    if rec["action"] == "SELL" and not allow.allow_short:
        passed, gates = _evaluate(ctx, rec, params, now, calendar, None)
        return Decision("FALLBACK_SHORT_NOT_ALLOWED",
                        f"FALLBACK_SHORT_NOT_ALLOWED: option failed ({outcome.code}); a bearish stock fallback is a short sale",
                        gates, None, {**info, "fallback": "short not allowed"})
    info["fallback"] = f"stock instead of option ({outcome.code})"
    stock_rec = {**rec, "instrument": "STOCK"}
    decision = _stock_entry(ctx, stock_rec, params, now, calendar, info)
    if decision.is_order:
        return replace(decision, code="ORDER_PLANNED_FALLBACK")
    return decision


def exit_unavailable(decision: Decision, status: str | None = None) -> Decision:
    """An exit whose position another exit already holds (CLOSING), or that has not filled yet."""
    detail = (f"EXIT_IN_PROGRESS: the position is {status}: an exit order for it is working"
              if status != "PENDING" else "EXIT_IN_PROGRESS: the position's entry has not filled yet")
    gates = decision.gates + [NamedGate("exit_position", GateResult(False, detail, status, "OPEN"))]
    return _denied(gates, decision.info)


def live_trading_check(decision: Decision, live: bool, params: TradingParams) -> Decision:
    """A live broker sends nothing once the params in force turn live trading off (hot-reloaded)."""
    if not decision.is_order or not live or params.live_trading_enabled:
        return decision
    gate = NamedGate("live_trading", GateResult(
        False, "LIVE_TRADING_DISABLED: the broker is live but params.live_trading_enabled is false", True, False))
    return _denied(decision.gates + [gate], decision.info)


def recheck_capacity(decision: Decision, ctx: Context, fresh: dict[str, Any], params: TradingParams) -> Decision:
    """Re-run the capacity gates on counts read under the account lock.

    Two dispatchers may both have seen 4 of 5 positions; only the first to take the lock may
    open the fifth.
    """
    plan = decision.plan
    if plan is None or not plan.opens_position:
        return decision
    rechecked = [
        NamedGate("kill_switch", check_kill_switch(fresh.get("kill_state") or "ACTIVE", ctx.action)),
        NamedGate("open_position", check_no_open_position(bool(fresh["has_open_position"]), ctx.action)),
        NamedGate("max_positions", check_max_positions(int(fresh["open_positions"]), params)),
        NamedGate("max_exposure", check_max_exposure(fresh["exposure"], params, plan.notional)),
    ]
    names = {g.name for g in rechecked}
    gates = [g for g in decision.gates if g.name not in names] + rechecked
    if first_denial(rechecked) is None:
        return replace(decision, gates=gates)
    return _denied(gates, {**decision.info, "capacity": "denied on recheck under the account lock"})
