//! Durations ("90s", "30m", "2h", "1h30m") and sizes ("512MiB", "2GiB") as users write them.

use std::fmt;
use std::time::Duration;

const DURATION_EXAMPLE: &str =
    "write a number and a unit, like \"90s\", \"30m\", \"2h\" or \"1h30m\"";

/// Why a text is not a duration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("the duration is empty: {DURATION_EXAMPLE}")]
    Empty,
    #[error("`{0}` is not a duration: {DURATION_EXAMPLE}")]
    NotADuration(String),
    #[error("`{0}` has no unit: {DURATION_EXAMPLE} (s, m, h or d)")]
    NoUnit(String),
    #[error("`{text}` has the unknown unit `{unit}`: use s, m, h or d, like \"90s\" or \"2h\"")]
    UnknownUnit { text: String, unit: String },
    #[error(
        "`{0}` repeats a unit or puts a smaller one first: write the largest unit first, like \"1h30m\""
    )]
    UnitOrder(String),
    #[error("`{0}` is too large to be a duration")]
    TooLarge(String),
}

/// Parses a duration: one or more `<integer><unit>` groups, units `s`, `m`, `h`, `d`, largest first
/// (`1h30m`). Zero is allowed here; callers that need a positive value check for it.
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total: u64 = 0;
    let mut last_unit_secs = u64::MAX;
    let mut rest = trimmed;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(DurationError::NotADuration(text.to_owned()));
        }
        let (number, after) = rest.split_at(digits);
        let unit_len = after
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_secs = match unit {
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "" => return Err(DurationError::NoUnit(text.to_owned())),
            other => {
                return Err(DurationError::UnknownUnit {
                    text: text.to_owned(),
                    unit: other.to_owned(),
                });
            }
        };
        if unit_secs >= last_unit_secs {
            return Err(DurationError::UnitOrder(text.to_owned()));
        }
        last_unit_secs = unit_secs;
        let too_large = || DurationError::TooLarge(text.to_owned());
        let value: u64 = number.parse().map_err(|_| too_large())?;
        total = value
            .checked_mul(unit_secs)
            .and_then(|v| total.checked_add(v))
            .ok_or_else(too_large)?;
        rest = next;
    }
    Ok(Duration::from_secs(total))
}

/// Formats a duration the way `parse_duration` reads it, largest unit first ("1h30m", "90s" as "1m30s").
pub fn format_duration(duration: Duration) -> String {
    let mut secs = duration.as_secs();
    if secs == 0 {
        return "0s".into();
    }
    let mut out = String::new();
    for (unit, size) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= size {
            out.push_str(&format!("{}{unit}", secs / size));
            secs %= size;
        }
    }
    out
}

/// A size in bytes; in config files and JSON it is written as text, like "512MiB".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = SizeError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_size(s)
    }
}

/// A duration written as text in config files and JSON, like "30s" or "1h30m".
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl std::str::FromStr for HumanDuration {
    type Err = DurationError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_duration(s).map(HumanDuration)
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&format_duration(self.0))
    }
}

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * KIB;
pub const GIB: u64 = 1024 * MIB;
pub const TIB: u64 = 1024 * GIB;

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (unit, size) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}B", self.0)
    }
}

const SIZE_EXAMPLE: &str = "write an integer and a unit, like \"512MiB\" or \"2GiB\"";

/// Why a text is not a size.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    #[error("`{0}` is not a size: {SIZE_EXAMPLE}")]
    NotASize(String),
    #[error("`{0}` has no unit: {SIZE_EXAMPLE}")]
    NoUnit(String),
    /// A decimal-looking unit (`M`, `GB`): sizes are binary, `binary` is the text to write.
    #[error("`{text}` uses the ambiguous unit `{unit}`: sizes are binary here, write \"{binary}\"")]
    AmbiguousUnit {
        text: String,
        unit: String,
        binary: String,
    },
    #[error("`{text}` has the unknown unit `{unit}`: use B, KiB, MiB, GiB or TiB, like \"512MiB\"")]
    UnknownUnit { text: String, unit: String },
    #[error("`{0}` is too large")]
    TooLarge(String),
}

/// Parses a size: an integer and a binary unit (`B`, `KiB`, `MiB`, `GiB`, `TiB`), like "512MiB".
pub fn parse_size(text: &str) -> Result<ByteSize, SizeError> {
    let trimmed = text.trim();
    let digits = trimmed
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(trimmed.len());
    if digits == 0 {
        return Err(SizeError::NotASize(text.to_owned()));
    }
    let (number, unit) = trimmed.split_at(digits);
    let unit = unit.trim_start();
    let multiplier = match unit {
        "B" => 1,
        "KiB" => KIB,
        "MiB" => MIB,
        "GiB" => GIB,
        "TiB" => TIB,
        "" => return Err(SizeError::NoUnit(text.to_owned())),
        "K" | "KB" | "k" | "kB" | "M" | "MB" | "G" | "GB" | "T" | "TB" => {
            return Err(SizeError::AmbiguousUnit {
                text: text.to_owned(),
                unit: unit.to_owned(),
                binary: format!("{number}{}iB", &unit[..1].to_ascii_uppercase()),
            });
        }
        other => {
            return Err(SizeError::UnknownUnit {
                text: text.to_owned(),
                unit: other.to_owned(),
            });
        }
    };
    let too_large = || SizeError::TooLarge(text.to_owned());
    let value: u64 = number.parse().map_err(|_| too_large())?;
    value
        .checked_mul(multiplier)
        .map(ByteSize)
        .ok_or_else(too_large)
}

serde_as_text!(ByteSize);
serde_as_text!(HumanDuration);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_durations_parse() {
        let cases = [
            ("90s", 90),
            ("30m", 1800),
            ("2h", 7200),
            ("1h30m", 5400),
            ("1d2h3m4s", 93_784),
            ("0s", 0),
            (" 5m ", 300),
        ];
        for (text, secs) in cases {
            assert_eq!(
                parse_duration(text),
                Ok(Duration::from_secs(secs)),
                "{text}"
            );
        }
    }

    #[test]
    fn test_durations_refused_with_reason() {
        let cases = [
            ("", "empty"),
            ("90", "no unit"),
            ("10x", "unknown unit `x`"),
            ("1.5h", "unknown unit `.`"),
            ("m", "not a duration"),
            ("30m1h", "largest unit first"),
            ("1m1m", "largest unit first"),
            ("-5s", "not a duration"),
            ("99999999999999999999s", "too large"),
            ("999999999999999999d", "too large"),
        ];
        for (text, want) in cases {
            let err = parse_duration(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn test_duration_format_round_trips() {
        for secs in [0, 1, 59, 60, 90, 3600, 5400, 86_400, 93_784] {
            let d = Duration::from_secs(secs);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d));
        }
        assert_eq!(format_duration(Duration::from_secs(5400)), "1h30m");
    }

    #[test]
    fn test_sizes_parse() {
        let cases = [
            ("512MiB", 512 * MIB),
            ("2GiB", 2 * GIB),
            ("1 GiB", GIB),
            ("4096B", 4096),
            ("3KiB", 3 * KIB),
            ("1TiB", TIB),
        ];
        for (text, bytes) in cases {
            assert_eq!(parse_size(text), Ok(ByteSize(bytes)), "{text}");
        }
    }

    #[test]
    fn test_sizes_refused_with_reason() {
        let cases = [
            ("", "not a size"),
            ("512", "no unit"),
            ("1GB", "write \"1GiB\""),
            ("512M", "write \"512MiB\""),
            ("1.5GiB", "unknown unit `.5GiB`"),
            ("2gib", "unknown unit `gib`"),
            ("99999999999TiB", "too large"),
        ];
        for (text, want) in cases {
            let err = parse_size(text).unwrap_err().to_string();
            assert!(err.contains(want), "{text:?}: {err}");
        }
    }

    #[test]
    fn test_text_forms_in_json() {
        let size: ByteSize = serde_json::from_str("\"2GiB\"").unwrap();
        assert_eq!(size, ByteSize(2 * GIB));
        assert_eq!(serde_json::to_string(&size).unwrap(), "\"2GiB\"");
        let d: HumanDuration = serde_json::from_str("\"1h30m\"").unwrap();
        assert_eq!(d.0, Duration::from_secs(5400));
        let err = serde_json::from_str::<ByteSize>("\"2GB\"")
            .unwrap_err()
            .to_string();
        assert!(err.contains("write \"2GiB\""), "{err}");
    }

    #[test]
    fn test_size_display_round_trips() {
        for bytes in [1, 1000, KIB, 3 * MIB, 512 * MIB, 2 * GIB, GIB + 1] {
            let s = ByteSize(bytes).to_string();
            assert_eq!(parse_size(&s), Ok(ByteSize(bytes)), "{s}");
        }
    }
}
