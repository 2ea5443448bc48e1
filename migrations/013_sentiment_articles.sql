-- 013: sentiment rows from news articles, one per article and ticker.
--
-- The news task scores each article it reads from the broker's news API and writes a row for
-- every ticker the article names. Its fetch windows overlap (late-indexed articles, restarts),
-- so a row is keyed by the article: reading it again updates that row, never adds one. Two
-- articles on one ticker in the same second are two rows, so (ticker, ts, source) stays unique
-- only for rows without an article (a classifier's readings, the demo's).
ALTER TABLE sentiment ADD COLUMN article_id text;
ALTER TABLE sentiment ADD COLUMN headline text;   -- what the score was read from, for "why"

ALTER TABLE sentiment DROP CONSTRAINT sentiment_pkey;
CREATE UNIQUE INDEX sentiment_one_per_reading ON sentiment (ticker, ts, source) WHERE article_id IS NULL;
CREATE UNIQUE INDEX sentiment_one_per_article ON sentiment (source, article_id, ticker) WHERE article_id IS NOT NULL;
-- The engines' lookback reads: one range scan per ticker (the dropped key's prefix did this).
CREATE INDEX sentiment_ticker_ts ON sentiment (ticker, ts);
