//! The gateway, in process, in front of one node that hosts the global cell
//! and two cells (cell 1 owns shards 0–49, cell 2 shards 50–99); both
//! serve their REST and gRPC front ends on loopback ports, and the gateway
//! reaches the node through them as it would a remote one.
//!
//! - a batch spanning the cells is split, applied, and answered in request
//!   order (results, lookups, failures at their events' positions, an open
//!   chain answered as the node answers it, a linked chain of accounts
//!   across cells refused whole); the API is the node's, operator endpoints
//!   aside;
//! - a gateway routing by a stale table (its watch off) sends events to a
//!   cell that no longer owns their shard: they are refused `misrouted`,
//!   rerouted by a fresher table and applied exactly once;
//! - concurrent clients' small requests are combined into fewer calls to
//!   each cell, and answered as if sent alone.

mod two_cells;

use std::net::SocketAddr;
use std::time::Duration;

use cellpay_api::proto::{self, ledger_client::LedgerClient};
use cellpay_cluster::routing::RoutingChange;
use cellpay_ledger::id::account_id;
use cellpay_ledger::{
    Account, AccountFilter, AccountFlags, CreateAccountResult, CreateTransferResult as R, Transfer, TransferFlags,
};
use cellpay_server::gateway::metrics::{CallLabels, CellLabels};
use cellpay_server::gateway::{Gateway, GatewayConfig, GatewayHandle};
use cellpay_server::node::{Node, NodeConfig, NodeHandle, Reply, Request};
use cellpay_server::{serve, FrontLimits};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tonic::transport::Channel;

const LEDGER: u32 = 1;

/// A node and its front ends, and a gateway with its own, on loopback.
struct Setup {
    node: Option<Node>,
    gateway: Option<Gateway>,
    gateway_address: SocketAddr,
    stops: Vec<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Setup {
    async fn start(configure: impl FnOnce(&mut GatewayConfig)) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let node_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let topology = two_cells::topology(Some(node_listener.local_addr().unwrap()));
        let node = Node::start(NodeConfig::cluster(dir.path(), topology.clone(), 1)).unwrap();
        let mut stops = Vec::new();
        stops.push(serve_in_background(node_listener, node.handle()));
        let mut config = GatewayConfig::new(topology);
        configure(&mut config);
        let gateway = Gateway::start(config).unwrap();
        let gateway_listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let gateway_address = gateway_listener.local_addr().unwrap();
        stops.push(serve_in_background(gateway_listener, gateway.handle()));
        Setup { node: Some(node), gateway: Some(gateway), gateway_address, stops, _dir: dir }
    }

    fn node(&self) -> NodeHandle {
        self.node.as_ref().unwrap().handle()
    }

    fn gateway(&self) -> GatewayHandle {
        self.gateway.as_ref().unwrap().handle()
    }

    fn grpc(&self) -> LedgerClient<Channel> {
        let channel = Channel::from_shared(format!("http://{}", self.gateway_address)).unwrap().connect_lazy();
        LedgerClient::new(channel)
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.gateway_address)
    }

    async fn stop(mut self) {
        for stop in self.stops.drain(..) {
            let _ = stop.send(());
        }
        self.gateway.take().unwrap().shutdown();
        let node = self.node.take().unwrap();
        tokio::task::spawn_blocking(move || node.shutdown()).await.unwrap();
    }
}

fn serve_in_background<B: cellpay_server::front::Backend>(listener: TcpListener, backend: B) -> oneshot::Sender<()> {
    let (stop, stopped) = oneshot::channel::<()>();
    let limits = FrontLimits { shutdown_grace: Duration::from_secs(1), ..FrontLimits::default() };
    tokio::spawn(serve(listener, backend, limits, async move {
        let _ = stopped.await;
    }));
    stop
}

/// User `user`'s account `index` (users 0–49 in cell 1, 50–99 in cell 2, by shard).
fn user(user: u64, index: u64) -> u128 {
    account_id(user, index).unwrap()
}

fn account(id: u128) -> Account {
    Account { id, ledger: LEDGER, code: 1, ..Account::default() }
}

fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
    Transfer {
        id,
        debit_account_id: debit,
        credit_account_id: credit,
        amount,
        ledger: LEDGER,
        code: 1,
        ..Transfer::default()
    }
}

fn linked(mut transfer: Transfer) -> Transfer {
    transfer.flags.insert(TransferFlags::LINKED);
    transfer
}

async fn create_accounts(client: &mut LedgerClient<Channel>, accounts: &[Account]) -> Vec<CreateAccountResult> {
    let request = proto::CreateAccountsRequest::from_ledger(accounts);
    client.create_accounts(request).await.unwrap().into_inner().to_ledger().unwrap()
}

async fn create_transfers(client: &mut LedgerClient<Channel>, transfers: &[Transfer]) -> Vec<R> {
    let request = proto::CreateTransfersRequest::from_ledger(transfers);
    client.create_transfers(request).await.unwrap().into_inner().to_ledger().unwrap()
}

async fn lookup_accounts(client: &mut LedgerClient<Channel>, ids: &[u128]) -> Vec<Account> {
    let request = proto::LookupAccountsRequest::from_ledger(ids);
    client.lookup_accounts(request).await.unwrap().into_inner().to_ledger().unwrap()
}

async fn lookup_transfers(client: &mut LedgerClient<Channel>, ids: &[u128]) -> Vec<Transfer> {
    let request = proto::LookupTransfersRequest::from_ledger(ids);
    client.lookup_transfers(request).await.unwrap().into_inner().to_ledger().unwrap()
}

/// `(debits_posted, credits_posted, debits_pending, credits_pending)` of each account, in order.
async fn balances(client: &mut LedgerClient<Channel>, ids: &[u128]) -> Vec<(u128, u128, u128, u128)> {
    let accounts = lookup_accounts(client, ids).await;
    assert_eq!(accounts.len(), ids.len(), "every account is found");
    accounts.iter().map(|a| (a.debits_posted, a.credits_posted, a.debits_pending, a.credits_pending)).collect()
}

/// Waits until cells 1 and 2 hold `expected` accounts, as the node's status says.
async fn assert_cell_accounts(node: &NodeHandle, expected: (usize, usize), what: &str) {
    two_cells::assert_accounts(node, 1, expected.0, what).await;
    two_cells::assert_accounts(node, 2, expected.1, what).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_spanning_cells_is_split_applied_and_answered_in_request_order() {
    let setup = Setup::start(|_| {}).await;
    let mut client = setup.grpc();
    let (a1, a2, b1, b2) = (user(1, 1), user(2, 1), user(51, 1), user(52, 1));

    // Accounts of both cells in one request, with a linked chain inside cell 1.
    let mut chained = account(user(3, 1));
    chained.flags.insert(AccountFlags::LINKED);
    let accounts = [account(b1), account(a1), chained, account(user(3, 2)), account(b2), account(a2)];
    assert_eq!(create_accounts(&mut client, &accounts).await, vec![CreateAccountResult::Ok; 6]);
    assert_cell_accounts(&setup.node(), (4, 2), "accounts by cell").await;
    // A linked chain of accounts across the cells is refused whole; nothing is sent.
    let mut across = account(user(4, 1));
    across.flags.insert(AccountFlags::LINKED);
    let request = proto::CreateAccountsRequest::from_ledger(&[account(user(5, 1)), across, account(user(54, 1))]);
    let status = client.create_accounts(request).await.expect_err("a chain across cells");
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    assert!(status.message().contains("accounts 1 and 2 are linked in one chain"), "{status:?}");
    assert!(lookup_accounts(&mut client, &[user(5, 1), user(4, 1), user(54, 1)]).await.is_empty());

    // Transfers of both cells, interleaved; a pending transfer posted later
    // in the request by a post naming no account; one transfer between the
    // cells; one invalid event in the middle.
    let mut pending = transfer(5, a1, a2, 40);
    pending.flags.insert(TransferFlags::PENDING);
    let post = Transfer {
        id: 6,
        pending_id: 5,
        amount: 30,
        flags: TransferFlags::POST_PENDING_TRANSFER,
        ..Transfer::default()
    };
    let batch = [
        transfer(1, a1, a2, 10),
        transfer(2, b1, b2, 20),
        transfer(0, b2, b1, 1),
        transfer(3, a2, a1, 3),
        pending,
        transfer(4, b2, b1, 7),
        post,
        transfer(7, a1, b1, 100),
    ];
    let results = create_transfers(&mut client, &batch).await;
    assert_eq!(results, vec![R::Ok, R::Ok, R::IdMustNotBeZero, R::Ok, R::Ok, R::Ok, R::Ok, R::Ok]);
    // a1: -10 +3 -30 -100; a2: +10 -3 +30; b1: -20 +7 +100; b2: +20 -7.
    let expected = vec![(140, 3, 0, 0), (3, 40, 0, 0), (20, 107, 0, 0), (7, 20, 0, 0)];
    assert_eq!(balances(&mut client, &[a1, a2, b1, b2]).await, expected);

    // A post naming no account of a pending transfer made by an earlier
    // request: the gateway finds it first. One found nowhere goes to a
    // cell, which answers that it is not there.
    let mut pending = transfer(8, b1, b2, 9);
    pending.flags.insert(TransferFlags::PENDING);
    assert_eq!(create_transfers(&mut client, &[pending]).await, vec![R::Ok]);
    let void = |id, pending_id| Transfer {
        id,
        pending_id,
        flags: TransferFlags::VOID_PENDING_TRANSFER,
        ..Transfer::default()
    };
    let results = create_transfers(&mut client, &[transfer(9, a1, a2, 1), void(10, 8), void(11, 99)]).await;
    assert_eq!(results, vec![R::Ok, R::Ok, R::PendingTransferNotFound]);
    assert_eq!(balances(&mut client, &[b1, b2]).await, vec![(20, 107, 0, 0), (7, 20, 0, 0)], "voided");

    // An open chain at the end is answered as the node answers it.
    let results = create_transfers(
        &mut client,
        &[transfer(12, a1, a2, 1), linked(transfer(13, b1, b2, 1)), linked(transfer(14, b1, b2, 1))],
    )
    .await;
    let node_results = match setup
        .node()
        .submit(Request::CreateTransfers(vec![linked(transfer(15, b1, b2, 1)), linked(transfer(16, b1, b2, 1))]))
        .await
    {
        Ok(Reply::CreateTransfers(results)) => results,
        other => panic!("{other:?}"),
    };
    assert_eq!(results[0], R::Ok);
    assert_eq!(results[1..], node_results[..], "an open chain through the gateway and straight to the node");
    assert_ne!(node_results[1], R::Ok);

    // Lookups: request order, what is not found left out, an id asked twice answered twice.
    let found = lookup_transfers(&mut client, &[7, 1000, 2, 1, 7]).await;
    assert_eq!(found.iter().map(|t| t.id).collect::<Vec<_>>(), vec![7, 2, 1, 7]);
    // The transfer between the cells is answered as the client sent it: its
    // two legs merged (the home cell's, naming the credit account of the other's).
    assert_eq!((found[0].debit_account_id, found[0].credit_account_id, found[0].amount), (a1, b1, 100));
    let found = lookup_accounts(&mut client, &[b2, user(77, 1), a1, b1]).await;
    assert_eq!(found.iter().map(|a| a.id).collect::<Vec<_>>(), vec![b2, a1, b1]);
    let filter = AccountFilter { account_id: b2, limit: 10, debits: true, credits: true, ..AccountFilter::default() };
    let request = proto::GetAccountTransfersRequest::from_ledger(&filter);
    let history = client.get_account_transfers(request).await.unwrap().into_inner().to_ledger().unwrap();
    // b2's transfers, from its cell (the void names b2 once it applies).
    assert_eq!(history.iter().map(|t| t.id).collect::<Vec<_>>(), vec![2, 4, 8, 10]);

    // The same API as a node over REST; operator endpoints are the nodes'.
    let http = reqwest::Client::new();
    let body = serde_json::json!({"transfers": [{"id": "20", "debit_account_id": b1.to_string(), "credit_account_id": a1.to_string(), "amount": "1", "ledger": 1, "code": 1}]});
    let reply: serde_json::Value =
        http.post(setup.url("/v1/transfers")).json(&body).send().await.unwrap().json().await.unwrap();
    assert_eq!(reply, serde_json::json!({"results": [{"index": 0, "result": "ok"}]}));
    assert_eq!(http.get(setup.url("/health")).send().await.unwrap().text().await.unwrap(), "ok");
    let routing: serde_json::Value =
        http.get(setup.url("/v1/cluster/routing")).send().await.unwrap().json().await.unwrap();
    assert_eq!(
        (routing["version"].as_u64(), routing["owners"][0].as_u64(), routing["owners"][99].as_u64()),
        (Some(1), Some(1), Some(2))
    );
    assert!(http.get(setup.url("/openapi.json")).send().await.unwrap().status().is_success());
    let metrics = http.get(setup.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains("cellpay_gateway_requests_total{operation=\"create_transfers\",outcome=\"ok\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("cellpay_gateway_routing_version 1"), "{metrics}");
    // (The routing table is read here too: changing it is not allowed.)
    let operator =
        [("GET", "/v1/cluster/status", 404), ("POST", "/v1/cluster/drain", 404), ("POST", "/v1/cluster/routing", 405)];
    for (method, path, status) in operator {
        let request = http.request(method.parse().unwrap(), setup.url(path)).body("{}");
        assert_eq!(request.send().await.unwrap().status(), status, "{method} {path} is a node's");
    }
    // A gateway hosts no cell: a call forwarded to it is refused, nothing applied.
    let mut request = tonic::Request::new(proto::CreateTransfersRequest::from_ledger(&[transfer(21, a1, a2, 1)]));
    request.metadata_mut().insert("cellpay-forwarded", "cell=1".parse().unwrap());
    let status = client.create_transfers(request).await.expect_err("forwarded to a gateway");
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(status.metadata().contains_key("cellpay-nothing-applied"));
    setup.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_gateway_is_corrected_by_misrouted_refusals_and_applies_each_event_once() {
    // The watch is off: the gateway routes by the topology's table (version 1)
    // until a refusal makes it fetch a newer one.
    let setup = Setup::start(|config| config.routing_watch = false).await;
    let (node, gateway) = (setup.node(), setup.gateway());
    let mut client = setup.grpc();
    let (a1, a2, b1) = (user(1, 1), user(2, 1), user(51, 1));
    assert_eq!(
        create_accounts(&mut client, &[account(a1), account(a2), account(b1)]).await,
        vec![CreateAccountResult::Ok; 3]
    );

    // The operator moves shard 0 (empty) to cell 2: release, table, acquire.
    move_shard(&node, 1, 0, 2).await;
    assert_eq!((node.status().routing().version(), gateway.routing().version()), (2, 1), "the gateway is stale");

    // Shard 0's accounts (users 100, 200) go to cell 1 by the stale table,
    // in one part with user 1's second account: refused whole, split again
    // by version 2, applied once.
    let (c1, c2) = (user(100, 1), user(200, 1));
    let accounts = [account(c1), account(user(1, 2)), account(c2)];
    assert_eq!(create_accounts(&mut client, &accounts).await, vec![CreateAccountResult::Ok; 3]);
    assert_eq!(gateway.routing().version(), 2, "refreshed by the refusal");
    assert_eq!(gateway.metrics().misroutes.get(), 1);
    assert_cell_accounts(&node, (3, 3), "shard 0's accounts are in cell 2 only").await;

    // Shard 3 moves too; its account is made through the node (which knows
    // version 3), so the gateway (at version 2) sends a transfer from it to cell 1.
    move_shard(&node, 1, 3, 2).await;
    let d1 = user(103, 1);
    match node.submit(Request::CreateAccounts(vec![account(d1)])).await {
        Ok(Reply::CreateAccounts(results)) => assert_eq!(results, vec![CreateAccountResult::Ok]),
        other => panic!("{other:?}"),
    }
    assert_eq!(gateway.routing().version(), 2);
    let batch = [transfer(1, d1, c1, 5), transfer(2, a1, a2, 7), transfer(3, c1, c2, 3)];
    assert_eq!(create_transfers(&mut client, &batch).await, vec![R::Ok; 3]);
    assert_eq!(gateway.routing().version(), 3);
    assert_eq!(gateway.metrics().misroutes.get(), 2);

    // Exactly once: each transfer is there once, the balances are their sums;
    // the old owner holds none of the moved shards' accounts.
    let found = lookup_transfers(&mut client, &[1, 2, 3]).await;
    assert_eq!(found.iter().map(|t| (t.id, t.amount)).collect::<Vec<_>>(), vec![(1, 5), (2, 7), (3, 3)]);
    let ids = [d1, c1, c2, a1, a2];
    let expected = vec![(5, 0, 0, 0), (3, 5, 0, 0), (0, 3, 0, 0), (7, 0, 0, 0), (0, 7, 0, 0)];
    assert_eq!(balances(&mut client, &ids).await, expected);
    assert_cell_accounts(&node, (3, 4), "the moved shards' accounts are in cell 2 only").await;
    // A retry of the batch applies nothing: every event exists.
    assert_eq!(create_transfers(&mut client, &batch).await, vec![R::Exists; 3]);
    assert_eq!(balances(&mut client, &ids).await, expected);
    setup.stop().await;
}

/// Moves an empty shard from cell `from` to cell `to` in three logged steps.
async fn move_shard(node: &NodeHandle, from: u64, shard: u32, to: u64) {
    let version = node.status().routing().version();
    let steps = [
        Request::ShardOwnership { cell: from, shard, owned: false },
        Request::ChangeRouting { expected_version: version, change: RoutingChange::MoveShard { shard, to } },
        Request::ShardOwnership { cell: to, shard, owned: true },
    ];
    for step in steps {
        node.submit_admin(step.clone()).await.unwrap_or_else(|error| panic!("{step:?}: {error}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_clients_requests_are_combined_into_fewer_calls_to_each_cell() {
    for batching in [true, false] {
        // One call in flight per cell: what arrives meanwhile waits and is combined.
        let setup = Setup::start(|config| {
            config.batching = batching;
            config.cell_calls_max = 1;
        })
        .await;
        let mut client = setup.grpc();
        let users: Vec<u64> = (1..=8).chain(51..=58).collect();
        let accounts: Vec<Account> = users.iter().map(|&u| account(user(u, 1))).collect();
        assert_eq!(create_accounts(&mut client, &accounts).await, vec![CreateAccountResult::Ok; users.len()]);
        let gateway = setup.gateway();
        let calls = |cell| gateway.metrics().calls.get_or_create(&CallLabels { cell, outcome: "ok" }).get();
        let parts = |cell| gateway.metrics().parts.get_or_create(&CellLabels { cell }).get();
        let before = [(calls(1), parts(1)), (calls(2), parts(2))];

        // 32 clients, 8 requests each, every request one transfer in each cell.
        let (clients, requests) = (32u64, 8u64);
        let tasks: Vec<_> = (0..clients)
            .map(|client_number| {
                let mut client = setup.grpc();
                tokio::spawn(async move {
                    for request in 0..requests {
                        let id = u128::from(client_number * requests + request) * 2 + 1;
                        let (a, b) = (user(1 + client_number % 8, 1), user(51 + client_number % 8, 1));
                        let (a_next, b_next) =
                            (user(1 + (client_number + 1) % 8, 1), user(51 + (client_number + 1) % 8, 1));
                        let batch = [transfer(id, a, a_next, 1), transfer(id + 1, b, b_next, 1)];
                        assert_eq!(create_transfers(&mut client, &batch).await, vec![R::Ok, R::Ok]);
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.unwrap();
        }
        let sent = clients * requests;
        for (position, cell) in [1u64, 2].into_iter().enumerate() {
            let (calls_made, parts_sent) = (calls(cell) - before[position].0, parts(cell) - before[position].1);
            assert_eq!(parts_sent, sent, "cell {cell}: one part per request");
            if batching {
                assert!(calls_made < parts_sent, "cell {cell}: {calls_made} calls for {parts_sent} parts");
            } else {
                assert_eq!(calls_made, parts_sent, "cell {cell}: without batching, one call per part");
            }
            eprintln!("batching {batching}: cell {cell}: {parts_sent} parts in {calls_made} calls");
        }
        // Every transfer applied once: each account moved 1 per transfer it took part in.
        let ids: Vec<u128> = users.iter().map(|&u| user(u, 1)).collect();
        let per_account = u128::from(clients / 8 * requests);
        let expected = vec![(per_account, per_account, 0, 0); users.len()];
        assert_eq!(balances(&mut client, &ids).await, expected);
        setup.stop().await;
    }
}
