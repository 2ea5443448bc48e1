"""News articles and their sentiment: an offline lexicon score of headline and summary.

The score is VADER's compound polarity (vaderSentiment: a rule-based lexicon tuned for short
social and news text, no model download, no network) of the headline and the summary read as
one text, in [-1, 1]. The confidence is the share of that text's lexical weight that carries
any polarity (1 - VADER's `neu`), in [0, 1]: a neutral wire notice ("XYZ to present at a
conference") gets confidence 0 and so no weight in the engines' confidence-weighted mean,
instead of pulling a ticker's real news toward zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class NewsArticle:
    """One article of the broker's news feed, free of SDK types; times aware UTC."""

    article_id: str
    headline: str
    summary: str
    symbols: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    source: str  # the publisher (benzinga, ...)


@dataclass(frozen=True)
class ArticleSentiment:
    score: float       # -1 bearish .. +1 bullish
    confidence: float  # 0 .. 1


@lru_cache(maxsize=1)
def _analyzer() -> Any:
    # Loading the lexicon reads a file once; the scoring itself is pure.
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def score_article(headline: str, summary: str = "") -> ArticleSentiment:
    """The sentiment of an article from its headline and summary (either may be empty)."""
    text = ". ".join(part.strip() for part in (headline, summary) if part and part.strip())
    if not text:
        return ArticleSentiment(0.0, 0.0)
    polarity = _analyzer().polarity_scores(text)
    score = max(-1.0, min(1.0, float(polarity["compound"])))
    confidence = max(0.0, min(1.0, 1.0 - float(polarity["neu"])))
    return ArticleSentiment(round(score, 4), round(confidence, 4))
