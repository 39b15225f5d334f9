//! `anchord-demo`: an anchor with simulated nodes on a simulated lossy network, for a first
//! look. `anchord demo ...` executes this binary with the same arguments.
//!
//! Takes the flags of `anchord` (data dir, console address, config file, ...) plus the demo's
//! own, merges them over the TOML file as `anchord` does, and runs
//! `anchorage_sim::demo::run` until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anchorage_daemon::config::{ConfigError, FileConfig};
use anchorage_sim::demo::{self, DemoOptions};
use clap::Parser;

/// Run an anchor with simulated nodes on a simulated lossy network, for a first look.
#[derive(Debug, Parser)]
#[command(name = "anchord demo", version)]
struct Cli {
    /// Number of simulated nodes.
    #[arg(long, default_value_t = 5)]
    nodes: usize,
    /// Network preset: lan, wifi, lte, congested-3g, satellite, hostile.
    #[arg(long, default_value = "lte")]
    preset: String,
    /// Seed of the simulated network (the same seed replays the same losses).
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Data directory (store, CA, owner token, the nodes' state). Default: ./anchorage-demo-data
    #[arg(long, value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// QUIC listen address; only its port is used, on the simulated network. Default: 7444
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Console (HTTP) listen address. Default: 127.0.0.1:7142
    #[arg(long, value_name = "ADDR")]
    console: Option<String>,
    /// TOML configuration file; flags override it.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address nodes dial, written into QR pairing codes (e.g. anchor.example:7444).
    #[arg(long, value_name = "HOST:PORT")]
    public_addr: Option<String>,
    /// Heartbeat interval (the demo shortens it to 2s).
    #[arg(long, value_name = "DURATION")]
    heartbeat_interval: Option<String>,
    /// Staleness threshold (the demo shortens it to 15s).
    #[arg(long, value_name = "DURATION")]
    stale_after: Option<String>,
    /// Offline threshold (the demo shortens it to 45s).
    #[arg(long, value_name = "DURATION")]
    offline_after: Option<String>,
    /// Validity of node certificates (e.g. 30d).
    #[arg(long, value_name = "DURATION")]
    cert_validity: Option<String>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// Async worker threads. Default: one less than the cores, at least one.
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
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
    let mut config = match merged.validate() {
        Ok(c) => c,
        Err(e) => return usage_error(&e),
    };
    let preset = match cli.preset.parse::<anchorage_netsim::Preset>() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("anchord demo: {e}");
            return ExitCode::from(64);
        }
    };
    if cli.nodes == 0 || cli.nodes > 500 {
        eprintln!("anchord demo: --nodes must be between 1 and 500");
        return ExitCode::from(64);
    }
    if cli.data_dir.is_none() && file_data_dir.is_none() {
        // Keep demo state away from a real anchor's data.
        config.data_dir = PathBuf::from("./anchorage-demo-data");
    }
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
    let opts = DemoOptions {
        nodes: cli.nodes,
        preset,
        seed: cli.seed,
    };
    match runtime.block_on(demo::run(
        config,
        opts,
        anchorage_mesh::os::shutdown_signal(),
    )) {
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
