"""The news task: the broker's news articles -> a lexicon sentiment score -> the sentiment table.

The signal engine and the watchlist read `sentiment` (ticker, ts, score, confidence) over a
lookback; this task fills it. One cycle:

1. gather: the tickers to follow (the watchlist's current candidates of every account; with no
   watchlist yet, every ticker with features) and where to resume: the newest stored article
   less RESUME_OVERLAP (articles are indexed late, a cycle may have died mid-way), never
   before now - INITIAL_LOOKBACK;
2. fetch the articles created since then, oldest first (network, outside any transaction);
3. score each one's headline and summary (pure, `services/domain/news.py`) and upsert one row
   per article and ticker it names, keyed by (source, article_id, ticker): reading an article
   again writes nothing, an article whose text was revised gets its new score. `ts` is the
   article's own creation time, the time the news became known, so a lookback measures the
   news' age, not our fetch's. An article dated beyond MAX_CLOCK_SKEW in the future is refused.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import psycopg

from services.domain.news import NewsArticle, score_article

log = logging.getLogger(__name__)

SOURCE = "alpaca-news"
INITIAL_LOOKBACK = timedelta(hours=24)
RESUME_OVERLAP = timedelta(minutes=30)
MAX_CLOCK_SKEW = timedelta(seconds=5)
MAX_ARTICLES_PER_CYCLE = 1000

# -- followed_tickers --
# The watchlist's current candidates across accounts (rank is NULL once a ticker drops out);
# when no account has a watchlist yet, every ticker with features, by a skip scan of
# lane_features' (ticker, ts) key.
FOLLOWED_TICKERS = """
WITH RECURSIVE candidates AS (
    SELECT DISTINCT w.ticker FROM watchlist_state w WHERE w.rank IS NOT NULL OR w.selected
),
skip AS (
    (SELECT f.ticker FROM lane_features f WHERE NOT EXISTS (SELECT 1 FROM candidates) ORDER BY f.ticker LIMIT 1)
    UNION ALL
    SELECT (SELECT f.ticker FROM lane_features f WHERE f.ticker > s.ticker ORDER BY f.ticker LIMIT 1)
    FROM skip s WHERE s.ticker IS NOT NULL
)
SELECT ticker FROM candidates
UNION
SELECT ticker FROM skip WHERE ticker IS NOT NULL
ORDER BY ticker
"""

# -- newest_article --
# Where the task resumes: the creation time of the newest article it stored.
NEWEST_ARTICLE = "SELECT max(ts) AS ts FROM sentiment WHERE source = %(source)s AND article_id IS NOT NULL"

# -- upsert_article_sentiment --
# One row per (source, article, ticker), the partial unique index of migration 013. A re-read
# article with the same text leaves its row untouched (no dead tuple, ingested_at kept).
UPSERT_ARTICLE_SENTIMENT = """
INSERT INTO sentiment (ticker, ts, score, confidence, source, article_id, headline)
VALUES (%(ticker)s, %(ts)s, %(score)s, %(confidence)s, %(source)s, %(article_id)s, %(headline)s)
ON CONFLICT (source, article_id, ticker) WHERE article_id IS NOT NULL DO UPDATE SET
    ts = EXCLUDED.ts, score = EXCLUDED.score, confidence = EXCLUDED.confidence,
    headline = EXCLUDED.headline, ingested_at = now()
WHERE (sentiment.ts, sentiment.score, sentiment.confidence, sentiment.headline)
      IS DISTINCT FROM (EXCLUDED.ts, EXCLUDED.score, EXCLUDED.confidence, EXCLUDED.headline)
"""


class NewsFeed(Protocol):
    """What the task needs from the news adapter (AlpacaNewsFeed)."""

    def articles(self, symbols: Sequence[str], start: datetime, end: datetime, *,
                 limit: int = MAX_ARTICLES_PER_CYCLE) -> Iterable[NewsArticle]:
        ...


@dataclass(frozen=True)
class NewsCycleResult:
    tickers: int
    articles: int
    written: int     # rows inserted or changed
    refused: int     # articles dated in the future
    start: datetime | None


def run_news_cycle(conn: psycopg.Connection, feed: NewsFeed, now: datetime,
                   tickers: Sequence[str] | None = None) -> NewsCycleResult:
    """Fetch the articles since the resume point for the followed tickers and store their sentiment."""
    if now.tzinfo is None:
        raise ValueError("naive datetime: run_news_cycle needs an aware `now`")
    followed = sorted(set(tickers)) if tickers else [r["ticker"] for r in conn.execute(FOLLOWED_TICKERS)]
    if not followed:
        log.info("news: no tickers to follow")
        return NewsCycleResult(0, 0, 0, 0, None)
    newest = conn.execute(NEWEST_ARTICLE, {"source": SOURCE}).fetchone()["ts"]
    start = now - INITIAL_LOOKBACK
    if newest is not None:
        start = max(start, min(newest, now) - RESUME_OVERLAP)
    articles = list(feed.articles(followed, start, now, limit=MAX_ARTICLES_PER_CYCLE))

    rows, refused = [], 0
    for a in articles:
        if a.created_at > now + MAX_CLOCK_SKEW:
            refused += 1
            log.warning("news article from the future refused", extra={
                "article_id": a.article_id, "created_at": a.created_at, "now": now})
            continue
        sentiment = score_article(a.headline, a.summary)
        rows += [{"ticker": t, "ts": a.created_at, "score": sentiment.score, "confidence": sentiment.confidence,
                  "source": SOURCE, "article_id": a.article_id, "headline": a.headline[:500]}
                 for t in sorted(set(a.symbols)) if t]
    written = 0
    if rows:
        with conn.transaction(), conn.cursor() as cur:
            for row in rows:
                cur.execute(UPSERT_ARTICLE_SENTIMENT, row)
                written += cur.rowcount
    result = NewsCycleResult(len(followed), len(articles), written, refused, start)
    log.info("news cycle", extra={"tickers": result.tickers, "articles": result.articles,
                                  "written": result.written, "refused": result.refused, "start": start})
    return result


def run_command(args: argparse.Namespace) -> int:
    from services.adapters.alpaca.client import AlpacaNewsFeed
    from services.adapters.alpaca.settings import AlpacaSettings
    from services.common.clock import SystemClock
    from services.domain.broker import BrokerError
    from services.runtime import bootstrap, run_periodic, stop_on_sigterm

    _, _, url, _ = bootstrap(None)
    feed = AlpacaNewsFeed(AlpacaSettings())
    clock = SystemClock()
    tickers = [t.strip().upper() for t in args.tickers.split(",") if t.strip()] if args.tickers else None
    return run_periodic(
        "news", url, lambda conn: run_news_cycle(conn, feed, clock.now(), tickers),
        interval=args.interval, once=args.once, stop=stop_on_sigterm(), retry_on=(BrokerError,))
