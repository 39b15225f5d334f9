//! The one duration grammar of every flag and configuration file (`anchord`, `anchor-node`,
//! `anchorctl`): `90` (seconds), `500ms`, `30s`, `10m`, `2h`, `1d`, `2w`, and sums such as
//! `1h30m` or `1h 30m`.
//!
//! Parsing is [`humantime::parse_duration`] with three house rules on top, so that what
//! operators typed before keeps meaning the same thing: a bare whole number is seconds, units
//! are case-insensitive (`1H30M`; so `M` is minutes, and months are only ever spelled `month`),
//! and numbers are whole (`1.5h` is refused: write `1h30m`). Long unit names (`30sec`,
//! `2hours`, `1day`) are humantime's and are accepted too.

use std::time::Duration;

/// What operators are shown as examples when a duration cannot be read.
const EXAMPLES: &str = "e.g. 30s, 10m, 1h30m, 2d or 90 (seconds)";

/// Why a duration could not be read. The display names the text that was given; callers add the
/// flag or configuration key it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum DurationError {
    /// Nothing but whitespace was given.
    #[error("empty duration; expected {EXAMPLES}")]
    Empty,
    /// The text is not a sequence of `<number><unit>` parts (a sign, a stray character, a unit
    /// without a number).
    #[error("invalid duration {text:?}; expected {EXAMPLES}")]
    Malformed {
        /// The text as given (trimmed).
        text: String,
    },
    /// A number was not followed by a unit, as in `10m5`.
    #[error("invalid duration {text:?}: {number} needs a unit (ms, s, m, h, d, w)")]
    MissingUnit {
        /// The text as given (trimmed).
        text: String,
        /// The number that has no unit.
        number: u64,
    },
    /// A unit is not one of the known ones.
    #[error("invalid duration {text:?}: unknown unit {unit:?} (use ms, s, m, h, d, w)")]
    UnknownUnit {
        /// The text as given (trimmed).
        text: String,
        /// The unit, lower-cased.
        unit: String,
    },
    /// A number has a fractional part.
    #[error("invalid duration {text:?}: whole numbers only (write 1h30m, not 1.5h)")]
    Fractional {
        /// The text as given (trimmed).
        text: String,
    },
    /// The total does not fit a [`Duration`].
    #[error("duration {text:?} is too long")]
    TooLong {
        /// The text as given (trimmed).
        text: String,
    },
}

/// Parses a duration written by an operator (see the module documentation for the grammar).
pub fn parse_duration(text: &str) -> Result<Duration, DurationError> {
    let text = text.trim();
    if text.is_empty() {
        return Err(DurationError::Empty);
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse::<u64>()
            .map(Duration::from_secs)
            .map_err(|_| DurationError::TooLong { text: text.into() });
    }
    if text.contains('.') {
        return Err(DurationError::Fractional { text: text.into() });
    }
    let lower = text.to_ascii_lowercase();
    humantime::parse_duration(&lower).map_err(|e| match e {
        humantime::DurationError::UnknownUnit { unit, value, .. } if unit.is_empty() => {
            DurationError::MissingUnit {
                text: text.into(),
                number: value,
            }
        }
        humantime::DurationError::UnknownUnit { unit, .. } => DurationError::UnknownUnit {
            text: text.into(),
            unit,
        },
        humantime::DurationError::NumberOverflow => DurationError::TooLong { text: text.into() },
        // Empty cannot happen (checked above); a sign, a stray character or a unit without a
        // number all read the same to an operator.
        _ => DurationError::Malformed { text: text.into() },
    })
}

/// A duration the short way, in the same grammar: `45s`, `10m`, `2h5m`, `3d`, `12ms`.
///
/// Whole seconds are shown without their milliseconds, except below one second. What this
/// prints, [`parse_duration`] reads back.
pub fn format_duration(d: Duration) -> String {
    let secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let (days, hours, mins, s) = (
        secs / 86_400,
        secs % 86_400 / 3600,
        secs % 3600 / 60,
        secs % 60,
    );
    let mut out = String::new();
    for (value, unit) in [(days, "d"), (hours, "h"), (mins, "m"), (s, "s")] {
        if value > 0 {
            out.push_str(&format!("{value}{unit}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secs(s: u64) -> Result<Duration, DurationError> {
        Ok(Duration::from_secs(s))
    }

    #[test]
    fn parses_every_form_accepted_before() {
        // anchorctl's forms.
        assert_eq!(parse_duration("90"), secs(90));
        assert_eq!(parse_duration("30s"), secs(30));
        assert_eq!(parse_duration("10m"), secs(600));
        assert_eq!(parse_duration("2h"), secs(7200));
        assert_eq!(parse_duration("1d"), secs(86_400));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 1H30M "), secs(5400));
        // anchord's and anchor-node's forms.
        assert_eq!(parse_duration("7d"), secs(7 * 86_400));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("0"), secs(0));
        assert_eq!(parse_duration("5 m"), secs(300));
    }

    #[test]
    fn parses_sums_and_long_unit_names() {
        assert_eq!(parse_duration("1h30m"), secs(5400));
        assert_eq!(parse_duration("1h 30m"), secs(5400));
        assert_eq!(parse_duration("1d2h3m4s"), secs(86_400 + 7200 + 180 + 4));
        assert_eq!(parse_duration("2w"), secs(14 * 86_400));
        assert_eq!(parse_duration("30sec"), secs(30));
        assert_eq!(parse_duration("2hours"), secs(7200));
        assert_eq!(parse_duration("1s500ms"), Ok(Duration::from_millis(1500)));
    }

    #[test]
    fn refuses_garbage_with_a_useful_message() {
        for bad in [
            "",
            "  ",
            "abc",
            "10x",
            "m",
            "1.5h",
            "-5s",
            "10m5",
            "10 parsecs",
            "99999999999999999999",
        ] {
            let err = parse_duration(bad).unwrap_err().to_string();
            assert!(err.contains("duration"), "{bad:?}: {err}");
        }
        let err = parse_duration("10x").unwrap_err();
        assert!(err.to_string().contains("unknown unit \"x\""), "{err}");
        let err = parse_duration("10m5").unwrap_err();
        assert!(err.to_string().contains("5 needs a unit"), "{err}");
        let err = parse_duration("1.5h").unwrap_err();
        assert!(err.to_string().contains("1h30m"), "{err}");
        for too_long in [
            "999999999999999999d",
            "99999999999999999999",
            "99999999999999999999s",
        ] {
            let err = parse_duration(too_long).unwrap_err();
            assert!(err.to_string().contains("too long"), "{too_long:?}: {err}");
        }
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(7500)), "2h5m");
        assert_eq!(format_duration(Duration::from_secs(3 * 86_400)), "3d");
        assert_eq!(format_duration(Duration::from_millis(12)), "12ms");
    }

    #[test]
    fn what_is_formatted_parses_back() {
        for d in [
            Duration::from_millis(12),
            Duration::from_secs(1),
            Duration::from_secs(5400),
            Duration::from_secs(86_400 + 61),
            Duration::from_secs(30 * 86_400 + 7),
        ] {
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
    }
}
