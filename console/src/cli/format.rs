//! Text for people: aligned tables, key/value blocks, times absolute and relative, and the
//! colours of state words (on a terminal only, never with `NO_COLOR`: see [`color_enabled`]).

use std::time::Duration;

use anchorage_wire::duration::format_duration;
use time::{OffsetDateTime, UtcOffset};

/// A table of aligned columns: two spaces between columns, no borders, no trailing spaces.
///
/// Laid out by comfy-table, which measures cells by their display width.
#[derive(Debug, Clone)]
pub struct Table {
    inner: comfy_table::Table,
    columns: usize,
    /// The style of each styled cell: (row, column, style), applied after layout so that
    /// escape sequences do not count as width.
    styles: Vec<(usize, usize, anstyle::Style)>,
}

impl Table {
    /// A table with these column headers.
    pub fn new(headers: &[&str]) -> Self {
        let mut inner = comfy_table::Table::new();
        inner
            .load_style(comfy_table::presets::NOTHING)
            .set_header(headers.to_vec());
        for column in inner.column_iter_mut() {
            // The gap after every column; the last one's is trimmed with the line's end.
            column.set_padding((0, 2));
        }
        Table {
            inner,
            columns: headers.len(),
            styles: Vec::new(),
        }
    }

    /// Styles cell `column` of the last row added (nothing without a row). The style shows
    /// only where the output is coloured: see [`color_enabled`].
    pub fn style_last(&mut self, column: usize, style: anstyle::Style) {
        if let Some(row) = self.inner.row_count().checked_sub(1) {
            self.styles.push((row, column, style));
        }
    }

    /// Appends a row; missing cells are blank, extra cells are dropped.
    pub fn row(&mut self, cells: Vec<String>) {
        let mut cells = cells;
        cells.resize(self.columns, String::new());
        self.inner.add_row(cells);
    }

    /// Whether the table has no rows.
    pub fn is_empty(&self) -> bool {
        self.inner.row_count() == 0
    }

    /// The table as lines, each ending in `\n`.
    pub fn render(&self) -> String {
        let mut out = self.inner.trim_fmt();
        if !self.styles.is_empty() {
            out = self.apply_styles(&out);
        }
        out.push('\n');
        out
    }

    /// Wraps styled cells of the laid-out `text` in their escape sequences. A column starts
    /// at the same character offset on every line: after the widths of those before it.
    fn apply_styles(&self, text: &str) -> String {
        let widths: Vec<usize> = self
            .inner
            .column_max_content_widths()
            .iter()
            .map(|w| usize::from(*w) + 2)
            .collect();
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        // Right to left within a line, so earlier offsets stay valid.
        let mut styles = self.styles.clone();
        styles.sort_by(|a, b| (a.0, b.1).cmp(&(b.0, a.1)));
        for (row, column, style) in styles {
            let (Some(line), Some(cell)) = (
                lines.get_mut(row + 1),
                self.inner
                    .row(row)
                    .and_then(|r| r.cell_iter().nth(column))
                    .map(|c| c.content()),
            ) else {
                continue;
            };
            let start: usize = widths.iter().take(column).sum();
            let chars: Vec<char> = line.chars().collect();
            let end = start + cell.chars().count();
            if cell.is_empty() || end > chars.len() {
                continue;
            }
            let found: String = chars[start..end].iter().collect();
            if found != cell {
                continue;
            }
            let before: String = chars[..start].iter().collect();
            let after: String = chars[end..].iter().collect();
            *line = format!("{before}{style}{cell}{style:#}{after}");
        }
        lines.join("\n")
    }
}

/// Key/value lines with the values aligned.
pub fn key_values(pairs: &[(&str, String)]) -> String {
    let w = pairs.iter().map(|(k, _)| width(k)).max().unwrap_or(0);
    let mut out = String::new();
    for (k, v) in pairs {
        let line = format!("{k}:{}  {v}", " ".repeat(w - width(k)));
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Display width, counted in characters (good enough for ids, names and states).
fn width(s: &str) -> usize {
    s.chars().count()
}

/// `in 9m`, `3s ago`, `now`.
pub fn relative(t: OffsetDateTime, now: OffsetDateTime) -> String {
    let diff = t - now;
    let secs = diff.whole_seconds();
    if secs == 0 {
        return "now".into();
    }
    let abs = Duration::from_secs(secs.unsigned_abs());
    let text = coarse(abs);
    if secs > 0 {
        format!("in {text}")
    } else {
        format!("{text} ago")
    }
}

/// The largest whole unit: `45s`, `9m`, `3h`, `12d`.
fn coarse(d: Duration) -> String {
    let s = d.as_secs();
    if s < 60 {
        format!("{s}s")
    } else if s < 3600 {
        format!("{}m", s / 60)
    } else if s < 2 * 86_400 {
        format!("{}h", s / 3600)
    } else {
        format!("{}d", s / 86_400)
    }
}

/// `2025-01-02 03:04:05Z`.
pub fn absolute(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!(
        "{:04}-{:02}-{:02} {:02}:{:02}:{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `03:04:05` (UTC).
pub fn clock(t: OffsetDateTime) -> String {
    let t = t.to_offset(UtcOffset::UTC);
    format!("{:02}:{:02}:{:02}", t.hour(), t.minute(), t.second())
}

/// Relative time or `-`.
pub fn rel_opt(t: Option<OffsetDateTime>, now: OffsetDateTime) -> String {
    t.map_or_else(|| "-".into(), |t| relative(t, now))
}

/// `2025-01-02 03:04:05Z (in 9m)` or `-`.
pub fn both_opt(t: Option<OffsetDateTime>, now: OffsetDateTime) -> String {
    t.map_or_else(
        || "-".into(),
        |t| format!("{} ({})", absolute(t), relative(t, now)),
    )
}

/// Milliseconds as an age: `850ms`, `12s`, `5m`, or `-`.
pub fn age_ms(ms: Option<u64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1000 => format!("{ms}ms"),
        Some(ms) => coarse(Duration::from_millis(ms)),
    }
}

/// A duration in milliseconds as `12ms`, `3s`, `2m5s`, or `-`.
pub fn duration_ms(ms: Option<u64>) -> String {
    ms.map_or_else(
        || "-".into(),
        |ms| format_duration(Duration::from_millis(ms)),
    )
}

/// A rate 0..1 as a percentage, or `-`.
pub fn percent(rate: Option<f64>) -> String {
    rate.map_or_else(|| "-".into(), |r| format!("{:.1}%", r * 100.0))
}

/// Milliseconds with one decimal, or `-`.
pub fn millis(ms: Option<f64>) -> String {
    ms.map_or_else(|| "-".into(), |ms| format!("{ms:.1}ms"))
}

/// The value or `-`.
pub fn or_dash(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => "-".into(),
    }
}

/// A comma-separated list, or `-`.
pub fn list(items: &[String]) -> String {
    if items.is_empty() {
        "-".into()
    } else {
        items.join(",")
    }
}

/// At most `max` characters, with `…` when cut.
pub fn truncate(s: &str, max: usize) -> String {
    if s.chars().count() <= max {
        s.to_string()
    } else {
        let mut out: String = s.chars().take(max.saturating_sub(1)).collect();
        out.push('…');
        out
    }
}

/// When `anchorctl` colours its output (`--color`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum ColorChoice {
    /// On a terminal, unless `NO_COLOR` is set to anything non-empty.
    #[default]
    Auto,
    /// Always (the flag beats `NO_COLOR`, as no-color.org asks of explicit flags).
    Always,
    /// Never.
    Never,
}

/// Whether to colour: `--color always|never` decide; `auto` colours only a terminal
/// (`terminal`), and never when `NO_COLOR` (`no_color`, its value) is set and non-empty
/// (https://no-color.org) or `TERM` is `dumb`.
pub fn color_enabled(
    choice: ColorChoice,
    no_color: Option<&str>,
    term: Option<&str>,
    terminal: bool,
) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => terminal && no_color.is_none_or(str::is_empty) && term != Some("dumb"),
    }
}

/// The colour of a presence word: online green, degraded and stale yellow, offline red.
pub fn presence_style(presence: crate::api::Presence) -> anstyle::Style {
    use crate::api::Presence;
    use anstyle::AnsiColor;
    let color = match presence {
        Presence::Online => Some(AnsiColor::Green),
        Presence::Degraded | Presence::Stale => Some(AnsiColor::Yellow),
        Presence::Offline => Some(AnsiColor::Red),
        _ => None,
    };
    anstyle::Style::new().fg_color(color.map(anstyle::Color::Ansi))
}

/// Milliseconds for people: `0.042ms`, `1.42ms`, `12.3ms`, `1234ms` (three significant
/// digits below 100, whole above), or `-`.
pub fn precise_ms(ms: Option<f64>) -> String {
    match ms {
        None => "-".into(),
        Some(ms) if ms < 1.0 => format!("{ms:.3}ms"),
        Some(ms) if ms < 10.0 => format!("{ms:.2}ms"),
        Some(ms) if ms < 100.0 => format!("{ms:.1}ms"),
        Some(ms) => format!("{ms:.0}ms"),
    }
}

/// The serde name of a unit enum value (`pending_approval`, `trusted`).
pub fn name<T: serde::Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        Ok(other) => other.to_string(),
        Err(_) => "?".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_without_trailing_spaces() {
        let mut t = Table::new(&["ID", "NAME", "STATE"]);
        t.row(vec!["a".into(), "kitchen-pi".into(), "online".into()]);
        t.row(vec!["bbbbbb".into(), "x".into(), "-".into()]);
        t.row(vec!["c".into()]);
        assert_eq!(
            t.render(),
            "ID      NAME        STATE\n\
             a       kitchen-pi  online\n\
             bbbbbb  x           -\n\
             c\n"
        );
    }

    #[test]
    fn table_counts_characters_not_bytes() {
        let mut t = Table::new(&["A", "B"]);
        t.row(vec!["é…".into(), "x".into()]);
        assert_eq!(t.render(), "A   B\né…  x\n");
    }

    #[test]
    fn styled_cells_keep_the_columns_aligned() {
        let green = presence_style(crate::api::Presence::Online);
        let mut t = Table::new(&["ID", "PRESENCE", "NAME"]);
        t.row(vec!["a".into(), "online".into(), "x".into()]);
        t.style_last(1, green);
        t.row(vec!["bbbbbbbb".into(), "offline".into(), "y".into()]);
        t.style_last(1, presence_style(crate::api::Presence::Offline));
        t.style_last(0, green);
        let text = t.render();
        assert!(
            text.contains(&format!("a         {green}online{green:#}    x")),
            "{text:?}"
        );
        assert!(text.contains("\u{1b}[31moffline"), "{text:?}");
        // Without the escapes it is the plain table.
        let plain = anstream::adapter::strip_str(&text).to_string();
        let mut p = Table::new(&["ID", "PRESENCE", "NAME"]);
        p.row(vec!["a".into(), "online".into(), "x".into()]);
        p.row(vec!["bbbbbbbb".into(), "offline".into(), "y".into()]);
        assert_eq!(plain, p.render());
    }

    #[test]
    fn colour_only_on_a_terminal_and_never_with_no_color() {
        use ColorChoice::*;
        assert!(color_enabled(Auto, None, Some("xterm"), true));
        assert!(!color_enabled(Auto, None, Some("xterm"), false), "piped");
        assert!(
            !color_enabled(Auto, Some("1"), Some("xterm"), true),
            "NO_COLOR"
        );
        assert!(
            color_enabled(Auto, Some(""), None, true),
            "empty NO_COLOR is unset"
        );
        assert!(!color_enabled(Auto, None, Some("dumb"), true));
        assert!(color_enabled(Always, Some("1"), None, false));
        assert!(!color_enabled(Never, None, None, true));
    }

    #[test]
    fn milliseconds_read_without_float_noise() {
        assert_eq!(precise_ms(Some(1.423_233_000_000_000_2)), "1.42ms");
        assert_eq!(precise_ms(Some(0.0421)), "0.042ms");
        assert_eq!(precise_ms(Some(12.345)), "12.3ms");
        assert_eq!(precise_ms(Some(1234.4)), "1234ms");
        assert_eq!(precise_ms(None), "-");
        assert_eq!(crate::api::round_ms(1.423_233_000_000_000_2), 1.423);
    }

    #[test]
    fn key_values_align() {
        assert_eq!(
            key_values(&[("id", "1".into()), ("name", "n".into()), ("x", "".into())]),
            "id:    1\nname:  n\nx:\n"
        );
    }

    #[test]
    fn relative_times_read_naturally() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1000);
        let r = |secs: i64| relative(now + time::Duration::seconds(secs), now);
        assert_eq!(r(0), "now");
        assert_eq!(r(-3), "3s ago");
        assert_eq!(r(9 * 60 + 59), "in 9m");
        assert_eq!(r(-2 * 3600), "2h ago");
        assert_eq!(r(3 * 86_400), "in 3d");
        assert_eq!(r(30 * 3600), "in 30h");
    }

    #[test]
    fn small_formatters() {
        let t = OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(3_723);
        assert_eq!(absolute(t), "1970-01-01 01:02:03Z");
        assert_eq!(clock(t), "01:02:03");
        assert_eq!(age_ms(Some(850)), "850ms");
        assert_eq!(age_ms(Some(125_000)), "2m");
        assert_eq!(percent(Some(0.125)), "12.5%");
        assert_eq!(millis(None), "-");
        assert_eq!(truncate("abcdef", 4), "abc…");
        assert_eq!(truncate("abc", 4), "abc");
        assert_eq!(
            name(&crate::api::RequestState::PendingApproval),
            "pending_approval"
        );
    }
}
