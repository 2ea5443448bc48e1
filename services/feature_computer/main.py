"""The feature computer: bars in lane_telemetry -> one lane_features row per ticker and bar.

A cycle writes the features of each ticker's latest complete bar (definitions: the pure
services/domain/features.py). A bar that began at `ts` is complete at ts + 60 s, so with `now`
given only bars with ts <= now - 60 s count: a replay that has a whole day of bars loaded never
computes from a bar still in the future. Writes are upserts that leave unchanged rows as they
were, so cycles are idempotent and the returned count is the number of rows written.

The cycle is incremental. `FeatureCycle` keeps each ticker's window (its last LOOKBACK_BARS
bars of the session day) in memory; a cycle reads lane_bar_heads (each ticker's newest bar and
revision, kept by triggers on lane_telemetry), then reads only the new bars of the tickers that
have any, computes those tickers together and writes their rows. A ticker whose history was
revised (a corrected, deleted or late bar) has its window read again. A cycle with nothing new
is that one read of ~500 small rows.

`backfill_features` computes every bar of a time range (replays, tests, after a bulk load) with
the same definitions over the same windows.
"""

from __future__ import annotations

import argparse
import logging
import struct
import threading
import time
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import numpy as np
import psycopg
from psycopg import pq
from psycopg.adapt import Dumper, Loader
from psycopg.rows import tuple_row

from services.domain.features import (LOOKBACK_BARS, PRICE_SCALE, Features, Windows, bar_windows, session_groups,
                                      window_features)
from services.feature_computer import features as q

log = logging.getLogger(__name__)

BAR = timedelta(minutes=1)
DEFAULT_INTERVAL_SECONDS = 5.0
# No cutoff: every bar in the table counts (a loader that has just written completed bars).
NO_CUTOFF = "infinity"
# Rows per write statement in a backfill (bounds the parameters' size).
BACKFILL_CHUNK = 20_000
_RELOAD = float("-inf")
_PRICE_DIGITS = len(str(PRICE_SCALE)) - 1  # PRICE_SCALE = 10**_PRICE_DIGITS


class FeatureCycle:
    """The incremental cycle's state: each ticker's window, newest bar and revision seen.

    One instance per loop; a fresh instance's first cycle reads every ticker's window (a full
    cycle), later ones read only what is new. Not shared between threads.
    """

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}       # ticker -> row of the arrays below
        self._revision: dict[str, int] = {}   # ticker -> lane_bar_heads.revision its window reflects
        cap = 64
        self._ts = np.zeros((cap, LOOKBACK_BARS), np.int64)
        self._close = np.zeros((cap, LOOKBACK_BARS), np.int64)
        self._volume = np.zeros((cap, LOOKBACK_BARS), np.int64)
        self._n = np.zeros(cap, np.int64)        # bars held (right-aligned)
        self._day = np.full(cap, -1, np.int64)   # ET session day of the held bars
        self._last = np.full(cap, -np.inf)       # newest bar held (epoch s), -inf when none

    def _slot_of(self, ticker: str) -> int:
        i = self._slot.get(ticker)
        if i is None:
            i = self._slot[ticker] = len(self._slot)
            if i == len(self._n):
                grow = len(self._n)
                self._ts, self._close, self._volume = (np.vstack([a, np.zeros_like(a)])
                                                       for a in (self._ts, self._close, self._volume))
                self._n = np.r_[self._n, np.zeros(grow, np.int64)]
                self._day = np.r_[self._day, np.full(grow, -1, np.int64)]
                self._last = np.r_[self._last, np.full(grow, -np.inf)]
        return i

    def run(self, conn: psycopg.Connection, now: datetime | None = None,
            tickers: Sequence[str] | None = None) -> int:
        """One cycle; returns the rows written (see compute_features)."""
        if now is not None and now.tzinfo is None:
            raise ValueError("naive datetime: compute_features needs an aware `now`")
        cutoff = NO_CUTOFF if now is None else now - BAR
        cutoff_s = np.inf if now is None else cutoff.timestamp()
        with _arrays_cursor(conn) as cur:
            names, latest, revision = cur.execute(
                q.BAR_HEADS, {"tickers": list(tickers) if tickers is not None else None}).fetchone()
            wanted, since, reload, revisions = [], [], [], {}
            for ticker, last, rev in zip(names or (), latest.tolist() if names else (),
                                         revision.tolist() if names else ()):
                i = self._slot.get(ticker)
                if i is None or self._revision.get(ticker) != rev:
                    wanted.append(ticker), since.append(_RELOAD), reload.append(True)
                    revisions[ticker] = rev
                elif last > self._last[i] and self._last[i] < cutoff_s:
                    wanted.append(ticker), since.append(float(self._last[i])), reload.append(False)
            if not wanted:
                return 0
            cur.adapters.register_dumper(_Float8s, _Float8sDumper)
            bars = cur.execute(q.NEW_BARS, {"tickers": "\n".join(wanted), "cutoff": cutoff,
                                            "since": np.array(since, np.float64).view(_Float8s)}).fetchone()
        try:
            written = self._apply(conn, wanted, reload, bars)
        except BaseException:
            # The windows may be ahead of what was written: read these tickers afresh next time,
            # so a failed write is retried rather than taken for done.
            for ticker in wanted:
                self._revision.pop(ticker, None)
            raise
        self._revision.update(revisions)
        return written

    def _apply(self, conn: psycopg.Connection, wanted: list[str], reload: list[bool], bars: tuple) -> int:
        # A window read afresh that found no bar (all revised away, or none complete yet) holds
        # nothing: a later append must not extend what it held before.
        found = set(bars[0].tolist()) if bars[0] is not None else set()
        for k, ticker in enumerate(wanted):
            if reload[k] and k not in found and ticker in self._slot:
                i = self._slot[ticker]
                self._n[i], self._day[i], self._last[i] = 0, -1, -np.inf
        if bars[0] is None:
            return 0
        order = np.lexsort((bars[1], bars[0]))  # by ticker, then time
        slots, got = self._extend(wanted, reload, *(a[order] for a in bars))
        return write_features(conn, [wanted[k] for k in got], window_features(Windows(
            ts=self._ts[slots], close=self._close[slots], volume=self._volume[slots], n=self._n[slots])))

    def _extend(self, wanted: list[str], reload: list[bool], ord_: np.ndarray, ts: np.ndarray,
                close: np.ndarray, volume: np.ndarray, day: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Append the new bars (oldest first per ticker, `ord_` the ticker's position in `wanted`)
        to the windows; return the slots that changed and the positions in `wanted` they came from."""
        counts = np.bincount(ord_, minlength=len(wanted))
        got = np.flatnonzero(counts)
        slots = np.array([self._slot_of(wanted[k]) for k in got], np.int64)
        ends = np.cumsum(counts)[got] - 1           # each ticker's newest new bar
        reloaded = np.array(reload)[got]
        # The common case, one new bar appended to a held window, in one vectorized step.
        one = (counts[got] == 1) & ~reloaded
        s, e = slots[one], ends[one]
        same_day = self._day[s] == day[e]
        for a, new in ((self._ts, ts), (self._close, close), (self._volume, volume)):
            a[s, :-1] = a[s, 1:]
            a[s, -1] = new[e]
        self._n[s] = np.where(same_day, np.minimum(self._n[s] + 1, LOOKBACK_BARS), 1)
        self._day[s] = day[e]
        self._last[s] = ts[e]
        for j in np.flatnonzero(~one):
            i, last = slots[j], ends[j]
            first = last - counts[got[j]] + 1
            keep = first + np.flatnonzero(day[first:last + 1] == day[last])  # the newest bar's day only
            held = 0 if reloaded[j] or self._day[i] != day[last] else int(self._n[i])
            for a, new in ((self._ts, ts), (self._close, close), (self._volume, volume)):
                merged = np.r_[a[i, LOOKBACK_BARS - held:], new[keep]][-LOOKBACK_BARS:]
                a[i, LOOKBACK_BARS - len(merged):] = merged
            self._n[i] = min(held + len(keep), LOOKBACK_BARS)
            self._day[i] = day[last]
            self._last[i] = ts[last]
        return slots, got


class _Float8s(np.ndarray):
    """A float64 column sent as a float8[] in Postgres's binary format, built by numpy at once:
    psycopg would otherwise adapt a list element by element."""


class _Int8s(np.ndarray):
    """The same for an int64 column (int8[])."""


class _Numerics(np.ndarray):
    """A numeric[] column already packed by `_numerics` (one fixed-size record per element)."""


class _ArrayDumper(Dumper):
    format = pq.Format.BINARY
    elem_oid = 0
    big_endian = ""

    def dump(self, obj) -> bytes:
        # Header: ndim, has-nulls, element type, length, lower bound; then (size, value) pairs.
        # NULLs travel as NaN (the statement maps them back), so every element has a fixed size.
        body = np.empty(len(obj), dtype=[("size", ">i4"), ("value", self.big_endian)])
        body["size"] = np.dtype(self.big_endian).itemsize
        body["value"] = obj
        return struct.pack(">iiiii", 1, 0, self.elem_oid, len(obj), 1) + body.tobytes()


class _Float8sDumper(_ArrayDumper):
    oid, elem_oid, big_endian = 1022, 701, ">f8"


class _Int8sDumper(_ArrayDumper):
    oid, elem_oid, big_endian = 1016, 20, ">i8"


# Postgres's binary numeric: ndigits, weight, sign, dscale, then base-10000 digits, most
# significant first. Five digits hold any 15 significant decimal digits at any alignment.
_NUMERIC_DIGITS = 5
_NUMERIC = np.dtype([("ndigits", ">i2"), ("weight", ">i2"), ("sign", ">u2"), ("dscale", ">i2"),
                     ("digits", ">i2", (_NUMERIC_DIGITS,))])
_NUMERIC_NAN, _NUMERIC_NEG = 0xC000, 0x4000


class _NumericsDumper(_ArrayDumper):
    oid, elem_oid, big_endian = 1231, 1700, _NUMERIC


def _numerics(mantissa: np.ndarray, exponent: np.ndarray, nan: np.ndarray) -> np.ndarray:
    """Pack value = mantissa * 10**exponent (|mantissa| < 10**15, int64) as binary numerics,
    NaN where `nan`. The display scale drops trailing zeros, as Postgres prints a double."""
    m = np.abs(mantissa)
    zero = (m == 0) | nan
    m = np.where(zero, 1, m)
    e = exponent.astype(np.int64)
    for digits in (8, 4, 2, 1):  # strip up to 15 trailing zeros: 3.10 -> 31 * 10**-1, shown as 3.1
        tens = m % 10 ** digits == 0
        m, e = np.where(tens, m // 10 ** digits, m), np.where(tens, e + digits, e)
    shift = e % 4  # align the last digit on a power of 10000
    m, base = m * 10 ** shift, (e - shift) // 4
    out = np.zeros(len(m), _NUMERIC)
    groups = np.stack([(m // 10000 ** (_NUMERIC_DIGITS - 1 - k)) % 10000 for k in range(_NUMERIC_DIGITS)], axis=1)
    out["ndigits"] = _NUMERIC_DIGITS  # always: the element size is fixed (zeros are stripped on receipt)
    out["weight"] = np.where(zero, 0, base + _NUMERIC_DIGITS - 1)
    out["sign"] = np.where(nan, _NUMERIC_NAN, np.where(mantissa < 0, _NUMERIC_NEG, 0))
    out["dscale"] = np.where(zero, 0, np.maximum(0, -e))
    out["digits"] = np.where(zero[:, None], 0, groups)
    return out.view(_Numerics)


def _doubles_as_numerics(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Doubles as (mantissa, exponent) with 15 significant digits, as Postgres prints them."""
    a = np.where(np.isnan(x) | (x == 0), 1.0, np.abs(x))
    e = np.floor(np.log10(a)).astype(np.int64) - 14
    m = np.rint(a / 10.0 ** e).astype(np.int64)
    over = m >= 10 ** 15  # 9.999...5 rounds up a digit
    m, e = np.where(over, np.rint(m / 10).astype(np.int64), m), np.where(over, e + 1, e)
    return np.where(x == 0, 0, np.where(x < 0, -m, m)), e


def _numeric_columns(f: Features) -> dict[str, np.ndarray]:
    """Every numeric column of the rows, packed in one pass (numpy's cost is per call, not per
    element): prices exact from PRICE_SCALE units, derived values with 15 significant digits."""
    prices = np.concatenate([getattr(f, c) for c in q.PRICE_ARRAYS])
    values = np.concatenate([getattr(f, c) for c in q.VALUE_ARRAYS])
    m, e = _doubles_as_numerics(values)
    packed = _numerics(np.r_[np.where(np.isnan(prices), 0, prices).astype(np.int64), m],
                       np.r_[np.full(len(prices), -_PRICE_DIGITS), e],
                       np.r_[np.isnan(prices), np.isnan(values)])
    k = len(f.ts)
    return {c: packed[i * k:(i + 1) * k] for i, c in enumerate((*q.PRICE_ARRAYS, *q.VALUE_ARRAYS))}


def stored_rows(f: Features, index: Sequence[int], columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows at `index` as the database holds them once written (and the signal engine reads
    them): prices exact, derived values with the writer's 15 significant digits, NaN as None,
    the flags as numbers; only `columns` when given. For what decides from features without a
    round trip (a benchmark)."""
    idx = np.asarray(index, np.int64)
    sub = f.take(idx)
    wanted = set(columns) if columns is not None else None
    out: list[dict[str, Any]] = [{} for _ in idx]
    for c in q.PRICE_ARRAYS:
        if wanted is None or c in wanted:
            for row, x in zip(out, getattr(sub, c).tolist()):
                row[c] = None if x != x else Decimal(int(x)).scaleb(-_PRICE_DIGITS)
    for c in q.VALUE_ARRAYS:
        if wanted is None or c in wanted:
            values = getattr(sub, c)
            m, e = _doubles_as_numerics(values)
            for row, x, mi, ei in zip(out, values.tolist(), m.tolist(), e.tolist()):
                row[c] = None if x != x else Decimal(mi).scaleb(ei)
    for c in q.FLAG_ARRAYS:
        if wanted is None or c in wanted:
            for row, x in zip(out, getattr(sub, c).tolist()):
                row[c] = None if x != x else int(x)
    return out


class _Int8sLoader(Loader):
    """int8[] in binary straight into a numpy array (no NULL elements in the queries using it)."""

    format = pq.Format.BINARY

    def load(self, data) -> np.ndarray:
        ndim = struct.unpack_from(">i", data)[0]
        if ndim == 0:
            return np.zeros(0, np.int64)
        body = np.frombuffer(data, dtype=[("size", ">i4"), ("value", ">i8")], offset=12 + 8 * ndim)
        return body["value"].astype(np.int64)


def _arrays_cursor(conn: psycopg.Connection) -> psycopg.Cursor:
    cur = conn.cursor(binary=True, row_factory=tuple_row)
    cur.adapters.register_loader(1016, _Int8sLoader)  # int8[]
    return cur


def write_features(conn: psycopg.Connection, tickers: Sequence[str], f: Features) -> int:
    """Upsert the rows of `f`, the i-th for tickers[i]; return the rows written (changed)."""
    params = {"ticker": "\n".join(tickers), "ts": np.asarray(f.ts, np.int64).view(_Int8s),
              "volume": f.volume.astype(np.int64).view(_Int8s),
              **_numeric_columns(f),
              **{c: np.asarray(getattr(f, c), np.float64).view(_Float8s) for c in q.FLAG_ARRAYS}}
    with conn.cursor() as cur:
        for kind, dumper in ((_Float8s, _Float8sDumper), (_Int8s, _Int8sDumper), (_Numerics, _NumericsDumper)):
            cur.adapters.register_dumper(kind, dumper)
        return cur.execute(q.UPSERT_FEATURES, params).rowcount


def compute_features(conn: psycopg.Connection, now: datetime | None = None,
                     tickers: Sequence[str] | None = None, cycle: FeatureCycle | None = None) -> int:
    """Upsert the features of each ticker's latest complete bar; return the rows written.

    now: bars count when complete by `now` (ts + 60 s <= now); None means every bar stored.
    tickers: restrict the cycle to these tickers; None means every ticker with bars.
    cycle: the loop's FeatureCycle, to compute only what is new since its last cycle; None
    computes every ticker (still writing only rows whose values changed).
    """
    return (cycle or FeatureCycle()).run(conn, now, tickers)


def backfill_features(conn: psycopg.Connection, start: datetime, end: datetime,
                      tickers: Sequence[str] | None = None) -> int:
    """Upsert the features of every bar with start <= ts < end; return the rows written."""
    if start.tzinfo is None or end.tzinfo is None:
        raise ValueError("naive datetime: backfill_features needs aware bounds")
    with _arrays_cursor(conn) as cur:
        per_ticker = cur.execute(q.RANGE_BARS, {
            "start": start, "end": end, "tickers": list(tickers) if tickers is not None else None}).fetchall()
    if not per_ticker:
        return 0
    names = [r[0] for r in per_ticker]
    ticker_of = np.repeat(np.arange(len(names)), [len(r[1]) for r in per_ticker])
    ts, close, volume, day = (np.concatenate([r[k] for r in per_ticker]) for k in range(1, 5))
    order = np.lexsort((ts, ticker_of))
    ticker_of, ts, close, volume, day = (a[order] for a in (ticker_of, ts, close, volume, day))
    group = session_groups(ticker_of, day)
    written = 0
    wanted = np.flatnonzero(ts >= start.timestamp())  # earlier bars of the day only fill windows
    for lo in range(0, len(wanted), BACKFILL_CHUNK):
        idx = wanted[lo:lo + BACKFILL_CHUNK]
        f = window_features(bar_windows(ts, close, volume, group, idx))
        written += write_features(conn, [names[i] for i in ticker_of[idx]], f)
    return written


def run_loop(conninfo: str, *, interval: float = DEFAULT_INTERVAL_SECONDS, once: bool = False,
             stop: threading.Event | None = None, clock=None) -> int:
    """Compute a cycle every `interval` seconds until `stop` is set (or once)."""
    from services.common.clock import SystemClock
    from services.runtime import run_periodic

    clock = clock or SystemClock()
    state = FeatureCycle()

    def cycle(conn) -> None:
        started = time.monotonic()
        rows = compute_features(conn, now=clock.now(), cycle=state)
        log.info("features computed", extra={"rows": rows, "ms": round((time.monotonic() - started) * 1000, 1)})

    return run_periodic("feature-computer", conninfo, cycle, interval=interval, once=once, stop=stop)


def run_command(args: argparse.Namespace) -> int:
    from services.common.db import database_url
    from services.common.migrate import migrate_when_ready

    url = database_url()
    migrate_when_ready(url)
    from services.runtime import stop_on_sigterm

    return run_loop(url, interval=args.interval, once=args.once, stop=stop_on_sigterm())
