//! The mesh policy: which node may reach which peer, for what.
//!
//! A policy is a TOML file with an array of `[[allow]]` rules. Each names who may call
//! (`from`, a selector), whom (`to`, a selector), and what: capability patterns and service
//! patterns (`*` matches any run of characters). Nothing is allowed that no rule allows, and an
//! empty policy (the default) lets no node reach any peer.
//!
//! ```toml
//! [[allow]]
//! name = "displays watch cameras"  # optional, shown by `policy test`
//! from = "role=display"
//! to = "role=camera"
//! capabilities = ["camera.*", "system.health"]
//! services = ["rtsp"]
//! ```
//!
//! Errors point at the line (and column) of the offending value, so an operator can fix the
//! file without guessing.

use std::ops::Range;
use std::sync::Arc;

use anchorage_wire::labels::Selector;
use anchorage_wire::peer::{Grant, MAX_GRANT_PATTERNS, valid_service_name, wildcard_match};
use serde::Deserialize;

use crate::records::Labels;

/// Largest policy file accepted, bytes.
pub const MAX_POLICY_LEN: usize = 256 * 1024;
/// Most rules in one policy.
pub const MAX_RULES: usize = 1024;

/// The policy in force, with where it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyVersion {
    /// Starts at 0 (the empty default) and grows by one with every change.
    pub version: u64,
    /// The file as the operator wrote it.
    pub text: String,
    /// The parsed rules.
    pub policy: Policy,
    /// Unix milliseconds of the change (0 for the default).
    pub updated_ms: u64,
    /// Who made it (audit actor), empty for the default.
    pub updated_by: String,
}

impl PolicyVersion {
    /// The default: version 0, no rules, nobody reaches anybody.
    pub fn default_empty() -> PolicyVersion {
        PolicyVersion {
            version: 0,
            text: String::new(),
            policy: Policy::empty(),
            updated_ms: 0,
            updated_by: String::new(),
        }
    }
}

/// The one place the policy in force lives in an anchor: whoever changes it (the console, a
/// change from another anchor, the store at start-up) replaces it here; whoever uses it (the
/// mesh's directories and relay) reads or subscribes.
#[derive(Debug)]
pub struct PolicyFeed(tokio::sync::watch::Sender<Arc<PolicyVersion>>);

impl PolicyFeed {
    /// A feed holding `initial`.
    pub fn new(initial: PolicyVersion) -> PolicyFeed {
        PolicyFeed(tokio::sync::watch::Sender::new(Arc::new(initial)))
    }

    /// The policy in force.
    pub fn current(&self) -> Arc<PolicyVersion> {
        self.0.borrow().clone()
    }

    /// Hears every replacement.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Arc<PolicyVersion>> {
        self.0.subscribe()
    }

    /// Puts `next` in force, unless what is in force is already as new (a change that
    /// arrives twice, or late, changes nothing). Returns whether it replaced.
    pub fn replace(&self, next: PolicyVersion) -> bool {
        self.0.send_if_modified(|current| {
            if next.version > current.version {
                *current = Arc::new(next);
                true
            } else {
                false
            }
        })
    }
}

/// A parsed, valid policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Policy {
    rules: Vec<Rule>,
}

/// One `[[allow]]` rule.
#[derive(Debug, Clone, PartialEq)]
pub struct Rule {
    /// Its optional name.
    pub name: Option<String>,
    /// The line of its `[[allow]]` header (1-based).
    pub line: usize,
    /// Who may call.
    pub from: Selector,
    /// Whom.
    pub to: Selector,
    /// Capability patterns.
    pub capabilities: Vec<String>,
    /// Service patterns.
    pub services: Vec<String>,
}

/// Something wrong in a policy file, where it is.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("line {line}, column {column}: {message}")]
pub struct PolicyError {
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// What is wrong.
    pub message: String,
}

/// What a caller wants to do on a peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action<'a> {
    /// Invoke a capability.
    Capability(&'a str),
    /// Open a tunnel to an exposed service.
    Service(&'a str),
}

/// The answer of [`Policy::decide`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    /// Whether it is allowed.
    pub allowed: bool,
    /// The index of the allowing rule (0-based), if one allows it.
    pub rule: Option<usize>,
    /// That rule's line.
    pub line: Option<usize>,
    /// That rule's name.
    pub name: Option<String>,
    /// One sentence for the operator.
    pub reason: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    allow: Vec<toml::Spanned<RawRule>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    name: Option<String>,
    from: toml::Spanned<String>,
    to: toml::Spanned<String>,
    #[serde(default)]
    capabilities: Vec<toml::Spanned<String>>,
    #[serde(default)]
    services: Vec<toml::Spanned<String>>,
}

impl Policy {
    /// The empty policy: nothing allowed.
    pub fn empty() -> Policy {
        Policy::default()
    }

    /// Parses and checks a policy file. Every problem found is returned, each with its line.
    pub fn parse(text: &str) -> Result<Policy, Vec<PolicyError>> {
        if text.len() > MAX_POLICY_LEN {
            return Err(vec![PolicyError {
                line: 1,
                column: 1,
                message: format!(
                    "the policy is {} bytes; the limit is {MAX_POLICY_LEN}",
                    text.len()
                ),
            }]);
        }
        let file: File = toml::from_str(text).map_err(|e| {
            let span = e.span().unwrap_or(0..0);
            vec![at(text, span, e.message().to_string())]
        })?;
        let mut errors = Vec::new();
        if file.allow.len() > MAX_RULES {
            errors.push(PolicyError {
                line: 1,
                column: 1,
                message: format!(
                    "{} rules; a policy has at most {MAX_RULES}",
                    file.allow.len()
                ),
            });
        }
        let mut rules = Vec::new();
        for raw in &file.allow {
            let header = raw.span();
            let raw = raw.get_ref();
            let selector = |s: &toml::Spanned<String>, errors: &mut Vec<PolicyError>| match s
                .get_ref()
                .parse::<Selector>()
            {
                Ok(sel) => Some(sel),
                Err(e) => {
                    errors.push(at(text, s.span(), format!("bad selector: {e}")));
                    None
                }
            };
            let from = selector(&raw.from, &mut errors);
            let to = selector(&raw.to, &mut errors);
            let mut patterns = |list: &[toml::Spanned<String>], what: &str| -> Vec<String> {
                if list.len() > MAX_GRANT_PATTERNS {
                    errors.push(at(
                        text,
                        list[MAX_GRANT_PATTERNS].span(),
                        format!("at most {MAX_GRANT_PATTERNS} {what} patterns in one rule"),
                    ));
                }
                let mut out = Vec::new();
                for p in list.iter().take(MAX_GRANT_PATTERNS) {
                    if let Err(message) = check_pattern(p.get_ref(), what) {
                        errors.push(at(text, p.span(), message));
                    } else {
                        out.push(p.get_ref().clone());
                    }
                }
                out
            };
            let capabilities = patterns(&raw.capabilities, "capability");
            let services = patterns(&raw.services, "service");
            if raw.capabilities.is_empty() && raw.services.is_empty() {
                errors.push(at(
                    text,
                    header.clone(),
                    "the rule allows nothing: give `capabilities`, `services` or both".into(),
                ));
            }
            if let (Some(from), Some(to)) = (from, to) {
                rules.push(Rule {
                    name: raw.name.clone(),
                    line: line_col(text, header.start).0,
                    from,
                    to,
                    capabilities,
                    services,
                });
            }
        }
        if errors.is_empty() {
            Ok(Policy { rules })
        } else {
            Err(errors)
        }
    }

    /// The rules, in file order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// Whether no rule exists (nobody reaches anybody).
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Everything a device labelled `from` may do to one labelled `to`: the union of the
    /// matching rules' patterns.
    pub fn grant(&self, from: &Labels, to: &Labels) -> Grant {
        let mut grant = Grant::default();
        for rule in &self.rules {
            if rule.from.matches(from) && rule.to.matches(to) {
                for c in &rule.capabilities {
                    if !grant.capabilities.contains(c) {
                        grant.capabilities.push(c.clone());
                    }
                }
                for s in &rule.services {
                    if !grant.services.contains(s) {
                        grant.services.push(s.clone());
                    }
                }
            }
        }
        // A node's list is bounded on the wire; the first patterns win (rules earlier in the
        // file first), which can only allow less, never more.
        grant.capabilities.truncate(MAX_GRANT_PATTERNS);
        grant.services.truncate(MAX_GRANT_PATTERNS);
        grant
    }

    /// Whether a device labelled `from` may do `action` on one labelled `to`, and which rule
    /// says so.
    pub fn decide(&self, from: &Labels, to: &Labels, action: Action<'_>) -> Decision {
        for (i, rule) in self.rules.iter().enumerate() {
            if !(rule.from.matches(from) && rule.to.matches(to)) {
                continue;
            }
            let hit = match action {
                Action::Capability(c) => rule.capabilities.iter().any(|p| wildcard_match(p, c)),
                Action::Service(s) => rule.services.iter().any(|p| wildcard_match(p, s)),
            };
            if hit {
                let label = match &rule.name {
                    Some(n) => format!("rule {} ({n:?}, line {})", i + 1, rule.line),
                    None => format!("rule {} (line {})", i + 1, rule.line),
                };
                return Decision {
                    allowed: true,
                    rule: Some(i),
                    line: Some(rule.line),
                    name: rule.name.clone(),
                    reason: format!("allowed by {label}"),
                };
            }
        }
        let what = match action {
            Action::Capability(c) => format!("capability {c:?}"),
            Action::Service(s) => format!("service {s:?}"),
        };
        Decision {
            allowed: false,
            rule: None,
            line: None,
            name: None,
            reason: format!("refused: no rule allows {what} from this device to that one"),
        }
    }
}

fn check_pattern(p: &str, what: &str) -> Result<(), String> {
    let body_ok = |c: char| c.is_ascii_alphanumeric() || "._-/:".contains(c);
    let ok = !p.is_empty()
        && p.len() <= anchorage_wire::limits::MAX_NAME_LEN
        && p.chars().all(|c| c == '*' || body_ok(c));
    if !ok {
        return Err(format!(
            "{what} pattern {p:?} must be 1-128 characters of letters, digits, . _ - / : and * \
             (any run of characters)"
        ));
    }
    if what == "service" && !p.contains('*') && !valid_service_name(p) {
        return Err(format!(
            "service {p:?} is not a service name (lowercase letters, digits, - _ .)"
        ));
    }
    Ok(())
}

fn at(text: &str, span: Range<usize>, message: String) -> PolicyError {
    let (line, column) = line_col(text, span.start);
    PolicyError {
        line,
        column,
        message,
    }
}

/// 1-based line and column of byte `offset`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = &text.as_bytes()[..offset];
    let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
    let start = before
        .iter()
        .rposition(|&b| b == b'\n')
        .map_or(0, |p| p + 1);
    let column = text
        .get(start..offset)
        .map_or(offset - start, |s| s.chars().count())
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    const FILE: &str = r#"
[[allow]]
from = "role=display"        # a selector
to = "role=camera"           # a selector
capabilities = ["echo", "system.*"]
services = ["web"]

[[allow]]
name = "ops"
from = "team in (ops)"
to = ""
capabilities = ["*"]
"#;

    #[test]
    fn the_issue_example_allows_what_it_names_and_nothing_else() {
        let p = Policy::parse(FILE).expect("valid");
        assert_eq!(p.rules().len(), 2);
        assert_eq!(p.rules()[0].line, 2);
        assert_eq!(p.rules()[1].line, 8);
        let display = labels(&[("role", "display")]);
        let camera = labels(&[("role", "camera")]);
        let g = p.grant(&display, &camera);
        assert!(g.allows_capability("system.health") && g.allows_capability("echo"));
        assert!(!g.allows_capability("desktop.open_url"));
        assert!(g.allows_service("web") && !g.allows_service("ssh"));
        // Not the other way round.
        assert!(p.grant(&camera, &display).is_empty());
        let d = p.decide(&display, &camera, Action::Capability("system.info"));
        assert!(d.allowed);
        assert_eq!((d.rule, d.line), (Some(0), Some(2)));
        let d = p.decide(&camera, &display, Action::Capability("echo"));
        assert!(!d.allowed && d.reason.contains("no rule"), "{d:?}");
        // An empty `to` selects every device.
        let ops = labels(&[("team", "ops")]);
        let d = p.decide(&ops, &display, Action::Capability("anything"));
        assert_eq!(d.rule, Some(1));
        assert!(d.reason.contains("\"ops\""), "{d:?}");
        assert!(!p.decide(&ops, &display, Action::Service("web")).allowed);
    }

    #[test]
    fn the_default_refuses_everything() {
        let p = Policy::parse("").expect("empty is valid");
        assert!(p.is_empty());
        let any = labels(&[]);
        assert!(p.grant(&any, &any).is_empty());
        assert!(!p.decide(&any, &any, Action::Capability("echo")).allowed);
    }

    #[test]
    fn errors_point_at_the_line_of_the_bad_value() {
        let text = "[[allow]]\nfrom = \"role=display\"\nto = \"role in (a\"\ncapabilities = [\"ok\", \"bad pattern\"]\n";
        let errs = Policy::parse(text).expect_err("two mistakes");
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].line, 3);
        assert!(errs[0].message.contains("bad selector"), "{errs:?}");
        assert_eq!((errs[1].line, errs[1].column), (4, 23));
        // TOML syntax errors and unknown keys too.
        let errs = Policy::parse("[[allow]]\nfrom = \"a=b\"\nto = 3\n").expect_err("bad type");
        assert_eq!(errs[0].line, 3, "{errs:?}");
        let errs =
            Policy::parse("[[allow]]\nfrom = \"a=b\"\nto = \"c=d\"\ncapabilites = [\"x\"]\n")
                .expect_err("typo");
        assert_eq!(errs[0].line, 4, "{errs:?}");
        assert!(errs[0].message.contains("capabilites"), "{errs:?}");
        let errs =
            Policy::parse("[[allow]]\nfrom = \"a=b\"\nto = \"c=d\"\n").expect_err("allows nothing");
        assert!(errs[0].message.contains("allows nothing"), "{errs:?}");
        let errs = Policy::parse("[[allow]]\nfrom = \"a=b\"\nto = \"c=d\"\nservices = [\"SSH\"]\n")
            .expect_err("bad service");
        assert_eq!(errs[0].line, 4);
    }
}
