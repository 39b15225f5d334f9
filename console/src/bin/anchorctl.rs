//! `anchorctl`: the operator CLI of Anchorage. All logic lives in
//! [`anchorage_console::cli`]; this parses the command line, runs it, and maps the outcome to
//! an exit code.

use std::process::ExitCode;

use anchorage_console::cli;

fn main() -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: runtime: cannot start the async runtime: {e}");
            return ExitCode::from(cli::exit::FAILURE);
        }
    };
    // `--version`: the client's, then the anchor's when it answers within 2 s.
    // The anchor is found as for any command (flags, environment, context, its CA).
    if cli::version_request(std::env::args_os()).is_some() {
        let mut stdout = std::io::stdout();
        return match runtime.block_on(cli::print_version_for(std::env::args_os(), &mut stdout)) {
            Ok(()) => ExitCode::SUCCESS,
            Err(_) => ExitCode::from(cli::exit::FAILURE),
        };
    }
    let args = match cli::parse_from(std::env::args_os()) {
        Ok(args) => args,
        // Prints help (exit 0) or the usage error (exit 2).
        Err(e) => e.exit(),
    };
    let mut stdout = std::io::stdout();
    let shutdown = async {
        // Without a Ctrl-C handler, wait forever: the default SIGINT still ends the process.
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    match runtime.block_on(cli::run(args, &mut stdout, shutdown)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(e.exit)
        }
    }
}
