"""Watchlist scoring (pure) and the watchlist cycle against a real Postgres."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from services.common.params import as_params, default_params
from services.watchlist_engine.main import run_watchlist_cycle
from services.watchlist_engine.scoring import WatchlistInput, percentile_ranks, score_watchlist

UTC = timezone.utc


def cand(ticker, sentiment, volume, spread, oi, trend=1, distance=0.002, vol_ratio=1.0) -> WatchlistInput:
    return WatchlistInput(ticker, sentiment, volume, spread, oi, trend, distance, vol_ratio)


def market():
    """HYPE: the strongest news, but the least liquid ticker on every liquidity input."""
    return [
        cand("HYPE", 0.9, 1e5, 0.50, 10),
        cand("L1", 0.55, 5e7, 0.99, 90_000),
        cand("L2", 0.55, 4e7, 0.98, 80_000),
        cand("L3", 0.55, 3e7, 0.97, 70_000),
        cand("L4", 0.55, 2e7, 0.96, 60_000),
    ]


def test_liquidity_weight_when_ticker_is_illiquid_then_high_sentiment_no_longer_ranks_first():
    no_liquidity = as_params({"watchlist": {"weight_sentiment_momentum": 0.7, "weight_liquidity": 0.0,
                                            "weight_technical": 0.2, "weight_volatility": 0.1, "top_n": 2}})
    ranked = {s.ticker: s for s in score_watchlist(market(), no_liquidity)}
    assert ranked["HYPE"].rank == 1 and ranked["HYPE"].selected
    with_liquidity = {s.ticker: s for s in score_watchlist(market(), as_params({"top_n": 2}))}
    # 0.40*0.9 + 0.30*(0.5*0.2 + 0.3*0.2 + 0.2*0.2) + 0.20*1 + 0.10*1 = 0.72
    assert with_liquidity["HYPE"].score == pytest.approx(0.72)
    assert with_liquidity["HYPE"].components["liquidity"] == pytest.approx(0.2)
    assert with_liquidity["L1"].score == pytest.approx(0.4 * 0.55 + 0.3 * 1.0 + 0.3)
    assert [s.ticker for s in sorted(with_liquidity.values(), key=lambda s: s.rank)] == ["L1", "L2", "HYPE", "L3", "L4"]
    assert not with_liquidity["HYPE"].selected
    assert {t for t, s in with_liquidity.items() if s.selected} == {"L1", "L2"}


def test_normalisation_when_one_outlier_volume_then_others_keep_their_spread():
    volumes = {"A": 1e6, "B": 2e6, "C": 3e6, "D": 4e6, "GIANT": 1e12}
    norm = percentile_ranks(volumes)
    assert norm == {"A": 0.2, "B": 0.4, "C": 0.6, "D": 0.8, "GIANT": 1.0}
    # Min-max scaling would have put A..D within 4e-6 of zero.
    scores = {s.ticker: s for s in score_watchlist(
        [cand(t, 0.5, v, 0.9, 1000) for t, v in volumes.items()], default_params())}
    assert scores["D"].components["liquidity_volume"] == pytest.approx(0.8)
    assert scores["A"].components["liquidity_volume"] == pytest.approx(0.2)
    assert scores["D"].score - scores["A"].score == pytest.approx(0.3 * 0.5 * 0.6)


def test_normalisation_when_input_missing_or_tied_then_zero_and_shared_rank():
    assert percentile_ranks({"A": None, "B": 5, "C": 5, "D": 1}) == {"A": 0.0, "B": 1.0, "C": 1.0, "D": 1 / 3}
    assert percentile_ranks({}) == {}


@pytest.mark.parametrize("challenger_sentiment, incumbent_kept", [
    (0.6 + 0.04 / 0.4, True),    # challenger ahead by 0.04 <= hysteresis 0.05: incumbent stays
    (0.6 + 0.06 / 0.4, False),   # ahead by 0.06 > 0.05: replaced
])
def test_hysteresis_when_challenger_slightly_better_then_incumbent_kept(challenger_sentiment, incumbent_kept):
    params = as_params({"top_n": 1, "hysteresis": 0.05})
    cands = [cand("INC", 0.6, 1e6, 0.9, 100), cand("NEW", challenger_sentiment, 1e6, 0.9, 100)]
    scores = {s.ticker: s for s in score_watchlist(cands, params, incumbents=["INC"])}
    assert scores["NEW"].rank == 1 and scores["INC"].rank == 2
    assert scores["INC"].selected is incumbent_kept
    assert scores["NEW"].selected is not incumbent_kept
    # Without an incumbent, the better score simply wins.
    fresh = {s.ticker: s for s in score_watchlist(cands, params)}
    assert fresh["NEW"].selected and not fresh["INC"].selected


def test_components_when_scored_then_every_term_and_weight_recorded_and_absent_inputs_missing():
    [s] = score_watchlist([cand("A", -0.8, 1e6, None, None, trend=-1, distance=-0.01, vol_ratio=None)], default_params())
    c = s.components
    assert c["sentiment_momentum"] == pytest.approx(0.8)   # a strong negative is strong news too
    # Absent inputs are credited nothing and stored as "missing", never as a 0 that looks measured.
    assert c["liquidity_spread"] == "missing" and c["liquidity_open_interest"] == "missing"
    assert c["option_liquidity"]["status"] == "missing"
    assert c["liquidity"] == pytest.approx(0.5)
    assert c["technical"] == pytest.approx(1.0) and c["volatility"] == 0.0
    assert set(c["missing"]) == {"spread_quality", "oi_proxy", "vol_ratio"}
    assert c["weights"] == {"sentiment_momentum": 0.4, "liquidity": 0.3, "technical": 0.2, "volatility": 0.1}
    assert s.score == pytest.approx(0.4 * 0.8 + 0.3 * 0.5 + 0.2 * 1.0)


# --- the cycle --------------------------------------------------------------------------------

NOW = datetime(2026, 3, 11, 15, 0, tzinfo=UTC)   # 11:00 ET on Wednesday


def add_day(conn, ticker, day_open: datetime, volume_per_bar: int, bars: int = 10):
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) "
                        "VALUES (%s, %s, 10, 10, 10, 10, %s)",
                        [(ticker, day_open + timedelta(minutes=i), volume_per_bar) for i in range(bars)])


def test_cycle_when_run_then_rows_store_components_rank_and_selection(conn):
    mon, tue, wed = (datetime(2026, 3, d, 13, 30, tzinfo=UTC) for d in (9, 10, 11))
    add_day(conn, "BIG", mon, 1000)
    add_day(conn, "BIG", tue, 3000)      # avg of complete days: (10k + 30k) / 2 = 20k
    add_day(conn, "BIG", wed, 1)         # today's partial day is not averaged in
    add_day(conn, "NEWCO", wed, 500)     # only today: today's volume so far, 5k
    conn.execute("INSERT INTO sentiment (ticker, ts, score, confidence, source) VALUES "
                 "('NEWCO', %s, 0.9, 1, 'news')", (NOW - timedelta(minutes=10),))
    conn.execute("INSERT INTO watchlist_state (account_id, ticker, selected, updated_at) "
                 "VALUES ('acct-1', 'GONE', true, %s)", (NOW - timedelta(days=1),))
    scores = run_watchlist_cycle(conn, "acct-1", as_params({"top_n": 1}), NOW,
                                 liquidity_inputs={"BIG": {"spread_quality": 0.99, "oi_proxy": 5000}})
    rows = {r["ticker"]: r for r in conn.execute(
        "SELECT * FROM watchlist_state WHERE account_id = 'acct-1'")}
    assert rows["BIG"]["components"]["avg_daily_volume"] == 20000
    assert rows["NEWCO"]["components"]["avg_daily_volume"] == 5000
    assert float(rows["NEWCO"]["components"]["sentiment_score"]) == pytest.approx(0.9)
    assert {s.ticker: s.rank for s in scores} == {t: rows[t]["rank"] for t in ("BIG", "NEWCO")}
    # NEWCO: 0.4*0.9 + 0.3*(0.5*0.5) = 0.435; BIG: 0.3*(0.5 + 0.3 + 0.2) = 0.30.
    assert float(rows["NEWCO"]["score"]) == pytest.approx(0.435)
    assert float(rows["BIG"]["score"]) == pytest.approx(0.30)
    assert (rows["NEWCO"]["selected"], rows["BIG"]["selected"]) == (True, False)
    assert rows["GONE"]["selected"] is False and rows["GONE"]["rank"] is None
    assert rows["NEWCO"]["updated_at"] == NOW


def test_average_volume_counts_whole_et_days_of_the_lookback_read_once_per_day(conn):
    """The ten ET days before today count whole (the oldest one too, whatever the hour), and a
    long-running engine reads them once per ET day: a past day's bars loaded later count from
    the next day."""
    from services.watchlist_engine.main import VolumeHistory

    oldest = datetime(2026, 3, 1, 14, 30, tzinfo=UTC)    # 1 March 09:30 ET: 10 days before, earlier in the day than now
    add_day(conn, "BIG", oldest, 1000)                   # 10k
    add_day(conn, "BIG", datetime(2026, 2, 28, 19, 0, tzinfo=UTC), 9999)  # 11 days before: outside
    add_day(conn, "BIG", datetime(2026, 3, 10, 13, 30, tzinfo=UTC), 3000)  # 30k
    history = VolumeHistory()

    def average() -> float:
        run_watchlist_cycle(conn, "acct-1", as_params({}), NOW, liquidity_inputs={}, history=history)
        return conn.execute("SELECT components FROM watchlist_state WHERE ticker = 'BIG'").fetchone()[
            "components"]["avg_daily_volume"]

    assert average() == 20000  # (10k + 30k) / 2: the 1st counts whole, from its midnight
    add_day(conn, "BIG", datetime(2026, 3, 9, 13, 30, tzinfo=UTC), 5000)  # a backfill of Monday the 9th
    assert average() == 20000  # the day's complete days were read at its first cycle
    assert history.day == NOW.date()
    history.day = None  # as at the next ET day's first cycle
    assert average() == 30000  # (10k + 50k + 30k) / 3
