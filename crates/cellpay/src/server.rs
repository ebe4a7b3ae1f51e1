//! `cellpay server`: one durable node alone, serving REST and gRPC on one port.
//! `cellpay node`: one node of a cluster described by a topology file.

use std::net::SocketAddr;
use std::path::PathBuf;

use std::sync::Arc;

use anyhow::{Context, Result};
use cellpay_cluster::topology::Topology;
use cellpay_server::front::{serve, FrontLimits};
use cellpay_server::node::{Node, NodeConfig};

#[derive(clap::Args)]
pub struct ServerArgs {
    /// Data directory (created if missing): the write-ahead log and the history store.
    #[arg(long)]
    pub data: PathBuf,
    /// Address to serve REST and gRPC on.
    #[arg(long, default_value = "127.0.0.1:7300")]
    pub listen: SocketAddr,
    /// Checkpoint once this many transfers are held in memory.
    #[arg(long, default_value_t = 1 << 18)]
    pub checkpoint_transfers: usize,
    /// Most concurrent client connections.
    #[arg(long, default_value_t = FrontLimits::default().connections_max)]
    pub connections_max: usize,
}

#[derive(clap::Args)]
pub struct NodeArgs {
    /// The cluster's topology file (TOML: regions, datacenters, nodes, cells).
    #[arg(long)]
    pub cluster: PathBuf,
    /// This node's id in the topology.
    #[arg(long)]
    pub node: u64,
    /// Data directory (created if missing): the write-ahead log and the history store.
    #[arg(long)]
    pub data: PathBuf,
    /// Checkpoint a cell once this many transfers are held in memory.
    #[arg(long, default_value_t = 1 << 18)]
    pub checkpoint_transfers: usize,
    /// Most concurrent client connections.
    #[arg(long, default_value_t = FrontLimits::default().connections_max)]
    pub connections_max: usize,
}

pub async fn run_node(args: NodeArgs) -> Result<()> {
    let topology = Topology::load(&args.cluster)?;
    let Some(spec) = topology.node(args.node).cloned() else {
        anyhow::bail!("node {} is not in the topology {}", args.node, args.cluster.display());
    };
    let config = NodeConfig {
        checkpoint_transfers_max: args.checkpoint_transfers,
        ..NodeConfig::cluster(&args.data, Arc::new(topology), args.node)
    };
    let listener = tokio::net::TcpListener::bind(spec.client_address)
        .await
        .with_context(|| format!("cannot listen on {}", spec.client_address))?;
    let node = start_node(config)?;
    // Scripts and tests wait for this line.
    println!(
        "cellpay node {} listening on {} (peers on {}, data {})",
        args.node,
        spec.client_address,
        spec.peer_address,
        args.data.display()
    );
    let limits = FrontLimits { connections_max: args.connections_max, ..FrontLimits::default() };
    serve(listener, node.handle(), limits, shutdown_signal()).await?;
    tracing::info!("stopping: finishing queued requests and writing a checkpoint");
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    Ok(())
}

pub async fn run(args: ServerArgs) -> Result<()> {
    let config = NodeConfig { checkpoint_transfers_max: args.checkpoint_transfers, ..NodeConfig::new(&args.data) };
    let node = start_node(config)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    // Scripts and tests wait for this line.
    println!("cellpay server listening on {address} (data {})", args.data.display());
    let limits = FrontLimits { connections_max: args.connections_max, ..FrontLimits::default() };
    serve(listener, node.handle(), limits, shutdown_signal()).await?;
    tracing::info!("stopping: finishing queued requests and writing a checkpoint");
    tokio::task::spawn_blocking(move || node.shutdown()).await?;
    Ok(())
}

/// Starts a node, logging what recovery found.
pub fn start_node(config: NodeConfig) -> Result<Node> {
    let data = config.data_dir.clone();
    let node = Node::start(config).with_context(|| format!("cannot start the node on {}", data.display()))?;
    let recovery = &node.recovery;
    tracing::info!(
        cells = recovery.cells.len(),
        records_replayed = recovery.records_replayed,
        torn_tail_bytes_cut = recovery.torn_tail_bytes_cut,
        accounts = recovery.accounts,
        pending_open = recovery.pending_open,
        "node started"
    );
    Ok(node)
}

/// Resolves on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let mut terminate =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}
