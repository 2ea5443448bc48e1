"""What a decision was made from, as JSON: stored with the decision so it can be made again.

`snapshot(...)` turns the gathered inputs of one decision (the Context, the option chain and IV
percentile of an option entry, the quote of an option exit, the capacity counts read again under
the account lock, and `now`) into plain JSON; `restore(...)` turns that JSON back into the same
inputs, so `decide` run on them with the same params gives the same decision, and with other
params gives what those params would have decided (`params whatif`). Pure: no I/O.

Decimals are kept as their exact strings, times as ISO 8601 with their offset. An option chain
is kept as the excerpt the choice could use: the contracts inside the strategy's expiry window
and the delta band's neighbourhood, at most CHAIN_EXCERPT of them nearest the money.
An option entry that a contract-independent gate denied before its chain was fetched is
kept with `not_fetched`: decided again where that gate passes, it has no contract to choose.
"""

from __future__ import annotations

from dataclasses import asdict, fields
from datetime import date, datetime
from decimal import Decimal
from typing import Any

from services.dispatcher.risk.gates import ASSET_NOT_GATHERED, AssetUnavailable
from services.domain.broker import AssetRecord
from services.domain.decision import Context, OptionInputs
from services.domain.iv_percentile import IVPercentile
from services.domain.market_data import OptionQuote
from services.domain.order_pricing import Quote

VERSION = 1
CHAIN_EXCERPT = 60

_BAR_DECIMALS = ("open", "high", "low", "close")
_ACCOUNT_DECIMALS = ("equity", "last_equity")
_ACCOUNT_TIMES = ("as_of", "orders_reconciled_at")
_REC_TIMES = ("bar_ts", "created_at")
_QUOTE_DECIMALS = ("strike", "bid", "ask")


def _text(value: Any) -> Any:
    if isinstance(value, Decimal):
        return str(value)
    if isinstance(value, (datetime, date)):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _text(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    return value


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else value


def _dec(value: Any) -> Decimal | None:
    return Decimal(value) if isinstance(value, str) else value


def _asset(asset: Any) -> Any:
    if isinstance(asset, AssetRecord):
        return {"record": asdict(asset)}
    if isinstance(asset, AssetUnavailable):
        return {"unavailable": asset.reason}
    return {"none": True}  # the broker answered: no such asset


def _restore_asset(data: Any) -> Any:
    if not isinstance(data, dict):
        return ASSET_NOT_GATHERED
    if "record" in data:
        return AssetRecord(**data["record"])
    if "unavailable" in data:
        return AssetUnavailable(data["unavailable"])
    return None


def _excerpt(chain: list[OptionQuote], spot: Any) -> list[OptionQuote]:
    """The contracts nearest the money (by strike distance to the spot), at most CHAIN_EXCERPT."""
    if len(chain) <= CHAIN_EXCERPT:
        return list(chain)
    s = _dec(spot) if spot is not None else None
    if s is None:
        return list(chain[:CHAIN_EXCERPT])
    s = Decimal(str(s))
    return sorted(chain, key=lambda q: (abs(q.strike - s), q.expiration, q.right))[:CHAIN_EXCERPT]


_QUOTE_FIELDS = tuple(f.name for f in fields(OptionQuote))


def _quote_json(q: OptionQuote) -> dict[str, Any]:
    # A quote's fields are flat: _text's cases without its recursion (a chain excerpt is stored
    # with every option decision, 60 quotes each).
    out: dict[str, Any] = {}
    for name in _QUOTE_FIELDS:
        v = getattr(q, name)
        out[name] = str(v) if isinstance(v, Decimal) else v.isoformat() if isinstance(v, (datetime, date)) else v
    return out


def _restore_quote(d: dict[str, Any]) -> OptionQuote:
    values = dict(d)
    for k in _QUOTE_DECIMALS:
        values[k] = _dec(values.get(k))
    values["expiration"] = date.fromisoformat(values["expiration"])
    values["quote_time"] = _time(values.get("quote_time"))
    return OptionQuote(**values)


def snapshot(ctx: Context, now: datetime, option_inputs: OptionInputs | None = None, exit_quote: Quote | None = None,
             capacity: dict[str, Any] | None = None) -> dict[str, Any]:
    """The decision's inputs as JSON (see the module's docstring)."""
    out: dict[str, Any] = {
        "version": VERSION,
        "now": now.isoformat(),
        "recommendation": _text(ctx.recommendation),
        "bar": _text(ctx.bar),
        "features": _text(ctx.features),
        "last_trade_time": _text(ctx.last_trade_time),
        "ticker_count_today": ctx.ticker_count_today,
        "open_position": _text(ctx.open_position),
        "open_positions": ctx.open_positions,
        "exposure": _text(ctx.exposure),
        "account_state": _text(ctx.account_state),
        "kill_state": ctx.kill_state,
        "kill_flatten": ctx.kill_flatten,
        "asset": _asset(ctx.asset),
    }
    if option_inputs is not None:
        chain = option_inputs.chain
        out["option_inputs"] = {
            "chain": None if chain is None else [_quote_json(q) for q in _excerpt(chain, (ctx.bar or {}).get("close"))],
            "chain_size": None if chain is None else len(chain),
            "iv_percentile": list(option_inputs.iv_percentile) if option_inputs.iv_percentile is not None else None,
            "error": option_inputs.error,
        }
        if option_inputs.not_fetched:
            out["option_inputs"]["not_fetched"] = True
    if exit_quote is not None:
        out["exit_quote"] = _text({"bid": exit_quote.bid, "ask": exit_quote.ask})
    if capacity is not None:
        out["capacity"] = _text(dict(capacity))
    return out


def restore(data: dict[str, Any]) -> tuple[Context, datetime, OptionInputs | None, Quote | None, dict[str, Any] | None]:
    """(Context, now, option inputs, exit quote, capacity recheck counts) from `snapshot`'s JSON."""
    rec = dict(data["recommendation"])
    for k in _REC_TIMES:
        rec[k] = _time(rec.get(k))
    if isinstance(rec.get("confidence"), str):
        rec["confidence"] = Decimal(rec["confidence"])
    bar = dict(data["bar"]) if data.get("bar") else None
    if bar is not None:
        bar["ts"] = _time(bar.get("ts"))
        for k in _BAR_DECIMALS:
            if k in bar:
                bar[k] = _dec(bar[k])
    features = dict(data["features"]) if data.get("features") else None
    if features is not None:
        features["ts"] = _time(features.get("ts"))
    account = dict(data["account_state"]) if data.get("account_state") else None
    if account is not None:  # only the keys it had: a missing key and a None one differ to the gates
        for k in _ACCOUNT_DECIMALS:
            if k in account:
                account[k] = _dec(account[k])
        for k in _ACCOUNT_TIMES:
            if k in account:
                account[k] = _time(account[k])
    ctx = Context(
        recommendation=rec, bar=bar, features=features, last_trade_time=_time(data.get("last_trade_time")),
        ticker_count_today=data["ticker_count_today"], open_position=data.get("open_position"),
        open_positions=data["open_positions"], exposure=_dec(data["exposure"]), account_state=account,
        kill_state=data["kill_state"], asset=_restore_asset(data.get("asset")),
        kill_flatten=bool(data.get("kill_flatten", False)),
    )
    option_inputs = None
    if "option_inputs" in data:
        o = data["option_inputs"]
        iv = IVPercentile(*o["iv_percentile"]) if o.get("iv_percentile") is not None else None
        chain = None if o.get("chain") is None else [_restore_quote(q) for q in o["chain"]]
        option_inputs = OptionInputs(chain, iv, o.get("error"), bool(o.get("not_fetched", False)))
    exit_quote = None
    if "exit_quote" in data:
        q = data["exit_quote"]
        exit_quote = Quote(_dec(q.get("bid")), _dec(q.get("ask")))
    capacity = None
    if data.get("capacity") is not None:
        capacity = dict(data["capacity"])
        capacity["exposure"] = _dec(capacity.get("exposure"))
    return ctx, _time(data["now"]), option_inputs, exit_quote, capacity
