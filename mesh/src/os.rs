//! Small operating-system helpers shared by `anchord` and `anchor-node`: private files that
//! survive a crash, logging set-up (with a filter that can change while running), the
//! shutdown and reload signals, and the service manager's notifications (systemd
//! `Type=notify`).

use std::io::Write;
use std::path::Path;

/// Writes `contents` to `path` readable only by its owner (0600 on Unix), atomically: a
/// temporary file is written and fsynced, then renamed over `path`. A crash leaves either the
/// old file or the new one, never half of one.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts.open(&tmp)?;
    f.write_all(contents)?;
    f.sync_all()?;
    drop(f);
    std::fs::rename(&tmp, path)
}

/// Creates `dir` (and its parents) and makes it accessible to its owner only (0700 on Unix).
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The log filter without `RUST_LOG` or a configured level: `info`, with the store's own
/// chatter (fjall and its LSM tree announce every journal and segment at `info`) kept to
/// warnings. `RUST_LOG=info` or `--log-level info` shows it again.
pub const DEFAULT_LOG_FILTER: &str = "info,fjall=warn,lsm_tree=warn";

/// The filter in force for a configured level: the configured one, else `RUST_LOG`, else
/// [`DEFAULT_LOG_FILTER`].
pub fn log_filter(configured: Option<&str>) -> String {
    if let Some(level) = configured {
        return level.to_string();
    }
    match std::env::var("RUST_LOG") {
        Ok(v) if !v.trim().is_empty() => v,
        _ => DEFAULT_LOG_FILTER.to_string(),
    }
}

/// Checks a log filter (`RUST_LOG` syntax: `debug`, `info,anchorage_daemon=debug`); the error
/// says what is wrong. Stricter than `RUST_LOG` in one way: a bare word must be a level
/// (`trace`, `debug`, `info`, `warn`, `error`, `off`), so a typo such as `debgu` is refused
/// rather than read as a module name.
pub fn check_log_filter(directives: &str) -> Result<(), String> {
    if directives.trim().is_empty() {
        return Err("is empty; expected a level such as info or debug".into());
    }
    const LEVELS: [&str; 6] = ["trace", "debug", "info", "warn", "error", "off"];
    for d in directives
        .split(',')
        .map(str::trim)
        .filter(|d| !d.is_empty())
    {
        if !d.contains(['=', '[', ':']) && !LEVELS.contains(&d.to_ascii_lowercase().as_str()) {
            return Err(format!(
                "{d:?} is not a level; expected trace, debug, info, warn, error or off \
                 (or target=level)"
            ));
        }
    }
    tracing_subscriber::EnvFilter::builder()
        .parse(directives)
        .map(|_| ())
        .map_err(|e| format!("{directives:?}: {e}"))
}

/// Changes the log filter of a running process (see [`init_tracing_reloadable`]).
#[derive(Debug)]
pub struct LogControl {
    handle: tracing_subscriber::reload::Handle<
        tracing_subscriber::EnvFilter,
        tracing_subscriber::Registry,
    >,
}

impl LogControl {
    /// Puts `directives` in force from the next event on; an invalid filter changes nothing.
    pub fn set(&self, directives: &str) -> Result<(), String> {
        let filter = tracing_subscriber::EnvFilter::builder()
            .parse(directives)
            .map_err(|e| format!("{directives:?}: {e}"))?;
        self.handle.reload(filter).map_err(|e| e.to_string())
    }
}

/// Logs to stderr through `tracing` with the filter of [`log_filter`]; JSON lines when
/// `json`; colours only on a terminal.
pub fn init_tracing(json: bool) {
    let _ = init_tracing_reloadable(json, None);
}

/// Like [`init_tracing`] with a configured level (which wins over `RUST_LOG`), returning the
/// control that changes the filter later (a configuration reload). A filter that does not
/// parse falls back to [`DEFAULT_LOG_FILTER`]; check it first with [`check_log_filter`].
pub fn init_tracing_reloadable(json: bool, configured: Option<&str>) -> LogControl {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;

    let filter = tracing_subscriber::EnvFilter::builder()
        .parse(log_filter(configured))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(DEFAULT_LOG_FILTER));
    let (filter, handle) = tracing_subscriber::reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let text = (!json).then(|| {
        tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
    });
    let json = json.then(|| {
        tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
    });
    // Fails only when a subscriber is already set (tests that call this twice): keep that one.
    let _ = tracing_subscriber::registry()
        .with(filter)
        .with(text)
        .with(json)
        .try_init();
    LogControl { handle }
}

/// Tells the service manager (systemd, `Type=notify`) that start-up is done: `READY=1` with a
/// `STATUS=` line. Does nothing without `NOTIFY_SOCKET`; a failure to send is logged, never
/// fatal.
pub fn notify_ready(status: &str) {
    #[cfg(unix)]
    send_notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(status),
    ]);
    #[cfg(not(unix))]
    let _ = status;
}

/// Tells the service manager a configuration reload began: `RELOADING=1` with the
/// `MONOTONIC_USEC=` that `Type=notify-reload` requires. Follow it with [`notify_ready`].
pub fn notify_reloading() {
    #[cfg(unix)]
    match sd_notify::NotifyState::monotonic_usec_now() {
        Ok(now) => send_notify(&[sd_notify::NotifyState::Reloading, now]),
        Err(e) => tracing::debug!(error = %e, "cannot read the monotonic clock for systemd"),
    }
}

/// Tells the service manager the process is stopping: `STOPPING=1`.
pub fn notify_stopping() {
    #[cfg(unix)]
    send_notify(&[sd_notify::NotifyState::Stopping]);
}

#[cfg(unix)]
fn send_notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::warn!(error = %e, "cannot notify the service manager (NOTIFY_SOCKET)");
    }
}

/// SIGHUP, the conventional "reload your configuration", as a stream of wake-ups. Create it
/// first thing in the runtime: until then a SIGHUP ends the process (the default action).
#[derive(Debug)]
pub struct Hangups {
    #[cfg(unix)]
    signal: Option<tokio::signal::unix::Signal>,
}

impl Hangups {
    /// Starts listening for SIGHUP (within a tokio runtime). Where signals cannot be had,
    /// [`Hangups::recv`] never resolves.
    pub fn new() -> Hangups {
        Hangups {
            #[cfg(unix)]
            signal: tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok(),
        }
    }

    /// Resolves at the next SIGHUP (several in a row may resolve once). Cancel-safe.
    pub async fn recv(&mut self) {
        #[cfg(unix)]
        if let Some(signal) = &mut self.signal
            && signal.recv().await.is_some()
        {
            return;
        }
        std::future::pending::<()>().await
    }
}

impl Default for Hangups {
    fn default() -> Self {
        Hangups::new()
    }
}

/// Like [`shutdown_signal`], with the handlers installed now rather than at the first poll,
/// so a SIGTERM that comes while the process is still starting (a service manager stopping it
/// right after `READY=1`) is a clean stop, not the default action's kill. Call it within a
/// tokio runtime.
pub fn shutdown_listener() -> impl std::future::Future<Output = ()> + Send {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let int = signal(SignalKind::interrupt()).ok();
        let term = signal(SignalKind::terminate()).ok();
        async move {
            match (int, term) {
                (Some(mut int), Some(mut term)) => {
                    tokio::select! {
                        _ = int.recv() => {}
                        _ = term.recv() => {}
                    }
                }
                _ => shutdown_signal().await,
            }
        }
    }
    #[cfg(not(unix))]
    {
        shutdown_signal()
    }
}

/// Resolves on SIGINT (Ctrl-C) or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let Ok(mut term) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        else {
            let _ = ctrl_c.await;
            return;
        };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("secret");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "no temporary file left behind");
    }

    #[test]
    fn log_filters_are_checked_and_a_configured_level_wins() {
        assert!(check_log_filter("debug").is_ok());
        assert!(check_log_filter(DEFAULT_LOG_FILTER).is_ok());
        assert!(check_log_filter("info,anchorage_daemon=trace").is_ok());
        let err = check_log_filter("loud").unwrap_err();
        assert!(err.contains("loud"), "{err}");
        let err = check_log_filter("info,fjall=loud").unwrap_err();
        assert!(err.contains("fjall=loud"), "{err}");
        assert!(check_log_filter(" ").is_err());
        assert_eq!(log_filter(Some("warn")), "warn");
    }
}
