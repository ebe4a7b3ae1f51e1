//! End-to-end: the real `cellpay server` binary, driven over gRPC and REST,
//! killed with SIGKILL in the middle of load, restarted, and audited.
//!
//! After the restart:
//! - every transfer acknowledged `ok` is there, with the fields it was sent with;
//! - retrying it answers `exists` and changes nothing;
//! - every account's balances equal the sum of the transfers found (so nothing
//!   was applied twice, and in-flight requests were applied whole or not at all);
//! - money is conserved.
//!
//! Also: a torn record at the log's tail is cut and the server starts; a
//! corrupted record in the middle makes it refuse to start, naming the damage.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cellpay_api::json::{AccountsJson, CreateResultsJson, TransfersJson};
use cellpay_api::proto;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_ledger::{Account, CreateAccountResult, CreateTransferResult, Transfer};

mod e2e_support;

use e2e_support::{transfer, LEDGER};

const ACCOUNTS: u128 = 64;

struct Server {
    child: Child,
    address: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        let mut child = Command::new(env!("CARGO_BIN_EXE_cellpay"))
            .args(["server", "--data"])
            .arg(data)
            .args(["--listen", "127.0.0.1:0", "--checkpoint-transfers", "20000"])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start cellpay server");
        let stdout = child.stdout.take().unwrap();
        let mut line = String::new();
        BufReader::new(stdout).read_line(&mut line).expect("read the listening line");
        let address = line
            .split_whitespace()
            .nth(4)
            .unwrap_or_else(|| panic!("unexpected first line from the server: {line:?}"))
            .to_string();
        Server { child, address }
    }

    fn kill(mut self) {
        self.child.kill().expect("SIGKILL"); // std's kill is SIGKILL on Unix
        self.child.wait().unwrap();
    }

    async fn grpc(&self) -> LedgerClient<tonic::transport::Channel> {
        LedgerClient::connect(format!("http://{}", self.address))
            .await
            .unwrap()
            .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.address)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn create_accounts_rest(server: &Server) {
    let accounts: Vec<Account> =
        (1..=ACCOUNTS).map(|id| Account { id, ledger: LEDGER, code: 1, ..Account::default() }).collect();
    let body = serde_json::to_vec(&AccountsJson::from_ledger(&accounts)).unwrap();
    let reply = reqwest::Client::new().post(server.url("/v1/accounts")).body(body).send().await.unwrap();
    assert_eq!(reply.status(), 200);
    let results: CreateResultsJson = reply.json().await.unwrap();
    assert_eq!(results.to_account_results().unwrap(), vec![CreateAccountResult::Ok; ACCOUNTS as usize]);
}

/// Sends batches until the server dies; returns every transfer acknowledged `ok`.
async fn load(
    server_address: String,
    worker: u128,
    acknowledged: Arc<Mutex<BTreeMap<u128, Transfer>>>,
    sent: Arc<Mutex<Vec<u128>>>,
) {
    let rest = reqwest::Client::new();
    let mut grpc = match LedgerClient::connect(format!("http://{server_address}")).await {
        Ok(client) => client,
        Err(_) => return,
    };
    for round in 0u128.. {
        let batch: Vec<Transfer> = (0..200u128)
            .map(|i| {
                let id = (worker << 64) | (round * 200 + i + 1);
                let debit = (id * 7 + i) % ACCOUNTS + 1;
                let credit = (debit + 1 + (i % (ACCOUNTS - 1))) % ACCOUNTS + 1;
                transfer(id, debit, credit, 1 + (id % 97))
            })
            .collect();
        sent.lock().unwrap().extend(batch.iter().map(|t| t.id));
        // Alternate the two APIs.
        let results = if round % 2 == 0 {
            match grpc.create_transfers(proto::CreateTransfersRequest::from_ledger(&batch)).await {
                Ok(reply) => reply.into_inner().to_ledger().unwrap(),
                Err(_) => return,
            }
        } else {
            let body = serde_json::to_vec(&TransfersJson::from_ledger(&batch)).unwrap();
            let url = format!("http://{server_address}/v1/transfers");
            let Ok(reply) = rest.post(url).body(body).send().await else { return };
            let Ok(results) = reply.json::<CreateResultsJson>().await else { return };
            results.to_transfer_results().unwrap()
        };
        let mut acknowledged = acknowledged.lock().unwrap();
        for (transfer, result) in batch.iter().zip(results) {
            assert_ne!(result, CreateTransferResult::Exists, "fresh ids cannot exist");
            if result == CreateTransferResult::Ok {
                acknowledged.insert(transfer.id, *transfer);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_under_load_loses_no_acknowledged_transfer() {
    let dir = tempfile::tempdir().unwrap();
    let server = Server::start(dir.path());
    create_accounts_rest(&server).await;

    let acknowledged = Arc::new(Mutex::new(BTreeMap::new()));
    let sent = Arc::new(Mutex::new(Vec::new()));
    let workers: Vec<_> = (1..=4u128)
        .map(|worker| tokio::spawn(load(server.address.clone(), worker, acknowledged.clone(), sent.clone())))
        .collect();
    // Let load run until well past a checkpoint, then kill the server mid-flight.
    let started = Instant::now();
    while acknowledged.lock().unwrap().len() < 30_000 && started.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.kill();
    for worker in workers {
        worker.await.unwrap();
    }
    let acknowledged = acknowledged.lock().unwrap().clone();
    let sent = sent.lock().unwrap().clone();
    assert!(acknowledged.len() >= 1_000, "load made progress: {}", acknowledged.len());

    let server = Server::start(dir.path());
    let mut grpc = server.grpc().await;
    // Every transfer sent: found ones are applied, whole.
    let mut found: BTreeMap<u128, Transfer> = BTreeMap::new();
    for chunk in sent.chunks(8190) {
        let reply = grpc.lookup_transfers(proto::LookupTransfersRequest::from_ledger(chunk)).await.unwrap();
        for transfer in reply.into_inner().to_ledger().unwrap() {
            found.insert(transfer.id, transfer);
        }
    }
    for (id, sent_transfer) in &acknowledged {
        let stored = found.get(id).unwrap_or_else(|| panic!("acknowledged transfer {id} is missing"));
        assert_eq!(
            (stored.debit_account_id, stored.credit_account_id, stored.amount),
            (sent_transfer.debit_account_id, sent_transfer.credit_account_id, sent_transfer.amount)
        );
    }
    // Balances are exactly the sum of the transfers found: nothing twice, nothing partial.
    let mut expected: BTreeMap<u128, (u128, u128)> = BTreeMap::new();
    for transfer in found.values() {
        expected.entry(transfer.debit_account_id).or_default().0 += transfer.amount;
        expected.entry(transfer.credit_account_id).or_default().1 += transfer.amount;
    }
    let ids: Vec<u128> = (1..=ACCOUNTS).collect();
    let reply = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&ids)).await.unwrap();
    let accounts = reply.into_inner().to_ledger().unwrap();
    assert_eq!(accounts.len(), ACCOUNTS as usize);
    let (mut debits, mut credits) = (0u128, 0u128);
    for account in &accounts {
        let (debited, credited) = expected.get(&account.id).copied().unwrap_or_default();
        assert_eq!((account.debits_posted, account.credits_posted), (debited, credited), "account {}", account.id);
        debits += account.debits_posted;
        credits += account.credits_posted;
    }
    assert_eq!(debits, credits, "money is conserved");
    // Retrying acknowledged transfers applies nothing.
    let retry: Vec<Transfer> = acknowledged.values().take(8190).copied().collect();
    let reply = grpc.create_transfers(proto::CreateTransfersRequest::from_ledger(&retry)).await.unwrap();
    assert_eq!(reply.into_inner().to_ledger().unwrap(), vec![CreateTransferResult::Exists; retry.len()]);
    let reply = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&ids)).await.unwrap();
    assert_eq!(reply.into_inner().to_ledger().unwrap(), accounts);
    server.kill();
}

fn last_segment(data: &Path) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(data.join("wal"))
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|e| e == "wal"))
        .collect();
    segments.sort();
    segments.pop().expect("a log segment")
}

/// Creates accounts and `count` single-transfer requests (one log record each), then kills the server.
async fn write_records(data: &Path, count: u128) {
    let server = Server::start(data);
    create_accounts_rest(&server).await;
    let mut grpc = server.grpc().await;
    for id in 1..=count {
        let batch = [transfer(id, 1, 2, id)];
        let reply = grpc.create_transfers(proto::CreateTransfersRequest::from_ledger(&batch)).await.unwrap();
        assert_eq!(reply.into_inner().to_ledger().unwrap(), [CreateTransferResult::Ok]);
    }
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_tail_is_cut_and_the_server_starts() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 20).await;
    // A crash mid-append, before the fsync: the start of a record that never
    // completed (bytes that are not a valid record) at the end of the log.
    let segment = last_segment(dir.path());
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes.extend((0..100u32).map(|i| (i * 37 + 11) as u8));
    std::fs::write(&segment, &bytes).unwrap();

    let server = Server::start(dir.path());
    let mut grpc = server.grpc().await;
    let ids: Vec<u128> = (1..=20).collect();
    let reply = grpc.lookup_transfers(proto::LookupTransfersRequest::from_ledger(&ids)).await.unwrap();
    assert_eq!(reply.into_inner().to_ledger().unwrap().len(), 20, "every acknowledged transfer survives");
    let reply = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&[1, 2])).await.unwrap();
    let accounts = reply.into_inner().to_ledger().unwrap();
    assert_eq!(accounts[0].debits_posted, (1..=20).sum::<u128>());
    // The valid records are kept; the torn bytes are gone (the restarted
    // node's own records, a new term's vote and empty entry, follow them).
    let valid = bytes.len() - 100;
    let after = std::fs::read(&segment).unwrap();
    assert_eq!(after[..valid], bytes[..valid], "the valid records are kept");
    assert_ne!(after.get(valid..), Some(&bytes[valid..]), "the torn bytes were cut");
    server.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corruption_in_the_middle_is_reported_not_skipped() {
    let dir = tempfile::tempdir().unwrap();
    write_records(dir.path(), 20).await;
    let segment = last_segment(dir.path());
    let mut bytes = std::fs::read(&segment).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0xFF;
    std::fs::write(&segment, &bytes).unwrap();

    let output = Command::new(env!("CARGO_BIN_EXE_cellpay"))
        .args(["server", "--data"])
        .arg(dir.path())
        .args(["--listen", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!output.status.success(), "the server must refuse to start on a corrupt log");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("corrupt"), "the error names the corruption: {stderr}");
    assert_eq!(std::fs::read(&segment).unwrap(), bytes, "the damaged log is left as it was");
}
