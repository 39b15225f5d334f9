//! `anchord` as a service, with the real binaries (issue 15, "Operators' habits"): systemd's
//! readiness protocol over a real `NOTIFY_SOCKET`, SIGHUP reloads that keep a real node's
//! session, `anchord check-config`, listeners checked before anything is written, and a first
//! start that does not print the store's own chatter.
//!
//! The binaries are found (and rebuilt when stale) as `binaries.rs` does, through
//! `anchorage_sim::procs`.

#![allow(clippy::unwrap_used)]
#![cfg(unix)]

use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anchorage_sim::procs::{self, Output, Proc, READY_TIMEOUT, Ready, bins, command};
use serde_json::Value;

/// How long a short-lived command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a log line or a state change may take to show.
const SHOW_TIMEOUT: Duration = Duration::from_secs(30);

fn run(name: &str, cmd: &mut Command) -> Output {
    procs::run(name, cmd, COMMAND_TIMEOUT)
}

/// Sends `signal` (`HUP`, `STOP`, `CONT`) to `pid` through `kill -s SIG -- PID`.
fn signal(pid: u32, signal: &str) {
    assert!(pid > 1, "refusing to signal pid {pid}");
    let status = Command::new("kill")
        .args(["-s", signal, "--", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}: {status}");
}

/// A service manager's end of `NOTIFY_SOCKET`: a unix datagram socket in a temporary dir.
struct Notify {
    socket: UnixDatagram,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Notify {
    fn new() -> Notify {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        socket
            .set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        Notify {
            socket,
            path,
            _dir: dir,
        }
    }

    /// The next datagram that contains `what`, with those before it.
    fn wait_for(&self, what: &str, proc: &Proc) -> (String, Vec<String>) {
        let deadline = Instant::now() + SHOW_TIMEOUT;
        let mut before = Vec::new();
        let mut buf = vec![0u8; 4096];
        loop {
            if let Ok(n) = self.socket.recv(&mut buf) {
                let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
                if msg.lines().any(|l| l == what) {
                    return (msg, before);
                }
                before.push(msg);
            }
            assert!(
                Instant::now() < deadline,
                "no {what} on NOTIFY_SOCKET (got {before:?})\n{}",
                proc.log_tail()
            );
        }
    }
}

/// A running anchord started with `--config FILE --data-dir DIR`, with the operator's CLI.
struct Service {
    proc: Proc,
    ready: Ready,
    data_dir: PathBuf,
    scratch: tempfile::TempDir,
}

impl Service {
    fn start(config: &Path, data_dir: &Path, extra: &[&str], env: &[(&str, &Path)]) -> Service {
        let scratch = tempfile::tempdir().unwrap();
        let mut cmd = command(&bins().anchord, scratch.path());
        cmd.arg("--config")
            .arg(config)
            .arg("--data-dir")
            .arg(data_dir)
            .args(extra);
        for (k, v) in env {
            cmd.env(k, v);
        }
        let proc = Proc::spawn("anchord", &mut cmd);
        let ready = proc.wait_line(READY_TIMEOUT, Ready::parse);
        Service {
            proc,
            ready,
            data_dir: data_dir.to_path_buf(),
            scratch,
        }
    }

    fn ctl(&self, args: &[&str]) -> Value {
        let out = run(
            "anchorctl",
            command(&bins().anchorctl, self.scratch.path())
                .args(["--url", &self.ready.console, "--token-file"])
                .arg(self.data_dir.join("owner.token"))
                .arg("--json")
                .args(args),
        );
        assert!(out.status.success(), "anchorctl {args:?}: {out:?}");
        out.json()
    }

    /// Pairs a real `anchor-node` named `name` into `state` and approves it; its device id.
    fn pair(&self, state: &Path, name: &str) -> String {
        let code = self.ctl(&["pair", "code"])["code"]
            .as_str()
            .unwrap()
            .to_string();
        let mut cmd = command(&bins().anchor_node, self.scratch.path());
        cmd.args(["pair", "--anchor", &self.ready.quic.to_string(), "--code"])
            .arg(&code)
            .args(["--name", name, "--json", "--state-dir"])
            .arg(state);
        let pairing = Proc::spawn("anchor-node pair", &mut cmd);
        let deadline = Instant::now() + SHOW_TIMEOUT;
        let request = loop {
            let list = self.ctl(&["pair", "list", "--state", "pending_approval"]);
            if let Some(r) = list
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["device_name"] == name)
            {
                break r["request_id"].as_str().unwrap().to_string();
            }
            assert!(Instant::now() < deadline, "{}", pairing.log_tail());
            std::thread::sleep(Duration::from_millis(50));
        };
        self.ctl(&["pair", "approve", &request]);
        let out = pairing.finish(COMMAND_TIMEOUT);
        assert_eq!(out.code(), Some(0), "{out:?}");
        out.json()["device_id"].as_str().unwrap().to_string()
    }

    /// The node `device` as `anchorctl nodes` shows it.
    fn node(&self, device: &str) -> Value {
        self.ctl(&["nodes"])
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["device_id"] == device)
            .cloned()
            .unwrap_or(Value::Null)
    }

    /// Waits until `f` holds of the node `device`.
    fn wait_node(&self, device: &str, what: &str, f: impl Fn(&Value) -> bool) -> Value {
        let deadline = Instant::now() + SHOW_TIMEOUT;
        loop {
            let n = self.node(device);
            if f(&n) {
                return n;
            }
            assert!(
                Instant::now() < deadline,
                "node never {what}: {n}\n{}",
                self.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Waits for a log line (stderr) that contains every one of `parts`, after `skip` lines.
    fn wait_log(&self, skip: usize, parts: &[&str]) -> String {
        let deadline = Instant::now() + SHOW_TIMEOUT;
        loop {
            let log = self.proc.stderr();
            if let Some(line) = log
                .lines()
                .skip(skip)
                .find(|l| parts.iter().all(|p| l.contains(p)))
            {
                return line.to_string();
            }
            assert!(
                Instant::now() < deadline,
                "no log line with {parts:?}\n{}",
                self.proc.log_tail()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn log_lines(&self) -> usize {
        self.proc.stderr().lines().count()
    }
}

/// Starts `anchor-node run` on `state` and waits until it is connected.
fn run_node(cwd: &Path, state: &Path) -> Proc {
    let mut cmd = command(&bins().anchor_node, cwd);
    cmd.arg("run").arg("--state-dir").arg(state);
    let node = Proc::spawn("anchor-node run", &mut cmd);
    let deadline = Instant::now() + SHOW_TIMEOUT;
    loop {
        let out = run(
            "anchor-node status",
            command(&bins().anchor_node, cwd)
                .args(["status", "--json", "--state-dir"])
                .arg(state),
        );
        if out.status.success() && out.json()["connected"] == true {
            return node;
        }
        assert!(
            Instant::now() < deadline,
            "never connected: {}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

// ---------------------------------------------------------------------------------------------

#[test]
fn anchord_tells_the_service_manager_ready_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anchord.toml");
    write(
        &config,
        "listen = \"127.0.0.1:0\"\nconsole = \"127.0.0.1:0\"\n",
    );
    let notify = Notify::new();
    let anchord = Service::start(
        &config,
        &dir.path().join("data"),
        &[],
        &[("NOTIFY_SOCKET", &notify.path)],
    );
    let (ready, _) = notify.wait_for("READY=1", &anchord.proc);
    assert!(ready.contains("STATUS="), "{ready}");
    // Ready means serving: the console answers.
    assert_eq!(anchord.ctl(&["health"])["status"], "ok");

    // SIGHUP: RELOADING=1 with the monotonic time systemd checks, then READY=1 again.
    signal(anchord.proc.pid(), "HUP");
    let (reloading, _) = notify.wait_for("RELOADING=1", &anchord.proc);
    let usec = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"));
    assert!(usec.parse::<u64>().unwrap() > 0, "{reloading}");
    notify.wait_for("READY=1", &anchord.proc);
    anchord.wait_log(0, &["configuration reloaded", "nothing changed"]);
    assert!(anchord.proc.try_wait().is_none(), "SIGHUP does not end it");

    // SIGTERM: STOPPING=1, then a clean exit.
    anchord.proc.terminate();
    notify.wait_for("STOPPING=1", &anchord.proc);
    let mut proc = anchord.proc;
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
}

#[test]
fn anchor_node_is_ready_for_the_service_manager_once_it_runs() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anchord.toml");
    write(
        &config,
        "listen = \"127.0.0.1:0\"\nconsole = \"127.0.0.1:0\"\n",
    );
    let anchord = Service::start(&config, &dir.path().join("data"), &[], &[]);
    let state = dir.path().join("node");
    anchord.pair(&state, "svc-node");
    let notify = Notify::new();
    let mut cmd = command(&bins().anchor_node, dir.path());
    cmd.arg("run")
        .arg("--state-dir")
        .arg(&state)
        .env("NOTIFY_SOCKET", &notify.path);
    let node = Proc::spawn("anchor-node run", &mut cmd);
    notify.wait_for("READY=1", &node);
    node.terminate();
    notify.wait_for("STOPPING=1", &node);
}

#[test]
fn a_first_start_does_not_log_the_stores_own_lines() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(&bins().anchord, dir.path());
    cmd.env_remove("RUST_LOG")
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--listen", "127.0.0.1:0", "--console", "127.0.0.1:0"]);
    let proc = Proc::spawn("anchord", &mut cmd);
    proc.wait_line(READY_TIMEOUT, Ready::parse);
    proc.terminate();
    let out = proc.finish(Duration::from_secs(15));
    assert!(out.status.success(), "{out:?}");
    let store_lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("fjall") || l.contains("lsm_tree"))
        .collect();
    assert!(store_lines.is_empty(), "{store_lines:#?}");
    assert!(
        out.stderr.contains("created the anchor CA"),
        "{}",
        out.stderr
    );

    // Asked for, they are there.
    let mut cmd = command(&bins().anchord, dir.path());
    cmd.arg("--data-dir")
        .arg(dir.path().join("data2"))
        .args(["--listen", "127.0.0.1:0", "--console", "127.0.0.1:0"])
        .args(["--log-level", "info"]);
    let proc = Proc::spawn("anchord", &mut cmd);
    proc.wait_line(READY_TIMEOUT, Ready::parse);
    proc.terminate();
    let out = proc.finish(Duration::from_secs(15));
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("fjall") || l.contains("lsm_tree")),
        "{}",
        out.stderr
    );
}

#[test]
fn a_port_in_use_fails_the_start_before_anything_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let quic_taken = udp.local_addr().unwrap().to_string();
    let console_taken = tcp.local_addr().unwrap().to_string();
    for (listen, console, taken) in [
        (quic_taken.as_str(), "127.0.0.1:0", &quic_taken),
        ("127.0.0.1:0", console_taken.as_str(), &console_taken),
    ] {
        let data = dir.path().join("data");
        let out = run(
            "anchord",
            command(&bins().anchord, dir.path())
                .arg("--data-dir")
                .arg(&data)
                .args(["--listen", listen, "--console", console]),
        );
        assert!(!out.status.success(), "{out:?}");
        assert!(
            out.stderr.contains(&format!("cannot listen on {taken}")),
            "{}",
            out.stderr
        );
        assert!(
            !data.exists(),
            "nothing created on a failed start: {:?}",
            std::fs::read_dir(&data).map(|d| d.count())
        );
    }
}

#[test]
fn check_config_says_what_a_start_would_say() {
    let dir = tempfile::tempdir().unwrap();
    let check = |args: &[&str]| {
        run(
            "anchord check-config",
            command(&bins().anchord, dir.path())
                .arg("check-config")
                .args(args),
        )
    };
    let start = |args: &[&str]| {
        run(
            "anchord",
            command(&bins().anchord, dir.path())
                .args(args)
                .args(["--data-dir", "data"]),
        )
    };
    let good = dir.path().join("good.toml");
    write(
        &good,
        "stale_after = \"2m\"\nlog_level = \"info,anchorage_daemon=debug\"\n",
    );
    let out = check(&["--config", good.to_str().unwrap()]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stdout.contains("configuration OK"), "{out:?}");
    assert!(out.stdout.contains("good.toml"), "{out:?}");

    let bad = dir.path().join("bad.toml");
    write(&bad, "stale_after = \"soon\"\n");
    let flag_cases: &[(&[&str], &str)] = &[
        (&["--config", bad.to_str().unwrap()], "`stale_after`"),
        // A flag is named as the flag, not as the file's key.
        (
            &["--stale-after", "1s", "--heartbeat-interval", "2s"],
            "`--stale-after`",
        ),
        (&["--log-level", "debgu"], "`--log-level`"),
    ];
    for (args, expect) in flag_cases {
        let checked = check(args);
        assert_eq!(checked.code(), Some(64), "{args:?}: {checked:?}");
        assert!(
            checked.stderr.contains(expect),
            "{args:?}: {}",
            checked.stderr
        );
        let started = start(args);
        assert_eq!(started.code(), Some(64), "{args:?}: {started:?}");
        assert_eq!(
            checked.stderr, started.stderr,
            "the same message as a start"
        );
    }

    let policy = dir.path().join("policy.toml");
    write(
        &policy,
        "[[allow]]\nfrom = \"role in (\"\nto = \"role=b\"\n",
    );
    let out = check(&["--policy-file", policy.to_str().unwrap()]);
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(
        out.stderr.contains("invalid policy file") && out.stderr.contains("line 2"),
        "{}",
        out.stderr
    );
    assert!(!dir.path().join("data").exists(), "nothing written");
}

#[test]
fn sighup_reloads_thresholds_and_log_level_and_keeps_the_session() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anchord.toml");
    let base = "listen = \"127.0.0.1:0\"\nconsole = \"127.0.0.1:0\"\nheartbeat_interval = \"1s\"\n\
                offline_after = \"2h\"\n";
    write(
        &config,
        &format!("{base}stale_after = \"1h\"\nlog_level = \"info\"\n"),
    );
    let anchord = Service::start(&config, &dir.path().join("data"), &[], &[]);
    let state = dir.path().join("node");
    let device = anchord.pair(&state, "reloaded");
    let node = run_node(dir.path(), &state);
    let before = anchord.wait_node(&device, "online", |n| n["presence"] == "online");
    assert!(
        !anchord.proc.stderr().contains("console connection closed"),
        "no debug lines at info"
    );

    // The log level, a threshold and the QUIC address change; SIGHUP.
    write(
        &config,
        "listen = \"127.0.0.1:9\"\nconsole = \"127.0.0.1:0\"\nheartbeat_interval = \"1s\"\n\
         offline_after = \"2h\"\nstale_after = \"3s\"\nlog_level = \"debug\"\n",
    );
    let skip = anchord.log_lines();
    signal(anchord.proc.pid(), "HUP");
    let reloaded = anchord.wait_log(skip, &["configuration reloaded", "changed"]);
    assert!(
        reloaded.contains("log_level") && reloaded.contains("stale_after"),
        "{reloaded}"
    );
    let restart = anchord.wait_log(skip, &["needs a restart"]);
    assert!(restart.contains("listen"), "{restart}");
    // The new level is in force: a console request logs its debug line now.
    anchord.ctl(&["health"]);
    anchord.wait_log(skip, &["DEBUG", "console connection closed"]);

    // The session is the same one: still online, connected since the same moment.
    let after = anchord.node(&device);
    assert_eq!(after["presence"], "online", "{after}");
    assert_eq!(after["connected"], true, "{after}");
    assert_eq!(
        after["connected_since"], before["connected_since"],
        "{after}"
    );
    assert!(!before["connected_since"].is_null(), "{before}");

    // A file that does not load changes nothing, and says why.
    write(&config, &format!("{base}stale_after = \"soon\"\n"));
    let skip = anchord.log_lines();
    signal(anchord.proc.pid(), "HUP");
    let failed = anchord.wait_log(skip, &["configuration reload failed"]);
    assert!(failed.contains("stale_after"), "{failed}");
    assert!(anchord.proc.try_wait().is_none(), "still running");

    // The reloaded threshold is the one in force: a node that stops heartbeating is stale
    // within seconds (it would take an hour under the first file).
    signal(node.pid(), "STOP");
    let stale = anchord.wait_node(&device, "stale", |n| n["presence"] == "stale");
    signal(node.pid(), "CONT");
    assert_eq!(stale["device_id"], device.as_str());
}

#[test]
fn the_policy_file_is_put_in_force_at_start_and_on_sighup_when_it_changed() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("anchord.toml");
    let policy = dir.path().join("policy.toml");
    write(
        &config,
        &format!(
            "listen = \"127.0.0.1:0\"\nconsole = \"127.0.0.1:0\"\npolicy_file = {:?}\n",
            policy.to_str().unwrap()
        ),
    );
    let rule = |caps: &str| {
        format!(
            "[[allow]]\nfrom = \"role=display\"\nto = \"role=camera\"\ncapabilities = [{caps}]\n"
        )
    };
    write(&policy, &rule("\"echo\""));
    let data = dir.path().join("data");
    let anchord = Service::start(&config, &data, &[], &[]);
    let shown = anchord.ctl(&["policy", "show"]);
    assert_eq!(shown["version"], 1, "{shown}");
    assert_eq!(shown["updated_by"], "anchord (policy_file)", "{shown}");
    assert!(shown["text"].as_str().unwrap().contains("echo"), "{shown}");

    // The same content again: no new version.
    let skip = anchord.log_lines();
    signal(anchord.proc.pid(), "HUP");
    anchord.wait_log(skip, &["configuration reloaded"]);
    assert_eq!(anchord.ctl(&["policy", "show"])["version"], 1);

    // Changed: the next version, as `anchorctl policy set` would make.
    write(&policy, &rule("\"echo\", \"system.health\""));
    let skip = anchord.log_lines();
    signal(anchord.proc.pid(), "HUP");
    anchord.wait_log(skip, &["configuration reloaded"]);
    let shown = anchord.ctl(&["policy", "show"]);
    assert_eq!(shown["version"], 2, "{shown}");
    assert!(shown["text"].as_str().unwrap().contains("system.health"));

    // Broken: the reload fails and the policy in force stays.
    write(&policy, "[[allow]]\nfrom = \"role in (\"\n");
    let skip = anchord.log_lines();
    signal(anchord.proc.pid(), "HUP");
    let failed = anchord.wait_log(skip, &["configuration reload failed"]);
    assert!(failed.contains("invalid policy file"), "{failed}");
    assert_eq!(anchord.ctl(&["policy", "show"])["version"], 2);

    // A restart with the file as it was last put in force adds no version.
    write(&policy, &rule("\"echo\", \"system.health\""));
    anchord.proc.terminate();
    let mut proc = anchord.proc;
    assert!(proc.wait_exit(Duration::from_secs(15)).success());
    let again = Service::start(&config, &data, &[], &[]);
    assert_eq!(again.ctl(&["policy", "show"])["version"], 2);
}

/// The unit files pass `systemd-analyze verify` where it is installed (with the binaries'
/// paths pointed at this build); skipped, and says so, where it is not.
#[test]
fn the_unit_files_verify_where_systemd_analyze_is_installed() {
    let Some(analyze) = procs::find_in_path("systemd-analyze") else {
        eprintln!("systemd-analyze is not installed; the unit files were not verified");
        return;
    };
    let dist = Path::new(env!("CARGO_MANIFEST_DIR")).join("../dist/systemd");
    let dir = tempfile::tempdir().unwrap();
    let mut units = Vec::new();
    for (unit, binary) in [
        ("anchord.service", &bins().anchord),
        ("anchor-node.service", &bins().anchor_node),
    ] {
        let text = std::fs::read_to_string(dist.join(unit)).unwrap();
        let installed = format!(
            "/usr/local/bin/{}",
            binary.file_name().unwrap().to_str().unwrap()
        );
        assert!(text.contains(&installed), "{unit} runs {installed}");
        assert!(text.contains("Type=notify"), "{unit}");
        let path = dir.path().join(unit);
        write(&path, &text.replace(&installed, binary.to_str().unwrap()));
        units.push(path);
    }
    let out = run(
        "systemd-analyze verify",
        Command::new(analyze)
            .args(["verify", "--man=no"])
            .args(&units),
    );
    assert!(out.status.success(), "{out:?}");
    assert!(out.stderr.trim().is_empty(), "warnings: {}", out.stderr);
}
