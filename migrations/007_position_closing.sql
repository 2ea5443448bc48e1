-- 007: a position being exited is CLOSING.
--
-- An EXIT moves the ticker's OPEN position to CLOSING in the transaction that records the exit
-- order, so a second EXIT for the same position (another dispatcher, or while the first order
-- is still working) finds nothing to close. A CLOSING position is still held: it counts toward
-- the position and exposure limits and blocks a new entry in the ticker until the fill.
ALTER TABLE active_positions DROP CONSTRAINT position_status;
ALTER TABLE active_positions ADD CONSTRAINT position_status
    CHECK (status IN ('PENDING', 'OPEN', 'CLOSING', 'CLOSED', 'CANCELLED'));

DROP INDEX active_positions_one_per_ticker;
CREATE UNIQUE INDEX active_positions_one_per_ticker
    ON active_positions (account_id, ticker) WHERE status IN ('PENDING', 'OPEN', 'CLOSING');
DROP INDEX active_positions_live;
CREATE INDEX active_positions_live
    ON active_positions (account_id) WHERE status IN ('PENDING', 'OPEN', 'CLOSING');
