//! `anchorctl`: the operator CLI of Anchorage. All logic lives in
//! [`anchorage_console::cli`]; this parses the command line, runs it, and maps the outcome to
//! an exit code.

use std::process::ExitCode;

use anchorage_console::cli;

fn main() -> ExitCode {
    let args = match cli::parse_from(std::env::args_os()) {
        Ok(args) => args,
        // Prints help/version (exit 0) or the usage error (exit 2).
        Err(e) => e.exit(),
    };
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
