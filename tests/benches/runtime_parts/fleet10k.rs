//! `big`: ten thousand node sessions on one anchor (issue 16), on this machine.
//!
//! ```sh
//! cargo bench -p anchorage-tests --bench runtime -- big --nodes 10000
//! ```
//!
//! `anchord` runs as its own process on real UDP with its defaults (a heartbeat every 15 s);
//! the nodes are real node agents in this process, each with its own identity and its own
//! QUIC connection, but many connections share one UDP socket: `--endpoints N` quinn
//! endpoints (default 32), node `i` on endpoint `i mod N`. Each node pairs through the real
//! flow first (a PIN minted through the console API, SPAKE2 on the bootstrap ALPN, approval
//! through the API, 32 at once). Then, in order:
//!
//! - every node connects at once: time until all registered, anchor memory per connected node
//!   (`VmRSS` with all connected minus `VmRSS` with all paired and none connected);
//! - a heartbeat window (`--window SECS`, default 60): anchord's CPU as a share of one core,
//!   heartbeats sent by the nodes against those the anchor counts received or lost in its
//!   `/metrics`, and the kernel's receive-buffer drops (`/proc/net/udp`) on every socket;
//! - the console inventory, the call the web page and `anchorctl` make: whole, and a page of
//!   100 (`?limit=100`, also sorted problems first and deep into the fleet), p50 / p99;
//! - a clean anchor restart on the same data directory and port, timed until every node has
//!   registered again.
//!
//! File descriptors: about `--endpoints` sockets here, one in anchord; no `ulimit -n` change is
//! needed unless `--endpoints` is raised towards one socket per node (then raise it above the
//! node count). Memory: about 100 KiB per node in this process. Pairing 10,000 nodes takes
//! about a minute, the whole run several.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anchorage_console::ControlPlaneClient;

use super::{
    Agent, Anchord, BenchNode, Options, Percentiles, Perf, Report, Restarted, common,
    count_connected, ms, pair_all, procs, report_return, restart_timed, stop_fleet, total,
    udp_drops, wait_until,
};

/// UDP receive buffer asked for each shared node socket (the kernel caps it at `rmem_max`):
/// hundreds of connections answer a restarted anchor at once.
const NODE_SOCKET_RCVBUF: usize = 4 * 1024 * 1024;
/// How long every node may take to connect at first.
const CONNECT_LIMIT: Duration = Duration::from_secs(300);
/// Calls of each kind of inventory request.
const INVENTORY_CALLS: usize = 30;
/// Devices on one page of the inventory, as the web page asks.
const INVENTORY_PAGE: usize = 100;

/// The scenario (see the module docs).
pub async fn big(opts: &Options, report: &mut Report) {
    let n = opts.nodes;
    let sockets = opts.endpoints.clamp(1, n.max(1));
    println!(
        "\n[big] {n} nodes on {sockets} sockets; load {}",
        common::loadavg()
    );
    let work = tempfile::tempdir().unwrap();
    let data = work.path().join("anchor");
    tokio::task::spawn_blocking(procs::bins).await.unwrap();
    // The anchor's defaults: a heartbeat every 15 s.
    let anchord = {
        let data = data.clone();
        tokio::task::spawn_blocking(move || {
            Anchord::spawn_with(&data, "127.0.0.1:0".parse().unwrap(), &[])
        })
        .await
        .unwrap()
    };
    let token = std::fs::read_to_string(data.join("owner.token")).unwrap();
    let token = token.trim().to_string();
    let client = ControlPlaneClient::new(&anchord.console, &token).unwrap();
    println!(
        "  anchord pid {} quic {} console {}",
        anchord.pid(),
        anchord.quic,
        anchord.console
    );

    let endpoints: Vec<quinn::Endpoint> = (0..sockets).map(|_| shared_endpoint()).collect();
    let node_ports: HashSet<u16> = endpoints
        .iter()
        .map(|e| e.local_addr().unwrap().port())
        .collect();
    let nodes: Vec<Arc<BenchNode>> = (0..n)
        .map(|i| {
            Arc::new(BenchNode::on(
                work.path(),
                i,
                endpoints[i % sockets].clone(),
            ))
        })
        .collect();
    let took = pair_all(&nodes, &client, anchord.quic).await;
    report.row(
        "big",
        format!("paired {n} nodes through the console API (32 at once)"),
        format!(
            "{:.1} s, {:.0} pairings/s",
            took.as_secs_f64(),
            n as f64 / took.as_secs_f64()
        ),
    );

    // Baseline memory: every device paired, no connection.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rss_before = anchord.rss_kib();
    let drops = Drops::now(&anchord, &node_ports);
    let started = Instant::now();
    let agents: Vec<Agent> = nodes
        .iter()
        .enumerate()
        .map(|(i, node)| node.start_agent(anchord.quic, i as u64))
        .collect();
    let all = wait_until(CONNECT_LIMIT, || count_connected(&agents) == n).await;
    let connect_took = started.elapsed();
    let connected = count_connected(&agents);
    report.row(
        "big",
        format!("{n} nodes connecting at once: all registered after"),
        if all {
            format!("{:.1} s", connect_took.as_secs_f64())
        } else {
            format!("only {connected}/{n} after {} s", CONNECT_LIMIT.as_secs())
        },
    );
    report.row(
        "big",
        "  UDP drops while connecting: anchor socket / node sockets",
        drops.since(&anchord, &node_ports),
    );
    // A whole heartbeat interval, so every node has sent one and the anchor's tables are
    // as they stay.
    tokio::time::sleep(Duration::from_secs(20)).await;
    let rss_after = anchord.rss_kib();
    let connected = count_connected(&agents);
    let per_node = rss_after.saturating_sub(rss_before) as f64 / connected.max(1) as f64;
    report.row(
        "big",
        "anchord VmRSS paired-idle -> all connected",
        format!(
            "{:.1} MiB -> {:.1} MiB ({connected} connected; VmHWM {:.1} MiB)",
            rss_before as f64 / 1024.0,
            rss_after as f64 / 1024.0,
            anchord.status_kib("VmHWM:") as f64 / 1024.0
        ),
    );
    report.row(
        "big",
        format!("anchor memory per connected node ({n} nodes)"),
        format!("{per_node:.1} KiB"),
    );
    report.verdict(
        per_node <= 40.0 && connected == n,
        &format!("anchor memory per connected node <= 40 KiB ({n} nodes)"),
        format!("{per_node:.1} KiB with {connected}/{n} connected"),
    );

    heartbeats(opts, &anchord, &client, &agents, &node_ports, report).await;
    inventory(&anchord, &token, n, opts.perf.as_deref(), report).await;

    let drops = Drops::now(&anchord, &node_ports);
    let (
        anchord,
        Restarted {
            exited,
            ready,
            back,
        },
    ) = restart_timed(anchord, &data, &agents, &[], opts.perf.as_deref()).await;
    report.row(
        "big",
        "restart: SIGTERM -> old exited / new anchord ready",
        format!(
            "{:.2} s / {:.2} s",
            exited.as_secs_f64(),
            ready.as_secs_f64()
        ),
    );
    let (done, last) = report_return(report, "big", ready, &back);
    report.row(
        "big",
        "  UDP drops over the restart: anchor socket / node sockets",
        drops.since(&anchord, &node_ports),
    );
    report.verdict(
        done == n && last <= Duration::from_secs(10),
        &format!("all {n} nodes registered again <= 10 s after the anchor restart"),
        format!(
            "{:.2} s after the new anchor was ready ({:.2} s after SIGTERM), {}/{n}",
            last.as_secs_f64(),
            (ready + last).as_secs_f64(),
            done
        ),
    );

    stop_fleet(agents, anchord).await;
    for e in endpoints {
        e.close(0u32.into(), b"done");
    }
}

/// A client endpoint on a UDP socket with a large receive buffer, for many node connections.
fn shared_endpoint() -> quinn::Endpoint {
    let socket = socket2::Socket::new(
        socket2::Domain::IPV4,
        socket2::Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )
    .expect("a UDP socket");
    let _ = socket.set_recv_buffer_size(NODE_SOCKET_RCVBUF);
    socket
        .bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        None,
        socket.into(),
        Arc::new(quinn::TokioRuntime),
    )
    .unwrap()
}

/// Kernel receive-buffer drops on the anchor's socket and the node sockets, at one moment.
struct Drops {
    anchor: u64,
    nodes: u64,
}

impl Drops {
    fn now(anchord: &Anchord, node_ports: &HashSet<u16>) -> Drops {
        Drops {
            anchor: udp_drops(|p| p == anchord.quic.port()),
            nodes: udp_drops(|p| node_ports.contains(&p)),
        }
    }

    /// The drops since `self`, as a row's value. (A new anchord has a new socket on the same
    /// port: its count starts at zero, and the old one's is gone.)
    fn since(&self, anchord: &Anchord, node_ports: &HashSet<u16>) -> String {
        let now = Drops::now(anchord, node_ports);
        let anchor = if now.anchor >= self.anchor {
            now.anchor - self.anchor
        } else {
            now.anchor
        };
        format!("{anchor} / {}", now.nodes.saturating_sub(self.nodes))
    }
}

/// A heartbeat window at the default interval: anchord's CPU, and every heartbeat the nodes
/// sent found in the anchor's counters (received, or counted lost from sequence gaps).
async fn heartbeats(
    opts: &Options,
    anchord: &Anchord,
    client: &ControlPlaneClient,
    agents: &[Agent],
    node_ports: &HashSet<u16>,
    report: &mut Report,
) {
    let n = agents.len();
    let sent = |agents: &[Agent]| total(agents, |s| &s.heartbeats_sent);
    let regs = |agents: &[Agent]| total(agents, |s| &s.registrations);
    // Node-side sums around each scrape, so both count the same interval.
    let scrape = || async {
        let before = sent(agents);
        let m = client.metrics().await.ok();
        let after = sent(agents);
        (m, (before + after) / 2)
    };
    let counter = |m: &Option<String>, name: &str| -> Option<f64> {
        anchorage_sim::prom::parse(m.as_deref()?)
            .ok()?
            .value(name, &[])
    };
    let drops = Drops::now(anchord, node_ports);
    let regs0 = regs(agents);
    let (m0, sent0) = scrape().await;
    let (cpu0, self0, t0) = (anchord.cpu_time(), common::cpu_time("self"), Instant::now());
    let switches0 = anchord.context_switches();
    let profile = opts
        .perf
        .as_ref()
        .map(|dir| Perf::record(anchord.pid(), &dir.join("anchord-big-heartbeats.data")));
    tokio::time::sleep(opts.window).await;
    let (cpu1, self1, elapsed) = (anchord.cpu_time(), common::cpu_time("self"), t0.elapsed());
    if let Some(p) = profile {
        p.stop();
    }
    let switches1 = anchord.context_switches();
    let (m1, sent1) = scrape().await;
    let secs = elapsed.as_secs_f64();
    let anchor_cpu = (cpu1 - cpu0).as_secs_f64() / secs * 100.0;
    let sent = sent1 - sent0;
    let delta = |name: &str| {
        counter(&m1, name)
            .zip(counter(&m0, name))
            .map(|(b, a)| b - a)
    };
    let received = delta("anchorage_heartbeats_received_total");
    let lost = delta("anchorage_heartbeats_lost_total");
    report.row(
        "big",
        format!("heartbeat window, {n} nodes, default 15 s interval"),
        format!(
            "{secs:.0} s, {sent} heartbeats ({:.0}/s), load {}",
            sent as f64 / secs,
            common::loadavg()
        ),
    );
    report.row(
        "big",
        "anchord CPU over the window (utime+stime)",
        format!(
            "{anchor_cpu:.1} % of one core ({:.0} µs per heartbeat, {:.1} context switches)",
            (cpu1 - cpu0).as_secs_f64() * 1e6 / sent.max(1) as f64,
            switches1.saturating_sub(switches0) as f64 / sent.max(1) as f64
        ),
    );
    report.row(
        "big",
        "node agents' CPU (this process, for context)",
        format!(
            "{:.1} % of one core",
            (self1 - self0).as_secs_f64() / secs * 100.0
        ),
    );
    let accounted = match (received, lost) {
        (Some(r), Some(l)) => {
            report.row(
                "big",
                "heartbeats received + counted lost by the anchor / sent",
                format!(
                    "{r:.0} + {l:.0} / {sent} = {:.3} %",
                    (r + l) / sent.max(1) as f64 * 100.0
                ),
            );
            Some((r + l) / sent.max(1) as f64)
        }
        _ => {
            report.row(
                "big",
                "heartbeats received + counted lost by the anchor / sent",
                "absent from /metrics",
            );
            None
        }
    };
    report.row(
        "big",
        "  UDP drops in the window: anchor socket / node sockets",
        drops.since(anchord, node_ports),
    );
    report.row(
        "big",
        "  reconnections during the window",
        format!("{}", regs(agents) - regs0),
    );
    report.verdict(
        anchor_cpu <= 5.0,
        &format!("anchor CPU at {n} nodes, 15 s heartbeats <= 5 % of one core"),
        format!("{anchor_cpu:.1} %"),
    );
    // In flight at either scrape moves a few across the edge: within 0.1 % is all of them.
    report.verdict(
        accounted.is_some_and(|a| (a - 1.0).abs() <= 0.001),
        "100 % of heartbeats accounted for (received or counted lost)",
        accounted.map_or("no counters".into(), |a| format!("{:.3} %", a * 100.0)),
    );
}

/// The console inventory, whole and by the page, over HTTP as the web page and `anchorctl`
/// ask for it. With `perf`, the page calls are made once more under `perf record`, after the
/// timed ones.
async fn inventory(
    anchord: &Anchord,
    token: &str,
    n: usize,
    perf: Option<&Path>,
    report: &mut Report,
) {
    let http = reqwest::Client::new();
    let url = format!("{}/console/v1/inventory", anchord.console);
    let whole = inventory_calls(&http, &url, token, "", &format!("all {n} devices"), report).await;
    let page = inventory_calls(
        &http,
        &url,
        token,
        &format!("?limit={INVENTORY_PAGE}"),
        &format!("a page of {INVENTORY_PAGE}"),
        report,
    )
    .await;
    let middle = n / 2 / INVENTORY_PAGE * INVENTORY_PAGE;
    inventory_calls(
        &http,
        &url,
        token,
        &format!("?limit={INVENTORY_PAGE}&offset={middle}&sort=problems"),
        &format!("a page at offset {middle}, problems first"),
        report,
    )
    .await;
    if let Some(dir) = perf {
        let profile = Perf::record(anchord.pid(), &dir.join("anchord-big-inventory.data"));
        let query = format!("?limit={INVENTORY_PAGE}");
        let label = format!("a page of {INVENTORY_PAGE}, under perf record");
        inventory_calls(&http, &url, token, &query, &label, report).await;
        profile.stop();
    }
    report.verdict(
        page.p99 < Duration::from_millis(100),
        &format!("console inventory of {n} devices, a page of {INVENTORY_PAGE}, < 100 ms (p99)"),
        format!(
            "p50 {:.1} ms, p99 {:.1} ms (whole: p50 {:.1} ms, p99 {:.1} ms)",
            ms(page.p50),
            ms(page.p99),
            ms(whole.p50),
            ms(whole.p99)
        ),
    );
}

/// [`INVENTORY_CALLS`] calls of `url` + `query`, one after another, each timed to its last
/// byte; reported as one row.
async fn inventory_calls(
    http: &reqwest::Client,
    url: &str,
    token: &str,
    query: &str,
    label: &str,
    report: &mut Report,
) -> Percentiles {
    let mut times = Vec::with_capacity(INVENTORY_CALLS);
    let mut bytes = 0;
    for _ in 0..INVENTORY_CALLS {
        let t = Instant::now();
        let res = http
            .get(format!("{url}{query}"))
            .bearer_auth(token)
            .send()
            .await
            .unwrap();
        assert!(res.status().is_success(), "{url}{query}: {}", res.status());
        bytes = res.bytes().await.unwrap().len();
        times.push(t.elapsed());
    }
    let p = Percentiles::of(times);
    report.row(
        "big",
        format!("console inventory, {label} (p50 / p99 of {INVENTORY_CALLS})"),
        format!(
            "{:.1} ms / {:.1} ms, {:.0} KiB",
            ms(p.p50),
            ms(p.p99),
            bytes as f64 / 1024.0
        ),
    );
    p
}
