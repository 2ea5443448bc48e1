"""The recorded decisions a what-if re-makes: their stored inputs, and the bars after them."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import psycopg

# -- decisions_with_inputs --
# The account's decisions since `since` that stored their inputs, oldest first; whether an order
# was recorded for each; the close of the bar it was decided on and of the bars that began
# exactly N minutes after that bar (NULL where there is none).
DECISIONS_WITH_INPUTS = """
SELECT r.id, r.ticker, r.action, r.created_at, r.status, r.outcome_code, r.inputs,
       EXISTS (SELECT 1 FROM dispatch_executions e WHERE e.recommendation_id = r.id) AS ordered,
       (r.inputs -> 'bar' ->> 'close')::numeric AS base_close,
       fw.closes AS forward_closes
FROM dispatch_recommendations r
LEFT JOIN LATERAL (
    SELECT array_agg(t.close ORDER BY h.ord) AS closes
    FROM unnest(%(horizons)s::int[]) WITH ORDINALITY AS h(minutes, ord)
    LEFT JOIN lane_telemetry t
           ON t.ticker = r.ticker AND t.ts = (r.inputs -> 'bar' ->> 'ts')::timestamptz + make_interval(mins => h.minutes)
    WHERE r.inputs -> 'bar' ->> 'ts' IS NOT NULL
) fw ON true
WHERE r.account_id = %(account_id)s AND r.created_at >= %(since)s AND r.inputs IS NOT NULL
  AND r.status <> 'PENDING'
ORDER BY r.created_at, r.id
"""


def decisions_with_inputs(conn: psycopg.Connection, account_id: str, since: datetime,
                          horizons: Sequence[int]) -> list[dict]:
    return conn.execute(DECISIONS_WITH_INPUTS, {"account_id": account_id, "since": since,
                                                "horizons": list(horizons)}).fetchall()
