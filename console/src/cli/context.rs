//! anchorctl's contexts (as kubectl's): named anchors, each a console URL with the token file
//! and CA file to use for it, kept in a TOML file; and which URL, token and CA a command uses.
//!
//! The file is `--config FILE` or `ANCHORAGE_CONFIG`, else `$XDG_CONFIG_HOME/anchorage/config.toml`,
//! else `~/.config/anchorage/config.toml` (`%APPDATA%\anchorage\config.toml` on Windows):
//!
//! ```toml
//! current_context = "lab"
//!
//! [contexts.lab]
//! url = "https://anchor.lab.example:7142"
//! token_file = "/home/me/.config/anchorage/lab.token"
//! ca_file = "/home/me/.config/anchorage/lab-ca.pem"
//! ```
//!
//! Each setting is taken, in this order, from its flag, its environment variable, the context
//! (`--context NAME`, else the file's current one), then the default ([`resolve`]). The file
//! is written atomically (a temporary file renamed over it), mode 0600.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::format::Table;
use super::{CliError, DEFAULT_TOKEN_FILE, DEFAULT_URL, exit};
use crate::client::CaCertificates;

/// CA file used for an https console when none is given and it exists (the anchor's default
/// data dir, next to [`DEFAULT_TOKEN_FILE`]).
pub const DEFAULT_CA_FILE: &str = "anchorage-data/ca.pem";

/// Largest config, token or CA file read, in bytes.
pub const MAX_FILE: u64 = 1024 * 1024;

/// Longest context name.
pub const MAX_NAME: usize = 64;

/// `anchorctl context ...`
#[derive(Debug, clap::Subcommand)]
pub enum ContextCommand {
    /// Add a context, or replace the one of that name: its URL (--url, required), token file
    /// (--token-file) and CA file (--ca-file), given as the global flags.
    Add {
        /// The context's name (letters, digits, `.`, `_`, `-`).
        name: String,
        /// Make it the current context.
        #[arg(long = "use")]
        use_it: bool,
    },
    /// Make a context the current one.
    Use {
        /// The context's name.
        name: String,
    },
    /// List the contexts; `*` marks the current one (--json for scripts).
    List,
    /// Remove a context (if it is the current one, no context is current afterwards).
    Remove {
        /// The context's name.
        name: String,
    },
}

/// The config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// The context used when `--context` is not given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_context: Option<String>,
    /// The contexts by name.
    #[serde(default)]
    pub contexts: BTreeMap<String, Context>,
}

/// One anchor: where its console is and how to talk to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Context {
    /// Console URL, `http://` or `https://`.
    pub url: String,
    /// File holding the bearer token (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) an https console's certificate must chain to (absolute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// Where a global option's value came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Origin {
    /// Its flag (also what a [`Cli`](super::Cli) built without [`parse_from`](super::parse_from)
    /// assumes).
    #[default]
    Flag,
    /// Its environment variable.
    Env,
    /// Neither: a default, or nothing.
    Unset,
}

/// Where each of the global options that a context can also give came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Origins {
    /// `--url` / `ANCHORAGE_URL`.
    pub url: Origin,
    /// `--token` / `ANCHORAGE_TOKEN`.
    pub token: Origin,
    /// `--token-file` / `ANCHORAGE_TOKEN_FILE`.
    pub token_file: Origin,
    /// `--ca-file` / `ANCHORAGE_CA_FILE`.
    pub ca_file: Origin,
}

/// The options as given, each with where it came from (the input of [`resolve`]).
#[derive(Debug, Clone, Default)]
pub struct Given {
    /// The URL, when given by flag or environment.
    pub url: Option<(String, Origin)>,
    /// The token.
    pub token: Option<(String, Origin)>,
    /// The token file.
    pub token_file: Option<(PathBuf, Origin)>,
    /// The CA file.
    pub ca_file: Option<(PathBuf, Origin)>,
}

/// Where a command's token comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenFrom {
    /// The token itself (`--token`, `ANCHORAGE_TOKEN`).
    Value(String),
    /// A file named by a flag, the environment or the context.
    File(PathBuf),
    /// `./anchorage-data/owner.token`, if it exists.
    DefaultFile,
}

/// Where a command's CA comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CaFrom {
    /// A file named by a flag, the environment or the context.
    File(PathBuf),
    /// `./anchorage-data/ca.pem`, if it exists.
    DefaultFile,
}

/// What a command talks to, and with what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Console URL.
    pub url: String,
    /// The token.
    pub token: TokenFrom,
    /// The CA (read only for an https URL).
    pub ca: CaFrom,
}

/// Each setting from its flag, else its environment variable, else `context`, else the
/// default. Between the token and the token file: `--token`, `--token-file`,
/// `ANCHORAGE_TOKEN`, `ANCHORAGE_TOKEN_FILE`, the context's token file, the default file.
pub fn resolve(given: &Given, context: Option<&Context>) -> Target {
    fn pick<T: Clone>(v: &Option<(T, Origin)>, origin: Origin) -> Option<T> {
        v.as_ref()
            .filter(|(_, o)| *o == origin)
            .map(|(v, _)| v.clone())
    }
    let url = pick(&given.url, Origin::Flag)
        .or_else(|| pick(&given.url, Origin::Env))
        .or_else(|| context.map(|c| c.url.clone()))
        .unwrap_or_else(|| DEFAULT_URL.to_string());
    let token = pick(&given.token, Origin::Flag)
        .map(TokenFrom::Value)
        .or_else(|| pick(&given.token_file, Origin::Flag).map(TokenFrom::File))
        .or_else(|| pick(&given.token, Origin::Env).map(TokenFrom::Value))
        .or_else(|| pick(&given.token_file, Origin::Env).map(TokenFrom::File))
        .or_else(|| {
            context
                .and_then(|c| c.token_file.clone())
                .map(TokenFrom::File)
        })
        .unwrap_or(TokenFrom::DefaultFile);
    let ca = pick(&given.ca_file, Origin::Flag)
        .or_else(|| pick(&given.ca_file, Origin::Env))
        .or_else(|| context.and_then(|c| c.ca_file.clone()))
        .map_or(CaFrom::DefaultFile, CaFrom::File);
    Target { url, token, ca }
}

impl Target {
    /// The token, read from its file where it is one.
    pub fn token(&self) -> Result<String, CliError> {
        match &self.token {
            TokenFrom::Value(token) => Ok(token.trim().to_string()),
            TokenFrom::File(path) => super::read_token_file(path),
            TokenFrom::DefaultFile => {
                let default = Path::new(DEFAULT_TOKEN_FILE);
                if default.is_file() {
                    return super::read_token_file(default);
                }
                Err(CliError::new(
                    exit::AUTH,
                    "no_token",
                    format!(
                        "no token: pass --token-file FILE, set ANCHORAGE_TOKEN or \
                         ANCHORAGE_TOKEN_FILE, use a context with a token file, or run where \
                         ./{DEFAULT_TOKEN_FILE} exists"
                    ),
                ))
            }
        }
    }

    /// The CA certificates to pin: `None` for an http URL; for an https one, read from the
    /// CA file, or an error (exit 64) when there is none.
    pub fn ca(&self) -> Result<Option<CaCertificates>, CliError> {
        if !self.url.trim().to_ascii_lowercase().starts_with("https://") {
            return Ok(None);
        }
        let path = match &self.ca {
            CaFrom::File(path) => path.as_path(),
            CaFrom::DefaultFile if Path::new(DEFAULT_CA_FILE).is_file() => {
                Path::new(DEFAULT_CA_FILE)
            }
            CaFrom::DefaultFile => {
                return Err(CliError::new(
                    exit::BAD_INPUT,
                    "no_ca",
                    format!(
                        "{} is https: anchorctl pins the anchor's CA certificate rather than \
                         trusting the system's; pass --ca-file FILE (the anchor's ca.pem), set \
                         ANCHORAGE_CA_FILE, use a context with a CA file, or run where \
                         ./{DEFAULT_CA_FILE} exists",
                        self.url
                    ),
                ));
            }
        };
        read_ca(path).map(Some)
    }
}

/// Reads a CA file (exit 64 when it cannot be read or holds no certificate).
pub fn read_ca(path: &Path) -> Result<CaCertificates, CliError> {
    let pem = read_small(path)
        .map_err(|e| CliError::bad_input(format!("cannot read CA file {}: {e}", path.display())))?;
    CaCertificates::from_pem(&pem).map_err(|e| {
        CliError::new(
            exit::BAD_INPUT,
            "bad_ca",
            format!("CA file {}: {e}", path.display()),
        )
    })
}

fn read_small(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let mut data = Vec::new();
    std::fs::File::open(path)?
        .take(MAX_FILE + 1)
        .read_to_end(&mut data)?;
    if data.len() as u64 > MAX_FILE {
        return Err(std::io::Error::other(format!(
            "larger than {MAX_FILE} bytes"
        )));
    }
    Ok(data)
}

/// The default config file, from the environment's `var`: `$XDG_CONFIG_HOME/anchorage/config.toml`
/// (an absolute `XDG_CONFIG_HOME`), else `$HOME/.config/anchorage/config.toml`; on Windows
/// `%APPDATA%\anchorage\config.toml`. `None` when the environment names no such place.
pub fn default_config_path(var: impl Fn(&str) -> Option<OsString>) -> Option<PathBuf> {
    let dir = |name: &str| var(name).map(PathBuf::from).filter(|p| p.is_absolute());
    let base = if cfg!(windows) {
        dir("APPDATA")
    } else {
        dir("XDG_CONFIG_HOME").or_else(|| dir("HOME").map(|h| h.join(".config")))
    };
    base.map(|b| b.join("anchorage").join("config.toml"))
}

impl ConfigFile {
    /// Reads and checks the file; `None` when it does not exist. Errors name the file and,
    /// for a syntax error, the line.
    pub fn load(path: &Path) -> Result<Option<ConfigFile>, CliError> {
        let data = match read_small(path) {
            Ok(data) => data,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(bad_config(format!("cannot read {}: {e}", path.display()))),
        };
        let text = String::from_utf8(data)
            .map_err(|_| bad_config(format!("{}: not UTF-8 text", path.display())))?;
        ConfigFile::parse(&text)
            .map(Some)
            .map_err(|(line, message)| match line {
                Some(line) => bad_config(format!("{}:{line}: {message}", path.display())),
                None => bad_config(format!("{}: {message}", path.display())),
            })
    }

    /// Parses and checks the file's text; an error has the line (1-based) where known.
    pub fn parse(text: &str) -> Result<ConfigFile, (Option<usize>, String)> {
        let file: ConfigFile = toml::from_str(text).map_err(|e| {
            let line = e
                .span()
                .map(|span| text[..span.start.min(text.len())].matches('\n').count() + 1);
            (line, e.message().to_string())
        })?;
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).map(|i| i + 1);
        for (name, context) in &file.contexts {
            check_name(name).map_err(|m| (line_of(name), m))?;
            let url = context.url.trim().to_ascii_lowercase();
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err((
                    line_of(&context.url),
                    format!(
                        "context {name:?}: url {:?} is not an http:// or https:// URL",
                        context.url
                    ),
                ));
            }
        }
        if let Some(current) = &file.current_context
            && !file.contexts.contains_key(current)
        {
            return Err((
                line_of("current_context"),
                format!(
                    "current_context {current:?} is not one of the contexts ({})",
                    known(&file)
                ),
            ));
        }
        Ok(file)
    }

    /// Writes the file atomically with mode 0600, creating its directory (0700) if needed.
    pub fn save(&self, path: &Path) -> Result<(), CliError> {
        let text = toml::to_string(self)
            .map_err(|e| CliError::new(exit::FAILURE, "output", format!("cannot encode: {e}")))?;
        let fail = |e: std::io::Error| {
            CliError::new(
                exit::FAILURE,
                "config_write",
                format!("cannot write {}: {e}", path.display()),
            )
        };
        let dir = path
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."));
        if !dir.exists() {
            let mut builder = std::fs::DirBuilder::new();
            builder.recursive(true);
            #[cfg(unix)]
            std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
            builder.create(dir).map_err(fail)?;
        }
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "config.toml".into());
        let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create(true).truncate(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let written = (|| {
            let mut f = options.open(&tmp)?;
            f.write_all(text.as_bytes())?;
            f.sync_all()?;
            std::fs::rename(&tmp, path)
        })();
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(fail(e));
        }
        Ok(())
    }

    /// The context named `name`, or an error listing the known ones.
    pub fn context(&self, name: &str, path: &Path) -> Result<&Context, CliError> {
        self.contexts
            .get(name)
            .ok_or_else(|| unknown(name, self, path))
    }
}

fn known(file: &ConfigFile) -> String {
    if file.contexts.is_empty() {
        return "there are none".into();
    }
    file.contexts.keys().cloned().collect::<Vec<_>>().join(", ")
}

fn unknown(name: &str, file: &ConfigFile, path: &Path) -> CliError {
    CliError::new(
        exit::BAD_INPUT,
        "unknown_context",
        format!(
            "no context {name:?} in {}; known contexts: {}",
            path.display(),
            known(file)
        ),
    )
}

fn bad_config(message: String) -> CliError {
    CliError::new(exit::BAD_INPUT, "bad_config", message)
}

/// Checks a context name: 1 to [`MAX_NAME`] letters, digits, `.`, `_` or `-`.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "context name {name:?}: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-'"
        ))
    }
}

/// The config file's path: `--config` / `ANCHORAGE_CONFIG`, else the default.
pub fn config_path(given: Option<&Path>) -> Result<PathBuf, CliError> {
    match given {
        Some(path) => Ok(path.to_path_buf()),
        None => default_config_path(|name| std::env::var_os(name)).ok_or_else(|| {
            CliError::bad_input(
                "cannot tell where anchorctl's config file is (no XDG_CONFIG_HOME or HOME); \
                 pass --config FILE or set ANCHORAGE_CONFIG",
            )
        }),
    }
}

/// The context a command uses: `--context NAME` (which must exist), else the file's current
/// one, else none.
pub fn selected(config: Option<&Path>, name: Option<&str>) -> Result<Option<Context>, CliError> {
    let path = match (config_path(config), name) {
        (Ok(path), _) => path,
        // No place for a file and no --context: simply no context.
        (Err(_), None) => return Ok(None),
        (Err(e), Some(_)) => return Err(e),
    };
    let file = ConfigFile::load(&path)?;
    match (file, name) {
        (Some(file), Some(name)) => file.context(name, &path).cloned().map(Some),
        (None, Some(name)) => Err(unknown(name, &ConfigFile::default(), &path)),
        (Some(file), None) => Ok(file
            .current_context
            .as_ref()
            .and_then(|c| file.contexts.get(c).cloned())),
        (None, None) => Ok(None),
    }
}

/// A context as `context list --json` shows it.
#[derive(Debug, Serialize)]
struct Listed<'a> {
    name: &'a str,
    url: &'a str,
    token_file: Option<&'a Path>,
    ca_file: Option<&'a Path>,
    current: bool,
}

fn listed(file: &ConfigFile) -> Vec<Listed<'_>> {
    let current = file.current_context.as_deref();
    file.contexts
        .iter()
        .map(|(name, c)| Listed {
            name,
            url: &c.url,
            token_file: c.token_file.as_deref(),
            ca_file: c.ca_file.as_deref(),
            current: current == Some(name.as_str()),
        })
        .collect()
}

/// Runs `anchorctl context ...` (no console involved). With `--json` each prints the
/// resulting list, as `context list --json` does.
pub fn run(
    cli: &super::Cli,
    command: &ContextCommand,
    out: &mut (dyn Write + Send),
) -> Result<(), CliError> {
    let path = config_path(cli.config.as_deref())?;
    let mut file = ConfigFile::load(&path)?.unwrap_or_default();
    let text = match command {
        ContextCommand::Add { name, use_it } => {
            check_name(name).map_err(CliError::bad_input)?;
            let o = &cli.origins;
            if o.url != Origin::Flag {
                return Err(CliError::bad_input(
                    "context add needs --url URL (the anchor's console URL)",
                ));
            }
            if cli.token.is_some() && o.token == Origin::Flag {
                return Err(CliError::bad_input(
                    "a context holds a token file, not a token: write the token to a file \
                     (mode 0600) and pass --token-file FILE",
                ));
            }
            crate::client::parse_base_url(&cli.url)
                .map_err(|e| CliError::new(exit::BAD_INPUT, "bad_url", e.to_string()))?;
            let token_file = match (&cli.token_file, o.token_file) {
                (Some(p), Origin::Flag) => {
                    let p = absolute(p)?;
                    super::read_token_file(&p)?;
                    Some(p)
                }
                _ => None,
            };
            let ca_file = match (&cli.ca_file, o.ca_file) {
                (Some(p), Origin::Flag) => {
                    let p = absolute(p)?;
                    read_ca(&p)?;
                    Some(p)
                }
                _ => None,
            };
            let replaced = file
                .contexts
                .insert(
                    name.clone(),
                    Context {
                        url: cli.url.trim().to_string(),
                        token_file,
                        ca_file,
                    },
                )
                .is_some();
            if *use_it {
                file.current_context = Some(name.clone());
            }
            file.save(&path)?;
            format!(
                "{} context {name} ({}){}\n",
                if replaced { "replaced" } else { "added" },
                cli.url.trim(),
                if *use_it {
                    "; it is the current context"
                } else {
                    ""
                }
            )
        }
        ContextCommand::Use { name } => {
            file.context(name, &path)?;
            file.current_context = Some(name.clone());
            file.save(&path)?;
            format!("the current context is {name}\n")
        }
        ContextCommand::Remove { name } => {
            file.context(name, &path)?;
            file.contexts.remove(name);
            if file.current_context.as_deref() == Some(name) {
                file.current_context = None;
            }
            file.save(&path)?;
            format!("removed context {name}\n")
        }
        ContextCommand::List => {
            let listed = listed(&file);
            if listed.is_empty() {
                format!(
                    "no contexts in {} (add one: anchorctl context add NAME --url URL)\n",
                    path.display()
                )
            } else {
                let mut table = Table::new(&["CURRENT", "NAME", "URL", "TOKEN FILE", "CA FILE"]);
                let shown =
                    |p: Option<&Path>| p.map_or("-".to_string(), |p| p.display().to_string());
                for l in &listed {
                    table.row(vec![
                        if l.current { "*".into() } else { String::new() },
                        l.name.to_string(),
                        l.url.to_string(),
                        shown(l.token_file),
                        shown(l.ca_file),
                    ]);
                }
                table.render()
            }
        }
    };
    // Every context command prints the resulting list with --json.
    let text = if cli.json {
        let doc = serde_json::json!({
            "config": path,
            "current_context": file.current_context,
            "contexts": listed(&file),
        });
        let mut text = serde_json::to_string_pretty(&doc).map_err(|e| {
            CliError::new(exit::FAILURE, "output", format!("cannot encode JSON: {e}"))
        })?;
        text.push('\n');
        text
    } else {
        text
    };
    out.write_all(text.as_bytes())
        .map_err(|e| CliError::new(exit::FAILURE, "output", format!("cannot write output: {e}")))
}

/// `path` made absolute against the working directory, so the context works from anywhere.
fn absolute(path: &Path) -> Result<PathBuf, CliError> {
    std::path::absolute(path).map_err(|e| CliError::bad_input(format!("{}: {e}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn given(
        url: Option<(&str, Origin)>,
        token: Option<(&str, Origin)>,
        token_file: Option<(&str, Origin)>,
        ca_file: Option<(&str, Origin)>,
    ) -> Given {
        Given {
            url: url.map(|(v, o)| (v.to_string(), o)),
            token: token.map(|(v, o)| (v.to_string(), o)),
            token_file: token_file.map(|(v, o)| (PathBuf::from(v), o)),
            ca_file: ca_file.map(|(v, o)| (PathBuf::from(v), o)),
        }
    }

    fn lab() -> Context {
        Context {
            url: "https://lab:7142".into(),
            token_file: Some("/ctx/token".into()),
            ca_file: Some("/ctx/ca.pem".into()),
        }
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_context_which_beats_defaults() {
        let t = resolve(&Given::default(), None);
        assert_eq!(t.url, DEFAULT_URL);
        assert_eq!(t.token, TokenFrom::DefaultFile);
        assert_eq!(t.ca, CaFrom::DefaultFile);

        let t = resolve(&Given::default(), Some(&lab()));
        assert_eq!(t.url, "https://lab:7142");
        assert_eq!(t.token, TokenFrom::File("/ctx/token".into()));
        assert_eq!(t.ca, CaFrom::File("/ctx/ca.pem".into()));

        let env = given(
            Some(("http://env:1", Origin::Env)),
            None,
            Some(("/env/token", Origin::Env)),
            Some(("/env/ca", Origin::Env)),
        );
        let t = resolve(&env, Some(&lab()));
        assert_eq!(t.url, "http://env:1");
        assert_eq!(t.token, TokenFrom::File("/env/token".into()));
        assert_eq!(t.ca, CaFrom::File("/env/ca".into()));

        let flags = given(
            Some(("http://flag:1", Origin::Flag)),
            None,
            Some(("/flag/token", Origin::Flag)),
            Some(("/flag/ca", Origin::Flag)),
        );
        let t = resolve(&flags, Some(&lab()));
        assert_eq!(t.url, "http://flag:1");
        assert_eq!(t.token, TokenFrom::File("/flag/token".into()));
        assert_eq!(t.ca, CaFrom::File("/flag/ca".into()));
    }

    #[test]
    fn token_order_is_flag_token_flag_file_env_token_env_file_context() {
        let both_env = given(
            None,
            Some(("env-secret", Origin::Env)),
            Some(("/env/token", Origin::Env)),
            None,
        );
        assert_eq!(
            resolve(&both_env, Some(&lab())).token,
            TokenFrom::Value("env-secret".into())
        );
        let file_flag = given(
            None,
            Some(("env-secret", Origin::Env)),
            Some(("/flag/token", Origin::Flag)),
            None,
        );
        assert_eq!(
            resolve(&file_flag, None).token,
            TokenFrom::File("/flag/token".into())
        );
        let token_flag = given(
            None,
            Some(("flag-secret", Origin::Flag)),
            Some(("/env/token", Origin::Env)),
            None,
        );
        assert_eq!(
            resolve(&token_flag, Some(&lab())).token,
            TokenFrom::Value("flag-secret".into())
        );
    }

    #[test]
    fn the_file_round_trips_and_errors_name_the_line() {
        let mut file = ConfigFile::default();
        file.contexts.insert("lab".into(), lab());
        file.contexts.insert(
            "local".into(),
            Context {
                url: "http://127.0.0.1:7142".into(),
                token_file: None,
                ca_file: None,
            },
        );
        file.current_context = Some("lab".into());
        let text = toml::to_string(&file).unwrap();
        assert!(text.contains("current_context = \"lab\""), "{text}");
        assert!(text.contains("[contexts.lab]"), "{text}");
        assert_eq!(ConfigFile::parse(&text).unwrap(), file);

        let (line, message) =
            ConfigFile::parse("current_context = \"lab\"\n\n[contexts.lab]\nurl = 7\n")
                .unwrap_err();
        assert_eq!(line, Some(4), "{message}");
        let (line, message) =
            ConfigFile::parse("current_context = \"prod\"\n[contexts.lab]\nurl = \"http://x:1\"\n")
                .unwrap_err();
        assert_eq!(line, Some(1));
        assert!(
            message.contains("\"prod\"") && message.contains("lab"),
            "{message}"
        );
        let (line, _) = ConfigFile::parse("[contexts.lab]\nurl = \"ftp://x\"\n").unwrap_err();
        assert_eq!(line, Some(2));
        assert!(ConfigFile::parse("[contexts.lab]\nurl = \"http://x\"\ntoken = \"s\"\n").is_err());
    }

    #[test]
    fn saving_is_atomic_private_and_loading_a_missing_file_is_no_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/anchorage/config.toml");
        assert_eq!(ConfigFile::load(&path).unwrap(), None);
        let mut file = ConfigFile::default();
        file.contexts.insert("lab".into(), lab());
        file.save(&path).unwrap();
        assert_eq!(ConfigFile::load(&path).unwrap(), Some(file));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        let leftovers: Vec<_> = std::fs::read_dir(path.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(leftovers.len(), 1, "{leftovers:?}");
        std::fs::write(&path, "[contexts.lab\n").unwrap();
        let err = ConfigFile::load(&path).unwrap_err();
        assert!(
            err.message.contains(&format!("{}:1:", path.display())),
            "{}",
            err.message
        );
    }

    #[test]
    fn the_default_path_follows_xdg_then_home() {
        if cfg!(windows) {
            return;
        }
        let env = |pairs: &'static [(&'static str, &'static str)]| {
            move |name: &str| {
                pairs
                    .iter()
                    .find(|(k, _)| *k == name)
                    .map(|(_, v)| OsString::from(v))
            }
        };
        assert_eq!(
            default_config_path(env(&[("XDG_CONFIG_HOME", "/x"), ("HOME", "/h")])),
            Some(PathBuf::from("/x/anchorage/config.toml"))
        );
        assert_eq!(
            default_config_path(env(&[("XDG_CONFIG_HOME", "rel"), ("HOME", "/h")])),
            Some(PathBuf::from("/h/.config/anchorage/config.toml"))
        );
        assert_eq!(default_config_path(env(&[])), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("lab-1.example_2").is_ok());
        for bad in ["", "a b", "a/b", &"x".repeat(MAX_NAME + 1)] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
