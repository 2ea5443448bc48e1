"""The news task: Alpaca's news API through alpaca-py's NewsClient against the local fake server,
scored into the sentiment table, and read by the signal engine."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from decimal import Decimal

import pytest

from services.adapters.alpaca.client import AlpacaNewsFeed
from services.common.params import as_params
from services.domain.news import score_article
from services.news.main import RESUME_OVERLAP, SOURCE, run_news_cycle
from services.signal_engine.main import run_signal_cycle
from tests.fake_alpaca import fake_alpaca  # noqa: F401  (fixture)
from tests.test_alpaca_adapter import settings
from tests.test_signal_engine import NOW, insert_features

D = Decimal
UTC = timezone.utc
ACCOUNT = "acct-1"
BULLISH = ("ABC shares soar after record profit beats estimates",
           "Analysts upgrade ABC to strong buy on excellent growth.")
BEARISH = ("XYZ plunges as fraud probe widens", "Regulators warn of heavy losses.")


def sentiment_rows(conn) -> list[dict]:
    return conn.execute("SELECT ticker, ts, score, confidence, source, article_id, headline FROM sentiment "
                        "ORDER BY article_id, ticker").fetchall()


# --- the scorer ---------------------------------------------------------------------------------

@pytest.mark.parametrize("headline, summary, sign, confident", [
    (*BULLISH, 1, True),
    (*BEARISH, -1, True),
    ("ABC to present at investor conference", "The company will present on Tuesday.", 0, False),
    ("", "", 0, False),
])
def test_score_article_when_headline_and_summary_then_signed_score_and_confidence_in_range(
        headline, summary, sign, confident):
    s = score_article(headline, summary)
    assert -1 <= s.score <= 1 and 0 <= s.confidence <= 1
    assert (s.score > 0.5) if sign > 0 else (s.score < -0.5) if sign < 0 else (s.score == 0)
    assert (s.confidence > 0.3) is confident


def test_score_article_when_summary_also_bullish_then_stronger_than_headline_alone():
    assert score_article(*BULLISH).score > score_article(BULLISH[0]).score > 0


# --- the cycle ----------------------------------------------------------------------------------

def feed(fake) -> AlpacaNewsFeed:
    return AlpacaNewsFeed(settings(fake, read_attempts=1))


def test_cycle_when_articles_name_tickers_then_one_row_per_article_and_ticker_and_rerun_writes_nothing(
        conn, fake_alpaca):
    t1, t2 = NOW - timedelta(minutes=40), NOW - timedelta(minutes=10)
    fake_alpaca.add_news(*BULLISH[:1], ["ABC"], t1, summary=BULLISH[1], article_id=101)
    fake_alpaca.add_news(*BEARISH[:1], ["XYZ", "ABC"], t2, summary=BEARISH[1], article_id=102)
    fake_alpaca.add_news("Unrelated", ["QQQ"], t2, article_id=103)

    result = run_news_cycle(conn, feed(fake_alpaca), NOW, tickers=["ABC", "XYZ"])

    rows = sentiment_rows(conn)
    assert [(r["article_id"], r["ticker"]) for r in rows] == [("101", "ABC"), ("102", "ABC"), ("102", "XYZ")]
    assert {r["source"] for r in rows} == {SOURCE}
    assert [r["ts"] for r in rows] == [t1, t2, t2]   # the article's own time
    bull = score_article(*BULLISH)
    assert (rows[0]["score"], rows[0]["confidence"]) == (D(str(bull.score)), D(str(bull.confidence)))
    assert rows[1]["score"] < 0 and rows[1]["headline"] == BEARISH[0]
    assert (result.articles, result.written, result.refused) == (2, 3, 0)
    # alpaca-py asked for the followed tickers since the initial lookback, oldest first.
    [request] = fake_alpaca.requests_to("/v1beta1/news")
    assert (request.query["symbols"], request.query["sort"]) == ("ABC,XYZ", "asc")

    again = run_news_cycle(conn, feed(fake_alpaca), NOW + timedelta(minutes=1), tickers=["ABC", "XYZ"])
    assert (again.articles, again.written) == (2, 0)
    assert sentiment_rows(conn) == rows
    # It resumed from the newest stored article, less the overlap for late-indexed news.
    assert again.start == t2 - RESUME_OVERLAP


def test_cycle_when_article_revised_then_its_rows_rescored_not_duplicated(conn, fake_alpaca):
    t = NOW - timedelta(minutes=5)
    fake_alpaca.add_news("ABC to present at investor conference", ["ABC"], t, article_id=7)
    run_news_cycle(conn, feed(fake_alpaca), NOW, tickers=["ABC"])
    assert [r["score"] for r in sentiment_rows(conn)] == [D("0")]
    fake_alpaca.add_news(*BULLISH[:1], ["ABC"], t, summary=BULLISH[1], article_id=7, updated_at=NOW)
    result = run_news_cycle(conn, feed(fake_alpaca), NOW + timedelta(minutes=1), tickers=["ABC"])
    [row] = sentiment_rows(conn)
    assert result.written == 1 and row["score"] > D("0.5") and row["headline"] == BULLISH[0]


def test_cycle_when_article_dated_in_the_future_then_refused(conn, fake_alpaca):
    fake_alpaca.add_news(*BULLISH[:1], ["ABC"], NOW + timedelta(minutes=10), article_id=9)
    fake_alpaca.add_news(*BEARISH[:1], ["ABC"], NOW - timedelta(minutes=1), article_id=10)
    # The server's own window would hide it; a feed that returns it anyway is what is refused.
    articles = feed(fake_alpaca).articles(["ABC"], NOW - timedelta(hours=1), NOW + timedelta(hours=1))

    class Replay:
        def articles(self, symbols, start, end, *, limit):
            return articles

    result = run_news_cycle(conn, Replay(), NOW, tickers=["ABC"])
    assert (result.articles, result.refused) == (2, 1)
    assert [r["article_id"] for r in sentiment_rows(conn)] == ["10"]


def test_cycle_when_no_tickers_given_then_follows_tickers_with_features(conn, fake_alpaca):
    insert_features(conn, "ABC")
    insert_features(conn, "DEF")
    run_news_cycle(conn, feed(fake_alpaca), NOW)
    [request] = fake_alpaca.requests_to("/v1beta1/news")
    assert request.query["symbols"] == "ABC,DEF"


def test_feed_when_more_articles_than_a_page_then_sdk_follows_page_tokens(conn, fake_alpaca):
    for i in range(60):
        fake_alpaca.add_news(f"ABC item {i}", ["ABC"], NOW - timedelta(minutes=60 - i), article_id=1000 + i)
    result = run_news_cycle(conn, feed(fake_alpaca), NOW, tickers=["ABC"])
    assert result.articles == 60 and len(fake_alpaca.requests_to("/v1beta1/news")) == 2
    assert len(sentiment_rows(conn)) == 60


# --- news -> sentiment -> signal ----------------------------------------------------------------

def test_end_to_end_when_bullish_headline_then_bull_signal_confidence_boosted_by_configured_amount(
        conn, fake_alpaca):
    """Fake Alpaca news -> NewsClient -> news task -> sentiment -> signal engine -> recommendation."""
    insert_features(conn, "ABC")     # a BULL setup
    insert_features(conn, "CTRL")    # the same setup, no news
    fake_alpaca.add_news(*BULLISH[:1], ["ABC"], NOW - timedelta(minutes=20), summary=BULLISH[1], article_id=501)
    params = as_params({"min_confidence_day_trade": 0.3, "sentiment_boost": 0.12})

    run_news_cycle(conn, feed(fake_alpaca), NOW)
    run_signal_cycle(conn, ACCOUNT, params, NOW)

    recs = {r["ticker"]: r for r in conn.execute(
        "SELECT ticker, action, confidence, reason FROM dispatch_recommendations WHERE account_id = %s", (ACCOUNT,))}
    base = D(str(params.signal.base_confidence))
    assert recs["CTRL"]["confidence"] == base
    assert recs["ABC"]["action"] == "BUY"
    assert recs["ABC"]["confidence"] == base + D("0.12")
    confidence = recs["ABC"]["reason"]["confidence"]
    assert confidence["sentiment_effect"].startswith("boost")
    assert confidence["sentiment_score"] == D(str(score_article(*BULLISH).score))
    assert confidence["sentiment_n"] == 1


def test_cli_when_news_once_then_registered_with_the_news_task():
    from services.cli import build_parser
    from services.news import main as news

    args = build_parser().parse_args(["news", "--once", "--tickers", "abc,DEF"])
    assert (args.once, args.tickers, args.handler) == (True, "abc,DEF", news.run_command)
