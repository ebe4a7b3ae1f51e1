//! The gRPC API (`cellpay.v1.Ledger`): the generated tonic service, decoded
//! and encoded by `cellpay_api::proto`.
//!
//! Status codes follow `cellpay_api::ErrorCode::grpc_code`: `INVALID_ARGUMENT`
//! for a malformed request, `RESOURCE_EXHAUSTED` for a message over
//! `proto::MESSAGE_BYTES_MAX`, `UNAVAILABLE` when overloaded or shutting down,
//! `INTERNAL` for a server bug. Nothing is applied when a call fails.

use axum::response::Response;
use axum::Router;
use cellpay_api::proto::ledger_server::{Ledger, LedgerServer};
use cellpay_api::proto::{self, MESSAGE_BYTES_MAX};
use cellpay_api::ErrorCode;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::{grpc_response, node_error_code, record_events};
use crate::forward::{FORWARDED_KEY, NOTHING_APPLIED_KEY};
use crate::node::{NodeError, NodeHandle, Origin, Reply, Request};

pub(super) fn router(handle: NodeHandle) -> Router {
    let server = LedgerServer::new(GrpcLedger { handle })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let path = format!("/{}/{{*method}}", <LedgerServer<GrpcLedger> as NamedService>::NAME);
    Router::new().route_service(&path, server).layer(axum::middleware::map_response(message_too_large))
}

struct GrpcLedger {
    handle: NodeHandle,
}

impl GrpcLedger {
    async fn submit<T>(&self, call: &tonic::Request<T>, request: Request) -> Result<Reply, Status> {
        record_events(&request);
        // A forwarded call names the cell it is for.
        let forwarded = call.metadata().get(FORWARDED_KEY);
        let result = match forwarded.map(|value| value.to_str().ok()?.strip_prefix("cell=")?.parse().ok()) {
            Some(Some(cell)) => self.handle.submit_forwarded(cell, request).await,
            Some(None) => {
                Err(NodeError::Unavailable { cell: 0, reason: format!("a malformed {FORWARDED_KEY} header") })
            }
            None => self.handle.submit_from(request, Origin::Client).await,
        };
        result.map_err(|error| {
            let mut status = Status::new(node_error_code(&error).grpc_code(), error.to_string());
            if error.nothing_applied() {
                status.metadata_mut().insert(NOTHING_APPLIED_KEY, tonic::metadata::MetadataValue::from_static("1"));
            }
            status
        })
    }
}

/// The node answered with a reply of another kind: a bug in the node, answered `INTERNAL`.
fn unexpected_reply(operation: &str, reply: &Reply) -> Status {
    tracing::error!(operation, ?reply, "the node answered with a reply of the wrong kind");
    Status::new(ErrorCode::Internal.grpc_code(), "internal error")
}

#[tonic::async_trait]
impl Ledger for GrpcLedger {
    async fn create_accounts(
        &self,
        request: tonic::Request<proto::CreateAccountsRequest>,
    ) -> Result<tonic::Response<proto::CreateAccountsReply>, Status> {
        let accounts = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::CreateAccounts(accounts)).await? {
            Reply::CreateAccounts(results) => {
                Ok(tonic::Response::new(proto::CreateAccountsReply::from_ledger(&results)))
            }
            reply => Err(unexpected_reply("create_accounts", &reply)),
        }
    }

    async fn create_transfers(
        &self,
        request: tonic::Request<proto::CreateTransfersRequest>,
    ) -> Result<tonic::Response<proto::CreateTransfersReply>, Status> {
        let transfers = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::CreateTransfers(transfers)).await? {
            Reply::CreateTransfers(results) => {
                Ok(tonic::Response::new(proto::CreateTransfersReply::from_ledger(&results)))
            }
            reply => Err(unexpected_reply("create_transfers", &reply)),
        }
    }

    async fn lookup_accounts(
        &self,
        request: tonic::Request<proto::LookupAccountsRequest>,
    ) -> Result<tonic::Response<proto::LookupAccountsReply>, Status> {
        let ids = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::LookupAccounts(ids)).await? {
            Reply::Accounts(accounts) => Ok(tonic::Response::new(proto::LookupAccountsReply::from_ledger(&accounts))),
            reply => Err(unexpected_reply("lookup_accounts", &reply)),
        }
    }

    async fn lookup_transfers(
        &self,
        request: tonic::Request<proto::LookupTransfersRequest>,
    ) -> Result<tonic::Response<proto::LookupTransfersReply>, Status> {
        let ids = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::LookupTransfers(ids)).await? {
            Reply::Transfers(transfers) => {
                Ok(tonic::Response::new(proto::LookupTransfersReply::from_ledger(&transfers)))
            }
            reply => Err(unexpected_reply("lookup_transfers", &reply)),
        }
    }

    async fn get_account_transfers(
        &self,
        request: tonic::Request<proto::GetAccountTransfersRequest>,
    ) -> Result<tonic::Response<proto::GetAccountTransfersReply>, Status> {
        let filter = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::GetAccountTransfers(filter)).await? {
            Reply::Transfers(transfers) => {
                Ok(tonic::Response::new(proto::GetAccountTransfersReply::from_ledger(&transfers)))
            }
            reply => Err(unexpected_reply("get_account_transfers", &reply)),
        }
    }

    async fn get_account_balances(
        &self,
        request: tonic::Request<proto::GetAccountBalancesRequest>,
    ) -> Result<tonic::Response<proto::GetAccountBalancesReply>, Status> {
        let filter = request.get_ref().to_ledger()?;
        match self.submit(&request, Request::GetAccountBalances(filter)).await? {
            Reply::Balances(balances) => {
                Ok(tonic::Response::new(proto::GetAccountBalancesReply::from_ledger(&balances)))
            }
            reply => Err(unexpected_reply("get_account_balances", &reply)),
        }
    }
}

/// tonic refuses a message over `max_decoding_message_size` with
/// `OUT_OF_RANGE`; the API's code for it is `body_too_large`, whose gRPC code
/// is `RESOURCE_EXHAUSTED`. No handler here answers `OUT_OF_RANGE`, so any
/// such status (trailers-only, in the headers) is that refusal.
async fn message_too_large(response: Response) -> Response {
    match Status::from_header_map(response.headers()) {
        Some(status) if status.code() == Code::OutOfRange => grpc_response(Status::new(
            ErrorCode::BodyTooLarge.grpc_code(),
            format!("request message is more than the {MESSAGE_BYTES_MAX} bytes allowed ({})", status.message()),
        )),
        _ => response,
    }
}
