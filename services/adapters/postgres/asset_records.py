"""The broker's asset records, shared by every process through Postgres, one row per symbol and ET day.

The asset cache (`services/adapters/assets.py`) asks here before it asks the broker, and records
what the broker said, so one request per symbol per session serves every dispatcher task.
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import date, datetime

from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from services.domain.broker import AssetRecord

# -- read_asset --
# The answer recorded for a symbol today, if any process has asked yet.
READ_ASSET = "SELECT record FROM asset_records WHERE symbol = %(symbol)s AND session_day = %(day)s"

# -- write_asset --
# The first answer of the day stands; a process that asked at the same moment keeps its own in memory.
WRITE_ASSET = """
INSERT INTO asset_records (symbol, session_day, record, fetched_at)
VALUES (%(symbol)s, %(day)s, %(record)s, %(now)s)
ON CONFLICT (symbol, session_day) DO NOTHING
"""

_UNKNOWN = object()


class AssetRecordStore:
    """get(symbol, day) -> AssetRecord, None (no such asset) or MISSING_ROW; put(...) records an answer."""

    MISSING_ROW = _UNKNOWN

    def __init__(self, pool: ConnectionPool):
        self.pool = pool

    def get(self, symbol: str, day: date) -> AssetRecord | None | object:
        with self.pool.connection() as conn:
            row = conn.execute(READ_ASSET, {"symbol": symbol, "day": day}).fetchone()
        if row is None:
            return _UNKNOWN
        record = row["record"] if isinstance(row, dict) else row[0]
        return None if record is None else AssetRecord(**record)

    def put(self, symbol: str, day: date, record: AssetRecord | None, now: datetime) -> None:
        with self.pool.connection() as conn:
            conn.execute(WRITE_ASSET, {"symbol": symbol, "day": day, "now": now,
                                       "record": Jsonb(asdict(record)) if record is not None else None})
