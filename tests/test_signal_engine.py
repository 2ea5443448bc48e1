"""Signal engine cycles against a real Postgres: what gets written, once, with its reason."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.common import db as dbmod
from services.common.params import as_params, default_params
from services.feature_computer.main import compute_features
from services.signal_engine.main import run_signal_cycle

D = Decimal
UTC = timezone.utc
ACCOUNT = "acct-1"
BAR_TS = datetime(2026, 3, 10, 15, 0, tzinfo=UTC)   # 11:00 ET
NOW = BAR_TS + timedelta(seconds=65)                 # the bar is complete and 5 s old


def insert_features(conn, ticker: str, ts: datetime = BAR_TS, **overrides) -> None:
    """A BULL setup that passes every filter unless overridden."""
    f = {"close": D("101"), "sma20": D("100.5"), "sma50": D("100"), "distance_sma20": D("101") / D("100.5") - 1,
         "volume_ratio": D("1.5"), "trend_state": 1, "close_5m_ago": D("100.7"), "close_15m_ago": D("100.6")}
    f.update(overrides)
    cols = ", ".join(f)
    conn.execute(f"INSERT INTO lane_features (ticker, ts, {cols}) VALUES (%s, %s, {', '.join(['%s'] * len(f))})",
                 (ticker, ts, *f.values()))


def recommendations(conn, account: str = ACCOUNT) -> list[dict]:
    return conn.execute("SELECT * FROM dispatch_recommendations WHERE account_id = %s ORDER BY ticker, bar_ts",
                        (account,)).fetchall()


def test_cycle_when_bull_setup_then_pending_recommendation_with_reason_and_notify(conn, db_url):
    insert_features(conn, "ABC")
    with dbmod.connect(db_url) as listener:
        listener.execute("LISTEN recommendations")
        result = run_signal_cycle(conn, ACCOUNT, default_params(), NOW)
        notes = list(listener.notifies(timeout=1.0, stop_after=1))
    assert [(n.channel, n.payload) for n in notes] == [("recommendations", ACCOUNT)]
    assert result.counts["emitted"] == 1 and result.counts["evaluated"] == 1
    [rec] = recommendations(conn)
    assert (rec["ticker"], rec["action"], rec["instrument"], rec["strategy"], rec["status"]) == (
        "ABC", "BUY", "OPTION", "day_trade", "PENDING")
    assert rec["confidence"] == D("0.55")
    assert rec["bar_ts"] == BAR_TS and rec["created_at"] == NOW
    assert result.recommendation_ids == (rec["id"],)
    reason = rec["reason"]
    assert reason["outcome"] == "EMIT" and reason["direction"] == "BULL"
    assert {n: f["passed"] for n, f in reason["filters"].items()} == {
        "trend": True, "volume": True, "breakout": True, "momentum": True}
    assert reason["filters"]["volume"]["threshold"] == D("1.2")
    assert reason["confidence"]["base_confidence"] == D("0.55")
    assert reason["params"]["hash"] == default_params().content_hash()


def test_cycle_when_no_confirmed_move_then_nothing_written_and_counted_as_momentum(conn, db_url):
    insert_features(conn, "FLAT", close_5m_ago=D("101"), close_15m_ago=D("100.9"))
    insert_features(conn, "LOWVOL", volume_ratio=D("0.8"))
    insert_features(conn, "NOTREND", trend_state=0, sma20=D("101.5"))
    with dbmod.connect(db_url) as listener:
        listener.execute("LISTEN recommendations")
        result = run_signal_cycle(conn, ACCOUNT, default_params(), NOW)
        notes = list(listener.notifies(timeout=0.2))
    assert notes == []
    assert recommendations(conn) == []
    assert result.counts == {"evaluated": 3, "no_features": 0, "stale": 0, "trend": 1, "volume": 1, "confidence": 0,
                             "breakout": 0, "momentum": 1, "cooldown": 0, "duplicate": 0, "emitted": 0}
    flat = next(o for o in result.outcomes if o.ticker == "FLAT")
    assert flat.detail == "NO_MOMENTUM"
    assert flat.decision.reason["filters"]["momentum"]["passed"] is False


@pytest.mark.parametrize("cooldown, second_outcome", [(15, "cooldown"), (0, "duplicate")])
def test_two_cycles_for_same_bar_when_run_again_then_one_recommendation(conn, cooldown, second_outcome):
    params = as_params({"signal_cooldown_minutes": cooldown})
    insert_features(conn, "ABC")
    first = run_signal_cycle(conn, ACCOUNT, params, NOW)
    second = run_signal_cycle(conn, ACCOUNT, params, NOW + timedelta(seconds=5))
    assert first.counts["emitted"] == 1
    assert second.counts["emitted"] == 0 and second.counts[second_outcome] == 1
    assert len(recommendations(conn)) == 1


@pytest.mark.parametrize("cooldown", [0, 15])
def test_two_engines_concurrently_when_same_bars_then_each_ticker_recommended_once(conn, db_url, cooldown):
    params = as_params({"signal_cooldown_minutes": cooldown})
    tickers = [f"T{i:02d}" for i in range(20)]
    for t in tickers:
        insert_features(conn, t)
    barrier = threading.Barrier(2)
    results, errors = [], []

    def engine():
        try:
            with dbmod.connect(db_url) as c:
                barrier.wait()
                results.append(run_signal_cycle(c, ACCOUNT, params, NOW))
        except Exception as e:  # surfaced by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=engine) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    assert errors == []
    rows = recommendations(conn)
    assert sorted(r["ticker"] for r in rows) == tickers
    assert sum(r.counts["emitted"] for r in results) == 20
    assert sum(r.counts["emitted"] + r.counts["cooldown"] + r.counts["duplicate"] for r in results) == 40


def test_cooldown_when_next_bar_signals_again_then_waits_signal_cooldown_minutes(conn):
    insert_features(conn, "ABC")
    assert run_signal_cycle(conn, ACCOUNT, default_params(), NOW).counts["emitted"] == 1
    later = BAR_TS + timedelta(minutes=1)
    insert_features(conn, "ABC", ts=later)
    blocked = run_signal_cycle(conn, ACCOUNT, default_params(), NOW + timedelta(minutes=1))
    assert blocked.counts["cooldown"] == 1 and blocked.outcomes[0].detail.startswith("SIGNAL_COOLDOWN")
    last = BAR_TS + timedelta(minutes=15)
    insert_features(conn, "ABC", ts=last)
    again = run_signal_cycle(conn, ACCOUNT, default_params(), NOW + timedelta(minutes=15))
    assert again.counts["emitted"] == 1
    assert [r["bar_ts"] for r in recommendations(conn)] == [BAR_TS, last]
    # Cooldown is per account: another account is not held back by acct-1's signal.
    other = run_signal_cycle(conn, "acct-2", default_params(), NOW + timedelta(minutes=15))
    assert other.counts["emitted"] == 1


def test_universe_when_watchlist_has_selection_then_only_selected_tickers(conn):
    for t in ("ABC", "DEF", "GHI"):
        insert_features(conn, t)
    conn.execute("INSERT INTO watchlist_state (account_id, ticker, selected, updated_at) VALUES "
                 "(%s, 'DEF', true, %s), (%s, 'GHI', false, %s), ('acct-2', 'ABC', true, %s)",
                 (ACCOUNT, NOW, ACCOUNT, NOW, NOW))
    result = run_signal_cycle(conn, ACCOUNT, default_params(), NOW)
    assert [o.ticker for o in result.outcomes] == ["DEF"]
    assert [r["ticker"] for r in recommendations(conn)] == ["DEF"]
    # An account with nothing selected evaluates every ticker with features.
    everyone = run_signal_cycle(conn, "acct-3", default_params(), NOW)
    assert [o.ticker for o in everyone.outcomes] == ["ABC", "DEF", "GHI"]


def test_cycle_when_features_stale_or_from_the_future_then_not_used(conn):
    insert_features(conn, "OLD", ts=BAR_TS - timedelta(minutes=10))
    insert_features(conn, "NEW", ts=NOW)  # begins at `now`: not complete yet
    result = run_signal_cycle(conn, ACCOUNT, default_params(), NOW)
    by = {o.ticker: o for o in result.outcomes}
    assert by["OLD"].outcome == "stale" and by["OLD"].detail == "STALE_FEATURES: age=605s limit=300s"
    assert by["NEW"].outcome == "no_features"
    assert recommendations(conn) == []


def test_cycle_when_sentiment_in_lookback_then_confidence_moves_by_configured_amounts(conn):
    insert_features(conn, "UP")
    insert_features(conn, "DOWN")
    insert_features(conn, "OLDNEWS")
    conn.execute(
        "INSERT INTO sentiment (ticker, ts, score, confidence, source) VALUES "
        "('UP', %(t)s, 0.6, 0.9, 'news'), ('UP', %(t2)s, 0.2, 0.1, 'news'), "
        "('DOWN', %(t)s, -0.7, 0.8, 'news'), ('OLDNEWS', %(old)s, -0.9, 1, 'news')",
        {"t": NOW - timedelta(minutes=30), "t2": NOW - timedelta(minutes=1), "old": NOW - timedelta(hours=5)})
    # A threshold low enough that every confirmed move is emitted, so each confidence is visible.
    run_signal_cycle(conn, ACCOUNT, as_params({"min_confidence_day_trade": 0.3}), NOW)
    conf = {r["ticker"]: r["confidence"] for r in recommendations(conn)}
    assert conf == {"UP": D("0.65"), "DOWN": D("0.40"), "OLDNEWS": D("0.55")}
    up = next(r for r in recommendations(conn) if r["ticker"] == "UP")
    # Confidence-weighted mean: (0.6*0.9 + 0.2*0.1) / 1.0 = 0.56 over 2 items.
    assert up["reason"]["confidence"]["sentiment_score"] == D("0.56")
    assert up["reason"]["confidence"]["sentiment_n"] == 2


def test_cycle_when_opposing_sentiment_drops_confidence_below_the_strategy_threshold_then_not_emitted(conn):
    insert_features(conn, "DOWN")
    conn.execute("INSERT INTO sentiment (ticker, ts, score, confidence, source) VALUES ('DOWN', %s, -0.7, 0.8, 'news')",
                 (NOW - timedelta(minutes=30),))
    result = run_signal_cycle(conn, ACCOUNT, as_params({"min_confidence_day_trade": 0.55}), NOW)
    assert recommendations(conn) == []
    assert (result.counts["confidence"], result.counts["emitted"]) == (1, 0)


def test_pipeline_when_bars_rise_then_features_and_signal_emit_buy(conn):
    """Bars -> feature computer -> signal engine, with no hand-made features."""
    start = datetime(2026, 3, 10, 13, 30, tzinfo=UTC)  # 09:30 ET
    closes = [D("100") + D("0.02") * i for i in range(55)]
    closes += [closes[-1] + D("0.1") * (k + 1) for k in range(5)]
    rows = [("RISE", start + timedelta(minutes=i), c, c, c, c, 2000 if i == 59 else 1000) for i, c in enumerate(closes)]
    # A twin that drifts up the same way but without the final burst: no confirmed move.
    rows += [("DRIFT", start + timedelta(minutes=i), D("100") + D("0.02") * i, D("100") + D("0.02") * i,
              D("100") + D("0.02") * i, D("100") + D("0.02") * i, 2000 if i == 59 else 1000) for i in range(60)]
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume) "
                        "VALUES (%s, %s, %s, %s, %s, %s, %s)", rows)
    now = start + timedelta(minutes=60, seconds=2)
    assert compute_features(conn, now=now) == 2
    result = run_signal_cycle(conn, ACCOUNT, default_params(), now)
    assert result.counts["emitted"] == 1 and result.counts["momentum"] == 1
    [rec] = recommendations(conn)
    assert (rec["ticker"], rec["action"], rec["bar_ts"]) == ("RISE", "BUY", start + timedelta(minutes=59))
    assert float(rec["reason"]["filters"]["momentum"]["value"]["ret_5m"]) == pytest.approx(float(D("101.58") / D("101.08") - 1))
