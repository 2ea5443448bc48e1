-- 012: exits. A position manager closes positions by rule; the kill switch can flatten the book.
--
-- active_positions:
-- - strategy: the exit rules that apply (day_trade, swing_trade), copied from the entry.
-- - high_water_mark: the best close since entry (highest for a long, lowest for a short), the
--   base of the trailing stop; persisted each minute so a restart of the manager keeps it.
-- - marked_at: when the manager last had a fresh price for the position; stale_since: since
--   when its data has been stale (NULL while fresh), flagged once.
-- - exit_reason: the rule (or flatten) that closed it; fees: per-share or per-contract fees of
--   its entry and exit fills. realized_pnl is net of fees once the position is CLOSED.
-- dispatch_recommendations: an EXIT names the position it closes and why. At most one live
-- (PENDING or SUBMITTING) exit per position, whatever its reason: concurrent managers, a
-- kill-switch flatten and an operator insert one between them.
-- dispatch_executions.fee_per_unit: the fee of each share or contract, from the params in
-- force when the order was decided.
-- kill_switch.flatten: an operator's `halt --flatten`: positions that open afterwards (an
-- entry filled late) are flattened too, and HALTED lets these exits through.
ALTER TABLE active_positions
    ADD COLUMN strategy text,
    ADD COLUMN high_water_mark numeric,
    ADD COLUMN marked_at timestamptz,
    ADD COLUMN stale_since timestamptz,
    ADD COLUMN exit_reason text,
    ADD COLUMN fees numeric NOT NULL DEFAULT 0;
UPDATE active_positions p SET strategy = r.strategy
FROM dispatch_recommendations r WHERE r.id = p.recommendation_id;

ALTER TABLE dispatch_recommendations
    ADD COLUMN position_id bigint REFERENCES active_positions (id),
    ADD COLUMN exit_reason text;
CREATE UNIQUE INDEX dispatch_recommendations_one_live_exit
    ON dispatch_recommendations (position_id)
    WHERE action = 'EXIT' AND position_id IS NOT NULL AND status IN ('PENDING', 'SUBMITTING');
-- A position's exits, whatever their status: a flatten waits a minute after one that ended.
CREATE INDEX dispatch_recommendations_exits_of_position
    ON dispatch_recommendations (position_id, decided_at) WHERE action = 'EXIT' AND position_id IS NOT NULL;

ALTER TABLE dispatch_executions ADD COLUMN fee_per_unit numeric NOT NULL DEFAULT 0;
-- KILL_SWITCH: an entry order canceled because the kill switch flattens the book or halted it.
ALTER TABLE dispatch_executions DROP CONSTRAINT execution_cancel_reason;
ALTER TABLE dispatch_executions ADD CONSTRAINT execution_cancel_reason
    CHECK (cancel_reason IS NULL OR cancel_reason IN ('REPRICE', 'GIVE_UP', 'KILL_SWITCH'));

ALTER TABLE kill_switch ADD COLUMN flatten boolean NOT NULL DEFAULT false;

-- The manager re-marks every open position each minute (price, high-water mark). Free room on
-- each page lets those updates stay on the page without touching the indexes (HOT updates):
-- none of the marked columns is indexed.
ALTER TABLE active_positions SET (fillfactor = 50);
