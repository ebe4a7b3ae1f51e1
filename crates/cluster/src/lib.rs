//! The cluster's shape and its wires.
//!
//! - [`topology`]: the cluster file: regions → datacenters → nodes, the
//!   cells with their replicas and leader preference, the shard map and the
//!   emulated latency between regions.
//! - [`ledgers`]: the versioned ledger definitions (which ledgers exist).
//! - [`topology_table`]: the global cell's topology, versioned (leader
//!   preferences change online).
//! - [`routing`]: the versioned routing table (which cell owns each shard).
//! - [`transport`]: node-to-node messages over TCP, with bounded queues,
//!   backpressure and emulated one-way latency.

#![forbid(unsafe_code)]

pub mod ledgers;
pub mod routing;
pub mod topology;
pub mod topology_table;
pub mod transport;

/// The body of a versioned table's encoding (routing, ledgers, topology):
/// `bytes` without its trailing CRC32C, checked, and starting with `magic`
/// and at least `header` bytes; else why not.
pub(crate) fn checked_body<'a>(
    bytes: &'a [u8],
    magic: &[u8; 4],
    header: usize,
    what: &str,
) -> Result<&'a [u8], String> {
    let Some((body, checksum)) = bytes.split_last_chunk::<4>() else {
        return Err(format!("{} bytes is too short", bytes.len()));
    };
    if crc32c::crc32c(body) != u32::from_le_bytes(*checksum) {
        return Err("checksum mismatch".to_string());
    }
    if body.len() < header || body[..4] != *magic {
        return Err(format!("not {what}"));
    }
    Ok(body)
}
