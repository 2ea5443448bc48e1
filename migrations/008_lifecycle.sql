-- 008: one write path for the order lifecycle, with compare-and-set.
--
-- Every change of an execution, a position or a recommendation goes through one repository that
-- names the state (and version) it expects the row to be in; a row another worker changed
-- meanwhile is left alone and the change is reported as not applied.
-- - version: bumped by every write, the compare-and-set token.
-- - dispatch_executions.role: ENTRY opens the position it reserved, EXIT closes the one it took.
-- - dispatch_executions.position_id: the position an order opens or closes, addressed by id
--   (an exit used to close "the ticker's position", whichever that was).
-- - active_positions.updated_at: the last local change, so reconciliation can tell a broker
--   snapshot taken before it from one taken after.
ALTER TABLE dispatch_recommendations ADD COLUMN version integer NOT NULL DEFAULT 0;

ALTER TABLE dispatch_executions
    ADD COLUMN version integer NOT NULL DEFAULT 0,
    ADD COLUMN role text,
    ADD COLUMN position_id bigint REFERENCES active_positions (id);
UPDATE dispatch_executions e
SET role = CASE WHEN EXISTS (SELECT 1 FROM active_positions p WHERE p.execution_id = e.id) THEN 'ENTRY' ELSE 'EXIT' END,
    position_id = (SELECT p.id FROM active_positions p WHERE p.execution_id = e.id);
-- An exit still working at the upgrade closed "the ticker's position": the one it made CLOSING
-- (one live position per ticker). Without its id, its fill would leave that position CLOSING.
UPDATE dispatch_executions e
SET position_id = p.id
FROM active_positions p
WHERE e.role = 'EXIT' AND e.position_id IS NULL AND e.status IN ('SUBMITTING', 'ACCEPTED', 'PARTIALLY_FILLED')
  AND p.account_id = e.account_id AND p.ticker = e.ticker AND p.status = 'CLOSING';
ALTER TABLE dispatch_executions
    ALTER COLUMN role SET NOT NULL,
    ADD CONSTRAINT execution_role CHECK (role IN ('ENTRY', 'EXIT')),
    ADD CONSTRAINT execution_filled_qty CHECK (filled_qty IS NULL OR (filled_qty >= 0 AND filled_qty <= qty));

ALTER TABLE active_positions
    ADD COLUMN version integer NOT NULL DEFAULT 0,
    ADD COLUMN updated_at timestamptz;
UPDATE active_positions SET updated_at = coalesce(closed_at, opened_at);
CREATE INDEX active_positions_symbol_activity ON active_positions (account_id, symbol, updated_at);

-- The last time the broker's orders were compared with ours: a comparison that keeps failing
-- ages like the account state and stops entries past its limit.
ALTER TABLE account_state ADD COLUMN orders_reconciled_at timestamptz;

-- Working orders, polled until they end.
CREATE INDEX dispatch_executions_working
    ON dispatch_executions (account_id, id) WHERE status IN ('SUBMITTING', 'ACCEPTED', 'PARTIALLY_FILLED');
