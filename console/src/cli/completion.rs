//! `anchorctl completion SHELL`: the shell completion script, made by clap_complete from
//! [`Cli`](super::Cli)'s command, so it always knows every command and flag.

use std::io::Write;

use clap::CommandFactory;

/// Writes the completion script of `anchorctl` for `shell` to `out`.
pub fn write(shell: clap_complete::Shell, out: &mut dyn Write) {
    clap_complete::generate(shell, &mut super::Cli::command(), "anchorctl", out);
}
