"""The SSM params documents that were good, and the params in force, in Postgres.

The params provider saves every SSM document it accepted; at start-up with SSM unreachable it
takes the newest one back instead of the reviewed file. Each call opens its own short
connection: these are rare writes (start-up, a new version) from a provider that holds no pool.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime

from services.common.db import connect

log = logging.getLogger(__name__)

# -- save_good --
# One row per (name, version, content): a re-read of the same version changes nothing but its time.
_SAVE_GOOD = """
INSERT INTO params_ssm_documents (name, version, content_hash, document, stored_at)
VALUES (%(name)s, %(version)s, %(content_hash)s, %(document)s, %(now)s)
ON CONFLICT (name, version, content_hash) DO UPDATE SET stored_at = EXCLUDED.stored_at
"""

# -- last_good --
_LAST_GOOD = """
SELECT version, content_hash, document, stored_at FROM params_ssm_documents
WHERE name = %(name)s ORDER BY stored_at DESC LIMIT 1
"""

# -- record_in_force --
_RECORD_IN_FORCE = """
INSERT INTO params_in_force (configured_source, source, version, content_hash, using_fallback, note, since)
VALUES (%(configured_source)s, %(source)s, %(version)s, %(content_hash)s, %(using_fallback)s, %(note)s, %(now)s)
ON CONFLICT (configured_source) DO UPDATE SET source = EXCLUDED.source, version = EXCLUDED.version,
    content_hash = EXCLUDED.content_hash, using_fallback = EXCLUDED.using_fallback, note = EXCLUDED.note,
    since = EXCLUDED.since
"""

IN_FORCE = """
SELECT configured_source, source, version, content_hash, using_fallback, note, since
FROM params_in_force ORDER BY configured_source
"""


@dataclass(frozen=True)
class GoodDocument:
    version: str
    content_hash: str
    document: str
    stored_at: datetime


class PostgresParamsStore:
    """Last good SSM documents and the params in force, on the service's database."""

    def __init__(self, conninfo: str):
        self._conninfo = conninfo

    def __repr__(self) -> str:
        return "PostgresParamsStore()"  # the conninfo may carry a password

    def save_good(self, name: str, version: str, content_hash: str, document: str, now: datetime) -> None:
        with connect(self._conninfo, application_name="ops-params") as conn:
            conn.execute(_SAVE_GOOD, {"name": name, "version": version, "content_hash": content_hash,
                                      "document": document, "now": now})

    def last_good(self, name: str) -> GoodDocument | None:
        with connect(self._conninfo, application_name="ops-params") as conn:
            row = conn.execute(_LAST_GOOD, {"name": name}).fetchone()
        return GoodDocument(**row) if row else None

    def record_in_force(self, configured_source: str, source: str, version: str, content_hash: str,
                        using_fallback: bool, note: str | None, now: datetime) -> None:
        with connect(self._conninfo, application_name="ops-params") as conn:
            conn.execute(_RECORD_IN_FORCE, {
                "configured_source": configured_source, "source": source, "version": version,
                "content_hash": content_hash, "using_fallback": using_fallback, "note": note, "now": now})


def params_in_force(conn) -> list[dict]:
    """Every configured source's params in force, for `status`."""
    return conn.execute(IN_FORCE).fetchall()
