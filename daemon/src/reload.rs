//! The anchor as a service: loading the configuration (file, flags, policy file) the same way
//! for a start, a reload and `anchord check-config`; SIGHUP reloads that change what can change
//! without dropping a session; and the service manager's notifications around all of it.
//!
//! What a reload changes at once: the log filter, the presence thresholds (`stale_after`,
//! `offline_after`, `degraded_loss`), invocation retention (`invocation_retention`,
//! `invocation_max_records`) and the policy file (put in force through the same path as
//! `PUT /console/v1/policy`, only when its content differs from the policy in force). Every
//! other setting is logged as needing a restart and keeps its running value. A file that does
//! not load changes nothing.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anchorage_console::api::Principal;
use anchorage_console::backend::Backend;
use anchorage_mesh::os::{Hangups, LogControl};
use tracing::{error, info, warn};

use crate::anchor::{Anchor, StartError};
use crate::config::{AnchorConfig, AnchorFlags, ConfigError};
use crate::policy::{MAX_POLICY_LEN, Policy, PolicyError};

/// The audit actor of a policy set from the policy file.
pub const POLICY_FILE_ACTOR_NAME: &str = "anchord";
/// The token id shown beside [`POLICY_FILE_ACTOR_NAME`] (no token is involved).
pub const POLICY_FILE_ACTOR_ID: &str = "policy_file";

/// A configuration as loaded: the validated settings and the policy file's text, if one is
/// configured (already checked to parse).
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The settings.
    pub config: AnchorConfig,
    /// The policy file's content.
    pub policy: Option<String>,
}

/// Why a configuration did not load. Its message is what `anchord` prints before exiting 64.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LoadError {
    /// The file or a flag.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The policy file cannot be read or is too large.
    #[error("cannot read policy file {path}: {message}")]
    PolicyRead {
        /// The file.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// The policy file has errors.
    #[error("invalid policy file {path}: {}", list_errors(.errors))]
    PolicyInvalid {
        /// The file.
        path: PathBuf,
        /// Each error, with its line and column.
        errors: Vec<PolicyError>,
    },
}

fn list_errors(errors: &[PolicyError]) -> String {
    errors
        .iter()
        .map(|e| format!("line {}, column {}: {}", e.line, e.column, e.message))
        .collect::<Vec<_>>()
        .join("; ")
}

/// Loads the `--config` file with `flags` over it, and the policy file it names (blocking: it
/// reads files).
pub fn load(flags: &AnchorFlags) -> Result<Loaded, LoadError> {
    let config = flags.load()?;
    let policy = match &config.policy_file {
        Some(path) => Some(read_policy_file(path)?),
        None => None,
    };
    Ok(Loaded { config, policy })
}

/// Reads a policy file and checks that it parses; at most [`MAX_POLICY_LEN`] bytes.
pub fn read_policy_file(path: &Path) -> Result<String, LoadError> {
    let read_err = |message: String| LoadError::PolicyRead {
        path: path.to_path_buf(),
        message,
    };
    let len = std::fs::metadata(path)
        .map_err(|e| read_err(e.to_string()))?
        .len();
    if len > MAX_POLICY_LEN as u64 {
        return Err(read_err(format!(
            "{len} bytes; a policy is at most {MAX_POLICY_LEN}"
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|e| read_err(e.to_string()))?;
    Policy::parse(&text).map_err(|errors| LoadError::PolicyInvalid {
        path: path.to_path_buf(),
        errors,
    })?;
    Ok(text)
}

// The running settings are configuration; named here too.
pub use crate::config::{LiveSettings, Retention};

/// What differs between the running configuration and a newly loaded one, by TOML key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Changes {
    /// Settings a reload puts in force.
    pub reloaded: Vec<&'static str>,
    /// Settings that differ but only take effect at the next start.
    pub needs_restart: Vec<&'static str>,
}

impl Changes {
    /// Whether nothing differs.
    pub fn is_empty(&self) -> bool {
        self.reloaded.is_empty() && self.needs_restart.is_empty()
    }
}

/// Compares the running configuration `old` with `new` (pure).
pub fn compare(old: &AnchorConfig, new: &AnchorConfig) -> Changes {
    let mut c = Changes::default();
    let mut reload = |key, differs: bool| {
        if differs {
            c.reloaded.push(key);
        }
    };
    reload("log_level", old.log_level != new.log_level);
    reload(
        "stale_after",
        old.presence.stale_after != new.presence.stale_after,
    );
    reload(
        "offline_after",
        old.presence.offline_after != new.presence.offline_after,
    );
    reload(
        "degraded_loss",
        old.presence.degraded_loss != new.presence.degraded_loss,
    );
    reload(
        "invocation_retention",
        old.invocation_retention != new.invocation_retention,
    );
    reload(
        "invocation_max_records",
        old.invocation_max_records != new.invocation_max_records,
    );
    reload("policy_file", old.policy_file != new.policy_file);
    let mut restart = |key, differs: bool| {
        if differs {
            c.needs_restart.push(key);
        }
    };
    restart("data_dir", old.data_dir != new.data_dir);
    restart("listen", old.listen != new.listen);
    restart("console", old.console != new.console);
    restart("public_addr", old.public_addr != new.public_addr);
    restart(
        "heartbeat_interval",
        old.presence.heartbeat_interval != new.presence.heartbeat_interval,
    );
    restart("cert_validity", old.cert_validity != new.cert_validity);
    restart("renewal_grace", old.renewal_grace != new.renewal_grace);
    restart(
        "pairing_max_attempts",
        old.pairing_max_attempts != new.pairing_max_attempts,
    );
    restart(
        "pairing_failures_*",
        old.pairing_limits != new.pairing_limits,
    );
    restart(
        "retry_above_handshakes",
        old.retry_above_handshakes != new.retry_above_handshakes,
    );
    restart(
        "refuse_above_handshakes",
        old.refuse_above_handshakes != new.refuse_above_handshakes,
    );
    restart(
        "invocation_output_limit",
        old.invocation_output_limit != new.invocation_output_limit,
    );
    restart(
        "invocation_copies",
        old.invocation_copies != new.invocation_copies,
    );
    restart("log_format", old.log_json != new.log_json);
    restart("worker_threads", old.worker_threads != new.worker_threads);
    restart("console_*", old.console_serve != new.console_serve);
    restart("store, etcd_*, cluster_key_file", old.store != new.store);
    restart("relay_*", old.relay_limits != new.relay_limits);
    // Anything else (a setting this list does not name yet) also waits for a restart: compare
    // the rest through its debug form, with every setting named above made equal.
    let named = merged(old, new);
    let mut rest = new.clone();
    rest.data_dir.clone_from(&old.data_dir);
    rest.listen = old.listen;
    rest.console = old.console;
    rest.public_addr.clone_from(&old.public_addr);
    rest.presence.heartbeat_interval = old.presence.heartbeat_interval;
    rest.cert_validity = old.cert_validity;
    rest.renewal_grace = old.renewal_grace;
    rest.pairing_max_attempts = old.pairing_max_attempts;
    rest.pairing_limits = old.pairing_limits;
    rest.retry_above_handshakes = old.retry_above_handshakes;
    rest.refuse_above_handshakes = old.refuse_above_handshakes;
    rest.invocation_output_limit = old.invocation_output_limit;
    rest.invocation_copies = old.invocation_copies;
    rest.log_json = old.log_json;
    rest.worker_threads = old.worker_threads;
    rest.console_serve = old.console_serve.clone();
    rest.store = old.store.clone();
    rest.relay_limits = old.relay_limits;
    restart(
        "other settings",
        format!("{rest:?}") != format!("{named:?}"),
    );
    c
}

/// `old` with the settings a reload changes taken from `new`: the configuration in force after
/// a reload.
pub fn merged(old: &AnchorConfig, new: &AnchorConfig) -> AnchorConfig {
    let mut m = old.clone();
    m.log_level.clone_from(&new.log_level);
    m.presence.stale_after = new.presence.stale_after;
    m.presence.offline_after = new.presence.offline_after;
    m.presence.degraded_loss = new.presence.degraded_loss;
    m.invocation_retention = new.invocation_retention;
    m.invocation_max_records = new.invocation_max_records;
    m.policy_file.clone_from(&new.policy_file);
    m
}

/// Puts the presence thresholds and retention of `config` in force on `anchor` (the
/// heartbeat interval stays: nodes were given it when they registered).
pub fn apply_settings(anchor: &Anchor, config: &AnchorConfig) {
    let s = anchor.services();
    let mut table = s.nodes.lock();
    let mut presence = config.presence;
    presence.heartbeat_interval = s.config.presence.heartbeat_interval;
    let mut with = config.clone();
    with.presence = presence;
    table.set_settings(crate::nodes::settings(&with));
    drop(table);
    s.live.set_retention(crate::config::retention_of(config));
}

/// Puts the policy file's `text` in force through the console's own path (checked, stored as
/// the next version with its audit record, announced to nodes) when it differs from the
/// policy in force. Returns the new version, or `None` when nothing changed.
pub async fn apply_policy(anchor: &Anchor, text: &str) -> Result<Option<u64>, String> {
    if anchor.services().policy.current().text == text {
        return Ok(None);
    }
    let who = Principal {
        token_id: POLICY_FILE_ACTOR_ID.into(),
        name: POLICY_FILE_ACTOR_NAME.into(),
        permissions: Vec::new(),
        scope: Default::default(),
    };
    match anchor.backend().set_policy(&who, text.to_string()).await {
        Ok(info) => Ok(Some(info.version)),
        Err(e) => Err(e.to_string()),
    }
}

/// Runs the anchor as a service until `shutdown` resolves: starts it with `loaded` (the policy
/// file put in force), tells the service manager it is ready, reloads on every SIGHUP from
/// `flags` (the same file and flags as the start), and says it is stopping at the end.
/// Create `hangups` before anything else, so an early SIGHUP does not end the process.
pub async fn run_service(
    flags: AnchorFlags,
    loaded: Loaded,
    log: LogControl,
    mut hangups: Hangups,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    let running = crate::start(loaded.config.clone()).await?;
    if let Some(text) = &loaded.policy {
        policy_from_file(&running.anchor, loaded.config.policy_file.as_deref(), text).await;
    }
    let mut current = loaded.config;
    anchorage_mesh::os::notify_ready(&format!(
        "serving nodes on {} and the console on http://{}",
        running.quic_addr, running.console_addr
    ));
    let flags = Arc::new(flags);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            _ = hangups.recv() => {
                anchorage_mesh::os::notify_reloading();
                current = reload(&running.anchor, &flags, &log, current).await;
                anchorage_mesh::os::notify_ready("configuration reloaded");
            }
        }
    }
    anchorage_mesh::os::notify_stopping();
    info!("shutting down");
    running.shutdown().await;
    info!("stopped");
    Ok(())
}

/// One reload: loads from `flags` again and applies what can change; on an error logs it and
/// keeps `current`. Returns the configuration in force.
async fn reload(
    anchor: &Anchor,
    flags: &Arc<AnchorFlags>,
    log: &LogControl,
    current: AnchorConfig,
) -> AnchorConfig {
    let file = flags
        .config
        .as_ref()
        .map_or_else(|| "(no file)".to_string(), |p| p.display().to_string());
    info!(file = %file, "SIGHUP: reloading the configuration");
    let f = flags.clone();
    let loaded = match tokio::task::spawn_blocking(move || load(&f)).await {
        Ok(Ok(loaded)) => loaded,
        Ok(Err(e)) => {
            error!(file = %file, error = %e, "configuration reload failed; the running configuration is kept");
            return current;
        }
        Err(e) => {
            error!(error = %e, "configuration reload failed; the running configuration is kept");
            return current;
        }
    };
    let new = loaded.config;
    let changes = compare(&current, &new);
    let next = merged(&current, &new);
    if next.log_level != current.log_level
        && let Err(e) = log.set(&anchorage_mesh::os::log_filter(next.log_level.as_deref()))
    {
        warn!(error = %e, "cannot change the log filter");
    }
    apply_settings(anchor, &next);
    let mut policy_version = None;
    if let Some(text) = &loaded.policy {
        policy_version = policy_from_file(anchor, next.policy_file.as_deref(), text).await;
    } else if current.policy_file.is_some() {
        info!("policy_file was removed from the configuration; the policy in force stays");
    }
    if !changes.needs_restart.is_empty() {
        let list = changes.needs_restart.join(", ");
        warn!(
            settings = %list,
            "configuration changed: {list} needs a restart to take effect; the running value is kept"
        );
    }
    if changes.is_empty() && policy_version.is_none() {
        info!(file = %file, "configuration reloaded: nothing changed");
    } else {
        info!(
            file = %file,
            changed = %changes.reloaded.join(", "),
            needs_restart = %changes.needs_restart.join(", "),
            policy_version = policy_version.map(|v| v.to_string()).unwrap_or_default(),
            "configuration reloaded: changed {}",
            if changes.reloaded.is_empty() { "nothing that applies now".to_string() } else { changes.reloaded.join(", ") },
        );
    }
    next
}

/// Applies the policy file's text; logs the outcome. Returns the new version when it changed.
async fn policy_from_file(anchor: &Anchor, path: Option<&Path>, text: &str) -> Option<u64> {
    let shown = path.map(|p| p.display().to_string()).unwrap_or_default();
    match apply_policy(anchor, text).await {
        Ok(Some(version)) => {
            info!(file = %shown, version, "policy file put in force");
            Some(version)
        }
        Ok(None) => None,
        Err(e) => {
            error!(file = %shown, error = %e, "cannot put the policy file in force");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn config(text: &str) -> AnchorConfig {
        toml::from_str::<crate::FileConfig>(text)
            .unwrap()
            .validate()
            .unwrap()
    }

    #[test]
    fn a_reload_applies_thresholds_and_names_what_needs_a_restart() {
        let old = config("stale_after = \"5m\"\nlisten = \"127.0.0.1:7444\"");
        let new = config(
            "stale_after = \"2m\"\nlisten = \"127.0.0.1:7445\"\nlog_level = \"debug\"\n\
             invocation_retention = \"1d\"\nheartbeat_interval = \"5s\"",
        );
        let c = compare(&old, &new);
        assert_eq!(
            c.reloaded,
            vec!["log_level", "stale_after", "invocation_retention"]
        );
        assert_eq!(c.needs_restart, vec!["listen", "heartbeat_interval"]);
        let m = merged(&old, &new);
        assert_eq!(m.presence.stale_after, Duration::from_secs(120));
        assert_eq!(
            m.listen, old.listen,
            "a restart setting keeps its running value"
        );
        assert_eq!(
            m.presence.heartbeat_interval,
            old.presence.heartbeat_interval
        );
        assert_eq!(m.log_level.as_deref(), Some("debug"));
        // Reloading the same file again: the restart settings still differ, nothing else.
        let again = compare(&m, &new);
        assert!(again.reloaded.is_empty(), "{again:?}");
        assert_eq!(again.needs_restart, vec!["listen", "heartbeat_interval"]);
        assert!(compare(&old, &old).is_empty());
    }

    #[test]
    fn policy_file_errors_name_the_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("policy.toml");
        std::fs::write(
            &path,
            "[[allow]]\nfrom = \"role=a\"\nto = \"role=b\"\ncapabilities = [\"echo\"]\n",
        )
        .unwrap();
        assert!(read_policy_file(&path).unwrap().contains("role=a"));
        std::fs::write(&path, "[[allow]]\nfrom = \"role in (\"\nto = \"role=b\"\n").unwrap();
        let err = read_policy_file(&path).unwrap_err().to_string();
        assert!(
            err.contains("policy.toml") && err.contains("line 2"),
            "{err}"
        );
        let err = read_policy_file(&dir.path().join("missing.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read policy file"), "{err}");
    }
}
