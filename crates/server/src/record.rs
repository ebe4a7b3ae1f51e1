//! The write-ahead log's record format: one record per write request.
//!
//! ```text
//! offset  size  field
//!      0     1  kind (1 create_accounts, 2 create_transfers, 3 pulse)
//!      1     3  reserved, zero
//!      4     4  event count (u32 LE)
//!      8     8  timestamp the ledger applied the request with (u64 LE, ns)
//!     16  128n  events, each in the ledger's 128-byte encoding
//! ```
//!
//! The timestamp is recorded so that replay applies every request exactly as
//! it was applied the first time: the ledger is deterministic given its input.

use cellpay_ledger::{Account, Transfer, BATCH_EVENTS_MAX, RECORD_SIZE};

pub const HEADER_SIZE: usize = 16;
/// The largest record payload: a full batch.
pub const PAYLOAD_SIZE_MAX: usize = HEADER_SIZE + BATCH_EVENTS_MAX * RECORD_SIZE;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Record {
    CreateAccounts {
        timestamp: u64,
        accounts: Vec<Account>,
    },
    CreateTransfers {
        timestamp: u64,
        transfers: Vec<Transfer>,
    },
    /// Expire due pending transfers.
    Pulse {
        timestamp: u64,
    },
}

const KIND_CREATE_ACCOUNTS: u8 = 1;
const KIND_CREATE_TRANSFERS: u8 = 2;
const KIND_PULSE: u8 = 3;

/// Why a record could not be decoded. The log checksums every record, so this
/// means a bug or a format change, never a torn write.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RecordError {
    #[error("record of {size} bytes is shorter than its {HEADER_SIZE}-byte header")]
    Short { size: usize },
    #[error("unknown record kind {kind}")]
    UnknownKind { kind: u8 },
    #[error("record says {count} events but holds {size} bytes")]
    SizeMismatch { count: u32, size: usize },
    #[error("record holds {count} events, over the limit of {BATCH_EVENTS_MAX}")]
    TooManyEvents { count: u32 },
}

fn header(out: &mut Vec<u8>, kind: u8, count: usize, timestamp: u64) {
    assert!(count <= BATCH_EVENTS_MAX);
    out.clear();
    out.push(kind);
    out.extend_from_slice(&[0; 3]);
    out.extend_from_slice(&(count as u32).to_le_bytes());
    out.extend_from_slice(&timestamp.to_le_bytes());
}

/// Encodes `create_accounts` into `out` (cleared first, so a buffer can be reused).
pub fn encode_create_accounts(out: &mut Vec<u8>, timestamp: u64, accounts: &[Account]) {
    header(out, KIND_CREATE_ACCOUNTS, accounts.len(), timestamp);
    let mut bytes = [0u8; RECORD_SIZE];
    for account in accounts {
        account.encode(&mut bytes);
        out.extend_from_slice(&bytes);
    }
}

/// Encodes `create_transfers` into `out` (cleared first).
pub fn encode_create_transfers(out: &mut Vec<u8>, timestamp: u64, transfers: &[Transfer]) {
    header(out, KIND_CREATE_TRANSFERS, transfers.len(), timestamp);
    let mut bytes = [0u8; RECORD_SIZE];
    for transfer in transfers {
        transfer.encode(&mut bytes);
        out.extend_from_slice(&bytes);
    }
}

/// Encodes a pulse into `out` (cleared first).
pub fn encode_pulse(out: &mut Vec<u8>, timestamp: u64) {
    header(out, KIND_PULSE, 0, timestamp);
}

pub fn decode(payload: &[u8]) -> Result<Record, RecordError> {
    if payload.len() < HEADER_SIZE {
        return Err(RecordError::Short { size: payload.len() });
    }
    let kind = payload[0];
    let count = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes"));
    let timestamp = u64::from_le_bytes(payload[8..16].try_into().expect("8 bytes"));
    if count as usize > BATCH_EVENTS_MAX {
        return Err(RecordError::TooManyEvents { count });
    }
    let body = &payload[HEADER_SIZE..];
    if body.len() != count as usize * RECORD_SIZE {
        return Err(RecordError::SizeMismatch { count, size: payload.len() });
    }
    let events = body.chunks_exact(RECORD_SIZE).map(|chunk| chunk.try_into().expect("128 bytes"));
    match kind {
        KIND_CREATE_ACCOUNTS => {
            Ok(Record::CreateAccounts { timestamp, accounts: events.map(Account::decode).collect() })
        }
        KIND_CREATE_TRANSFERS => {
            Ok(Record::CreateTransfers { timestamp, transfers: events.map(Transfer::decode).collect() })
        }
        KIND_PULSE if count == 0 => Ok(Record::Pulse { timestamp }),
        KIND_PULSE => Err(RecordError::SizeMismatch { count, size: payload.len() }),
        kind => Err(RecordError::UnknownKind { kind }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip() {
        let mut buffer = Vec::new();
        let transfers =
            vec![Transfer { id: 1, amount: 5, ..Transfer::default() }, Transfer { id: 2, ..Transfer::default() }];
        encode_create_transfers(&mut buffer, 42, &transfers);
        assert_eq!(decode(&buffer), Ok(Record::CreateTransfers { timestamp: 42, transfers }));
        let accounts = vec![Account { id: 9, ledger: 1, code: 1, ..Account::default() }];
        encode_create_accounts(&mut buffer, 43, &accounts);
        assert_eq!(decode(&buffer), Ok(Record::CreateAccounts { timestamp: 43, accounts }));
        encode_pulse(&mut buffer, 44);
        assert_eq!(decode(&buffer), Ok(Record::Pulse { timestamp: 44 }));
    }

    #[test]
    fn malformed_records_are_errors() {
        assert_eq!(decode(&[1, 0, 0]), Err(RecordError::Short { size: 3 }));
        let mut buffer = Vec::new();
        encode_pulse(&mut buffer, 1);
        buffer[0] = 9;
        assert_eq!(decode(&buffer), Err(RecordError::UnknownKind { kind: 9 }));
        encode_create_transfers(&mut buffer, 1, &[Transfer::default()]);
        buffer.pop();
        assert!(matches!(decode(&buffer), Err(RecordError::SizeMismatch { .. })));
    }
}
