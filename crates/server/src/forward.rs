//! Forwarding: a node that receives a request for a cell it does not lead
//! sends it on to the node that does, over the leader's own gRPC API, so a
//! client may talk to any node. The gateway sends every part of a request
//! the same way ([`call`]).
//!
//! A forwarded call carries the `cellpay-forwarded: cell=<id>` metadata: the
//! receiving node serves that cell's part with its own replica and never
//! splits or forwards it again (it answers `unavailable` instead), so a stale
//! view of who leads costs one failed hop, never a loop.
//!
//! A node's gRPC refusals say in metadata what a router needs, so that no
//! router parses message text:
//!
//! | key | on | value |
//! |---|---|---|
//! | `cellpay-nothing-applied` | every refusal that guarantees nothing was applied | `1` |
//! | `cellpay-leader` | `NotLeader` | the leader's node id, or `none` |
//! | `cellpay-account`, `cellpay-owner`, `cellpay-routing-version` | `misrouted` | the account refused, its owner and the version of the table that names it |

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use cellpay_api::proto::{self, ledger_client::LedgerClient};
use cellpay_cluster::topology::{CellId, NodeId, Topology};
use tonic::metadata::MetadataMap;
use tonic::transport::Channel;

use crate::node::{NodeError, Reply, Request};

/// The metadata key that marks a forwarded call.
pub const FORWARDED_KEY: &str = "cellpay-forwarded";
/// The metadata key a node puts on a gRPC error that guarantees nothing was applied.
pub const NOTHING_APPLIED_KEY: &str = "cellpay-nothing-applied";
/// The metadata key of a `NotLeader` refusal: the leader the refusing replica knows, or `none`.
pub const LEADER_KEY: &str = "cellpay-leader";
/// The metadata keys of a `misrouted` refusal.
pub const MISROUTED_ACCOUNT_KEY: &str = "cellpay-account";
pub const MISROUTED_OWNER_KEY: &str = "cellpay-owner";
pub const MISROUTED_VERSION_KEY: &str = "cellpay-routing-version";
/// How long a forwarded call may take.
pub const FORWARD_TIMEOUT: Duration = Duration::from_secs(15);

/// gRPC clients of the nodes, connected lazily and reused.
#[derive(Default)]
pub struct Forwarder {
    clients: Mutex<BTreeMap<NodeId, LedgerClient<Channel>>>,
}

impl Forwarder {
    /// A client of node `node` (`None` if the topology does not know it).
    pub fn client(&self, topology: &Topology, node: NodeId) -> Option<LedgerClient<Channel>> {
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
    ///
    /// The leader marks the refusals that guarantee nothing was applied:
    /// they come back as `Unavailable` (a node retries those); anything else
    /// (a broken connection, a timeout) leaves the outcome unknown:
    /// `ForwardFailed`.
    pub async fn forward(
        &self,
        topology: &Topology,
        node: NodeId,
        cell: CellId,
        request: Request,
    ) -> Result<Reply, NodeError> {
        let Some(client) = self.client(topology, node) else {
            return Err(NodeError::Unavailable { cell, reason: format!("leader node {node} is not in the topology") });
        };
        call(client, node, cell, request, FORWARD_TIMEOUT).await.map_err(|error| match error {
            CallError::Refused { message, .. } => {
                NodeError::Unavailable { cell, reason: format!("leader node {node}: {message}") }
            }
            CallError::NoAnswer { reason } => NodeError::ForwardFailed { cell, node, reason },
        })
    }
}

/// How a call to a node failed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CallError {
    /// The node refused, marking that nothing was applied.
    Refused {
        code: tonic::Code,
        message: String,
        /// `NotLeader`: the leader the node named (`Some(None)`: it knows none).
        not_leader: Option<Option<NodeId>>,
        /// `misrouted`: the account, its owner and the version of the table naming it.
        misrouted: Option<(u128, CellId, u64)>,
    },
    /// No answer, an unmarked error or an unreadable reply: the call may or
    /// may not have been applied.
    NoAnswer { reason: String },
}

/// Sends `request` to node `node` as a call forwarded for `cell` (served by
/// that node's replica of the cell only, never forwarded again), and reads
/// its answer. The client is cloned by the caller (tonic clients are cheap
/// handles on one connection).
pub async fn call(
    mut client: LedgerClient<Channel>,
    node: NodeId,
    cell: CellId,
    request: Request,
    timeout: Duration,
) -> Result<Reply, CallError> {
    let failed = |status: tonic::Status| refusal(node, &status);
    let malformed = |error: cellpay_api::DecodeError| CallError::NoAnswer {
        reason: format!("node {node} answered a malformed reply: {error}"),
    };
    // The call names its cell: the node serves that cell's part only.
    fn forwarded<T>(message: T, cell: CellId, timeout: Duration) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        request.set_timeout(timeout);
        let value = format!("cell={cell}").parse().expect("a cell id is ASCII");
        request.metadata_mut().insert(FORWARDED_KEY, value);
        request
    }
    Ok(match request {
        Request::CreateAccounts(accounts) => {
            let request = forwarded(proto::CreateAccountsRequest::from_ledger(&accounts), cell, timeout);
            let reply = client.create_accounts(request).await.map_err(failed)?;
            Reply::CreateAccounts(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::CreateTransfers(transfers) => {
            let request = forwarded(proto::CreateTransfersRequest::from_ledger(&transfers), cell, timeout);
            let reply = client.create_transfers(request).await.map_err(failed)?;
            Reply::CreateTransfers(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::LookupAccounts(ids) => {
            let request = forwarded(proto::LookupAccountsRequest::from_ledger(&ids), cell, timeout);
            let reply = client.lookup_accounts(request).await.map_err(failed)?;
            Reply::Accounts(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::LookupTransfers(ids) => {
            let request = forwarded(proto::LookupTransfersRequest::from_ledger(&ids), cell, timeout);
            let reply = client.lookup_transfers(request).await.map_err(failed)?;
            Reply::Transfers(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::GetAccountTransfers(filter) => {
            let request = forwarded(proto::GetAccountTransfersRequest::from_ledger(&filter), cell, timeout);
            let reply = client.get_account_transfers(request).await.map_err(failed)?;
            Reply::Transfers(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::GetAccountBalances(filter) => {
            let request = forwarded(proto::GetAccountBalancesRequest::from_ledger(&filter), cell, timeout);
            let reply = client.get_account_balances(request).await.map_err(failed)?;
            Reply::Balances(reply.into_inner().to_ledger().map_err(malformed)?)
        }
        Request::ChangeRouting { .. }
        | Request::ShardOwnership { .. }
        | Request::DefineLedger { .. }
        | Request::ChangeTopology { .. } => {
            return Err(CallError::Refused {
                code: tonic::Code::InvalidArgument,
                message: "operator changes are not forwarded: send them to the cell's leader".to_string(),
                not_leader: None,
                misrouted: None,
            });
        }
    })
}

/// What a failed call's status says, by its metadata.
fn refusal(node: NodeId, status: &tonic::Status) -> CallError {
    let metadata = status.metadata();
    if !metadata.contains_key(NOTHING_APPLIED_KEY) {
        return CallError::NoAnswer { reason: format!("node {node}: {:?}: {}", status.code(), status.message()) };
    }
    let not_leader = metadata_text(metadata, LEADER_KEY).map(|leader| leader.parse::<NodeId>().ok());
    let misrouted = (|| {
        let account = metadata_text(metadata, MISROUTED_ACCOUNT_KEY)?.parse().ok()?;
        let owner = metadata_text(metadata, MISROUTED_OWNER_KEY)?.parse().ok()?;
        let version = metadata_text(metadata, MISROUTED_VERSION_KEY)?.parse().ok()?;
        Some((account, owner, version))
    })();
    CallError::Refused { code: status.code(), message: status.message().to_string(), not_leader, misrouted }
}

fn metadata_text<'a>(metadata: &'a MetadataMap, key: &str) -> Option<&'a str> {
    metadata.get(key)?.to_str().ok()
}

/// The metadata a node puts on its refusal `error` (see the module's table).
pub fn refusal_metadata(error: &NodeError, metadata: &mut MetadataMap) {
    let mut insert = |key: &'static str, value: String| {
        if let Ok(value) = value.parse() {
            metadata.insert(key, value);
        }
    };
    if error.nothing_applied() {
        insert(NOTHING_APPLIED_KEY, "1".to_string());
    }
    match error {
        NodeError::NotLeader { leader, .. } => {
            insert(LEADER_KEY, leader.map_or_else(|| "none".to_string(), |leader| leader.to_string()));
        }
        NodeError::Misrouted { account, owner, routing_version, .. } => {
            insert(MISROUTED_ACCOUNT_KEY, account.to_string());
            insert(MISROUTED_OWNER_KEY, owner.to_string());
            insert(MISROUTED_VERSION_KEY, routing_version.to_string());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn status_of(error: &NodeError) -> tonic::Status {
        let mut status = tonic::Status::unavailable(error.to_string());
        refusal_metadata(error, status.metadata_mut());
        status
    }

    #[test]
    fn a_routers_refusals_round_trip_through_metadata() {
        let not_leader = NodeError::NotLeader { cell: 2, leader: Some(4) };
        match refusal(1, &status_of(&not_leader)) {
            CallError::Refused { not_leader: Some(Some(4)), misrouted: None, .. } => {}
            other => panic!("{other:?}"),
        }
        let no_leader = NodeError::NotLeader { cell: 2, leader: None };
        assert!(matches!(refusal(1, &status_of(&no_leader)), CallError::Refused { not_leader: Some(None), .. }));
        let account = u128::MAX - 5;
        let misrouted = NodeError::Misrouted { cell: 1, account, owner: 3, routing_version: 9 };
        match refusal(1, &status_of(&misrouted)) {
            CallError::Refused { misrouted: Some((refused, 3, 9)), not_leader: None, .. } => {
                assert_eq!(refused, account)
            }
            other => panic!("{other:?}"),
        }
        let unavailable = NodeError::Unavailable { cell: 1, reason: "no leader".into() };
        assert!(matches!(
            refusal(1, &status_of(&unavailable)),
            CallError::Refused { not_leader: None, misrouted: None, .. }
        ));
        // Without the nothing-applied mark the outcome is unknown, whatever else the status says.
        let timeout = NodeError::Timeout { cell: 1, timeout_ms: 10 };
        assert!(matches!(refusal(1, &status_of(&timeout)), CallError::NoAnswer { .. }));
        assert!(matches!(refusal(1, &tonic::Status::unavailable("connection refused")), CallError::NoAnswer { .. }));
    }
}
