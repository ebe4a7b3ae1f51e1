//! Forwarding: a node that receives a request for a cell it does not lead
//! sends it on to the node that does, over the leader's own gRPC API, so a
//! client may talk to any node.
//!
//! A forwarded call carries the `cellpay-forwarded: cell=<id>` metadata: the
//! receiving node serves that cell's part with its own replica and never
//! splits or forwards it again (it answers `unavailable` instead), so a stale
//! view of who leads costs one failed hop, never a loop.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use cellpay_api::proto::{self, ledger_client::LedgerClient};
use cellpay_cluster::topology::{CellId, NodeId, Topology};
use tonic::transport::Channel;

use crate::node::{NodeError, Reply, Request};

/// The metadata key that marks a forwarded call.
pub const FORWARDED_KEY: &str = "cellpay-forwarded";
/// The metadata key a node puts on a gRPC error that guarantees nothing was applied.
pub const NOTHING_APPLIED_KEY: &str = "cellpay-nothing-applied";
/// How long a forwarded call may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// gRPC clients of the other nodes, connected lazily and reused.
#[derive(Default)]
pub struct Forwarder {
    clients: Mutex<BTreeMap<NodeId, LedgerClient<Channel>>>,
}

impl Forwarder {
    fn client(&self, topology: &Topology, node: NodeId) -> Option<LedgerClient<Channel>> {
        let mut clients = self.clients.lock().expect("forwarder lock");
        if let Some(client) = clients.get(&node) {
            return Some(client.clone());
        }
        let address = topology.node(node)?.client_address;
        let channel = Channel::from_shared(format!("http://{address}")).ok()?.connect_lazy();
        let client = LedgerClient::new(channel)
            .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
            .max_encoding_message_size(proto::MESSAGE_BYTES_MAX);
        clients.insert(node, client.clone());
        Some(client)
    }

    /// Sends a request for `cell` to node `node` and returns its answer.
    pub async fn forward(
        &self,
        topology: &Topology,
        node: NodeId,
        cell: CellId,
        request: Request,
    ) -> Result<Reply, NodeError> {
        let Some(mut client) = self.client(topology, node) else {
            return Err(NodeError::Unavailable { cell, reason: format!("leader node {node} is not in the topology") });
        };
        // The leader marks the refusals that guarantee nothing was applied;
        // anything else (a broken connection, a timeout) leaves the outcome unknown.
        let failed = |status: tonic::Status| {
            let reason = format!("leader node {node}: {}", status.message());
            if status.metadata().contains_key(NOTHING_APPLIED_KEY) {
                NodeError::Unavailable { cell, reason }
            } else {
                NodeError::ForwardFailed { cell, node, reason }
            }
        };
        let malformed = |error: cellpay_api::DecodeError| NodeError::ForwardFailed {
            node,
            cell,
            reason: format!("leader node {node} answered a malformed reply: {error}"),
        };
        // The call names its cell: the leader serves that cell's part only.
        fn call<T>(message: T, cell: CellId) -> tonic::Request<T> {
            let mut request = tonic::Request::new(message);
            request.set_timeout(FORWARD_TIMEOUT);
            let value = format!("cell={cell}").parse().expect("a cell id is ASCII");
            request.metadata_mut().insert(FORWARDED_KEY, value);
            request
        }
        Ok(match request {
            Request::CreateAccounts(accounts) => {
                let reply = client
                    .create_accounts(call(proto::CreateAccountsRequest::from_ledger(&accounts), cell))
                    .await
                    .map_err(failed)?;
                Reply::CreateAccounts(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::CreateTransfers(transfers) => {
                let reply = client
                    .create_transfers(call(proto::CreateTransfersRequest::from_ledger(&transfers), cell))
                    .await
                    .map_err(failed)?;
                Reply::CreateTransfers(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::LookupAccounts(ids) => {
                let reply = client
                    .lookup_accounts(call(proto::LookupAccountsRequest::from_ledger(&ids), cell))
                    .await
                    .map_err(failed)?;
                Reply::Accounts(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::LookupTransfers(ids) => {
                let reply = client
                    .lookup_transfers(call(proto::LookupTransfersRequest::from_ledger(&ids), cell))
                    .await
                    .map_err(failed)?;
                Reply::Transfers(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::GetAccountTransfers(filter) => {
                let reply = client
                    .get_account_transfers(call(proto::GetAccountTransfersRequest::from_ledger(&filter), cell))
                    .await
                    .map_err(failed)?;
                Reply::Transfers(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::GetAccountBalances(filter) => {
                let reply = client
                    .get_account_balances(call(proto::GetAccountBalancesRequest::from_ledger(&filter), cell))
                    .await
                    .map_err(failed)?;
                Reply::Balances(reply.into_inner().to_ledger().map_err(malformed)?)
            }
            Request::ChangeRouting { .. } | Request::ShardOwnership { .. } => {
                let reason = "operator changes are not forwarded: send them to the cell's leader".to_string();
                return Err(NodeError::Unavailable { cell, reason });
            }
        })
    }
}
