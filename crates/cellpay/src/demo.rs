//! `cellpay demo`: a durable local node with a steady payment workload and a
//! live summary. (Later issues grow it into the three-region cluster.)
//!
//! The workload is a small payment company: customers (who cannot overdraw),
//! merchants, and a bank account that funds customers. Every tick sends one
//! batch mixing card payments (customer → merchant), two-phase card
//! authorisations (pending, then posted or voided a tick later), and linked
//! payment-plus-fee chains. Some payments fail with `exceeds_credits`, as they
//! would in life; the summary shows results by code. Every few seconds the
//! demo audits that all its accounts conserve money.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use cellpay_ledger::{
    id, Account, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer, TransferFlags, BATCH_EVENTS_MAX,
};
use cellpay_server::front::{serve, FrontLimits};
use cellpay_server::node::{NodeConfig, NodeHandle, Reply, Request};
use hdrhistogram::Histogram;

use crate::bench::Rng;
use crate::server::{shutdown_signal, start_node};

#[derive(clap::Args)]
pub struct DemoArgs {
    /// Data directory; running again resumes from it.
    #[arg(long, default_value = "cellpay-demo-data")]
    pub data: PathBuf,
    /// Delete the data directory first and start over.
    #[arg(long)]
    pub fresh: bool,
    /// Also serve the REST and gRPC APIs here, for the CLI and curl.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: SocketAddr,
    /// Transfers per second the workload aims for.
    #[arg(long, default_value_t = 20_000)]
    pub rate: u64,
    /// Stop after this many seconds (default: run until Ctrl-C).
    #[arg(long)]
    pub duration_s: Option<u64>,
}

const LEDGER: u32 = 1;
const CUSTOMERS: u64 = 10_000;
const MERCHANTS: u64 = 100;
const TICK: Duration = Duration::from_millis(100);

fn customer(index: u64) -> u128 {
    id::account_id(1_000_000 + index, 1).expect("not reserved")
}

fn merchant(index: u64) -> u128 {
    id::account_id(2_000_000 + index, 1).expect("not reserved")
}

fn bank() -> u128 {
    id::account_id(3_000_000, 1).expect("not reserved")
}

fn all_accounts() -> Vec<u128> {
    let mut ids: Vec<u128> = (0..CUSTOMERS).map(customer).chain((0..MERCHANTS).map(merchant)).collect();
    ids.push(bank());
    ids
}

pub async fn run(args: DemoArgs) -> Result<()> {
    if args.fresh && args.data.exists() {
        std::fs::remove_dir_all(&args.data).with_context(|| format!("cannot remove {}", args.data.display()))?;
    }
    let node = start_node(NodeConfig::new(&args.data))?;
    let handle = node.handle();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    println!("cellpay demo: one durable node, data in {}", args.data.display());
    println!("API on {} (try: cellpay lookup account {} --address {})", listener.local_addr()?, bank(), args.listen);
    let (stop_front, front_stopped) = tokio::sync::oneshot::channel::<()>();
    let front = tokio::spawn(serve(listener, handle.clone(), FrontLimits::default(), async {
        let _ = front_stopped.await;
    }));

    setup(&handle).await?;
    let outcome = tokio::select! {
        result = workload(&handle, &args) => result,
        _ = shutdown_signal() => Ok(()),
    };
    println!("stopping: auditing, then writing a checkpoint");
    let audit = audit(&handle).await;
    let _ = stop_front.send(());
    front.await??;
    drop(handle);
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    outcome?;
    match audit? {
        true => println!("audit: every account conserves money (Σ debits = Σ credits, posted and pending)"),
        false => bail!("audit failed: the demo's accounts do not conserve money"),
    }
    Ok(())
}

async fn submit(handle: &NodeHandle, request: Request) -> Result<Reply> {
    handle.submit(request).await.map_err(|error| anyhow::anyhow!("node refused a request: {error}"))
}

/// Creates the accounts (idempotently) and funds customers that have no money yet.
async fn setup(handle: &NodeHandle) -> Result<()> {
    let mut accounts: Vec<Account> = (0..CUSTOMERS)
        .map(|i| Account {
            id: customer(i),
            ledger: LEDGER,
            code: 1,
            flags: AccountFlags::DEBITS_MUST_NOT_EXCEED_CREDITS,
            ..Account::default()
        })
        .collect();
    accounts.extend((0..MERCHANTS).map(|i| Account { id: merchant(i), ledger: LEDGER, code: 2, ..Account::default() }));
    accounts.push(Account { id: bank(), ledger: LEDGER, code: 3, flags: AccountFlags::HISTORY, ..Account::default() });
    let mut created = 0;
    for chunk in accounts.chunks(BATCH_EVENTS_MAX) {
        let Reply::CreateAccounts(results) = submit(handle, Request::CreateAccounts(chunk.to_vec())).await? else {
            bail!("unexpected reply");
        };
        for (account, result) in chunk.iter().zip(results) {
            match result {
                CreateAccountResult::Ok => created += 1,
                CreateAccountResult::Exists => {}
                other => bail!("account {} could not be created: {other}", account.id),
            }
        }
    }
    if created > 0 {
        // Fund every customer once, with ids derived from the customer, so a rerun never funds twice.
        let deposits: Vec<Transfer> = (0..CUSTOMERS)
            .map(|i| Transfer {
                id: customer(i),
                debit_account_id: bank(),
                credit_account_id: customer(i),
                amount: 100_000,
                ledger: LEDGER,
                code: 10,
                ..Transfer::default()
            })
            .collect();
        for chunk in deposits.chunks(BATCH_EVENTS_MAX) {
            submit(handle, Request::CreateTransfers(chunk.to_vec())).await?;
        }
    }
    println!("accounts: {CUSTOMERS} customers, {MERCHANTS} merchants, 1 bank ({created} created now)");
    Ok(())
}

async fn workload(handle: &NodeHandle, args: &DemoArgs) -> Result<()> {
    let started = Instant::now();
    let per_tick = (args.rate * TICK.as_millis() as u64 / 1000).clamp(4, BATCH_EVENTS_MAX as u64 - 8) as usize;
    let mut rng = Rng::new(0xC0FFEE);
    let mut id_next = u128::from(SystemTime::now().duration_since(UNIX_EPOCH)?.as_nanos() as u64) << 64;
    let mut authorised: Vec<u128> = Vec::new();
    let mut results: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut latency = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    let mut window = (Instant::now(), 0u64);
    let mut ticker = tokio::time::interval(TICK);
    let mut seconds = 0u64;
    loop {
        ticker.tick().await;
        if args.duration_s.is_some_and(|limit| started.elapsed().as_secs() >= limit) {
            return Ok(());
        }
        let mut batch = Vec::with_capacity(per_tick + authorised.len());
        // Resolve last tick's authorisations: capture most, void some.
        for pending_id in authorised.drain(..) {
            id_next += 1;
            let flags = if rng.below(5) == 0 {
                TransferFlags::VOID_PENDING_TRANSFER
            } else {
                TransferFlags::POST_PENDING_TRANSFER
            };
            batch.push(Transfer { id: id_next, pending_id, flags, ..Transfer::default() });
        }
        let mut pending_ids = Vec::new();
        while batch.len() < per_tick {
            let payer = customer(rng.below(CUSTOMERS));
            let payee = merchant(rng.below(MERCHANTS).min(rng.below(MERCHANTS)));
            let amount = 1 + u128::from(rng.below(2_000));
            id_next += 1;
            let payment = Transfer {
                id: id_next,
                debit_account_id: payer,
                credit_account_id: payee,
                amount,
                ledger: LEDGER,
                code: 20,
                ..Transfer::default()
            };
            match rng.below(10) {
                0..=6 => batch.push(payment),
                7 | 8 => {
                    pending_ids.push(id_next);
                    batch.push(Transfer { flags: TransferFlags::PENDING, timeout_s: 60, code: 21, ..payment });
                }
                _ => {
                    // A payment and its fee to the bank, all or nothing.
                    batch.push(Transfer { flags: TransferFlags::LINKED, ..payment });
                    id_next += 1;
                    batch.push(Transfer {
                        id: id_next,
                        debit_account_id: payer,
                        credit_account_id: bank(),
                        amount: 1 + amount / 100,
                        ledger: LEDGER,
                        code: 22,
                        ..Transfer::default()
                    });
                }
            }
        }
        let sent_at = Instant::now();
        let Reply::CreateTransfers(batch_results) = submit(handle, Request::CreateTransfers(batch.clone())).await?
        else {
            bail!("unexpected reply");
        };
        latency.saturating_record(sent_at.elapsed().as_micros() as u64);
        for (transfer, result) in batch.iter().zip(&batch_results) {
            *results.entry(result.as_str()).or_default() += 1;
            if *result == CreateTransferResult::Ok && pending_ids.contains(&transfer.id) {
                authorised.push(transfer.id);
            }
        }
        window.1 += batch.len() as u64;
        if window.0.elapsed() >= Duration::from_secs(1) {
            seconds += 1;
            let rate = window.1 as f64 / window.0.elapsed().as_secs_f64();
            let ok = results.get("ok").copied().unwrap_or(0);
            let total: u64 = results.values().sum();
            let others: Vec<String> =
                results.iter().filter(|(code, _)| **code != "ok").map(|(code, n)| format!("{code}={n}")).collect();
            println!(
                "[{seconds:>4}s] {rate:>8.0} transfers/s  batch p50 {:>6.2} ms  p99 {:>6.2} ms  ok {ok}/{total}  {}",
                latency.value_at_quantile(0.5) as f64 / 1000.0,
                latency.value_at_quantile(0.99) as f64 / 1000.0,
                others.join(" "),
            );
            if seconds.is_multiple_of(10) {
                let conserved = audit(handle).await?;
                println!(
                    "[{seconds:>4}s] audit: {}",
                    if conserved { "money conserved" } else { "CONSERVATION BROKEN" }
                );
                if !conserved {
                    bail!("audit failed");
                }
            }
            latency.reset();
            window = (Instant::now(), 0);
        }
    }
}

/// True when the demo's accounts conserve money.
async fn audit(handle: &NodeHandle) -> Result<bool> {
    let (mut debits, mut credits, mut debits_pending, mut credits_pending) = (0u128, 0u128, 0u128, 0u128);
    for chunk in all_accounts().chunks(BATCH_EVENTS_MAX) {
        let Reply::Accounts(accounts) = submit(handle, Request::LookupAccounts(chunk.to_vec())).await? else {
            bail!("unexpected reply");
        };
        for a in accounts {
            debits += a.debits_posted;
            credits += a.credits_posted;
            debits_pending += a.debits_pending;
            credits_pending += a.credits_pending;
        }
    }
    Ok(debits == credits && debits_pending == credits_pending)
}
