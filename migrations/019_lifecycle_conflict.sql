-- 019: the broker's answer to a submission is applied in one statement of compare-and-sets
-- (orders_repo.apply_answer: the execution, its position, the recommendation). When one of them
-- misses after another has changed its row, the statement calls this: the error undoes the whole
-- statement, so nothing is left half applied, and the caller applies the answer again through
-- the path that loads the order first.
CREATE FUNCTION lifecycle_conflict(what text) RETURNS boolean LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'lifecycle compare-and-set missed: %', what USING ERRCODE = 'serialization_failure';
END
$$;
