//! `anchorage-netsim`: network simulation tools. `proxy` relays UDP between real sockets
//! through an impaired link, so real binaries can be run over a bad network on loopback.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anchorage_netsim::link::LinkConfig;
use anchorage_netsim::proxy::{self, ProxyConfig};
use anchorage_netsim::{Loss, Preset};
use anyhow::Context;
use clap::{Args, Parser, Subcommand};

/// Exit code for bad flags (EX_USAGE).
const EXIT_USAGE: u8 = 64;

/// Anchorage network simulator tools.
#[derive(Debug, Parser)]
#[command(name = "anchorage-netsim", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Relay UDP from --listen to --upstream through an impaired link (both directions).
    ///
    /// Each client address gets its own socket towards the upstream, so QUIC connections
    /// work through it. Every flag applies to each direction separately. Counters are
    /// printed on Ctrl-C.
    Proxy(ProxyArgs),
}

#[derive(Debug, Args)]
struct ProxyArgs {
    /// Address to listen on; point clients here (port 0 picks a free port, printed at start).
    #[arg(long, value_name = "ADDR")]
    listen: SocketAddr,
    /// Address of the server to relay to.
    #[arg(long, value_name = "ADDR")]
    upstream: SocketAddr,
    /// Start from a named link: lan, wifi, lte, congested-3g, satellite or hostile. The
    /// flags below override its fields.
    #[arg(long, value_name = "NAME")]
    preset: Option<Preset>,
    /// Independent loss probability: 0.1 or 10%.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    loss: Option<f64>,
    /// One-way delay, e.g. 50ms, 1.5s, 800us.
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    delay: Option<Duration>,
    /// Delay varies uniformly within delay ± jitter, e.g. 10ms.
    #[arg(long, value_name = "J", value_parser = parse_duration)]
    jitter: Option<Duration>,
    /// Probability that a datagram is held back and overtaken: 0.01 or 1%.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    reorder: Option<f64>,
    /// How long a reordered datagram is held back (default 10ms).
    #[arg(long, value_name = "D", value_parser = parse_duration)]
    reorder_delay: Option<Duration>,
    /// Probability that a datagram is delivered twice: 0.01 or 1%.
    #[arg(long, value_name = "P", value_parser = parse_probability)]
    duplicate: Option<f64>,
    /// Bandwidth, headers included: e.g. 1mbit, 500kbit, 2.5Mbit/s, 64000 (bit/s).
    #[arg(long, value_name = "R", value_parser = parse_rate)]
    rate: Option<u64>,
    /// Bytes the bandwidth queue holds before dropping (default 262144).
    #[arg(long, value_name = "BYTES")]
    queue: Option<usize>,
    /// Largest IP packet in bytes (payload + 28 bytes of IPv4/UDP header); larger are dropped.
    #[arg(long, value_name = "BYTES")]
    mtu: Option<usize>,
    /// Seed of every random decision; the same seed and traffic give the same decisions.
    /// Chosen from the clock and printed if absent.
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(error) => {
            let _ = error.print();
            return match error.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => {
                    ExitCode::SUCCESS
                }
                _ => ExitCode::from(EXIT_USAGE),
            };
        }
    };
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .init();
    match cli.command {
        Command::Proxy(args) => {
            let config = match args.into_config() {
                Ok(config) => config,
                Err(message) => {
                    eprintln!("anchorage-netsim proxy: {message}");
                    return ExitCode::from(EXIT_USAGE);
                }
            };
            match run_proxy(config) {
                Ok(()) => ExitCode::SUCCESS,
                Err(error) => {
                    eprintln!("anchorage-netsim proxy: {error:#}");
                    ExitCode::FAILURE
                }
            }
        }
    }
}

fn run_proxy(config: ProxyConfig) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        let listen = config.listen;
        let upstream = config.upstream;
        let seed = config.seed;
        let link = config.link.clone();
        let proxy = proxy::Proxy::bind(config).await?;
        let local = proxy
            .local_addr()
            .with_context(|| format!("cannot read the address bound for {listen}"))?;
        // Registered before the banner, so an interrupt right after it is not missed.
        let interrupted = interrupted().context("cannot listen for Ctrl-C")?;
        println!("anchorage-netsim proxy: listening on {local}, relaying to {upstream}");
        println!("link (each direction): {link}");
        println!("seed: {seed} (replay with --seed {seed})");
        let counters = proxy.run(interrupted).await;
        println!("{counters}");
        Ok(())
    })
}

/// Completes on Ctrl-C (SIGINT) or SIGTERM.
#[cfg(unix)]
fn interrupted() -> std::io::Result<impl std::future::Future<Output = ()>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut terminate = signal(SignalKind::terminate())?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
    })
}

/// Completes on Ctrl-C.
#[cfg(not(unix))]
fn interrupted() -> std::io::Result<impl std::future::Future<Output = ()>> {
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}

impl ProxyArgs {
    fn into_config(self) -> Result<ProxyConfig, String> {
        let mut link = self.preset.map(LinkConfig::preset).unwrap_or_default();
        if let Some(p) = self.loss {
            link.loss = if p > 0.0 {
                Loss::Independent(p)
            } else {
                Loss::None
            };
        }
        if let Some(d) = self.delay {
            link.latency = d;
        }
        if let Some(j) = self.jitter {
            link.jitter = j;
        }
        if let Some(p) = self.reorder {
            link.reorder = p;
        }
        if let Some(d) = self.reorder_delay {
            link.reorder_delay = d;
        }
        if let Some(p) = self.duplicate {
            link.duplicate = p;
        }
        if let Some(r) = self.rate {
            link.rate = Some(r);
        }
        if let Some(q) = self.queue {
            link.queue_bytes = q;
        }
        if let Some(m) = self.mtu {
            link.mtu = m;
        }
        link.validate().map_err(|e| e.to_string())?;
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Ok(ProxyConfig {
            listen: self.listen,
            upstream: self.upstream,
            link,
            seed,
        })
    }
}

/// Parses `0.1` or `10%` into a probability in [0, 1].
fn parse_probability(s: &str) -> Result<f64, String> {
    let (number, scale) = match s.strip_suffix('%') {
        Some(n) => (n, 100.0),
        None => (s, 1.0),
    };
    let value = number
        .trim()
        .parse::<f64>()
        .map_err(|_| format!("{s:?} is not a probability (use 0.1 or 10%)"))?
        / scale;
    if (0.0..=1.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{s:?} is not between 0 and 1 (0% and 100%)"))
    }
}

/// Parses `50ms`, `1.5s`, `800us` or `0`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(|| format!("{s:?} needs a unit: us, ms or s (e.g. 50ms)"))?;
    let (number, unit) = s.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 50ms)"))?;
    let seconds = match unit.trim() {
        "us" | "µs" => value / 1e6,
        "ms" => value / 1e3,
        "s" => value,
        other => return Err(format!("unknown unit {other:?} in {s:?}; use us, ms or s")),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| format!("{s:?} is out of range"))
}

/// Parses `1mbit`, `500kbit`, `2.5Mbit/s`, `1gbps` or a plain number of bits per second.
fn parse_rate(s: &str) -> Result<u64, String> {
    let lower = s.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a rate (e.g. 1mbit)"))?;
    let unit = unit.trim();
    let prefix = ["bit/s", "bits/s", "bps", "bit", "bits"]
        .iter()
        .find_map(|suffix| unit.strip_suffix(suffix))
        .unwrap_or(unit);
    let scale = match prefix {
        "" => 1.0,
        "k" => 1e3,
        "m" => 1e6,
        "g" => 1e9,
        _ => {
            return Err(format!(
                "unknown rate unit in {s:?}; use bit, kbit, mbit or gbit (per second)"
            ));
        }
    };
    let bits = value * scale;
    if bits.is_finite() && bits >= 1.0 && bits <= u64::MAX as f64 {
        Ok(bits as u64)
    } else {
        Err(format!("{s:?} is out of range"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_flag_values() {
        assert_eq!(parse_probability("10%"), Ok(0.1));
        assert_eq!(parse_probability("0.25"), Ok(0.25));
        assert!(parse_probability("1.5").is_err());
        assert!(parse_probability("abc").is_err());
        assert_eq!(parse_duration("50ms"), Ok(Duration::from_millis(50)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("800us"), Ok(Duration::from_micros(800)));
        assert_eq!(parse_duration("0"), Ok(Duration::ZERO));
        assert!(parse_duration("50").is_err());
        assert!(parse_duration("5min").is_err());
        assert_eq!(parse_rate("1mbit"), Ok(1_000_000));
        assert_eq!(parse_rate("2.5Mbit/s"), Ok(2_500_000));
        assert_eq!(parse_rate("500kbps"), Ok(500_000));
        assert_eq!(parse_rate("64000"), Ok(64_000));
        assert!(parse_rate("10MB").is_err());
        assert!(parse_rate("fast").is_err());
    }

    #[test]
    fn flags_override_the_preset() {
        let cli = Cli::try_parse_from([
            "anchorage-netsim",
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:7444",
            "--preset",
            "lte",
            "--loss",
            "10%",
            "--seed",
            "5",
        ])
        .expect("valid flags");
        let Command::Proxy(args) = cli.command;
        let config = args.into_config().expect("valid config");
        assert_eq!(config.seed, 5);
        assert_eq!(config.link.loss, Loss::Independent(0.1));
        assert_eq!(config.link.latency, LinkConfig::preset(Preset::Lte).latency);
    }
}
