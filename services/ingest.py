"""Bar ingestion into lane_telemetry: a CSV loader and the live telemetry task.

Both write 1-minute bars keyed by (ticker, ts), where `ts` is the aware UTC instant the bar's
minute begins, with an upsert: loading the same bars twice changes nothing, and a corrected bar
(the vendor revised it) replaces the stored one.

CSV files (e.g. shared/data/sp500_2019-11-05_08_1min.csv) carry naive US/Eastern wall times:
`2019-11-05 09:30:00` is 14:30 UTC in November (EST) and 13:30 UTC in summer (EDT). The zone
is applied per row, so a file spanning a DST change is read correctly.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import psycopg

log = logging.getLogger(__name__)

BAR = timedelta(minutes=1)
# How far back the telemetry task fetches when a ticker has no stored bars yet.
INITIAL_LOOKBACK = timedelta(hours=12)

# -- stage_bars --
# Bars arrive through COPY into a temporary table, then one upsert moves them: one round trip
# for the data whatever the file size, and the conflict handling stays in SQL.
STAGE_BARS = """
CREATE TEMPORARY TABLE IF NOT EXISTS staged_bars (
    ticker text, ts timestamptz, open numeric, high numeric, low numeric, close numeric, volume numeric
) ON COMMIT DELETE ROWS
"""

# -- upsert_staged_bars --
# Insert new bars, replace revised ones, and leave identical ones untouched (no dead tuples,
# ingested_at keeps the first arrival). Volume may come as "1234.0" from some vendors.
UPSERT_STAGED_BARS = """
INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume)
SELECT ticker, ts, open, high, low, close, round(volume)::bigint FROM staged_bars
ON CONFLICT (ticker, ts) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
    close = EXCLUDED.close, volume = EXCLUDED.volume, ingested_at = now()
WHERE (lane_telemetry.open, lane_telemetry.high, lane_telemetry.low, lane_telemetry.close, lane_telemetry.volume)
      IS DISTINCT FROM (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.volume)
"""

# -- latest_bar_ts --
# The newest stored bar of each ticker: where the telemetry task resumes. One backward probe
# of the (ticker, ts) primary key per ticker.
LATEST_BAR_TS = """
SELECT t.ticker, l.ts
FROM unnest(%(tickers)s::text[]) AS t(ticker)
LEFT JOIN LATERAL (
    SELECT b.ts FROM lane_telemetry b WHERE b.ticker = t.ticker ORDER BY b.ts DESC LIMIT 1
) l ON true
"""

# -- selected_tickers --
# The telemetry task's default universe: every ticker any account has selected.
SELECTED_TICKERS = "SELECT DISTINCT ticker FROM watchlist_state WHERE selected ORDER BY ticker"


class BadBar(ValueError):
    """A bar could not be read (bad number, naive or missing time). Operator action: fix the file."""


class MarketData(Protocol):
    """What the telemetry task needs from the market data adapter (AlpacaMarketData)."""

    def stock_bars(self, symbols: Sequence[str], start: datetime, end: datetime) -> Iterable[Mapping[str, Any]]:
        """1-minute bars as mappings: ticker, ts (aware), open, high, low, close, volume."""
        ...


def _decimal(value: Any, field: str, where: str) -> Decimal:
    try:
        d = Decimal(str(value).strip())
    except (InvalidOperation, ValueError) as e:
        raise BadBar(f"{where}: {field}={value!r} is not a number") from e
    if not d.is_finite():
        raise BadBar(f"{where}: {field}={value!r} is not finite")
    return d


def _write_bars(conn: psycopg.Connection, rows: Iterable[tuple]) -> int:
    """Stage rows (ticker, ts, open, high, low, close, volume) and upsert; return rows written."""
    with conn.transaction():
        conn.execute(STAGE_BARS)
        with conn.cursor() as cur:
            with cur.copy("COPY staged_bars (ticker, ts, open, high, low, close, volume) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(UPSERT_STAGED_BARS)
            return cur.rowcount


def read_csv_bars(path: Path | str, ticker: str, tz: str = "America/New_York") -> list[tuple]:
    """Parse a CSV of 1-minute bars (Date, Open, Close, High, Low, Volume) into rows with UTC ts."""
    zone = ZoneInfo(tz)
    rows: list[tuple] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"Date", "Open", "High", "Low", "Close", "Volume"} - set(reader.fieldnames or [])
        if missing:
            raise BadBar(f"{path}: missing columns {sorted(missing)}")
        for line_no, rec in enumerate(reader, start=2):
            where = f"{path}:{line_no}"
            try:
                wall = datetime.fromisoformat(rec["Date"].strip())
            except ValueError as e:
                raise BadBar(f"{where}: Date={rec['Date']!r} is not a date-time") from e
            if wall.tzinfo is None:
                wall = wall.replace(tzinfo=zone)  # the file's wall time, in the file's zone
            ts = wall.astimezone(timezone.utc)
            rows.append((ticker, ts,
                         _decimal(rec["Open"], "Open", where), _decimal(rec["High"], "High", where),
                         _decimal(rec["Low"], "Low", where), _decimal(rec["Close"], "Close", where),
                         _decimal(rec["Volume"], "Volume", where)))
    return rows


def load_csv(conn: psycopg.Connection, path: Path | str, ticker: str, tz: str = "America/New_York") -> int:
    """Load a CSV of 1-minute bars into lane_telemetry; return the number of bars in the file.

    Idempotent: the upsert leaves identical bars untouched, so a reload writes nothing new.
    """
    rows = read_csv_bars(path, ticker, tz)
    written = _write_bars(conn, rows)
    log.info("csv loaded", extra={"path": str(path), "ticker": ticker, "bars": len(rows), "written": written})
    return len(rows)


def run_telemetry(conn: psycopg.Connection, market_data: MarketData, tickers: Sequence[str],
                  now: datetime) -> int:
    """Fetch the 1-minute bars since each ticker's last stored bar and upsert them.

    One request covers every ticker, from the oldest resume point (bounded by INITIAL_LOOKBACK)
    to `now`. Only complete bars are stored (ts + 60 s <= now): a bar still forming would be
    stored with a partial volume and trigger features on it. Returns the rows written.
    """
    if now.tzinfo is None:
        raise ValueError("naive datetime: run_telemetry needs an aware `now`")
    tickers = sorted(set(tickers))
    if not tickers:
        return 0
    floor = now - INITIAL_LOOKBACK
    latest = {r["ticker"]: r["ts"] for r in conn.execute(LATEST_BAR_TS, {"tickers": tickers})}
    start = min(max(ts + BAR, floor) if ts is not None else floor for ts in latest.values())
    if start >= now:
        return 0
    rows = []
    wanted = set(tickers)
    for bar in market_data.stock_bars(tickers, start, now):
        ts = bar["ts"]
        if not isinstance(ts, datetime) or ts.tzinfo is None:
            raise BadBar(f"bar for {bar.get('ticker')}: ts={ts!r} is not an aware datetime")
        if bar["ticker"] not in wanted or ts + BAR > now:
            continue
        where = f"{bar['ticker']}@{ts.isoformat()}"
        rows.append((bar["ticker"], ts.astimezone(timezone.utc),
                     *(_decimal(bar[k], k, where) for k in ("open", "high", "low", "close", "volume"))))
    written = _write_bars(conn, rows) if rows else 0
    log.info("telemetry fetched", extra={"tickers": len(tickers), "bars": len(rows), "written": written,
                                         "start": start, "end": now})
    return written


# --- command line -----------------------------------------------------------------------------


def _connect_migrated():
    from services.common.db import connect, database_url
    from services.common.migrate import migrate_when_ready

    url = database_url()
    migrate_when_ready(url)
    return url, connect(url, application_name="ingest")


def load_csv_command(args: argparse.Namespace) -> int:
    _, conn = _connect_migrated()
    with conn:
        try:
            n = load_csv(conn, args.file, args.ticker, tz=args.tz)
        except (BadBar, OSError) as e:
            log.error("csv not loaded", extra={"path": args.file, "error": str(e)})
            return 1
    print(f"{n} bars loaded for {args.ticker} from {args.file}")
    return 0


def _market_data_from_settings():
    """The alpaca-py market data adapter, configured from ALPACA_* environment variables."""
    from services.adapters.alpaca.client import AlpacaMarketData  # the alpaca adapter's home
    from services.adapters.alpaca.settings import AlpacaSettings

    return AlpacaMarketData(AlpacaSettings())


def telemetry_command(args: argparse.Namespace) -> int:
    from services.common.clock import SystemClock
    from services.common.db import database_url
    from services.common.migrate import migrate_when_ready
    from services.runtime import run_periodic, stop_on_sigterm
    from services.domain.broker import BrokerUnavailable

    url = database_url()
    migrate_when_ready(url)
    market_data = _market_data_from_settings()
    clock = SystemClock()

    def cycle(conn) -> None:
        tickers = args.tickers.split(",") if args.tickers else [r["ticker"] for r in conn.execute(SELECTED_TICKERS)]
        run_telemetry(conn, market_data, tickers, clock.now())

    # A failed fetch is retried at the next tick from the last stored bar: nothing is lost.
    return run_periodic("telemetry", url, cycle, interval=args.interval, once=args.once, stop=stop_on_sigterm(),
                        retry_on=(BadBar, BrokerUnavailable))
