-- pgbench script (pgbench -n -f transfer.sql -D accounts=N): one transfer per
-- transaction, the same workload `cellpay bench` sends (two distinct accounts
-- picked uniformly, an amount of 1 to 1000), double-entry in one transaction:
-- the debit with a balance check, then (only if the debit was applied) the
-- credit and the history row. Each statement is one round trip; the commit
-- waits for the WAL flush (synchronous_commit = on).
\set debit random(1, :accounts)
\set credit random(1, :accounts - 1)
\if :credit >= :debit
\set credit :credit + 1
\endif
\set amount random(1, 1000)
BEGIN;
WITH applied AS (
    UPDATE accounts SET balance = balance - :amount
    WHERE id = :debit AND balance >= :amount
    RETURNING 1
)
SELECT count(*) AS debited FROM applied \gset
\if :debited
UPDATE accounts SET balance = balance + :amount WHERE id = :credit;
INSERT INTO transfers (debit, credit, amount) VALUES (:debit, :credit, :amount);
\endif
END;
