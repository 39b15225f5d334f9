//! A strict parser of the Prometheus text exposition format (version 0.0.4) and of
//! OpenMetrics text, enough to check that `/metrics` is well formed and to read sample values.
//!
//! Ours rather than `prometheus-parse`: that crate skips lines it cannot parse instead of
//! failing on them (a test of well-formedness must fail), and brings regex, chrono and
//! itertools for what is two hundred lines here.

use std::collections::BTreeMap;

/// One sample: metric name, labels, value.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The metric name, with any `_bucket`/`_sum`/`_count` suffix.
    pub name: String,
    /// Its labels, unescaped.
    pub labels: BTreeMap<String, String>,
    /// Its value (`+Inf`, `-Inf` and `NaN` included).
    pub value: f64,
}

/// A parsed exposition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Exposition {
    /// `# TYPE` of each family.
    pub types: BTreeMap<String, String>,
    /// Every sample, in order.
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// The value of the sample `name` whose labels include every pair of `labels`.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|s| {
                s.name == name
                    && labels
                        .iter()
                        .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|s| s.value)
    }
}

fn valid_name(n: &str) -> bool {
    let mut chars = n.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_' || c == ':')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
}

fn parse_value(v: &str) -> Result<f64, String> {
    match v {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => v.parse::<f64>().map_err(|_| format!("bad value {v:?}")),
    }
}

/// Which exposition format [`parse_as`] holds the text to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Either: counters may be declared with or without their `_total`, `# EOF` is a comment.
    Any,
    /// Prometheus text 0.0.4: every sample is named exactly as its family (or a histogram's
    /// `_bucket`/`_sum`/`_count`), so counter families end in `_total`; no `# EOF`.
    Prometheus,
    /// OpenMetrics: counters are declared without `_total`, and the text ends with `# EOF`.
    OpenMetrics,
}

/// Parses `text` in either format, failing on the first malformed line.
pub fn parse(text: &str) -> Result<Exposition, String> {
    parse_as(text, Format::Any)
}

/// Parses `text` held to `format`, failing on the first malformed line.
pub fn parse_as(text: &str, format: Format) -> Result<Exposition, String> {
    let has_eof = text.lines().any(|l| l == "# EOF");
    match format {
        Format::Prometheus if has_eof => return Err("# EOF in Prometheus text".into()),
        Format::OpenMetrics if text.lines().last() != Some("# EOF") => {
            return Err("OpenMetrics text must end with # EOF".into());
        }
        _ => {}
    }
    let mut out = Exposition::default();
    for (n, line) in text.lines().enumerate() {
        let err = |m: String| format!("line {}: {m}: {line:?}", n + 1);
        if line.trim().is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# ") {
            let mut parts = rest.splitn(3, ' ');
            match (parts.next(), parts.next(), parts.next()) {
                (Some("TYPE"), Some(name), Some(kind)) => {
                    if !valid_name(name) {
                        return Err(err("bad metric name".into()));
                    }
                    let kinds: &[&str] = match format {
                        Format::OpenMetrics => &[
                            "counter",
                            "gauge",
                            "histogram",
                            "summary",
                            "unknown",
                            "info",
                            "stateset",
                            "gaugehistogram",
                        ],
                        _ => &["counter", "gauge", "histogram", "summary", "untyped"],
                    };
                    if !kinds.contains(&kind) {
                        return Err(err(format!("bad type {kind}")));
                    }
                    if out
                        .types
                        .insert(name.to_string(), kind.to_string())
                        .is_some()
                    {
                        return Err(err("TYPE given twice".into()));
                    }
                }
                (Some("HELP"), Some(name), _) if valid_name(name) => {}
                (Some("HELP" | "TYPE"), _, _) => return Err(err("malformed HELP/TYPE".into())),
                _ => {} // other comments are allowed
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let (name_end, rest) = match line.find(['{', ' ']) {
            Some(i) => (i, &line[i..]),
            None => return Err(err("no value".into())),
        };
        let name = &line[..name_end];
        if !valid_name(name) {
            return Err(err("bad metric name".into()));
        }
        let mut labels = BTreeMap::new();
        let rest = if let Some(body) = rest.strip_prefix('{') {
            let mut chars = body.char_indices().peekable();
            let mut end = None;
            loop {
                // label name
                let start = match chars.peek() {
                    Some((_, '}')) => {
                        end = chars.next().map(|(i, _)| i);
                        break;
                    }
                    Some((i, _)) => *i,
                    None => break,
                };
                let mut eq = None;
                for (i, c) in chars.by_ref() {
                    if c == '=' {
                        eq = Some(i);
                        break;
                    }
                }
                let eq = eq.ok_or_else(|| err("label without =".into()))?;
                let lname = &body[start..eq];
                if !valid_name(lname) || lname.contains(':') {
                    return Err(err(format!("bad label name {lname:?}")));
                }
                if chars.next().map(|(_, c)| c) != Some('"') {
                    return Err(err("label value must be quoted".into()));
                }
                let mut value = String::new();
                let mut closed = false;
                while let Some((_, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next().map(|(_, c)| c) {
                            Some('\\') => value.push('\\'),
                            Some('"') => value.push('"'),
                            Some('n') => value.push('\n'),
                            _ => return Err(err("bad escape".into())),
                        },
                        '"' => {
                            closed = true;
                            break;
                        }
                        '\n' => return Err(err("newline in label value".into())),
                        c => value.push(c),
                    }
                }
                if !closed {
                    return Err(err("unterminated label value".into()));
                }
                if labels.insert(lname.to_string(), value).is_some() {
                    return Err(err("duplicate label".into()));
                }
                match chars.peek() {
                    Some((_, ',')) => {
                        chars.next();
                    }
                    Some((_, '}')) => {}
                    _ => return Err(err("expected , or }".into())),
                }
            }
            let end = end.ok_or_else(|| err("unterminated labels".into()))?;
            &body[end + 1..]
        } else {
            rest
        };
        let mut fields = rest.split_whitespace();
        let value =
            parse_value(fields.next().ok_or_else(|| err("no value".into()))?).map_err(err)?;
        if let Some(ts) = fields.next() {
            ts.parse::<i64>().map_err(|_| err("bad timestamp".into()))?;
        }
        if fields.next().is_some() {
            return Err(err("trailing fields".into()));
        }
        out.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    // Every sample belongs to a declared family (histogram samples carry suffixes).
    for s in &out.samples {
        // Histogram samples carry suffixes; OpenMetrics counters are declared without the
        // `_total` their samples carry.
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|suf| s.name.strip_suffix(suf))
            .filter(|b| out.types.get(*b).is_some_and(|t| t == "histogram"))
            .or_else(|| {
                s.name
                    .strip_suffix("_total")
                    .filter(|_| format != Format::Prometheus)
                    .filter(|b| out.types.get(*b).is_some_and(|t| t == "counter"))
            })
            .unwrap_or(&s.name);
        if !out.types.contains_key(base) {
            return Err(format!("sample {} has no # TYPE", s.name));
        }
    }
    if format == Format::Prometheus
        && let Some((name, _)) = out
            .types
            .iter()
            .find(|(name, kind)| *kind == "counter" && !name.ends_with("_total"))
    {
        return Err(format!("counter {name} does not end in _total"));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_format_and_refuses_garbage() {
        let text = "# HELP a_total Things.\n# TYPE a_total counter\na_total{k=\"v\\\"q\",x=\"1\"} 3\n# TYPE h histogram\nh_bucket{le=\"+Inf\"} 2\nh_sum 1.5\nh_count 2\n";
        let e = parse(text).unwrap();
        assert_eq!(e.value("a_total", &[("k", "v\"q")]), Some(3.0));
        assert_eq!(e.value("h_count", &[]), Some(2.0));
        for bad in [
            "a 1",
            "# TYPE a counter\na{k=v} 1",
            "# TYPE a counter\na{k=\"v\" 1",
            "# TYPE a counter\na x",
            "# TYPE a wrong\na 1",
            "# TYPE 1a counter\n",
        ] {
            assert!(parse(bad).is_err(), "{bad:?} parsed");
        }
        let om = "# TYPE a counter\na_total 1\n# EOF\n";
        assert!(parse_as(om, Format::OpenMetrics).is_ok());
        assert!(parse_as(om, Format::Prometheus).is_err());
        assert!(parse_as("# TYPE a counter\na_total 1\n", Format::OpenMetrics).is_err());
        let prom = "# TYPE a_total counter\na_total 1\n";
        assert!(parse_as(prom, Format::Prometheus).is_ok());
        assert!(parse_as("# TYPE a counter\na 1\n", Format::Prometheus).is_err());
    }
}
