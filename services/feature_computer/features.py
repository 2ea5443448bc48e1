"""The feature computer's SQL: named queries that read bars for the cycle and write its rows.

The definitions of the features live in services/domain/features.py, one pure function shared
by the live cycle, the backfill and replays; these queries only move bars in and rows out.
Bars flagged extended_hours (outside the regular session, migration 016) are never read.
Prices travel as integers of PRICE_SCALE units so the definitions' sums are exact; the closes
written back are those integers scaled down, i.e. the bars' own prices.
"""

from __future__ import annotations

from services.domain.features import LOOKBACK_BARS, PRICE_SCALE

_BAR_FIELDS = f"""extract(epoch FROM b.ts)::int8 AS ts, round(b.close * {PRICE_SCALE})::int8 AS close,
       b.volume, ((b.ts AT TIME ZONE 'America/New_York')::date - DATE '1970-01-01') AS day"""

# -- bar_heads --
# Each ticker's newest bar and revision (kept by lane_telemetry's triggers, migration 015), as
# one row of arrays: the cycle's whole cost when nothing is new. Params: tickers (text[] or NULL).
BAR_HEADS = """
SELECT array_agg(h.ticker) AS tickers, array_agg(extract(epoch FROM h.latest_ts)::int8) AS latest,
       array_agg(h.revision) AS revision
FROM lane_bar_heads h
WHERE h.latest_ts IS NOT NULL
  AND (%(tickers)s::text[] IS NULL OR h.ticker = ANY(%(tickers)s::text[]))
"""

# The bars as parallel int8 arrays, in no particular order: the caller sorts them by (ticker, ts),
# one numpy sort instead of one per array here.
_BAR_ARRAYS = f"""array_agg(extract(epoch FROM b.ts)::int8) AS ts,
       array_agg(round(b.close * {PRICE_SCALE})::int8) AS close,
       array_agg(b.volume) AS volume,
       array_agg(((b.ts AT TIME ZONE 'America/New_York')::date - DATE '1970-01-01')::int8) AS day"""

# -- new_bars --
# For each ticker, its bars after `since` (epoch seconds; -Infinity to read the window afresh) up
# to the cutoff, at most one window's worth, newest kept: one backward range scan of the
# (ticker, ts) primary key each. One row of int8 arrays (read by numpy at once), `ord` the
# ticker's position in the given arrays.
# Params: tickers (text: names joined by newlines, split here: psycopg would quote a text[]
# element by element), since (float8[]), cutoff (timestamptz).
NEW_BARS = f"""
SELECT array_agg(t.ord - 1) AS ord, {_BAR_ARRAYS}
FROM unnest(string_to_array(%(tickers)s, E'\n'), %(since)s::float8[]) WITH ORDINALITY AS t(ticker, since, ord)
CROSS JOIN LATERAL (
    SELECT b.ts, b.close, b.volume FROM lane_telemetry b
    WHERE b.ticker = t.ticker AND b.ts > to_timestamp(t.since) AND b.ts <= %(cutoff)s
      AND NOT b.extended_hours
    ORDER BY b.ts DESC LIMIT {LOOKBACK_BARS}
) b
"""

# -- range_bars --
# Every bar from the start of the ET day of `start` to `end` (backfills): whole days, so each
# bar's window is what the live cycle would have held. One row per ticker with its bars as int8
# arrays. Params: start, end, tickers (or NULL for all).
RANGE_BARS = f"""
SELECT b.ticker, {_BAR_ARRAYS}
FROM lane_telemetry b
WHERE b.ts >= ((%(start)s::timestamptz AT TIME ZONE 'America/New_York')::date::timestamp AT TIME ZONE 'America/New_York')
  AND b.ts < %(end)s
  AND NOT b.extended_hours
  AND (%(tickers)s::text[] IS NULL OR b.ticker = ANY(%(tickers)s::text[]))
GROUP BY b.ticker
ORDER BY b.ticker
"""

_COLUMNS = (
    "ticker, ts, session_day, close, volume, prev_close, close_5m_ago, close_15m_ago, sma20, sma50, "
    "distance_sma20, distance_sma50, recent_vol, baseline_vol, vol_ratio, volume_ratio, "
    "volume_surge, trend_state, short_inputs"
)
_UPDATABLE = [c.strip() for c in _COLUMNS.split(",")][2:]
_PRICES = ("close", "prev_close", "close_5m_ago", "close_15m_ago")
_VALUES = ("sma20", "sma50", "distance_sma20", "distance_sma50", "recent_vol", "baseline_vol",
           "vol_ratio", "volume_ratio")
# The inputs named in short_inputs when NULL, in this order.
_SHORT = ("sma20", "sma50", "recent_vol", "baseline_vol", "volume_ratio", "prev_close",
          "close_5m_ago", "close_15m_ago")
# The arrays the writer takes besides ticker and ts (int8[] epoch seconds) and volume (int8[]):
# prices and values as numeric[] (binary, built by the caller), the two flags as float8[].
PRICE_ARRAYS = _PRICES
VALUE_ARRAYS = _VALUES
FLAG_ARRAYS = ("volume_surge", "trend_state")

# -- upsert_features --
# One row per element of the arrays (NaN is NULL; tickers joined by newlines, as in new_bars),
# upserted on (ticker, ts); a row whose every value is unchanged is not rewritten, so computed_at
# keeps the time it was first computed and a cycle run twice writes nothing. The numerics arrive
# in binary (prices exact, derived values with 15 significant digits): converting doubles here
# cost more than the insert itself.
UPSERT_FEATURES = f"""
INSERT INTO lane_features ({_COLUMNS}, computed_at)
SELECT r.ticker, r.ts, (r.ts AT TIME ZONE 'America/New_York')::date, r.close, r.volume,
       r.prev_close, r.close_5m_ago, r.close_15m_ago, {", ".join(f"r.{c}" for c in _VALUES)},
       r.volume_surge, r.trend_state,
       array_remove(ARRAY[{", ".join(f"CASE WHEN r.{c} IS NULL THEN '{c}' END" for c in _SHORT)}]::text[], NULL),
       now()
FROM (
    SELECT u.ticker, to_timestamp(u.ts) AS ts, u.volume,
           {", ".join(f"nullif(u.{c}, 'NaN') AS {c}" for c in (*_PRICES, *_VALUES))},
           nullif(u.volume_surge, 'NaN') = 1 AS volume_surge,
           nullif(u.trend_state, 'NaN')::smallint AS trend_state
    FROM unnest(string_to_array(%(ticker)s, E'\\n'), %(ts)s::int8[], %(volume)s::int8[],
                {", ".join(f"%({c})s::numeric[]" for c in (*_PRICES, *_VALUES))},
                {", ".join(f"%({c})s::float8[]" for c in FLAG_ARRAYS)})
         AS u(ticker, ts, volume, {", ".join((*_PRICES, *_VALUES, *FLAG_ARRAYS))})
) r
ON CONFLICT (ticker, ts) DO UPDATE SET
    {", ".join(f"{c} = EXCLUDED.{c}" for c in _UPDATABLE)},
    computed_at = EXCLUDED.computed_at
WHERE ({", ".join(f"lane_features.{c}" for c in _UPDATABLE)})
      IS DISTINCT FROM ({", ".join(f"EXCLUDED.{c}" for c in _UPDATABLE)})
"""
