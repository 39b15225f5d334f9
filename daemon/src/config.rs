//! Configuration in two steps: a TOML [`FileConfig`] with defaults, overridden by command-line
//! flags, then validated into the runtime [`AnchorConfig`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

pub mod console_tls;

/// Default data directory.
pub const DEFAULT_DATA_DIR: &str = "./anchorage-data";
/// Default QUIC address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7444";
/// Default console address.
pub const DEFAULT_CONSOLE: &str = "127.0.0.1:7142";

pub use anchorage_mesh::config::ConfigError;

/// QUIC handshakes in progress above which clients must answer a Retry first.
pub const DEFAULT_RETRY_ABOVE_HANDSHAKES: usize = 256;
/// QUIC handshakes in progress above which new ones are refused (the client tries again in
/// a second or so): about half a second of handshakes on two cores, well under a node's
/// first handshake limit (2 s).
pub const DEFAULT_REFUSE_ABOVE_HANDSHAKES: usize = 512;

/// The TOML file, every key optional.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// Data directory.
    pub data_dir: Option<PathBuf>,
    /// QUIC listen address.
    pub listen: Option<String>,
    /// Console listen address.
    pub console: Option<String>,
    /// Address nodes should dial, put into QR codes (default: the listen address, with this
    /// host's name when it listens on all interfaces).
    pub public_addr: Option<String>,
    /// Validity of node certificates, e.g. `30d`.
    pub cert_validity: Option<String>,
    /// How long after expiry a node may still renew, e.g. `7d`.
    pub renewal_grace: Option<String>,
    /// Heartbeat interval given to nodes, e.g. `15s`.
    pub heartbeat_interval: Option<String>,
    /// No heartbeat for this long: stale.
    pub stale_after: Option<String>,
    /// No heartbeat for this long: offline.
    pub offline_after: Option<String>,
    /// Heartbeat loss above this fraction (0..1) over the recent window: degraded.
    pub degraded_loss: Option<f64>,
    /// Wrong secrets before a code is burned.
    pub pairing_max_attempts: Option<u32>,
    /// Failed pairing attempts one source address may make per minute.
    pub pairing_failures_per_source: Option<u32>,
    /// Failed pairing attempts all sources together may make per minute.
    pub pairing_failures_total: Option<u32>,
    /// QUIC handshakes in progress above which new clients must answer a Retry first.
    pub retry_above_handshakes: Option<usize>,
    /// QUIC handshakes in progress above which new ones are refused.
    pub refuse_above_handshakes: Option<usize>,
    /// Stored invocation output limit in bytes.
    pub invocation_output_limit: Option<u32>,
    /// Keep finished invocations this long, e.g. `7d`.
    pub invocation_retention: Option<String>,
    /// Keep at most this many finished invocations.
    pub invocation_max_records: Option<usize>,
    /// Also send small invocation requests (and ask for their results) as datagrams beside
    /// their streams, for short tails on lossy links (default: true).
    pub invocation_copies: Option<bool>,
    /// Log format: `text` or `json`.
    pub log_format: Option<String>,
    /// Async worker threads (default: one less than the cores, at least one).
    pub worker_threads: Option<usize>,

    // Console server (docs/console.md, "Connections and limits").
    /// Time a console client has to send a request head, e.g. `10s`.
    pub console_header_read_timeout: Option<String>,
    /// A console connection with no request in flight is closed after this, e.g. `5s`.
    pub console_idle_timeout: Option<String>,
    /// Most console connections open at once.
    pub console_max_connections: Option<usize>,
    /// Most console connections open at once from one IPv4 address or IPv6 /64.
    pub console_max_connections_per_source: Option<usize>,

    // The console over HTTPS (docs/operations.md, "Console over HTTPS").
    /// Serve the console over TLS with a certificate from the anchor CA.
    pub console_tls: Option<bool>,
    /// Names (DNS names or IP addresses) of that certificate (default localhost, 127.0.0.1,
    /// ::1).
    #[serde(alias = "console_name")]
    pub console_names: Option<Vec<String>>,
    /// The operator's own console certificate (PEM, with any intermediates); implies TLS.
    pub console_cert: Option<PathBuf>,
    /// The private key of `console_cert` (PEM).
    pub console_key: Option<PathBuf>,

    // The relay of the peer mesh (docs/operations.md, "Relay").
    /// Bytes a second one node may send through the anchor's relay.
    pub relay_node_bytes_per_sec: Option<u64>,
    /// Bytes a second all nodes together may send through the anchor's relay.
    pub relay_total_bytes_per_sec: Option<u64>,

    // The store (docs/cluster.md).
    /// `fjall` (embedded, in the data directory; the default) or `etcd`.
    pub store: Option<String>,
    /// etcd client URLs, e.g. `["http://10.0.0.1:2379", "http://10.0.0.2:2379"]`.
    pub etcd_endpoints: Option<Vec<String>>,
    /// Key prefix of this mesh in etcd (default `/anchorage`).
    pub etcd_prefix: Option<String>,
    /// The cluster key every anchor of the cluster is given (created if missing).
    pub cluster_key_file: Option<PathBuf>,
    /// How often the history service samples each node (only the hidden
    /// `--history-interval` flag sets it, for tests; not a key of the file).
    #[serde(skip)]
    pub history_interval: Option<String>,

    // Metrics (docs/operations.md, "Metrics").
    /// Address of a separate listener serving `/metrics` without a token (none by default).
    pub metrics_listen: Option<String>,
    /// Per-node round-trip and heartbeat-loss gauges (off by default).
    pub metrics_per_node: Option<bool>,

    // Running as a service (docs/operations.md, "Running as a service"); both reload on SIGHUP.
    /// Log filter, e.g. `info` or `info,anchorage_daemon=debug` (default: `RUST_LOG`, else
    /// `info` with the store's own lines at `warn`).
    pub log_level: Option<String>,
    /// A mesh policy file (TOML), put in force at start and on SIGHUP when its content changed,
    /// as `PUT /console/v1/policy` would.
    pub policy_file: Option<PathBuf>,
}

/// The flags `anchord` (and `anchord demo`) take over the TOML file: each one given wins
/// over the file's key of the same name.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct AnchorFlags {
    /// Data directory (store, CA, owner token). Default: ./anchorage-data
    #[arg(long, global = true, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// QUIC (UDP) listen address. Default: 0.0.0.0:7444
    #[arg(long, global = true, value_name = "ADDR")]
    pub listen: Option<String>,
    /// Console (HTTP) listen address. Default: 127.0.0.1:7142
    #[arg(long, global = true, value_name = "ADDR")]
    pub console: Option<String>,
    /// TOML configuration file; flags override it.
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address nodes dial, written into QR pairing codes (e.g. anchor.example:7444).
    #[arg(long, global = true, value_name = "HOST:PORT")]
    pub public_addr: Option<String>,
    /// Heartbeat interval given to nodes (e.g. 15s).
    #[arg(long, global = true, value_name = "DURATION")]
    pub heartbeat_interval: Option<String>,
    /// A node without heartbeats for this long is stale (e.g. 5m).
    #[arg(long, global = true, value_name = "DURATION")]
    pub stale_after: Option<String>,
    /// A node without heartbeats for this long is offline (e.g. 30m).
    #[arg(long, global = true, value_name = "DURATION")]
    pub offline_after: Option<String>,
    /// Validity of node certificates (e.g. 30d).
    #[arg(long, global = true, value_name = "DURATION")]
    pub cert_validity: Option<String>,
    /// Log format.
    #[arg(long, global = true, value_parser = ["text", "json"])]
    pub log_format: Option<String>,
    /// Async worker threads. Default: one less than the cores, at least one.
    #[arg(long, global = true, value_name = "N")]
    pub worker_threads: Option<usize>,
    /// Bytes a second one node may send through the relay. Default: 1048576 (1 MiB/s)
    #[arg(long, global = true, value_name = "BYTES")]
    pub relay_node_bytes_per_sec: Option<u64>,
    /// Bytes a second all nodes together may send through the relay. Default: 33554432
    /// (32 MiB/s)
    #[arg(long, global = true, value_name = "BYTES")]
    pub relay_total_bytes_per_sec: Option<u64>,
    /// Where state lives: fjall (embedded, in the data directory) or etcd (shared by the
    /// anchors of a cluster; needs a build with the `etcd` feature). Default: fjall
    #[arg(long, global = true, value_parser = ["fjall", "etcd"])]
    pub store: Option<String>,
    /// etcd client URLs, comma-separated (with --store etcd).
    #[arg(long, global = true, value_name = "URL,...", value_delimiter = ',')]
    pub etcd_endpoints: Option<Vec<String>>,
    /// Key prefix of this mesh in etcd. Default: /anchorage
    #[arg(long, global = true, value_name = "PREFIX")]
    pub etcd_prefix: Option<String>,
    /// The cluster key file every anchor of a cluster is given; the first anchor creates it
    /// (mode 0600) if it does not exist (with --store etcd).
    #[arg(long, global = true, value_name = "FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Serve the console over HTTPS with a certificate from the anchor CA (clients verify it
    /// with the data directory's ca.pem).
    #[arg(long, global = true)]
    pub console_tls: bool,
    /// A name of that certificate, a DNS name or an IP address (repeatable). Default:
    /// localhost, 127.0.0.1 and ::1
    #[arg(long, global = true, value_name = "NAME")]
    pub console_name: Vec<String>,
    /// Serve the console over HTTPS with this certificate (PEM, with any intermediates).
    #[arg(long, global = true, value_name = "FILE")]
    pub console_cert: Option<PathBuf>,
    /// The private key of --console-cert (PEM).
    #[arg(long, global = true, value_name = "FILE")]
    pub console_key: Option<PathBuf>,
    /// How often each node's link is sampled for its history (tests only). Default: 60s
    #[arg(long, global = true, hide = true, value_name = "DURATION")]
    pub history_interval: Option<String>,
    /// Serve `/metrics` without a token on this TCP address too (e.g. 0.0.0.0:9464)
    #[arg(long, global = true, value_name = "ADDR")]
    pub metrics_listen: Option<String>,
    /// Export per-node round-trip time and heartbeat loss (one series per live node)
    #[arg(long, global = true)]
    pub metrics_per_node: bool,
    /// Log filter: a level (trace, debug, info, warn, error) or RUST_LOG-style directives.
    /// Default: RUST_LOG, else info with the store's own lines at warn
    #[arg(long, global = true, value_name = "FILTER")]
    pub log_level: Option<String>,
    /// Mesh policy file (TOML), put in force at start and on SIGHUP when it changed.
    #[arg(long, global = true, value_name = "FILE")]
    pub policy_file: Option<PathBuf>,
}

impl AnchorFlags {
    /// The `--config` file, or an empty one without it.
    pub fn file(&self) -> Result<FileConfig, ConfigError> {
        match &self.config {
            Some(path) => FileConfig::load(path),
            None => Ok(FileConfig::default()),
        }
    }

    /// `file` with every flag given put over its key.
    pub fn over(&self, file: FileConfig) -> FileConfig {
        FileConfig {
            data_dir: self.data_dir.clone().or(file.data_dir),
            listen: self.listen.clone().or(file.listen),
            console: self.console.clone().or(file.console),
            public_addr: self.public_addr.clone().or(file.public_addr),
            heartbeat_interval: self.heartbeat_interval.clone().or(file.heartbeat_interval),
            stale_after: self.stale_after.clone().or(file.stale_after),
            offline_after: self.offline_after.clone().or(file.offline_after),
            cert_validity: self.cert_validity.clone().or(file.cert_validity),
            log_format: self.log_format.clone().or(file.log_format),
            worker_threads: self.worker_threads.or(file.worker_threads),
            store: self.store.clone().or(file.store),
            etcd_endpoints: self.etcd_endpoints.clone().or(file.etcd_endpoints),
            etcd_prefix: self.etcd_prefix.clone().or(file.etcd_prefix),
            cluster_key_file: self.cluster_key_file.clone().or(file.cluster_key_file),
            metrics_listen: self.metrics_listen.clone().or(file.metrics_listen),
            metrics_per_node: self
                .metrics_per_node
                .then_some(true)
                .or(file.metrics_per_node),
            relay_node_bytes_per_sec: self
                .relay_node_bytes_per_sec
                .or(file.relay_node_bytes_per_sec),
            relay_total_bytes_per_sec: self
                .relay_total_bytes_per_sec
                .or(file.relay_total_bytes_per_sec),
            console_tls: self.console_tls.then_some(true).or(file.console_tls),
            console_names: (!self.console_name.is_empty())
                .then(|| self.console_name.clone())
                .or(file.console_names),
            console_cert: self.console_cert.clone().or(file.console_cert),
            console_key: self.console_key.clone().or(file.console_key),
            history_interval: self.history_interval.clone().or(file.history_interval),
            log_level: self.log_level.clone().or(file.log_level),
            policy_file: self.policy_file.clone().or(file.policy_file),
            ..file
        }
    }

    /// The `--config` file with the flags over it, validated: what a start, a reload and
    /// `anchord check-config` all use. An error about a value given as a flag names the flag
    /// (`--stale-after`), not the file's key.
    pub fn load(&self) -> Result<AnchorConfig, ConfigError> {
        let file = self.file()?;
        self.over(file).validate().map_err(|e| match e {
            ConfigError::Invalid { key, message } if self.given(&key) => ConfigError::Invalid {
                key: format!("--{}", key.replace('_', "-")),
                message,
            },
            other => other,
        })
    }

    /// Whether the setting `key` (a TOML key) was given as a flag.
    fn given(&self, key: &str) -> bool {
        match key {
            "data_dir" => self.data_dir.is_some(),
            "listen" => self.listen.is_some(),
            "console" => self.console.is_some(),
            "public_addr" => self.public_addr.is_some(),
            "heartbeat_interval" => self.heartbeat_interval.is_some(),
            "stale_after" => self.stale_after.is_some(),
            "offline_after" => self.offline_after.is_some(),
            "cert_validity" => self.cert_validity.is_some(),
            "log_format" => self.log_format.is_some(),
            "worker_threads" => self.worker_threads.is_some(),
            "relay_node_bytes_per_sec" => self.relay_node_bytes_per_sec.is_some(),
            "relay_total_bytes_per_sec" => self.relay_total_bytes_per_sec.is_some(),
            "store" => self.store.is_some(),
            "etcd_endpoints" => self.etcd_endpoints.is_some(),
            "etcd_prefix" => self.etcd_prefix.is_some(),
            "cluster_key_file" => self.cluster_key_file.is_some(),
            "log_level" => self.log_level.is_some(),
            "policy_file" => self.policy_file.is_some(),
            _ => false,
        }
    }
}

impl FileConfig {
    /// Reads and parses a TOML file.
    pub fn load(path: &Path) -> Result<FileConfig, ConfigError> {
        anchorage_mesh::config::read_toml(path)
    }
}

/// Presence thresholds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PresenceConfig {
    /// Heartbeat interval given to nodes.
    pub heartbeat_interval: Duration,
    /// Stale after.
    pub stale_after: Duration,
    /// Offline after.
    pub offline_after: Duration,
    /// Degraded above this loss fraction.
    pub degraded_loss: f64,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        PresenceConfig {
            heartbeat_interval: Duration::from_secs(15),
            stale_after: Duration::from_secs(5 * 60),
            offline_after: Duration::from_secs(30 * 60),
            degraded_loss: 0.25,
        }
    }
}

/// Where the anchor keeps its state.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StoreChoice {
    /// fjall, in `<data dir>/store`.
    #[default]
    Fjall,
    /// A shared etcd cluster.
    Etcd(EtcdSettings),
}

/// How to reach the etcd cluster of [`StoreChoice::Etcd`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdSettings {
    /// Client URLs.
    pub endpoints: Vec<String>,
    /// Key prefix, starting with `/`.
    pub prefix: String,
    /// The cluster key file.
    pub cluster_key_file: PathBuf,
}

/// Default key prefix in etcd.
pub const DEFAULT_ETCD_PREFIX: &str = "/anchorage";

/// The validated runtime configuration.
#[derive(Debug, Clone)]
pub struct AnchorConfig {
    /// Data directory.
    pub data_dir: PathBuf,
    /// QUIC address.
    pub listen: SocketAddr,
    /// Console address.
    pub console: SocketAddr,
    /// Address for QR codes.
    pub public_addr: Option<String>,
    /// Node certificate validity.
    pub cert_validity: Duration,
    /// Renewal grace after expiry.
    pub renewal_grace: Duration,
    /// Presence thresholds.
    pub presence: PresenceConfig,
    /// Wrong secrets before a code burns.
    pub pairing_max_attempts: u32,
    /// Who may try to pair how often (docs/security.md).
    pub pairing_limits: crate::admission::PairingLimits,
    /// QUIC handshakes in progress above which a client must first prove its address with a
    /// Retry (one more round trip), so a flood of spoofed Initial packets costs the anchor no
    /// handshake state or signatures. 0: always.
    pub retry_above_handshakes: usize,
    /// QUIC handshakes in progress at or above which a new one is refused at once (QUIC's
    /// `CONNECTION_REFUSED`; nodes try again in about a second), so a storm of reconnecting
    /// nodes is answered at the rate the anchor can finish handshakes instead of queueing in
    /// the socket until the kernel drops Initial packets and the nodes wait out QUIC's doubling
    /// probe timeout.
    pub refuse_above_handshakes: usize,
    /// Stored output limit.
    pub invocation_output_limit: u32,
    /// Retention of finished invocations.
    pub invocation_retention: Duration,
    /// Most finished invocations kept.
    pub invocation_max_records: usize,
    /// Whether small invocations also travel as datagram copies ([`crate::invocations::copies`]).
    pub invocation_copies: bool,
    /// JSON logs.
    pub log_json: bool,
    /// Async worker threads of the runtime `anchord` builds.
    pub worker_threads: usize,
    /// The console server's timeouts and connection caps.
    pub console_serve: anchorage_console::ServeOptions,
    /// Where state lives.
    pub store: StoreChoice,
    /// The relay's bandwidth bounds.
    pub relay_limits: RelayLimits,
    /// Whether and how the console speaks HTTPS.
    pub console_tls: console_tls::ConsoleTls,
    /// How often devices are sampled for their history, and how much of it is kept.
    pub history: HistoryLimits,
    /// The configured log filter (`None`: `RUST_LOG`, else the default); checked, applied by
    /// the binary.
    pub log_level: Option<String>,
    /// The mesh policy file, if any (read by the binary at start and on reload).
    pub policy_file: Option<PathBuf>,
    /// What the metrics export, and where else.
    pub metrics: MetricsConfig,
}

/// The history's sampling interval by default.
pub const DEFAULT_HISTORY_INTERVAL: Duration = Duration::from_secs(60);
/// Samples kept per device by default: six hours at the default interval.
pub const DEFAULT_HISTORY_SAMPLES: usize = 360;
/// Presence changes kept per device by default.
pub const DEFAULT_HISTORY_TRANSITIONS: usize = 200;

/// How often the history service samples each device and how much it keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Time between two samples of a device.
    pub interval: Duration,
    /// Most samples kept per device (the oldest goes first).
    pub samples: usize,
    /// Most presence changes kept per device (the oldest goes first).
    pub transitions: usize,
}

impl Default for HistoryLimits {
    fn default() -> Self {
        HistoryLimits {
            interval: DEFAULT_HISTORY_INTERVAL,
            samples: DEFAULT_HISTORY_SAMPLES,
            transitions: DEFAULT_HISTORY_TRANSITIONS,
        }
    }
}

/// The settings a reload changes that the anchor's tasks read while running (the presence
/// thresholds live in the node table's settings). Starts from the configuration.
#[derive(Debug)]
pub struct LiveSettings {
    retention: Mutex<Retention>,
}

/// How long and how many finished invocations (and batches) are kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Finished invocations and batches older than this are pruned.
    pub max_age: Duration,
    /// At most this many finished invocations are kept.
    pub max_records: usize,
}

impl LiveSettings {
    /// The running values of `config`.
    pub fn new(config: &AnchorConfig) -> LiveSettings {
        LiveSettings {
            retention: Mutex::new(retention_of(config)),
        }
    }

    /// The retention in force.
    pub fn retention(&self) -> Retention {
        *self.retention.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(crate) fn set_retention(&self, r: Retention) {
        *self.retention.lock().unwrap_or_else(|e| e.into_inner()) = r;
    }
}

pub(crate) fn retention_of(config: &AnchorConfig) -> Retention {
    Retention {
        max_age: config.invocation_retention,
        max_records: config.invocation_max_records,
    }
}

/// The metrics' settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MetricsConfig {
    /// A separate listener serving `/metrics` without a token.
    pub listen: Option<SocketAddr>,
    /// Per-node round-trip and heartbeat-loss gauges.
    pub per_node: bool,
}

/// Async worker threads by default: one less than the cores, at least one.
///
/// The spare core serves the blocking pool (store commits, fsyncs, certificate signing) and
/// the kernel's network work. A fleet heartbeating at a steady rate wakes the runtime about
/// once per datagram; with every core a worker, each wake also unparks an idle worker that
/// finds nothing to steal: 16-18 % of a core instead of 13 % at 1,000 nodes on two cores
/// (docs/benchmarks.md, Heartbeats).
pub fn default_worker_threads() -> usize {
    std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .saturating_sub(1)
        .max(1)
}

impl AnchorConfig {
    /// Defaults with `data_dir`, QUIC and console on 127.0.0.1 port 0 (for tests).
    pub fn for_tests(data_dir: impl Into<PathBuf>) -> AnchorConfig {
        let mut c = FileConfig::default()
            .validate()
            .unwrap_or_else(|_| unreachable!("defaults are valid"));
        c.data_dir = data_dir.into();
        c.listen = SocketAddr::from(([127, 0, 0, 1], 0));
        c.console = SocketAddr::from(([127, 0, 0, 1], 0));
        c
    }
}

impl FileConfig {
    /// Validates into the runtime configuration.
    pub fn validate(self) -> Result<AnchorConfig, ConfigError> {
        let console_serve = console_serve_options(&self)?;
        let store = store_choice(&self)?;
        let relay_limits = relay_limits(&self)?;
        let console_tls = console_tls::settings(
            self.console_tls,
            self.console_names.as_deref(),
            self.console_cert.as_deref(),
            self.console_key.as_deref(),
        )?;
        let metrics = metrics_config(&self)?;
        if let Some(level) = &self.log_level {
            anchorage_mesh::os::check_log_filter(level)
                .map_err(|m| ConfigError::invalid("log_level", m))?;
        }
        let addr = |key: &'static str, v: Option<String>, default: &str| {
            let s = v.unwrap_or_else(|| default.to_string());
            s.parse::<SocketAddr>().map_err(|_| {
                ConfigError::invalid(key, format!("{s:?} is not an address like 0.0.0.0:7444"))
            })
        };
        let dur = |key: &'static str, v: Option<String>, default: Duration| match v {
            None => Ok(default),
            Some(s) => parse_duration(&s).map_err(|e| ConfigError::invalid(key, e.to_string())),
        };
        let presence = PresenceConfig {
            heartbeat_interval: dur(
                "heartbeat_interval",
                self.heartbeat_interval,
                PresenceConfig::default().heartbeat_interval,
            )?,
            stale_after: dur(
                "stale_after",
                self.stale_after,
                PresenceConfig::default().stale_after,
            )?,
            offline_after: dur(
                "offline_after",
                self.offline_after,
                PresenceConfig::default().offline_after,
            )?,
            degraded_loss: self
                .degraded_loss
                .unwrap_or(PresenceConfig::default().degraded_loss),
        };
        if presence.heartbeat_interval < Duration::from_millis(100)
            || presence.heartbeat_interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::Invalid {
                key: "heartbeat_interval".into(),
                message: "must be between 100ms and 1h".into(),
            });
        }
        if presence.stale_after <= presence.heartbeat_interval {
            return Err(ConfigError::Invalid {
                key: "stale_after".into(),
                message: "must be longer than the heartbeat interval".into(),
            });
        }
        if presence.offline_after <= presence.stale_after {
            return Err(ConfigError::Invalid {
                key: "offline_after".into(),
                message: "must be longer than stale_after".into(),
            });
        }
        if !(0.0..=1.0).contains(&presence.degraded_loss) {
            return Err(ConfigError::Invalid {
                key: "degraded_loss".into(),
                message: "must be a fraction between 0 and 1".into(),
            });
        }
        let cert_validity = dur(
            "cert_validity",
            self.cert_validity,
            anchorage_mesh::pki::DEFAULT_CLIENT_CERT_VALIDITY,
        )?;
        if cert_validity < Duration::from_secs(60) {
            return Err(ConfigError::Invalid {
                key: "cert_validity".into(),
                message: "must be at least 1m".into(),
            });
        }
        let log_json = match self.log_format.as_deref() {
            None | Some("text") => false,
            Some("json") => true,
            Some(other) => {
                return Err(ConfigError::Invalid {
                    key: "log_format".into(),
                    message: format!("{other:?}: expected text or json"),
                });
            }
        };
        let max_attempts = self.pairing_max_attempts.unwrap_or(3);
        if max_attempts == 0 || max_attempts > 100 {
            return Err(ConfigError::Invalid {
                key: "pairing_max_attempts".into(),
                message: "must be between 1 and 100".into(),
            });
        }
        let mut pairing_limits = crate::admission::PairingLimits::defaults(max_attempts);
        for (key, value, field) in [
            (
                "pairing_failures_per_source",
                self.pairing_failures_per_source,
                &mut pairing_limits.failures_per_source_per_minute,
            ),
            (
                "pairing_failures_total",
                self.pairing_failures_total,
                &mut pairing_limits.failures_per_minute,
            ),
        ] {
            match value {
                None => {}
                Some(n) if (1..=1_000_000).contains(&n) => *field = n,
                Some(_) => {
                    return Err(ConfigError::invalid(
                        key,
                        "must be between 1 and 1000000 (per minute)",
                    ));
                }
            }
        }
        let worker_threads = self.worker_threads.unwrap_or_else(default_worker_threads);
        if worker_threads == 0 || worker_threads > 1024 {
            return Err(ConfigError::Invalid {
                key: "worker_threads".into(),
                message: "must be between 1 and 1024".into(),
            });
        }
        let history = HistoryLimits {
            interval: dur(
                "history_interval",
                self.history_interval.clone(),
                DEFAULT_HISTORY_INTERVAL,
            )?,
            ..Default::default()
        };
        if history.interval < Duration::from_millis(100)
            || history.interval > Duration::from_secs(3600)
        {
            return Err(ConfigError::invalid(
                "history_interval",
                "must be between 100ms and 1h".to_string(),
            ));
        }
        Ok(AnchorConfig {
            history,
            worker_threads,
            data_dir: self
                .data_dir
                .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR)),
            listen: addr("listen", self.listen, DEFAULT_LISTEN)?,
            console: addr("console", self.console, DEFAULT_CONSOLE)?,
            public_addr: self.public_addr,
            cert_validity,
            renewal_grace: dur(
                "renewal_grace",
                self.renewal_grace,
                anchorage_mesh::tls::DEFAULT_RENEWAL_GRACE,
            )?,
            presence,
            pairing_max_attempts: max_attempts,
            pairing_limits,
            retry_above_handshakes: self
                .retry_above_handshakes
                .unwrap_or(DEFAULT_RETRY_ABOVE_HANDSHAKES),
            refuse_above_handshakes: match self.refuse_above_handshakes {
                Some(0) => {
                    return Err(ConfigError::invalid(
                        "refuse_above_handshakes",
                        "must be at least 1 (0 would refuse every node)",
                    ));
                }
                Some(n) => n,
                None => DEFAULT_REFUSE_ABOVE_HANDSHAKES,
            },
            invocation_output_limit: self.invocation_output_limit.unwrap_or(64 * 1024),
            invocation_retention: dur(
                "invocation_retention",
                self.invocation_retention,
                Duration::from_secs(7 * 24 * 3600),
            )?,
            invocation_max_records: self.invocation_max_records.unwrap_or(10_000),
            invocation_copies: self.invocation_copies.unwrap_or(true),
            log_json,
            console_serve,
            store,
            relay_limits,
            console_tls,
            metrics,
            log_level: self.log_level,
            policy_file: self.policy_file,
        })
    }
}

/// The `store`, `etcd_*` and `cluster_key_file` keys, validated.
fn store_choice(file: &FileConfig) -> Result<StoreChoice, ConfigError> {
    let etcd_keys_given = file.etcd_endpoints.is_some()
        || file.etcd_prefix.is_some()
        || file.cluster_key_file.is_some();
    match file.store.as_deref() {
        None | Some("fjall") => {
            if etcd_keys_given {
                return Err(ConfigError::invalid(
                    "store",
                    "etcd_endpoints, etcd_prefix and cluster_key_file need store = \"etcd\"",
                ));
            }
            Ok(StoreChoice::Fjall)
        }
        Some("etcd") => {
            if !cfg!(feature = "etcd") {
                return Err(ConfigError::invalid(
                    "store",
                    "this anchord was built without the etcd store: build it with \
                     `cargo build --release --bin anchord --features anchorage-daemon/etcd` \
                     (needs protoc)",
                ));
            }
            let endpoints: Vec<String> = file
                .etcd_endpoints
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(|e| e.trim().to_string())
                .filter(|e| !e.is_empty())
                .collect();
            if endpoints.is_empty() {
                return Err(ConfigError::invalid(
                    "etcd_endpoints",
                    "store = \"etcd\" needs at least one endpoint, e.g. http://127.0.0.1:2379",
                ));
            }
            for e in &endpoints {
                if !(e.starts_with("http://") || e.starts_with("https://")) || e.len() > 2048 {
                    return Err(ConfigError::invalid(
                        "etcd_endpoints",
                        format!("{e:?} is not a URL like http://127.0.0.1:2379"),
                    ));
                }
            }
            let prefix = file
                .etcd_prefix
                .clone()
                .unwrap_or_else(|| DEFAULT_ETCD_PREFIX.to_string());
            if !prefix.starts_with('/')
                || prefix.len() > 256
                || prefix.chars().any(|c| c.is_control() || c.is_whitespace())
            {
                return Err(ConfigError::invalid(
                    "etcd_prefix",
                    format!(
                        "{prefix:?} must start with / and have no spaces or control characters"
                    ),
                ));
            }
            let cluster_key_file = file.cluster_key_file.clone().ok_or_else(|| {
                ConfigError::invalid(
                    "cluster_key_file",
                    "store = \"etcd\" needs the cluster key file every anchor of the cluster \
                     is given (the first anchor creates it)",
                )
            })?;
            Ok(StoreChoice::Etcd(EtcdSettings {
                endpoints,
                prefix,
                cluster_key_file,
            }))
        }
        Some(other) => Err(ConfigError::invalid(
            "store",
            format!("{other:?}: expected fjall or etcd"),
        )),
    }
}

/// The `relay_*` keys, validated.
/// Default relay bandwidth of the whole anchor, bytes a second.
pub const DEFAULT_RELAY_TOTAL_BYTES_PER_SEC: u64 = 32 * 1024 * 1024;
/// Default relay bandwidth of one node, bytes a second.
pub const DEFAULT_RELAY_NODE_BYTES_PER_SEC: u64 = 1024 * 1024;
/// The relay's bandwidth bounds. Each bucket holds one second of its rate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RelayLimits {
    /// Bytes a second one node may send through the relay.
    pub node_bytes_per_sec: u64,
    /// Bytes a second all nodes together may send through the relay.
    pub total_bytes_per_sec: u64,
}

impl Default for RelayLimits {
    fn default() -> Self {
        RelayLimits {
            node_bytes_per_sec: DEFAULT_RELAY_NODE_BYTES_PER_SEC,
            total_bytes_per_sec: DEFAULT_RELAY_TOTAL_BYTES_PER_SEC,
        }
    }
}

/// The `metrics_*` keys, validated.
fn metrics_config(file: &FileConfig) -> Result<MetricsConfig, ConfigError> {
    let listen = match &file.metrics_listen {
        None => None,
        Some(s) => Some(s.parse::<SocketAddr>().map_err(|_| {
            ConfigError::invalid(
                "metrics_listen",
                format!("{s:?} is not an address like 127.0.0.1:9464"),
            )
        })?),
    };
    Ok(MetricsConfig {
        listen,
        per_node: file.metrics_per_node.unwrap_or(false),
    })
}

fn relay_limits(file: &FileConfig) -> Result<RelayLimits, ConfigError> {
    let defaults = RelayLimits::default();
    // At least one packet of the largest size a second, so that a bound passes anything.
    let min = anchorage_wire::peer::MAX_RELAY_PACKET as u64;
    let rate = |key: &'static str, v: Option<u64>, default: u64| {
        let n = v.unwrap_or(default);
        if n < min || n > 1 << 40 {
            return Err(ConfigError::invalid(
                key,
                format!("must be between {min} and 1099511627776 (bytes a second)"),
            ));
        }
        Ok(n)
    };
    let node_bytes_per_sec = rate(
        "relay_node_bytes_per_sec",
        file.relay_node_bytes_per_sec,
        defaults.node_bytes_per_sec,
    )?;
    let total_bytes_per_sec = rate(
        "relay_total_bytes_per_sec",
        file.relay_total_bytes_per_sec,
        defaults.total_bytes_per_sec,
    )?;
    if node_bytes_per_sec > total_bytes_per_sec {
        return Err(ConfigError::invalid(
            "relay_node_bytes_per_sec",
            "must not be more than relay_total_bytes_per_sec",
        ));
    }
    Ok(RelayLimits {
        node_bytes_per_sec,
        total_bytes_per_sec,
    })
}

/// The `console_*` keys, validated into the console server's options.
fn console_serve_options(
    file: &FileConfig,
) -> Result<anchorage_console::ServeOptions, ConfigError> {
    let defaults = anchorage_console::ServeOptions::default();
    let timeout = |key: &'static str, v: &Option<String>, default: Duration| {
        let d = match v {
            None => default,
            Some(s) => parse_duration(s).map_err(|e| ConfigError::invalid(key, e.to_string()))?,
        };
        if d < Duration::from_millis(100) || d > Duration::from_secs(3600) {
            return Err(ConfigError::invalid(key, "must be between 100ms and 1h"));
        }
        Ok(d)
    };
    let count = |key: &'static str, v: Option<usize>, default: usize| {
        let n = v.unwrap_or(default);
        if n == 0 || n > 1_000_000 {
            return Err(ConfigError::invalid(key, "must be between 1 and 1000000"));
        }
        Ok(n)
    };
    let max_connections = count(
        "console_max_connections",
        file.console_max_connections,
        defaults.max_connections,
    )?;
    let max_connections_per_source = count(
        "console_max_connections_per_source",
        file.console_max_connections_per_source,
        defaults.max_connections_per_source.min(max_connections),
    )?;
    if max_connections_per_source > max_connections {
        return Err(ConfigError::invalid(
            "console_max_connections_per_source",
            "must not be more than console_max_connections",
        ));
    }
    Ok(anchorage_console::ServeOptions {
        header_read_timeout: timeout(
            "console_header_read_timeout",
            &file.console_header_read_timeout,
            defaults.header_read_timeout,
        )?,
        idle_timeout: timeout(
            "console_idle_timeout",
            &file.console_idle_timeout,
            defaults.idle_timeout,
        )?,
        max_connections,
        max_connections_per_source,
        ..defaults
    })
}

pub use anchorage_mesh::config::parse_duration;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_the_documented_ones() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.listen.to_string(), "0.0.0.0:7444");
        assert_eq!(c.console.to_string(), "127.0.0.1:7142");
        assert_eq!(c.data_dir, PathBuf::from("./anchorage-data"));
        assert_eq!(c.presence.stale_after, Duration::from_secs(300));
        assert_eq!(c.presence.offline_after, Duration::from_secs(1800));
        assert_eq!(c.cert_validity, Duration::from_secs(30 * 86400));
        assert_eq!(c.pairing_max_attempts, 3);
        assert_eq!(c.pairing_limits.failures_per_source_per_minute, 10);
        assert_eq!(c.pairing_limits.failures_per_minute, 600);
        assert_eq!(c.pairing_limits.guesses_per_code, 2);
        assert!(c.worker_threads >= 1);
        assert_eq!(c.worker_threads, default_worker_threads());
        assert_eq!(c.console_serve, anchorage_console::ServeOptions::default());
        assert_eq!(c.console_serve.header_read_timeout, Duration::from_secs(10));
        assert_eq!(c.console_serve.idle_timeout, Duration::from_secs(5));
        assert_eq!(c.console_serve.max_connections, 512);
        assert_eq!(c.console_serve.max_connections_per_source, 128);
    }

    #[test]
    fn metrics_keys_are_read_checked_and_overridden_by_flags() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.metrics, MetricsConfig::default());
        let file = toml::from_str::<FileConfig>(
            "metrics_listen = \"127.0.0.1:9464\"\nmetrics_per_node = true",
        )
        .unwrap();
        let c = file.clone().validate().unwrap();
        assert_eq!(c.metrics.listen, Some("127.0.0.1:9464".parse().unwrap()));
        assert!(c.metrics.per_node);
        let flags = AnchorFlags {
            metrics_listen: Some("0.0.0.0:9100".into()),
            ..AnchorFlags::default()
        };
        let c = flags.over(file).validate().unwrap();
        assert_eq!(c.metrics.listen, Some("0.0.0.0:9100".parse().unwrap()));
        assert!(c.metrics.per_node, "the file's key stands without the flag");
        let err = toml::from_str::<FileConfig>("metrics_listen = \"9464\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("metrics_listen"), "{err}");
    }

    #[test]
    fn relay_keys_are_read_and_checked() {
        let c = FileConfig::default().validate().unwrap();
        assert_eq!(c.relay_limits, RelayLimits::default());
        assert_eq!(c.relay_limits.node_bytes_per_sec, 1024 * 1024);
        let c = toml::from_str::<FileConfig>(
            "relay_node_bytes_per_sec = 4096\nrelay_total_bytes_per_sec = 8192",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.relay_limits.node_bytes_per_sec, 4096);
        assert_eq!(c.relay_limits.total_bytes_per_sec, 8192);
        for (text, key) in [
            ("relay_node_bytes_per_sec = 10", "relay_node_bytes_per_sec"),
            (
                "relay_node_bytes_per_sec = 9000\nrelay_total_bytes_per_sec = 8192",
                "relay_node_bytes_per_sec",
            ),
        ] {
            let err = toml::from_str::<FileConfig>(text)
                .unwrap()
                .validate()
                .unwrap_err();
            assert!(err.to_string().contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn console_keys_are_read_and_checked() {
        let c = toml::from_str::<FileConfig>(
            "console_header_read_timeout = \"1s\"\nconsole_idle_timeout = \"500ms\"\n\
             console_max_connections = 8\nconsole_max_connections_per_source = 4",
        )
        .unwrap()
        .validate()
        .unwrap();
        assert_eq!(c.console_serve.header_read_timeout, Duration::from_secs(1));
        assert_eq!(c.console_serve.idle_timeout, Duration::from_millis(500));
        assert_eq!(c.console_serve.max_connections, 8);
        assert_eq!(c.console_serve.max_connections_per_source, 4);
        // A total cap below the default per-source one lowers that one with it.
        let c = toml::from_str::<FileConfig>("console_max_connections = 8")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.console_serve.max_connections_per_source, 8);
        for (text, key) in [
            (
                "console_header_read_timeout = \"0s\"",
                "console_header_read_timeout",
            ),
            ("console_idle_timeout = \"soon\"", "console_idle_timeout"),
            ("console_max_connections = 0", "console_max_connections"),
            (
                "console_max_connections = 4\nconsole_max_connections_per_source = 5",
                "console_max_connections_per_source",
            ),
        ] {
            let err = toml::from_str::<FileConfig>(text)
                .unwrap()
                .validate()
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
    }

    #[test]
    fn the_store_is_fjall_unless_etcd_is_asked_for_with_what_it_needs() {
        let parse = |text: &str| toml::from_str::<FileConfig>(text).unwrap().validate();
        assert_eq!(parse("").unwrap().store, StoreChoice::Fjall);
        assert_eq!(
            parse("store = \"fjall\"").unwrap().store,
            StoreChoice::Fjall
        );
        let err = parse("etcd_prefix = \"/x\"").unwrap_err().to_string();
        assert!(err.contains("store = \"etcd\""), "{err}");
        let err = parse("store = \"zookeeper\"").unwrap_err().to_string();
        assert!(err.contains("expected fjall or etcd"), "{err}");
        let etcd = "store = \"etcd\"\ncluster_key_file = \"/k\"\n";
        if cfg!(feature = "etcd") {
            let err = parse(etcd).unwrap_err().to_string();
            assert!(err.contains("etcd_endpoints"), "{err}");
            let err = parse(&format!("{etcd}etcd_endpoints = [\"127.0.0.1:2379\"]"))
                .unwrap_err()
                .to_string();
            assert!(err.contains("not a URL"), "{err}");
            let c = parse(&format!(
                "{etcd}etcd_endpoints = [\"http://127.0.0.1:2379\", \" \"]"
            ))
            .unwrap();
            assert_eq!(
                c.store,
                StoreChoice::Etcd(EtcdSettings {
                    endpoints: vec!["http://127.0.0.1:2379".into()],
                    prefix: DEFAULT_ETCD_PREFIX.into(),
                    cluster_key_file: "/k".into(),
                })
            );
            let err = parse("store = \"etcd\"\netcd_endpoints = [\"http://e:1\"]")
                .unwrap_err()
                .to_string();
            assert!(err.contains("cluster_key_file"), "{err}");
        } else {
            let err = parse(etcd).unwrap_err().to_string();
            assert!(err.contains("built without the etcd store"), "{err}");
        }
    }

    #[test]
    fn bad_values_are_named() {
        let err = toml::from_str::<FileConfig>("listen = \"nope\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("`listen`"), "{err}");
        let err = toml::from_str::<FileConfig>("stale_after = \"1s\"\nheartbeat_interval = \"2s\"")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("stale_after"), "{err}");
        let err = toml::from_str::<FileConfig>("worker_threads = 0")
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(err.to_string().contains("worker_threads"), "{err}");
        let c = toml::from_str::<FileConfig>("worker_threads = 3")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.worker_threads, 3);
        assert!(
            toml::from_str::<FileConfig>("listn = \"x\"").is_err(),
            "unknown keys refused"
        );
    }

    #[test]
    fn a_bad_value_given_as_a_flag_is_named_by_the_flag() {
        let flags = AnchorFlags {
            stale_after: Some("1s".into()),
            heartbeat_interval: Some("2s".into()),
            ..Default::default()
        };
        let err = flags.load().unwrap_err().to_string();
        assert!(err.contains("`--stale-after`"), "{err}");
        let flags = AnchorFlags {
            log_level: Some("debgu".into()),
            ..Default::default()
        };
        let err = flags.load().unwrap_err().to_string();
        assert!(err.contains("`--log-level`"), "{err}");
        // From the file, the key.
        let err = toml::from_str::<FileConfig>("log_level = \"debgu\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`log_level`"), "{err}");
    }

    #[test]
    fn durations_take_sums_and_bad_ones_name_the_key() {
        let c = toml::from_str::<FileConfig>("stale_after = \"1h30m\"\noffline_after = \"2h\"")
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(c.presence.stale_after, Duration::from_secs(5400));
        let err = toml::from_str::<FileConfig>("invocation_retention = \"7 parsecs\"")
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(err.contains("`invocation_retention`"), "{err}");
        assert!(err.contains("unknown unit \"parsecs\""), "{err}");
    }
}
