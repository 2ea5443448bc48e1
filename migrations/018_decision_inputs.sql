-- 018: every decision keeps the inputs it was made from (services/domain/snapshot.py: the gathered
-- context, the option chain excerpt and IV percentile of an option entry, the quote of an option
-- exit, the capacity counts read again under the account lock, and the decision's `now`), so
-- `params whatif` can make it again with other params. NULL for decisions made before this.
ALTER TABLE dispatch_recommendations ADD COLUMN inputs jsonb;
