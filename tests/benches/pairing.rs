//! Pairing benchmark over real loopback UDP (not netsim), with the anchor in-process.
//!
//! ```text
//! cargo bench -p anchorage-tests --bench pairing
//! cargo bench -p anchorage-tests --bench pairing -- --latency 200 --total 1000 --concurrency 32
//! cargo bench -p anchorage-tests --bench pairing -- --anchor-dir /dev/shm   # fsync ≈ free
//! ```
//!
//! (a) Latency: pairings one after another, each a fresh node (own key, state directory and
//! client endpoint). An approver task approves each request as soon as its `pairing.requested`
//! event arrives; the figure excludes that operator step: it is *node start → request recorded*
//! plus *approved → certificate in hand*. The approval call itself (CSR signing and the fsynced
//! trust write) is reported apart.
//!
//! (b) Throughput: `--total` pairings by `--concurrency` concurrent nodes, each with its own
//! endpoint, codes minted beforehand, approvals driven by events as in (a).
//!
//! The anchor's data directory is on the disk of the temporary directory (fsync is real); node
//! state directories are on `/dev/shm` when it exists, standing in for the nodes' own disks.
//! Everything shares the machine's cores, nodes included.

#![allow(clippy::unwrap_used)] // a benchmark: failing loudly is the point

use std::collections::{HashMap, HashSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;

use anchorage_console::Backend;
use anchorage_console::api::{MintCodeRequest, PairMethod, Principal, RequestState};
use anchorage_daemon::AnchorConfig;
use anchorage_daemon::backend::AnchorBackend;
use anchorage_node::pair::{PairOptions, PairProgress};
use anchorage_node::state::StateDir;
use tokio::sync::broadcast::error::RecvError;

/// Times the approver records per request.
#[derive(Debug, Clone, Copy)]
struct Approval {
    /// The `pairing.requested` event arrived.
    requested: Instant,
    /// `approve` was called.
    called: Instant,
    /// `approve` returned.
    approved: Instant,
}

type Approvals = Arc<Mutex<HashMap<String, Approval>>>;

/// One figure of a [`Sample`].
type Measure = fn(&Sample) -> Duration;

/// One pairing, as measured.
#[derive(Debug, Clone, Copy)]
struct Sample {
    mint: Duration,
    /// Node start → request recorded (the anchor published `pairing.requested`).
    to_request: Duration,
    /// The `approve` call itself (signing + fsync).
    approve_call: Duration,
    /// Approved → certificate in hand (files written).
    to_cert: Duration,
    /// Node start → done, including the approval.
    total: Duration,
}

struct Options {
    latency: usize,
    total: usize,
    concurrency: usize,
    /// Where the anchor's data directory goes (default: the temporary directory).
    anchor_dir: Option<PathBuf>,
}

fn options() -> Options {
    let mut o = Options {
        latency: 200,
        total: 1000,
        concurrency: 32,
        anchor_dir: None,
    };
    let args: Vec<String> = std::env::args().collect();
    let value = |i: usize| -> usize {
        args.get(i + 1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", args[i]))
    };
    for (i, a) in args.iter().enumerate() {
        match a.as_str() {
            "--latency" => o.latency = value(i),
            "--total" => o.total = value(i),
            "--concurrency" => o.concurrency = value(i),
            "--anchor-dir" => o.anchor_dir = args.get(i + 1).map(PathBuf::from),
            "--quick" => {
                o.latency = 50;
                o.total = 200;
            }
            _ => {}
        }
    }
    o
}

fn main() {
    let opts = options();
    println!("pairing benchmark; {}", common::machine());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(bench(opts));
}

struct Bench {
    backend: Arc<AnchorBackend>,
    owner: Principal,
    addr: SocketAddr,
    approvals: Approvals,
    node_root: PathBuf,
}

async fn bench(opts: Options) {
    let anchor_dir = match &opts.anchor_dir {
        Some(dir) => tempfile::tempdir_in(dir).unwrap(),
        None => tempfile::tempdir().unwrap(),
    };
    let node_root = if std::path::Path::new("/dev/shm").is_dir() {
        tempfile::tempdir_in("/dev/shm").unwrap()
    } else {
        tempfile::tempdir().unwrap()
    };
    let running = anchorage_daemon::start(AnchorConfig::for_tests(anchor_dir.path()))
        .await
        .unwrap();
    let backend = running.anchor.backend();
    let owner = backend
        .authenticate(&running.anchor.owner_token().unwrap())
        .await
        .unwrap();
    let approvals: Approvals = Arc::default();
    let approver = tokio::spawn(approver(backend.clone(), owner.clone(), approvals.clone()));
    let b = Arc::new(Bench {
        backend,
        owner,
        addr: running.quic_addr,
        approvals,
        node_root: node_root.path().to_path_buf(),
    });
    println!(
        "anchor data dir: {} ; node state dirs: {}",
        anchor_dir.path().display(),
        node_root.path().display()
    );

    // Warm-up: first connections, first store writes.
    for i in 0..5 {
        pair_one(&b, &format!("warm-{i}")).await;
    }

    if opts.latency > 0 {
        latency(&b, opts.latency).await;
    }
    if opts.total > 0 {
        throughput(&b, opts.total, opts.concurrency).await;
    }

    approver.abort();
    running.shutdown().await;
}

/// (a) Latency: `n` pairings one at a time.
async fn latency(b: &Bench, n: usize) {
    let mut samples = Vec::with_capacity(n);
    let started = Instant::now();
    for i in 0..n {
        samples.push(pair_one(b, &format!("seq-{i}")).await);
    }
    let elapsed = started.elapsed();
    println!();
    println!(
        "(a) latency: {} sequential pairings in {:.2} s ({:.1}/s one at a time)",
        n,
        elapsed.as_secs_f64(),
        n as f64 / elapsed.as_secs_f64()
    );
    println!("    {:<52} {:>9} {:>9} {:>9}", "", "p50", "p99", "max");
    let rows: [(&str, Measure); 6] = [
        ("mint a code (backend, fsync)", |s| s.mint),
        ("node start → request recorded", |s| s.to_request),
        ("approve call (CSR signing + fsync), apart", |s| {
            s.approve_call
        }),
        ("approved → certificate in hand, node done", |s| s.to_cert),
        ("pairing without the operator (2nd + 4th rows)", |s| {
            s.to_request + s.to_cert
        }),
        ("node start → done, approval included", |s| s.total),
    ];
    for (name, f) in rows {
        let mut v: Vec<Duration> = samples.iter().map(f).collect();
        v.sort();
        println!(
            "    {name:<52} {:>9} {:>9} {:>9}",
            ms(common::percentile(&v, 0.50)),
            ms(common::percentile(&v, 0.99)),
            ms(v.last().copied().unwrap_or_default())
        );
    }
}

/// (b) Throughput: `total` pairings by `concurrency` nodes at once; codes minted beforehand.
async fn throughput(b: &Arc<Bench>, total: usize, concurrency: usize) {
    let mint_started = Instant::now();
    let mut codes = Vec::with_capacity(total);
    for _ in 0..total {
        codes.push(mint(b).await);
    }
    let mint_elapsed = mint_started.elapsed();
    let codes = Arc::new(Mutex::new(codes));
    let cpu_before = common::cpu_time("self");
    let started = Instant::now();
    let mut tasks = Vec::new();
    for t in 0..concurrency {
        let (b, codes) = (b.clone(), codes.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::new();
            let mut n = 0;
            loop {
                let Some(code) = codes.lock().unwrap().pop() else {
                    break;
                };
                let t0 = Instant::now();
                pair_with(&b, &format!("par-{t}-{n}"), &code).await;
                latencies.push(t0.elapsed());
                n += 1;
            }
            latencies
        }));
    }
    let mut latencies = Vec::new();
    for t in tasks {
        latencies.extend(t.await.unwrap());
    }
    let elapsed = started.elapsed();
    let cpu = common::cpu_time("self").saturating_sub(cpu_before);
    latencies.sort();
    println!();
    println!(
        "(b) throughput: {} pairings by {} concurrent nodes in {:.2} s = {:.1} pairings/s \
         (per pairing under load: p50 {} p99 {}, approval included)",
        total,
        concurrency,
        elapsed.as_secs_f64(),
        total as f64 / elapsed.as_secs_f64(),
        ms(common::percentile(&latencies, 0.50)),
        ms(common::percentile(&latencies, 0.99)),
    );
    println!(
        "    minting the {} codes beforehand, one at a time: {:.2} s ({:.1}/s)",
        total,
        mint_elapsed.as_secs_f64(),
        total as f64 / mint_elapsed.as_secs_f64()
    );
    if !cpu.is_zero() {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let per = cpu / u32::try_from(total).unwrap_or(u32::MAX);
        println!(
            "    CPU time of this process (anchor and nodes): {} per pairing; {} cores of this \
             machine alone would do about {:.0} pairings/s",
            ms(per),
            cores,
            cores as f64 / per.as_secs_f64()
        );
    }
}

/// Approves every request as soon as its `pairing.requested` event arrives.
async fn approver(backend: Arc<AnchorBackend>, owner: Principal, approvals: Approvals) {
    let mut events = backend.subscribe();
    let seen = Arc::new(Mutex::new(HashSet::<String>::new()));
    loop {
        let ids: Vec<String> = match events.recv().await {
            Ok(e) if e.kind == "pairing.requested" => e.data["request_id"]
                .as_str()
                .map(|s| vec![s.to_string()])
                .unwrap_or_default(),
            Ok(_) => continue,
            // Missed events: sweep what is pending.
            Err(RecvError::Lagged(_)) => backend
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap()
                .into_iter()
                .map(|r| r.request_id)
                .collect(),
            Err(RecvError::Closed) => return,
        };
        let requested = Instant::now();
        for id in ids {
            if !seen.lock().unwrap().insert(id.clone()) {
                continue;
            }
            let (backend, owner, approvals) = (backend.clone(), owner.clone(), approvals.clone());
            tokio::spawn(async move {
                let called = Instant::now();
                backend.approve(&owner, &id).await.unwrap();
                let approved = Instant::now();
                approvals.lock().unwrap().insert(
                    id,
                    Approval {
                        requested,
                        called,
                        approved,
                    },
                );
            });
        }
    }
}

async fn mint(b: &Bench) -> String {
    b.backend
        .mint_code(
            &b.owner,
            MintCodeRequest {
                method: PairMethod::Pin,
                ttl_secs: None,
                labels: Default::default(),
            },
        )
        .await
        .unwrap()
        .code
}

async fn pair_one(b: &Bench, name: &str) -> Sample {
    let t0 = Instant::now();
    let code = mint(b).await;
    let mint = t0.elapsed();
    let mut s = pair_with(b, name, &code).await;
    s.mint = mint;
    s
}

/// Pairs a fresh node with `code`; the approver approves it.
async fn pair_with(b: &Bench, name: &str, code: &str) -> Sample {
    let endpoint = anchorage_node::client_endpoint(b.addr).unwrap();
    let state = StateDir::new(b.node_root.join(name));
    let opts = PairOptions {
        anchor: b.addr.to_string(),
        anchor_addr: b.addr,
        code: anchorage_node::pair::parse_code(Some(code), None).unwrap(),
        device_name: name.to_string(),
        platform: "bench".into(),
    };
    let mut request_id = None;
    let start = Instant::now();
    anchorage_node::pair::pair(&endpoint, &state, &opts, |p| {
        if let PairProgress::Pending { request_id: id, .. } = p {
            request_id = Some(id);
        }
    })
    .await
    .unwrap();
    let done = Instant::now();
    let id = request_id.unwrap();
    // The approver records its times right after `approve` returns; the node may be faster.
    let waited = Instant::now();
    let a = loop {
        if let Some(a) = b.approvals.lock().unwrap().get(&id).copied() {
            break a;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "no approval recorded for {id}"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    };
    drop(endpoint);
    let _ = std::fs::remove_dir_all(state.path());
    Sample {
        mint: Duration::ZERO,
        to_request: a.requested.saturating_duration_since(start),
        approve_call: a.approved.saturating_duration_since(a.called),
        to_cert: done.saturating_duration_since(a.approved),
        total: done - start,
    }
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1000.0)
}
