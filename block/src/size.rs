//! Sizes written as QEMU writes them (`qemu_strtosz`): the syntax of every size option
//! (`size=1.5G`, `l2-cache-size=4M`) and of the examples' command lines.

use std::fmt;
use std::io;
use std::num::IntErrorKind;

/// Parses a size in bytes as QEMU's `qemu_strtosz` does:
///
/// - decimal, with an optional fraction, then an optional unit: `B` (bytes), `k`, `M`, `G`,
///   `T`, `P` or `E` (powers of 1024, either case). A fraction needs a unit other than `B`
///   and is truncated to whole bytes (`1.5k` is 1536);
/// - or `0x` hexadecimal, with neither fraction nor unit;
/// - leading white space is skipped; a leading `0` is not octal (`010` is ten bytes); a sign
///   is out of range; nothing may follow the unit (`1GB` and `1GiB` are not sizes).
///
/// ```
/// use aiocoro_block::{parse_size, SizeErrorKind};
///
/// assert_eq!(parse_size("1G")?, 1 << 30);
/// assert_eq!(parse_size("1.5k")?, 1536);
/// assert_eq!(parse_size("0x1000")?, 4096);
/// assert_eq!(parse_size("512")?, 512);
/// let error = parse_size("1X").unwrap_err();
/// assert_eq!(error.kind(), SizeErrorKind::Malformed);
/// assert_eq!(error.to_string(), "'1X' is not a size");
/// assert_eq!(parse_size("16E").unwrap_err().kind(), SizeErrorKind::OutOfRange);
/// # Ok::<(), aiocoro_block::SizeError>(())
/// ```
///
/// # Errors
///
/// [`SizeErrorKind::Malformed`] for what is not a size, [`SizeErrorKind::OutOfRange`] for a
/// negative one or one past `u64::MAX`.
pub fn parse_size(text: &str) -> Result<u64, SizeError> {
    let error = |kind| SizeError { text: text.to_owned(), kind };
    let bytes = size(text).map_err(error)?;
    u64::try_from(bytes).map_err(|_| error(SizeErrorKind::OutOfRange))
}

/// Why a text is not a size (see [`parse_size`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SizeErrorKind {
    /// Not a size at all.
    Malformed,
    /// A size, but negative or past `u64::MAX`.
    OutOfRange,
}

/// A text that [`parse_size`] refused, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SizeError {
    text: String,
    kind: SizeErrorKind,
}

impl SizeError {
    /// Why the text was refused.
    pub fn kind(&self) -> SizeErrorKind {
        self.kind
    }
}

impl fmt::Display for SizeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.kind {
            SizeErrorKind::Malformed => write!(f, "'{}' is not a size", self.text),
            SizeErrorKind::OutOfRange => write!(f, "'{}' is out of range", self.text),
        }
    }
}

impl std::error::Error for SizeError {}

impl From<SizeError> for io::Error {
    /// An `InvalidInput` error with the same message.
    fn from(error: SizeError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidInput, error)
    }
}

/// The bytes `text` names, wider than a `u64` so that the caller sees what overflows.
fn size(text: &str) -> Result<u128, SizeErrorKind> {
    let text = text.trim_start();
    if text.starts_with(['-', '+']) {
        return Err(SizeErrorKind::OutOfRange);
    }
    if let Some(hex) = text.strip_prefix("0x").or_else(|| text.strip_prefix("0X")) {
        return digits_value(hex, 16);
    }
    let split = text.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let shift = match unit {
        "" | "b" | "B" => 0,
        "k" | "K" => 10,
        "m" | "M" => 20,
        "g" | "G" => 30,
        "t" | "T" => 40,
        "p" | "P" => 50,
        "e" | "E" => 60,
        _ => return Err(SizeErrorKind::Malformed),
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    if number.contains('.') && shift == 0 {
        return Err(SizeErrorKind::Malformed);
    }
    if whole.is_empty() && fraction.is_empty() {
        return Err(SizeErrorKind::Malformed);
    }
    let whole = if whole.is_empty() { 0 } else { digits_value(whole, 10)? };
    let bytes = whole.checked_mul(1 << shift).ok_or(SizeErrorKind::OutOfRange)?;
    bytes.checked_add(fraction_bytes(fraction, shift)?).ok_or(SizeErrorKind::OutOfRange)
}

/// The value of `digits` (at least one, all valid in `radix`; no sign).
fn digits_value(digits: &str, radix: u32) -> Result<u128, SizeErrorKind> {
    if digits.starts_with('+') {
        return Err(SizeErrorKind::Malformed);
    }
    u128::from_str_radix(digits, radix).map_err(|error| match error.kind() {
        IntErrorKind::PosOverflow => SizeErrorKind::OutOfRange,
        _ => SizeErrorKind::Malformed,
    })
}

/// The whole bytes of `0.<fraction>` units of `1 << shift` bytes, truncated (digits past the
/// 18th cannot add a byte below an exbibyte and are ignored, as a `double` ignores them).
fn fraction_bytes(fraction: &str, shift: u32) -> Result<u128, SizeErrorKind> {
    let fraction = &fraction[..fraction.len().min(18)];
    if fraction.is_empty() {
        return Ok(0);
    }
    let numerator = digits_value(fraction, 10)?;
    let denominator = 10u128.pow(fraction.len() as u32);
    Ok((numerator << shift) / denominator)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kind(text: &str) -> SizeErrorKind {
        parse_size(text).expect_err(text).kind()
    }

    #[test]
    fn sizes_take_units_and_fractions() {
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("2G"), Ok(2 << 30));
        assert_eq!(parse_size("1T"), Ok(1 << 40));
        assert_eq!(parse_size("1P"), Ok(1 << 50));
        assert_eq!(parse_size("1E"), Ok(1 << 60));
        assert_eq!(parse_size("512"), Ok(512));
        assert_eq!(parse_size("512B"), Ok(512));
        assert_eq!(parse_size("1b"), Ok(1));
        assert_eq!(parse_size("1.5k"), Ok(1536));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        assert_eq!(parse_size("1.1k"), Ok(1126));
        assert_eq!(parse_size(".5k"), Ok(512));
        assert_eq!(parse_size("1.k"), Ok(1024));
        assert_eq!(parse_size("0.0001k"), Ok(0));
        assert_eq!(parse_size(" 1k"), Ok(1024));
        assert_eq!(parse_size("15E"), Ok(15 << 60));
        assert_eq!(parse_size("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn sizes_are_hex_after_0x_and_never_octal() {
        assert_eq!(parse_size("0x1000"), Ok(4096));
        assert_eq!(parse_size("0X10"), Ok(16));
        assert_eq!(parse_size("010"), Ok(10));
    }

    #[test]
    fn sizes_refuse_what_qemu_refuses() {
        for bad in [
            "1.5", "1.5b", "0x1k", "0x", "00x10", "1kB", "1Kb", "1GiB", "1 k", "1x", "1e3", "",
            ".", "0x+10", "1+k", "1.+5k",
        ] {
            assert_eq!(kind(bad), SizeErrorKind::Malformed, "{bad:?}");
        }
        for big in ["-1", "-0", "+1", "16E", "18446744073709551616", "99999999999999999999999E"] {
            assert_eq!(kind(big), SizeErrorKind::OutOfRange, "{big:?}");
        }
    }

    #[test]
    fn errors_name_the_text_and_are_invalid_input() {
        assert_eq!(parse_size("1X").unwrap_err().to_string(), "'1X' is not a size");
        assert_eq!(parse_size("-1").unwrap_err().to_string(), "'-1' is out of range");
        let error = io::Error::from(parse_size("1X").unwrap_err());
        assert_eq!(error.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(error.to_string(), "'1X' is not a size");
    }
}
