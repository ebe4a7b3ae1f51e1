//! What the multi-process tests (`e2e_cluster`, `e2e_gateway`, `e2e_server`) share: free
//! ports, a seeded generator, gRPC clients, the users' accounts by cell, and
//! transfers on the tests' ledger.

#![allow(dead_code)] // Each test binary uses its own subset.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use cellpay_api::proto;
use cellpay_api::proto::ledger_client::LedgerClient;
use cellpay_cluster::topology::Topology;
use cellpay_ledger::{id, Transfer};
use tonic::transport::Channel;

/// The ledger the tests' accounts and transfers are on.
pub const LEDGER: u32 = 1;

/// The last `lines` lines of `text`.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// The first port of `count` consecutive free ports below the ephemeral
/// range, chosen at random so parallel test runs do not collide.
pub fn free_port_range(count: u16) -> u16 {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("a clock after 1970").subsec_nanos();
    let mut rng = Rng::new(u64::from(std::process::id()) << 32 ^ u64::from(nanos));
    for _ in 0..200 {
        let base = 12_000 + 2 * rng.below(10_000) as u16;
        let bound: Result<Vec<_>, _> =
            (base..base + count).map(|port| std::net::TcpListener::bind(("127.0.0.1", port))).collect();
        if bound.is_ok() {
            return base;
        }
    }
    panic!("no {count} consecutive free ports found");
}

/// xorshift64*: small, fast, seeded.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

/// A client of one node or gateway; it connects on first use and reconnects
/// after a restart. A call not answered within `timeout` fails (client side).
pub fn grpc(address: SocketAddr, timeout: Duration) -> LedgerClient<Channel> {
    let channel = Channel::from_shared(format!("http://{address}"))
        .expect("a valid URI")
        .connect_timeout(Duration::from_secs(1))
        .timeout(timeout)
        .connect_lazy();
    LedgerClient::new(channel)
        .max_decoding_message_size(proto::MESSAGE_BYTES_MAX)
        .max_encoding_message_size(proto::MESSAGE_BYTES_MAX)
}

/// The account of user `user` (its first account).
pub fn account_of_user(user: u64) -> u128 {
    id::account_id(user, 1).expect("not a reserved id")
}

/// The accounts of users `1..=users`, grouped by the cell that owns them,
/// in cell order; every one of the topology's `cells` holds at least two.
pub fn accounts_by_cell(topology: &Topology, users: u64, cells: usize) -> BTreeMap<u64, Vec<u128>> {
    let mut groups: BTreeMap<u64, Vec<u128>> = BTreeMap::new();
    for user in 1..=users {
        let account = account_of_user(user);
        let cell = topology.cell_of_shard(id::shard_of_account(account, topology.shards)).expect("an owned shard");
        groups.entry(cell).or_default().push(account);
    }
    assert_eq!(groups.len(), cells, "every cell holds accounts");
    assert!(groups.values().all(|group| group.len() >= 2));
    groups
}

/// A plain transfer on [`LEDGER`], code 1.
pub fn transfer(id: u128, debit: u128, credit: u128, amount: u128) -> Transfer {
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
