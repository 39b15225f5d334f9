//! `anchord`: the Anchorage anchor daemon.
//!
//! Parses flags over an optional TOML file, sets up logging, and runs the library's
//! `anchorage_daemon::reload::run_service` until SIGINT or SIGTERM, reloading the file on
//! SIGHUP. `anchord check-config` loads the same file and flags as a start and says whether
//! they would start (exit 0) or not (exit 64, with the same message).
//!
//! `anchord demo ...` executes the sibling binary `anchord-demo` (of the `anchorage-sim`
//! package) with the same arguments: the simulated fleet is not part of the production daemon.

use std::ffi::OsString;
use std::process::ExitCode;

use anchorage_daemon::config::AnchorFlags;
use anchorage_daemon::reload::LoadError;
use clap::{CommandFactory, Parser, Subcommand};

/// The demo's binary, found next to `anchord`.
const DEMO_BINARY: &str = "anchord-demo";

/// The Anchorage anchor: enrolls devices, keeps their QUIC connections, serves the console.
#[derive(Debug, Parser)]
#[command(name = "anchord", version, about, long_about = None)]
struct Cli {
    #[command(flatten)]
    flags: AnchorFlags,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the anchor (the default when no command is given).
    Run,
    /// Check the configuration (--config FILE and any flags) as a start would, then exit:
    /// 0 when it is valid, 64 with the reason when not.
    CheckConfig,
    /// Run an anchor with simulated nodes on a simulated lossy network, for a first look
    /// (`anchord demo --help` shows its flags).
    #[command(disable_help_flag = true)]
    Demo {
        /// The demo's flags: --nodes N, --preset NAME, --seed N, and anchord's own.
        #[arg(
            trailing_var_arg = true,
            allow_hyphen_values = true,
            value_name = "FLAGS"
        )]
        args: Vec<OsString>,
    },
    /// Print a shell completion script to stdout, e.g. `anchord completion bash >
    /// /etc/bash_completion.d/anchord`.
    Completion {
        /// The shell: bash, zsh, fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

fn main() -> ExitCode {
    let args: Vec<OsString> = std::env::args_os().collect();
    // `anchord [FLAGS] demo [FLAGS]`: every flag goes to the demo, which takes anchord's too.
    if let Some(pos) = subcommand_position(&args)
        && args[pos] == "demo"
    {
        let mut demo_args = args[1..pos].to_vec();
        demo_args.extend_from_slice(&args[pos + 1..]);
        return exec_demo(demo_args);
    }
    let cli = Cli::parse_from(&args);
    let check_only = match &cli.command {
        None | Some(Command::Run) => false,
        Some(Command::CheckConfig) => true,
        // Found by the scan above already; should clap still see it, the flags after it go on.
        Some(Command::Demo { args }) => return exec_demo(args.clone()),
        Some(Command::Completion { shell }) => {
            clap_complete::generate(
                *shell,
                &mut Cli::command(),
                "anchord",
                &mut std::io::stdout(),
            );
            return ExitCode::SUCCESS;
        }
    };
    let loaded = match anchorage_daemon::reload::load(&cli.flags) {
        Ok(l) => l,
        Err(e) => return usage_error(&e),
    };
    if check_only {
        match &cli.flags.config {
            Some(path) => println!("configuration OK: {}", path.display()),
            None => println!("configuration OK (flags and defaults; no --config file)"),
        }
        return ExitCode::SUCCESS;
    }
    let config = loaded.config.clone();
    let log =
        anchorage_mesh::os::init_tracing_reloadable(config.log_json, config.log_level.as_deref());
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
    let flags = cli.flags;
    let result = runtime.block_on(async move {
        // First: until SIGHUP and SIGTERM are handled, either ends the process at once.
        let hangups = anchorage_mesh::os::Hangups::new();
        let shutdown = anchorage_mesh::os::shutdown_listener();
        anchorage_daemon::reload::run_service(flags, loaded, log, hangups, shutdown).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("anchord: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Where the subcommand is among `args` (`args[0]` is the program): the first argument that
/// is neither a flag nor a flag's value. `None` without one.
fn subcommand_position(args: &[OsString]) -> Option<usize> {
    let cli = Cli::command();
    let takes_value = |long: &str| {
        cli.get_arguments()
            .any(|a| a.get_long() == Some(long) && a.get_action().takes_values())
    };
    let mut i = 1;
    while i < args.len() {
        let arg = args[i].to_string_lossy();
        if arg == "--" {
            return None;
        }
        if let Some(long) = arg.strip_prefix("--") {
            if !long.contains('=') && takes_value(long) {
                i += 1;
            }
        } else if !arg.starts_with('-') {
            return Some(i);
        }
        i += 1;
    }
    None
}

/// Replaces this process with `anchord-demo` from the same directory, passing `args` on (so
/// signals reach the demo directly). Exits 69 if it is not there.
fn exec_demo(args: Vec<OsString>) -> ExitCode {
    let name = format!("{DEMO_BINARY}{}", std::env::consts::EXE_SUFFIX);
    let exe = std::env::current_exe();
    let dir = exe.as_ref().ok().and_then(|e| e.parent());
    let Some(path) = dir.map(|d| d.join(&name)).filter(|p| p.is_file()) else {
        eprintln!(
            "anchord: the demo is a separate binary, {name}, and it is not next to this anchord{}; \
             build it with `cargo build --release -p anchorage-sim` \
             (or everything with `cargo build --workspace --bins`)",
            dir.map(|d| format!(" (in {})", d.display()))
                .unwrap_or_default()
        );
        return ExitCode::from(69);
    };
    let mut cmd = std::process::Command::new(&path);
    cmd.args(args);
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // Its usage lines then read `anchord demo`, as the user typed it.
        cmd.arg0("anchord demo");
        let err = cmd.exec();
        eprintln!("anchord: cannot run {}: {err}", path.display());
        ExitCode::FAILURE
    }
    #[cfg(not(unix))]
    {
        match cmd.status() {
            Ok(status) => ExitCode::from(status.code().map_or(1, |c| c as u8)),
            Err(err) => {
                eprintln!("anchord: cannot run {}: {err}", path.display());
                ExitCode::FAILURE
            }
        }
    }
}

fn usage_error(e: &LoadError) -> ExitCode {
    eprintln!("anchord: {e}");
    ExitCode::from(64)
}
