//! `anchor-node`: the Anchorage node agent.
//!
//! `pair` turns a pairing code into a certificate, `run` keeps the node connected to its
//! anchor, `status` shows what the node knows. `call`, `expose`, `connect` and `peers` use
//! the peer mesh through the running agent's local API.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anchorage_node::anchors::{self, AnchorAddr};
use anchorage_node::config::NodeConfig;
use anchorage_node::pair::{self, PairAnyOptions, PairProgress};
use anchorage_node::state::{DEFAULT_STATE_DIR, StateDir};
use anchorage_node::{RunConfig, RunError};
use clap::{Parser, Subcommand};

/// The Anchorage node agent.
#[derive(Debug, Parser)]
#[command(name = "anchor-node", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Pair this device with an anchor using a PIN or QR code from an operator.
    Pair {
        /// An anchor's QUIC address, HOST:PORT (HOST alone means port 7444, the anchor's
        /// default). Repeat it, or give a comma-separated list, for
        /// the anchors of a cluster: they are tried in order, and a request left waiting on one
        /// that goes away is resumed through the others. Without it, the QR code's anchor, or
        /// the anchors of the pairing being resumed.
        #[arg(long, value_name = "HOST[:PORT][,...]")]
        anchor: Vec<String>,
        /// The pairing code, e.g. K7QF-M2XA-482913. Without any code, a pairing that was waiting
        /// for approval when this command last stopped is resumed.
        #[arg(long, conflicts_with_all = ["code_stdin", "qr"])]
        code: Option<String>,
        /// Read the pairing code from standard input (keeps it out of shell history).
        #[arg(long, conflicts_with = "qr")]
        code_stdin: bool,
        /// A QR pairing URI (anchorage://pair?...); it carries the anchor address.
        #[arg(long, value_name = "URI")]
        qr: Option<String>,
        /// State directory for key, certificate and CA.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Name for this device (default: the host name).
        #[arg(long)]
        name: Option<String>,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Connect to the anchor and serve capabilities until stopped (SIGINT/SIGTERM).
    Run {
        /// State directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Node configuration file (TOML).
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
        /// Dial these anchors (HOST:PORT; repeat it or give a comma-separated list) instead of
        /// the configuration's `anchor`/`anchors` and the anchors saved in the state
        /// directory. They stay in the rotation whatever the anchors list.
        #[arg(long, value_name = "HOST:PORT[,...]")]
        anchor: Vec<String>,
        /// Log format.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
    },
    /// Invoke a capability on a peer node through the mesh (the agent must be running).
    #[command(
        after_help = "PEER is a device id, a unique prefix of one, or a device name. \
The exit code is 0 only when the call succeeded; 1 when it ran and did not (failed, timed out, \
rejected), 77 when the policy does not allow it, 69 when the peer or the agent cannot be reached."
    )]
    Call {
        /// The peer.
        peer: String,
        /// The capability, e.g. system.health.
        capability: String,
        /// State directory of the running agent.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Input, JSON.
        #[arg(long, value_name = "JSON", default_value = "{}")]
        input: String,
        /// How long to wait for the result.
        #[arg(long, value_name = "DURATION", default_value = "10s")]
        timeout: String,
        /// Print {"invocation_id","state","output","error"} as `anchorctl invoke --json` does.
        #[arg(long)]
        json: bool,
    },
    /// Expose a local TCP service to the peers the policy allows, until interrupted.
    Expose {
        /// The service's name in the peer directory (lowercase letters, digits, - _ .).
        name: String,
        /// Where peers' connections go, IP:PORT.
        #[arg(long, value_name = "IP:PORT")]
        to: String,
        /// State directory of the running agent.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// Listen locally and carry each TCP connection to a peer's exposed service, until
    /// interrupted.
    Connect {
        /// The peer (device id, unique prefix or name).
        peer: String,
        /// The service's name.
        name: String,
        /// Where to listen, IP:PORT.
        #[arg(long, value_name = "IP:PORT")]
        listen: String,
        /// State directory of the running agent.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
    },
    /// List the peers this node may reach, with how each is reached now.
    Peers {
        /// State directory of the running agent.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print a JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show this node's identity, pairing and (while `run` is active) its link to the anchor.
    Status {
        /// State directory.
        #[arg(long, value_name = "DIR", default_value = DEFAULT_STATE_DIR)]
        state_dir: PathBuf,
        /// Print one JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print a shell completion script to stdout, e.g. `anchor-node completion bash >
    /// /etc/bash_completion.d/anchor-node`.
    Completion {
        /// The shell: bash, zsh, fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

/// The anchor's default QUIC port, assumed for `pair --anchor HOST` without one.
const DEFAULT_ANCHOR_PORT: u16 = 7444;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anchor-node: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match cli.command {
        Command::Pair {
            anchor,
            code,
            code_stdin,
            qr,
            state_dir,
            name,
            json,
        } => runtime.block_on(cmd_pair(
            anchor, code, code_stdin, qr, state_dir, name, json,
        )),
        Command::Run {
            state_dir,
            config,
            anchor,
            log_format,
        } => runtime.block_on(cmd_run(state_dir, config, anchor, log_format == "json")),
        Command::Status { state_dir, json } => cmd_status(state_dir, json),
        Command::Call {
            peer,
            capability,
            state_dir,
            input,
            timeout,
            json,
        } => runtime.block_on(mesh_cli::call(
            state_dir, peer, capability, input, timeout, json,
        )),
        Command::Expose {
            name,
            to,
            state_dir,
        } => runtime.block_on(mesh_cli::expose(state_dir, name, to)),
        Command::Connect {
            peer,
            name,
            listen,
            state_dir,
        } => runtime.block_on(mesh_cli::connect(state_dir, peer, name, listen)),
        Command::Peers { state_dir, json } => runtime.block_on(mesh_cli::peers(state_dir, json)),
        Command::Completion { shell } => {
            use clap::CommandFactory;
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "anchor-node",
                &mut std::io::stdout(),
            );
            ExitCode::SUCCESS
        }
    }
}

/// The commands that use the peer mesh through the running agent's local API.
mod mesh_cli {
    use std::path::PathBuf;
    use std::process::ExitCode;

    use anchorage_node::api::{Client, Request};
    use serde_json::Value;

    fn die(message: &str, code: u8) -> ExitCode {
        eprintln!("anchor-node: {message}");
        ExitCode::from(code)
    }

    /// The exit code for an API refusal.
    fn refusal_code(code: &str) -> u8 {
        match code {
            "not_allowed" => 77,
            "not_found" | "ambiguous" | "bad_request" => 64,
            _ => 69,
        }
    }

    async fn ask(
        state_dir: &std::path::Path,
        request: &Request,
    ) -> Result<(Value, Client), ExitCode> {
        match Client::request(state_dir, request).await {
            Ok((answer, client)) => {
                if answer["ok"].as_bool() == Some(true) {
                    Ok((answer, client))
                } else {
                    let code = answer["code"].as_str().unwrap_or("failed");
                    let error = answer["error"].as_str().unwrap_or("the agent refused");
                    Err(die(error, refusal_code(code)))
                }
            }
            Err(e) => Err(die(&e.to_string(), 69)),
        }
    }

    pub async fn call(
        state_dir: PathBuf,
        peer: String,
        capability: String,
        input: String,
        timeout: String,
        json: bool,
    ) -> ExitCode {
        let input: Value = match serde_json::from_str(&input) {
            Ok(v) => v,
            Err(e) => return die(&format!("--input is not JSON: {e}"), 64),
        };
        let timeout = match anchorage_node::config::parse_duration(&timeout) {
            Ok(t) => t,
            Err(e) => return die(&format!("--timeout: {e}"), 64),
        };
        let request = Request::Call {
            peer,
            capability,
            input,
            timeout_ms: Some(timeout.as_millis() as u64),
        };
        let (answer, client) = match ask(&state_dir, &request).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        client.close().await;
        let state = answer["state"].as_str().unwrap_or("failed").to_string();
        if json {
            let out = serde_json::json!({
                "invocation_id": answer["invocation_id"],
                "state": answer["state"],
                "output": answer["output"],
                "error": answer["error"],
                "took_ms": answer["took_ms"],
            });
            println!("{out}");
        } else if state == "succeeded" {
            match &answer["output"] {
                Value::Null => {}
                Value::String(s) => println!("{s}"),
                other => println!(
                    "{}",
                    serde_json::to_string_pretty(other).unwrap_or_default()
                ),
            }
        }
        if state == "succeeded" {
            ExitCode::SUCCESS
        } else {
            let error = answer["error"].as_str().unwrap_or("");
            eprintln!("error: {state}: {error}");
            ExitCode::from(1)
        }
    }

    pub async fn expose(state_dir: PathBuf, name: String, to: String) -> ExitCode {
        let request = Request::Expose {
            name: name.clone(),
            to: to.clone(),
        };
        let (_, mut client) = match ask(&state_dir, &request).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        eprintln!("exposing {name} -> {to} to the peers the policy allows; Ctrl-C to stop");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
                eprintln!("stopped exposing {name}");
                ExitCode::SUCCESS
            }
            () = client.closed() => die("the agent stopped", 69),
        }
    }

    pub async fn connect(
        state_dir: PathBuf,
        peer: String,
        name: String,
        listen: String,
    ) -> ExitCode {
        let request = Request::Connect {
            peer: peer.clone(),
            service: name.clone(),
            listen,
        };
        let (answer, mut client) = match ask(&state_dir, &request).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        let bound = answer["listening"].as_str().unwrap_or("?").to_string();
        // Scripts read the bound address (with --listen 127.0.0.1:0) from this line.
        println!("listening on {bound}");
        eprintln!("carrying connections on {bound} to {name} on {peer}; Ctrl-C to stop");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {
                client.close().await;
                ExitCode::SUCCESS
            }
            () = client.closed() => die("the agent stopped", 69),
        }
    }

    pub async fn peers(state_dir: PathBuf, json: bool) -> ExitCode {
        let (answer, client) = match ask(&state_dir, &Request::Peers).await {
            Ok(a) => a,
            Err(code) => return code,
        };
        client.close().await;
        let peers = answer["peers"].as_array().cloned().unwrap_or_default();
        if json {
            println!("{}", Value::Array(peers));
            return ExitCode::SUCCESS;
        }
        if peers.is_empty() {
            println!("no peers: the policy lets this node reach none");
            return ExitCode::SUCCESS;
        }
        println!(
            "{:<20} {:<41} {:<8} {:<22} {:>9} {:>6}  SINCE",
            "NAME", "DEVICE", "PATH", "ADDR", "RTT", "LOSS"
        );
        for p in peers {
            let rtt = p["rtt_ms"]
                .as_f64()
                .map_or("-".to_string(), |r| format!("{r:.1}ms"));
            let loss = p["loss"]
                .as_f64()
                .map_or("-".to_string(), |l| format!("{:.1}%", l * 100.0));
            println!(
                "{:<20} {:<41} {:<8} {:<22} {:>9} {:>6}  {}",
                p["name"].as_str().unwrap_or(""),
                p["device_id"].as_str().unwrap_or(""),
                p["path"].as_str().unwrap_or(""),
                p["addr"].as_str().unwrap_or("-"),
                rtt,
                loss,
                p["since"].as_str().unwrap_or("-"),
            );
        }
        ExitCode::SUCCESS
    }
}

fn fail(json: bool, message: &str, code: u8) -> ExitCode {
    if json {
        println!("{}", serde_json::json!({"paired": false, "error": message}));
    }
    eprintln!("anchor-node: {message}");
    ExitCode::from(code)
}

fn rfc3339(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

/// `--anchor` values with [`DEFAULT_ANCHOR_PORT`] added to each host that has no port, and
/// the hosts it was added to (each comma-separated item counts on its own).
fn with_default_port(values: &[String]) -> (Vec<String>, Vec<String>) {
    let mut defaulted = Vec::new();
    let values = values
        .iter()
        .map(|value| {
            value
                .split(',')
                .map(|item| {
                    let item = item.trim();
                    if item.is_empty() || has_port(item) {
                        item.to_string()
                    } else {
                        defaulted.push(item.to_string());
                        match item.parse::<std::net::Ipv6Addr>() {
                            // A bare IPv6 address: bracket it, or its colons read as a port.
                            Ok(_) => format!("[{item}]:{DEFAULT_ANCHOR_PORT}"),
                            Err(_) => format!("{item}:{DEFAULT_ANCHOR_PORT}"),
                        }
                    }
                })
                .collect::<Vec<_>>()
                .join(",")
        })
        .collect();
    (values, defaulted)
}

/// Whether `item` ends in `:PORT` (`host:7444`, `[::1]:7444`; a bare IPv6 address has none).
fn has_port(item: &str) -> bool {
    if item.parse::<std::net::Ipv6Addr>().is_ok() {
        return false;
    }
    match item.strip_prefix('[') {
        Some(rest) => rest.contains("]:"),
        None => item.contains(':'),
    }
}

/// The anchors of `--anchor` flags, in order, without duplicates (exit 64 when malformed).
fn anchor_flags(values: &[String]) -> Result<Vec<AnchorAddr>, String> {
    anchors::parse_list(values).map_err(|e| format!("--anchor: {e}"))
}

async fn cmd_pair(
    anchor: Vec<String>,
    code: Option<String>,
    code_stdin: bool,
    qr: Option<String>,
    state_dir: PathBuf,
    name: Option<String>,
    json: bool,
) -> ExitCode {
    let code = if code_stdin {
        let mut line = String::new();
        if std::io::stdin().read_line(&mut line).is_err() || line.trim().is_empty() {
            return fail(json, "no pairing code on standard input", 64);
        }
        Some(line.trim().to_string())
    } else {
        code
    };
    let state = StateDir::new(&state_dir);
    // No code: resume a pairing that was waiting for approval when this command last stopped.
    let resume_from = if code.is_none() && qr.is_none() {
        match state.pending() {
            Ok(Some(p)) => Some(p),
            Ok(None) => {
                return fail(
                    json,
                    "give --code, --code-stdin or --qr (no pending pairing to resume in the state dir)",
                    64,
                );
            }
            Err(e) => return fail(json, &e.to_string(), 1),
        }
    } else {
        None
    };
    let parsed = match &resume_from {
        Some(_) => None,
        None => match pair::parse_code(code.as_deref(), qr.as_deref()) {
            Ok(c) => Some(c),
            Err(e) => return fail(json, &e.to_string(), 64),
        },
    };
    let (anchor, defaulted) = with_default_port(&anchor);
    for host in &defaulted {
        eprintln!(
            "anchor-node: --anchor {host} has no port; using {host}:{DEFAULT_ANCHOR_PORT}, the \
             anchor's default QUIC port"
        );
    }
    let given = match anchor_flags(&anchor) {
        Ok(list) => list,
        Err(e) => return fail(json, &e, 64),
    };
    let anchors = match (&parsed, &resume_from) {
        _ if !given.is_empty() => given,
        (_, Some(p)) => pair::saved_anchors(p),
        (Some(pair::PairCode::Qr(q)), _) => match q.anchor.parse::<AnchorAddr>() {
            Ok(a) => vec![a],
            Err(e) => return fail(json, &format!("the QR code's anchor: {e}"), 64),
        },
        _ => return fail(json, "--anchor HOST[:PORT] is required with a PIN code", 64),
    };
    if anchors.is_empty() {
        return fail(
            json,
            "give --anchor HOST:PORT (the pending pairing names none)",
            64,
        );
    }
    // The socket's address family is the first resolving anchor's; each attempt resolves again.
    let addr = match anchorage_node::resolve_first(&anchors).await {
        Ok(a) => a,
        Err(e) => return fail(json, &e.to_string(), 69),
    };
    let endpoint = match anchorage_node::client_endpoint(addr) {
        Ok(e) => e,
        Err(e) => return fail(json, &format!("cannot open a UDP socket: {e}"), 1),
    };
    let interactive = !json && std::io::stderr().is_terminal();
    let (spin_stop, spin_rx) = tokio::sync::watch::channel(None::<String>);
    let spinner = tokio::spawn(spinner(spin_rx, interactive));
    let mut logged_retry = false;
    let mut announced = false;
    let progress = |p: PairProgress| match p {
        PairProgress::Pending {
            request_id, sas, ..
        } => {
            // Once: a resumed request reports itself pending again.
            if !json && !announced {
                announced = true;
                eprintln!("Pairing request {request_id} is waiting for an operator.");
                eprintln!("Check that the console shows this code: {sas}");
                eprintln!(
                    "Waiting for the operator's approval (anchorctl pair approve {request_id}); \
                     Ctrl-C stops waiting, and `anchor-node pair` resumes it."
                );
            }
            let _ = spin_stop.send(Some(sas));
        }
        PairProgress::Reconnecting { reason, .. } => {
            // Once, not every retry.
            if !logged_retry {
                eprintln!(
                    "anchor-node: lost the anchor ({reason}); retrying until the request expires"
                );
                logged_retry = true;
            }
        }
    };
    // With one anchor, a closed port is said at once rather than after the handshake timeout.
    let probe = anchors.len() == 1;
    let pairing = async {
        match parsed {
            Some(code) => {
                let opts = PairAnyOptions {
                    anchors: anchors.clone(),
                    code,
                    device_name: name.unwrap_or_else(anchorage_node::capability::hostname),
                    platform: pair::platform(),
                };
                pair::pair_any(&endpoint, &state, &opts, progress).await
            }
            None => match pair::resume(&endpoint, &state, &anchors, progress).await {
                Ok(Some(paired)) => Ok(paired),
                Ok(None) => Err(pair::PairError::Expired),
                Err(e) => Err(e),
            },
        }
    };
    let refused = async {
        if probe {
            pair::port_unreachable(addr).await
        } else {
            std::future::pending().await
        }
    };
    let result = tokio::select! {
        result = pairing => result,
        () = refused => {
            spinner.abort();
            if interactive {
                eprint!("\r\x1b[2K");
            }
            return fail(
                json,
                &format!(
                    "cannot reach the anchor at {addr}: nothing listens on UDP port {} there \
                     (the host answered ICMP port unreachable); check --anchor and that anchord \
                     runs",
                    addr.port()
                ),
                69,
            );
        }
    };
    spinner.abort();
    if interactive {
        eprint!("\r\x1b[2K");
    }
    endpoint.wait_idle().await;
    match result {
        Ok(paired) => {
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "paired": true,
                        "device_id": paired.device_id.to_string(),
                        "anchor": paired.anchor,
                        "anchors": anchors.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "cert_expires_at": rfc3339(paired.cert_expires_at),
                        "state_dir": state_dir.display().to_string(),
                    })
                );
            } else {
                println!(
                    "Paired as {} through {} (certificate valid until {}).",
                    paired.device_id,
                    paired.anchor,
                    rfc3339(paired.cert_expires_at)
                );
                println!(
                    "Start the agent with: anchor-node run --state-dir {}",
                    state_dir.display()
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            let code = match &e {
                pair::PairError::Unreachable { .. } | pair::PairError::Resolve(_) => 69,
                _ => 1,
            };
            fail(json, &e.to_string(), code)
        }
    }
}

async fn spinner(mut rx: tokio::sync::watch::Receiver<Option<String>>, interactive: bool) {
    if !interactive {
        return;
    }
    let frames = ['⠋', '⠙', '⠹', '⠸', '⠼', '⠴', '⠦', '⠧', '⠇', '⠏'];
    let started = std::time::Instant::now();
    let mut i = 0usize;
    loop {
        let sas = rx.borrow_and_update().clone();
        let text = match sas {
            Some(sas) => format!(
                "waiting for approval — SAS {sas} — {}s",
                started.elapsed().as_secs()
            ),
            None => "contacting the anchor…".to_string(),
        };
        eprint!("\r\x1b[2K{} {text}", frames[i % frames.len()]);
        let _ = std::io::stderr().flush();
        i += 1;
        tokio::time::sleep(Duration::from_millis(120)).await;
    }
}

async fn cmd_run(
    state_dir: PathBuf,
    config: Option<PathBuf>,
    anchor: Vec<String>,
    json_logs: bool,
) -> ExitCode {
    anchorage_mesh::os::init_tracing(json_logs);
    let given = match anchor_flags(&anchor) {
        Ok(list) => list,
        Err(e) => {
            eprintln!("anchor-node: {e}");
            return ExitCode::from(64);
        }
    };
    let mut node_config = match &config {
        Some(path) => match NodeConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("anchor-node: {e}");
                return ExitCode::from(64);
            }
        },
        None => NodeConfig::default(),
    };
    if !given.is_empty() {
        // Flags win over the file.
        node_config.anchor = None;
        node_config.anchors = given.iter().map(ToString::to_string).collect();
    }
    // Installed before anything starts: a SIGTERM from here on is a clean stop.
    let shutdown = anchorage_mesh::os::shutdown_listener();
    let run_config = RunConfig::new(node_config);
    let readiness = tokio::spawn(notify_when_ready(
        run_config.stats.clone(),
        state_dir.join(anchorage_node::api::API_SOCKET),
    ));
    let result = anchorage_node::run(run_config, StateDir::new(&state_dir), async {
        shutdown.await;
        anchorage_mesh::os::notify_stopping();
    })
    .await;
    readiness.abort();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anchor-node: {e}");
            ExitCode::from(match e {
                RunError::Config(_) => 64,
                RunError::Resolve(_) => 69,
                _ => 1,
            })
        }
    }
}

/// Tells the service manager (systemd `Type=notify`) the node is ready once its first anchor
/// session is registered or its local API answers, whichever comes first.
async fn notify_when_ready(stats: std::sync::Arc<anchorage_node::agent::AgentStats>, api: PathBuf) {
    use std::sync::atomic::Ordering;
    loop {
        if stats.registrations.load(Ordering::Relaxed) > 0 {
            anchorage_mesh::os::notify_ready("connected to the anchor");
            return;
        }
        #[cfg(unix)]
        if std::os::unix::net::UnixStream::connect(&api).is_ok() {
            anchorage_mesh::os::notify_ready("serving the local API; connecting to the anchor");
            return;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn cmd_status(state_dir: PathBuf, json: bool) -> ExitCode {
    let state = StateDir::new(&state_dir);
    let key = match state.key() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("anchor-node: {e}");
            return ExitCode::FAILURE;
        }
    };
    let cert = state.cert_info().ok().flatten();
    let anchor = state.anchor().ok().flatten();
    let saved_anchors: Vec<String> = state
        .anchors()
        .ok()
        .flatten()
        .unwrap_or_default()
        .iter()
        .map(ToString::to_string)
        .collect();
    let pending = state.pending().ok().flatten();
    let live = state.status().ok().flatten().filter(|s| {
        // Only a status written recently by a live agent counts.
        let now = u64::try_from(
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .unwrap_or_default()
                .as_millis(),
        )
        .unwrap_or(0);
        now.saturating_sub(s.updated_at_ms) < 10_000
    });
    // While the agent runs, the anchors it knows now; else those saved.
    let known_anchors = live
        .as_ref()
        .map(|l| l.anchors.clone())
        .filter(|a| !a.is_empty())
        .unwrap_or(saved_anchors);
    let anchor_in_use = live.as_ref().and_then(|l| l.anchor.clone());
    // The revocation set the node holds (the file outlives the agent and the anchor).
    let revoked = state.revoked().ok().flatten().unwrap_or_default();
    let device_id = key.as_ref().map(|k| k.device_id().to_string());
    let paired = cert.is_some();
    let expires = cert.as_ref().map(|c| rfc3339(c.not_after));
    if json {
        let doc = serde_json::json!({
            "device_id": device_id,
            "anchor": anchor,
            "paired": paired,
            "cert_expires_at": expires,
            "pending_request": pending.as_ref().map(|p| &p.request_id),
            "running": live.is_some(),
            "connected": live.as_ref().map(|l| l.connected),
            "connected_since": live
                .as_ref()
                .and_then(|l| l.connected_since_ms)
                .map(|ms| rfc3339(SystemTime::UNIX_EPOCH + Duration::from_millis(ms))),
            "heartbeat_interval_ms": live.as_ref().map(|l| l.heartbeat_interval_ms),
            "heartbeats_sent": live.as_ref().map(|l| l.heartbeats_sent),
            "loss_rate": live.as_ref().and_then(|l| l.loss_rate),
            "rtt_ms": live
                .as_ref()
                .and_then(|l| l.rtt_ms)
                .map(|ms| (ms * 1000.0).round() / 1000.0),
            "last_error": live.as_ref().and_then(|l| l.last_error.clone()),
            "anchor_in_use": anchor_in_use,
            "anchors": known_anchors,
            "revoked_devices": revoked.devices.len(),
            "revoked_serials": revoked.serials.len(),
        });
        println!("{doc}");
    } else {
        println!(
            "device id:   {}",
            device_id.as_deref().unwrap_or("(no key yet)")
        );
        println!("anchor:      {}", anchor.as_deref().unwrap_or("(none)"));
        if !revoked.is_empty() {
            println!(
                "revoked:     {} devices, {} certificates (refused as peers)",
                revoked.devices.len(),
                revoked.serials.len()
            );
        }
        if !known_anchors.is_empty() {
            println!("anchors:     {}", known_anchors.join(", "));
        }
        println!("paired:      {}", if paired { "yes" } else { "no" });
        if let Some(e) = &expires {
            println!("certificate: valid until {e}");
        }
        if let Some(p) = &pending {
            println!("pending:     request {} (SAS {})", p.request_id, p.sas);
        }
        match &live {
            Some(l) => {
                println!(
                    "agent:       running (pid {}), {}",
                    l.pid,
                    if l.connected {
                        "connected"
                    } else {
                        "not connected"
                    }
                );
                if let Some(a) = &anchor_in_use {
                    println!("in use:      {a}");
                }
                if let Some(loss) = l.loss_rate {
                    println!("loss:        {:.1} %", loss * 100.0);
                }
                if let Some(rtt) = l.rtt_ms {
                    println!("rtt:         {rtt:.1} ms");
                }
                if let Some(err) = &l.last_error {
                    println!("last error:  {err}");
                }
            }
            None => println!("agent:       not running"),
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn anchors_of(args: &[&str]) -> Vec<String> {
        let cli = Cli::try_parse_from(args).unwrap();
        let values = match cli.command {
            Command::Pair { anchor, .. } | Command::Run { anchor, .. } => anchor,
            _ => Vec::new(),
        };
        anchor_flags(&values)
            .unwrap()
            .iter()
            .map(ToString::to_string)
            .collect()
    }

    #[test]
    fn anchor_may_be_repeated_or_a_comma_list_for_pair_and_run() {
        let want = ["a:7444", "b:7444", "[::1]:7444"];
        let pair = [
            "anchor-node",
            "pair",
            "--code",
            "K7QF-M2XA-482913",
            "--anchor",
            "a:7444",
            "--anchor",
            "b:7444,[::1]:7444,a:7444",
        ];
        assert_eq!(anchors_of(&pair), want);
        let run = [
            "anchor-node",
            "run",
            "--anchor=a:7444, b:7444",
            "--anchor",
            "[::1]:7444",
        ];
        assert_eq!(anchors_of(&run), want);
        assert!(anchors_of(&["anchor-node", "run"]).is_empty());
    }

    #[test]
    fn pair_assumes_the_default_port_for_a_bare_host() {
        let (values, defaulted) = with_default_port(&[
            "anchor.lan".to_string(),
            "a:7000, 10.0.0.2,[::1]".to_string(),
            "::1".to_string(),
            "[::1]:9".to_string(),
        ]);
        assert_eq!(
            values,
            [
                "anchor.lan:7444",
                "a:7000,10.0.0.2:7444,[::1]:7444",
                "[::1]:7444",
                "[::1]:9"
            ]
        );
        assert_eq!(defaulted, ["anchor.lan", "10.0.0.2", "[::1]", "::1"]);
        assert_eq!(anchor_flags(&values).unwrap().len(), 5);
    }

    #[test]
    fn a_bad_anchor_flag_names_the_flag() {
        let err = anchor_flags(&["a:7444,nope".to_string()]).unwrap_err();
        assert!(err.contains("--anchor") && err.contains("nope"), "{err}");
        let many: Vec<String> = (1..=65).map(|p| format!("a:{p}")).collect();
        assert!(anchor_flags(&[many.join(",")]).is_err());
    }
}
