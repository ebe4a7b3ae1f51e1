-- The transfer workload's schema and data, run by scripts/bench-baseline.sh
-- with psql -v accounts=N -v initial=B.
--
-- Accounts 1..N, each with balance B; a balance may never go negative (the
-- CHECK is the database's own guard; the workload's debit checks first).
-- Every applied transfer leaves one row of history in `transfers`.
CREATE TABLE accounts (
    id      bigint PRIMARY KEY,
    balance bigint NOT NULL CHECK (balance >= 0)
);
CREATE TABLE transfers (
    id      bigserial PRIMARY KEY,
    debit   bigint NOT NULL,
    credit  bigint NOT NULL,
    amount  bigint NOT NULL CHECK (amount > 0),
    created timestamptz NOT NULL DEFAULT now()
);
INSERT INTO accounts (id, balance) SELECT g, :initial FROM generate_series(1, :accounts) AS g;
VACUUM ANALYZE accounts;
VACUUM ANALYZE transfers;
