-- Conservation after the transfer workload (psql -v initial=B -At): prints
-- one line "accounts|total balance|transfers|amount moved|accounts whose
-- balance is not B - their debits + their credits|negative balances".
WITH moved AS (
    SELECT id, sum(delta) AS delta
    FROM (SELECT debit AS id, -amount AS delta FROM transfers
          UNION ALL
          SELECT credit AS id, amount AS delta FROM transfers) AS legs
    GROUP BY id
)
SELECT (SELECT count(*) FROM accounts),
       (SELECT sum(balance) FROM accounts),
       (SELECT count(*) FROM transfers),
       (SELECT coalesce(sum(amount), 0) FROM transfers),
       (SELECT count(*) FROM accounts AS a LEFT JOIN moved AS m USING (id)
         WHERE a.balance <> :initial + coalesce(m.delta, 0)),
       (SELECT count(*) FROM accounts WHERE balance < 0);
