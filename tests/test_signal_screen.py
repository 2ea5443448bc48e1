"""The replay's screen of the signal rules: rules.could_emit is a necessary condition of an emit.

A replay runs the signal engine only in the minutes where some ticker passes the screen, so a
bar the rules would emit on and the screen refused would be a recommendation lost. Proved on
every bar of the real data (S&P 500 and FXY, with the repo's params and with looser ones that
emit often) and on random features packed at the thresholds, where the rules see the values as
the database returns them (15 significant digits) and the screen sees the doubles.
"""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from services.common.params import as_params, load_params_file
from services.domain.features import PRICE_SCALE, Features
from services.feature_computer.main import stored_rows, write_features
from services.replay import bars_from_csv, plan_session
from services.signal_engine.rules import could_emit, evaluate_signal

DATA = Path(__file__).parent / "data"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def loose(doc: dict | None = None):
    doc = doc or load_params_file().params.model_dump(mode="json")
    doc["signal"].update(min_volume_ratio=1.0, breakout_min_distance_sma20=0.0002, bull_min_ret_5m=0.0003,
                         bull_min_ret_15m=0.0006, bear_max_ret_5m=-0.0003, bear_max_ret_15m=-0.0006)
    return as_params(doc)


def rows_of(f: Features) -> list[dict]:
    """Each bar's features as the signal engine reads them back from the database."""
    return stored_rows(f, range(len(f.ts)))


def emits(f: Features, params) -> np.ndarray:
    return np.array([evaluate_signal(row, None, params).emit for row in rows_of(f)], dtype=bool)


def features_of(path: Path, params, limit: int | None = None) -> Features:
    rows, _ = bars_from_csv([path], tz="UTC" if "FXY" in path.name else "America/New_York")
    rows = [r for r in rows if not r[7]][:limit]
    days: dict = {}
    for r in rows:
        days.setdefault(r[1].date(), []).append(r)
    plans = [plan_session(day, _in_force(params)) for day in days.values()]
    return Features(**{n: np.concatenate([getattr(p.features, n) for p in plans]) for n in Features.__dataclass_fields__})


def _in_force(params):
    from services.common.params import ParamsInForce

    return ParamsInForce(params, "test", None, params.content_hash())


@pytest.mark.parametrize("params", ["repo", "loose"])
def test_every_bar_of_the_sp500_sessions_that_the_rules_emit_on_passes_the_screen(params):
    p = load_params_file().params if params == "repo" else loose()
    f = features_of(DATA / "sp500_2019-11-05_08_1min.csv", p)
    emitted, screened = emits(f, p), could_emit(f, p)
    assert not (emitted & ~screened).any()
    if params == "loose":
        assert emitted.sum() > 20
    # The screen is tight: it passes few bars the rules then refuse.
    assert screened.sum() <= emitted.sum() + 5


@pytest.mark.skipif(not (SHARED / "FXY_2023-07-10_2025-07-08_1min.csv").exists(), reason="../shared/data is absent")
def test_every_bar_of_fxy_that_the_rules_emit_on_passes_the_screen():
    p = loose()
    f = features_of(SHARED / "FXY_2023-07-10_2025-07-08_1min.csv", p, limit=60_000)
    emitted, screened = emits(f, p), could_emit(f, p)
    assert emitted.sum() > 20 and not (emitted & ~screened).any()


def test_random_features_at_the_thresholds_never_emit_outside_the_screen():
    p = load_params_file().params
    s = p.signal
    rng = random.Random(11)
    n = 6000
    close = np.array([rng.choice([100_000_000, 99_990_000, 25_123_456]) for _ in range(n)], np.float64)

    def near(t: float) -> float:
        """At the threshold, a hair either side of it, or anywhere."""
        return rng.choice([t, t * (1 + 1e-15), t * (1 - 1e-15), t + 1e-12, t - 1e-12, rng.uniform(-2 * abs(t), 2 * abs(t))])

    def past(ret: float, c: float) -> float:
        return float(round(c / (1 + ret))) if rng.random() > 0.1 else np.nan

    direction = [rng.choice([1, -1, 0]) for _ in range(n)]
    c5 = np.array([past(near(s.bull_min_ret_5m if d >= 0 else s.bear_max_ret_5m), c) for d, c in zip(direction, close)])
    c15 = np.array([past(near(s.bull_min_ret_15m if d >= 0 else s.bear_max_ret_15m), c) for d, c in zip(direction, close)])
    distance = np.array([near(s.breakout_min_distance_sma20 * (1 if d >= 0 else -1)) for d in direction])
    nan = np.full(n, np.nan)
    f = Features(ts=np.zeros(n), close=close, volume=np.ones(n), prev_close=nan, close_5m_ago=c5, close_15m_ago=c15,
                 sma20=close / (1 + distance) / PRICE_SCALE, sma50=close / (1 + 2 * distance) / PRICE_SCALE,
                 distance_sma20=distance, distance_sma50=nan, recent_vol=nan, baseline_vol=nan, vol_ratio=nan,
                 volume_ratio=np.array([near(s.min_volume_ratio) for _ in range(n)]), volume_surge=nan,
                 trend_state=np.array(direction, np.float64))
    emitted, screened = emits(f, p), could_emit(f, p)
    assert emitted.sum() > 100 and not (emitted & ~screened).any()


def test_the_screen_passes_nothing_when_no_sentiment_could_lift_the_confidence_to_the_threshold():
    doc = load_params_file().params.model_dump(mode="json")
    doc["signal"].update(base_confidence=0.4, sentiment_boost=0.1)
    doc["confidence"]["min_confidence_day_trade"] = 0.55
    p = loose(doc)
    f = features_of(DATA / "sp500_2019-11-05_08_1min.csv", p)
    assert not could_emit(f, p).any() and not emits(f, p).any()


def test_stored_rows_equal_what_the_database_returns_for_the_written_features(conn):
    p = load_params_file()
    rows, _ = bars_from_csv([DATA / "sp500_2019-11-05_08_1min.csv"])
    plan = plan_session([r for r in rows if not r[7] and r[1].day == 6], p)
    write_features(conn, plan.tickers, plan.features)
    columns = ("close", "close_5m_ago", "close_15m_ago", "prev_close", "sma20", "sma50", "distance_sma20",
               "distance_sma50", "recent_vol", "baseline_vol", "vol_ratio", "volume_ratio", "trend_state")
    read = conn.execute(f"SELECT {', '.join(columns)}, volume_surge FROM lane_features ORDER BY ts").fetchall()
    mine = stored_rows(plan.features, np.argsort(plan.features.ts))
    assert len(read) == len(mine) == 390
    for db, ours in zip(read, mine):
        assert {c: db[c] for c in columns} == {c: ours[c] for c in columns}
        assert db["volume_surge"] == (None if ours["volume_surge"] is None else bool(ours["volume_surge"]))
