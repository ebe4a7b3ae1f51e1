//! Checks shared by the JSON and protobuf decoders: decimal strings, narrowing,
//! flag names, batch sizes.

use cellpay_ledger::{AccountFlags, TransferFlags, BATCH_EVENTS_MAX};

use crate::error::{quoted, DecodeError, FieldPath};

/// Parses a canonical decimal `u128`: ASCII digits only, no sign, no
/// whitespace, no leading zero (as a JSON number).
pub(crate) fn parse_u128(field: FieldPath, text: &str) -> Result<u128, DecodeError> {
    if !is_canonical_decimal(text) {
        return Err(DecodeError::not_decimal(field, "u128", text));
    }
    text.parse::<u128>().map_err(|_| DecodeError::out_of_range(field, "u128", quoted(text)))
}

/// Parses a canonical decimal `u64`, as [`parse_u128`].
pub(crate) fn parse_u64(field: FieldPath, text: &str) -> Result<u64, DecodeError> {
    if !is_canonical_decimal(text) {
        return Err(DecodeError::not_decimal(field, "u64", text));
    }
    text.parse::<u64>().map_err(|_| DecodeError::out_of_range(field, "u64", quoted(text)))
}

fn is_canonical_decimal(text: &str) -> bool {
    let digits_only = !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit());
    digits_only && (text == "0" || !text.starts_with('0'))
}

/// Narrows a protobuf `uint32` to the ledger's `u16`.
pub(crate) fn narrow_u16(field: FieldPath, value: u32) -> Result<u16, DecodeError> {
    u16::try_from(value).map_err(|_| DecodeError::out_of_range(field, "u16", value.to_string()))
}

/// Refuses an empty batch or one over `BATCH_EVENTS_MAX`, before its events are decoded.
pub(crate) fn check_batch(field: FieldPath, count: usize) -> Result<(), DecodeError> {
    if count == 0 {
        return Err(DecodeError::BatchEmpty { field, events_max: BATCH_EVENTS_MAX });
    }
    if count > BATCH_EVENTS_MAX {
        return Err(DecodeError::BatchTooLarge { field, count, events_max: BATCH_EVENTS_MAX });
    }
    Ok(())
}

/// The ledger's two flag sets, seen as bits with lowercase wire names.
pub(crate) trait WireFlags: Copy + 'static {
    fn table() -> &'static [(&'static str, Self)];
    fn bits(self) -> u16;
    fn from_bits(bits: u16) -> Self;
}

impl WireFlags for AccountFlags {
    fn table() -> &'static [(&'static str, Self)] {
        AccountFlags::NAMES
    }
    fn bits(self) -> u16 {
        self.0
    }
    fn from_bits(bits: u16) -> Self {
        AccountFlags(bits)
    }
}

impl WireFlags for TransferFlags {
    fn table() -> &'static [(&'static str, Self)] {
        TransferFlags::NAMES
    }
    fn bits(self) -> u16 {
        self.0
    }
    fn from_bits(bits: u16) -> Self {
        TransferFlags(bits)
    }
}

/// Parses a list of lowercase flag names; an unknown, uppercase or repeated name is an error.
pub(crate) fn flags_from_names<F: WireFlags>(field: FieldPath, names: &[String]) -> Result<F, DecodeError> {
    let mut bits: u16 = 0;
    for name in names {
        let is_lowercase = !name.bytes().any(|b| b.is_ascii_uppercase());
        let flag = F::table()
            .iter()
            .find(|(flag_name, _)| is_lowercase && flag_name.eq_ignore_ascii_case(name))
            .map(|(_, flag)| flag.bits());
        let Some(flag) = flag else {
            let expected = F::table().iter().map(|(n, _)| n.to_ascii_lowercase()).collect::<Vec<_>>().join(", ");
            let name = crate::error::truncate(name, crate::error::ERROR_VALUE_ECHO_CHARS_MAX);
            return Err(DecodeError::UnknownFlag { field, name, expected });
        };
        if bits & flag != 0 {
            return Err(DecodeError::DuplicateFlag { field, name: name.clone() });
        }
        bits |= flag;
    }
    Ok(F::from_bits(bits))
}

/// The lowercase names of the flags that are set, in bit order.
///
/// Panics on a reserved bit: the ledger never stores one (it answers
/// `reserved_flag`), and a JSON name list cannot carry it.
pub(crate) fn flags_to_names<F: WireFlags>(flags: F) -> Vec<String> {
    let known = F::table().iter().fold(0u16, |bits, (_, flag)| bits | flag.bits());
    assert_eq!(flags.bits() & !known, 0, "reserved flag bits set: {:#06x}", flags.bits());
    F::table()
        .iter()
        .filter(|(_, flag)| flags.bits() & flag.bits() != 0)
        .map(|(name, _)| name.to_ascii_lowercase())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field() -> FieldPath {
        FieldPath::event("transfers", 3, "amount")
    }

    #[test]
    fn decimals_parse() {
        assert_eq!(parse_u128(field(), "0"), Ok(0));
        assert_eq!(parse_u128(field(), "340282366920938463463374607431768211455"), Ok(u128::MAX));
        assert_eq!(parse_u64(field(), "18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn non_canonical_decimals_are_refused() {
        for text in ["", "abc", "-1", "+1", " 1", "1 ", "007", "1e3", "1.0", "0x10", "١"] {
            let error = parse_u128(field(), text).unwrap_err().to_string();
            assert_eq!(error, format!("transfers[3].amount: not a decimal u128: {text:?}"));
        }
    }

    #[test]
    fn out_of_range_decimals_are_refused() {
        let error = parse_u128(field(), "340282366920938463463374607431768211456").unwrap_err();
        assert_eq!(
            error.to_string(),
            r#"transfers[3].amount: out of range for u128: "340282366920938463463374607431768211456""#
        );
        let error = parse_u64(field(), "18446744073709551616").unwrap_err();
        assert_eq!(error.to_string(), r#"transfers[3].amount: out of range for u64: "18446744073709551616""#);
    }

    #[test]
    fn long_values_are_truncated_in_messages() {
        for text in ["9".repeat(1000), "x".repeat(1000)] {
            let error = parse_u128(field(), &text).unwrap_err().to_string();
            assert!(error.len() < 200, "{error}");
            assert!(error.ends_with("…\""), "{error}");
        }
    }

    #[test]
    fn narrowing_refuses_values_over_u16() {
        assert_eq!(narrow_u16(field(), 65535), Ok(65535));
        let error = narrow_u16(FieldPath::event("transfers", 0, "code"), 65536).unwrap_err();
        assert_eq!(error.to_string(), "transfers[0].code: out of range for u16: 65536");
    }

    #[test]
    fn flag_names_parse_strictly() {
        let names = |list: &[&str]| list.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        let flags: TransferFlags = flags_from_names(field(), &names(&["pending", "linked"])).unwrap();
        assert_eq!(flags, TransferFlags::PENDING | TransferFlags::LINKED);
        assert_eq!(flags_to_names(flags), vec!["linked", "pending"]);
        let error = flags_from_names::<TransferFlags>(field(), &names(&["LINKED"])).unwrap_err();
        assert!(matches!(error, DecodeError::UnknownFlag { .. }), "{error}");
        let error = flags_from_names::<TransferFlags>(field(), &names(&["linked", "linked"])).unwrap_err();
        assert_eq!(error.to_string(), r#"transfers[3].amount: flag "linked" is listed more than once"#);
    }

    #[test]
    fn batches_are_bounded() {
        assert!(check_batch(field(), 1).is_ok());
        assert!(check_batch(field(), BATCH_EVENTS_MAX).is_ok());
        assert!(matches!(check_batch(field(), 0), Err(DecodeError::BatchEmpty { .. })));
        assert!(matches!(check_batch(field(), BATCH_EVENTS_MAX + 1), Err(DecodeError::BatchTooLarge { .. })));
    }
}
