//! `anchorctl policy ...`: set, show, test and look back on the mesh policy.
//!
//! `policy set FILE` sends the file as it is (`-`: stdin) and prints
//! `policy version N set (K rules)`; a file with errors prints each as
//! `FILE:LINE:COLUMN: message` and exits [`exit::DATA_ERROR`], with nothing changed.
//! `policy show` prints the file in force after a `#` header line (version, when, who), so
//! its output is itself a valid policy file. `policy test FROM TO CAPABILITY` prints which
//! rule allows it or that none does, and exits 0 when allowed, 1 when refused.

use std::io::Read;
use std::path::PathBuf;

use clap::Subcommand;
use time::OffsetDateTime;

use super::format::{absolute, relative};
use super::{CliError, Ctx, exit, plural};
use crate::api::{PolicyAction, PolicyInfo, PolicyTestResult, PolicyVersionInfo};
use crate::client::ClientError;

/// `anchorctl policy ...`
#[derive(Debug, Subcommand)]
pub enum PolicyCommand {
    /// Set the mesh policy from a TOML file of [[allow]] rules; in force on every anchor at
    /// once, versioned and audited. A file with errors changes nothing.
    #[command(after_help = "\
Example file:
  [[allow]]
  name = \"displays watch cameras\"   # optional
  from = \"role=display\"             # selector of the callers
  to = \"role=camera\"                # selector of the callees
  capabilities = [\"camera.*\", \"system.health\"]
  services = [\"rtsp\"]

Exit codes: 0 set, 65 the file has errors (each printed as FILE:LINE:COLUMN: message),
64 the file cannot be read.")]
    Set {
        /// The policy file, or `-` to read it from stdin.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the policy in force as it was set, after a header line with its version, when
    /// and by whom (with --json: the version, text and parsed rules).
    Show,
    /// Say whether the policy lets device FROM call CAPABILITY (or with --service open
    /// SERVICE) on device TO, and which rule allows it. Exit 0 allowed, 1 refused.
    Test {
        /// The calling device: id, unique id prefix, or name.
        #[arg(value_name = "FROM")]
        from: String,
        /// The called device: id, unique id prefix, or name.
        #[arg(value_name = "TO")]
        to: String,
        /// The capability (or with --service, the service), e.g. system.health.
        #[arg(value_name = "CAPABILITY")]
        what: String,
        /// Test a tunnel to the service named by the third argument instead of a capability.
        #[arg(long)]
        service: bool,
    },
    /// List the versions of the policy, newest first, with when and by whom.
    History {
        /// At most this many (default 20, at most 100).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

impl Ctx<'_> {
    pub(super) async fn policy(&mut self, cmd: PolicyCommand) -> Result<(), CliError> {
        match cmd {
            PolicyCommand::Set { file } => self.policy_set(file).await,
            PolicyCommand::Show => {
                let info = self.client.policy().await?;
                self.emit(&info, |now| human_policy(&info, now))
            }
            PolicyCommand::Test {
                from,
                to,
                what,
                service,
            } => {
                let action = if service {
                    PolicyAction::Service(what)
                } else {
                    PolicyAction::Capability(what)
                };
                let result = self.client.policy_test(&from, &to, &action).await?;
                self.emit(&result, |_| human_test(&result))?;
                if result.allowed {
                    Ok(())
                } else {
                    Err(CliError::new(
                        exit::FAILURE,
                        "policy_refused",
                        format!(
                            "the policy (version {}) refuses it; no rule allows it",
                            result.version
                        ),
                    ))
                }
            }
            PolicyCommand::History { limit } => {
                let list = self.client.policy_history(limit).await?;
                self.emit(&list, |now| human_history(&list, now))
            }
        }
    }

    async fn policy_set(&mut self, file: PathBuf) -> Result<(), CliError> {
        let (text, shown) = if file.as_os_str() == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::bad_input(format!("cannot read stdin: {e}")))?;
            (text, "<stdin>".to_string())
        } else {
            let text = std::fs::read_to_string(&file).map_err(|e| {
                CliError::bad_input(format!("cannot read policy file {}: {e}", file.display()))
            })?;
            (text, file.display().to_string())
        };
        match self.client.set_policy(text).await {
            Ok(info) => self.emit(&info, |_| {
                format!(
                    "policy version {} set ({})\n",
                    info.version,
                    plural(info.rules.len(), "rule")
                )
            }),
            Err(ClientError::InvalidPolicy { errors, .. }) => {
                let mut message = format!(
                    "{shown} has {}; nothing was changed",
                    plural(errors.len(), "error")
                );
                for e in &errors {
                    message.push_str(&format!("\n{shown}:{}:{}: {}", e.line, e.column, e.message));
                }
                Err(CliError::new(exit::DATA_ERROR, "invalid_policy", message))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// `policy show`: a `#` header line, then the file as set.
pub fn human_policy(info: &PolicyInfo, now: OffsetDateTime) -> String {
    let mut out = match info.updated_at {
        Some(at) if info.version > 0 => format!(
            "# policy version {}, set {} ({}) by {}, {}\n",
            info.version,
            absolute(at),
            relative(at, now),
            info.updated_by,
            plural(info.rules.len(), "rule")
        ),
        _ => format!(
            "# policy version {}: the default, no rules; no node may reach any peer\n",
            info.version
        ),
    };
    out.push_str(&info.text);
    if !info.text.is_empty() && !info.text.ends_with('\n') {
        out.push('\n');
    }
    out
}

/// `policy test`: the decision, then who and what it was about.
pub fn human_test(r: &PolicyTestResult) -> String {
    let what = match (&r.capability, &r.service) {
        (Some(c), _) => format!("capability {c}"),
        (None, Some(s)) => format!("service {s}"),
        (None, None) => String::new(),
    };
    format!(
        "{}\n  from {} ({}) to {} ({}), {what}, policy version {}\n",
        r.reason, r.from.name, r.from.device_id, r.to.name, r.to.device_id, r.version
    )
}

/// `policy history`: one line per version.
pub fn human_history(list: &[PolicyVersionInfo], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no policy was ever set (version 0: no node may reach any peer)\n".into();
    }
    let mut table = super::format::Table::new(&["VERSION", "SET", "BY", "LINES"]);
    for v in list {
        table.row(vec![
            v.version.to_string(),
            format!(
                "{} ({})",
                absolute(v.updated_at),
                relative(v.updated_at, now)
            ),
            v.updated_by.clone(),
            v.text.lines().count().to_string(),
        ]);
    }
    table.render()
}
