//! The gRPC API (`cellpay.v1.Ledger`): the generated tonic service, decoded
//! and encoded by `cellpay_api::proto`.
//!
//! Status codes follow `cellpay_api::ErrorCode::grpc_code`: `INVALID_ARGUMENT`
//! for a malformed request, `RESOURCE_EXHAUSTED` for a message over
//! `proto::MESSAGE_BYTES_MAX`, `UNAVAILABLE` when overloaded or shutting down,
//! `INTERNAL` for a server bug. A refusal's metadata says whether nothing was
//! applied, and what a router needs to send the request elsewhere (the
//! leader, or the owner and routing version of a misrouted account: see
//! `forward`).

use axum::response::Response;
use axum::Router;
use cellpay_api::proto::ledger_server::{Ledger, LedgerServer};
use cellpay_api::proto::{self, MESSAGE_BYTES_MAX};
use cellpay_api::ErrorCode;
use tonic::server::NamedService;
use tonic::{Code, Status};

use super::backend::{Backend, Caller, FrontError};
use super::{grpc_response, record_events};
use crate::forward::FORWARDED_KEY;
use crate::node::{Reply, Request};

pub(super) fn router<B: Backend>(backend: B) -> Router {
    let server = LedgerServer::new(GrpcLedger { backend })
        .max_decoding_message_size(MESSAGE_BYTES_MAX)
        .max_encoding_message_size(MESSAGE_BYTES_MAX);
    let path = format!("/{}/{{*method}}", <LedgerServer<GrpcLedger<B>> as NamedService>::NAME);
    Router::new().route_service(&path, server).layer(axum::middleware::map_response(message_too_large))
}

struct GrpcLedger<B> {
    backend: B,
}

impl<B: Backend> GrpcLedger<B> {
    async fn submit<T>(&self, call: &tonic::Request<T>, request: Request) -> Result<Reply, Status> {
        record_events(&request);
        // A forwarded call names the cell it is for.
        let forwarded = call.metadata().get(FORWARDED_KEY);
        let caller = match forwarded.map(|value| value.to_str().ok()?.strip_prefix("cell=")?.parse().ok()) {
            Some(Some(cell)) => Caller::Forwarded(cell),
            Some(None) => Caller::ForwardedMalformed,
            None => Caller::Client,
        };
        self.backend.submit(request, caller).await.map_err(|error| {
            let mut status = Status::new(error.code().grpc_code(), error.to_string());
            error.metadata(status.metadata_mut());
            status
        })
    }
}

/// The backend answered with a reply of another kind: a bug, answered `INTERNAL`.
fn unexpected_reply(operation: &str, reply: &Reply) -> Status {
    tracing::error!(operation, ?reply, "the backend answered with a reply of the wrong kind");
    Status::new(ErrorCode::Internal.grpc_code(), "internal error")
}

#[tonic::async_trait]
impl<B: Backend> Ledger for GrpcLedger<B> {
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
