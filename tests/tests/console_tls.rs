//! The console over HTTPS (issue 15), both ends real: the anchor serves its console over TLS
//! with a certificate from its own CA or the operator's own, and `anchorctl` pins the CA it is
//! given (`--ca-file`, or a context). Also: the plain-HTTP warning of a console reachable
//! beyond the host, and anchorctl's contexts, with the real binaries.

#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use anchorage_console::api::{MintCodeRequest, PairMethod};
use anchorage_console::cli;
use anchorage_console::{CaCertificates, ClientError, ControlPlaneClient};
use anchorage_daemon::console_tls::{self, ConsoleTls};
use anchorage_daemon::{AnchorConfig, Running};
use anchorage_sim::procs::{self, Proc, READY_TIMEOUT, bins, command};
use futures_util::StreamExt;
use serde_json::Value;

const COMMAND_TIMEOUT: Duration = Duration::from_secs(20);

async fn anchor_with(dir: &Path, tls: ConsoleTls) -> Running {
    let mut config = AnchorConfig::for_tests(dir.join("data"));
    config.console_tls = tls;
    anchorage_daemon::start(config).await.unwrap()
}

fn anchor_ca_tls() -> ConsoleTls {
    console_tls::settings(Some(true), None, None, None).unwrap()
}

/// `anchorctl ARGS` in process: its stdout, or its error.
async fn anchorctl(args: &[&str]) -> Result<String, cli::CliError> {
    let mut argv = vec!["anchorctl"];
    argv.extend_from_slice(args);
    let parsed = cli::parse_from(argv).unwrap();
    let mut out = Vec::new();
    cli::run(parsed, &mut out, std::future::pending()).await?;
    Ok(String::from_utf8(out).unwrap())
}

/// A CA (rcgen) and a certificate it signed for `localhost` and 127.0.0.1, as PEM files in
/// `dir`: (ca.pem, cert.pem, key.pem).
fn operator_pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
    params
        .subject_alt_names
        .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
    let cert = params.signed_by(&key, &issuer).unwrap();
    let paths = (
        dir.join("op-ca.pem"),
        dir.join("op-cert.pem"),
        dir.join("op-key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

fn localhost_url(running: &Running) -> String {
    format!("https://localhost:{}", running.console_addr.port())
}

#[tokio::test]
async fn anchorctl_lists_the_inventory_over_https_with_the_anchor_ca_and_refuses_without_it() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor_with(dir.path(), anchor_ca_tls()).await;
    assert!(
        running.console_url().starts_with("https://127.0.0.1:"),
        "{}",
        running.console_url()
    );
    let token = running.anchor.owner_token().unwrap();
    let ca = dir.path().join("data/ca.pem");
    let ca = ca.to_str().unwrap();

    for url in [localhost_url(&running), running.console_url()] {
        let out = anchorctl(&[
            "--url",
            &url,
            "--token",
            &token,
            "--ca-file",
            ca,
            "--json",
            "inventory",
        ])
        .await
        .unwrap();
        let inventory: Value = serde_json::from_str(&out).unwrap();
        assert!(inventory["devices"].is_array(), "{url}: {out}");
    }

    // No CA for an https URL: refused before connecting.
    let url = localhost_url(&running);
    let err = anchorctl(&["--url", &url, "--token", &token, "inventory"])
        .await
        .unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (64, "no_ca"), "{err}");
    assert!(err.message.contains("--ca-file"), "{err}");

    // Another anchor's CA: the certificate does not verify.
    let other = tempfile::tempdir().unwrap();
    let localhost_only = ["localhost".to_string()];
    let other_anchor = anchor_with(
        other.path(),
        console_tls::settings(Some(true), Some(&localhost_only), None, None).unwrap(),
    )
    .await;
    let other_ca = other.path().join("data/ca.pem");
    let err = anchorctl(&[
        "--url",
        &url,
        "--token",
        &token,
        "--ca-file",
        other_ca.to_str().unwrap(),
        "inventory",
    ])
    .await
    .unwrap_err();
    assert_eq!((err.exit, err.code.as_str()), (64, "certificate"), "{err}");
    assert!(err.message.contains("does not verify"), "{err}");
    assert!(err.message.contains(&url), "{err}");

    // A host the certificate is not for: the other anchor's is for localhost only.
    let other_ca = CaCertificates::from_pem(other_anchor.anchor.ca_pem().as_bytes()).unwrap();
    let other_token = other_anchor.anchor.owner_token().unwrap();
    let by_name =
        ControlPlaneClient::with_ca(&localhost_url(&other_anchor), &other_token, Some(&other_ca))
            .unwrap();
    assert!(by_name.inventory().await.is_ok());
    let by_ip =
        ControlPlaneClient::with_ca(&other_anchor.console_url(), &other_token, Some(&other_ca))
            .unwrap();
    let err = by_ip.inventory().await.unwrap_err();
    assert!(matches!(err, ClientError::Certificate(_)), "{err}");
    assert!(err.to_string().contains("not valid for name"), "{err}");

    // Plain HTTP to the TLS console gets no answer from the API.
    let plain = ControlPlaneClient::new(
        &format!("http://127.0.0.1:{}", running.console_addr.port()),
        &token,
    )
    .unwrap();
    assert!(plain.inventory().await.is_err());

    other_anchor.shutdown().await;
    running.shutdown().await;
}

#[tokio::test]
async fn version_shows_the_anchors_over_https_with_its_ca() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor_with(dir.path(), anchor_ca_tls()).await;
    let url = localhost_url(&running);
    let ca = dir.path().join("data/ca.pem");
    let version = env!("CARGO_PKG_VERSION");
    let mut out = Vec::new();
    cli::print_version_for(
        [
            "anchorctl",
            "--url",
            &url,
            "--ca-file",
            ca.to_str().unwrap(),
            "--version",
        ],
        &mut out,
    )
    .await
    .unwrap();
    assert_eq!(
        String::from_utf8(out).unwrap(),
        format!("anchorctl {version}\nanchor: {version} ({url}/)\n")
    );
    // Without the CA it says why it cannot ask.
    let mut out = Vec::new();
    cli::print_version_for(["anchorctl", "--url", &url, "--version"], &mut out)
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(
        text.contains("anchor: unreachable (") && text.contains("--ca-file"),
        "{text}"
    );
}

#[tokio::test]
async fn an_operators_own_certificate_and_key_serve_the_console() {
    let dir = tempfile::tempdir().unwrap();
    let (op_ca, cert, key) = operator_pki(dir.path());
    let tls = console_tls::settings(None, None, Some(&cert), Some(&key)).unwrap();
    let running = anchor_with(dir.path(), tls).await;
    let token = running.anchor.owner_token().unwrap();
    let url = localhost_url(&running);
    let out = anchorctl(&[
        "--url",
        &url,
        "--token",
        &token,
        "--ca-file",
        op_ca.to_str().unwrap(),
        "--json",
        "inventory",
    ])
    .await
    .unwrap();
    assert!(serde_json::from_str::<Value>(&out).unwrap()["devices"].is_array());

    // The anchor's own CA did not sign this certificate.
    let anchor_ca = dir.path().join("data/ca.pem");
    let err = anchorctl(&[
        "--url",
        &url,
        "--token",
        &token,
        "--ca-file",
        anchor_ca.to_str().unwrap(),
        "inventory",
    ])
    .await
    .unwrap_err();
    assert_eq!(err.code, "certificate", "{err}");
    running.shutdown().await;
}

#[tokio::test]
async fn the_event_stream_delivers_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let running = anchor_with(dir.path(), anchor_ca_tls()).await;
    let ca = CaCertificates::from_pem(running.anchor.ca_pem().as_bytes()).unwrap();
    let client = ControlPlaneClient::with_ca(
        &localhost_url(&running),
        running.anchor.owner_token().unwrap(),
        Some(&ca),
    )
    .unwrap();
    let events = client.events().await.unwrap();
    let mut events = std::pin::pin!(events);
    client
        .mint_code(MintCodeRequest {
            method: PairMethod::Pin,
            ttl_secs: None,
            labels: Default::default(),
        })
        .await
        .unwrap();
    let event = tokio::time::timeout(Duration::from_secs(20), events.next())
        .await
        .expect("an event within 20 s")
        .expect("the stream is open")
        .unwrap();
    assert_eq!(event.kind, "pairing.code");
    running.shutdown().await;
}

// ---------------------------------------------------------------------------------------------
// The real binaries

fn anchord(data_dir: &Path, console: &str, extra: &[&str], cwd: &Path) -> Proc {
    let mut cmd = command(&bins().anchord, cwd);
    cmd.arg("--data-dir")
        .arg(data_dir)
        .args(["--listen", "127.0.0.1:0", "--console", console])
        .args(extra);
    Proc::spawn("anchord", &mut cmd)
}

fn ready_console(proc: &Proc) -> String {
    proc.wait_line(READY_TIMEOUT, procs::Ready::parse).console
}

#[test]
fn anchord_warns_of_a_plain_console_beyond_the_host_and_serves_https_when_asked() {
    let dir = tempfile::tempdir().unwrap();
    let plain = anchord(&dir.path().join("a"), "0.0.0.0:0", &[], dir.path());
    let console = ready_console(&plain);
    assert!(console.starts_with("http://0.0.0.0:"), "{console}");
    let warning = plain.wait_line(READY_TIMEOUT, |l| {
        (l.contains("WARN") && l.contains("clear text")).then(|| l.to_string())
    });
    assert!(warning.contains("--console-tls"), "{warning}");
    plain.terminate();

    let tls = anchord(
        &dir.path().join("b"),
        "0.0.0.0:0",
        &["--console-tls", "--console-name", "localhost"],
        dir.path(),
    );
    let console = ready_console(&tls);
    assert!(console.starts_with("https://0.0.0.0:"), "{console}");
    assert!(
        tls.find_line(|l| l.contains("clear text").then_some(()))
            .is_none(),
        "{}",
        tls.log_tail()
    );
    tls.terminate();

    // Loopback over plain HTTP is not worth a warning.
    let local = anchord(&dir.path().join("c"), "127.0.0.1:0", &[], dir.path());
    ready_console(&local);
    assert!(
        local
            .find_line(|l| l.contains("clear text").then_some(()))
            .is_none()
    );
    local.terminate();
}

#[test]
fn anchord_refuses_a_key_that_is_not_the_certificates_with_exit_64() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, _) = operator_pki(dir.path());
    let other = dir.path().join("other");
    std::fs::create_dir(&other).unwrap();
    let (_, _, wrong_key) = operator_pki(&other);
    let mut cmd = command(&bins().anchord, dir.path());
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--console-cert")
        .arg(&cert)
        .arg("--console-key")
        .arg(&wrong_key);
    let out = procs::run("anchord", &mut cmd, COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(64), "{}", out.stderr);
    assert!(
        out.stderr.contains("is not the key of the certificate"),
        "{}",
        out.stderr
    );

    let mut cmd = command(&bins().anchord, dir.path());
    cmd.arg("--data-dir")
        .arg(dir.path().join("data"))
        .arg("--console-cert")
        .arg(dir.path().join("missing.pem"))
        .arg("--console-key")
        .arg(&wrong_key);
    let out = procs::run("anchord", &mut cmd, COMMAND_TIMEOUT);
    assert_eq!(out.code(), Some(64), "{}", out.stderr);
    assert!(out.stderr.contains("missing.pem"), "{}", out.stderr);
}

#[test]
fn a_context_with_an_https_url_token_file_and_ca_file_is_all_anchorctl_needs() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let anchor = anchord(&data, "127.0.0.1:0", &["--console-tls"], dir.path());
    let console = ready_console(&anchor);
    let port = console.rsplit(':').next().unwrap().to_string();
    let url = format!("https://localhost:{port}");
    let home = dir.path().join("xdg");
    let cwd = dir.path().join("elsewhere");
    std::fs::create_dir(&cwd).unwrap();
    let ctl = |args: &[&str]| {
        let mut cmd = command(&bins().anchorctl, &cwd);
        // The default place of the file, not ANCHORAGE_CONFIG.
        cmd.env_remove("ANCHORAGE_CONFIG")
            .env("XDG_CONFIG_HOME", &home)
            .args(args);
        procs::run("anchorctl", &mut cmd, COMMAND_TIMEOUT)
    };

    let token_file = data.join("owner.token");
    let ca_file = data.join("ca.pem");
    let added = ctl(&[
        "context",
        "add",
        "lab",
        "--url",
        &url,
        "--token-file",
        token_file.to_str().unwrap(),
        "--ca-file",
        ca_file.to_str().unwrap(),
        "--use",
    ]);
    assert_eq!(added.code(), Some(0), "{}", added.stderr);
    let config = home.join("anchorage/config.toml");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&config).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let other = ctl(&[
        "context",
        "add",
        "local",
        "--url",
        "http://127.0.0.1:1",
        "--token-file",
        token_file.to_str().unwrap(),
    ]);
    assert_eq!(other.code(), Some(0), "{}", other.stderr);

    let inventory = ctl(&["inventory", "--json"]);
    assert_eq!(inventory.code(), Some(0), "{}", inventory.stderr);
    assert!(
        inventory.json()["devices"].is_array(),
        "{}",
        inventory.stdout
    );

    let list = ctl(&["context", "list", "--json"]);
    let list = list.json();
    assert_eq!(list["current_context"], "lab");
    let contexts = list["contexts"].as_array().unwrap();
    assert_eq!(contexts.len(), 2);
    assert_eq!(contexts[0]["name"], "lab");
    assert_eq!(contexts[0]["current"], true);
    assert_eq!(contexts[0]["url"], url.as_str());
    assert_eq!(contexts[1]["current"], false);
    let text = ctl(&["context", "list"]).stdout;
    assert!(
        text.lines()
            .any(|l| l.starts_with('*') && l.contains("lab")),
        "{text}"
    );

    // --context picks another one for one command: nothing listens there.
    let unreachable = ctl(&["--context", "local", "inventory"]);
    assert_eq!(unreachable.code(), Some(69), "{}", unreachable.stderr);
    let unknown = ctl(&["--context", "prod", "inventory"]);
    assert_eq!(unknown.code(), Some(64), "{}", unknown.stderr);
    assert!(
        unknown.stderr.contains("lab, local"),
        "the known ones are listed: {}",
        unknown.stderr
    );

    let used = ctl(&["context", "use", "local", "--json"]);
    assert_eq!(used.code(), Some(0), "{}", used.stderr);
    assert_eq!(used.json()["current_context"], "local");
    let removed = ctl(&["context", "remove", "local"]);
    assert_eq!(removed.code(), Some(0), "{}", removed.stderr);
    let list = ctl(&["context", "list", "--json"]).json();
    assert_eq!(list["current_context"], Value::Null);
    assert_eq!(list["contexts"].as_array().unwrap().len(), 1);

    // A broken file is named with its line.
    std::fs::write(&config, "current_context = \"lab\"\n[contexts.lab\n").unwrap();
    let broken = ctl(&["inventory"]);
    assert_eq!(broken.code(), Some(64), "{}", broken.stderr);
    assert!(
        broken.stderr.contains(&format!("{}:2:", config.display())),
        "{}",
        broken.stderr
    );
    anchor.terminate();
}
