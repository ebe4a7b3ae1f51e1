//! `cellpay gateway`: the stateless router in front of a cluster, serving
//! the nodes' REST and gRPC API on one port (see `server::gateway`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{Context, Result};
use cellpay_cluster::topology::Topology;
use cellpay_server::front::{serve, FrontLimits};
use cellpay_server::gateway::{Gateway, GatewayConfig, CELL_CALLS_MAX_DEFAULT, QUEUE_PARTS_MAX_DEFAULT};

use crate::server::shutdown_signal;

#[derive(clap::Args)]
pub struct GatewayArgs {
    /// The cluster's topology file: the nodes' addresses, the cells and the first routing table.
    #[arg(long)]
    pub cluster: PathBuf,
    /// Address to serve REST and gRPC on.
    #[arg(long, default_value = "127.0.0.1:7390")]
    pub listen: SocketAddr,
    /// The region the gateway runs in: its nodes are asked first for the
    /// routing table and the cells' leaders.
    #[arg(long)]
    pub region: Option<String>,
    /// Send each client's parts alone instead of combining concurrent
    /// clients' parts into one call per cell.
    #[arg(long)]
    pub no_batching: bool,
    /// Parts waiting per cell and kind; one more is refused `overloaded`.
    #[arg(long, default_value_t = QUEUE_PARTS_MAX_DEFAULT)]
    pub queue_parts_max: usize,
    /// Combined calls in flight per cell and kind.
    #[arg(long, default_value_t = CELL_CALLS_MAX_DEFAULT)]
    pub cell_calls_max: usize,
    /// Most concurrent client connections.
    #[arg(long, default_value_t = FrontLimits::default().connections_max)]
    pub connections_max: usize,
}

pub async fn run(args: GatewayArgs) -> Result<()> {
    let topology = Arc::new(Topology::load(&args.cluster)?);
    let config = GatewayConfig {
        region: args.region.clone(),
        batching: !args.no_batching,
        queue_parts_max: args.queue_parts_max,
        cell_calls_max: args.cell_calls_max,
        ..GatewayConfig::new(topology.clone())
    };
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let address = listener.local_addr()?;
    let gateway = Gateway::start(config).context("cannot start the gateway")?;
    // Scripts and tests wait for this line.
    println!(
        "cellpay gateway listening on {address} ({} nodes, {} cells, batching {})",
        topology.nodes().count(),
        topology.cells.len(),
        if args.no_batching { "off" } else { "on" }
    );
    let limits = FrontLimits { connections_max: args.connections_max, ..FrontLimits::default() };
    serve(listener, gateway.handle(), limits, shutdown_signal()).await?;
    tracing::info!("gateway stopped");
    gateway.shutdown();
    Ok(())
}
