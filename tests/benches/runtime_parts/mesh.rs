//! `mesh`: the peer mesh on loopback, against its baselines in the same run.
//!
//! An in-process anchor on real UDP and four node agents, each on its own real UDP socket with
//! the mesh: a display and a camera that may go direct, and a second pair with direct paths
//! turned off (`[mesh] direct = false`), so every packet goes through the anchor's relay.
//! Measured: the first call to a new peer and the time until its path is direct; peer call
//! round trips direct and relayed; the operator's invocation of the same node through the
//! anchor; a UDP echo; one TCP stream through a tunnel on the direct path against plain TCP.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anchorage_console::Backend;
use anchorage_console::api::{InvocationState, InvokeRequest};
use anchorage_daemon::AnchorConfig;
use anchorage_daemon::policy::{Policy, PolicyVersion};
use anchorage_node::RunConfig;
use anchorage_node::config::NodeConfig;
use anchorage_node::peer::Peers;
use anchorage_sim::fleet::start_node;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{
    Agent, BenchNode, Options, Percentiles, Report, WARMUP, ms, splitmix, udp_echo, us, wait_until,
};

const POLICY: &str = r#"
[[allow]]
from = "role=display"
to = "role=camera"
capabilities = ["echo"]
services = ["sink"]
"#;

/// Bytes sent through the tunnel and through plain TCP.
const STREAM_BYTES: usize = 256 * 1024 * 1024;

struct Member {
    id: anchorage_console::api::DeviceId,
    agent: Agent,
}

impl Member {
    fn peers(&self) -> Arc<Peers> {
        self.agent.peers.get().expect("the mesh runs").clone()
    }
}

pub async fn mesh(opts: &Options, report: &mut Report) {
    println!("\n[mesh] load {}", super::common::loadavg());
    let work = tempfile::tempdir().unwrap();
    let running = anchorage_daemon::start(AnchorConfig::for_tests(work.path().join("anchor")))
        .await
        .unwrap();
    let backend = running.anchor.backend();
    let owner = backend
        .authenticate(&running.anchor.owner_token().unwrap())
        .await
        .unwrap();
    let mut members = Vec::new();
    for (i, (role, direct)) in [
        ("display", true),
        ("camera", true),
        ("display", false),
        ("camera", false),
    ]
    .into_iter()
    .enumerate()
    {
        let node = BenchNode::new(work.path(), i);
        let id = node
            .pair_in_process(&backend, &owner, running.quic_addr)
            .await;
        backend
            .label(&owner, id, vec![format!("role={role}").parse().unwrap()])
            .await
            .unwrap();
        let mut config = RunConfig::new(NodeConfig::default());
        config.node.name = Some(format!("{role}-{i}"));
        config.node.mesh.direct = direct;
        config.anchor_addr = Some(running.quic_addr);
        config.local_api = false;
        config.platform = "bench".into();
        config.status_every = None;
        config.seed = Some(splitmix(i as u64 ^ 0x3e54));
        let agent = start_node(config, node.state.clone());
        assert!(
            wait_until(Duration::from_secs(30), || agent
                .stats
                .connected
                .load(Ordering::Relaxed))
            .await,
            "node {i} registers"
        );
        members.push(Member { id, agent });
    }
    running.anchor.services().policy.replace(PolicyVersion {
        version: 1,
        text: POLICY.into(),
        policy: Policy::parse(POLICY).unwrap(),
        updated_ms: 0,
        updated_by: "bench".into(),
    });
    for (from, to) in [(0, 1), (2, 3)] {
        let (p, want) = (members[from].peers(), members[to].id);
        assert!(
            wait_until(Duration::from_secs(10), || p
                .list()
                .iter()
                .any(|e| e.device_id == want))
            .await,
            "the directory reaches node {from}"
        );
    }

    let input = br#"{"p":"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx"}"#.to_vec();
    let call = |from: &Member, to: &Member| {
        let (peers, id, input) = (from.peers(), to.id, input.clone());
        async move {
            let (_, r) = peers
                .call(id, "echo", input, Duration::from_secs(10))
                .await
                .unwrap();
            assert_eq!(
                r.outcome,
                anchorage_wire::invoke::Outcome::Succeeded,
                "{r:?}"
            );
        }
    };
    let path_of = |from: &Member, to: &Member| {
        from.peers()
            .list()
            .into_iter()
            .find(|p| p.device_id == to.id)
            .map_or("none", |p| p.path)
    };

    // The first call to a new peer, and how long until its path is direct.
    let started = Instant::now();
    call(&members[0], &members[1]).await;
    let first_direct_pair = started.elapsed();
    let path_at_first = path_of(&members[0], &members[1]);
    assert!(
        wait_until(Duration::from_secs(10), || path_of(
            &members[0],
            &members[1]
        ) == "direct")
        .await,
        "the LAN pair goes direct"
    );
    let until_direct = started.elapsed();
    let started = Instant::now();
    call(&members[2], &members[3]).await;
    let first_relayed_pair = started.elapsed();
    assert_eq!(path_of(&members[2], &members[3]), "relayed");

    let calls = opts.calls;
    let many = |from: usize, to: usize| {
        let (peers, id, input) = (members[from].peers(), members[to].id, input.clone());
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(calls);
            for i in 0..WARMUP + calls {
                let t = Instant::now();
                let (_, r) = peers
                    .call(id, "echo", input.clone(), Duration::from_secs(10))
                    .await
                    .unwrap();
                assert_eq!(r.outcome, anchorage_wire::invoke::Outcome::Succeeded);
                if i >= WARMUP {
                    out.push(t.elapsed());
                }
            }
            out
        })
    };
    let direct = Percentiles::of(many(0, 1).await.unwrap());
    let relayed = Percentiles::of(many(2, 3).await.unwrap());
    let invoke = {
        let (backend, owner, device) = (backend.clone(), owner.clone(), members[1].id);
        tokio::spawn(async move {
            let mut out = Vec::with_capacity(calls);
            for i in 0..WARMUP + calls {
                let req = InvokeRequest {
                    capability: "echo".into(),
                    input: serde_json::json!({ "p": "x".repeat(56) }),
                    timeout_ms: Some(10_000),
                    async_: false,
                };
                let t = Instant::now();
                let inv = backend.invoke(&owner, device, req).await.unwrap();
                assert_eq!(inv.state, InvocationState::Succeeded);
                if i >= WARMUP {
                    out.push(t.elapsed());
                }
            }
            out
        })
        .await
        .unwrap()
    };
    let invoke = Percentiles::of(invoke);
    let udp = Percentiles::of(tokio::spawn(udp_echo(calls)).await.unwrap());

    // One TCP stream: through a tunnel on the direct path, then plain, to the same sink.
    let sink = sink().await;
    let _exposed = members[1].peers().expose("sink", sink).unwrap();
    let (listening, _tunnel) = anchorage_node::peer::tunnel::connect_listener(
        members[0].peers(),
        members[1].id,
        "sink".into(),
        "127.0.0.1:0".parse().unwrap(),
    )
    .await
    .unwrap();
    let tunnelled = push(listening).await;
    let plain = push(sink).await;

    running.shutdown().await;
    for m in members {
        let _ = m.agent.stop.send(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), m.agent.task).await;
    }

    let n = opts.calls;
    report.row(
        "mesh",
        "first call to a new peer, LAN pair (relayed first)",
        format!(
            "{:.1} ms (path then: {path_at_first})",
            ms(first_direct_pair)
        ),
    );
    report.row(
        "mesh",
        "time from the first call until the path is direct",
        format!("{:.1} ms", ms(until_direct)),
    );
    report.row(
        "mesh",
        "first call to a new peer, relay only",
        format!("{:.1} ms", ms(first_relayed_pair)),
    );
    report.row(
        "mesh",
        format!("peer call echo, direct, {n} calls"),
        direct.show(),
    );
    report.row(
        "mesh",
        format!("peer call echo, relayed, {n} calls"),
        relayed.show(),
    );
    report.row(
        "mesh",
        format!("operator invoke echo through the anchor, {n} calls"),
        invoke.show(),
    );
    report.row(
        "mesh",
        format!("UDP echo, 64 B, {n} round trips"),
        udp.show(),
    );
    let ratio = |a: &Percentiles, b: &Percentiles| a.p50.as_secs_f64() / b.p50.as_secs_f64();
    report.row(
        "mesh",
        "p50 ratio peer call direct / relayed / invoke / UDP",
        format!(
            "1 : {:.2} : {:.2} : {:.2} ({} direct)",
            ratio(&relayed, &direct),
            ratio(&invoke, &direct),
            ratio(&udp, &direct),
            us(direct.p50)
        ),
    );
    let mbps = |d: Duration| STREAM_BYTES as f64 / d.as_secs_f64() / (1024.0 * 1024.0);
    report.row(
        "mesh",
        format!(
            "one TCP stream, {} MiB, tunnelled over the direct path",
            STREAM_BYTES >> 20
        ),
        format!("{:.0} MiB/s", mbps(tunnelled)),
    );
    report.row(
        "mesh",
        format!(
            "one TCP stream, {} MiB, plain TCP on loopback",
            STREAM_BYTES >> 20
        ),
        format!("{:.0} MiB/s", mbps(plain)),
    );
    report.row(
        "mesh",
        "throughput ratio tunnel / plain TCP",
        format!("{:.3}", plain.as_secs_f64() / tunnelled.as_secs_f64()),
    );
}

/// A TCP server that reads each connection to its end and answers the byte count.
async fn sink() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
                let _ = s.shutdown().await;
            });
        }
    });
    addr
}

/// Sends [`STREAM_BYTES`] to `to`, half-closes, and waits for the sink's count.
async fn push(to: SocketAddr) -> Duration {
    let mut s = tokio::net::TcpStream::connect(to).await.unwrap();
    s.set_nodelay(true).unwrap();
    let chunk = vec![0x5au8; 256 * 1024];
    let started = Instant::now();
    let mut sent = 0;
    while sent < STREAM_BYTES {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    let took = started.elapsed();
    assert_eq!(
        u64::from_be_bytes(count),
        STREAM_BYTES as u64,
        "every byte arrived"
    );
    took
}
