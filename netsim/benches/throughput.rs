//! How much simulation netsim does per real second, to size later scale tests.
//!
//! `cargo bench -p anchorage-netsim` (add `-- --connections N` to change the connection
//! count, `-- --quick` for a short run). Reports:
//! 1. raw datagrams (socket level, no quinn) moved per real second, on an ideal link and on a
//!    lossy, jittery, reordering one;
//! 2. quinn connections held at once: handshake time, real seconds per simulated minute of
//!    heartbeats (one 100-byte datagram per connection every 15 s, keep-alive every 5 s), and
//!    resident memory.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anchorage_netsim::{LinkConfig, Loss, Network, Preset};
use bytes::Bytes;
use common::{SERVER_NAME, SERVER_PORT, client_config, keepalive_transport, server_config};

fn main() {
    let mut connections = vec![100, 1000, 5000];
    let mut raw_seconds = 10;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--connections" => {
                connections = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .map(|n| vec![n])
                    .unwrap_or(connections);
            }
            "--quick" => {
                connections = vec![50];
                raw_seconds = 2;
            }
            _ => {} // `cargo bench` passes `--bench`
        }
    }
    print_machine();

    println!("\n== raw datagrams (1200 B, no quinn), {raw_seconds} simulated s each ==");
    raw(
        "ideal link, 1 ms latency",
        LinkConfig {
            latency: Duration::from_millis(1),
            ..LinkConfig::default()
        },
        raw_seconds,
    );
    raw(
        "1 % loss, 20 ± 5 ms, 1 % reorder",
        LinkConfig {
            loss: Loss::Independent(0.01),
            latency: Duration::from_millis(20),
            jitter: Duration::from_millis(5),
            reorder: 0.01,
            ..LinkConfig::default()
        },
        raw_seconds,
    );

    println!("\n== quinn connections over the wifi preset, heartbeat every 15 s ==");
    for n in connections {
        held_connections(n);
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("tokio runtime")
}

/// One sender floods a receiver with 100 datagrams per simulated millisecond.
fn raw(label: &str, link: LinkConfig, seconds: u64) {
    runtime().block_on(async {
        let net = Network::new(1);
        let a = net.add_host("a");
        let b = net.add_host("b");
        net.set_link_both(a.id(), b.id(), link).expect("valid link");
        let tx = a.bind(1).expect("bind");
        let rx = b.bind(1).expect("bind");
        let dest = rx.addr();
        let payload = vec![0u8; 1200];
        let received = Arc::new(AtomicU64::new(0));
        let reader = {
            let received = received.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 2048];
                while rx.recv_from(&mut buf).await.is_ok() {
                    received.fetch_add(1, Ordering::Relaxed);
                }
            })
        };
        let real = std::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(1));
        for _ in 0..seconds * 1000 {
            tick.tick().await;
            for _ in 0..100 {
                tx.send_to(&payload, dest).expect("send");
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        let real = real.elapsed();
        let delivered = received.load(Ordering::Relaxed);
        reader.abort();
        println!(
            "{label}: {delivered} datagrams delivered in {real:.2?} real = {:.0} datagrams/real s \
             ({:.1}x real time)",
            delivered as f64 / real.as_secs_f64(),
            seconds as f64 / real.as_secs_f64()
        );
    });
}

/// `n` client hosts, each with one connection to a single server host.
fn held_connections(n: usize) {
    let rss_before = rss_kib();
    runtime().block_on(async {
        let net = Network::new(2);
        net.set_default_link(LinkConfig::preset(Preset::Wifi))
            .expect("valid link");
        let server_host = net.add_host("server");
        let server = server_host
            .endpoint(SERVER_PORT, Some(server_config(keepalive_transport())))
            .expect("server endpoint");
        let server_addr = std::net::SocketAddr::new(server_host.ip(), SERVER_PORT);
        let heartbeats = Arc::new(AtomicU64::new(0));
        let acceptor = {
            let heartbeats = heartbeats.clone();
            let server = server.clone();
            tokio::spawn(async move {
                while let Some(incoming) = server.accept().await {
                    let heartbeats = heartbeats.clone();
                    tokio::spawn(async move {
                        let Ok(conn) = incoming.await else { return };
                        while conn.read_datagram().await.is_ok() {
                            heartbeats.fetch_add(1, Ordering::Relaxed);
                        }
                    });
                }
            })
        };

        let real = std::time::Instant::now();
        let mut clients = Vec::with_capacity(n);
        let mut connecting = Vec::with_capacity(n);
        for i in 0..n {
            let host = net.add_host(&format!("node{i}"));
            let mut endpoint = host.endpoint(0, None).expect("client endpoint");
            endpoint.set_default_client_config(client_config(keepalive_transport()));
            let conn = endpoint
                .connect(server_addr, SERVER_NAME)
                .expect("start connecting");
            connecting.push(tokio::spawn(conn));
            clients.push(endpoint);
        }
        let mut conns = Vec::with_capacity(n);
        for c in connecting {
            if let Ok(Ok(conn)) = c.await {
                conns.push(conn);
            }
        }
        let handshakes = real.elapsed();

        let real = std::time::Instant::now();
        let minutes = 1u32;
        let mut beats = Vec::with_capacity(conns.len());
        for conn in &conns {
            let conn = conn.clone();
            beats.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(15));
                for _ in 0..4 * minutes {
                    tick.tick().await;
                    let _ = conn.send_datagram(Bytes::from_static(&[0u8; 100]));
                }
            }));
        }
        for b in beats {
            let _ = b.await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        let per_minute = real.elapsed() / minutes;
        let alive = conns.iter().filter(|c| c.close_reason().is_none()).count();
        let rss = rss_kib();
        println!(
            "{n} connections: {} up, handshakes took {handshakes:.2?} real; \
             {per_minute:.2?} real per simulated minute; {} heartbeats; \
             RSS {} MiB (+{:.1} KiB per connection); network {}",
            alive,
            heartbeats.load(Ordering::Relaxed),
            rss / 1024,
            rss.saturating_sub(rss_before) as f64 / n as f64,
            net.counters()
        );
        acceptor.abort();
        drop(conns);
        drop(clients);
    });
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn print_machine() {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".to_owned());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    println!("machine: {cpu}, {cores} cores available (the bench uses one)");
}
