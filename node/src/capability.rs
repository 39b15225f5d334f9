//! Capabilities a node offers: built-ins and operator-defined commands.
//!
//! Built-ins: `echo`, `system.health`, `system.identity`, `system.info`, and `desktop.open_url`
//! when enabled in the node config. Operator-defined commands come from the node's TOML config
//! (`[capabilities.NAME] command = [...]`): the input JSON goes to stdin, the output JSON comes
//! from stdout; a non-zero exit or a timeout is a failure carrying the tail of stderr. A
//! command whose program is missing reports itself unavailable, and the agent tells the anchor
//! when that changes.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anchorage_wire::control::CapabilityInfo;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Bytes of stderr kept for a failure message.
pub const STDERR_TAIL: usize = 2048;
/// Default timeout of a command capability.
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default output limit of a command capability.
pub const DEFAULT_MAX_OUTPUT: usize = 64 * 1024;

/// What a capability run produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunOutcome {
    /// Succeeded with JSON output.
    Succeeded(Vec<u8>),
    /// Failed, with a message (e.g. stderr tail) and any output.
    Failed {
        /// Why.
        error: String,
        /// Output produced anyway.
        output: Vec<u8>,
    },
    /// Ran out of time.
    TimedOut {
        /// What happened.
        error: String,
    },
}

/// A boxed future of a capability run.
pub type RunFuture = Pin<Box<dyn Future<Output = RunOutcome> + Send>>;

/// Static facts the built-ins report.
#[derive(Debug, Clone)]
pub struct NodeFacts {
    /// Device id (display form).
    pub device_id: String,
    /// Name.
    pub name: String,
    /// Platform.
    pub platform: String,
    /// Agent version.
    pub agent_version: String,
    /// When the agent started.
    pub started: Instant,
}

/// One capability.
pub trait Capability: Send + Sync + 'static {
    /// Name, e.g. `system.health`.
    fn name(&self) -> &str;
    /// One line for operators.
    fn description(&self) -> String;
    /// Whether it can run now, and why not.
    fn availability(&self) -> Result<(), String> {
        Ok(())
    }
    /// Runs with JSON `input` within `timeout`.
    fn run(&self, input: Vec<u8>, timeout: Duration) -> RunFuture;
}

/// The capabilities of a node.
#[derive(Clone, Default)]
pub struct Registry {
    caps: BTreeMap<String, Arc<dyn Capability>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.caps.keys()).finish()
    }
}

impl Registry {
    /// The built-ins (without `desktop.open_url`).
    pub fn builtins(facts: NodeFacts) -> Registry {
        let facts = Arc::new(facts);
        let mut r = Registry::default();
        r.add(Arc::new(Echo));
        r.add(Arc::new(Health(facts.clone())));
        r.add(Arc::new(IdentityCap(facts.clone())));
        r.add(Arc::new(Info(facts)));
        r
    }

    /// Adds (or replaces) a capability.
    pub fn add(&mut self, cap: Arc<dyn Capability>) {
        self.caps.insert(cap.name().to_string(), cap);
    }

    /// A capability by name.
    pub fn get(&self, name: &str) -> Option<Arc<dyn Capability>> {
        self.caps.get(name).cloned()
    }

    /// Every capability with its availability now.
    pub fn infos(&self) -> Vec<CapabilityInfo> {
        self.caps
            .values()
            .map(|c| {
                let avail = c.availability();
                CapabilityInfo {
                    name: c.name().to_string(),
                    available: avail.is_ok(),
                    reason: avail.err(),
                    description: c.description(),
                }
            })
            .collect()
    }
}

struct Echo;

impl Capability for Echo {
    fn name(&self) -> &str {
        "echo"
    }
    fn description(&self) -> String {
        "Returns its input".into()
    }
    fn run(&self, input: Vec<u8>, _timeout: Duration) -> RunFuture {
        Box::pin(async move { RunOutcome::Succeeded(input) })
    }
}

struct Health(Arc<NodeFacts>);

impl Capability for Health {
    fn name(&self) -> &str {
        "system.health"
    }
    fn description(&self) -> String {
        "Agent status, uptime, load and memory".into()
    }
    fn run(&self, _input: Vec<u8>, _timeout: Duration) -> RunFuture {
        let facts = self.0.clone();
        Box::pin(async move {
            let sys = system_snapshot();
            let body = serde_json::json!({
                "status": "ok",
                "agent_version": facts.agent_version,
                "agent_uptime_secs": facts.started.elapsed().as_secs(),
                "system_uptime_secs": sys.uptime_secs,
                "load_1m": sys.load.map(|l| l[0]),
                "memory_total_bytes": sys.mem_total,
                "memory_available_bytes": sys.mem_available,
            });
            RunOutcome::Succeeded(body.to_string().into_bytes())
        })
    }
}

struct IdentityCap(Arc<NodeFacts>);

impl Capability for IdentityCap {
    fn name(&self) -> &str {
        "system.identity"
    }
    fn description(&self) -> String {
        "Device id, name, platform and agent version".into()
    }
    fn run(&self, _input: Vec<u8>, _timeout: Duration) -> RunFuture {
        let f = self.0.clone();
        Box::pin(async move {
            let body = serde_json::json!({
                "device_id": f.device_id,
                "name": f.name,
                "platform": f.platform,
                "agent_version": f.agent_version,
            });
            RunOutcome::Succeeded(body.to_string().into_bytes())
        })
    }
}

struct Info(Arc<NodeFacts>);

impl Capability for Info {
    fn name(&self) -> &str {
        "system.info"
    }
    fn description(&self) -> String {
        "OS, architecture, hostname, uptime, load and memory".into()
    }
    fn run(&self, _input: Vec<u8>, _timeout: Duration) -> RunFuture {
        let _ = &self.0;
        Box::pin(async move {
            let sys = system_snapshot();
            let body = serde_json::json!({
                "os": std::env::consts::OS,
                "arch": std::env::consts::ARCH,
                "hostname": sys.hostname,
                "uptime_secs": sys.uptime_secs,
                "load": sys.load,
                "memory": {
                    "total_bytes": sys.mem_total,
                    "available_bytes": sys.mem_available,
                },
                "cpus": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            });
            RunOutcome::Succeeded(body.to_string().into_bytes())
        })
    }
}

/// A snapshot of the machine, from the OS through `sysinfo` (`None` where the OS does not
/// tell).
#[derive(Debug, Clone, Default)]
pub struct SystemSnapshot {
    /// Host name.
    pub hostname: Option<String>,
    /// Seconds since boot.
    pub uptime_secs: Option<u64>,
    /// 1, 5, 15 minute load averages (Windows has none).
    pub load: Option<[f64; 3]>,
    /// Total memory, bytes.
    pub mem_total: Option<u64>,
    /// Memory available to new programs without swapping, bytes.
    pub mem_available: Option<u64>,
}

/// Reads the machine's facts (a few small reads of the OS, cheap enough per invocation).
pub fn system_snapshot() -> SystemSnapshot {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let known = |v: u64| (v > 0).then_some(v);
    SystemSnapshot {
        hostname: sysinfo::System::host_name().filter(|h| !h.is_empty()),
        uptime_secs: known(sysinfo::System::uptime()),
        load: load_average(),
        mem_total: known(sys.total_memory()),
        mem_available: known(sys.available_memory()),
    }
}

/// The 1, 5 and 15 minute load averages; `None` where the OS has none (Windows).
pub fn load_average() -> Option<[f64; 3]> {
    if cfg!(windows) {
        return None;
    }
    let l = sysinfo::System::load_average();
    Some([l.one, l.five, l.fifteen])
}

/// This machine's host name, or `anchorage-node` when it has none.
pub fn hostname() -> String {
    sysinfo::System::host_name()
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "anchorage-node".into())
}

/// Opens an http(s) URL in the desktop's browser. Off unless the node config enables it.
#[derive(Debug)]
pub struct OpenUrl {
    /// The opener program (`xdg-open` on Linux, `open` on macOS).
    pub opener: PathBuf,
}

impl Capability for OpenUrl {
    fn name(&self) -> &str {
        "desktop.open_url"
    }
    fn description(&self) -> String {
        "Opens an http or https URL in the desktop browser".into()
    }
    fn availability(&self) -> Result<(), String> {
        program_available(&self.opener)
    }
    fn run(&self, input: Vec<u8>, timeout: Duration) -> RunFuture {
        let opener = self.opener.clone();
        Box::pin(async move {
            let url = match parse_url_input(&input) {
                Ok(u) => u,
                Err(error) => {
                    return RunOutcome::Failed {
                        error,
                        output: Vec::new(),
                    };
                }
            };
            let spec = CommandSpec {
                command: vec![opener.to_string_lossy().into_owned(), url.clone()],
                timeout: None,
                max_output: None,
                description: None,
            };
            match run_command(&spec, Vec::new(), timeout, 4096).await {
                RunOutcome::Succeeded(_) => RunOutcome::Succeeded(
                    serde_json::json!({"opened": url}).to_string().into_bytes(),
                ),
                other => other,
            }
        })
    }
}

/// Accepts `{"url": "..."}` or a bare JSON string; only http and https.
pub fn parse_url_input(input: &[u8]) -> Result<String, String> {
    let v: serde_json::Value = serde_json::from_slice(input)
        .map_err(|_| "input must be JSON: {\"url\": \"https://...\"}")?;
    let url = match &v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Object(m) => m
            .get("url")
            .and_then(|u| u.as_str())
            .ok_or("missing \"url\"")?
            .to_string(),
        _ => return Err("input must be {\"url\": \"https://...\"}".into()),
    };
    let lower = url.to_ascii_lowercase();
    let ok_scheme = lower.starts_with("http://") || lower.starts_with("https://");
    let host_part = url.split("://").nth(1).unwrap_or("");
    if !ok_scheme || host_part.is_empty() || url.chars().any(|c| c.is_control() || c == ' ') {
        return Err("only http and https URLs are allowed".into());
    }
    Ok(url)
}

/// An operator-defined command capability, from the node config.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CommandSpec {
    /// Program and arguments.
    pub command: Vec<String>,
    /// Timeout, e.g. `30s` (default 30 s).
    pub timeout: Option<String>,
    /// Largest output kept, bytes (default 64 KiB).
    pub max_output: Option<usize>,
    /// One line for operators.
    pub description: Option<String>,
}

/// A command capability.
#[derive(Debug)]
pub struct CommandCap {
    name: String,
    spec: CommandSpec,
    timeout: Duration,
}

impl CommandCap {
    /// A capability named `name` running `spec`.
    pub fn new(name: String, spec: CommandSpec) -> Result<CommandCap, String> {
        if spec.command.is_empty() {
            return Err(format!("capability {name}: `command` is empty"));
        }
        let timeout = match &spec.timeout {
            None => DEFAULT_COMMAND_TIMEOUT,
            Some(t) => anchorage_mesh::config::parse_duration(t)
                .map_err(|e| format!("capability {name}: timeout: {e}"))?,
        };
        Ok(CommandCap {
            name,
            spec,
            timeout,
        })
    }
}

impl Capability for CommandCap {
    fn name(&self) -> &str {
        &self.name
    }
    fn description(&self) -> String {
        self.spec
            .description
            .clone()
            .unwrap_or_else(|| format!("Runs {}", self.spec.command.join(" ")))
    }
    fn availability(&self) -> Result<(), String> {
        program_available(Path::new(&self.spec.command[0]))
    }
    fn run(&self, input: Vec<u8>, timeout: Duration) -> RunFuture {
        let spec = self.spec.clone();
        let timeout = timeout.min(self.timeout);
        let max = spec.max_output.unwrap_or(DEFAULT_MAX_OUTPUT);
        Box::pin(async move { run_command(&spec, input, timeout, max).await })
    }
}

/// Whether `program` can be executed: an existing file for paths, found on `PATH` otherwise.
pub fn program_available(program: &Path) -> Result<(), String> {
    let exists = |p: &Path| {
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        }
        #[cfg(not(unix))]
        {
            p.is_file()
        }
    };
    if program.components().count() > 1 {
        return if exists(program) {
            Ok(())
        } else {
            Err(format!("{} not found or not executable", program.display()))
        };
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    if std::env::split_paths(&path).any(|dir| exists(&dir.join(program))) {
        Ok(())
    } else {
        Err(format!("{} not found on PATH", program.display()))
    }
}

/// Runs a command: input on stdin, output from stdout (up to `max_output`), stderr tail on
/// failure, killed at `timeout`.
pub async fn run_command(
    spec: &CommandSpec,
    input: Vec<u8>,
    timeout: Duration,
    max_output: usize,
) -> RunOutcome {
    let Some((program, args)) = spec.command.split_first() else {
        return RunOutcome::Failed {
            error: "empty command".into(),
            output: Vec::new(),
        };
    };
    let mut child = match tokio::process::Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
    {
        Ok(c) => c,
        Err(e) => {
            return RunOutcome::Failed {
                error: format!("cannot start {program}: {e}"),
                output: Vec::new(),
            };
        }
    };
    let mut stdin = child.stdin.take();
    let mut stdout = child.stdout.take();
    let mut stderr = child.stderr.take();
    let work = async {
        let write = async {
            if let Some(mut s) = stdin.take() {
                // A command that ignores its input may close stdin early; that is fine.
                let _ = s.write_all(&input).await;
                let _ = s.shutdown().await;
            }
        };
        let read_out = async {
            let mut out = Vec::new();
            let mut truncated = false;
            if let Some(s) = stdout.as_mut() {
                let mut buf = [0u8; 8192];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            let room = max_output.saturating_sub(out.len());
                            out.extend_from_slice(&buf[..n.min(room)]);
                            truncated |= n > room;
                        }
                    }
                }
            }
            (out, truncated)
        };
        let read_err = async {
            let mut tail = Vec::new();
            if let Some(s) = stderr.as_mut() {
                let mut buf = [0u8; 4096];
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            tail.extend_from_slice(&buf[..n]);
                            if tail.len() > STDERR_TAIL {
                                tail.drain(..tail.len() - STDERR_TAIL);
                            }
                        }
                    }
                }
            }
            tail
        };
        let ((), (out, truncated), tail) = tokio::join!(write, read_out, read_err);
        let status = child.wait().await;
        (status, out, truncated, tail)
    };
    match tokio::time::timeout(timeout, work).await {
        Err(_) => RunOutcome::TimedOut {
            error: format!("{program} did not finish within {} ms", timeout.as_millis()),
        },
        Ok((Err(e), out, _, _)) => RunOutcome::Failed {
            error: format!("waiting for {program}: {e}"),
            output: out,
        },
        Ok((Ok(status), out, truncated, tail)) => {
            let tail = String::from_utf8_lossy(&tail).trim().to_string();
            if status.success() && !truncated {
                RunOutcome::Succeeded(out)
            } else if status.success() {
                RunOutcome::Failed {
                    error: format!("output exceeded {max_output} bytes"),
                    output: out,
                }
            } else {
                let code = status
                    .code()
                    .map_or_else(|| "a signal".to_string(), |c| format!("exit code {c}"));
                let error = if tail.is_empty() {
                    format!("{program} failed with {code}")
                } else {
                    format!("{program} failed with {code}: {tail}")
                };
                RunOutcome::Failed { error, output: out }
            }
        }
    }
}

/// This machine's platform string, e.g. `linux-x86_64`.
pub fn platform() -> String {
    format!("{}-{}", std::env::consts::OS, std::env::consts::ARCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(cmd: &[&str]) -> CommandSpec {
        CommandSpec {
            command: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: None,
            max_output: None,
            description: None,
        }
    }

    #[tokio::test]
    async fn command_gets_json_on_stdin_and_returns_stdout() {
        let out = run_command(
            &spec(&["cat"]),
            b"{\"a\":1}".to_vec(),
            Duration::from_secs(5),
            1024,
        )
        .await;
        assert_eq!(out, RunOutcome::Succeeded(b"{\"a\":1}".to_vec()));
    }

    #[tokio::test]
    async fn failure_carries_the_stderr_tail() {
        let out = run_command(
            &spec(&["sh", "-c", "echo boom >&2; exit 3"]),
            Vec::new(),
            Duration::from_secs(5),
            1024,
        )
        .await;
        match out {
            RunOutcome::Failed { error, .. } => {
                assert!(error.contains("exit code 3"), "{error}");
                assert!(error.contains("boom"), "{error}");
            }
            other => panic!("expected failure, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn timeout_kills_the_command() {
        let started = Instant::now();
        let out = run_command(
            &spec(&["sleep", "10"]),
            Vec::new(),
            Duration::from_millis(200),
            1024,
        )
        .await;
        assert!(matches!(out, RunOutcome::TimedOut { .. }), "{out:?}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn output_over_the_limit_is_a_failure() {
        let out = run_command(
            &spec(&["sh", "-c", "head -c 5000 /dev/zero"]),
            Vec::new(),
            Duration::from_secs(5),
            100,
        )
        .await;
        assert!(
            matches!(out, RunOutcome::Failed { ref error, ref output } if error.contains("exceeded") && output.len() == 100),
            "{out:?}"
        );
    }

    #[test]
    fn missing_programs_are_unavailable() {
        let cap = CommandCap::new("x".into(), spec(&["/nonexistent/prog"])).unwrap();
        assert!(cap.availability().is_err());
        let cap = CommandCap::new("x".into(), spec(&["sh"])).unwrap();
        assert!(cap.availability().is_ok());
        assert!(CommandCap::new("x".into(), spec(&[])).is_err());
    }

    #[test]
    fn open_url_takes_only_http_and_https() {
        assert_eq!(
            parse_url_input(br#"{"url":"https://example.com/x"}"#).unwrap(),
            "https://example.com/x"
        );
        assert_eq!(parse_url_input(br#""http://a""#).unwrap(), "http://a");
        for bad in [
            r#"{"url":"file:///etc/passwd"}"#,
            r#"{"url":"javascript:alert(1)"}"#,
            r#""https://""#,
            "nope",
            r#"{"url":"https://a b"}"#,
        ] {
            assert!(parse_url_input(bad.as_bytes()).is_err(), "{bad}");
        }
    }

    fn facts() -> NodeFacts {
        NodeFacts {
            device_id: "dev".into(),
            name: "kitchen".into(),
            platform: "test-os".into(),
            agent_version: "1.2.3".into(),
            started: Instant::now(),
        }
    }

    async fn run_builtin(name: &str) -> serde_json::Value {
        let cap = Registry::builtins(facts()).get(name).unwrap();
        match cap.run(b"{}".to_vec(), Duration::from_secs(5)).await {
            RunOutcome::Succeeded(out) => serde_json::from_slice(&out).unwrap(),
            other => panic!("{name}: {other:?}"),
        }
    }

    #[tokio::test]
    async fn system_health_and_info_report_the_host_with_the_same_fields() {
        let health = run_builtin("system.health").await;
        assert_eq!(health["status"], "ok");
        assert_eq!(health["agent_version"], "1.2.3");
        for key in [
            "agent_uptime_secs",
            "system_uptime_secs",
            "load_1m",
            "memory_total_bytes",
            "memory_available_bytes",
        ] {
            assert!(
                health.get(key).is_some(),
                "system.health lacks {key}: {health}"
            );
        }
        // This machine has memory and has been up a while; the OS told us so.
        let total = health["memory_total_bytes"].as_u64().unwrap();
        let available = health["memory_available_bytes"].as_u64().unwrap();
        assert!(total > 0 && available <= total, "{health}");
        assert!(
            health["system_uptime_secs"].as_u64().unwrap() > 0,
            "{health}"
        );

        let info = run_builtin("system.info").await;
        assert_eq!(info["os"], std::env::consts::OS);
        assert_eq!(info["arch"], std::env::consts::ARCH);
        assert!(!info["hostname"].as_str().unwrap().is_empty(), "{info}");
        assert_eq!(info["memory"]["total_bytes"], total, "{info}");
        assert!(info["cpus"].as_u64().unwrap() >= 1, "{info}");
        if cfg!(unix) {
            assert_eq!(info["load"].as_array().unwrap().len(), 3, "{info}");
        }
        for key in ["uptime_secs", "load", "memory"] {
            assert!(info.get(key).is_some(), "system.info lacks {key}: {info}");
        }

        let identity = run_builtin("system.identity").await;
        assert_eq!(identity["name"], "kitchen");
        assert_eq!(identity["platform"], "test-os");
    }
}
