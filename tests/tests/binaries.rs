//! Enrollment end to end with the real binaries over real loopback, as a user runs them:
//! `anchord` in a temporary data directory, `anchorctl` for the operator, `anchor-node` on the
//! device (issue 4); one node running (issue 5); `anchord demo` (issue 6).
//!
//! The binaries are found next to this test's executable (`target/<profile>/`). Under cargo they
//! are (re)built once with `cargo build --bins` first, which is a no-op when they are fresh:
//! `cargo test -p anchorage-tests` alone does not build other packages' binaries, and stale
//! binaries would test old code.

#![allow(clippy::unwrap_used)]

use std::net::UdpSocket;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anchorage_sim::procs::{self, Output, Proc, READY_TIMEOUT, bins, command, strip_ansi};
use serde_json::Value;

/// How long a pairing request may take to show up as pending.
const PENDING_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a short-lived command may run.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

fn run(name: &'static str, cmd: &mut Command) -> Output {
    procs::run(name, cmd, COMMAND_TIMEOUT)
}

// ---------------------------------------------------------------------------------------------
// anchord

/// A running `anchord`, killed on drop, with the operator's CLI at hand.
struct Anchord {
    inner: procs::Anchord,
    quic: std::net::SocketAddr,
    console: String,
    data_dir: PathBuf,
    scratch: tempfile::TempDir,
}

/// Starts anchord on `data_dir` with both sockets on 127.0.0.1 port 0 and waits for its
/// ready line.
fn start_anchord(data_dir: &Path) -> Anchord {
    start_anchord_with(data_dir, &[])
}

/// Like [`start_anchord`], with extra flags.
fn start_anchord_with(data_dir: &Path, extra: &[&str]) -> Anchord {
    let scratch = tempfile::tempdir().unwrap();
    let inner = procs::Anchord::start(
        data_dir,
        "127.0.0.1:0",
        "127.0.0.1:0",
        extra,
        scratch.path(),
    );
    let (quic, console) = (inner.ready.quic, inner.ready.console.clone());
    assert!(console.starts_with("http://127.0.0.1:"), "{console}");
    Anchord {
        inner,
        quic,
        console,
        data_dir: data_dir.to_path_buf(),
        scratch,
    }
}

impl Anchord {
    /// Runs `anchorctl --url … --token-file <data>/owner.token --json <args>`.
    fn ctl_output(&self, args: &[&str]) -> Output {
        run(
            "anchorctl",
            command(&bins().anchorctl, self.scratch.path())
                .args(["--url", &self.console, "--token-file"])
                .arg(self.data_dir.join("owner.token"))
                .arg("--json")
                .args(args),
        )
    }

    /// Like [`Anchord::ctl_output`], expecting success and JSON.
    fn ctl(&self, args: &[&str]) -> Value {
        let out = self.ctl_output(args);
        assert!(
            out.status.success(),
            "anchorctl {args:?} failed: {}",
            out.stderr
        );
        out.json()
    }

    /// Mints a PIN code and returns its `code`.
    fn mint_pin(&self) -> String {
        let code = self.ctl(&["pair", "code"]);
        for key in ["code_id", "code", "method", "expires_at", "uri"] {
            assert!(code.get(key).is_some(), "minted code lacks {key}: {code}");
        }
        assert_eq!(code["method"], "pin");
        let text = code["code"].as_str().unwrap().to_string();
        assert!(
            text.replace('-', "")
                .starts_with(code["code_id"].as_str().unwrap()),
            "the PIN is the code id in groups of four, then the digits: {code}"
        );
        text
    }

    /// Starts `anchor-node pair` for a device named `name` in `state_dir`.
    fn spawn_pair(&self, code: &str, state_dir: &Path, name: &str, json: bool) -> Proc {
        spawn_pair(
            &self.quic.to_string(),
            code,
            state_dir,
            name,
            json,
            self.scratch.path(),
        )
    }

    /// Waits until `anchorctl pair list --state pending_approval` shows `name`'s request.
    fn wait_pending(&self, name: &str) -> Value {
        let deadline = Instant::now() + PENDING_TIMEOUT;
        loop {
            let list = self.ctl(&["pair", "list", "--state", "pending_approval"]);
            if let Some(req) = list
                .as_array()
                .unwrap()
                .iter()
                .find(|r| r["device_name"] == name)
            {
                return req.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no pending request from {name} after {PENDING_TIMEOUT:?}; anchord log:\n{}",
                self.inner.proc.stderr()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends SIGTERM.
    fn terminate(&self) {
        self.inner.proc.terminate();
    }
}

fn spawn_pair(
    anchor: &str,
    code: &str,
    state_dir: &Path,
    name: &str,
    json: bool,
    cwd: &Path,
) -> Proc {
    let mut cmd = command(&bins().anchor_node, cwd);
    cmd.args(["pair", "--anchor", anchor, "--code", code, "--name", name])
        .arg("--state-dir")
        .arg(state_dir);
    if json {
        cmd.arg("--json");
    }
    Proc::spawn("anchor-node pair", &mut cmd)
}

/// The one line `anchor-node` printed on stderr for a failure.
fn one_line_reason(out: &Output) -> &str {
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert_eq!(
        lines.len(),
        1,
        "expected one line on stderr: {:?}",
        out.stderr
    );
    let line = lines[0];
    assert!(line.starts_with("anchor-node: "), "{line}");
    line
}

// ---------------------------------------------------------------------------------------------
// The tests

#[test]
fn pin_pairing_revocation_and_re_pairing_with_the_real_binaries() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");

    // The operator mints a PIN; the device asks to join and waits for approval.
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, &state, "laptop", true);
    let req = anchord.wait_pending("laptop");
    for key in [
        "request_id",
        "device_id",
        "device_name",
        "state",
        "sas",
        "requested_at",
        "expires_at",
    ] {
        assert!(req.get(key).is_some(), "pending request lacks {key}: {req}");
    }
    assert_eq!(req["state"], "pending_approval");
    let request_id = req["request_id"].as_str().unwrap();
    let device_id = req["device_id"].as_str().unwrap().to_string();

    let approved = anchord.ctl(&["pair", "approve", request_id]);
    assert_eq!(approved["state"], "approved", "{approved}");
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let paired = out.json();
    assert_eq!(paired["paired"], true, "{paired}");
    assert_eq!(paired["device_id"], device_id.as_str());

    // Key (0600), certificate and the anchor's CA; the certificate verifies with openssl.
    let verify = Command::new("openssl")
        .args(["verify", "-CAfile"])
        .arg(state.join("ca.pem"))
        .arg(state.join("cert.pem"))
        .output()
        .unwrap();
    assert!(
        verify.status.success(),
        "openssl verify: {}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(state.join("ca.pem")).unwrap(),
        std::fs::read_to_string(anchord.data_dir.join("ca.pem")).unwrap(),
        "the node pinned this anchor's CA"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.join("key.pem"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "key.pem mode {mode:o}");
    }

    // What the node and the console say about it.
    let status = run(
        "anchor-node status",
        command(&bins().anchor_node, node_dir.path())
            .args(["status", "--json", "--state-dir"])
            .arg(&state),
    );
    assert!(status.status.success(), "{status:?}");
    let status = status.json();
    assert_eq!(status["device_id"], device_id.as_str(), "{status}");
    assert_eq!(
        status["anchor"],
        anchord.quic.to_string().as_str(),
        "{status}"
    );
    assert_eq!(status["paired"], true, "{status}");
    assert!(status["cert_expires_at"].is_string(), "{status}");

    let device = anchord.ctl(&["device", "show", &device_id]);
    assert_eq!(device["trust"], "trusted", "{device}");
    assert_eq!(device["name"], "laptop", "{device}");

    // Labels, kubectl-style: set, remove, select; reserved keys are the node's, not ours.
    let labelled = anchord.ctl(&["device", "label", &device_id, "site=lab", "role=camera"]);
    assert_eq!(labelled["labels"]["site"], "lab", "{labelled}");
    let labelled = anchord.ctl(&["device", "label", &device_id, "role-"]);
    assert!(labelled["labels"].get("role").is_none(), "{labelled}");
    let refused = anchord.ctl_output(&["device", "label", &device_id, "node.anchorage/os=beos"]);
    assert_eq!(refused.status.code(), Some(64), "{refused:?}");
    assert!(refused.stderr.contains("reserved"), "{refused:?}");
    let bad = anchord.ctl_output(&["device", "label", &device_id, "site"]);
    assert_eq!(bad.status.code(), Some(64), "{bad:?}");
    let inventory = anchord.ctl(&["inventory", "-l", "site=lab"]);
    assert_eq!(
        inventory["devices"].as_array().unwrap().len(),
        1,
        "{inventory}"
    );
    assert_eq!(
        inventory["devices"][0]["labels"]["site"], "lab",
        "{inventory}"
    );
    let none = anchord.ctl(&["device", "list", "-l", "site!=lab"]);
    assert_eq!(none.as_array().unwrap().len(), 0, "{none}");
    let trusted = anchord.ctl(&["inventory", "-l", "site=lab", "--trust", "trusted"]);
    assert_eq!(trusted["devices"].as_array().unwrap().len(), 1, "{trusted}");
    let revoked = anchord.ctl(&["device", "list", "-l", "site=lab", "--trust", "revoked"]);
    assert_eq!(revoked.as_array().unwrap().len(), 0, "{revoked}");
    let bad = anchord.ctl_output(&["inventory", "-l", "site in lab"]);
    assert_eq!(bad.status.code(), Some(1), "{bad:?}");
    assert!(bad.stderr.contains("at character 9"), "{bad:?}");
    // The request ends completed once the node has its files.
    let deadline = Instant::now() + PENDING_TIMEOUT;
    loop {
        let r = anchord.ctl(&["pair", "show", request_id]);
        if r["state"] == "completed" {
            break;
        }
        assert!(Instant::now() < deadline, "request never completed: {r}");
        std::thread::sleep(Duration::from_millis(50));
    }

    // Revoked: the console says so, and the same device cannot pair again with a new code.
    let revoked = anchord.ctl(&["device", "revoke", &device_id, "--reason", "lost"]);
    assert_eq!(revoked["trust"], "revoked", "{revoked}");
    let device = anchord.ctl(&["device", "show", &device_id]);
    assert_eq!(device["trust"], "revoked", "{device}");
    assert_eq!(device["revoked_reason"], "lost", "{device}");
    let code = anchord.mint_pin();
    let out = anchord
        .spawn_pair(&code, &state, "laptop", false)
        .finish(COMMAND_TIMEOUT);
    assert_ne!(out.code(), Some(0), "{out:?}");
    let reason = one_line_reason(&out);
    assert!(reason.contains("revoked"), "{reason}");

    // Removed: now it may pair again, keeping its device id. Without --json the node shows the
    // SAS a person compares with the console.
    let removed = anchord.ctl(&["device", "remove", &device_id]);
    assert_eq!(removed["removed"], true, "{removed}");
    let gone = anchord.ctl_output(&["device", "show", &device_id]);
    assert_eq!(gone.code(), Some(1), "{gone:?}");
    assert!(gone.stderr.contains("not_found"), "{gone:?}");
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, &state, "laptop", false);
    let req = anchord.wait_pending("laptop");
    assert_eq!(
        req["device_id"],
        device_id.as_str(),
        "same key, same device id"
    );
    let sas = req["sas"].as_str().unwrap().to_string();
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stderr.contains(&sas),
        "the node showed the console's SAS {sas}: {}",
        out.stderr
    );
    assert!(out.stdout.contains(&device_id), "{}", out.stdout);
    let device = anchord.ctl(&["device", "show", &device_id]);
    assert_eq!(device["trust"], "trusted", "{device}");

    // The audit log tells the device's story, newest first, each decision with its actor.
    let audit = anchord.ctl(&["audit", "--target", &device_id]);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    assert_eq!(
        actions,
        [
            "pairing.approve",
            "pairing.request",
            "device.remove",
            "device.revoke",
            "device.label",
            "device.label",
            "pairing.approve",
            "pairing.request",
        ],
        "{audit:#}"
    );
    let revoke = &audit[3];
    assert_eq!(revoke["detail"], "lost", "{revoke}");
    assert!(
        revoke["actor"].as_str().unwrap().starts_with("owner"),
        "{revoke}"
    );
    for key in ["at", "actor", "action", "target", "detail"] {
        assert!(
            revoke.get(key).is_some(),
            "audit entry lacks {key}: {revoke}"
        );
    }
    let last = anchord.ctl(&["audit", "--limit", "1"]);
    assert_eq!(last.as_array().unwrap().len(), 1, "{last}");
}

#[test]
fn wrong_pins_burn_the_code_and_a_rejection_reaches_the_node() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");

    let code = anchord.mint_pin();
    let (grouped_id, digits) = code.rsplit_once('-').unwrap();
    let code_id = grouped_id.replace('-', "");
    let wrong = format!(
        "{grouped_id}-{}",
        if digits == "000000" {
            "111111"
        } else {
            "000000"
        }
    );

    // Two wrong guesses: refused with a one-line reason, the code still counts them.
    for _ in 0..2 {
        let out = anchord
            .spawn_pair(&wrong, &state, "guesser", true)
            .finish(COMMAND_TIMEOUT);
        assert_eq!(out.code(), Some(1), "{out:?}");
        assert!(
            one_line_reason(&out).starts_with("anchor-node: wrong pairing code"),
            "{out:?}"
        );
        assert_eq!(out.json()["paired"], false);
    }
    let code_info = || {
        anchord
            .ctl(&["pair", "codes"])
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["code_id"] == code_id.as_str())
            .unwrap()
            .clone()
    };
    let info = code_info();
    assert_eq!(info["failed_attempts"], 2, "{info}");
    assert_eq!(info["state"], "active", "{info}");
    // A third from the same address is refused before it counts: one place cannot burn a
    // code (docs/security.md). The refusal says when to come back.
    let out = anchord
        .spawn_pair(&wrong, &state, "guesser", false)
        .finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    let reason = one_line_reason(&out);
    assert!(
        reason.contains("too many wrong attempts at this code from this address")
            && reason.contains("try again in"),
        "{out:?}"
    );
    let info = code_info();
    assert_eq!(info["failed_attempts"], 2, "not counted: {info}");
    assert!(
        !state.join("cert.pem").exists(),
        "no certificate without a pairing"
    );

    // A rejected request: the node exits non-zero with the operator's reason.
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, &state, "stranger", false);
    let req = anchord.wait_pending("stranger");
    let rejected = anchord.ctl(&[
        "pair",
        "reject",
        req["request_id"].as_str().unwrap(),
        "--reason",
        "not ours",
    ]);
    assert_eq!(rejected["state"], "rejected", "{rejected}");
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(1), "{out:?}");
    // Without a terminal (no spinner) it still said once what it waited for.
    assert_eq!(
        out.stderr
            .matches("Waiting for the operator's approval")
            .count(),
        1,
        "{out:?}"
    );
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("anchor-node: "))
        .collect();
    assert_eq!(lines.len(), 1, "{out:?}");
    assert!(
        lines[0].contains("rejected") && lines[0].contains("not ours"),
        "{out:?}"
    );
    assert!(
        !state.join("cert.pem").exists(),
        "no certificate after a rejection"
    );
    let status = run(
        "anchor-node status",
        command(&bins().anchor_node, node_dir.path())
            .args(["status", "--json", "--state-dir"])
            .arg(&state),
    )
    .json();
    assert_eq!(status["paired"], false, "{status}");
    assert!(status["pending_request"].is_null(), "{status}");
}

#[test]
fn pairing_with_an_unreachable_anchor_fails_with_the_address() {
    // A UDP port that swallows everything: no ICMP error, just silence.
    let black_hole = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = black_hole.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    bins(); // a build, if one is needed, does not count
    let started = Instant::now();
    let out = spawn_pair(
        &addr.to_string(),
        "AAAA-123456",
        &dir.path().join("state"),
        "lonely",
        false,
        dir.path(),
    )
    .finish(Duration::from_secs(60));
    let took = started.elapsed();
    assert_eq!(out.code(), Some(69), "exit 69 (unavailable): {out:?}");
    let reason = one_line_reason(&out);
    assert!(
        reason.contains(&format!("cannot reach the anchor at {addr}")),
        "{reason}"
    );
    // The handshake timeout (30 s) plus a little; not minutes of retries.
    assert!(took < Duration::from_secs(45), "took {took:?}");
    drop(black_hole);
}

#[test]
fn pairing_with_a_closed_port_says_so_before_the_handshake_timeout() {
    // Nothing bound: the host answers ICMP port unreachable.
    let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
    let addr = closed.local_addr().unwrap();
    drop(closed);
    let dir = tempfile::tempdir().unwrap();
    bins();
    let out = spawn_pair(
        &addr.to_string(),
        "AAAA-123456",
        &dir.path().join("state"),
        "lonely",
        false,
        dir.path(),
    )
    .finish(Duration::from_secs(60));
    assert_eq!(out.code(), Some(69), "{out:?}");
    let reason = one_line_reason(&out);
    assert!(
        reason.contains(&format!("cannot reach the anchor at {addr}"))
            && reason.contains(&format!("nothing listens on UDP port {}", addr.port())),
        "{reason}"
    );
}

#[test]
fn pair_without_a_port_assumes_the_default_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let out = spawn_pair(
        "127.0.0.1",
        "AAAA-123456",
        &dir.path().join("state"),
        "lonely",
        false,
        dir.path(),
    )
    .finish(Duration::from_secs(60));
    assert!(
        out.stderr.contains(
            "--anchor 127.0.0.1 has no port; using 127.0.0.1:7444, the anchor's default QUIC port"
        ),
        "{out:?}"
    );
    // Whatever is on that port here, the pairing did not happen (the code is made up).
    assert_ne!(out.code(), Some(0), "{out:?}");
    assert_ne!(out.code(), Some(64), "the address was taken: {out:?}");
}

#[test]
fn a_second_anchord_on_the_same_data_dir_is_refused_and_sigterm_stops_cleanly() {
    let data = tempfile::tempdir().unwrap();
    let dir = data.path().join("anchor");
    let first = start_anchord(&dir);
    for file in ["ca.pem", "ca.key", "owner.token"] {
        assert!(dir.join(file).is_file(), "{file} created at first start");
    }

    let second = run(
        "second anchord",
        command(&bins().anchord, first.scratch.path())
            .arg("--data-dir")
            .arg(&dir)
            .args(["--listen", "127.0.0.1:0", "--console", "127.0.0.1:0"]),
    );
    assert!(!second.status.success(), "{second:?}");
    assert_ne!(
        second.code(),
        Some(64),
        "a locked store is not a usage error"
    );
    let message = strip_ansi(&second.stderr);
    assert!(
        message.contains("locked by another anchord"),
        "clear error: {message}"
    );

    // The first is unharmed.
    let health = first.ctl(&["health"]);
    assert_eq!(health["status"], "ok", "{health}");

    // SIGTERM: a clean stop, exit 0.
    first.terminate();
    let mut proc = first.inner.proc;
    // Panics if it has not stopped within 15 s; the log is read to its end when it returns.
    let status = proc.wait_exit(Duration::from_secs(15));
    assert!(status.success(), "exit after SIGTERM: {status}");
    let log = proc.stderr();
    assert!(log.contains("stopped"), "{log}");
    // The store can be opened again at once.
    let again = start_anchord(&dir);
    assert_eq!(again.ctl(&["health"])["status"], "ok");
}

#[test]
fn bad_configuration_exits_64_with_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, &str, &str)] = &[
        (
            "unknown-key.toml",
            "listn = \"127.0.0.1:0\"\n",
            "unknown field `listn`",
        ),
        ("bad-addr.toml", "listen = \"nowhere\"\n", "`listen`"),
        (
            "bad-duration.toml",
            "heartbeat_interval = \"soon\"\n",
            "`heartbeat_interval`",
        ),
        ("not-toml.toml", "listen = \n", "invalid config file"),
    ];
    for (file, text, expect) in cases {
        let path = dir.path().join(file);
        std::fs::write(&path, text).unwrap();
        let out = run(
            "anchord --config",
            command(&bins().anchord, dir.path())
                .arg("--config")
                .arg(&path)
                .arg("--data-dir")
                .arg(dir.path().join("data")),
        );
        assert_eq!(out.code(), Some(64), "{file}: {out:?}");
        assert!(out.stderr.contains(expect), "{file}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("anchord: "),
            "{file}: {}",
            out.stderr
        );
    }
    let missing = dir.path().join("missing.toml");
    let out = run(
        "anchord --config",
        command(&bins().anchord, dir.path())
            .arg("--config")
            .arg(&missing),
    );
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(out.stderr.contains("missing.toml"), "{}", out.stderr);
    // A bad flag value is the same kind of mistake.
    let out = run(
        "anchord --listen",
        command(&bins().anchord, dir.path())
            .args(["--listen", "nope", "--data-dir"])
            .arg(dir.path().join("data")),
    );
    assert_eq!(out.code(), Some(64), "{out:?}");
    assert!(
        !dir.path().join("data").exists(),
        "nothing written on a bad config"
    );
}

#[test]
fn qr_pairing_pins_the_anchor_ca() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");
    let minted = anchord.ctl(&["pair", "code", "--method", "qr"]);
    assert_eq!(minted["method"], "qr", "{minted}");
    let uri = minted["uri"].as_str().unwrap().to_string();
    assert!(uri.starts_with("anchorage://pair?"), "{uri}");
    assert!(
        uri.contains(&anchord.quic.to_string()),
        "the URI carries the anchor address: {uri}"
    );

    // The same code with another CA fingerprint: the handshake fails, nothing is consumed.
    let fp = uri.rsplit("fp=").next().unwrap().to_string();
    assert_eq!(fp.len(), 64, "{uri}");
    let forged = uri.replace(&fp, &"0".repeat(64));
    let out = Proc::spawn(
        "anchor-node pair --qr",
        command(&bins().anchor_node, node_dir.path())
            .args(["pair", "--qr", &forged, "--state-dir"])
            .arg(&state),
    )
    .finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(69), "{out:?}");
    let reason = one_line_reason(&out);
    assert!(reason.contains("invalid peer certificate"), "{reason}");

    // The real URI needs no --anchor: it carries the address.
    let pairing = Proc::spawn(
        "anchor-node pair --qr",
        command(&bins().anchor_node, node_dir.path())
            .args([
                "pair",
                "--json",
                "--name",
                "kiosk",
                "--qr",
                &uri,
                "--state-dir",
            ])
            .arg(&state),
    );
    let req = anchord.wait_pending("kiosk");
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.json()["paired"], true);
    assert_eq!(
        std::fs::read_to_string(state.join("ca.pem")).unwrap(),
        std::fs::read_to_string(anchord.data_dir.join("ca.pem")).unwrap()
    );
}

/// Issue 5 with the real binaries: `anchord`, one `anchor-node run`, and `anchorctl invoke …
/// system.health` succeeds while `anchorctl inventory --json` shows the device online and
/// trusted; a clean stop of the node shows it offline at once.
#[test]
fn a_running_node_answers_system_health_and_is_online_in_the_inventory() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord_with(&data.path().join("anchor"), &["--heartbeat-interval", "1s"]);
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, &state, "worker", true);
    let req = anchord.wait_pending("worker");
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let device_id = out.json()["device_id"].as_str().unwrap().to_string();

    let mut run_cmd = command(&bins().anchor_node, node_dir.path());
    run_cmd.arg("run").arg("--state-dir").arg(&state);
    let node = Proc::spawn("anchor-node run", &mut run_cmd);

    // The inventory shows the device online and trusted.
    let deadline = Instant::now() + Duration::from_secs(30);
    let entry = loop {
        let inv = anchord.ctl(&["inventory"]);
        for key in ["summary", "devices", "instances"] {
            assert!(inv.get(key).is_some(), "inventory lacks {key}: {inv}");
        }
        let found = inv["devices"]
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["device_id"] == device_id.as_str())
            .cloned();
        if let Some(d) = found.filter(|d| d["presence"] == "online") {
            break d;
        }
        assert!(Instant::now() < deadline, "never online: {inv}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(entry["trust"], "trusted", "{entry}");
    // The table for people, piped: the presence word without colour escapes, also by name.
    let out = run(
        "anchorctl",
        command(&bins().anchorctl, anchord.scratch.path())
            .args(["--url", &anchord.console, "--token-file"])
            .arg(anchord.data_dir.join("owner.token"))
            .args(["inventory", "show", "worker"]),
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout.contains("online") && out.stdout.contains(&device_id),
        "{out:?}"
    );
    assert!(
        !out.stdout.contains('\u{1b}'),
        "no escapes when piped: {:?}",
        out.stdout
    );
    // The node's status tells times as RFC 3339, like everything else.
    let deadline = Instant::now() + Duration::from_secs(30);
    let since = loop {
        let status = node_status(node_dir.path(), &state);
        if let Some(since) = status["connected_since"].as_str() {
            break since.to_string();
        }
        assert!(Instant::now() < deadline, "no connected_since: {status}");
        std::thread::sleep(Duration::from_millis(200));
    };
    // `2025-01-02T03:04:05.123Z`, not epoch milliseconds.
    assert!(
        since.len() >= 20 && since.as_bytes()[10] == b'T' && since.ends_with('Z'),
        "{since}"
    );
    for key in [
        "name",
        "heartbeat_age_ms",
        "loss_rate",
        "rtt_ms",
        "capabilities",
        "warnings",
    ] {
        assert!(
            entry.get(key).is_some(),
            "inventory device lacks {key}: {entry}"
        );
    }
    let caps = &entry["capabilities"];
    assert!(
        caps["total"].as_u64().unwrap() >= 4 && caps["unavailable"] == 0,
        "{caps}"
    );

    // system.health runs on the node.
    let out = anchord.ctl_output(&["invoke", &device_id, "system.health", "--timeout", "20s"]);
    assert_eq!(out.code(), Some(0), "anchorctl invoke: {out:?}");
    let inv = out.json();
    for key in ["invocation_id", "state", "output", "error"] {
        assert!(inv.get(key).is_some(), "invocation lacks {key}: {inv}");
    }
    assert_eq!(inv["state"], "succeeded", "{inv}");
    assert_eq!(inv["output"]["status"], "ok", "{inv}");
    let shown = anchord.ctl(&["invocation", "show", inv["invocation_id"].as_str().unwrap()]);
    assert_eq!(shown["state"], "succeeded");
    // An unknown capability is rejected at once, and anchorctl says so with its exit code.
    let out = anchord.ctl_output(&["invoke", &device_id, "no.such.capability"]);
    assert_ne!(out.code(), Some(0));
    assert_eq!(out.json()["state"], "rejected");

    // A batch on a selector, with the `--json` fields scripts read.
    anchord.ctl(&["device", "label", &device_id, "site=lab", "role=worker"]);
    let out = anchord.ctl_output(&[
        "invoke",
        "-l",
        "site=lab",
        "system.health",
        "--timeout",
        "20s",
    ]);
    assert_eq!(out.code(), Some(0), "anchorctl invoke -l: {out:?}");
    let batch = out.json();
    for key in [
        "batch_id",
        "selector",
        "capability",
        "total",
        "succeeded",
        "failed",
        "timed_out",
        "rejected",
        "pending",
        "invocations",
    ] {
        assert!(batch.get(key).is_some(), "batch lacks {key}: {batch}");
    }
    assert_eq!(
        (batch["total"].as_u64(), batch["succeeded"].as_u64()),
        (Some(1), Some(1)),
        "{batch}"
    );
    assert_eq!(batch["selector"], "site=lab");
    let member = &batch["invocations"][0];
    for key in [
        "device_id",
        "name",
        "invocation_id",
        "state",
        "output",
        "error",
    ] {
        assert!(
            member.get(key).is_some(),
            "batch invocation lacks {key}: {member}"
        );
    }
    assert_eq!(member["device_id"], device_id.as_str());
    assert_eq!(member["output"]["status"], "ok", "{member}");
    let batch_id = batch["batch_id"].as_str().unwrap();
    let shown = anchord.ctl(&["batch", "show", batch_id]);
    assert_eq!(shown["succeeded"], 1);
    let listed = anchord.ctl(&["batch", "list"]);
    assert_eq!(listed[0]["batch_id"], batch_id);
    // Exit code 1 unless every invocation succeeded; --async returns at once with 0.
    let out = anchord.ctl_output(&["invoke", "-l", "role=worker", "no.such.capability"]);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert_eq!(out.json()["rejected"], 1);
    let out = anchord.ctl_output(&["invoke", "-l", "site=lab", "echo", "--async"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.json()["pending"], 1);
    // A device id with -l is a usage error, named.
    let out = anchord.ctl_output(&["invoke", "-l", "site=lab", &device_id, "echo"]);
    assert_eq!(out.code(), Some(2), "{out:?}");
    assert!(out.stderr.contains("only the CAPABILITY"), "{}", out.stderr);

    // A scoped token runs what its patterns allow on its devices, and is told why not.
    let made = anchord.ctl(&[
        "token",
        "create",
        "--perm",
        "observability.read",
        "--perm",
        "nodes.invoke",
        "--selector",
        "site=lab",
        "--capability",
        "system.*",
        "--name",
        "lab-ops",
        "--expires",
        "30d",
    ]);
    assert_eq!(made["scope"]["selector"], "site=lab", "{made}");
    let token_file = node_dir.path().join("lab-ops.token");
    std::fs::write(&token_file, made["token"].as_str().unwrap()).unwrap();
    let scoped = |args: &[&str]| {
        run(
            "anchorctl (scoped)",
            command(&bins().anchorctl, node_dir.path())
                .args(["--url", &anchord.console, "--json", "--token-file"])
                .arg(&token_file)
                .args(args),
        )
    };
    let out = scoped(&["invoke", &device_id, "system.health"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let out = scoped(&["invoke", &device_id, "echo"]);
    assert_eq!(out.code(), Some(77), "{out:?}");
    assert!(
        out.stderr.contains("out_of_scope") && out.stderr.contains("system.*"),
        "{}",
        out.stderr
    );
    let tokens = anchord.ctl(&["token", "list"]);
    let lab_ops = tokens
        .as_array()
        .unwrap()
        .iter()
        .find(|t| t["name"] == "lab-ops")
        .unwrap();
    assert!(lab_ops["expires_at"].is_string(), "{lab_ops}");
    assert!(lab_ops["last_used_at"].is_string(), "{lab_ops}");
    assert_eq!(lab_ops["scope"]["capabilities"][0], "system.*");

    // While it runs, `anchor-node status` shows the link (refreshed every 2 s by the agent).
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        let status = run(
            "anchor-node status",
            command(&bins().anchor_node, node_dir.path())
                .args(["status", "--json", "--state-dir"])
                .arg(&state),
        )
        .json();
        if status["loss_rate"].is_f64() || Instant::now() >= deadline {
            break status;
        }
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(status["paired"], true, "{status}");
    assert_eq!(status["running"], true, "{status}");
    assert_eq!(status["connected"], true, "{status}");
    assert!(status["rtt_ms"].as_f64().is_some(), "{status}");
    assert!(status["loss_rate"].as_f64().is_some(), "{status}");

    // A clean stop (SIGTERM) sends `stopping`: offline at once, not after the thresholds.
    node.terminate();
    let out = node.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "anchor-node run exit: {out:?}");
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let shown = anchord.ctl(&["inventory", "show", &device_id]);
        if shown["presence"] == "offline" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not offline after a clean stop: {shown}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A pairing whose `anchor-node pair` was stopped while it waited resumes when the command
/// runs again without a code, and completes once approved.
#[test]
fn a_stopped_pairing_resumes_when_run_again_without_a_code() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");
    let code = anchord.mint_pin();
    let first = anchord.spawn_pair(&code, &state, "impatient", true);
    let req = anchord.wait_pending("impatient");
    first.kill();
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);

    let mut cmd = command(&bins().anchor_node, node_dir.path());
    cmd.args(["pair", "--json", "--state-dir"]).arg(&state);
    let out = Proc::spawn("anchor-node pair (resume)", &mut cmd).finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let paired = out.json();
    assert_eq!(paired["paired"], true, "{paired}");
    assert_eq!(paired["device_id"], req["device_id"], "{paired}");
    assert!(state.join("cert.pem").exists());
    // Nothing left to resume: without a code it is a usage error now.
    let mut cmd = command(&bins().anchor_node, node_dir.path());
    cmd.args(["pair", "--state-dir"]).arg(&state);
    let out = Proc::spawn("anchor-node pair (nothing)", &mut cmd).finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(64), "{out:?}");
}

#[test]
fn the_demo_runs_simulated_nodes_behind_a_live_console() {
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = command(&bins().anchord, dir.path());
    cmd.args(["demo", "--nodes", "3", "--preset", "lan", "--data-dir"])
        .arg(dir.path().join("demo-data"))
        .args(["--console", "127.0.0.1:0"]);
    // Both pipes are drained for the process's whole life, so its output never blocks it.
    let mut demo = Proc::spawn("anchord demo", &mut cmd);
    let log_text = || format!("{}{}", demo.stdout(), demo.stderr());

    // The console address and the owner token, as a newcomer reads them off the terminal
    // (panics with the demo's output if they do not show within READY_TIMEOUT).
    let console = demo.wait_line(READY_TIMEOUT, |line| {
        let v = line.trim().strip_prefix("Console:")?;
        Some(v.trim().trim_end_matches('/').to_string())
    });
    let token = demo.wait_line(READY_TIMEOUT, |line| {
        Some(line.trim().strip_prefix("Owner token:")?.trim().to_string())
    });
    let ctl = |args: &[&str]| {
        run(
            "anchorctl",
            command(&bins().anchorctl, dir.path())
                .args(["--url", &console, "--token", &token, "--json"])
                .args(args),
        )
    };

    // Three paired, trusted nodes; the first offers a capability whose program is missing and
    // shows `degraded`, the others `online`.
    let deadline = Instant::now() + Duration::from_secs(60);
    let devices = loop {
        let out = ctl(&["inventory"]);
        assert_eq!(out.code(), Some(0), "{out:?}");
        let devices = out.json()["devices"].as_array().unwrap().clone();
        let presence = |p: &str| devices.iter().filter(|d| d["presence"] == p).count();
        if devices.len() == 3 && presence("online") == 2 && presence("degraded") == 1 {
            break devices;
        }
        assert!(
            Instant::now() < deadline,
            "the demo's nodes never came up: {devices:#?}\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(250));
    };
    assert!(
        devices.iter().all(|d| d["trust"] == "trusted"),
        "{devices:#?}"
    );
    let id = |presence: &str| {
        devices.iter().find(|d| d["presence"] == presence).unwrap()["device_id"]
            .as_str()
            .unwrap()
            .to_string()
    };

    // The nodes answer through the console.
    let out = ctl(&["invoke", &id("online"), "system.health", "--timeout", "20s"]);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert_eq!(out.json()["state"], "succeeded", "{out:?}");
    let out = ctl(&["invoke", &id("degraded"), "camera.snapshot"]);
    assert_eq!(out.json()["state"], "rejected", "{out:?}");
    assert_ne!(out.code(), Some(0), "{out:?}");

    // Ctrl-C (SIGTERM here) ends it cleanly: `anchord` became the demo (exec), so the signal
    // reaches it directly.
    demo.terminate();
    let asked = Instant::now();
    let status = demo.wait_exit(Duration::from_secs(15));
    eprintln!("the demo stopped {:?} after SIGTERM", asked.elapsed());
    assert!(
        status.success(),
        "{status}\n{}{}",
        demo.stdout(),
        demo.stderr()
    );
    // And says so.
    assert!(
        demo.stdout().contains("Anchorage demo stopped."),
        "{}{}",
        demo.stdout(),
        demo.stderr()
    );
}

/// `anchord demo` is the sibling `anchord-demo`: its help shows the demo's flags, and without
/// the sibling `anchord` says how to build it and exits 69 (unavailable).
#[test]
fn anchord_demo_runs_the_sibling_binary_and_says_how_to_build_it_when_missing() {
    let dir = tempfile::tempdir().unwrap();
    let help = run(
        "anchord demo --help",
        command(&bins().anchord, dir.path()).args(["demo", "--help"]),
    );
    assert_eq!(help.code(), Some(0), "{help:?}");
    for flag in ["--nodes", "--preset", "--seed", "--data-dir", "--console"] {
        assert!(help.stdout.contains(flag), "{flag} in {}", help.stdout);
    }
    assert!(help.stdout.contains("anchord demo"), "{}", help.stdout);
    // A bad flag value of the demo is a usage error, as it was in anchord itself.
    let bad = run(
        "anchord demo --preset",
        command(&bins().anchord, dir.path()).args(["--data-dir", "x", "demo", "--preset", "moon"]),
    );
    assert_eq!(bad.code(), Some(64), "{bad:?}");
    assert!(bad.stderr.starts_with("anchord demo: "), "{}", bad.stderr);

    // A copy of anchord alone in a directory.
    let lonely = dir
        .path()
        .join(format!("anchord{}", std::env::consts::EXE_SUFFIX));
    std::fs::copy(&bins().anchord, &lonely).unwrap();
    let out = run(
        "anchord demo (no sibling)",
        command(&lonely, dir.path()).args(["demo", "--nodes", "2"]),
    );
    assert_eq!(out.code(), Some(69), "{out:?}");
    assert!(
        out.stderr.contains("anchord-demo")
            && out
                .stderr
                .contains("cargo build --release -p anchorage-sim"),
        "{}",
        out.stderr
    );
    assert!(
        !dir.path().join("anchorage-demo-data").exists(),
        "nothing started without the demo"
    );
}

/// The reported reconnect bug, as a user hit it: `kill -9` a running node, wait until the
/// inventory says `offline`, `anchorctl invoke --async`, start `anchor-node run` again at once.
/// The invocation must reach the node's new session and succeed, not stay `queued` until its
/// deadline.
#[test]
fn work_queued_for_a_killed_node_reaches_it_when_it_runs_again() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord_with(
        &data.path().join("anchor"),
        &[
            "--heartbeat-interval",
            "1s",
            "--stale-after",
            "3s",
            "--offline-after",
            "6s",
        ],
    );
    let node_dir = tempfile::tempdir().unwrap();
    let state = node_dir.path().join("state");
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, &state, "killed", true);
    let req = anchord.wait_pending("killed");
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let device_id = out.json()["device_id"].as_str().unwrap().to_string();
    let run_node = || {
        let mut cmd = command(&bins().anchor_node, node_dir.path());
        cmd.arg("run").arg("--state-dir").arg(&state);
        Proc::spawn("anchor-node run", &mut cmd)
    };
    let presence = || {
        let shown = anchord.ctl(&["inventory", "show", &device_id]);
        shown["presence"].as_str().unwrap_or_default().to_string()
    };
    let wait_for = |want: &str, limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            let now = presence();
            if now == want {
                return;
            }
            assert!(Instant::now() < deadline, "never {want}: {now}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };

    let node = run_node();
    wait_for("online", Duration::from_secs(30));
    node.kill();
    wait_for("offline", Duration::from_secs(30));
    let shown = anchord.ctl(&["inventory", "show", &device_id]);
    assert_eq!(
        shown["connected"], false,
        "the dead connection is closed: {shown}"
    );

    let queued = anchord.ctl(&[
        "invoke",
        &device_id,
        "echo",
        "--input",
        "{}",
        "--async",
        "--timeout",
        "60s",
    ]);
    let id = queued["invocation_id"].as_str().unwrap().to_string();
    let restarted = Instant::now();
    let _node = run_node();
    let deadline = restarted + Duration::from_secs(30);
    let done = loop {
        let shown = anchord.ctl(&["invocation", "show", &id]);
        if shown["state"] != "queued" && shown["state"] != "dispatched" {
            break shown;
        }
        assert!(Instant::now() < deadline, "still not done: {shown}");
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(done["state"], "succeeded", "{done}");
    assert!(
        restarted.elapsed() < Duration::from_secs(15),
        "delivered once the node registered, not at the deadline: {:?}",
        restarted.elapsed()
    );
}

/// Pairs a node named `name` with `anchord` into `state` (approved at once); its device id.
fn pair_approved(anchord: &Anchord, state: &Path, name: &str) -> String {
    let code = anchord.mint_pin();
    let pairing = anchord.spawn_pair(&code, state, name, true);
    let req = anchord.wait_pending(name);
    anchord.ctl(&["pair", "approve", req["request_id"].as_str().unwrap()]);
    let out = pairing.finish(COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(0), "{out:?}");
    out.json()["device_id"].as_str().unwrap().to_string()
}

/// `anchor-node status --json` of the node in `state`.
fn node_status(cwd: &Path, state: &Path) -> Value {
    let out = run(
        "anchor-node status",
        command(&bins().anchor_node, cwd)
            .args(["status", "--json", "--state-dir"])
            .arg(state),
    );
    assert!(out.status.success(), "{out:?}");
    out.json()
}

#[test]
fn running_nodes_hold_the_revocation_set_and_keep_it_without_the_anchor() {
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let node_dir = tempfile::tempdir().unwrap();
    let (keeper, lost) = (node_dir.path().join("keeper"), node_dir.path().join("lost"));
    pair_approved(&anchord, &keeper, "keeper");
    let lost_id = pair_approved(&anchord, &lost, "lost");

    let mut run_cmd = command(&bins().anchor_node, node_dir.path());
    run_cmd.arg("run").arg("--state-dir").arg(&keeper);
    let node = Proc::spawn("anchor-node run", &mut run_cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_status(node_dir.path(), &keeper)["connected"] != true {
        assert!(
            Instant::now() < deadline,
            "never connected: {}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(node_status(node_dir.path(), &keeper)["revoked_devices"], 0);

    // Revoked on the anchor: the running node holds it within a second, in its state dir.
    anchord.ctl(&["device", "revoke", &lost_id]);
    let revoked = Instant::now();
    let file = keeper.join("revoked.json");
    while !std::fs::read_to_string(&file).is_ok_and(|t| t.contains(&lost_id)) {
        assert!(
            revoked.elapsed() < Duration::from_secs(5),
            "the node never heard of the revocation: {}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "the running node held the revocation {:?} after it was made",
        revoked.elapsed()
    );
    assert!(
        revoked.elapsed() < Duration::from_secs(2),
        "within a second (and a loaded machine's slack)"
    );

    // With the anchor gone and the agent stopped, the node still holds it.
    anchord.terminate();
    node.terminate();
    let status = node_status(node_dir.path(), &keeper);
    assert_eq!(status["revoked_devices"], 1, "{status}");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "revoked.json mode {mode:o}");
    }
}

/// `anchor-node` of the node in `state`, expecting it to finish.
fn node_cmd(cwd: &Path, state: &Path, args: &[&str]) -> Output {
    run(
        "anchor-node",
        command(&bins().anchor_node, cwd)
            .args(args)
            .arg("--state-dir")
            .arg(state),
    )
}

/// Starts `anchor-node run` on `state` and waits until it is connected.
fn run_node(cwd: &Path, state: &Path) -> Proc {
    let mut cmd = command(&bins().anchor_node, cwd);
    cmd.arg("run").arg("--state-dir").arg(state);
    let node = Proc::spawn("anchor-node run", &mut cmd);
    let deadline = Instant::now() + Duration::from_secs(30);
    while node_status(cwd, state)["connected"] != true {
        assert!(
            Instant::now() < deadline,
            "never connected: {}",
            node.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    node
}

/// A TCP server on loopback that echoes each connection until its end of file, then closes.
fn echo_server() -> std::net::SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let mut read = stream.try_clone().unwrap();
                let mut write = stream;
                let _ = std::io::copy(&mut read, &mut write);
                let _ = write.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    addr
}

#[test]
fn peers_call_each_other_and_carry_tcp_with_the_real_binaries() {
    use std::io::{Read, Write};
    let data = tempfile::tempdir().unwrap();
    let anchord = start_anchord(&data.path().join("anchor"));
    let nodes = tempfile::tempdir().unwrap();
    let (cam, disp) = (nodes.path().join("cam"), nodes.path().join("disp"));
    let cam_id = pair_approved(&anchord, &cam, "cam");
    let disp_id = pair_approved(&anchord, &disp, "disp");
    anchord.ctl(&["device", "label", &cam_id, "role=camera"]);
    anchord.ctl(&["device", "label", &disp_id, "role=display"]);
    let policy = nodes.path().join("policy.toml");
    std::fs::write(
        &policy,
        "[[allow]]\nfrom = \"role=display\"\nto = \"role=camera\"\ncapabilities = [\"echo\", \"system.*\"]\nservices = [\"web\"]\n",
    )
    .unwrap();
    let set = anchord.ctl_output(&["policy", "set", policy.to_str().unwrap()]);
    assert!(set.status.success(), "{set:?}");

    let cam_run = run_node(nodes.path(), &cam);
    let disp_run = run_node(nodes.path(), &disp);
    let echo = echo_server();
    let mut expose_cmd = command(&bins().anchor_node, nodes.path());
    expose_cmd
        .args(["expose", "web", "--to", &echo.to_string(), "--state-dir"])
        .arg(&cam);
    let expose = Proc::spawn("anchor-node expose", &mut expose_cmd);
    expose.wait_line(COMMAND_TIMEOUT, |l| {
        l.contains("exposing web").then_some(())
    });

    // The display's directory lists the camera with its service.
    let deadline = Instant::now() + Duration::from_secs(20);
    let peers = loop {
        let out = node_cmd(nodes.path(), &disp, &["peers", "--json"]);
        assert!(out.status.success(), "{out:?}");
        let peers = out.json();
        let cam_entry = peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "cam")
            .cloned();
        if let Some(p) = cam_entry.filter(|p| p["services"] == serde_json::json!(["web"])) {
            break p;
        }
        assert!(
            Instant::now() < deadline,
            "the camera never showed with its service: {peers}\n{}",
            disp_run.log_tail()
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    for key in ["device_id", "name", "path", "addr", "rtt_ms"] {
        assert!(
            peers.get(key).is_some(),
            "peers --json lacks {key}: {peers}"
        );
    }

    // A call by name, in anchorctl invoke's JSON shape.
    let out = node_cmd(
        nodes.path(),
        &disp,
        &["call", "cam", "echo", "--input", r#"{"x":1}"#, "--json"],
    );
    assert_eq!(out.code(), Some(0), "{out:?}\n{}", disp_run.log_tail());
    let call = out.json();
    assert_eq!(call["state"], "succeeded", "{call}");
    assert_eq!(call["output"], serde_json::json!({"x": 1}), "{call}");
    assert!(call["invocation_id"].is_string() && call.get("error").is_some());
    // What the policy does not allow: 77, and the camera may not call the display at all.
    let out = node_cmd(nodes.path(), &disp, &["call", "cam", "desktop.open_url"]);
    assert_eq!(out.code(), Some(77), "{out:?}");
    let out = node_cmd(nodes.path(), &cam, &["call", "disp", "echo"]);
    assert_eq!(out.code(), Some(77), "{out:?}");
    let out = node_cmd(nodes.path(), &disp, &["call", "nosuch", "echo"]);
    assert_eq!(out.code(), Some(64), "{out:?}");

    // A tunnel: bytes both ways, and the half-close reaches the service.
    let mut connect_cmd = command(&bins().anchor_node, nodes.path());
    connect_cmd
        .args([
            "connect",
            "cam",
            "web",
            "--listen",
            "127.0.0.1:0",
            "--state-dir",
        ])
        .arg(&disp);
    let connect = Proc::spawn("anchor-node connect", &mut connect_cmd);
    let listening: std::net::SocketAddr = connect.wait_line(COMMAND_TIMEOUT, |l| {
        l.strip_prefix("listening on ")
            .and_then(|a| a.trim().parse().ok())
    });
    let mut tcp = std::net::TcpStream::connect(listening).unwrap();
    tcp.set_read_timeout(Some(COMMAND_TIMEOUT)).unwrap();
    let payload: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    tcp.write_all(&payload).unwrap();
    tcp.shutdown(std::net::Shutdown::Write).unwrap();
    let mut back = Vec::new();
    tcp.read_to_end(&mut back).unwrap();
    assert_eq!(back.len(), payload.len(), "{}", connect.log_tail());
    assert!(back == payload, "the tunnel altered the bytes");

    // On one host the path is direct; the operator sees the pair.
    let out = node_cmd(nodes.path(), &disp, &["peers", "--json"]);
    let peers = out.json();
    let cam_entry = peers
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == "cam")
        .unwrap()
        .clone();
    assert_eq!(cam_entry["connected"], true, "{cam_entry}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let peers = node_cmd(nodes.path(), &disp, &["peers", "--json"]).json();
        let cam_entry = peers
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == "cam")
            .cloned();
        if cam_entry
            .as_ref()
            .is_some_and(|p| p["path"] == "direct" && p["rtt_ms"].is_number())
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never direct on one host: {cam_entry:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Nodes report their paths about once a second.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mesh = anchord.ctl(&["mesh"]);
        let shown = mesh.as_array().unwrap().iter().any(|l| {
            let ends = [l["a"].as_str(), l["b"].as_str()];
            ends.contains(&Some(cam_id.as_str())) && ends.contains(&Some(disp_id.as_str()))
        });
        if shown {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "anchorctl mesh never showed the pair: {mesh}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // The local API socket is owner-only.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(disp.join("api.sock"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "api.sock mode {mode:o}");
    }
    connect.terminate();
    expose.terminate();
    cam_run.terminate();
    disp_run.terminate();
}
