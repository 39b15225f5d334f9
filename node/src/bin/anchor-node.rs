//! `anchor-node`: the Anchorage node agent.
//!
//! `pair` turns a pairing code into a certificate, `run` keeps the node connected to its
//! anchor, `status` shows what the node knows.

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime};

use anchorage_node::config::NodeConfig;
use anchorage_node::pair::{self, PairOptions, PairProgress};
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
        /// The anchor's QUIC address, HOST:PORT.
        #[arg(long, value_name = "HOST:PORT")]
        anchor: Option<String>,
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
        /// Log format.
        #[arg(long, value_parser = ["text", "json"], default_value = "text")]
        log_format: String,
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
}

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
            log_format,
        } => runtime.block_on(cmd_run(state_dir, config, log_format == "json")),
        Command::Status { state_dir, json } => cmd_status(state_dir, json),
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

async fn cmd_pair(
    anchor: Option<String>,
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
    let anchor = match (&anchor, &parsed, &resume_from) {
        (Some(a), _, _) => a.clone(),
        (None, _, Some(p)) => p.anchor.clone(),
        (None, Some(pair::PairCode::Qr(q)), _) => q.anchor.clone(),
        _ => return fail(json, "--anchor HOST:PORT is required with a PIN code", 64),
    };
    let addr = match anchorage_node::resolve(&anchor).await {
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
    let progress = |p: PairProgress| match p {
        PairProgress::Pending {
            request_id, sas, ..
        } => {
            if !json {
                eprintln!("Pairing request {request_id} is waiting for an operator.");
                eprintln!("Check that the console shows this code: {sas}");
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
    let result = match parsed {
        Some(code) => {
            let opts = PairOptions {
                anchor: anchor.clone(),
                anchor_addr: addr,
                code,
                device_name: name.unwrap_or_else(anchorage_node::capability::hostname),
                platform: pair::platform(),
            };
            pair::pair(&endpoint, &state, &opts, progress).await
        }
        None => match pair::resume(&endpoint, &state, addr, progress).await {
            Ok(Some(paired)) => Ok(paired),
            Ok(None) => Err(pair::PairError::Expired),
            Err(e) => Err(e),
        },
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
                        "anchor": anchor,
                        "cert_expires_at": rfc3339(paired.cert_expires_at),
                        "state_dir": state_dir.display().to_string(),
                    })
                );
            } else {
                println!(
                    "Paired as {} (certificate valid until {}).",
                    paired.device_id,
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
                pair::PairError::Unreachable { .. } => 69,
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

async fn cmd_run(state_dir: PathBuf, config: Option<PathBuf>, json_logs: bool) -> ExitCode {
    anchorage_mesh::os::init_tracing(json_logs);
    let node_config = match &config {
        Some(path) => match NodeConfig::load(path) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("anchor-node: {e}");
                return ExitCode::from(64);
            }
        },
        None => NodeConfig::default(),
    };
    let result = anchorage_node::run(
        RunConfig::new(node_config),
        StateDir::new(&state_dir),
        anchorage_mesh::os::shutdown_signal(),
    )
    .await;
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
            "connected_since": live.as_ref().and_then(|l| l.connected_since_ms),
            "heartbeat_interval_ms": live.as_ref().map(|l| l.heartbeat_interval_ms),
            "heartbeats_sent": live.as_ref().map(|l| l.heartbeats_sent),
            "loss_rate": live.as_ref().and_then(|l| l.loss_rate),
            "rtt_ms": live.as_ref().and_then(|l| l.rtt_ms),
            "last_error": live.as_ref().and_then(|l| l.last_error.clone()),
        });
        println!("{doc}");
    } else {
        println!(
            "device id:   {}",
            device_id.as_deref().unwrap_or("(no key yet)")
        );
        println!("anchor:      {}", anchor.as_deref().unwrap_or("(none)"));
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
