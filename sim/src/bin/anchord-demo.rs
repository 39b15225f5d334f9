//! `anchord-demo`: an anchor with simulated nodes on a simulated lossy network, for a first
//! look. `anchord demo ...` executes this binary with the same arguments.
//!
//! Takes the flags of `anchord` (data dir, console address, config file, ...) plus the demo's
//! own, merges them over the TOML file as `anchord` does, and runs
//! `anchorage_sim::demo::run` until SIGINT or SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use anchorage_daemon::config::{AnchorFlags, ConfigError};
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
    /// anchord's own flags (the demo shortens the presence thresholds to 2s / 15s / 45s and
    /// keeps its data in ./anchorage-demo-data unless told otherwise).
    #[command(flatten)]
    flags: AnchorFlags,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let file = match cli.flags.file() {
        Ok(f) => f,
        Err(e) => return usage_error(&e),
    };
    let file_data_dir = file.data_dir.clone();
    let merged = cli.flags.over(file);
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
    if cli.flags.data_dir.is_none() && file_data_dir.is_none() {
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
    let result = runtime.block_on(async {
        // Installed first: a SIGTERM while the nodes still pair is a clean stop too.
        let shutdown = anchorage_mesh::os::shutdown_listener();
        demo::run(config, opts, shutdown).await
    });
    // Blocking work still running (a store flush) is not waited for past this.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
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
