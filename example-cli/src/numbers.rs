//! Numbers on the command line, read as `qemu-img` reads them.
//!
//! - An integer (a count, a depth, a pattern byte) is C's `strtol` with base 0: decimal,
//!   `0x` / `0X` hexadecimal, or octal after a leading `0`; an optional sign; no unit.
//!   Leading white space is skipped, as `strtol` skips it.
//! - A size (an offset, a buffer size) is QEMU's `qemu_strtosz`, as the block layer reads
//!   every size ([`aiocoro_block::parse_size`]): `1.5k`, `4M`, `0x1000`.
//!
//! Each parser takes what the number is (`"request count"`) and the range it must lie in, and
//! says, as `qemu-img` does, either `Invalid request count specified: 'abc'.` or `Invalid
//! request count specified. Must be between 1 and 2147483647.`

use std::num::IntErrorKind;
use std::ops::RangeInclusive;

use aiocoro_block::SizeErrorKind;

/// Why a number was refused.
enum Refusal {
    /// Not a number at all.
    Malformed,
    /// A number, outside what the caller accepts (or than `i128` holds).
    OutOfRange,
}

/// Parses an integer in `range` (see the [module docs](self)); `what` names it in the error.
///
/// # Errors
///
/// The message `qemu-img` gives for what is not an integer, or for one out of `range`.
pub fn parse_integer(text: &str, what: &str, range: RangeInclusive<i64>) -> Result<i64, String> {
    let (low, high) = (i128::from(*range.start()), i128::from(*range.end()));
    // In range, so an i64.
    in_range(integer(text), text, what, low..=high).map(|value| value as i64)
}

/// Parses a size in bytes in `range` (see the [module docs](self)); `what` names it in the
/// error.
///
/// # Errors
///
/// The message `qemu-img` gives for what is not a size, or for one out of `range`.
pub fn parse_size(text: &str, what: &str, range: RangeInclusive<u64>) -> Result<u64, String> {
    let (low, high) = (i128::from(*range.start()), i128::from(*range.end()));
    let bytes =
        aiocoro_block::parse_size(text).map(i128::from).map_err(|error| match error.kind() {
            SizeErrorKind::Malformed => Refusal::Malformed,
            SizeErrorKind::OutOfRange => Refusal::OutOfRange,
        });
    // In range, so a u64.
    in_range(bytes, text, what, low..=high).map(|bytes| bytes as u64)
}

/// The value, or `qemu-img`'s message for why it is refused.
fn in_range(
    parsed: Result<i128, Refusal>,
    text: &str,
    what: &str,
    range: RangeInclusive<i128>,
) -> Result<i128, String> {
    match parsed {
        Ok(value) if range.contains(&value) => Ok(value),
        Err(Refusal::Malformed) => Err(format!("Invalid {what} specified: '{text}'.")),
        Ok(_) | Err(Refusal::OutOfRange) => Err(format!(
            "Invalid {what} specified. Must be between {} and {}.",
            range.start(),
            range.end()
        )),
    }
}

/// `strtol(text, &end, 0)` with the whole text consumed.
fn integer(text: &str) -> Result<i128, Refusal> {
    let text = text.trim_start();
    let (negative, unsigned) = match text.as_bytes().first() {
        Some(b'-') => (true, &text[1..]),
        Some(b'+') => (false, &text[1..]),
        _ => (false, text),
    };
    let (radix, digits) = radix_and_digits(unsigned);
    let magnitude = digits_value(digits, radix)?;
    Ok(if negative { -magnitude } else { magnitude })
}

/// The radix a C literal's prefix selects, and the digits after the prefix.
fn radix_and_digits(text: &str) -> (u32, &str) {
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        (16, hex)
    } else if text.len() > 1 && text.starts_with('0') {
        (8, &text[1..])
    } else {
        (10, text)
    }
}

/// The value of `digits` (at least one, all valid in `radix`; no sign).
fn digits_value(digits: &str, radix: u32) -> Result<i128, Refusal> {
    if digits.starts_with(['+', '-']) {
        return Err(Refusal::Malformed);
    }
    i128::from_str_radix(digits, radix).map_err(|error| match error.kind() {
        IntErrorKind::PosOverflow => Refusal::OutOfRange,
        _ => Refusal::Malformed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ANY_COUNT: RangeInclusive<i64> = 1..=i32::MAX as i64;
    const ANY_SIZE: RangeInclusive<u64> = 0..=i64::MAX as u64;

    fn count(text: &str) -> Result<i64, String> {
        parse_integer(text, "request count", ANY_COUNT)
    }

    fn offset(text: &str) -> Result<u64, String> {
        parse_size(text, "offset", ANY_SIZE)
    }

    #[test]
    fn integers_are_decimal_hex_or_octal() {
        assert_eq!(count("16"), Ok(16));
        assert_eq!(count("0x10"), Ok(16));
        assert_eq!(count("0X10"), Ok(16));
        assert_eq!(count("010"), Ok(8));
        assert_eq!(count(" +5"), Ok(5));
        assert_eq!(parse_integer("0xa5", "pattern byte", 0..=255), Ok(0xa5));
        assert_eq!(parse_integer("0245", "pattern byte", 0..=255), Ok(0xa5));
        assert_eq!(parse_integer("0", "pattern byte", 0..=255), Ok(0));
    }

    #[test]
    fn integers_refuse_units_and_stray_characters_as_qemu_img_does() {
        for bad in ["1k", "16B", "1.5", "abc", "08", "0x", "", "5 ", "0x1g", "0x+1", "-+5", "0-1"] {
            assert_eq!(count(bad), Err(format!("Invalid request count specified: '{bad}'.")));
        }
    }

    #[test]
    fn integers_out_of_range_say_the_range() {
        let range =
            Err("Invalid request count specified. Must be between 1 and 2147483647.".into());
        assert_eq!(count("0"), range);
        assert_eq!(count("-1"), range);
        assert_eq!(count("2147483648"), range);
        assert_eq!(count("99999999999999999999999999999999999999999"), range);
        assert_eq!(
            parse_integer("256", "pattern byte", 0..=255),
            Err("Invalid pattern byte specified. Must be between 0 and 255.".into())
        );
    }

    #[test]
    fn sizes_are_read_as_the_block_layer_reads_them() {
        assert_eq!(offset("1.5k"), Ok(1536));
        assert_eq!(offset("0x1000"), Ok(4096));
        assert_eq!(offset("010"), Ok(10));
    }

    #[test]
    fn sizes_refuse_what_qemu_img_refuses() {
        for bad in ["1.5", "0x1k", "1kB", "1x", ""] {
            assert_eq!(offset(bad), Err(format!("Invalid offset specified: '{bad}'.")));
        }
        let range =
            Err("Invalid offset specified. Must be between 0 and 9223372036854775807.".into());
        assert_eq!(offset("-1"), range);
        assert_eq!(offset("-0"), range);
        assert_eq!(offset("8E"), range);
        assert_eq!(offset("99999999999999999999999E"), range);
        assert_eq!(
            parse_size("0", "buffer size", 1..=i32::MAX as u64),
            Err("Invalid buffer size specified. Must be between 1 and 2147483647.".into())
        );
    }
}
