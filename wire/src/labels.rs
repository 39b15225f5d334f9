//! Device labels and label selectors, in Kubernetes' grammar.
//!
//! A label is `key=value`. A key is an optional DNS-subdomain prefix and a name
//! (`site`, `example.com/role`); keys under [`RESERVED_PREFIX`] hold facts the node reports
//! (`node.anchorage/os=linux`) and cannot be set by operators. A selector is a comma-separated
//! list of requirements that must all hold:
//!
//! ```text
//! site=lab            site==lab          equality
//! role!=camera                           inequality (also true without the label)
//! role in (camera,display)               set membership
//! role notin (camera)                    set exclusion (also true without the label)
//! decommissioned      !decommissioned    existence, absence
//! ```
//!
//! The empty selector matches everything. [`Selector`]'s `Display` is canonical and parses
//! back to an equal selector.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::str::FromStr;

/// Longest name part of a key, and longest value.
pub const MAX_NAME_LEN: usize = 63;
/// Longest prefix of a key (a DNS subdomain).
pub const MAX_PREFIX_LEN: usize = 253;
/// Prefix of the keys whose values the node reports; operators cannot set them.
pub const RESERVED_PREFIX: &str = "node.anchorage";
/// Most labels an operator may set on one device.
pub const MAX_LABELS: usize = 64;
/// Longest selector accepted, in bytes.
pub const MAX_SELECTOR_LEN: usize = 4096;

/// A label key or value that is not valid.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum LabelError {
    /// The key is not `[prefix/]name`.
    #[error(
        "label key {key:?}: {why} (a key is an optional DNS prefix and '/', then 1-63 characters: letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
    )]
    Key {
        /// The key as given.
        key: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The value is not valid.
    #[error(
        "label value {value:?} of {key:?}: {why} (a value is empty or 1-63 characters: letters, digits, '-', '_', '.', starting and ending with a letter or digit)"
    )]
    Value {
        /// The key.
        key: String,
        /// The value as given.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// The key is reserved for facts the node reports.
    #[error(
        "label key {0:?} is reserved: keys under {RESERVED_PREFIX}/ are set from what the node reports"
    )]
    Reserved(String),
    /// Too many labels.
    #[error("a device has at most {MAX_LABELS} labels")]
    TooMany,
    /// Text that is not `key=value` or `key-`.
    #[error("{0:?}: expected key=value (set) or key- (remove)")]
    Syntax(String),
}

fn name_ok(s: &str) -> Result<(), &'static str> {
    if s.is_empty() {
        return Err("empty name");
    }
    if s.len() > MAX_NAME_LEN {
        return Err("longer than 63 characters");
    }
    let bytes = s.as_bytes();
    if !bytes
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
    {
        return Err("a character other than letters, digits, '-', '_', '.'");
    }
    if !bytes[0].is_ascii_alphanumeric() || !bytes[bytes.len() - 1].is_ascii_alphanumeric() {
        return Err("must start and end with a letter or digit");
    }
    Ok(())
}

fn prefix_ok(p: &str) -> Result<(), &'static str> {
    if p.is_empty() || p.len() > MAX_PREFIX_LEN {
        return Err("the prefix must be 1-253 characters");
    }
    for part in p.split('.') {
        let b = part.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= 63
            && b.iter()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
            && b[0] != b'-'
            && b[b.len() - 1] != b'-';
        if !ok {
            return Err("the prefix must be a lower-case DNS subdomain");
        }
    }
    Ok(())
}

/// Checks a label key.
pub fn validate_key(key: &str) -> Result<(), LabelError> {
    let err = |why| LabelError::Key {
        key: key.to_string(),
        why,
    };
    match key.split_once('/') {
        Some((prefix, name)) => {
            prefix_ok(prefix).map_err(err)?;
            name_ok(name).map_err(err)
        }
        None => name_ok(key).map_err(err),
    }
}

/// Checks a label value (of `key`, for the message).
pub fn validate_value(key: &str, value: &str) -> Result<(), LabelError> {
    if value.is_empty() {
        return Ok(());
    }
    name_ok(value).map_err(|why| LabelError::Value {
        key: key.to_string(),
        value: value.to_string(),
        why,
    })
}

/// Whether `key` is one the node's reports set.
pub fn is_reserved(key: &str) -> bool {
    key.split_once('/')
        .is_some_and(|(prefix, _)| prefix == RESERVED_PREFIX || prefix.ends_with(".node.anchorage"))
}

/// Checks a label an operator sets: a valid key and value, not reserved.
pub fn validate_operator_label(key: &str, value: &str) -> Result<(), LabelError> {
    validate_key(key)?;
    validate_value(key, value)?;
    if is_reserved(key) {
        return Err(LabelError::Reserved(key.to_string()));
    }
    Ok(())
}

/// `text` made into a valid label value: characters outside the value alphabet become `_`,
/// at most [`MAX_NAME_LEN`] characters, trimmed to start and end with a letter or digit
/// (empty if nothing is left). For facts a node reports, which are free text.
pub fn fact_value(text: &str) -> String {
    let mapped: String = text
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .take(MAX_NAME_LEN)
        .collect();
    mapped
        .trim_matches(|c: char| !c.is_ascii_alphanumeric())
        .to_string()
}

/// One change an operator asks for: `key=value` sets, `key-` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LabelChange {
    /// Set `key` to `value`.
    Set(String, String),
    /// Remove `key`.
    Remove(String),
}

impl LabelChange {
    /// Applies the change to `labels`.
    pub fn apply(&self, labels: &mut BTreeMap<String, String>) {
        match self {
            LabelChange::Set(k, v) => {
                labels.insert(k.clone(), v.clone());
            }
            LabelChange::Remove(k) => {
                labels.remove(k);
            }
        }
    }
}

impl FromStr for LabelChange {
    type Err = LabelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some((key, value)) = s.split_once('=') {
            validate_operator_label(key, value)?;
            Ok(LabelChange::Set(key.to_string(), value.to_string()))
        } else if let Some(key) = s.strip_suffix('-') {
            validate_key(key)?;
            if is_reserved(key) {
                return Err(LabelError::Reserved(key.to_string()));
            }
            Ok(LabelChange::Remove(key.to_string()))
        } else {
            Err(LabelError::Syntax(s.to_string()))
        }
    }
}

/// Parses `key=value` (a label to set, as on `--label`).
pub fn parse_label(s: &str) -> Result<(String, String), LabelError> {
    match s.parse::<LabelChange>()? {
        LabelChange::Set(k, v) => Ok((k, v)),
        LabelChange::Remove(_) => Err(LabelError::Syntax(s.to_string())),
    }
}

/// One requirement of a selector.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Requirement {
    /// `key=value`.
    Eq(String, String),
    /// `key!=value`: true when the label is absent too.
    NotEq(String, String),
    /// `key in (a,b)`.
    In(String, BTreeSet<String>),
    /// `key notin (a,b)`: true when the label is absent too.
    NotIn(String, BTreeSet<String>),
    /// `key`: the label is present.
    Exists(String),
    /// `!key`: the label is absent.
    NotExists(String),
}

impl Requirement {
    /// The key it is about.
    pub fn key(&self) -> &str {
        match self {
            Requirement::Eq(k, _)
            | Requirement::NotEq(k, _)
            | Requirement::In(k, _)
            | Requirement::NotIn(k, _)
            | Requirement::Exists(k)
            | Requirement::NotExists(k) => k,
        }
    }

    /// Whether it holds for a device whose label `key` has `value` (`None`: no such label).
    pub fn holds(&self, value: Option<&str>) -> bool {
        match self {
            Requirement::Eq(_, v) => value == Some(v.as_str()),
            Requirement::NotEq(_, v) => value != Some(v.as_str()),
            Requirement::In(_, set) => value.is_some_and(|x| set.contains(x)),
            Requirement::NotIn(_, set) => !value.is_some_and(|x| set.contains(x)),
            Requirement::Exists(_) => value.is_some(),
            Requirement::NotExists(_) => value.is_none(),
        }
    }
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let set = |f: &mut fmt::Formatter<'_>, s: &BTreeSet<String>| {
            let items: Vec<&str> = s.iter().map(String::as_str).collect();
            write!(f, "({})", items.join(","))
        };
        match self {
            Requirement::Eq(k, v) => write!(f, "{k}={v}"),
            Requirement::NotEq(k, v) => write!(f, "{k}!={v}"),
            Requirement::In(k, s) => {
                write!(f, "{k} in ")?;
                set(f, s)
            }
            Requirement::NotIn(k, s) => {
                write!(f, "{k} notin ")?;
                set(f, s)
            }
            Requirement::Exists(k) => write!(f, "{k}"),
            Requirement::NotExists(k) => write!(f, "!{k}"),
        }
    }
}

/// A label selector: every requirement must hold. The empty selector matches everything.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

impl Selector {
    /// The selector that matches everything.
    pub fn everything() -> Selector {
        Selector::default()
    }

    /// Its requirements, in the order given.
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    /// Whether it matches nothing but everything (no requirements).
    pub fn is_empty(&self) -> bool {
        self.requirements.is_empty()
    }

    /// Whether a device with labels read through `label` matches.
    pub fn matches_with<'a>(&self, label: impl Fn(&str) -> Option<&'a str>) -> bool {
        self.requirements.iter().all(|r| r.holds(label(r.key())))
    }

    /// Whether a device with these labels matches.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.matches_with(|k| labels.get(k).map(String::as_str))
    }
}

impl fmt::Display for Selector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, r) in self.requirements.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

/// A selector that does not parse: where, and what was expected there.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("selector, at character {position}: expected {expected}, found {found}")]
pub struct SelectorError {
    /// 1-based character position of the problem.
    pub position: usize,
    /// What the grammar expected there.
    pub expected: String,
    /// What was there.
    pub found: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Token {
    Word(String),
    Eq,
    NotEq,
    Bang,
    Open,
    Close,
    Comma,
    End,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Token::Word(w) => format!("{w:?}"),
            Token::Eq => "'='".into(),
            Token::NotEq => "'!='".into(),
            Token::Bang => "'!'".into(),
            Token::Open => "'('".into(),
            Token::Close => "')'".into(),
            Token::Comma => "','".into(),
            Token::End => "the end".into(),
        }
    }
}

fn word_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-_./".contains(c)
}

/// Splits a selector into tokens with their 1-based positions.
fn tokenize(s: &str) -> Result<Vec<(usize, Token)>, SelectorError> {
    let chars: Vec<char> = s.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        let pos = i + 1;
        match c {
            c if c.is_whitespace() => i += 1,
            '=' => {
                i += if chars.get(i + 1) == Some(&'=') { 2 } else { 1 };
                out.push((pos, Token::Eq));
            }
            '!' if chars.get(i + 1) == Some(&'=') => {
                i += 2;
                out.push((pos, Token::NotEq));
            }
            '!' => {
                i += 1;
                out.push((pos, Token::Bang));
            }
            '(' => {
                i += 1;
                out.push((pos, Token::Open));
            }
            ')' => {
                i += 1;
                out.push((pos, Token::Close));
            }
            ',' => {
                i += 1;
                out.push((pos, Token::Comma));
            }
            c if word_char(c) => {
                let start = i;
                while i < chars.len() && word_char(chars[i]) {
                    i += 1;
                }
                out.push((pos, Token::Word(chars[start..i].iter().collect())));
            }
            other => {
                return Err(SelectorError {
                    position: pos,
                    expected: "a key, a value or one of = == != ! ( ) ,".into(),
                    found: format!("{other:?}"),
                });
            }
        }
    }
    out.push((chars.len() + 1, Token::End));
    Ok(out)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
}

impl Parser {
    fn peek(&self) -> &(usize, Token) {
        &self.tokens[self.at.min(self.tokens.len() - 1)]
    }

    fn next(&mut self) -> (usize, Token) {
        let t = self.peek().clone();
        self.at += 1;
        t
    }

    fn fail<T>(&self, expected: &str) -> Result<T, SelectorError> {
        let (position, token) = self.peek();
        Err(SelectorError {
            position: *position,
            expected: expected.to_string(),
            found: token.describe(),
        })
    }

    fn key(&mut self) -> Result<String, SelectorError> {
        let (position, token) = self.peek().clone();
        match token {
            Token::Word(w) => {
                validate_key(&w).map_err(|e| SelectorError {
                    position,
                    expected: "a label key".into(),
                    found: e.to_string(),
                })?;
                self.at += 1;
                Ok(w)
            }
            _ => self.fail("a label key"),
        }
    }

    /// A value; `None` when the next token cannot start one (an empty value).
    fn value(&mut self, key: &str) -> Result<Option<String>, SelectorError> {
        let (position, token) = self.peek().clone();
        match token {
            Token::Word(w) => {
                validate_value(key, &w).map_err(|e| SelectorError {
                    position,
                    expected: "a label value".into(),
                    found: e.to_string(),
                })?;
                self.at += 1;
                Ok(Some(w))
            }
            _ => Ok(None),
        }
    }

    fn set(&mut self, key: &str) -> Result<BTreeSet<String>, SelectorError> {
        if self.next().1 != Token::Open {
            self.at -= 1;
            return self.fail("'(' and a list of values");
        }
        let mut set = BTreeSet::new();
        loop {
            match self.value(key)? {
                Some(v) => {
                    set.insert(v);
                }
                None => return self.fail("a value"),
            }
            match self.next().1 {
                Token::Comma => continue,
                Token::Close => break,
                _ => {
                    self.at -= 1;
                    return self.fail("',' or ')'");
                }
            }
        }
        Ok(set)
    }

    fn requirement(&mut self) -> Result<Requirement, SelectorError> {
        if self.peek().1 == Token::Bang {
            self.at += 1;
            return Ok(Requirement::NotExists(self.key()?));
        }
        let key = self.key()?;
        match self.peek().1.clone() {
            Token::Eq => {
                self.at += 1;
                Ok(Requirement::Eq(
                    key.clone(),
                    self.value(&key)?.unwrap_or_default(),
                ))
            }
            Token::NotEq => {
                self.at += 1;
                Ok(Requirement::NotEq(
                    key.clone(),
                    self.value(&key)?.unwrap_or_default(),
                ))
            }
            Token::Word(w) if w == "in" => {
                self.at += 1;
                Ok(Requirement::In(key.clone(), self.set(&key)?))
            }
            Token::Word(w) if w == "notin" => {
                self.at += 1;
                Ok(Requirement::NotIn(key.clone(), self.set(&key)?))
            }
            Token::Comma | Token::End => Ok(Requirement::Exists(key)),
            _ => self.fail("one of = == != in notin , or the end"),
        }
    }
}

impl FromStr for Selector {
    type Err = SelectorError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() > MAX_SELECTOR_LEN {
            return Err(SelectorError {
                position: MAX_SELECTOR_LEN + 1,
                expected: format!("at most {MAX_SELECTOR_LEN} bytes"),
                found: format!("{} bytes", s.len()),
            });
        }
        let mut p = Parser {
            tokens: tokenize(s)?,
            at: 0,
        };
        let mut requirements = Vec::new();
        if p.peek().1 == Token::End {
            return Ok(Selector { requirements });
        }
        loop {
            requirements.push(p.requirement()?);
            match p.next().1 {
                Token::Comma => continue,
                Token::End => break,
                _ => {
                    p.at -= 1;
                    return p.fail("',' or the end");
                }
            }
        }
        Ok(Selector { requirements })
    }
}

impl serde::Serialize for Selector {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Selector {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn keys_and_values_are_checked_like_kubernetes() {
        for ok in [
            "site",
            "a",
            "example.com/role",
            "node.anchorage/os",
            "a-b_c.d",
            "A1",
        ] {
            validate_key(ok).unwrap();
        }
        for bad in [
            "",
            "-site",
            "site-",
            "a b",
            "Example.com/x",
            "/x",
            "x/",
            "a/b/c",
            "é",
        ] {
            assert!(validate_key(bad).is_err(), "{bad:?}");
        }
        assert!(validate_key(&"k".repeat(64)).is_err());
        validate_value("k", "").unwrap();
        validate_value("k", "lab-1").unwrap();
        assert!(validate_value("k", "lab 1").is_err());
        assert!(validate_value("k", &"v".repeat(64)).is_err());
        let err = validate_operator_label("node.anchorage/os", "linux").unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn reported_facts_become_valid_values() {
        assert_eq!(fact_value("linux-x86_64"), "linux-x86_64");
        assert_eq!(fact_value(" Debian 12 (bookworm) "), "Debian_12__bookworm");
        assert_eq!(fact_value("---"), "");
        let long = fact_value(&"x".repeat(100));
        assert_eq!(long.len(), MAX_NAME_LEN);
        for s in ["é", "a/b", "\u{202e}evil", ""] {
            validate_value("k", &fact_value(s)).unwrap();
        }
    }

    #[test]
    fn changes_are_key_value_or_key_dash() {
        assert_eq!(
            "site=lab".parse::<LabelChange>().unwrap(),
            LabelChange::Set("site".into(), "lab".into())
        );
        assert_eq!(
            "site-".parse::<LabelChange>().unwrap(),
            LabelChange::Remove("site".into())
        );
        assert!("site".parse::<LabelChange>().is_err());
        assert!("node.anchorage/os-".parse::<LabelChange>().is_err());
        assert!(parse_label("site-").is_err());
    }

    #[test]
    fn selectors_match_as_kubernetes_does() {
        let cam = labels(&[("site", "lab"), ("role", "camera")]);
        let bare = labels(&[]);
        let cases = [
            ("", true, true),
            ("site=lab", true, false),
            ("site==lab", true, false),
            ("role!=camera", false, true),
            ("role in (camera,display)", true, false),
            ("role notin (camera)", false, true),
            ("site", true, false),
            ("!decommissioned", true, true),
            ("site=lab,role!=display", true, false),
            ("site=lab, !role", false, false),
        ];
        for (sel, on_cam, on_bare) in cases {
            let s: Selector = sel.parse().unwrap();
            assert_eq!(s.matches(&cam), on_cam, "{sel:?} on the camera");
            assert_eq!(s.matches(&bare), on_bare, "{sel:?} on a bare device");
        }
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let e = "site=lab,".parse::<Selector>().unwrap_err();
        assert_eq!((e.position, e.expected.as_str()), (10, "a label key"));
        let e = "role in camera".parse::<Selector>().unwrap_err();
        assert_eq!(e.position, 9);
        assert!(e.expected.contains('('), "{e}");
        let e = "role in (a,".parse::<Selector>().unwrap_err();
        assert_eq!(e.expected, "a value");
        let e = "site=lab role=x".parse::<Selector>().unwrap_err();
        assert_eq!(e.position, 10);
        assert_eq!(
            e.to_string(),
            "selector, at character 10: expected ',' or the end, found \"role\""
        );
        let e = "site=l@b".parse::<Selector>().unwrap_err();
        assert_eq!(e.position, 7);
        let e = "-bad=x".parse::<Selector>().unwrap_err();
        assert_eq!(e.position, 1);
        assert!(e.found.contains("start and end"), "{e}");
    }

    fn name() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9]([a-zA-Z0-9._-]{0,10}[a-zA-Z0-9])?"
    }

    fn key() -> impl Strategy<Value = String> {
        (
            proptest::option::of("[a-z0-9]{1,5}(\\.[a-z0-9]{1,5}){0,2}"),
            name(),
        )
            .prop_map(|(prefix, name)| match prefix {
                Some(p) => format!("{p}/{name}"),
                None => name,
            })
            .prop_filter("not a keyword", |k| k != "in" && k != "notin")
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), name()]
    }

    fn values() -> impl Strategy<Value = BTreeSet<String>> {
        proptest::collection::btree_set(name(), 1..4)
    }

    fn requirement() -> impl Strategy<Value = Requirement> {
        prop_oneof![
            (key(), value()).prop_map(|(k, v)| Requirement::Eq(k, v)),
            (key(), value()).prop_map(|(k, v)| Requirement::NotEq(k, v)),
            (key(), values()).prop_map(|(k, s)| Requirement::In(k, s)),
            (key(), values()).prop_map(|(k, s)| Requirement::NotIn(k, s)),
            key().prop_map(Requirement::Exists),
            key().prop_map(Requirement::NotExists),
        ]
    }

    proptest! {
        #[test]
        fn display_parses_back_to_the_same_selector(
            reqs in proptest::collection::vec(requirement(), 0..6)
        ) {
            let s = Selector { requirements: reqs };
            let text = s.to_string();
            let back: Selector = text.parse().map_err(|e| TestCaseError::fail(format!("{text:?}: {e}")))?;
            prop_assert_eq!(back, s);
        }

        #[test]
        fn any_text_parses_or_fails_without_panicking(text in ".{0,64}") {
            let _ = text.parse::<Selector>();
            let _ = text.parse::<LabelChange>();
        }
    }
}
