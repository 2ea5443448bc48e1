"""Bar ingestion into lane_telemetry: a CSV loader and the live telemetry task.

Both write 1-minute bars keyed by (ticker, ts), where `ts` is the aware UTC instant the bar's
minute begins, with an upsert: loading the same bars twice changes nothing, and a corrected bar
(the vendor revised it) replaces the stored one. Each bar is flagged extended_hours when it lies
outside its ET date's regular session (exchange calendar: holidays, early closes), so features
and signals use the session only while the bars themselves are kept.

CSV files come as people have them. Headers are matched case-insensitively with the usual
aliases: the time in one column (timestamp, datetime, date, time, ts...) or in date + time
columns; open/o, high/h, low/l, close/c, volume/v/vol. A time is ISO 8601 with an offset
(`2023-07-10T13:30:00Z`, `...+00:00`), a naive wall time read in `tz` (the S&P 500 file's
`2019-11-05 09:30:00` is US/Eastern: 14:30 UTC in November, 13:30 UTC in summer, the zone applied
per row so a file spanning a DST change is read correctly), or epoch seconds or milliseconds
(told apart by magnitude). The ticker is given, or taken from the file name up to its first
underscore (`FXY_2023-07-10_2025-07-08_1min.csv` -> FXY).

A malformed row is reported with its line number and the file is refused whole (nothing of it
is written) unless the caller skips bad rows; a file with no bars is an error.
"""

from __future__ import annotations

import argparse
import csv
import gzip
import logging
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Protocol
from zoneinfo import ZoneInfo

import psycopg

from services.common.market_calendar import CALENDAR_END, CALENDAR_START, SessionCalendar, et_date, nyse_calendar

log = logging.getLogger(__name__)

BAR = timedelta(minutes=1)
# How far back the telemetry task fetches when a ticker has no stored bars yet.
INITIAL_LOOKBACK = timedelta(hours=12)

# -- stage_bars --
# Bars arrive through COPY into a temporary table, then one upsert moves them: one round trip
# for the data whatever the file size, and the conflict handling stays in SQL.
STAGE_BARS = """
CREATE TEMPORARY TABLE IF NOT EXISTS staged_bars (
    ticker text, ts timestamptz, open numeric, high numeric, low numeric, close numeric, volume numeric,
    extended_hours boolean
) ON COMMIT DELETE ROWS
"""

# -- upsert_staged_bars --
# Insert new bars, replace revised ones, and leave identical ones untouched (no dead tuples,
# ingested_at keeps the first arrival). Volume may come as "1234.0" from some vendors.
_UPSERT_BARS_FROM = """
INSERT INTO lane_telemetry (ticker, ts, open, high, low, close, volume, extended_hours)
SELECT ticker, ts, open, high, low, close, round(volume)::bigint, extended_hours FROM {source}
ON CONFLICT (ticker, ts) DO UPDATE SET
    open = EXCLUDED.open, high = EXCLUDED.high, low = EXCLUDED.low,
    close = EXCLUDED.close, volume = EXCLUDED.volume, extended_hours = EXCLUDED.extended_hours,
    ingested_at = now()
WHERE (lane_telemetry.open, lane_telemetry.high, lane_telemetry.low, lane_telemetry.close, lane_telemetry.volume,
       lane_telemetry.extended_hours)
      IS DISTINCT FROM (EXCLUDED.open, EXCLUDED.high, EXCLUDED.low, EXCLUDED.close, EXCLUDED.volume,
                        EXCLUDED.extended_hours)
"""
UPSERT_STAGED_BARS = _UPSERT_BARS_FROM.format(source="staged_bars")
# -- upsert_bar_arrays --
# The same upsert from parallel arrays, in one statement: a few bars at a time (a replay's minute).
UPSERT_BAR_ARRAYS = _UPSERT_BARS_FROM.format(source=(
    "unnest(%(ticker)s::text[], %(ts)s::timestamptz[], %(open)s::numeric[], %(high)s::numeric[], "
    "%(low)s::numeric[], %(close)s::numeric[], %(volume)s::numeric[], %(extended_hours)s::boolean[]) "
    "AS b(ticker, ts, open, high, low, close, volume, extended_hours)"))

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
    """Stage rows (ticker, ts, open, high, low, close, volume, extended_hours) and upsert; return
    the rows written."""
    with conn.transaction():
        conn.execute(STAGE_BARS)
        with conn.cursor() as cur:
            with cur.copy("COPY staged_bars (ticker, ts, open, high, low, close, volume, extended_hours) "
                          "FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            cur.execute(UPSERT_STAGED_BARS)
            return cur.rowcount


def write_bar_arrays(conn: psycopg.Connection, rows: Sequence[tuple]) -> None:
    """Upsert a few rows (ticker, ts, open, high, low, close, volume, extended_hours) in one
    statement, which a pipeline can send with others in one round trip."""
    columns = list(zip(*rows))
    conn.execute(UPSERT_BAR_ARRAYS, dict(zip(
        ("ticker", "ts", "open", "high", "low", "close", "volume", "extended_hours"), map(list, columns))))


def calendar_for(days: Iterable[date]) -> SessionCalendar:
    """The NYSE calendar covering `days` (the shared default range when it does)."""
    days = list(days)
    if not days or (CALENDAR_START <= min(days) and max(days) <= CALENDAR_END):
        return nyse_calendar()
    return nyse_calendar(min(days) - timedelta(days=7), max(days) + timedelta(days=7))


def outside_session(ts: datetime, calendar: SessionCalendar) -> bool:
    """True when the bar that begins at `ts` is not in its ET date's regular session: before the
    open, at or after the close (the 16:00 closing print of some files too), or on a day without
    a session."""
    session = calendar.session_on(et_date(ts))
    return session is None or not session.open <= ts < session.close


# --- CSV files --------------------------------------------------------------------------------

# Header aliases, matched after lower-casing and trimming. The time column: the first of these
# present; a file with separate date and time columns has them joined.
TIME_COLUMNS = ("timestamp", "datetime", "date_time", "date/time", "ts", "t")
PRICE_COLUMNS = {
    "open": ("open", "o"),
    "high": ("high", "h"),
    "low": ("low", "l"),
    "close": ("close", "c"),
    "volume": ("volume", "v", "vol"),
}
# Epoch numbers: seconds below 1e11 (year 5138), milliseconds below 1e14, and so on.
_EPOCH_UNITS = ((10**11, 1), (10**14, 10**3), (10**17, 10**6), (Decimal("Infinity"), 10**9))
_EPOCH_ZERO = datetime(1970, 1, 1, tzinfo=timezone.utc)
_EPOCH = re.compile(r"^[+-]?\d+(\.\d*)?$")
_TICKER = re.compile(r"^[A-Z0-9][A-Z0-9.\-]{0,20}$")
MAX_REPORTED = 20


class BadFile(BadBar):
    """A file that cannot be loaded as it is: the message lists each malformed row by line."""


@dataclass
class CsvBars:
    """A file read: its bars as rows for lane_telemetry and the rows refused, by line number."""

    path: Path
    ticker: str
    rows: list[tuple] = field(default_factory=list)
    bad: list[str] = field(default_factory=list)
    extended: int = 0


def ticker_from_name(path: Path | str) -> str:
    """FXY_2023-07-10_2025-07-08_1min.csv -> FXY; aapl.csv.gz -> AAPL."""
    name = Path(path).name
    stem = re.sub(r"(\.csv)?(\.gz)?$", "", name, flags=re.IGNORECASE)
    ticker = re.split(r"[_\s]", stem, maxsplit=1)[0].upper()
    if not _TICKER.match(ticker):
        raise BadFile(f"{path}: no ticker in the file name {name!r}; pass --ticker")
    return ticker


def _columns(path: Path | str, header: Sequence[str] | None) -> tuple[list[int], dict[str, int]]:
    """Positions of the time column(s) and of each price column, or BadFile naming what is missing."""
    names = [h.strip().strip('"').lstrip("\ufeff").strip().lower() for h in header or []]
    where = {n: i for i, n in reversed(list(enumerate(names)))}
    time_cols = next(([where[a]] for a in TIME_COLUMNS if a in where), None)
    if time_cols is None:
        if "date" in where and "time" in where:
            time_cols = [where["date"], where["time"]]
        elif "date" in where or "time" in where:
            time_cols = [where.get("date", where.get("time"))]
    prices = {k: next((where[a] for a in aliases if a in where), None) for k, aliases in PRICE_COLUMNS.items()}
    missing = [k for k, i in prices.items() if i is None]
    if time_cols is None:
        missing.insert(0, "time (timestamp, datetime, date, time)")
    if missing:
        raise BadFile(f"{path}: missing columns {missing} in header {list(header or [])}")
    return time_cols, prices  # type: ignore[return-value]


def parse_time(text: str, zone: ZoneInfo) -> datetime:
    """An aware UTC datetime from ISO 8601 (offset or naive in `zone`) or epoch s/ms/us/ns."""
    text = text.strip()
    if _EPOCH.match(text):
        value = Decimal(text)
        seconds = value / next(scale for limit, scale in _EPOCH_UNITS if abs(value) < limit)
        whole = int(seconds)  # exact: a float would turn 13:30:00 into 13:29:59.999999
        return _EPOCH_ZERO + timedelta(seconds=whole, microseconds=int((seconds - whole) * 1_000_000))
    wall = datetime.fromisoformat(text)
    if wall.tzinfo is None:
        wall = wall.replace(tzinfo=zone)  # the file's wall time, in the file's zone
    return wall.astimezone(timezone.utc)


def _open_text(path: Path):
    return gzip.open(path, "rt", newline="") if path.suffix.lower() == ".gz" else open(path, newline="")


def read_csv_file(path: Path | str, ticker: str | None = None, tz: str = "America/New_York",
                  calendar: SessionCalendar | None = None) -> CsvBars:
    """Read a CSV of 1-minute bars; malformed rows are collected in `.bad` with their line numbers.

    Raises BadFile when the header lacks a column (nothing can be read then).
    """
    path = Path(path)
    ticker = ticker or ticker_from_name(path)
    zone = ZoneInfo(tz)
    out = CsvBars(path=path, ticker=ticker)
    seen: dict[datetime, int] = {}
    parsed: list[tuple[int, tuple]] = []
    with _open_text(path) as f:
        reader = csv.reader(f)
        header = next(reader, None)
        time_cols, prices = _columns(path, header)
        label = {k: header[i].strip() for k, i in prices.items()}  # messages name the file's own columns
        width = max([*time_cols, *prices.values()]) + 1
        for record in reader:
            line_no = reader.line_num
            where = f"{path}:{line_no}"
            if not any(v.strip() for v in record):
                continue  # a blank line, e.g. at the end
            if len(record) < width:
                out.bad.append(f"{where}: {len(record)} fields, expected at least {width}")
                continue
            raw_time = " ".join(record[i].strip() for i in time_cols)
            try:
                ts = parse_time(raw_time, zone)
                o, h, lo, c, v = (_decimal(record[prices[k]], label[k], where) for k in PRICE_COLUMNS)
            except BadBar as e:
                out.bad.append(str(e))
                continue
            except (ValueError, OverflowError, OSError):
                out.bad.append(f"{where}: time={raw_time!r} is not a date-time")
                continue
            problem = (
                "not on a minute boundary" if ts.second or ts.microsecond else
                "a price is not positive" if min(o, h, lo, c) <= 0 else
                f"high={h} is below low={lo}" if h < lo else
                f"volume={v} is negative" if v < 0 else
                f"duplicate of line {seen[ts]}" if ts in seen else None
            )
            if problem:
                out.bad.append(f"{where}: {problem}")
                continue
            seen[ts] = line_no
            parsed.append((line_no, (ticker, ts, o, h, lo, c, v)))
    if parsed:
        calendar = calendar or calendar_for(et_date(row[1]) for _, row in (parsed[0], parsed[-1]))
        for _, row in parsed:
            extended = outside_session(row[1], calendar)
            out.extended += extended
            out.rows.append((*row, extended))
    return out


def read_csv_bars(path: Path | str, ticker: str, tz: str = "America/New_York") -> list[tuple]:
    """The rows of a CSV (ticker, ts, open, high, low, close, volume, extended_hours); BadFile on
    any malformed row."""
    bars = read_csv_file(path, ticker, tz)
    if bars.bad:
        raise BadFile(_bad_report(bars))
    return bars.rows


def _bad_report(bars: CsvBars) -> str:
    more = len(bars.bad) - MAX_REPORTED
    return "\n".join(bars.bad[:MAX_REPORTED] + ([f"{bars.path}: ... and {more} more malformed rows"] if more > 0 else []))


@dataclass(frozen=True)
class LoadResult:
    path: Path
    ticker: str
    bars: int          # bars read from the file (and loaded)
    written: int       # of which new or changed in lane_telemetry
    extended: int      # of which outside the regular session (kept, flagged)
    skipped: int       # malformed rows left out (only with skip_bad)


def load_csv_file(conn: psycopg.Connection, path: Path | str, ticker: str | None = None,
                  tz: str = "America/New_York", skip_bad: bool = False,
                  calendar: SessionCalendar | None = None) -> LoadResult:
    """Load one CSV into lane_telemetry. BadFile when a row is malformed (unless skip_bad: the
    rest loads and the count of skipped rows is returned) or when the file has no bars."""
    bars = read_csv_file(path, ticker, tz, calendar)
    if bars.bad and not skip_bad:
        raise BadFile(_bad_report(bars))
    if not bars.rows:
        raise BadFile(f"{path}: no bars loaded" + (f" ({len(bars.bad)} malformed rows)" if bars.bad else ""))
    written = _write_bars(conn, bars.rows)
    result = LoadResult(Path(path), bars.ticker, len(bars.rows), written, bars.extended, len(bars.bad))
    log.info("csv loaded", extra={"path": str(path), "ticker": bars.ticker, "bars": result.bars,
                                  "written": written, "extended_hours": bars.extended, "skipped": result.skipped})
    return result


def load_csv(conn: psycopg.Connection, path: Path | str, ticker: str | None = None,
             tz: str = "America/New_York") -> int:
    """Load a CSV of 1-minute bars into lane_telemetry; return the number of bars in the file.

    Idempotent: the upsert leaves identical bars untouched, so a reload writes nothing new.
    """
    return load_csv_file(conn, path, ticker, tz).bars


def csv_paths(paths: Sequence[Path | str]) -> Iterator[Path]:
    """Files as given, and a folder's *.csv / *.csv.gz in name order."""
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.is_file() and re.search(r"\.csv(\.gz)?$", f.name, re.I))
            if not found:
                raise BadFile(f"{p}: no .csv files in this folder")
            yield from found
        else:
            yield p


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
    if rows:
        calendar = calendar_for({et_date(rows[0][1]), et_date(rows[-1][1])})
        rows = [(*r, outside_session(r[1], calendar)) for r in rows]
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
    """Load every file; exit 1 when any file was refused or loaded nothing (the others still load)."""
    try:
        paths = list(csv_paths(args.files))
    except BadFile as e:
        print(f"error: {e}")
        return 1
    if args.ticker and len(paths) > 1:
        print("error: --ticker names the ticker of ONE file; with several, each file's name gives its ticker")
        return 2
    _, conn = _connect_migrated()
    failed = 0
    with conn:
        for path in paths:
            try:
                r = load_csv_file(conn, path, args.ticker, tz=args.tz, skip_bad=args.skip_bad)
            except (BadBar, OSError, UnicodeDecodeError, csv.Error) as e:
                failed += 1
                log.error("csv not loaded", extra={"path": str(path), "error": str(e)})
                print(f"error: {e}")
                continue
            notes = [f"{r.written} new or changed"]
            if r.extended:
                notes.append(f"{r.extended} outside the regular session, kept and flagged")
            if r.skipped:
                notes.append(f"{r.skipped} malformed rows skipped")
            print(f"{r.bars} bars loaded for {r.ticker} from {path} ({', '.join(notes)})")
    return 1 if failed else 0


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
