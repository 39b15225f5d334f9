//! `anchord`: the Anchorage anchor daemon.
//!
//! Parses flags over an optional TOML file, sets up logging, and runs the library's
//! `anchorage_daemon::run` until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anchorage_daemon::config::{ConfigError, FileConfig};
use clap::{Parser, Subcommand};

/// The Anchorage anchor: enrolls devices, keeps their QUIC connections, serves the console.
#[derive(Debug, Parser)]
#[command(name = "anchord", version, about, long_about = None)]
struct Cli {
    /// Data directory (store, CA, owner token). Default: ./anchorage-data
    #[arg(long, global = true, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC (UDP) listen address. Default: 0.0.0.0:7444
    #[arg(long, global = true, value_name = "ADDR")]
    listen: Option<String>,
    /// Console (HTTP) listen address. Default: 127.0.0.1:7142
    #[arg(long, global = true, value_name = "ADDR")]
    console: Option<String>,
    /// TOML configuration file; flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address nodes dial, written into QR pairing codes (e.g. anchor.example:7444).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    public_addr: Option<String>,
    /// Heartbeat interval given to nodes (e.g. 15s).
    #[arg(long, global = true, value_name = "DURATION")]
    heartbeat_interval: Option<String>,
    /// A node without heartbeats for this long is stale (e.g. 5m).
    #[arg(long, global = true, value_name = "DURATION")]
    stale_after: Option<String>,
    /// A node without heartbeats for this long is offline (e.g. 30m).
    #[arg(long, global = true, value_name = "DURATION")]
    offline_after: Option<String>,
    /// Validity of node certificates (e.g. 30d).
    #[arg(long, global = true, value_name = "DURATION")]
    cert_validity: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Async worker threads. Default: one less than the cores, at least one.
    #[arg(long, global = true, value_name = "N")]
    worker_threads: Option<usize>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the anchor (the default when no command is given).
    Run,
    /// Run an anchor with simulated nodes on a simulated lossy network, for a first look.
    Demo {
        /// Number of simulated nodes.
        #[arg(long, default_value_t = 5)]
        nodes: usize,
        /// Network preset: lan, wifi, lte, congested-3g, satellite, hostile.
        #[arg(long, default_value = "lte")]
        preset: String,
        /// Seed of the simulated network (the same seed replays the same losses).
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match &cli.config {
        Some(path) => match FileConfig::load(path) {
            Ok(f) => f,
            Err(e) => return usage_error(&e),
        },
        None => FileConfig::default(),
    };
    let file_data_dir = file.data_dir.clone();
    let merged = FileConfig {
        data_dir: cli.data_dir.clone().or(file.data_dir),
        listen: cli.listen.clone().or(file.listen),
        console: cli.console.clone().or(file.console),
        public_addr: cli.public_addr.clone().or(file.public_addr),
        heartbeat_interval: cli.heartbeat_interval.clone().or(file.heartbeat_interval),
        stale_after: cli.stale_after.clone().or(file.stale_after),
        offline_after: cli.offline_after.clone().or(file.offline_after),
        cert_validity: cli.cert_validity.clone().or(file.cert_validity),
        log_format: cli.log_format.clone().or(file.log_format),
        worker_threads: cli.worker_threads.or(file.worker_threads),
        ..file
    };
    let config = match merged.validate() {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    anchorage_mesh::os::init_tracing(config.log_json);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("anchord: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = match cli.command.unwrap_or(Command::Run) {
        Command::Run => runtime.block_on(anchorage_daemon::run(
            config,
            anchorage_mesh::os::shutdown_signal(),
        )),
        Command::Demo {
            nodes,
            preset,
            seed,
        } => {
            let preset = match preset.parse::<anchorage_netsim::Preset>() {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("anchord demo: {e}");
                    return ExitCode::from(64);
                }
            };
            if nodes == 0 || nodes > 500 {
                eprintln!("anchord demo: --nodes must be between 1 and 500");
                return ExitCode::from(64);
            }
            let mut config = config;
            if cli.data_dir.is_none() && file_data_dir.is_none() {
                // Keep demo state away from a real anchor's data.
                config.data_dir = PathBuf::from("./anchorage-demo-data");
            }
            let opts = anchorage_daemon::demo::DemoOptions {
                nodes,
                preset,
                seed,
            };
            runtime.block_on(anchorage_daemon::demo::run(
                config,
                opts,
                anchorage_mesh::os::shutdown_signal(),
            ))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anchord: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage_error(e: &ConfigError) -> ExitCode {
    eprintln!("anchord: {e}");
    ExitCode::from(64)
}
