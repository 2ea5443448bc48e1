"""The watchlist's option liquidity inputs: the pure chain summary, the cached source, and the
cycle end to end through the real alpaca-py SDK against the local fake Alpaca server."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.adapters.alpaca.client import AlpacaMarketData
from services.adapters.option_liquidity import OptionLiquiditySource
from services.adapters.sim.market import SimOptionMarket
from services.common.params import as_params
from services.domain.broker import BrokerUnavailable
from services.domain.market_data import OptionQuote, parse_occ_symbol
from services.domain.option_liquidity import summarize_chain
from services.watchlist_engine.main import run_watchlist_cycle
from tests.fake_alpaca import fake_alpaca  # noqa: F401  (fixture)
from tests.test_alpaca_adapter import settings

D = Decimal
UTC = timezone.utc
NOW = datetime(2026, 3, 11, 15, 0, tzinfo=UTC)   # Wednesday 11:00 ET
ACCOUNT = "acct-1"


def quote(symbol: str, bid: str | None, ask: str | None, oi: int | None = 1000) -> OptionQuote:
    occ = parse_occ_symbol(symbol)
    return OptionQuote(symbol, occ.underlying, occ.expiration, occ.strike, occ.right,
                       None if bid is None else D(bid), None if ask is None else D(ask), 10, 10, NOW, 100, oi,
                       0.3, 0.5, 0.02, -0.05, 0.3)


# --- the pure summary ---------------------------------------------------------------------------

def test_summary_when_quotes_near_and_far_from_the_money_then_median_spread_of_near_ones_and_total_oi():
    chain = [
        quote("ABC260320C00100000", "1.00", "1.10", oi=500),    # rel spread 0.10/1.05
        quote("ABC260320P00100000", "2.00", "2.10", oi=700),    # 0.10/2.05
        quote("ABC260320C00105000", "0.50", "0.60", oi=300),    # 0.10/0.55
        quote("ABC260320C00150000", "0.01", "0.50", oi=None),   # far out of the money: not in the spread
        quote("ABC260320C00095000", "0.00", "0.20", oi=100),    # no bid: not a two-sided quote
    ]
    s = summarize_chain(chain, D("100"))
    assert s.quoted == 3 and s.contracts == 5
    assert s.spread_quality == pytest.approx(1 - 0.1 / 1.05)
    assert s.oi_proxy == 1600.0
    assert s.missing == () and s.expirations == ("2026-03-20",)


@pytest.mark.parametrize("chain, spread_quality, oi_proxy, code", [
    ([], None, None, "NO_CONTRACTS"),
    ([quote("ABC260320C00100000", None, None, oi=50)], None, 50.0, "NO_QUOTES"),
    ([quote("ABC260320C00100000", "1.00", "1.20", oi=None)], pytest.approx(1 - 0.2 / 1.1), None, "NO_OPEN_INTEREST"),
])
def test_summary_when_an_input_cannot_be_read_then_none_with_its_reason(chain, spread_quality, oi_proxy, code):
    s = summarize_chain(chain, D("100"))
    assert (s.spread_quality, s.oi_proxy) == (spread_quality, oi_proxy)
    assert [m.split(":")[0] for m in s.missing] == [code]


# --- the cached source --------------------------------------------------------------------------

class Chains:
    """A chain fetcher that counts its calls and fails for the tickers in `failing`."""

    def __init__(self, failing=()):
        self.calls: list[tuple[str, tuple[date, date]]] = []
        self.failing = set(failing)

    def __call__(self, ticker, spot, now, window):
        self.calls.append((ticker, window))
        if ticker in self.failing:
            raise BrokerUnavailable(f"option chain {ticker}: HTTP 503")
        return [quote(f"{ticker}260320C00100000", "1.00", "1.10", oi=400)]


def test_source_when_asked_again_within_ttl_then_no_new_fetch_and_after_ttl_fetched_again():
    chains = Chains()
    source = OptionLiquiditySource(chains, source="test", ttl=timedelta(minutes=30))
    first = source({"ABC": D("100")}, NOW)
    assert source({"ABC": D("100")}, NOW + timedelta(minutes=29)) == first
    assert len(chains.calls) == 1
    # Near expiries only: from today's ET date to 30 days on.
    assert chains.calls[0] == ("ABC", (date(2026, 3, 11), date(2026, 4, 10)))
    source({"ABC": D("100")}, NOW + timedelta(minutes=30))
    assert len(chains.calls) == 2
    assert first["ABC"]["oi_proxy"] == 400.0 and first["ABC"]["detail"]["status"] == "ok"


def test_source_when_one_ticker_fails_then_only_it_is_missing_and_it_is_not_retried_before_failure_ttl():
    chains = Chains(failing={"BAD"})
    source = OptionLiquiditySource(chains, source="test", failure_ttl=timedelta(minutes=5))
    got = source({"BAD": D("100"), "GOOD": D("100")}, NOW)
    assert got["GOOD"]["spread_quality"] == pytest.approx(1 - 0.1 / 1.05)
    assert (got["BAD"]["spread_quality"], got["BAD"]["oi_proxy"]) == (None, None)
    assert got["BAD"]["detail"]["status"] == "missing"
    assert got["BAD"]["detail"]["reason"].startswith("FETCH_FAILED: BrokerUnavailable")
    source({"BAD": D("100"), "GOOD": D("100")}, NOW + timedelta(minutes=4))
    assert [t for t, _ in chains.calls] == ["BAD", "GOOD"]
    source({"BAD": D("100"), "GOOD": D("100")}, NOW + timedelta(minutes=5))
    assert [t for t, _ in chains.calls] == ["BAD", "GOOD", "BAD"]


def test_source_when_more_tickers_than_the_cycle_limit_then_the_rest_missing_until_a_later_cycle():
    chains = Chains()
    source = OptionLiquiditySource(chains, source="test", max_fetches_per_cycle=2)
    spots = {t: D("100") for t in ("A", "B", "C")}
    got = source(spots, NOW)
    assert [t for t, _ in chains.calls] == ["A", "B"]
    assert got["C"]["detail"]["reason"].startswith("NOT_FETCHED")
    got = source(spots, NOW + timedelta(minutes=1))
    assert [t for t, _ in chains.calls] == ["A", "B", "C"]   # never fetched goes first
    assert all(got[t]["detail"]["status"] == "ok" for t in spots)


def test_source_when_reading_older_than_max_age_and_not_refreshed_then_missing_as_stale():
    chains = Chains()
    source = OptionLiquiditySource(chains, source="test", ttl=timedelta(minutes=10), max_fetches_per_cycle=1)
    source({"A": D("100")}, NOW)
    source({"B": D("100")}, NOW)
    # Both due at +25 min; one fetch per cycle: A is refreshed (older), B is past max_age (20 min).
    got = source({"A": D("100"), "B": D("100")}, NOW + timedelta(minutes=25))
    assert got["A"]["detail"]["status"] == "ok"
    assert got["B"]["detail"]["reason"].startswith("STALE")


# --- the cycle end to end -----------------------------------------------------------------------

def add_days(conn, ticker: str, close: str, volume: int) -> None:
    """Two earlier sessions and today's first bars."""
    rows = []
    for day in (9, 10, 11):
        start = datetime(2026, 3, day, 13, 30, tzinfo=UTC)
        rows += [(ticker, start + timedelta(minutes=i), D(close), volume) for i in range(5)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)", [(t, ts, c, c, c, c, v) for t, ts, c, v in rows])


def watchlist_rows(conn) -> dict[str, dict]:
    return {r["ticker"]: r for r in conn.execute("SELECT * FROM watchlist_state WHERE account_id = %s", (ACCOUNT,))}


def test_cycle_against_fake_alpaca_when_chains_exist_then_nonzero_spread_and_oi_terms_else_explicit_missing(
        conn, fake_alpaca):
    # DEEP and THIN have near-expiry chains (DEEP the tighter and the more open interest); a far
    # expiry's open interest is not counted. NOCHAIN lists no options; BROKEN's chain fails.
    fake_alpaca.add_option("DEEP260320C00100000", bid=2.00, ask=2.02, open_interest="9000")
    fake_alpaca.add_option("DEEP260320P00100000", bid=1.90, ask=1.92, open_interest="7000")
    fake_alpaca.add_option("DEEP260918C00100000", bid=5.00, ask=5.20, open_interest="100000")
    fake_alpaca.add_option("THIN260313C00050000", bid=0.80, ask=1.00, open_interest="120")
    fake_alpaca.fail_next("/v1beta1/options/snapshots/BROKEN", 500)
    for ticker, close in (("DEEP", "100"), ("THIN", "50"), ("NOCHAIN", "20"), ("BROKEN", "30")):
        add_days(conn, ticker, close, 1000)
    market = AlpacaMarketData(settings(fake_alpaca, read_attempts=1))
    source = OptionLiquiditySource(
        lambda t, spot, now, w: market.option_chain(t, expiration_gte=w[0], expiration_lte=w[1]),
        source="alpaca option snapshots and contracts")

    run_watchlist_cycle(conn, ACCOUNT, as_params({"top_n": 2}), NOW, liquidity_source=source)

    rows = watchlist_rows(conn)
    deep, thin = rows["DEEP"]["components"], rows["THIN"]["components"]
    # Two tickers have each input: the better ranks 2/2, the other 1/2.
    assert (deep["liquidity_spread"], deep["liquidity_open_interest"]) == (1.0, 1.0)
    assert (thin["liquidity_spread"], thin["liquidity_open_interest"]) == (0.5, 0.5)
    assert deep["oi_proxy"] == 16000.0 and thin["oi_proxy"] == 120.0
    assert float(deep["spread_quality"]) == pytest.approx(1 - (0.02 / 2.01 + 0.02 / 1.91) / 2)  # median of two
    assert deep["option_liquidity"]["status"] == "ok"
    assert deep["option_liquidity"]["expirations"] == ["2026-03-20"]
    for ticker, code in (("NOCHAIN", "NO_CONTRACTS"), ("BROKEN", "FETCH_FAILED")):
        c = rows[ticker]["components"]
        assert (c["liquidity_spread"], c["liquidity_open_interest"]) == ("missing", "missing")
        assert (c["spread_quality"], c["oi_proxy"]) == (None, None)
        assert c["option_liquidity"]["status"] == "missing"
        assert c["option_liquidity"]["reason"].startswith(code)
        assert {"spread_quality", "oi_proxy"} <= set(c["missing"])
    # Volume is ranked on dollar volume: THIN's $50 shares beat NOCHAIN's $20 at equal share volume.
    assert thin["avg_daily_dollar_volume"] == 250000.0
    assert thin["liquidity_volume"] > rows["NOCHAIN"]["components"]["liquidity_volume"]
    # The liquidity sum credits nothing for a missing input.
    assert float(rows["NOCHAIN"]["components"]["liquidity"]) == pytest.approx(0.5 * 0.25)
    # The near-expiry window reached Alpaca: contracts and chain both asked for 2026-03-11..2026-04-10.
    [contracts] = [r for r in fake_alpaca.requests_to("/v2/options/contracts")
                   if r.query["underlying_symbols"] == "DEEP"]
    assert (contracts.query["expiration_date_gte"], contracts.query["expiration_date_lte"]) == (
        "2026-03-11", "2026-04-10")

    # A second cycle within the ttl (and within the failed fetch's failure_ttl) asks the broker nothing.
    before = len(fake_alpaca.requests)
    run_watchlist_cycle(conn, ACCOUNT, as_params({"top_n": 2}), NOW + timedelta(minutes=4), liquidity_source=source)
    assert len(fake_alpaca.requests) == before
    assert watchlist_rows(conn)["DEEP"]["components"]["liquidity_spread"] == 1.0


def test_cycle_with_simulated_market_when_bars_exist_then_liquidity_inputs_present(conn):
    for ticker, close in (("AAA", "100"), ("BBB", "250")):
        add_days(conn, ticker, close, 1000)
    source = OptionLiquiditySource(SimOptionMarket(None).near_chain, source="simulated option market")
    run_watchlist_cycle(conn, ACCOUNT, as_params({"top_n": 2}), NOW, liquidity_source=source)
    for row in watchlist_rows(conn).values():
        c = row["components"]
        assert c["option_liquidity"]["status"] == "ok"
        assert 0 < c["spread_quality"] <= 1 and c["oi_proxy"] > 0
        assert c["liquidity_spread"] > 0 and c["liquidity_open_interest"] > 0
