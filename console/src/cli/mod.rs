//! `anchorctl`, the operator CLI: argument types ([`Cli`]), [`parse_from`], and [`run`], which
//! the binary calls and tests call in-process.
//!
//! Output contract: with `--json` every command prints exactly one JSON document to stdout
//! (`events` prints one JSON object per line); without it, text for people. Errors go to
//! stderr as `error: <code>: <message>`, and the process exits with one of [`exit`]'s codes.

pub mod completion;
pub mod context;
pub mod format;
pub mod mesh;
pub mod policy;
pub mod resolve;
mod watch;

use std::ffi::OsString;
use std::future::Future;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use anchorage_wire::duration::{format_duration, parse_duration};
use clap::error::ErrorKind;
use clap::parser::ValueSource;
use clap::{Args, CommandFactory, FromArgMatches, Parser, Subcommand, ValueEnum};
use futures_util::{Stream, StreamExt};
use serde::Serialize;
use time::OffsetDateTime;

use crate::api::*;
use crate::client::{ClientError, ControlPlaneClient};
use format::*;

/// Console URL used when neither `--url` nor `ANCHORAGE_URL` is given.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7142";

/// Token file used when no token is given and it exists (the anchor's default data dir).
pub const DEFAULT_TOKEN_FILE: &str = "anchorage-data/owner.token";

/// Shortest and longest pairing code lifetime.
pub const TTL_RANGE: (Duration, Duration) = (Duration::from_secs(30), Duration::from_secs(86_400));

/// Longest invocation timeout `anchorctl invoke` accepts.
pub const MAX_INVOKE_TIMEOUT: Duration = Duration::from_secs(86_400);

/// Exit codes of `anchorctl` (the last three from BSD `sysexits.h`).
pub mod exit {
    /// It worked.
    pub const SUCCESS: u8 = 0;
    /// The operation failed: an API error, or an invocation that did not succeed.
    pub const FAILURE: u8 = 1;
    /// The command line is wrong (clap's own errors).
    pub const USAGE: u8 = 2;
    /// Input the user gave is bad: a duration, `--input` JSON, a file, the URL.
    pub const BAD_INPUT: u8 = 64;
    /// A file the user gave was read but the anchor refused its content: a policy file with
    /// errors (each printed as `FILE:LINE:COLUMN: message`).
    pub const DATA_ERROR: u8 = 65;
    /// The anchor cannot be reached.
    pub const UNAVAILABLE: u8 = 69;
    /// No token, or the token is refused (401) or lacks the permission (403).
    pub const AUTH: u8 = 77;
}

const GLOBAL: &str = "Global options";

/// First pause before `events` reconnects; it doubles up to [`EVENTS_RETRY_MAX`].
const EVENTS_RETRY_FIRST: Duration = Duration::from_secs(1);
/// Longest pause between `events` reconnection attempts.
const EVENTS_RETRY_MAX: Duration = Duration::from_secs(30);

const AFTER_HELP: &str = "\
Devices are given by id, a unique prefix of one (4 characters or more), or name.

Exit codes: 0 success, 1 operation failed, 2 usage, 64 bad input, 65 data error (a policy
file with errors), 69 anchor unreachable, 77 authentication or permission refused.

Each of the URL, token and CA file comes from its flag, else its environment variable, else
the context (--context NAME, else the config file's current one), else its default. The
token: --token, --token-file, ANCHORAGE_TOKEN, ANCHORAGE_TOKEN_FILE, the context's token
file, ./anchorage-data/owner.token. An https URL needs a CA file (--ca-file, ANCHORAGE_CA_FILE,
the context's, or ./anchorage-data/ca.pem); a certificate that does not verify exits 64.";

/// Operate an Anchorage anchor through its console API.
#[derive(Debug, Parser)]
#[command(name = "anchorctl", version, after_help = AFTER_HELP)]
pub struct Cli {
    /// Console URL of the anchor (http:// or https://).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "ANCHORAGE_URL",
        default_value = DEFAULT_URL,
        value_name = "URL"
    )]
    pub url: String,

    /// Bearer token. Prefer ANCHORAGE_TOKEN or --token-file: other users can read command lines.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "ANCHORAGE_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    pub token: Option<String>,

    /// File holding the bearer token (default: ./anchorage-data/owner.token if it exists).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "ANCHORAGE_TOKEN_FILE",
        value_name = "FILE"
    )]
    pub token_file: Option<PathBuf>,

    /// CA certificate (PEM) an https console's certificate must chain to, e.g. the anchor's
    /// ca.pem (default: ./anchorage-data/ca.pem if it exists).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "ANCHORAGE_CA_FILE",
        value_name = "FILE"
    )]
    pub ca_file: Option<PathBuf>,

    /// Use this context of the config file (default: its current context).
    #[arg(long, global = true, help_heading = GLOBAL, value_name = "NAME")]
    pub context: Option<String>,

    /// anchorctl's config file, with the contexts (default:
    /// $XDG_CONFIG_HOME/anchorage/config.toml, else ~/.config/anchorage/config.toml).
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        env = "ANCHORAGE_CONFIG",
        value_name = "FILE"
    )]
    pub config: Option<PathBuf>,

    /// Where the URL, token, token file and CA file came from (set by [`parse_from`]).
    #[arg(skip)]
    pub origins: context::Origins,

    /// Print JSON for scripts instead of text for people.
    #[arg(long, global = true, help_heading = GLOBAL)]
    pub json: bool,

    /// Output format: `text` for people (the default) or `json` (same as --json).
    #[arg(
        short = 'o',
        long,
        global = true,
        help_heading = GLOBAL,
        value_enum,
        default_value_t = OutputFormat::Text,
        value_name = "FORMAT"
    )]
    pub output: OutputFormat,

    /// Colour state words: auto (on a terminal, unless NO_COLOR is set), always, never.
    #[arg(
        long,
        global = true,
        help_heading = GLOBAL,
        value_enum,
        default_value_t = ColorChoice::Auto,
        value_name = "WHEN"
    )]
    pub color: ColorChoice,

    /// Whether `token` came from `ANCHORAGE_TOKEN` rather than `--token` (set by
    /// [`parse_from`]; an explicit `--token-file` beats the environment).
    #[arg(skip)]
    pub token_from_env: bool,

    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The commands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Pair devices: mint codes, list, approve and reject pairing requests.
    #[command(subcommand)]
    Pair(PairCommand),
    /// Trusted devices: list, show, revoke, rotate, remove.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// API tokens: create, list, revoke.
    #[command(subcommand)]
    Token(TokenCommand),
    /// The inventory: every device with trust, presence, link quality and warnings.
    Inventory(InventoryArgs),
    /// Run a capability on a node, or with -l on every device a selector matches, and print
    /// the result.
    Invoke(InvokeArgs),
    /// Batches (invocations on many devices): show, list.
    #[command(subcommand)]
    Batch(BatchCommand),
    /// Past and running invocations.
    #[command(subcommand)]
    Invocation(InvocationCommand),
    /// Follow the anchor's event stream until Ctrl-C, reconnecting when it drops.
    Events(EventsArgs),
    /// The audit log: every trust decision, who made it and when, newest first.
    Audit(AuditArgs),
    /// The mesh policy (which node may reach which peer, for what): set, show, test,
    /// history.
    #[command(subcommand)]
    Policy(policy::PolicyCommand),
    /// List registered nodes (same as `node list`).
    Nodes,
    /// Registered nodes: list, show.
    #[command(subcommand)]
    Node(NodeCommand),
    /// The live anchors of the mesh: id, version, addresses, uptime, nodes, store, lease.
    Instances,
    /// Check whether the anchor is up and ready (exit 0 ready, 1 starting, 69 unreachable).
    Health,
    /// Named anchors (URL, token file, CA file) in anchorctl's config file: add, use, list,
    /// remove.
    #[command(subcommand)]
    Context(context::ContextCommand),
    /// Print the anchor's Prometheus metrics.
    Metrics,
    /// The peer connections of the mesh, as the nodes report them: which pairs reach each
    /// other directly or through the anchor's relay, the address in use, the round-trip time
    /// and since when (--json: the links array).
    Mesh,
    /// Print a shell completion script to stdout, e.g. `anchorctl completion bash >
    /// /etc/bash_completion.d/anchorctl`, or `source <(anchorctl completion zsh)`.
    Completion {
        /// The shell: bash, zsh, fish (also elvish, powershell).
        shell: clap_complete::Shell,
    },
}

/// `-o` / `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum OutputFormat {
    /// Text for people.
    Text,
    /// JSON for scripts, as --json.
    Json,
}

/// How a pairing code is delivered.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MethodArg {
    /// A short code a person types on the node.
    Pin,
    /// A URI shown as a QR code, which also pins the anchor's CA.
    Qr,
}

/// `anchorctl pair ...`
#[derive(Debug, Subcommand)]
pub enum PairCommand {
    /// Mint a pairing code for a new device.
    Code {
        /// PIN (typed) or QR (scanned).
        #[arg(long, value_enum, default_value_t = MethodArg::Pin)]
        method: MethodArg,
        /// How long the code works: 30s to 24h, e.g. 90, 30s, 10m, 2h, 1d (default 10m).
        #[arg(long, value_name = "DURATION")]
        ttl: Option<String>,
        /// A label the device gets when approved, `key=value`; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
    },
    /// List pairing requests, newest first.
    List {
        /// Only requests in this state.
        #[arg(long, value_parser = parse_request_state, value_name = "STATE")]
        state: Option<RequestState>,
    },
    /// Show one pairing request.
    Show {
        /// Request id, or a unique prefix of one.
        request_id: String,
    },
    /// List pairing codes (never their secrets).
    Codes,
    /// Approve a pending request: check that its SAS matches what the node shows first.
    Approve {
        /// Request id, or a unique prefix of one.
        request_id: String,
        /// A label the device gets besides its code's, `key=value`; repeat for several.
        #[arg(long = "label", value_name = "KEY=VALUE", value_parser = parse_label_arg)]
        labels: Vec<(String, String)>,
    },
    /// Reject a pending request.
    Reject {
        /// Request id, or a unique prefix of one.
        request_id: String,
        /// Why (kept in the audit log and sent to the node).
        #[arg(long)]
        reason: Option<String>,
    },
}

/// `anchorctl device ...`
#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List devices.
    List {
        /// Only devices whose labels match this selector, e.g. `site=lab,role in (camera)`.
        #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
        selector: Option<String>,
        /// Only devices in this trust state: trusted, revoked.
        #[arg(long, value_name = "TRUST")]
        trust: Option<TrustState>,
    },
    /// Show one device's trust record.
    Show {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
    },
    /// Revoke a device: its connection closes now and its next handshake is refused.
    Revoke {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
        /// Why (kept in the audit log).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Ask a device to rotate its certificate now.
    Rotate {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
    },
    /// Remove a device (a revoked device can then pair again).
    Remove {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
    },
    /// Set labels (`key=value`) and remove them (`key-`), e.g. `site=lab role-`.
    Label {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
        /// `key=value` to set, `key-` to remove; applied in order.
        #[arg(required = true, value_name = "KEY=VALUE|KEY-")]
        changes: Vec<String>,
    },
}

/// `anchorctl token ...`
#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create a token; its secret is printed once.
    Create {
        /// A permission: observability.read, trust.operate, nodes.invoke, tokens.manage.
        /// Repeat for several.
        #[arg(long = "perm", required = true, value_parser = parse_permission, value_name = "PERMISSION")]
        perms: Vec<Permission>,
        /// A name for people.
        #[arg(long)]
        name: Option<String>,
        /// Limit the token to devices this label selector matches, e.g. site=lab (it sees
        /// and acts on no other device).
        #[arg(long, value_name = "SELECTOR")]
        selector: Option<String>,
        /// Limit the token to capabilities matching this pattern (`*` matches anything, e.g.
        /// 'system.*'); repeat for several.
        #[arg(long = "capability", value_name = "PATTERN")]
        capabilities: Vec<String>,
        /// The token stops working after this long, e.g. 12h, 30d (default: never).
        #[arg(long, value_name = "DURATION")]
        expires: Option<String>,
    },
    /// List tokens (never their secrets), with their limits, expiry and last use.
    List,
    /// Revoke a token.
    Revoke {
        /// Token id.
        id: String,
    },
}

/// `anchorctl audit [--target ID] [--limit N]`
#[derive(Debug, Args)]
pub struct AuditArgs {
    /// Only entries about this device, request, code or token id (a device's approvals too);
    /// a device may also be given by name or id prefix.
    #[arg(long, value_name = "ID")]
    pub target: Option<String>,
    /// At most this many, 1 or more (the anchor's default is 100, its maximum 1000).
    #[arg(long, value_name = "N")]
    pub limit: Option<usize>,
}

/// `anchorctl events [--no-reconnect]`
#[derive(Debug, Args)]
pub struct EventsArgs {
    /// Exit (code 69) when the stream drops instead of reconnecting.
    #[arg(long)]
    pub no_reconnect: bool,
}

/// `anchorctl inventory [show ID]`
#[derive(Debug, Args)]
pub struct InventoryArgs {
    /// Show one device instead of the whole inventory.
    #[command(subcommand)]
    pub show: Option<InventoryCommand>,
    /// Only devices whose labels match this selector, e.g. `site=lab,!decommissioned`.
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// Only devices with this presence: online, degraded, stale, offline, unknown.
    #[arg(long, value_name = "PRESENCE")]
    pub presence: Option<Presence>,
    /// Only devices in this trust state: trusted, revoked, pending, unknown.
    #[arg(long, value_name = "TRUST")]
    pub trust: Option<TrustState>,
    /// Redraw the table whenever a device's presence changes, until Ctrl-C (with --json:
    /// one JSON document per change, one line each).
    #[arg(short = 'w', long)]
    pub watch: bool,
}

/// `anchorctl inventory show ID`
#[derive(Debug, Subcommand)]
pub enum InventoryCommand {
    /// One device's inventory entry in full.
    Show {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
    },
}

/// `anchorctl invoke DEVICE_ID CAPABILITY ...`, `anchorctl invoke -l SELECTOR CAPABILITY ...`
#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  anchorctl invoke 3F2K-... system.health
  anchorctl invoke -l site=lab,role=camera system.health --timeout 1m --max-concurrency 50

With -l the exit code is 0 only if every device's invocation succeeded.")]
pub struct InvokeArgs {
    /// Run on every trusted device this label selector matches now (a batch), offline ones
    /// included: theirs wait for them until the deadline.
    #[arg(short = 'l', long = "selector", value_name = "SELECTOR")]
    pub selector: Option<String>,
    /// DEVICE CAPABILITY (the device by id, unique id prefix or name), or with -l only
    /// CAPABILITY (e.g. echo, system.health).
    #[arg(value_name = "DEVICE|CAPABILITY", num_args = 1..=2, required = true)]
    pub targets: Vec<String>,
    /// With -l: at most this many invocations unfinished at once (default: all at once).
    #[arg(long, value_name = "N", requires = "selector")]
    pub max_concurrency: Option<u32>,
    /// Input as JSON (default null).
    #[arg(long, value_name = "JSON", conflicts_with = "input_file")]
    pub input: Option<String>,
    /// Read the JSON input from a file, or from stdin with `-`.
    #[arg(long, value_name = "PATH|-")]
    pub input_file: Option<PathBuf>,
    /// Deadline, e.g. 30s, 2m (default 30s). A node that is offline until then never runs it.
    #[arg(long, value_name = "DURATION")]
    pub timeout: Option<String>,
    /// Return at once with the queued invocation instead of waiting for its result.
    #[arg(long = "async")]
    pub async_: bool,
}

/// `anchorctl batch ...`
#[derive(Debug, Subcommand)]
pub enum BatchCommand {
    /// Show one batch: its counts and every device's invocation.
    Show {
        /// Batch id.
        id: String,
    },
    /// List batches, newest first.
    List {
        /// At most this many, 1 or more (default 50).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

/// `anchorctl invocation ...`
#[derive(Debug, Subcommand)]
pub enum InvocationCommand {
    /// Show one invocation with its output.
    Show {
        /// Invocation id.
        id: String,
    },
    /// List invocations, newest first.
    List {
        /// Only this device's (id, unique id prefix, or name).
        #[arg(long, value_name = "DEVICE")]
        device: Option<String>,
        /// At most this many, 1 or more (the anchor's default is 100).
        #[arg(long, value_name = "N")]
        limit: Option<usize>,
    },
}

/// `anchorctl node ...`
#[derive(Debug, Subcommand)]
pub enum NodeCommand {
    /// List registered nodes.
    List,
    /// Show one node with its capabilities.
    Show {
        /// Device id, a unique prefix of one, or a device name.
        id: String,
    },
}

/// Why `anchorctl` failed: printed as `error: <code>: <message>`, exits with `exit`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct CliError {
    /// Process exit code (see [`exit`]).
    pub exit: u8,
    /// Stable code: the API's code, or `unreachable`, `bad_input`, `no_token`, ...
    pub code: String,
    /// For people.
    pub message: String,
}

impl CliError {
    /// A new error.
    pub fn new(exit: u8, code: impl Into<String>, message: impl Into<String>) -> Self {
        CliError {
            exit,
            code: code.into(),
            message: message.into(),
        }
    }

    fn bad_input(message: impl Into<String>) -> Self {
        Self::new(exit::BAD_INPUT, "bad_input", message)
    }

    fn usage(message: impl Into<String>) -> Self {
        Self::new(exit::USAGE, "usage", message)
    }
}

fn plural(n: usize, word: &str) -> String {
    if n == 1 {
        format!("1 {word}")
    } else {
        format!("{n} {word}s")
    }
}

impl From<ClientError> for CliError {
    fn from(e: ClientError) -> Self {
        let exit = exit_code(&e);
        match e {
            ClientError::Api { code, message, .. } => CliError::new(exit, code, message),
            ClientError::Http(_) => CliError::new(exit, "unreachable", e.to_string()),
            ClientError::BadUrl(m) => CliError::new(exit, "bad_url", m),
            ClientError::BadToken(m) => CliError::new(exit, "bad_token", m),
            ClientError::BadCa(m) => CliError::new(exit, "bad_ca", m),
            ClientError::Certificate(m) => CliError::new(exit, "certificate", m),
            other => CliError::new(exit, "unexpected_answer", other.to_string()),
        }
    }
}

/// The exit code for a client error: 77 for 401/403, 69 when the anchor cannot be reached,
/// 64 for a bad URL, token or CA, or a console certificate that does not verify with the CA
/// given, 1 otherwise.
pub fn exit_code(e: &ClientError) -> u8 {
    match e {
        ClientError::Api {
            status: 401 | 403, ..
        } => exit::AUTH,
        ClientError::Api { .. } => exit::FAILURE,
        ClientError::Http(_) => exit::UNAVAILABLE,
        ClientError::BadUrl(_)
        | ClientError::BadToken(_)
        | ClientError::BadCa(_)
        | ClientError::Certificate(_) => exit::BAD_INPUT,
        _ => exit::FAILURE,
    }
}

/// Parses the command line (`args` includes the program name).
///
/// Beyond clap: records whether the token came from the environment, and refuses `--token`
/// with `--token-file`.
pub fn parse_from<I, T>(args: I) -> Result<Cli, clap::Error>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut command = Cli::command();
    let matches = command.try_get_matches_from_mut(args)?;
    let mut cli = Cli::from_arg_matches(&matches).map_err(|e| e.format(&mut command))?;
    let origin = |id: &str| match matches.value_source(id) {
        Some(ValueSource::CommandLine) => context::Origin::Flag,
        Some(ValueSource::EnvVariable) => context::Origin::Env,
        _ => context::Origin::Unset,
    };
    cli.origins = context::Origins {
        url: origin("url"),
        token: origin("token"),
        token_file: origin("token_file"),
        ca_file: origin("ca_file"),
    };
    cli.token_from_env = matches.value_source("token") == Some(ValueSource::EnvVariable);
    if cli.token.is_some() && !cli.token_from_env && cli.origins.token_file == context::Origin::Flag
    {
        return Err(command.error(
            ErrorKind::ArgumentConflict,
            "--token and --token-file cannot be used together",
        ));
    }
    Ok(cli)
}

/// Runs one command, printing to `out`. `shutdown` ends `events` and `inventory --watch`
/// (Ctrl-C in the binary).
pub async fn run(
    cli: Cli,
    out: &mut (dyn Write + Send),
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    if let Command::Context(command) = &cli.command {
        return ignore_broken_pipe(context::run(&cli, command, out));
    }
    if let Command::Completion { shell } = cli.command {
        completion::write(shell, out);
        return Ok(());
    }
    // A malformed URL (or an https URL without a CA) is bad input whatever the token (64),
    // before looking for one.
    let target = target(&cli)?;
    let ca = target.ca()?;
    let anonymous = ControlPlaneClient::with_ca(&target.url, "anonymous", ca.as_ref())?;
    let token = match (&cli.command, target.token()) {
        (_, Ok(token)) => token,
        // /healthz needs no token; the client still wants one to hold.
        (Command::Health, Err(_)) => "anonymous".to_string(),
        (_, Err(e)) => {
            // No token for an anchor that is not there: say that it is not there (69).
            return match anonymous.healthz().await {
                Err(unreachable @ ClientError::Http(_)) => Err(unreachable.into()),
                _ => Err(e),
            };
        }
    };
    let client = ControlPlaneClient::with_ca(&target.url, token, ca.as_ref())?;
    let color = {
        use std::io::IsTerminal;
        let no_color = std::env::var("NO_COLOR").ok();
        let term = std::env::var("TERM").ok();
        color_enabled(
            cli.color,
            no_color.as_deref(),
            term.as_deref(),
            std::io::stdout().is_terminal(),
        )
    };
    let mut ctx = Ctx {
        client,
        json: cli.json || cli.output == OutputFormat::Json,
        color,
        out,
        now: OffsetDateTime::now_utc(),
    };
    ignore_broken_pipe(ctx.dispatch(cli.command, shutdown).await)
}

/// How long `anchorctl --version` waits for the anchor's version.
pub const VERSION_TIMEOUT: Duration = Duration::from_secs(2);

/// `Some(console URL)` when `args` ask for `--version` (or `-V`): the binary then calls
/// [`print_version`] instead of [`parse_from`], which would print only the client's.
pub fn version_request<I, T>(args: I) -> Option<String>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let command = Cli::command()
        .disable_version_flag(true)
        .subcommand_required(false)
        .ignore_errors(true)
        .arg(
            clap::Arg::new("print_version")
                .short('V')
                .long("version")
                .action(clap::ArgAction::SetTrue),
        );
    let matches = command.try_get_matches_from(args).ok()?;
    if !matches.get_flag("print_version") {
        return None;
    }
    Some(
        matches
            .get_one::<String>("url")
            .cloned()
            .unwrap_or_else(|| DEFAULT_URL.to_string()),
    )
}

/// Prints `anchorctl VERSION`, then `anchor: VERSION (URL)` or `anchor: unreachable
/// (why)`, asking the anchor at `url` for at most [`VERSION_TIMEOUT`] (no token needed).
pub async fn print_version(url: &str, out: &mut dyn Write) -> std::io::Result<()> {
    write_version(
        ControlPlaneClient::new(url, "anonymous").map_err(CliError::from),
        out,
    )
    .await
}

/// [`print_version`] for the anchor the command line `args` designate, as any command
/// would reach it: `--url`, the environment or the context, and for an https URL the CA file
/// of the flags, the environment or the context. `args` are the whole command line, with
/// `--version` in it or not.
pub async fn print_version_for<I, T>(args: I, out: &mut dyn Write) -> std::io::Result<()>
where
    I: IntoIterator<Item = T>,
    T: Into<OsString> + Clone,
{
    let mut args: Vec<OsString> = args
        .into_iter()
        .map(Into::into)
        .filter(|a| a != "--version" && a != "-V")
        .collect();
    // Any command will do to parse the global options; `health` takes no arguments.
    args.push("health".into());
    let client = parse_from(args)
        .map_err(|e| CliError::bad_input(e.to_string().trim().to_string()))
        .and_then(|cli| {
            let target = target(&cli)?;
            let ca = target.ca()?;
            Ok(ControlPlaneClient::with_ca(
                &target.url,
                "anonymous",
                ca.as_ref(),
            )?)
        });
    write_version(client, out).await
}

async fn write_version(
    client: Result<ControlPlaneClient, CliError>,
    out: &mut dyn Write,
) -> std::io::Result<()> {
    writeln!(out, "anchorctl {}", env!("CARGO_PKG_VERSION"))?;
    let anchor = match client {
        Err(e) => format!("unreachable ({e})"),
        Ok(client) => match client.anchor_version(VERSION_TIMEOUT).await {
            Ok(Some(version)) => format!("{version} ({})", client.base_url()),
            Ok(None) => format!("version unknown ({})", client.base_url()),
            Err(ClientError::Http(e)) if e.is_timeout() => format!(
                "unreachable (no answer from {} within {}s)",
                client.base_url(),
                VERSION_TIMEOUT.as_secs()
            ),
            Err(e) => format!("unreachable ({e})"),
        },
    };
    writeln!(out, "anchor: {anchor}")?;
    out.flush()
}

/// `--limit N`: at least 1 (0 would be read as one row by the anchor).
fn check_limit(limit: Option<usize>) -> Result<Option<usize>, CliError> {
    match limit {
        Some(0) => Err(CliError::bad_input("--limit must be at least 1")),
        other => Ok(other),
    }
}

/// `anchorctl … | head` closes stdout early: that is not a failure.
fn ignore_broken_pipe(result: Result<(), CliError>) -> Result<(), CliError> {
    match result {
        Err(e) if e.code == "broken_pipe" => Ok(()),
        other => other,
    }
}

/// The URL, token and CA of a command: flags, environment, context, defaults
/// ([`context::resolve`]).
fn target(cli: &Cli) -> Result<context::Target, CliError> {
    let context = context::selected(cli.config.as_deref(), cli.context.as_deref())?;
    let o = cli.origins;
    let with = |v: Option<PathBuf>, origin| v.map(|v| (v, origin));
    let given = context::Given {
        url: (o.url != context::Origin::Unset).then(|| (cli.url.clone(), o.url)),
        token: cli.token.clone().map(|t| (t, o.token)),
        token_file: with(cli.token_file.clone(), o.token_file),
        ca_file: with(cli.ca_file.clone(), o.ca_file),
    };
    Ok(context::resolve(&given, context.as_ref()))
}

fn read_token_file(path: &Path) -> Result<String, CliError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        CliError::bad_input(format!("cannot read token file {}: {e}", path.display()))
    })?;
    let token = text.trim();
    if token.is_empty() {
        return Err(CliError::bad_input(format!(
            "token file {} is empty",
            path.display()
        )));
    }
    Ok(token.to_string())
}

fn parse_request_state(s: &str) -> Result<RequestState, String> {
    s.parse::<RequestState>().map_err(|_| {
        "expected one of: pending_approval, approved, completed, rejected, expired".to_string()
    })
}

fn parse_permission(s: &str) -> Result<Permission, String> {
    s.parse()
}

/// Parses `--label key=value`.
pub fn parse_label_arg(text: &str) -> Result<(String, String), String> {
    anchorage_wire::labels::parse_label(text).map_err(|e| e.to_string())
}

/// The pairing code lifetime in whole seconds, checked against [`TTL_RANGE`].
pub fn parse_ttl(text: &str) -> Result<u64, String> {
    let ttl = parse_duration(text).map_err(|e| format!("--ttl: {e}"))?;
    let (min, max) = TTL_RANGE;
    if ttl < min || ttl > max {
        return Err(format!(
            "--ttl {text} is out of range: a pairing code lives {} to {}",
            format_duration(min),
            format_duration(max)
        ));
    }
    Ok(ttl.as_secs())
}

/// The invocation timeout in milliseconds (1 ms to [`MAX_INVOKE_TIMEOUT`]).
pub fn parse_invoke_timeout(text: &str) -> Result<u64, String> {
    let timeout = parse_duration(text).map_err(|e| format!("--timeout: {e}"))?;
    // Sub-millisecond units parse, but the API counts whole milliseconds.
    if timeout < Duration::from_millis(1) || timeout > MAX_INVOKE_TIMEOUT {
        return Err(format!(
            "--timeout {text} is out of range: at least 1ms and at most {}",
            format_duration(MAX_INVOKE_TIMEOUT)
        ));
    }
    u64::try_from(timeout.as_millis()).map_err(|_| format!("--timeout {text} is too long"))
}

/// The `--input` / `--input-file` JSON (`null` when neither is given).
fn invoke_input(args: &InvokeArgs) -> Result<serde_json::Value, CliError> {
    let (text, source) = match (&args.input, &args.input_file) {
        (Some(text), _) => (text.clone(), "--input".to_string()),
        (None, Some(path)) if path.as_os_str() == "-" => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|e| CliError::bad_input(format!("cannot read stdin: {e}")))?;
            (text, "stdin".to_string())
        }
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path).map_err(|e| {
                CliError::bad_input(format!("cannot read input file {}: {e}", path.display()))
            })?;
            (text, path.display().to_string())
        }
        (None, None) => return Ok(serde_json::Value::Null),
    };
    serde_json::from_str(&text)
        .map_err(|e| CliError::bad_input(format!("invalid JSON in {source}: {e}")))
}

/// What a command needs while it runs.
struct Ctx<'a> {
    client: ControlPlaneClient,
    json: bool,
    /// Whether text keeps its colours ([`color_enabled`]); without, `write` strips them.
    color: bool,
    out: &'a mut (dyn Write + Send),
    now: OffsetDateTime,
}

impl Ctx<'_> {
    async fn dispatch(
        &mut self,
        command: Command,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CliError> {
        match command {
            Command::Pair(cmd) => self.pair(cmd).await,
            Command::Device(cmd) => self.device(cmd).await,
            Command::Token(cmd) => self.token(cmd).await,
            Command::Policy(cmd) => self.policy(cmd).await,
            Command::Inventory(InventoryArgs {
                show: None,
                selector,
                presence,
                trust,
                watch,
            }) => {
                let filter = DeviceFilter {
                    selector,
                    presence,
                    trust,
                };
                if watch {
                    return self.watch_inventory(&filter, shutdown).await;
                }
                let inventory = self.client.inventory_filtered(&filter).await?;
                self.emit(&inventory, |now| human_inventory(&inventory, now))
            }
            Command::Inventory(InventoryArgs {
                show: Some(InventoryCommand::Show { id }),
                ..
            }) => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let device = self.client.inventory_device(&id).await?;
                self.emit(&device, |now| human_inventory_device(&device, now))
            }
            Command::Instances => {
                let list = self.client.inventory().await?.instances;
                self.emit(&list, |now| human_instances(&list, now))
            }
            Command::Invoke(args) if args.selector.is_some() => self.invoke_batch(args).await,
            Command::Invoke(args) => self.invoke(args).await,
            Command::Batch(BatchCommand::Show { id }) => {
                let batch = self.client.batch(&id).await?;
                self.emit(&batch, |now| human_batch(&batch, now))?;
                batch_outcome(&batch, false)
            }
            Command::Batch(BatchCommand::List { limit }) => {
                let limit = check_limit(limit)?;
                let list = self.client.list_batches(limit).await?;
                self.emit(&list, |now| human_batches(&list, now))
            }
            Command::Invocation(InvocationCommand::Show { id }) => {
                let invocation = self.client.invocation(&id).await?;
                self.emit(&invocation, |now| human_invocation(&invocation, now))
            }
            Command::Invocation(InvocationCommand::List { device, limit }) => {
                let limit = check_limit(limit)?;
                let device = match device {
                    Some(d) => Some(
                        resolve::Lookup(&self.client)
                            .device_id(&d)
                            .await?
                            .parse()
                            .map_err(|_| {
                                CliError::bad_input(format!("--device {d}: not a device id"))
                            })?,
                    ),
                    None => None,
                };
                let list = self
                    .client
                    .list_invocations(InvocationQuery {
                        device_id: device,
                        limit,
                    })
                    .await?;
                self.emit(&list, |now| human_invocations(&list, now))
            }
            Command::Events(args) => self.events(!args.no_reconnect, shutdown).await,
            Command::Audit(AuditArgs { target, limit }) => {
                let limit = check_limit(limit)?;
                let target = match target {
                    Some(t) => Some(resolve::Lookup(&self.client).audit_target(t).await?),
                    None => None,
                };
                let list = self
                    .client
                    .audit(AuditQuery {
                        target,
                        limit,
                        ..Default::default()
                    })
                    .await?;
                self.emit(&list, |now| human_audit(&list, now))
            }
            Command::Nodes | Command::Node(NodeCommand::List) => {
                let nodes = self.client.list_nodes().await?;
                self.emit(&nodes, |now| human_nodes(&nodes, now))
            }
            Command::Node(NodeCommand::Show { id }) => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let node = self.client.node(&id).await?;
                self.emit(&node, |now| human_node(&node, now))
            }
            // Run by `run` before a client is made: contexts need no console.
            Command::Context(_) => Err(CliError::usage("context commands need no console")),
            Command::Health => {
                let ready = self.client.healthz().await?;
                let status = if ready { "ok" } else { "starting" };
                self.emit(&serde_json::json!({ "status": status }), |_| {
                    format!("{}\n", if ready { "ready" } else { "starting" })
                })?;
                if ready {
                    Ok(())
                } else {
                    Err(CliError::new(
                        exit::FAILURE,
                        "starting",
                        "the anchor is up but not ready yet",
                    ))
                }
            }
            Command::Mesh => {
                let links = self.client.mesh().await?.links;
                self.emit(&links, |now| mesh::human_mesh(&links, now))
            }
            // Answered by `run` before a client exists.
            Command::Completion { .. } => Ok(()),
            Command::Metrics => {
                let text = self.client.metrics().await?;
                if self.json {
                    self.write_json(&serde_json::json!({ "metrics": text }))
                } else {
                    self.write(&text)
                }
            }
        }
    }

    async fn pair(&mut self, cmd: PairCommand) -> Result<(), CliError> {
        match cmd {
            PairCommand::Code {
                method,
                ttl,
                labels,
            } => {
                let ttl_secs = ttl
                    .as_deref()
                    .map(parse_ttl)
                    .transpose()
                    .map_err(CliError::bad_input)?;
                let method = match method {
                    MethodArg::Pin => PairMethod::Pin,
                    MethodArg::Qr => PairMethod::Qr,
                };
                let code = self
                    .client
                    .mint_code(MintCodeRequest {
                        method,
                        ttl_secs,
                        labels: labels.into_iter().collect(),
                    })
                    .await?;
                self.emit(&code, |now| human_code(&code, now))
            }
            PairCommand::List { state } => {
                let list = self.client.list_requests(state).await?;
                self.emit(&list, |now| human_requests(&list, now))
            }
            PairCommand::Show { request_id } => {
                let request_id = resolve::Lookup(&self.client)
                    .request_id(&request_id)
                    .await?;
                let req = self.client.request(&request_id).await?;
                self.emit(&req, |now| human_request(&req, now))
            }
            PairCommand::Codes => {
                let codes = self.client.list_codes().await?;
                self.emit(&codes, |now| human_codes(&codes, now))
            }
            PairCommand::Approve { request_id, labels } => {
                let request_id = resolve::Lookup(&self.client)
                    .request_id(&request_id)
                    .await?;
                let req = self
                    .client
                    .approve_labelled(&request_id, labels.into_iter().collect())
                    .await?;
                self.emit(&req, |_| {
                    format!(
                        "approved pairing request {} for {} ({}); state {}\n",
                        req.request_id,
                        req.device_name,
                        req.device_id,
                        name(&req.state)
                    )
                })
            }
            PairCommand::Reject { request_id, reason } => {
                let request_id = resolve::Lookup(&self.client)
                    .request_id(&request_id)
                    .await?;
                let req = self.client.reject(&request_id, reason).await?;
                self.emit(&req, |_| {
                    format!(
                        "rejected pairing request {} for {} ({})\n",
                        req.request_id, req.device_name, req.device_id
                    )
                })
            }
        }
    }

    async fn device(&mut self, cmd: DeviceCommand) -> Result<(), CliError> {
        match cmd {
            DeviceCommand::List { selector, trust } => {
                let list = self
                    .client
                    .list_devices_filtered(&DeviceFilter {
                        selector,
                        presence: None,
                        trust,
                    })
                    .await?;
                self.emit(&list, |now| human_devices(&list, now))
            }
            DeviceCommand::Show { id } => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let device = self.client.device(&id).await?;
                self.emit(&device, |now| human_device(&device, now))
            }
            DeviceCommand::Revoke { id, reason } => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let device = self.client.revoke(&id, reason).await?;
                self.emit(&device, |_| {
                    format!("revoked device {} ({})\n", device.device_id, device.name)
                })
            }
            DeviceCommand::Rotate { id } => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let device = self.client.rotate(&id).await?;
                self.emit(&device, |_| {
                    format!(
                        "asked device {} ({}) to rotate its certificate\n",
                        device.device_id, device.name
                    )
                })
            }
            DeviceCommand::Label { id, changes } => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                let mut req = crate::api::LabelRequest::default();
                for text in &changes {
                    match text.parse::<anchorage_wire::labels::LabelChange>() {
                        Ok(anchorage_wire::labels::LabelChange::Set(k, v)) => {
                            req.set.insert(k, v);
                        }
                        Ok(anchorage_wire::labels::LabelChange::Remove(k)) => req.remove.push(k),
                        Err(e) => {
                            return Err(CliError::new(exit::BAD_INPUT, "bad_label", e.to_string()));
                        }
                    }
                }
                let device = self.client.label(&id, &req).await?;
                self.emit(&device, |_| {
                    format!(
                        "labels of {} ({}): {}\n",
                        device.device_id,
                        device.name,
                        labels_text(&device.labels)
                    )
                })
            }
            DeviceCommand::Remove { id } => {
                let id = resolve::Lookup(&self.client).device_id(&id).await?;
                self.client.remove(&id).await?;
                self.emit(
                    &serde_json::json!({ "device_id": id, "removed": true }),
                    |_| format!("removed device {id}\n"),
                )
            }
        }
    }

    async fn token(&mut self, cmd: TokenCommand) -> Result<(), CliError> {
        match cmd {
            TokenCommand::Create {
                perms,
                name,
                selector,
                capabilities,
                expires,
            } => {
                let mut permissions = perms;
                permissions.sort();
                permissions.dedup();
                let selector = selector
                    .as_deref()
                    .unwrap_or("")
                    .parse::<Selector>()
                    .map_err(|e| CliError::bad_input(format!("--selector: {e}")))?;
                let expires_in_secs = expires
                    .as_deref()
                    .map(|text| {
                        parse_duration(text)
                            .map_err(|e| format!("--expires: {e}"))
                            .and_then(|d| match d.as_secs() {
                                0 => Err(format!("--expires {text} is shorter than a second")),
                                s => Ok(s),
                            })
                    })
                    .transpose()
                    .map_err(CliError::bad_input)?;
                let token = self
                    .client
                    .create_token(CreateTokenRequest {
                        name,
                        permissions,
                        selector,
                        capabilities,
                        expires_in_secs,
                    })
                    .await?;
                self.emit(&token, |now| {
                    format!(
                        "created token {} ({}) with {}{}{}\n\n    {}\n\nThe secret is shown \
                         only this once; store it now.\n",
                        token.id,
                        token.name,
                        permissions_text(&token.permissions),
                        scope_text(&token.scope)
                            .map(|s| format!(", limited to {s}"))
                            .unwrap_or_default(),
                        token
                            .expires_at
                            .map(|at| format!(", expires {}", relative(at, now)))
                            .unwrap_or_default(),
                        token.token
                    )
                })
            }
            TokenCommand::List => {
                let list = self.client.list_tokens().await?;
                self.emit(&list, |now| human_tokens(&list, now))
            }
            TokenCommand::Revoke { id } => {
                let token = self.client.revoke_token(&id).await?;
                self.emit(&token, |_| {
                    format!("revoked token {} ({})\n", token.id, token.name)
                })
            }
        }
    }

    async fn invoke(&mut self, args: InvokeArgs) -> Result<(), CliError> {
        let input = invoke_input(&args)?;
        let timeout_ms = args
            .timeout
            .as_deref()
            .map(parse_invoke_timeout)
            .transpose()
            .map_err(CliError::bad_input)?;
        let [device_id, capability] =
            <[String; 2]>::try_from(args.targets.clone()).map_err(|_| {
                CliError::usage(
                    "give DEVICE_ID CAPABILITY, or -l SELECTOR CAPABILITY to run on many devices",
                )
            })?;
        let device_id = resolve::Lookup(&self.client).device_id(&device_id).await?;
        let started = std::time::Instant::now();
        let invocation = self
            .client
            .invoke(
                &device_id,
                InvokeRequest {
                    capability,
                    input,
                    timeout_ms,
                    async_: args.async_,
                },
            )
            .await?;
        let round_trip_ms = round_ms(started.elapsed().as_secs_f64() * 1000.0);
        if self.json {
            // The invocation as the API has it, and the time anchorctl waited for it.
            let mut doc = serde_json::to_value(&invocation).map_err(encode_error)?;
            if let Some(fields) = doc.as_object_mut() {
                fields.insert("round_trip_ms".into(), serde_json::json!(round_trip_ms));
            }
            self.write_json(&doc)?;
        } else {
            let text = human_invocation_timed(&invocation, Some(round_trip_ms), self.now);
            self.write(&text)?;
        }
        invocation_outcome(&invocation, args.async_)
    }

    /// `invoke -l`: creates a batch, then (unless `--async`) follows it to its end with a
    /// progress bar on a terminal, and prints every device's result.
    async fn invoke_batch(&mut self, args: InvokeArgs) -> Result<(), CliError> {
        let input = invoke_input(&args)?;
        let timeout_ms = args
            .timeout
            .as_deref()
            .map(parse_invoke_timeout)
            .transpose()
            .map_err(CliError::bad_input)?;
        let [capability] = <[String; 1]>::try_from(args.targets.clone()).map_err(|_| {
            CliError::usage("with -l SELECTOR give only the CAPABILITY, not a device id")
        })?;
        let selector: Selector = args
            .selector
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| CliError::bad_input(format!("-l: {e}")))?;
        let mut batch = self
            .client
            .create_batch(&BatchRequest {
                selector,
                capability,
                input,
                timeout_ms,
                max_concurrency: args.max_concurrency,
                devices: None,
            })
            .await?;
        if !args.async_ && !batch.info.done {
            batch = self.follow_batch(batch).await?;
        }
        self.emit(&batch, |now| human_batch(&batch, now))?;
        batch_outcome(&batch, args.async_)
    }

    /// Polls a batch until it is done, drawing a progress bar on stderr when it is a terminal
    /// (and not with --json).
    async fn follow_batch(&mut self, batch: Batch) -> Result<Batch, CliError> {
        use std::io::IsTerminal;
        let bar = (!self.json && std::io::stderr().is_terminal()).then(|| {
            let bar = indicatif::ProgressBar::new(u64::from(batch.info.total));
            bar.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {bar:30} {pos}/{len} done · {msg} · {elapsed}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            bar
        });
        let id = batch.info.batch_id;
        let mut current = batch;
        // The deadline bounds the wait; past it, the anchor ends what is left within a sweep.
        let give_up = tokio::time::Instant::now()
            + (current.info.deadline_at - OffsetDateTime::now_utc())
                .try_into()
                .unwrap_or(Duration::ZERO)
            + BATCH_FOLLOW_MARGIN;
        loop {
            if let Some(bar) = &bar {
                let i = &current.info;
                bar.set_position(u64::from(i.total - i.pending));
                bar.set_message(format!(
                    "{} succeeded, {} failed, {} timed out, {} rejected",
                    i.succeeded, i.failed, i.timed_out, i.rejected
                ));
            }
            if current.info.done || tokio::time::Instant::now() >= give_up {
                break;
            }
            tokio::time::sleep(BATCH_POLL).await;
            current = self.client.batch(&id).await?;
        }
        if let Some(bar) = bar {
            bar.finish_and_clear();
        }
        Ok(current)
    }

    /// Follows the event stream. A first connection that fails is an error; after that, with
    /// `reconnect`, a dropped stream or an unreachable anchor is retried with capped backoff
    /// (each attempt said on stderr) until Ctrl-C. Refused credentials always end it.
    async fn events(
        &mut self,
        reconnect: bool,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), CliError> {
        use std::io::IsTerminal;
        let mut shutdown = std::pin::pin!(shutdown);
        let mut delay = EVENTS_RETRY_FIRST;
        let mut connected_before = false;
        loop {
            let opened = tokio::select! {
                () = &mut shutdown => return Ok(()),
                opened = self.client.events() => opened,
            };
            let lost = match opened {
                Ok(stream) => {
                    if !connected_before && std::io::stderr().is_terminal() {
                        eprintln!(
                            "anchorctl: connected to {}; waiting for events (Ctrl-C to stop)",
                            self.client.base_url()
                        );
                    }
                    if connected_before {
                        eprintln!(
                            "anchorctl: event stream reconnected; events published while it \
                             was down were not received"
                        );
                    }
                    connected_before = true;
                    delay = EVENTS_RETRY_FIRST;
                    match self.follow(stream, &mut shutdown).await {
                        Ok(()) => return Ok(()),
                        Err(e) => e,
                    }
                }
                Err(e) => CliError::from(e),
            };
            if !reconnect || !connected_before || lost.exit != exit::UNAVAILABLE {
                return Err(lost);
            }
            eprintln!(
                "anchorctl: {}; reconnecting in {}s",
                lost.message,
                delay.as_secs()
            );
            tokio::select! {
                () = &mut shutdown => return Ok(()),
                () = tokio::time::sleep(delay) => {}
            }
            delay = (delay * 2).min(EVENTS_RETRY_MAX);
        }
    }

    /// Prints events from one connection of the stream until it ends (an `UNAVAILABLE`
    /// error) or `shutdown` resolves (`Ok`).
    async fn follow(
        &mut self,
        stream: impl Stream<Item = Result<Event, ClientError>>,
        shutdown: &mut std::pin::Pin<&mut impl Future<Output = ()>>,
    ) -> Result<(), CliError> {
        let mut stream = std::pin::pin!(stream);
        loop {
            let item = tokio::select! {
                () = shutdown.as_mut() => return Ok(()),
                item = stream.next() => item,
            };
            match item {
                Some(Ok(event)) => {
                    let line = if self.json {
                        serde_json::to_string(&event).map_err(encode_error)? + "\n"
                    } else {
                        human_event(&event)
                    };
                    self.write(&line)?;
                }
                Some(Err(ClientError::Decode(message))) => {
                    eprintln!("warning: skipped an event: {message}");
                }
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(CliError::new(
                        exit::UNAVAILABLE,
                        "unreachable",
                        "the anchor closed the event stream",
                    ));
                }
            }
        }
    }

    /// Prints `value` as JSON with `--json`, else the text `human` makes.
    fn emit<T: Serialize>(
        &mut self,
        value: &T,
        human: impl FnOnce(OffsetDateTime) -> String,
    ) -> Result<(), CliError> {
        if self.json {
            self.write_json(value)
        } else {
            let text = human(self.now);
            self.write(&text)
        }
    }

    fn write_json<T: Serialize>(&mut self, value: &T) -> Result<(), CliError> {
        let text = serde_json::to_string_pretty(value).map_err(encode_error)?;
        self.write(&(text + "\n"))
    }

    fn write(&mut self, text: &str) -> Result<(), CliError> {
        // Off a terminal (or with NO_COLOR) no escape sequence goes out, whoever wrote it.
        let plain;
        let text = if self.color {
            text
        } else {
            plain = anstream::adapter::strip_str(text).to_string();
            &plain
        };
        self.out
            .write_all(text.as_bytes())
            .and_then(|()| self.out.flush())
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    CliError::new(exit::SUCCESS, "broken_pipe", "stdout closed")
                } else {
                    CliError::new(exit::FAILURE, "output", format!("cannot write output: {e}"))
                }
            })
    }
}

fn encode_error(e: serde_json::Error) -> CliError {
    CliError::new(exit::FAILURE, "output", format!("cannot encode JSON: {e}"))
}

/// The exit of `invoke -l` and `batch show`: 0 only if every invocation succeeded (with
/// `--async`, once the batch is created).
pub fn batch_outcome(batch: &Batch, async_: bool) -> Result<(), CliError> {
    let i = &batch.info;
    if async_ || (i.done && i.succeeded == i.total) {
        return Ok(());
    }
    let code = if i.done {
        "batch_failed"
    } else {
        "still_running"
    };
    Err(CliError::new(
        exit::FAILURE,
        code,
        format!(
            "batch {}: {} of {} succeeded, {} failed, {} timed out, {} rejected, {} pending",
            i.batch_id, i.succeeded, i.total, i.failed, i.timed_out, i.rejected, i.pending
        ),
    ))
}

/// How often `invoke -l` asks for a batch's progress.
const BATCH_POLL: Duration = Duration::from_millis(250);
/// How long past its deadline `invoke -l` waits for a batch's last results.
const BATCH_FOLLOW_MARGIN: Duration = Duration::from_secs(5);

/// Success unless the invocation did not succeed (or, with `--async`, is not under way).
pub fn invocation_outcome(invocation: &Invocation, async_: bool) -> Result<(), CliError> {
    let state = invocation.state;
    let id = &invocation.invocation_id;
    match state {
        InvocationState::Succeeded => Ok(()),
        InvocationState::Queued | InvocationState::Dispatched if async_ => Ok(()),
        InvocationState::Queued | InvocationState::Dispatched => Err(CliError::new(
            exit::FAILURE,
            "still_running",
            format!(
                "invocation {id} is still {} after the timeout; see `anchorctl invocation show {id}`",
                state.as_str()
            ),
        )),
        _ => Err(CliError::new(
            exit::FAILURE,
            state.as_str(),
            format!(
                "invocation {id} {}{}",
                state.as_str().replace('_', " "),
                invocation
                    .error
                    .as_deref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            ),
        )),
    }
}

// ---------------------------------------------------------------------------------------------
// Text for people

fn permissions_text(perms: &[Permission]) -> String {
    perms
        .iter()
        .map(|p| p.as_str())
        .collect::<Vec<_>>()
        .join(",")
}

fn human_code(code: &MintedCode, now: OffsetDateTime) -> String {
    let mut out = String::new();
    match code.method {
        PairMethod::Pin => {
            out.push_str(&format!("\n    {}\n\n", code.code));
            out.push_str(&format!(
                "PIN pairing code {}; expires {} ({}).\n",
                code.code_id,
                relative(code.expires_at, now),
                absolute(code.expires_at)
            ));
            out.push_str("Type it on the node when it asks; then approve its request.\n");
        }
        PairMethod::Qr => {
            if let Some(qr) = &code.qr_text {
                out.push_str(qr);
                if !qr.ends_with('\n') {
                    out.push('\n');
                }
            }
            out.push_str(&format!(
                "\nURI: {}\n",
                code.uri.as_deref().unwrap_or(&code.code)
            ));
            out.push_str(&format!(
                "QR pairing code {}; expires {} ({}).\n",
                code.code_id,
                relative(code.expires_at, now),
                absolute(code.expires_at)
            ));
        }
    }
    out
}

fn human_codes(codes: &[PairingCodeInfo], now: OffsetDateTime) -> String {
    if codes.is_empty() {
        return "no pairing codes\n".into();
    }
    let mut t = Table::new(&[
        "CODE", "METHOD", "STATE", "FAILED", "CREATED", "EXPIRES", "BY",
    ]);
    for c in codes {
        t.row(vec![
            c.code_id.clone(),
            name(&c.method),
            name(&c.state),
            c.failed_attempts.to_string(),
            relative(c.created_at, now),
            relative(c.expires_at, now),
            c.created_by.clone(),
        ]);
    }
    t.render()
}

fn human_requests(list: &[PairingRequest], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no pairing requests\n".into();
    }
    let mut t = Table::new(&[
        "REQUEST",
        "DEVICE",
        "NAME",
        "PLATFORM",
        "STATE",
        "SAS",
        "REQUESTED",
        "EXPIRES",
    ]);
    for r in list {
        t.row(vec![
            r.request_id.clone(),
            r.device_id.to_string(),
            r.device_name.clone(),
            r.platform.clone(),
            name(&r.state),
            r.sas.clone(),
            relative(r.requested_at, now),
            request_expiry(r, now),
        ]);
    }
    t.render()
}

fn human_request(r: &PairingRequest, now: OffsetDateTime) -> String {
    key_values(&[
        ("request", r.request_id.clone()),
        ("device", r.device_id.to_string()),
        ("name", r.device_name.clone()),
        ("platform", r.platform.clone()),
        ("state", name(&r.state)),
        ("sas", r.sas.clone()),
        ("code", r.code_id.clone()),
        ("requested", both_opt(Some(r.requested_at), now)),
        (
            "expires",
            if r.state == RequestState::PendingApproval {
                both_opt(Some(r.expires_at), now)
            } else {
                format!("- ({})", name(&r.state))
            },
        ),
        ("decided by", or_dash(r.decided_by.as_deref())),
        ("decided", both_opt(r.decided_at, now)),
        ("reason", or_dash(r.reason.as_deref())),
    ])
}

/// When a pending request expires; a finished one shows its state instead (its deadline no
/// longer means anything).
fn request_expiry(r: &PairingRequest, now: OffsetDateTime) -> String {
    if r.state == RequestState::PendingApproval {
        relative(r.expires_at, now)
    } else {
        name(&r.state)
    }
}

fn human_devices(list: &[Device], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no devices\n".into();
    }
    let mut t = Table::new(&[
        "DEVICE",
        "NAME",
        "TRUST",
        "PLATFORM",
        "CERT EXPIRES",
        "PAIRED",
    ]);
    for d in list {
        t.row(vec![
            d.device_id.to_string(),
            d.name.clone(),
            name(&d.trust),
            d.platform.clone(),
            rel_opt(d.cert_expires_at, now),
            relative(d.paired_at, now),
        ]);
    }
    t.render()
}

fn human_device(d: &Device, now: OffsetDateTime) -> String {
    key_values(&[
        ("device", d.device_id.to_string()),
        ("name", d.name.clone()),
        ("trust", name(&d.trust)),
        ("platform", d.platform.clone()),
        ("cert serial", or_dash(d.cert_serial.as_deref())),
        ("cert valid from", both_opt(d.cert_not_before, now)),
        ("cert expires", both_opt(d.cert_expires_at, now)),
        (
            "rotation pending",
            if d.rotation_pending { "yes" } else { "no" }.into(),
        ),
        ("paired", both_opt(Some(d.paired_at), now)),
        ("revoked", both_opt(d.revoked_at, now)),
        ("revoked reason", or_dash(d.revoked_reason.as_deref())),
        ("labels", labels_text(&d.labels)),
    ])
}

/// Labels as `key=value` separated by commas (a selector that matches them), or `-`.
fn labels_text(labels: &std::collections::BTreeMap<String, String>) -> String {
    if labels.is_empty() {
        return "-".into();
    }
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

fn human_tokens(list: &[TokenInfo], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no tokens\n".into();
    }
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "PERMISSIONS",
        "LIMITED TO",
        "CREATED",
        "BY",
        "LAST USED",
        "EXPIRES",
        "REVOKED",
    ]);
    for tok in list {
        t.row(vec![
            tok.id.clone(),
            tok.name.clone(),
            permissions_text(&tok.permissions),
            scope_text(&tok.scope).unwrap_or_else(|| "-".into()),
            relative(tok.created_at, now),
            tok.created_by.clone(),
            rel_opt(tok.last_used_at, now),
            rel_opt(tok.expires_at, now),
            rel_opt(tok.revoked_at, now),
        ]);
    }
    t.render()
}

/// A token's limits for people (`None`: it has none).
fn scope_text(scope: &Scope) -> Option<String> {
    let mut parts = Vec::new();
    if !scope.selector.is_empty() {
        parts.push(format!("devices {}", scope.selector));
    }
    if !scope.capabilities.is_empty() {
        parts.push(format!("capabilities {}", scope.capabilities.join(",")));
    }
    (!parts.is_empty()).then(|| parts.join("; "))
}

fn human_batch(b: &Batch, now: OffsetDateTime) -> String {
    let i = &b.info;
    let mut out = format!(
        "batch {} · {} on {} ({}) · {} of {} done · {} succeeded · {} failed · {} timed out · \
         {} rejected{}\n",
        i.batch_id,
        i.capability,
        if i.selector.is_empty() {
            "every device"
        } else {
            &i.selector
        },
        plural(i.total as usize, "device"),
        i.total - i.pending,
        i.total,
        i.succeeded,
        i.failed,
        i.timed_out,
        i.rejected,
        if i.done {
            String::new()
        } else {
            format!(" · deadline {}", relative(i.deadline_at, now))
        }
    );
    if b.invocations.is_empty() {
        return out;
    }
    let mut t = Table::new(&["DEVICE", "NAME", "STATE", "RESULT"]);
    for inv in &b.invocations {
        let result = match (&inv.error, &inv.output) {
            (Some(e), _) => e.clone(),
            (None, Some(serde_json::Value::String(s))) => s.clone(),
            (None, Some(v)) => v.to_string(),
            (None, None) => String::new(),
        };
        t.row(vec![
            inv.device_id.to_string(),
            inv.name.clone(),
            inv.state.as_str().to_string(),
            one_line(&result, 60),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out
}

fn human_instances(list: &[Instance], now: OffsetDateTime) -> String {
    let mut t = Table::new(&[
        "ID", "VERSION", "QUIC", "CONSOLE", "UP", "NODES", "STORE", "LEASE",
    ]);
    for i in list {
        t.row(vec![
            i.id.clone(),
            i.version.clone(),
            i.listen.clone(),
            i.console.clone(),
            relative(i.started_at, now).replace(" ago", ""),
            i.connected_nodes.to_string(),
            i.store.clone(),
            i.lease.clone(),
        ]);
    }
    t.render()
}

fn human_batches(list: &[BatchInfo], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no batches\n".into();
    }
    let mut t = Table::new(&[
        "BATCH",
        "CAPABILITY",
        "SELECTOR",
        "DONE",
        "OK",
        "FAILED",
        "TIMED OUT",
        "REJECTED",
        "CREATED",
        "BY",
    ]);
    for b in list {
        t.row(vec![
            b.batch_id.to_string(),
            b.capability.clone(),
            b.selector.clone(),
            format!("{}/{}", b.total - b.pending, b.total),
            b.succeeded.to_string(),
            b.failed.to_string(),
            b.timed_out.to_string(),
            b.rejected.to_string(),
            relative(b.created_at, now),
            b.requested_by.clone(),
        ]);
    }
    t.render()
}

/// The first line of `text`, cut to `max` characters.
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default();
    if line.chars().count() > max || text.lines().nth(1).is_some() {
        let cut: String = line.chars().take(max.saturating_sub(1)).collect();
        format!("{cut}…")
    } else {
        line.to_string()
    }
}

fn human_inventory(inv: &Inventory, now: OffsetDateTime) -> String {
    let s = &inv.summary;
    let mut out = format!(
        "devices {} · trusted {} · revoked {} · pending pairings {} · online {} · degraded {} · \
         stale {} · offline {} · connected {} · with warnings {}\n",
        s.devices,
        s.trusted,
        s.revoked,
        s.pending_pairings,
        s.online,
        s.degraded,
        s.stale,
        s.offline,
        s.connected,
        s.with_warnings
    );
    if let Some(since) = inv.stale_since {
        out.insert_str(
            0,
            &format!(
                "STALE: the anchor cannot reach its store (since {}); this is its last view\n",
                relative(since, now)
            ),
        );
    }
    for i in &inv.instances {
        out.push_str(&format!(
            "{} {} · up {} · connected nodes {} · quic {} · console {} · CA expires {}{}\n",
            i.kind,
            i.version,
            format_duration(Duration::from_secs(i.uptime_secs)),
            i.connected_nodes,
            i.listen,
            i.console,
            relative(i.ca_expires_at, now),
            if i.warnings.is_empty() {
                String::new()
            } else {
                format!(" · warnings: {}", i.warnings.join(","))
            }
        ));
    }
    out.push('\n');
    if inv.devices.is_empty() {
        out.push_str("no devices\n");
        return out;
    }
    let mut t = Table::new(&[
        "DEVICE",
        "NAME",
        "TRUST",
        "PRESENCE",
        "HEARTBEAT",
        "LOSS",
        "RTT",
        "CAPS",
        "WARNINGS",
    ]);
    for d in &inv.devices {
        t.row(vec![
            d.device_id.to_string(),
            d.name.clone(),
            name(&d.trust),
            name(&d.presence),
            age_ms(d.heartbeat_age_ms),
            percent(d.loss_rate),
            millis(d.rtt_ms),
            format!("{}/{}", d.capabilities.available, d.capabilities.total),
            list(&d.warnings),
        ]);
        t.style_last(3, presence_style(d.presence));
    }
    out.push_str(&t.render());
    out
}

fn human_inventory_device(d: &InventoryDevice, now: OffsetDateTime) -> String {
    let mut out = key_values(&[
        ("device", d.device_id.to_string()),
        ("name", d.name.clone()),
        ("trust", name(&d.trust)),
        ("presence", name(&d.presence)),
        ("connected", if d.connected { "yes" } else { "no" }.into()),
        ("connected since", both_opt(d.connected_since, now)),
        ("last seen", both_opt(d.last_seen_at, now)),
        ("heartbeat age", age_ms(d.heartbeat_age_ms)),
        ("loss", percent(d.loss_rate)),
        ("rtt", millis(d.rtt_ms)),
        (
            "capabilities",
            format!(
                "{} available, {} unavailable, {} total",
                d.capabilities.available, d.capabilities.unavailable, d.capabilities.total
            ),
        ),
        ("cert expires", both_opt(d.cert_expires_at, now)),
        ("warnings", list(&d.warnings)),
        ("actions", list(&d.actions)),
    ]);
    if let Some(node) = &d.node {
        out.push('\n');
        out.push_str(&capabilities_table(&node.capabilities));
    }
    if !d.pending_pairings.is_empty() {
        out.push_str("\npending pairing requests:\n");
        out.push_str(&human_requests(&d.pending_pairings, now));
    }
    out
}

fn capabilities_table(caps: &[Capability]) -> String {
    if caps.is_empty() {
        return "no capabilities\n".into();
    }
    let mut t = Table::new(&["CAPABILITY", "AVAILABLE", "DESCRIPTION"]);
    for c in caps {
        let available = if c.available {
            "yes".to_string()
        } else {
            format!("no ({})", c.reason.as_deref().unwrap_or("unavailable"))
        };
        t.row(vec![c.name.clone(), available, c.description.clone()]);
    }
    t.render()
}

fn human_nodes(list: &[Node], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no nodes\n".into();
    }
    let mut t = Table::new(&[
        "DEVICE",
        "NAME",
        "PRESENCE",
        "CONNECTED",
        "LAST SEEN",
        "LOSS",
        "RTT",
        "CAPS",
        "PLATFORM",
        "VERSION",
    ]);
    for n in list {
        let available = n.capabilities.iter().filter(|c| c.available).count();
        t.row(vec![
            n.device_id.to_string(),
            n.name.clone(),
            name(&n.presence),
            if n.connected { "yes" } else { "no" }.into(),
            rel_opt(n.last_seen_at, now),
            percent(n.loss_rate),
            millis(n.rtt_ms),
            format!("{available}/{}", n.capabilities.len()),
            n.platform.clone(),
            n.agent_version.clone(),
        ]);
        t.style_last(2, presence_style(n.presence));
    }
    t.render()
}

fn human_node(n: &Node, now: OffsetDateTime) -> String {
    let mut out = key_values(&[
        ("device", n.device_id.to_string()),
        ("name", n.name.clone()),
        ("platform", n.platform.clone()),
        ("agent version", n.agent_version.clone()),
        ("presence", name(&n.presence)),
        ("connected", if n.connected { "yes" } else { "no" }.into()),
        ("connected since", both_opt(n.connected_since, now)),
        ("remote address", or_dash(n.remote_addr.as_deref())),
        ("last seen", both_opt(n.last_seen_at, now)),
        ("heartbeat age", age_ms(n.heartbeat_age_ms)),
        ("loss", percent(n.loss_rate)),
        ("rtt", millis(n.rtt_ms)),
    ]);
    out.push('\n');
    out.push_str(&capabilities_table(&n.capabilities));
    out
}

fn human_invocation(i: &Invocation, now: OffsetDateTime) -> String {
    human_invocation_timed(i, None, now)
}

/// An invocation, with the round trip anchorctl measured when it has one: `took 1ms on the
/// node, 3.42ms round trip`.
fn human_invocation_timed(
    i: &Invocation,
    round_trip_ms: Option<f64>,
    now: OffsetDateTime,
) -> String {
    let mut out = format!(
        "{} · {} on {} · invocation {}",
        i.state.as_str(),
        i.capability,
        i.device_id,
        i.invocation_id
    );
    match (i.duration_ms, round_trip_ms) {
        (Some(ms), Some(rt)) => out.push_str(&format!(
            " · took {} on the node, {} round trip",
            duration_ms(Some(ms)),
            precise_ms(Some(rt))
        )),
        (Some(ms), None) => out.push_str(&format!(" · took {}", duration_ms(Some(ms)))),
        (None, Some(rt)) => out.push_str(&format!(" · {} round trip", precise_ms(Some(rt)))),
        (None, None) => {}
    }
    if !i.state.is_final() {
        out.push_str(&format!(" · deadline {}", relative(i.deadline_at, now)));
    }
    out.push('\n');
    if let Some(error) = &i.error {
        out.push_str(&format!("error: {error}\n"));
    }
    match &i.output {
        None => {}
        Some(serde_json::Value::String(s)) => {
            out.push_str(s);
            if !s.ends_with('\n') {
                out.push('\n');
            }
        }
        Some(value) => {
            let pretty = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
            out.push_str(&pretty);
            out.push('\n');
        }
    }
    if i.truncated {
        out.push_str("(output truncated)\n");
    }
    out
}

fn human_invocations(list: &[Invocation], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no invocations\n".into();
    }
    let mut t = Table::new(&[
        "INVOCATION",
        "DEVICE",
        "CAPABILITY",
        "STATE",
        "CREATED",
        "DURATION",
        "BY",
    ]);
    for i in list {
        t.row(vec![
            i.invocation_id.to_string(),
            i.device_id.to_string(),
            i.capability.clone(),
            i.state.as_str().into(),
            relative(i.created_at, now),
            duration_ms(i.duration_ms),
            i.requested_by.clone(),
        ]);
    }
    t.render()
}

fn human_audit(list: &[AuditEntry], now: OffsetDateTime) -> String {
    if list.is_empty() {
        return "no audit entries\n".into();
    }
    let mut t = Table::new(&["WHEN", "ACTOR", "ACTION", "TARGET", "DETAIL"]);
    for e in list {
        t.row(vec![
            relative(e.at, now),
            e.actor.clone(),
            e.action.clone(),
            e.target.clone(),
            truncate(&e.detail, 60),
        ]);
    }
    t.render()
}

/// `HH:MM:SS kind device short-data`.
fn human_event(e: &Event) -> String {
    format!(
        "{} {} {} {}\n",
        clock(e.at),
        e.kind,
        e.device_id
            .map_or_else(|| "-".to_string(), |d| d.to_string()),
        truncate(&e.data.to_string(), 100)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_errors_map_to_documented_exit_codes() {
        let api = |status: u16| ClientError::Api {
            status,
            code: "x".into(),
            message: "m".into(),
        };
        assert_eq!(exit_code(&api(401)), exit::AUTH);
        assert_eq!(exit_code(&api(403)), exit::AUTH);
        assert_eq!(exit_code(&api(404)), exit::FAILURE);
        assert_eq!(exit_code(&api(409)), exit::FAILURE);
        assert_eq!(exit_code(&ClientError::BadUrl("u".into())), exit::BAD_INPUT);
        assert_eq!(exit_code(&ClientError::Decode("d".into())), exit::FAILURE);
        let e = CliError::from(api(404));
        assert_eq!(e.to_string(), "x: m");
    }

    #[test]
    fn ttl_is_checked_against_the_allowed_range() {
        assert_eq!(parse_ttl("10m"), Ok(600));
        assert_eq!(parse_ttl("30s"), Ok(30));
        assert_eq!(parse_ttl("1d"), Ok(86_400));
        assert!(parse_ttl("29s").unwrap_err().contains("30s to 1d"));
        assert!(parse_ttl("25h").unwrap_err().contains("out of range"));
        assert!(parse_ttl("soon").is_err());
    }

    #[test]
    fn invoke_timeout_in_millis() {
        assert_eq!(parse_invoke_timeout("30s"), Ok(30_000));
        assert_eq!(parse_invoke_timeout("500ms"), Ok(500));
        assert!(parse_invoke_timeout("0").is_err());
        assert!(parse_invoke_timeout("500us").is_err());
        assert_eq!(parse_invoke_timeout("1h30m"), Ok(5_400_000));
        assert!(parse_invoke_timeout("2d").is_err());
    }

    fn invocation(state: InvocationState) -> Invocation {
        Invocation {
            invocation_id: InvocationId([0xab; 16]),
            device_id: DeviceId::from_bytes([0; 20]),
            capability: "echo".into(),
            state,
            output: None,
            truncated: false,
            error: Some("boom".into()),
            requested_by: "owner".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            deadline_at: OffsetDateTime::UNIX_EPOCH,
            dispatched_at: None,
            finished_at: None,
            duration_ms: None,
        }
    }

    #[test]
    fn invocation_exit_status_follows_its_state() {
        use InvocationState::*;
        assert!(invocation_outcome(&invocation(Succeeded), false).is_ok());
        assert!(invocation_outcome(&invocation(Queued), true).is_ok());
        assert!(invocation_outcome(&invocation(Dispatched), true).is_ok());
        let still = invocation_outcome(&invocation(Dispatched), false).unwrap_err();
        assert_eq!((still.exit, still.code.as_str()), (1, "still_running"));
        let failed = invocation_outcome(&invocation(Failed), false).unwrap_err();
        assert_eq!(failed.exit, exit::FAILURE);
        assert_eq!(
            failed.to_string(),
            "failed: invocation abababababababababababababababab failed: boom"
        );
        let timed_out = invocation_outcome(&invocation(TimedOut), true).unwrap_err();
        assert_eq!(timed_out.code, "timed_out");
        assert!(invocation_outcome(&invocation(Rejected), false).is_err());
    }

    #[test]
    fn invoke_takes_a_device_or_a_selector() {
        let cli = parse_from(["anchorctl", "invoke", "DEV", "echo"]).unwrap();
        let Command::Invoke(args) = cli.command else {
            panic!("not invoke")
        };
        assert_eq!((args.selector, args.targets.len()), (None, 2));
        let cli = parse_from([
            "anchorctl",
            "invoke",
            "-l",
            "site=lab",
            "system.health",
            "--max-concurrency",
            "5",
        ])
        .unwrap();
        let Command::Invoke(args) = cli.command else {
            panic!("not invoke")
        };
        assert_eq!(args.selector.as_deref(), Some("site=lab"));
        assert_eq!(args.targets, ["system.health"]);
        assert_eq!(args.max_concurrency, Some(5));
        // A concurrency limit means nothing for one device.
        assert!(
            parse_from(["anchorctl", "invoke", "D", "echo", "--max-concurrency", "5"]).is_err()
        );
        assert!(parse_from(["anchorctl", "invoke"]).is_err());
    }

    fn batch(states: &[InvocationState]) -> Batch {
        let mut info = BatchInfo {
            batch_id: InvocationId([0xba; 16]),
            selector: "site=lab".into(),
            capability: "system.health".into(),
            requested_by: "owner (t)".into(),
            created_at: OffsetDateTime::UNIX_EPOCH,
            deadline_at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(30),
            ..Default::default()
        };
        info.tally(states.iter().copied());
        let invocations = states
            .iter()
            .enumerate()
            .map(|(i, state)| BatchInvocation {
                device_id: DeviceId::from_bytes([i as u8; 20]),
                name: format!("cam-{i}"),
                invocation_id: InvocationId([i as u8; 16]),
                state: *state,
                output: Some(serde_json::json!({ "status": "ok" })),
                error: (*state != InvocationState::Succeeded).then(|| "no answer".into()),
            })
            .collect();
        Batch { info, invocations }
    }

    #[test]
    fn a_batch_exits_zero_only_if_every_invocation_succeeded() {
        use InvocationState::*;
        assert!(batch_outcome(&batch(&[Succeeded, Succeeded]), false).is_ok());
        let err = batch_outcome(&batch(&[Succeeded, TimedOut]), false).unwrap_err();
        assert_eq!(
            (err.exit, err.code.as_str()),
            (exit::FAILURE, "batch_failed")
        );
        assert!(err.message.contains("1 of 2 succeeded"), "{}", err.message);
        let err = batch_outcome(&batch(&[Succeeded, Queued]), false).unwrap_err();
        assert_eq!(err.code, "still_running");
        assert!(batch_outcome(&batch(&[Queued]), true).is_ok());
        assert!(batch_outcome(&batch(&[]), false).is_ok());
    }

    #[test]
    fn a_batch_reads_as_counts_then_one_row_per_device() {
        use InvocationState::*;
        let text = human_batch(
            &batch(&[Succeeded, Failed]),
            OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(1),
        );
        let mut lines = text.lines();
        let head = lines.next().unwrap();
        assert!(
            head.contains("system.health on site=lab (2 devices)"),
            "{head}"
        );
        assert!(
            head.contains("2 of 2 done · 1 succeeded · 1 failed"),
            "{head}"
        );
        assert!(
            text.contains("cam-0") && text.contains("succeeded"),
            "{text}"
        );
        assert!(
            text.contains("cam-1") && text.contains("no answer"),
            "{text}"
        );
    }

    #[test]
    fn global_flags_work_anywhere_and_token_sources_are_told_apart() {
        let cli = parse_from(["anchorctl", "device", "list", "--json", "--token", "t"]).unwrap();
        assert!(cli.json);
        assert_eq!(cli.token.as_deref(), Some("t"));
        assert!(!cli.token_from_env);
        let err =
            parse_from(["anchorctl", "--token", "t", "--token-file", "f", "nodes"]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::ArgumentConflict);
        assert_eq!(err.exit_code(), i32::from(exit::USAGE));
    }

    #[test]
    fn bad_flag_values_are_usage_errors() {
        for args in [
            &["anchorctl", "pair", "list", "--state", "nope"][..],
            &["anchorctl", "token", "create", "--perm", "root"],
            &["anchorctl", "token", "create"],
            &["anchorctl", "pair", "code", "--method", "sms"],
            &[
                "anchorctl",
                "invoke",
                "D",
                "echo",
                "--input",
                "1",
                "--input-file",
                "f",
            ],
        ] {
            let err = parse_from(args.iter().copied()).unwrap_err();
            assert_eq!(err.exit_code(), i32::from(exit::USAGE), "{args:?}");
        }
    }

    #[test]
    fn every_command_and_flag_has_help() {
        fn check(cmd: &clap::Command, path: &str) {
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                assert!(arg.get_help().is_some(), "{path} --{id} has no help");
            }
            for sub in cmd.get_subcommands() {
                if sub.get_name() == "help" {
                    continue;
                }
                assert!(
                    sub.get_about().is_some(),
                    "{path} {} has no help",
                    sub.get_name()
                );
                check(sub, &format!("{path} {}", sub.get_name()));
            }
        }
        let cmd = Cli::command();
        cmd.clone().debug_assert();
        check(&cmd, "anchorctl");
    }

    #[test]
    fn finished_pairing_requests_show_their_state_not_an_expiry() {
        let now = OffsetDateTime::UNIX_EPOCH + time::Duration::days(1);
        let request = |state| PairingRequest {
            request_id: "R".into(),
            device_id: DeviceId::from_bytes([0; 20]),
            device_name: "n".into(),
            platform: "p".into(),
            state,
            sas: "1".into(),
            code_id: "C".into(),
            requested_at: now,
            expires_at: now + time::Duration::minutes(9),
            decided_by: None,
            decided_at: None,
            reason: None,
        };
        assert_eq!(
            request_expiry(&request(RequestState::PendingApproval), now),
            "in 9m"
        );
        assert_eq!(
            request_expiry(&request(RequestState::Completed), now),
            "completed"
        );
        let table = human_requests(&[request(RequestState::Rejected)], now);
        assert!(
            !table.contains("in 9m") && table.contains("rejected"),
            "{table}"
        );
    }

    #[test]
    fn an_invocation_reads_its_node_time_and_round_trip() {
        let mut i = invocation(InvocationState::Succeeded);
        i.error = None;
        i.duration_ms = Some(1);
        let text = human_invocation_timed(&i, Some(3.416_999_999_000_000_4), i.created_at);
        assert!(
            text.lines()
                .next()
                .unwrap()
                .ends_with("took 1ms on the node, 3.42ms round trip"),
            "{text}"
        );
        assert!(human_invocation(&i, i.created_at).contains("· took 1ms\n"));
    }

    #[test]
    fn human_event_line() {
        let e = Event {
            seq: 1,
            at: OffsetDateTime::UNIX_EPOCH + time::Duration::seconds(3_723),
            kind: "presence".into(),
            device_id: Some(DeviceId::from_bytes([0; 20])),
            data: serde_json::json!({"presence": "online"}),
        };
        assert_eq!(
            human_event(&e),
            "01:02:03 presence aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa {\"presence\":\"online\"}\n"
        );
    }
}
