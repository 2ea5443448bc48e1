"""The feature values pinned before the incremental cycle replaced the SQL one, and their inputs.

Two markets: the four real S&P 500 sessions of tests/data/sp500_2019-11-05_08_1min.csv, and a
seeded synthetic one built to reach the definitions' edges (gaps and a 5-minute hole, a thin
ticker with most minutes missing, flat stretches where close = sma20 = sma50 and the returns
have no spread, zero volumes, two sessions so that no window may reach into the previous day).

The stored rows were computed by the cycle as it ran in production then (one SQL statement per
minute, the latest complete bar of every ticker) and checked equal to its every-bar backfill
before being written. Regenerate only to pin a deliberate change of a definition:

    python -m tests.feature_fixture --write      (from a checkout whose cycle is to be pinned)
"""

from __future__ import annotations

import csv
import gzip
import io
import random
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from pathlib import Path
from zoneinfo import ZoneInfo

DATA = Path(__file__).resolve().parent / "data"
SP500_CSV = DATA / "sp500_2019-11-05_08_1min.csv"
FIXTURE = {"sp500": DATA / "features_sp500.csv.gz", "synthetic": DATA / "features_synthetic.csv.gz"}
ET = ZoneInfo("America/New_York")
UTC = timezone.utc

VALUE_COLUMNS = ("session_day", "close", "volume", "prev_close", "close_5m_ago", "close_15m_ago",
                 "sma20", "sma50", "distance_sma20", "distance_sma50", "recent_vol", "baseline_vol",
                 "vol_ratio", "volume_ratio", "volume_surge", "trend_state", "short_inputs")
SYNTHETIC_DAYS = (date(2026, 3, 9), date(2026, 3, 10))


def synthetic_bars(seed: int = 20260310) -> list[tuple[str, datetime, Decimal, int]]:
    """(ticker, ts, close, volume) of the synthetic market, sorted by ticker then ts."""
    rng = random.Random(seed)
    out = []
    kinds = {"RW1": "walk", "RW2": "walk", "GAPS": "gaps", "THIN": "thin", "FLAT": "flat", "ZVOL": "zero_volume"}
    for ticker, kind in kinds.items():
        price = Decimal(rng.choice(["12.34", "98.76", "250.00", "1234.5"]))
        for day in SYNTHETIC_DAYS:
            hole = rng.randrange(30, 350)
            for m in range(390):
                ts = datetime.combine(day, time(9, 30), tzinfo=ET).astimezone(UTC) + timedelta(minutes=m)
                if kind == "flat" and (m // 60) % 2 == 0:
                    pass  # an hour at a time without a tick: close = sma20 = sma50, no return spread
                else:
                    price = max(Decimal("0.01"), (price * Decimal(str(1 + rng.gauss(0, 0.002)))).quantize(Decimal("0.01")))
                volume = rng.randint(100, 60_000)
                if kind == "zero_volume" and rng.random() < 0.3:
                    volume = 0
                if kind == "gaps" and (rng.random() < 0.08 or hole <= m < hole + 5):
                    continue
                if kind == "thin" and rng.random() < 0.6:
                    continue
                out.append((ticker, ts, price, volume))
    return out


def sp500_bars() -> list[tuple[str, datetime, Decimal, int]]:
    out = []
    with open(SP500_CSV, newline="") as f:
        for rec in csv.DictReader(f):
            ts = datetime.fromisoformat(rec["Date"]).replace(tzinfo=ET).astimezone(UTC)
            out.append(("SPX", ts, Decimal(rec["Close"]), int(Decimal(rec["Volume"]))))
    return out


def insert(conn, bars) -> None:
    with conn.cursor() as cur, cur.copy(
            "COPY lane_telemetry (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
        for ticker, ts, close, volume in bars:
            copy.write_row((ticker, ts, close, close, close, close, volume))


def _text(v) -> str:
    if v is None:
        return ""
    if isinstance(v, list):
        return "|".join(v)
    return str(v)


def read_fixture(name: str) -> dict[tuple[str, datetime], dict[str, str]]:
    """The pinned rows as text, keyed by (ticker, ts); an empty string is NULL."""
    with gzip.open(FIXTURE[name], "rt", newline="") as f:
        return {(r["ticker"], datetime.fromisoformat(r["ts"])): r for r in csv.DictReader(f)}


def stored_rows(conn) -> dict[tuple[str, datetime], dict[str, str]]:
    """lane_features as the same text shape as the fixture."""
    rows = conn.execute(f"SELECT ticker, ts, {', '.join(VALUE_COLUMNS)} FROM lane_features ORDER BY ticker, ts")
    return {(r["ticker"], r["ts"]): {"ticker": r["ticker"], "ts": r["ts"].isoformat(),
                                     **{c: _text(r[c]) for c in VALUE_COLUMNS}} for r in rows}


def _write(name: str, rows: dict) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=("ticker", "ts", *VALUE_COLUMNS), lineterminator="\n")
    w.writeheader()
    for key in sorted(rows):
        w.writerow(rows[key])
    with gzip.GzipFile(FIXTURE[name], "wb", mtime=0) as f:
        f.write(buf.getvalue().encode())


def main() -> None:
    import argparse
    import tempfile

    import psycopg

    from services.common import db as dbmod
    from services.common.migrate import migrate
    from services.feature_computer.main import backfill_features, compute_features

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--write", action="store_true", help="overwrite the fixture files")
    args = ap.parse_args()
    server = dbmod.embedded_server(Path(tempfile.mkdtemp(prefix="ops-fixture-")) / "data", cleanup_mode="delete")
    for name, bars in (("sp500", sp500_bars()), ("synthetic", synthetic_bars())):
        with psycopg.connect(server.get_uri("postgres"), autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS fx_{name}")
            admin.execute(f"CREATE DATABASE fx_{name}")
        url = server.get_uri(f"fx_{name}")
        migrate(url)
        with dbmod.connect(url) as conn:
            insert(conn, bars)
            for minute in sorted({ts for _, ts, _, _ in bars}):
                compute_features(conn, now=minute + timedelta(minutes=1))
            live = stored_rows(conn)
            conn.execute("DELETE FROM lane_features")
            backfill_features(conn, min(ts for _, ts, _, _ in bars) - timedelta(days=1),
                              max(ts for _, ts, _, _ in bars) + timedelta(days=1))
            assert stored_rows(conn) == live, f"{name}: the live cycle and the backfill disagree"
        assert len(live) == len(bars), (name, len(live), len(bars))
        print(f"{name}: {len(live)} rows")
        if args.write:
            _write(name, live)


if __name__ == "__main__":
    main()
