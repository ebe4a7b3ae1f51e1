//! Ledger definitions: which ledgers (currencies, assets) exist, and how
//! their amounts are written.
//!
//! An account names its ledger by a number; a transfer moves money only
//! between accounts of one ledger. The definitions say what those numbers
//! mean: ledger 1 is "CNY" with 2 decimal places (an amount of 1234 is
//! 12.34 CNY). They cannot be split by user, so the global cell holds them,
//! versioned like the routing table: the cluster file's `[[ledger]]` entries
//! are version 1, and every definition makes the next version. A definition
//! is final: redefining a ledger would change what every balance on it means.
//!
//! Every cell adopts the global cell's definitions into its own log before it
//! enforces them, and creates accounts only on ledgers its log has defined
//! (`ledger_not_defined` otherwise), so every replica decides alike.
//!
//! Encoding (all integers little-endian), for storing and shipping a table:
//!
//! ```text
//! offset  size  field
//!      0     4  magic b"cpLD"
//!      4     8  version (>= 1)
//!     12     4  definitions n (<= LEDGERS_MAX), in ledger id order
//!     16     …  each: ledger id (u32), asset scale (u8), name length L (u8), name (L bytes)
//!      …     4  CRC32C of everything before it
//! ```

use std::collections::BTreeMap;
use std::fmt;

const MAGIC: [u8; 4] = *b"cpLD";
const HEADER_SIZE: usize = 16;

/// The most ledgers a cluster may define.
pub const LEDGERS_MAX: usize = 1024;
/// The longest ledger name, in bytes.
pub const LEDGER_NAME_BYTES_MAX: usize = 16;
/// The most decimal places an amount may have (10^18 still fits a u64 unit).
pub const ASSET_SCALE_MAX: u8 = 18;
/// The largest encoded table.
pub const TABLE_BYTES_MAX: usize = HEADER_SIZE + LEDGERS_MAX * (6 + LEDGER_NAME_BYTES_MAX) + 4;

/// One ledger: its number (what accounts and transfers name), its name, and
/// the decimal places of its amounts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerDefinition {
    /// Nonzero.
    pub id: u32,
    /// 1 to [`LEDGER_NAME_BYTES_MAX`] ASCII letters, digits, '-' and '_'.
    pub name: String,
    /// An amount of `n` units is `n / 10^asset_scale` of the asset.
    pub asset_scale: u8,
}

/// Why a definition, a change or an encoding was refused (nothing changed).
#[derive(Clone, Debug, thiserror::Error, PartialEq, Eq)]
pub enum LedgerError {
    #[error("ledger id 0 is invalid: ledgers are numbered from 1")]
    IdZero,
    #[error(
        "ledger {id}: name {name:?} is invalid: use 1 to {LEDGER_NAME_BYTES_MAX} of the characters a-z, A-Z, 0-9, \
         '-' and '_'"
    )]
    InvalidName { id: u32, name: String },
    #[error("ledger {id}: asset scale {asset_scale} is over the limit of {ASSET_SCALE_MAX}")]
    AssetScale { id: u32, asset_scale: u8 },
    #[error("ledger {id} is already defined as {existing}: a definition is final")]
    AlreadyDefined { id: u32, existing: LedgerDefinition },
    #[error("ledger name {name} is already ledger {id}'s")]
    NameTaken { name: String, id: u32 },
    #[error("the cluster defines its limit of {LEDGERS_MAX} ledgers")]
    TooMany,
    #[error("the ledger definitions are at version {current}, not {expected}: read them again and retry")]
    VersionMismatch { expected: u64, current: u64 },
    #[error("ledger definitions encoding: {reason}")]
    Malformed { reason: String },
}

impl fmt::Display for LedgerDefinition {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(formatter, "{} (ledger {}, {} decimal places)", self.name, self.id, self.asset_scale)
    }
}

impl LedgerDefinition {
    /// The local cluster's ledger (`Topology::local`): 1, "CNY", 2 decimal places.
    pub fn local() -> LedgerDefinition {
        LedgerDefinition { id: 1, name: "CNY".to_string(), asset_scale: 2 }
    }

    /// Checks the definition's own fields.
    pub fn check(&self) -> Result<(), LedgerError> {
        if self.id == 0 {
            return Err(LedgerError::IdZero);
        }
        let name_valid = !self.name.is_empty()
            && self.name.len() <= LEDGER_NAME_BYTES_MAX
            && self.name.bytes().all(|byte| byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_'));
        if !name_valid {
            let name = self.name.chars().take(LEDGER_NAME_BYTES_MAX * 2).collect();
            return Err(LedgerError::InvalidName { id: self.id, name });
        }
        if self.asset_scale > ASSET_SCALE_MAX {
            return Err(LedgerError::AssetScale { id: self.id, asset_scale: self.asset_scale });
        }
        Ok(())
    }
}

/// The defined ledgers, at one version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LedgerTable {
    version: u64,
    ledgers: BTreeMap<u32, LedgerDefinition>,
}

impl LedgerTable {
    /// Version 1: the cluster file's definitions, checked as
    /// [`LedgerTable::define`] checks each (ids and names unique, at most
    /// [`LEDGERS_MAX`]).
    pub fn initial(definitions: &[LedgerDefinition]) -> Result<LedgerTable, LedgerError> {
        let mut table = LedgerTable { version: 1, ledgers: BTreeMap::new() };
        for definition in definitions {
            table.insert(definition.clone())?;
        }
        Ok(table)
    }

    pub fn version(&self) -> u64 {
        self.version
    }

    /// Whether accounts may be created on `ledger`.
    pub fn defines(&self, ledger: u32) -> bool {
        self.ledgers.contains_key(&ledger)
    }

    pub fn get(&self, ledger: u32) -> Option<&LedgerDefinition> {
        self.ledgers.get(&ledger)
    }

    /// The definitions, in ledger id order.
    pub fn definitions(&self) -> impl Iterator<Item = &LedgerDefinition> + '_ {
        self.ledgers.values()
    }

    pub fn len(&self) -> usize {
        self.ledgers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ledgers.is_empty()
    }

    /// The table with one more ledger, at the next version, if the table is
    /// still at `expected_version` (compare and set). The table itself is unchanged.
    pub fn define(&self, expected_version: u64, definition: LedgerDefinition) -> Result<LedgerTable, LedgerError> {
        if expected_version != self.version {
            return Err(LedgerError::VersionMismatch { expected: expected_version, current: self.version });
        }
        let mut next = self.clone();
        next.insert(definition)?;
        next.version += 1;
        Ok(next)
    }

    fn insert(&mut self, definition: LedgerDefinition) -> Result<(), LedgerError> {
        definition.check()?;
        if let Some(existing) = self.ledgers.get(&definition.id) {
            return Err(LedgerError::AlreadyDefined { id: definition.id, existing: existing.clone() });
        }
        if let Some(other) = self.ledgers.values().find(|other| other.name == definition.name) {
            return Err(LedgerError::NameTaken { name: definition.name, id: other.id });
        }
        if self.ledgers.len() >= LEDGERS_MAX {
            return Err(LedgerError::TooMany);
        }
        self.ledgers.insert(definition.id, definition);
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_SIZE + self.ledgers.len() * 12 + 4);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_le_bytes());
        out.extend_from_slice(&(self.ledgers.len() as u32).to_le_bytes());
        for definition in self.ledgers.values() {
            out.extend_from_slice(&definition.id.to_le_bytes());
            out.push(definition.asset_scale);
            out.push(definition.name.len() as u8);
            out.extend_from_slice(definition.name.as_bytes());
        }
        let checksum = crc32c::crc32c(&out);
        out.extend_from_slice(&checksum.to_le_bytes());
        debug_assert!(out.len() <= TABLE_BYTES_MAX);
        out
    }

    /// Decodes a table, checking its checksum and every definition.
    pub fn decode(bytes: &[u8]) -> Result<LedgerTable, LedgerError> {
        let malformed = |reason: String| LedgerError::Malformed { reason };
        let body = crate::checked_body(bytes, &MAGIC, HEADER_SIZE, "a ledger table").map_err(malformed)?;
        let version = u64::from_le_bytes(body[4..12].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(body[12..16].try_into().expect("4 bytes")) as usize;
        if version == 0 || count > LEDGERS_MAX {
            return Err(malformed(format!("version {version}, {count} ledgers")));
        }
        let mut table = LedgerTable { version, ledgers: BTreeMap::new() };
        let mut rest = &body[HEADER_SIZE..];
        for _ in 0..count {
            let (fixed, after) = rest.split_at_checked(6).ok_or_else(|| malformed("truncated".to_string()))?;
            let id = u32::from_le_bytes(fixed[..4].try_into().expect("4 bytes"));
            let (name, after) =
                after.split_at_checked(usize::from(fixed[5])).ok_or_else(|| malformed("truncated".to_string()))?;
            let name = std::str::from_utf8(name).map_err(|_| malformed(format!("ledger {id}: name is not UTF-8")))?;
            table.insert(LedgerDefinition { id, name: name.to_string(), asset_scale: fixed[4] })?;
            rest = after;
        }
        if !rest.is_empty() {
            return Err(malformed(format!("{} bytes after the definitions", rest.len())));
        }
        Ok(table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn definition(id: u32, name: &str, asset_scale: u8) -> LedgerDefinition {
        LedgerDefinition { id, name: name.to_string(), asset_scale }
    }

    #[test]
    fn definitions_are_versioned_compare_and_set_and_final() {
        let table = LedgerTable::initial(&[definition(1, "CNY", 2)]).unwrap();
        assert_eq!(table.version(), 1);
        assert!(table.defines(1) && !table.defines(2));
        let next = table.define(1, definition(2, "USD", 2)).unwrap();
        assert_eq!(next.version(), 2);
        assert!(next.defines(2));
        assert!(!table.defines(2), "define leaves the table it was called on as it was");
        assert_eq!(
            next.define(1, definition(3, "JPY", 0)),
            Err(LedgerError::VersionMismatch { expected: 1, current: 2 })
        );
        assert_eq!(
            next.define(2, definition(2, "USD", 4)),
            Err(LedgerError::AlreadyDefined { id: 2, existing: definition(2, "USD", 2) })
        );
        assert_eq!(next.define(2, definition(3, "USD", 2)), Err(LedgerError::NameTaken { name: "USD".into(), id: 2 }));
        assert_eq!(next.define(2, definition(0, "X", 2)), Err(LedgerError::IdZero));
        assert_eq!(next.define(2, definition(3, "X", 19)), Err(LedgerError::AssetScale { id: 3, asset_scale: 19 }));
        for name in ["", "with space", "seventeen-bytes-x", "é"] {
            assert!(matches!(next.define(2, definition(3, name, 2)), Err(LedgerError::InvalidName { .. })), "{name}");
        }
        assert_eq!(
            LedgerTable::initial(&[definition(1, "A", 0), definition(1, "B", 0)]),
            Err(LedgerError::AlreadyDefined { id: 1, existing: definition(1, "A", 0) })
        );
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = LedgerTable::initial(&[]).unwrap();
        for id in 1..=LEDGERS_MAX as u32 {
            table = table.define(table.version(), definition(id, &format!("L{id:015}"), 2)).unwrap();
        }
        let version = table.version();
        let over = LEDGERS_MAX as u32 + 1;
        assert_eq!(table.define(version, definition(over, "OVER", 2)), Err(LedgerError::TooMany));
        let bytes = table.encode();
        assert_eq!(bytes.len(), TABLE_BYTES_MAX, "the largest table is the bound");
        assert_eq!(LedgerTable::decode(&bytes), Ok(table));
    }

    #[test]
    fn encoding_round_trips_and_refuses_damage() {
        let table = LedgerTable::initial(&[definition(7, "GOLD_g", 3), definition(1, "CNY", 2)]).unwrap();
        let table = table.define(1, definition(2, "USD", 2)).unwrap();
        let bytes = table.encode();
        assert_eq!(LedgerTable::decode(&bytes), Ok(table.clone()));
        assert_eq!(table.definitions().map(|definition| definition.id).collect::<Vec<_>>(), [1, 2, 7]);
        for cut in 0..bytes.len() {
            assert!(LedgerTable::decode(&bytes[..cut]).is_err(), "cut at {cut}");
        }
        let mut flipped = bytes.clone();
        flipped[20] ^= 1;
        assert!(matches!(LedgerTable::decode(&flipped), Err(LedgerError::Malformed { .. })));
    }
}
