//! `cellpay`: the one binary. See `cellpay --help`.

mod bench;
mod client;
mod commands;
mod ctl;
mod demo;
mod gateway;
mod ledger_defs;
mod server;
mod shard_move;
mod sim;
mod topology_apply;

use anyhow::Result;
use clap::{Parser, Subcommand};

/// jemalloc rather than glibc's allocator: a node allocates and frees tens
/// of megabytes per checkpoint (the delta, the store's write batch, the next
/// window's buffers). glibc maps each such block fresh and unmaps it on free,
/// so every checkpoint paid page faults that zero the same memory again (12 %
/// of the machine's CPU in the five-node benchmark, see BENCHMARKS.md);
/// jemalloc keeps freed memory for reuse.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// jemalloc's options, read when it starts (`_RJEM_MALLOC_CONF` in the
/// environment overrides them). By default jemalloc hands memory freed for
/// 10 s back to the kernel, and a node's checkpoint cycle is about that
/// long: each checkpoint faulted in and zeroed its buffers again. With decay
/// off a process keeps its peak footprint (which the node's limits bound:
/// accounts, the checkpoint window, queues) and never faults for memory it
/// had: the five-node benchmark took 60 % fewer page faults and 8–46 % more
/// transfers/s in three paired runs (BENCHMARKS.md). It is the static
/// allocation of TigerBeetle, reached by keeping rather than reserving.
#[used]
#[export_name = "_rjem_malloc_conf"]
static MALLOC_CONF: MallocConf = MallocConf(c"dirty_decay_ms:-1,muzzy_decay_ms:-1".as_ptr());

/// A C string pointer, as jemalloc reads `malloc_conf`.
#[repr(transparent)]
struct MallocConf(*const std::ffi::c_char);

// SAFETY: the pointer is to a string literal, never written.
unsafe impl Sync for MallocConf {}

/// cellpay: a financial-grade payment ledger.
#[derive(Parser)]
#[command(name = "cellpay", version, about, propagate_version = true)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a durable single-node server (REST and gRPC on one port).
    Server(server::ServerArgs),
    /// Run one node of a cluster (hosts a replica of every cell placed on it).
    Node(server::NodeArgs),
    /// Run a gateway: the stateless router in front of a cluster (same API as a node).
    Gateway(gateway::GatewayArgs),
    /// Operate a cluster: write a topology file, show leaders and health.
    Ctl(ctl::CtlArgs),
    /// Run a local node with a steady payment workload and a live summary.
    Demo(demo::DemoArgs),
    /// Create accounts.
    Account(commands::AccountArgs),
    /// Create a transfer: a simple one, a pending one, or post/void a pending one.
    Transfer(commands::TransferArgs),
    /// Look up accounts or transfers by id.
    Lookup(commands::LookupArgs),
    /// An account's transfers (or balance history), with filters and pagination.
    History(commands::HistoryArgs),
    /// Generate load against a server and report throughput and latency.
    Bench(bench::BenchArgs),
    /// Run the deterministic simulator: the whole cluster under faults, one seed.
    Sim(sim::SimArgs),
}

fn main() -> Result<()> {
    // A panic is a bug or a failed storage write (fsync): stop the whole
    // process at once (fail-stop), so a supervisor restarts it and recovery
    // runs from disk, rather than leave a half-alive server that refuses work.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        report(info);
        std::process::abort();
    }));
    let cli = Cli::parse();
    if let Command::Sim(args) = cli.command {
        // Quiet unless asked: the engines log every election of every run.
        let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "error".into());
        tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
        if !sim::main(args)? {
            std::process::exit(1);
        }
        return Ok(());
    }
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    runtime.block_on(async move {
        match cli.command {
            Command::Server(args) => server::run(args).await,
            Command::Node(args) => server::run_node(args).await,
            Command::Gateway(args) => gateway::run(args).await,
            Command::Ctl(args) => ctl::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::Account(args) => commands::account(args).await,
            Command::Transfer(args) => commands::transfer(args).await,
            Command::Lookup(args) => commands::lookup(args).await,
            Command::History(args) => commands::history(args).await,
            Command::Bench(args) => bench::run(args).await,
            Command::Sim(_) => unreachable!("run above"),
        }
    })
}
