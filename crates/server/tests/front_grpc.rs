//! The gRPC API end to end, on the same port as REST: the generated client
//! (HTTP/2 prior knowledge) and HTTP/1.1 JSON requests mixed on one node give
//! the same answers.

mod front_support;

use cellpay_api::json::{AccountsJson, BalancesJson, TransfersJson};
use cellpay_api::proto;
use cellpay_ledger::{
    Account, AccountBalance, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult, Transfer,
    TransferFlags,
};
use front_support::{result_names, Server};
use serde_json::json;

fn account(id: u128, flags: AccountFlags) -> Account {
    Account { id, ledger: 1, code: 10, flags, ..Account::default() }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: 1,
        code: 1,
        ..Transfer::default()
    }
}

fn filter(account_id: u128) -> AccountFilter {
    AccountFilter { account_id, limit: 100, debits: true, credits: true, ..AccountFilter::default() }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_and_rest_give_the_same_answers() {
    let server = Server::start().await;
    let mut grpc = server.grpc().await;

    // Create over gRPC; creating again over REST finds them.
    let accounts = vec![account(1, AccountFlags::HISTORY), account(2, AccountFlags::default())];
    let reply = grpc.create_accounts(proto::CreateAccountsRequest::from_ledger(&accounts)).await.unwrap();
    assert_eq!(reply.get_ref().to_ledger().unwrap(), [CreateAccountResult::Ok; 2]);
    let body = json!({"accounts": [
        {"id": "1", "ledger": 1, "code": 10, "flags": ["history"]},
        {"id": "2", "ledger": 1, "code": 10},
    ]});
    assert_eq!(result_names(&server.post_ok("/v1/accounts", &body).await), ["exists", "exists"]);

    // A posted and a pending transfer over REST, the post and a u128 amount over gRPC.
    let mut pending =
        json!({"id": "2", "debit_account_id": "1", "credit_account_id": "2", "amount": "40", "ledger": 1, "code": 1});
    pending["flags"] = json!(["pending"]);
    let posted =
        json!({"id": "1", "debit_account_id": "1", "credit_account_id": "2", "amount": "100", "ledger": 1, "code": 1});
    let reply = server.post_ok("/v1/transfers", &json!({"transfers": [posted, pending]})).await;
    assert_eq!(result_names(&reply), ["ok", "ok"]);
    let post = Transfer { pending_id: 2, flags: TransferFlags::POST_PENDING_TRANSFER, ..transfer(3, 1, 2, 0) };
    let huge = transfer(4, 2, 1, u128::MAX / 3);
    let over = transfer(5, 1, 2, u128::MAX);
    let transfers = vec![post, huge, over];
    let reply = grpc.create_transfers(proto::CreateTransfersRequest::from_ledger(&transfers)).await.unwrap();
    assert_eq!(
        reply.get_ref().to_ledger().unwrap(),
        [CreateTransferResult::Ok, CreateTransferResult::Ok, CreateTransferResult::OverflowsDebitsPosted]
    );

    // Accounts: the same over both APIs, with the expected balances.
    let ids = [2u128, 1, 404];
    let over_grpc = grpc.lookup_accounts(proto::LookupAccountsRequest::from_ledger(&ids)).await.unwrap();
    let over_grpc = over_grpc.get_ref().to_ledger().unwrap();
    let over_rest: AccountsJson =
        serde_json::from_value(server.post_ok("/v1/accounts/lookup", &json!({"ids": ["2", "1", "404"]})).await)
            .unwrap();
    assert_eq!(over_grpc, over_rest.to_ledger().unwrap());
    assert_eq!(over_grpc.len(), 2);
    assert_eq!((over_grpc[0].id, over_grpc[0].credits_posted, over_grpc[0].debits_posted), (2, 140, u128::MAX / 3));
    assert_eq!((over_grpc[1].id, over_grpc[1].debits_posted, over_grpc[1].credits_posted), (1, 140, u128::MAX / 3));
    assert_eq!(over_grpc[1].debits_pending, 0);

    // Transfers: the post resolved the whole pending amount.
    let ids = [3u128, 2, 5];
    let over_grpc = grpc.lookup_transfers(proto::LookupTransfersRequest::from_ledger(&ids)).await.unwrap();
    let over_grpc = over_grpc.get_ref().to_ledger().unwrap();
    let over_rest: TransfersJson =
        serde_json::from_value(server.post_ok("/v1/transfers/lookup", &json!({"ids": ["3", "2", "5"]})).await).unwrap();
    assert_eq!(over_grpc, over_rest.to_ledger().unwrap());
    let summary: Vec<(u128, u128, u128)> = over_grpc.iter().map(|t| (t.id, t.amount, t.pending_id)).collect();
    assert_eq!(summary, [(3, 40, 2), (2, 40, 0)]);

    // Queries.
    let over_grpc = grpc.get_account_transfers(proto::GetAccountTransfersRequest::from_ledger(&filter(1))).await;
    let over_grpc = over_grpc.unwrap().get_ref().to_ledger().unwrap();
    let body = json!({"account_id": "1", "limit": 100, "debits": true, "credits": true});
    let over_rest: TransfersJson =
        serde_json::from_value(server.post_ok("/v1/accounts/transfers", &body).await).unwrap();
    assert_eq!(over_grpc, over_rest.to_ledger().unwrap());
    assert_eq!(over_grpc.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 2, 3, 4]);

    let over_grpc = grpc.get_account_balances(proto::GetAccountBalancesRequest::from_ledger(&filter(1))).await;
    let over_grpc = over_grpc.unwrap().get_ref().to_ledger().unwrap();
    let over_rest: BalancesJson = serde_json::from_value(server.post_ok("/v1/accounts/balances", &body).await).unwrap();
    assert_eq!(over_grpc, over_rest.to_ledger().unwrap());
    let balances: Vec<(u128, u128, u128)> =
        over_grpc.iter().map(|b: &AccountBalance| (b.debits_pending, b.debits_posted, b.credits_posted)).collect();
    assert_eq!(balances, [(0, 100, 0), (40, 100, 0), (0, 140, 0), (0, 140, u128::MAX / 3)]);

    drop(grpc);
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_grpc_methods_are_unimplemented() {
    let server = Server::start().await;
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", server.address)).unwrap().connect().await.unwrap();
    for path in ["/cellpay.v1.Ledger/Nothing", "/cellpay.v1.Other/LookupAccounts"] {
        let mut client = tonic::client::Grpc::new(channel.clone());
        client.ready().await.unwrap();
        let codec = tonic_prost::ProstCodec::<proto::LookupAccountsRequest, proto::LookupAccountsReply>::default();
        let request = tonic::Request::new(proto::LookupAccountsRequest::from_ledger(&[1]));
        let path_and_query = tonic::codegen::http::uri::PathAndQuery::from_static(path);
        let status = client.unary(request, path_and_query, codec).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unimplemented, "{path}: {status:?}");
    }
    drop(channel);
    server.stop().await;
}
