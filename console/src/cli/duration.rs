//! Durations as operators type them: `90` (seconds), `30s`, `10m`, `2h`, `1d`, `500ms`, and
//! sums like `1h30m`.

use std::time::Duration;

/// Parses a duration: a bare number of seconds, or one or more `<number><unit>` parts with
/// units `ms`, `s`, `m`, `h`, `d` (case-insensitive).
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    if text.is_empty() {
        return Err("empty duration; expected e.g. 30s, 10m, 2h, 1d or 90".into());
    }
    if text.bytes().all(|b| b.is_ascii_digit()) {
        let secs = parse_number(text, text)?;
        return Ok(Duration::from_secs(secs));
    }
    let lower = text.to_ascii_lowercase();
    let mut rest = lower.as_str();
    let mut total = Duration::ZERO;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(format!(
                "invalid duration {text:?}; expected e.g. 30s, 10m, 2h, 1d or 90"
            ));
        }
        let number = parse_number(&rest[..digits], text)?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Some(Duration::from_millis(number)),
            "s" => Some(Duration::from_secs(number)),
            "m" => number.checked_mul(60).map(Duration::from_secs),
            "h" => number.checked_mul(3600).map(Duration::from_secs),
            "d" => number.checked_mul(86_400).map(Duration::from_secs),
            "" => {
                return Err(format!(
                    "invalid duration {text:?}: {number} needs a unit (ms, s, m, h, d)"
                ));
            }
            other => {
                return Err(format!(
                    "invalid duration {text:?}: unknown unit {other:?} (use ms, s, m, h, d)"
                ));
            }
        };
        total = part
            .and_then(|p| total.checked_add(p))
            .ok_or_else(|| format!("duration {text:?} is too long"))?;
    }
    Ok(total)
}

/// A duration the short way: `45s`, `10m`, `2h5m`, `3d`.
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

fn parse_number(digits: &str, whole: &str) -> Result<u64, String> {
    digits
        .parse::<u64>()
        .map_err(|_| format!("duration {whole:?} is too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_forms() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("2h"), Ok(Duration::from_secs(7200)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration(" 1H30M "), Ok(Duration::from_secs(5400)));
    }

    #[test]
    fn refuses_garbage_with_a_useful_message() {
        for bad in [
            "",
            "abc",
            "10x",
            "m",
            "1.5h",
            "-5s",
            "10m5",
            "99999999999999999999",
        ] {
            let err = parse_duration(bad).unwrap_err();
            assert!(err.contains("duration"), "{bad:?}: {err}");
        }
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        assert!(
            parse_duration("999999999999999999d")
                .unwrap_err()
                .contains("too long")
        );
    }

    #[test]
    fn formats_compactly() {
        assert_eq!(format_duration(Duration::from_secs(45)), "45s");
        assert_eq!(format_duration(Duration::from_secs(600)), "10m");
        assert_eq!(format_duration(Duration::from_secs(7500)), "2h5m");
        assert_eq!(format_duration(Duration::from_secs(3 * 86_400)), "3d");
        assert_eq!(format_duration(Duration::from_millis(12)), "12ms");
    }
}
