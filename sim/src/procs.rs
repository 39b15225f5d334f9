//! The real binaries as child processes, for end-to-end tests and benchmarks.
//!
//! - [`bins`]: `anchord`, `anchor-node`, `anchorctl` and `anchord-demo` from the target
//!   directory of the running test or benchmark (`target/<profile>/`), rebuilt first with
//!   `cargo build --bins` when run under cargo (a no-op when they are fresh), so they match the
//!   code under test.
//! - [`Proc`]: a child whose stdout and stderr are read line by line for its whole life (its
//!   pipes never fill up), which can be waited for, searched, sent SIGTERM, and is killed when
//!   dropped, so a failing test leaves nothing behind.
//! - [`Anchord`]: `anchord` started on loopback port 0 and waited for until its
//!   `anchor ready` line, whose addresses it reads.
//! - Small helpers: [`command`] (a clean environment), [`run`], [`strip_ansi`],
//!   [`free_port`], [`find_in_path`].
//!
//! Every failure here panics with what was expected and the process's output: this module is
//! for tests.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long `anchord` may take to print its ready line.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// How long [`Proc::wait_exit`] waits for the output of an exited process to be read.
pub const READER_GRACE: Duration = Duration::from_secs(2);

/// Lines kept of each stream of a [`Proc`]; older ones are dropped (a benchmark's anchor logs
/// for minutes).
pub const KEEP_LINES: usize = 50_000;

/// Where the binaries are.
#[derive(Debug, Clone)]
pub struct Bins {
    /// `target/<profile>`.
    pub dir: PathBuf,
    /// The anchor daemon.
    pub anchord: PathBuf,
    /// The operator CLI.
    pub anchorctl: PathBuf,
    /// The node agent.
    pub anchor_node: PathBuf,
    /// The demo (`anchord demo` runs it).
    pub anchord_demo: PathBuf,
}

/// The binaries' names, without the platform's suffix.
pub const NAMES: [&str; 4] = ["anchord", "anchorctl", "anchor-node", "anchord-demo"];

/// The binaries next to the running test or benchmark (`target/<profile>/deps/X` →
/// `target/<profile>`), built first when under cargo (`CARGO` is set) or when missing.
pub fn bins() -> &'static Bins {
    static BINS: OnceLock<Bins> = OnceLock::new();
    BINS.get_or_init(|| {
        let exe = std::env::current_exe().expect("the test's own path");
        let dir = exe
            .parent()
            .and_then(Path::parent)
            .unwrap_or_else(|| panic!("unexpected test executable path {}", exe.display()))
            .to_path_buf();
        let path = |n: &str| dir.join(format!("{n}{}", std::env::consts::EXE_SUFFIX));
        let missing = || {
            NAMES
                .iter()
                .filter(|n| !path(n).is_file())
                .copied()
                .collect::<Vec<_>>()
        };
        if let Some(cargo) =
            std::env::var_os("CARGO").or_else(|| (!missing().is_empty()).then(|| "cargo".into()))
        {
            build_bins(&cargo, &dir);
        }
        let missing = missing();
        assert!(
            missing.is_empty(),
            "binaries {missing:?} are missing from {}; build them with `cargo build --bins`",
            dir.display()
        );
        Bins {
            anchord: path("anchord"),
            anchorctl: path("anchorctl"),
            anchor_node: path("anchor-node"),
            anchord_demo: path("anchord-demo"),
            dir,
        }
    })
}

/// `cargo build --bins` of the workspace into `bin_dir`'s profile and target directory.
fn build_bins(cargo: &std::ffi::OsStr, bin_dir: &Path) {
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the sim crate sits in the workspace");
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace)
        .args(["build", "--bins", "--quiet"]);
    // The same features as the test build, or cargo would rebuild the binaries without them.
    if cfg!(feature = "etcd") {
        cmd.args(["--features", "anchorage-sim/etcd"]);
    }
    // Cargo sets these for the test process. Some build scripts (ring's) track
    // CARGO_MANIFEST_DIR, so inheriting them would rebuild half the dependency tree, twice.
    for (key, _) in std::env::vars_os() {
        let Some(key) = key.to_str() else { continue };
        if key.starts_with("CARGO_PKG_")
            || key.starts_with("CARGO_BIN_")
            || matches!(
                key,
                "CARGO_MANIFEST_DIR"
                    | "CARGO_MANIFEST_PATH"
                    | "CARGO_CRATE_NAME"
                    | "CARGO_PRIMARY_PACKAGE"
                    | "CARGO_TARGET_TMPDIR"
                    | "CARGO_RUSTC_CURRENT_DIR"
                    | "OUT_DIR"
            )
        {
            cmd.env_remove(key);
        }
    }
    // The profile and target directory this test was built in: target/<profile>.
    match bin_dir.file_name().and_then(|n| n.to_str()) {
        Some("debug") | None => {}
        Some("release") => {
            cmd.arg("--release");
        }
        Some(other) => {
            cmd.args(["--profile", other]);
        }
    }
    if let Some(target_dir) = bin_dir.parent() {
        cmd.arg("--target-dir").arg(target_dir);
    }
    let status = cmd
        .status()
        .unwrap_or_else(|e| panic!("cannot run `cargo build --bins`: {e}"));
    assert!(status.success(), "`cargo build --bins` failed: {status}");
}

/// A command with a clean environment for our variables (no `ANCHORAGE_URL`,
/// `ANCHORAGE_TOKEN`, `ANCHORAGE_TOKEN_FILE` or `ANCHORAGE_CA_FILE`; anchorctl's contexts
/// file `ANCHORAGE_CONFIG` is `cwd/anchorctl.toml`, not the user's; `RUST_LOG=info`,
/// `NO_COLOR=1`), run in `cwd` so nothing is picked up from the current directory (e.g.
/// `./anchorage-data/owner.token`).
pub fn command(program: &Path, cwd: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(cwd)
        .env_remove("ANCHORAGE_URL")
        .env_remove("ANCHORAGE_TOKEN")
        .env_remove("ANCHORAGE_TOKEN_FILE")
        .env_remove("ANCHORAGE_CA_FILE")
        .env("ANCHORAGE_CONFIG", cwd.join("anchorctl.toml"))
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1");
    cmd
}

/// Runs `cmd` to completion (killed after `limit`) and returns what it printed.
pub fn run(name: &str, cmd: &mut Command, limit: Duration) -> Output {
    Proc::spawn(name, cmd).finish(limit)
}

/// What a finished process printed.
#[derive(Debug)]
pub struct Output {
    /// How it exited.
    pub status: ExitStatus,
    /// Everything on stdout.
    pub stdout: String,
    /// Everything on stderr.
    pub stderr: String,
}

impl Output {
    /// The exit code (`None` when killed by a signal).
    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }

    /// Stdout as one JSON document (panics, showing the output, if it is not).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {self:?}"))
    }
}

/// Lines of one stream, as far as read.
#[derive(Debug, Default)]
struct Lines {
    lines: VecDeque<String>,
    dropped: usize,
}

type Shared = Arc<Mutex<Lines>>;

/// A child process whose output is read line by line (ANSI escapes removed); killed and
/// reaped when dropped.
#[derive(Debug)]
pub struct Proc {
    name: String,
    child: Mutex<Child>,
    stdout: Shared,
    stderr: Shared,
    readers: Vec<JoinHandle<()>>,
}

impl Proc {
    /// Starts `cmd` with stdin closed and both outputs read.
    pub fn spawn(name: &str, cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        let stdout = Shared::default();
        let stderr = Shared::default();
        let mut readers = Vec::new();
        if let Some(pipe) = child.stdout.take() {
            readers.push(collect(pipe, stdout.clone()));
        }
        if let Some(pipe) = child.stderr.take() {
            readers.push(collect(pipe, stderr.clone()));
        }
        Proc {
            name: name.to_string(),
            child: Mutex::new(child),
            stdout,
            stderr,
            readers,
        }
    }

    /// Its name in messages.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Its process id.
    pub fn pid(&self) -> u32 {
        self.lock().id()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Child> {
        self.child.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Its exit status, if it has exited.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        self.lock()
            .try_wait()
            .unwrap_or_else(|e| panic!("waiting for {}: {e}", self.name))
    }

    /// SIGKILL, and reaps it.
    pub fn kill(&self) {
        let mut child = self.lock();
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGTERM: a clean stop.
    pub fn terminate(&self) {
        terminate(self.pid());
    }

    /// Stdout so far (the last [`KEEP_LINES`] lines).
    pub fn stdout(&self) -> String {
        text(&self.stdout)
    }

    /// Stderr so far (the last [`KEEP_LINES`] lines).
    pub fn stderr(&self) -> String {
        text(&self.stderr)
    }

    /// The last 30 lines of each stream, for a failure message.
    pub fn log_tail(&self) -> String {
        let tail = |s: &Shared| {
            let lines = s.lock().unwrap_or_else(|e| e.into_inner());
            let skip = lines.lines.len().saturating_sub(30);
            lines
                .lines
                .iter()
                .skip(skip)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        };
        format!(
            "--- {} stdout ---\n{}\n--- {} stderr ---\n{}",
            self.name,
            tail(&self.stdout),
            self.name,
            tail(&self.stderr)
        )
    }

    /// The first line of stdout, then of stderr, that `f` maps to something.
    pub fn find_line<T>(&self, f: impl Fn(&str) -> Option<T>) -> Option<T> {
        [&self.stdout, &self.stderr].into_iter().find_map(|s| {
            let lines = s.lock().unwrap_or_else(|e| e.into_inner());
            lines.lines.iter().find_map(|l| f(l))
        })
    }

    /// Waits (blocking) for a line that `f` maps to something; panics after `limit` or when
    /// the process exits without printing one.
    pub fn wait_line<T>(&self, limit: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.find_line(&f) {
                return v;
            }
            if self.gave_up(deadline) {
                return self.last_look(&f);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Proc::wait_line`], sleeping on tokio's clock between looks.
    pub async fn wait_line_async<T>(&self, limit: Duration, f: impl Fn(&str) -> Option<T>) -> T {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(v) = self.find_line(&f) {
                return v;
            }
            if self.gave_up(deadline) {
                return self.last_look(&f);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Whether to stop waiting for a line: past the deadline, or the process is gone.
    fn gave_up(&self, deadline: Instant) -> bool {
        Instant::now() >= deadline || self.try_wait().is_some()
    }

    /// A last look once the readers caught up (they may be a line behind), else a panic with
    /// the output.
    fn last_look<T>(&self, f: impl Fn(&str) -> Option<T>) -> T {
        std::thread::sleep(Duration::from_millis(100));
        if let Some(v) = self.find_line(&f) {
            return v;
        }
        panic!(
            "{} did not print what was expected (exit: {:?})\n{}",
            self.name,
            self.try_wait(),
            self.log_tail()
        );
    }

    /// Waits (blocking) for it to exit; panics after `limit`. The readers have drained the
    /// pipes when this returns.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                self.join_readers();
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {limit:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Like [`Proc::wait_exit`], sleeping on tokio's clock.
    pub async fn wait_exit_async(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.try_wait() {
                self.join_readers();
                return status;
            }
            if Instant::now() >= deadline {
                panic!(
                    "{} did not exit within {limit:?}\n{}",
                    self.name,
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Lets the readers reach the end of the pipes. A grandchild that inherited them (a shell's
    /// `sleep`) may keep them open after the process exited: past [`READER_GRACE`] the readers
    /// are left to finish on their own.
    fn join_readers(&mut self) {
        let deadline = Instant::now() + READER_GRACE;
        while self.readers.iter().any(|r| !r.is_finished()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        for r in self.readers.drain(..) {
            if r.is_finished() {
                let _ = r.join();
            }
        }
    }

    /// Waits for it to exit (killing it after `limit`, which fails the test) and returns all
    /// it printed.
    pub fn finish(mut self, limit: Duration) -> Output {
        let status = self.wait_exit(limit);
        Output {
            status,
            stdout: self.stdout(),
            stderr: self.stderr(),
        }
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        // SIGKILL to this pid only (std's kill(2)), never a `kill` command with a negative pid.
        let child = self.child.get_mut().unwrap_or_else(|e| e.into_inner());
        let _ = child.kill();
        let _ = child.wait();
    }
}

fn collect(pipe: impl Read + Send + 'static, into: Shared) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines() {
            let Ok(line) = line else { break };
            let mut lines = into.lock().unwrap_or_else(|e| e.into_inner());
            lines.lines.push_back(strip_ansi(&line));
            if lines.lines.len() > KEEP_LINES {
                lines.lines.pop_front();
                lines.dropped += 1;
            }
        }
    })
}

fn text(s: &Shared) -> String {
    let lines = s.lock().unwrap_or_else(|e| e.into_inner());
    let mut out = String::new();
    for l in &lines.lines {
        out.push_str(l);
        out.push('\n');
    }
    out
}

/// Sends SIGTERM to `pid` (through `kill -s TERM -- PID`: a positive pid after `--`, nothing
/// `kill` could read as a process group or as `-1`).
pub fn terminate(pid: u32) {
    assert!(pid > 1, "refusing to signal pid {pid}");
    let status = Command::new("kill")
        .args(["-s", "TERM", "--", &pid.to_string()])
        .status()
        .unwrap_or_else(|e| panic!("cannot run kill: {e}"));
    assert!(status.success(), "kill -TERM {pid}: {status}");
}

/// Removes ANSI escape sequences (in case a log writer colours its output anyway).
pub fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ ... final byte in @..~
            if chars.next() == Some('[') {
                for c in chars.by_ref() {
                    if ('@'..='~').contains(&c) {
                        break;
                    }
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// What `anchord`'s `anchor ready` log line says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The bound QUIC address.
    pub quic: SocketAddr,
    /// The console's URL, `http://127.0.0.1:PORT`.
    pub console: String,
    /// The owner token's file.
    pub owner_token: PathBuf,
}

impl Ready {
    /// Reads the `anchor ready` line in either log format (text `key=value` or JSON).
    pub fn parse(line: &str) -> Option<Ready> {
        let line = strip_ansi(line);
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
            let f = v.get("fields")?;
            if f.get("message")?.as_str()? != "anchor ready" {
                return None;
            }
            let s = |k: &str| f.get(k)?.as_str().map(str::to_string);
            return Some(Ready {
                quic: s("quic")?.parse().ok()?,
                console: s("console")?,
                owner_token: s("owner_token")?.into(),
            });
        }
        let rest = &line[line.find("anchor ready")?..];
        let field = |key: &str| {
            rest.split_whitespace()
                .find_map(|t| t.strip_prefix(key)?.strip_prefix('='))
                .map(|v| v.trim_matches('"').to_string())
        };
        Some(Ready {
            quic: field("quic")?.parse().ok()?,
            console: field("console")?,
            owner_token: field("owner_token")?.into(),
        })
    }
}

/// A running `anchord`, killed on drop.
#[derive(Debug)]
pub struct Anchord {
    /// The process.
    pub proc: Proc,
    /// What its ready line said.
    pub ready: Ready,
    /// Its data directory.
    pub data_dir: PathBuf,
}

impl Anchord {
    /// Starts `anchord --data-dir DATA --listen LISTEN --console CONSOLE EXTRA...` in `cwd`
    /// and waits (blocking) for its ready line.
    pub fn start(
        data_dir: &Path,
        listen: &str,
        console: &str,
        extra: &[&str],
        cwd: &Path,
    ) -> Anchord {
        let proc = Proc::spawn(
            "anchord",
            &mut Self::command(data_dir, listen, console, extra, cwd),
        );
        let ready = proc.wait_line(READY_TIMEOUT, Ready::parse);
        Anchord {
            proc,
            ready,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// Like [`Anchord::start`], waiting on tokio's clock.
    pub async fn start_async(
        data_dir: &Path,
        listen: &str,
        console: &str,
        extra: &[&str],
        cwd: &Path,
    ) -> Anchord {
        let proc = Proc::spawn(
            "anchord",
            &mut Self::command(data_dir, listen, console, extra, cwd),
        );
        let ready = proc.wait_line_async(READY_TIMEOUT, Ready::parse).await;
        Anchord {
            proc,
            ready,
            data_dir: data_dir.to_path_buf(),
        }
    }

    fn command(
        data_dir: &Path,
        listen: &str,
        console: &str,
        extra: &[&str],
        cwd: &Path,
    ) -> Command {
        let mut cmd = command(&bins().anchord, cwd);
        cmd.arg("--data-dir")
            .arg(data_dir)
            .args(["--listen", listen, "--console", console])
            .args(extra);
        cmd
    }

    /// The owner token, read from its file.
    pub fn owner_token(&self) -> String {
        std::fs::read_to_string(&self.ready.owner_token)
            .unwrap_or_else(|e| panic!("{}: {e}", self.ready.owner_token.display()))
            .trim()
            .to_string()
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free port: {e}"))
}

/// The first `name` on the `PATH`.
pub fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_lines_in_both_log_formats() {
        let text = "2026-01-01T00:00:00Z  INFO anchorage_daemon: anchor ready quic=127.0.0.1:5000 \
                    console=http://127.0.0.1:6000 owner_token=/d/owner.token ca_fingerprint=ab";
        let json = r#"{"timestamp":"x","level":"INFO","fields":{"message":"anchor ready","quic":"127.0.0.1:5000","console":"http://127.0.0.1:6000","owner_token":"/d/owner.token"}}"#;
        let want = Ready {
            quic: "127.0.0.1:5000".parse().unwrap(),
            console: "http://127.0.0.1:6000".into(),
            owner_token: "/d/owner.token".into(),
        };
        assert_eq!(Ready::parse(text), Some(want.clone()));
        assert_eq!(
            Ready::parse(&format!("\u{1b}[32m{text}\u{1b}[0m")),
            Some(want.clone())
        );
        assert_eq!(Ready::parse(json), Some(want));
        assert_eq!(Ready::parse("INFO starting"), None);
        assert_eq!(Ready::parse(r#"{"fields":{"message":"other"}}"#), None);
    }

    #[test]
    fn a_process_is_read_to_the_end_and_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let out = run(
            "sh",
            Command::new("sh")
                .current_dir(dir.path())
                .args(["-c", "echo one; echo two >&2; echo three; exit 3"]),
            Duration::from_secs(10),
        );
        assert_eq!(out.code(), Some(3));
        assert_eq!(out.stdout, "one\nthree\n");
        assert_eq!(out.stderr, "two\n");

        let p = Proc::spawn(
            "sh",
            Command::new("sh").args(["-c", "echo ready; sleep 30"]),
        );
        assert_eq!(
            p.wait_line(Duration::from_secs(10), |l| (l == "ready").then_some(7)),
            7
        );
        p.terminate();
        let mut p = p;
        let stopped = Instant::now();
        let status = p.wait_exit(Duration::from_secs(10));
        assert!(!status.success(), "killed by SIGTERM: {status}");
        // The shell's `sleep` still holds the pipes: waiting does not wait for it.
        assert!(
            stopped.elapsed() < Duration::from_secs(10),
            "{:?}",
            stopped.elapsed()
        );
    }
}
