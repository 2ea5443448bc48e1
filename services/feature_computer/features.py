"""The feature computer's SQL: named queries, each computing every ticker in one statement.

Definitions (all per ticker, over the 1-minute bars of one ET session day, `session_day`; a
window never reaches into the previous day, so the first bars of a day have short inputs):

- sma20 / sma50: the mean close of the last 20 / 50 bars up to and including the bar. NULL
  until the session has that many bars (bars, not minutes: a gap does not shorten the window).
- distance_sma20 = close / sma20 - 1, distance_sma50 likewise.
- ret_1m: close / prev_close - 1, where prev_close is the close of the bar that began exactly
  60 s earlier; after a gap there is no 1-minute return at that bar.
- recent_vol: sample stdev of the 1-minute returns at the last 10 bars (at least 5 returns);
  baseline_vol: the same over the last 50 bars (at least 20); vol_ratio = recent / baseline.
- volume_ratio = volume / mean volume of the previous 20 bars (all 20 must exist);
  volume_surge when volume_ratio >= VOLUME_SURGE_RATIO.
- trend_state: 1 when close > sma20 > sma50, -1 when close < sma20 < sma50, 0 otherwise,
  NULL while an SMA is short.
- close_5m_ago / close_15m_ago: the close of the bar that began EXACTLY 5 / 15 minutes before,
  in the same session day (a RANGE frame of exactly that offset): NULL on a gap or at the start
  of a session, never a neighbouring bar's close.
- short_inputs names every input above that is NULL for lack of bars.

All arithmetic is numeric (exact), so a close copied into close_5m_ago is the bar's close.
Writes are upserts on (ticker, ts) that leave a row untouched when nothing changed, so running
a cycle twice over the same bars yields identical rows (computed_at included).
"""

from __future__ import annotations

SMA_SHORT_BARS = 20
SMA_LONG_BARS = 50
RECENT_VOL_BARS = 10
RECENT_VOL_MIN_RETURNS = 5
BASELINE_VOL_BARS = 50
BASELINE_VOL_MIN_RETURNS = 20
VOLUME_AVG_BARS = 20
VOLUME_SURGE_RATIO = 2
# The most bars any window above needs, plus one for the oldest bar's 1-minute return.
LOOKBACK_BARS = max(SMA_LONG_BARS, BASELINE_VOL_BARS, VOLUME_AVG_BARS + 1) + 1

# ET session day of a bar; and the instant an ET day starts, for index range scans.
_SESSION_DAY = "(({ts}) AT TIME ZONE 'America/New_York')::date"
_DAY_START = "(({day})::timestamp AT TIME ZONE 'America/New_York')"

# The backfill's windows: input CTE `bars(ticker, ts, close, volume, session_day)`, output CTE
# `windowed` with one row per bar. Windows are partitioned by (ticker, session_day) so that no
# frame crosses into another day. Sums of numeric are exact, so these moving frames give the
# same values as the latest-bar aggregates below, digit for digit.
_WINDOWED_EVERY_BAR = f"""
stepped AS (
    SELECT b.ticker, b.ts, b.session_day, b.close, b.volume,
           CASE WHEN lag(b.ts) OVER s = b.ts - interval '1 minute' THEN lag(b.close) OVER s END AS prev_close
    FROM bars b
    WINDOW s AS (PARTITION BY b.ticker, b.session_day ORDER BY b.ts)
),
windowed AS (
    SELECT r.ticker, r.ts, r.session_day, r.close, r.volume, r.prev_close,
           first_value(r.close)  OVER w_5m        AS close_5m_ago,
           first_value(r.close)  OVER w_15m       AS close_15m_ago,
           avg(r.close)          OVER w_sma_short AS sma20,           count(*)        OVER w_sma_short AS n_sma20,
           avg(r.close)          OVER w_sma_long  AS sma50,           count(*)        OVER w_sma_long  AS n_sma50,
           stddev_samp(r.ret_1m) OVER w_recent    AS recent_vol,      count(r.ret_1m) OVER w_recent    AS n_recent,
           stddev_samp(r.ret_1m) OVER w_baseline  AS baseline_vol,    count(r.ret_1m) OVER w_baseline  AS n_baseline,
           avg(r.volume)         OVER w_prev_vol  AS prev_avg_volume, count(*)        OVER w_prev_vol  AS n_prev_vol
    FROM (SELECT s.*, s.close / s.prev_close - 1 AS ret_1m FROM stepped s) r
    WINDOW day AS (PARTITION BY r.ticker, r.session_day ORDER BY r.ts),
           w_sma_short AS (day ROWS BETWEEN {SMA_SHORT_BARS - 1} PRECEDING AND CURRENT ROW),
           w_sma_long  AS (day ROWS BETWEEN {SMA_LONG_BARS - 1} PRECEDING AND CURRENT ROW),
           w_recent    AS (day ROWS BETWEEN {RECENT_VOL_BARS - 1} PRECEDING AND CURRENT ROW),
           w_baseline  AS (day ROWS BETWEEN {BASELINE_VOL_BARS - 1} PRECEDING AND CURRENT ROW),
           w_prev_vol  AS (day ROWS BETWEEN {VOLUME_AVG_BARS} PRECEDING AND 1 PRECEDING),
           w_5m        AS (day RANGE BETWEEN interval '5 minutes' PRECEDING AND interval '5 minutes' PRECEDING),
           w_15m       AS (day RANGE BETWEEN interval '15 minutes' PRECEDING AND interval '15 minutes' PRECEDING)
)"""

# The latest-bar path, per ticker in `latest(ticker, ts)` (each ticker's latest bar up to the
# cutoff; a nested loop, no global sort): at most LOOKBACK_BARS bars of that bar's ET day ending
# there, read by one backward range scan of the (ticker, ts) primary key, already in the order the
# window functions want; then ONE aggregation over those bars, with FILTERs by recency. The bars
# exactly 1, 5 and 15 minutes earlier are among those bars when they exist (at most 16 bars back),
# so they are picked out by the same aggregation rather than probed again.
_AGGREGATED_LATEST_BAR = f"""
windowed AS (
    SELECT l.ticker, l.ts, l.session_day, a.close, a.volume,
           a.prev_close, a.close_5m_ago, a.close_15m_ago,
           a.sma20, least(a.n_bars, {SMA_SHORT_BARS}) AS n_sma20,
           a.sma50, least(a.n_bars, {SMA_LONG_BARS}) AS n_sma50,
           a.recent_vol, a.n_recent, a.baseline_vol, a.n_baseline,
           a.prev_avg_volume, least(a.n_bars - 1, {VOLUME_AVG_BARS}) AS n_prev_vol
    FROM (
        SELECT l.ticker, l.ts, {_SESSION_DAY.format(ts="l.ts")} AS session_day,
               {_DAY_START.format(day=_SESSION_DAY.format(ts="l.ts"))} AS day_start,
               l.ts - interval '1 minute' AS ts_1m, l.ts - interval '5 minutes' AS ts_5m,
               l.ts - interval '15 minutes' AS ts_15m
        FROM latest l
    ) l
    CROSS JOIN LATERAL (
        SELECT count(*) AS n_bars,
               max(r.close)          FILTER (WHERE r.rn = 1) AS close,
               max(r.volume)         FILTER (WHERE r.rn = 1) AS volume,
               max(r.close)          FILTER (WHERE r.ts = l.ts_1m) AS prev_close,
               max(r.close)          FILTER (WHERE r.ts = l.ts_5m) AS close_5m_ago,
               max(r.close)          FILTER (WHERE r.ts = l.ts_15m) AS close_15m_ago,
               avg(r.close)          FILTER (WHERE r.rn <= {SMA_SHORT_BARS}) AS sma20,
               avg(r.close)          FILTER (WHERE r.rn <= {SMA_LONG_BARS}) AS sma50,
               stddev_samp(r.ret_1m) FILTER (WHERE r.rn <= {RECENT_VOL_BARS}) AS recent_vol,
               count(r.ret_1m)       FILTER (WHERE r.rn <= {RECENT_VOL_BARS}) AS n_recent,
               stddev_samp(r.ret_1m) FILTER (WHERE r.rn <= {BASELINE_VOL_BARS}) AS baseline_vol,
               count(r.ret_1m)       FILTER (WHERE r.rn <= {BASELINE_VOL_BARS}) AS n_baseline,
               avg(r.volume)         FILTER (WHERE r.rn BETWEEN 2 AND {VOLUME_AVG_BARS + 1}) AS prev_avg_volume
        FROM (
            SELECT b.ts, b.close, b.volume,
                   row_number() OVER newest_first AS rn,
                   CASE WHEN lead(b.ts) OVER newest_first = b.ts - interval '1 minute'
                        THEN b.close / lead(b.close) OVER newest_first - 1 END AS ret_1m
            FROM (
                SELECT b.ts, b.close, b.volume FROM lane_telemetry b
                WHERE b.ticker = l.ticker AND b.ts <= l.ts AND b.ts >= l.day_start
                ORDER BY b.ts DESC LIMIT {LOOKBACK_BARS}
            ) b
            WINDOW newest_first AS (ORDER BY b.ts DESC)
        ) r
    ) a
)"""

# From `windowed` (either path) to the stored columns: NULL for every input that lacked bars,
# and short_inputs naming them.
_COMPUTE = f"""
gated AS (
    SELECT w.ticker, w.ts, w.session_day, w.close, w.volume, w.prev_close,
           w.close_5m_ago, w.close_15m_ago,
           CASE WHEN w.n_sma20 >= {SMA_SHORT_BARS} THEN w.sma20 END AS sma20,
           CASE WHEN w.n_sma50 >= {SMA_LONG_BARS} THEN w.sma50 END AS sma50,
           CASE WHEN w.n_recent >= {RECENT_VOL_MIN_RETURNS} THEN w.recent_vol END AS recent_vol,
           CASE WHEN w.n_baseline >= {BASELINE_VOL_MIN_RETURNS} THEN w.baseline_vol END AS baseline_vol,
           CASE WHEN w.n_prev_vol >= {VOLUME_AVG_BARS} AND w.prev_avg_volume > 0
                THEN w.volume / w.prev_avg_volume END AS volume_ratio
    FROM windowed w
),
computed AS (
    SELECT g.ticker, g.ts, g.session_day, g.close, g.volume, g.prev_close,
           g.close_5m_ago, g.close_15m_ago, g.sma20, g.sma50,
           g.close / g.sma20 - 1 AS distance_sma20,
           g.close / g.sma50 - 1 AS distance_sma50,
           g.recent_vol, g.baseline_vol,
           g.recent_vol / NULLIF(g.baseline_vol, 0) AS vol_ratio,
           g.volume_ratio,
           g.volume_ratio >= {VOLUME_SURGE_RATIO} AS volume_surge,
           (CASE WHEN g.sma20 IS NULL OR g.sma50 IS NULL THEN NULL
                 WHEN g.close > g.sma20 AND g.sma20 > g.sma50 THEN 1
                 WHEN g.close < g.sma20 AND g.sma20 < g.sma50 THEN -1
                 ELSE 0 END)::smallint AS trend_state,
           array_remove(ARRAY[
               CASE WHEN g.sma20 IS NULL THEN 'sma20' END,
               CASE WHEN g.sma50 IS NULL THEN 'sma50' END,
               CASE WHEN g.recent_vol IS NULL THEN 'recent_vol' END,
               CASE WHEN g.baseline_vol IS NULL THEN 'baseline_vol' END,
               CASE WHEN g.volume_ratio IS NULL THEN 'volume_ratio' END,
               CASE WHEN g.prev_close IS NULL THEN 'prev_close' END,
               CASE WHEN g.close_5m_ago IS NULL THEN 'close_5m_ago' END,
               CASE WHEN g.close_15m_ago IS NULL THEN 'close_15m_ago' END
           ]::text[], NULL) AS short_inputs
    FROM gated g
)"""

_COLUMNS = (
    "ticker, ts, session_day, close, volume, prev_close, close_5m_ago, close_15m_ago, sma20, sma50, "
    "distance_sma20, distance_sma50, recent_vol, baseline_vol, vol_ratio, volume_ratio, "
    "volume_surge, trend_state, short_inputs"
)
_UPDATABLE = [c.strip() for c in _COLUMNS.split(",")][2:]

# The upsert that makes a cycle idempotent: a row whose every value is unchanged is not
# rewritten, so computed_at keeps the time the values were first computed.
_UPSERT = f"""
INSERT INTO lane_features ({_COLUMNS}, computed_at)
SELECT {_COLUMNS}, now() FROM output
ON CONFLICT (ticker, ts) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATABLE)},
    computed_at = EXCLUDED.computed_at
WHERE ({", ".join(f"lane_features.{c}" for c in _UPDATABLE)})
      IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _UPDATABLE)})
"""

# Every ticker with a bar up to the cutoff, with its latest such bar, by a descending skip scan
# of the (ticker, ts) primary key: each step is ONE backward index probe that lands on the
# previous ticker's latest bar not after the cutoff (bars after the cutoff are stepped over inside
# the index), ~500 probes instead of reading ~200k rows.
_ALL_LATEST = """
latest AS (
    SELECT s.ticker, s.ts FROM (
        WITH RECURSIVE skip AS (
            (SELECT b.ticker, b.ts FROM lane_telemetry b WHERE b.ts <= %(cutoff)s
             ORDER BY b.ticker DESC, b.ts DESC LIMIT 1)
            UNION ALL
            SELECT n.ticker, n.ts FROM skip s CROSS JOIN LATERAL (
                SELECT b.ticker, b.ts FROM lane_telemetry b
                WHERE b.ticker < s.ticker AND b.ts <= %(cutoff)s
                ORDER BY b.ticker DESC, b.ts DESC LIMIT 1
            ) n
        )
        SELECT skip.ticker, skip.ts FROM skip
    ) s
)"""

# The given tickers' latest bars up to the cutoff: one backward probe of the primary key each.
_GIVEN_LATEST = """
latest AS (
    SELECT t.ticker, last.ts
    FROM (SELECT DISTINCT unnest(%(tickers)s::text[]) AS ticker) t
    CROSS JOIN LATERAL (
        SELECT b.ts FROM lane_telemetry b
        WHERE b.ticker = t.ticker AND b.ts <= %(cutoff)s
        ORDER BY b.ts DESC LIMIT 1
    ) last
)"""

# -- upsert_latest_all --
# Features of the latest complete bar of every ticker that has bars, in one statement.
# Params: cutoff (timestamptz: the latest bar start to consider).
UPSERT_LATEST_ALL = f"WITH {_ALL_LATEST},{_AGGREGATED_LATEST_BAR},{_COMPUTE},\noutput AS (SELECT * FROM computed){_UPSERT}"

# -- upsert_latest_for_tickers --
# The same for a given list of tickers. Params: cutoff, tickers (text[]).
UPSERT_LATEST_FOR_TICKERS = f"WITH {_GIVEN_LATEST},{_AGGREGATED_LATEST_BAR},{_COMPUTE},\noutput AS (SELECT * FROM computed){_UPSERT}"

# -- upsert_backfill --
# Features of EVERY bar with start <= ts < end (replays, backfills). Reads whole ET days from the
# start's day on, so each bar's windows see exactly what the latest-bar query would have seen.
# Params: start, end (timestamptz), tickers (text[] or NULL for all).
UPSERT_BACKFILL = f"""WITH
bars AS (
    SELECT b.ticker, b.ts, b.close, b.volume, {_SESSION_DAY.format(ts="b.ts")} AS session_day
    FROM lane_telemetry b
    WHERE b.ts >= {_DAY_START.format(day=_SESSION_DAY.format(ts="%(start)s::timestamptz"))}
      AND b.ts < %(end)s
      AND (%(tickers)s::text[] IS NULL OR b.ticker = ANY(%(tickers)s::text[]))
),{_WINDOWED_EVERY_BAR},{_COMPUTE},
output AS (
    SELECT c.* FROM computed c WHERE c.ts >= %(start)s
){_UPSERT}"""
