//! A node among several anchor addresses, against a real anchor (fjall, in-process) on real
//! UDP sockets on loopback: it pairs and registers through the one that answers, learns the
//! cluster's anchors from it, and leaves an anchor that falls silent for the next.
//!
//! Each test starts its own anchor on port 0 in a temporary directory. A "dead" address is a
//! UDP port that was bound and released, so nothing answers there; a "silent" anchor is the
//! live one behind a relay in the test that stops forwarding.

#![allow(clippy::unwrap_used)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_console::api::{MintCodeRequest, PairMethod, Principal, RequestState};
use anchorage_daemon::backend::AnchorBackend;
use anchorage_daemon::config::AnchorConfig;
use anchorage_node::agent::AgentStats;
use anchorage_node::anchors::AnchorAddr;
use anchorage_node::pair::{PairAnyOptions, Paired};
use anchorage_node::state::StateDir;
use anchorage_node::{RunConfig, RunError};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::task::JoinHandle;

/// Longest wait for anything here; a hang guard, not a speed requirement.
const PATIENCE: Duration = Duration::from_secs(40);

struct Anchor {
    running: anchorage_daemon::Running,
    backend: Arc<AnchorBackend>,
    owner: Principal,
    _dir: tempfile::TempDir,
}

impl Anchor {
    async fn start() -> Anchor {
        let dir = tempfile::tempdir().unwrap();
        let running = anchorage_daemon::start(AnchorConfig::for_tests(dir.path()))
            .await
            .unwrap();
        let backend = running.anchor.backend();
        let owner = backend
            .authenticate(&running.anchor.owner_token().unwrap())
            .await
            .unwrap();
        Anchor {
            running,
            backend,
            owner,
            _dir: dir,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.running.quic_addr
    }

    /// Pairs a node through `anchors` (in order) with a fresh PIN, approving it as the owner.
    async fn pair(&self, state: &StateDir, anchors: &[SocketAddr]) -> Paired {
        let minted = self
            .backend
            .mint_code(
                &self.owner,
                MintCodeRequest {
                    method: PairMethod::Pin,
                    ttl_secs: None,
                    labels: Default::default(),
                },
            )
            .await
            .unwrap();
        let opts = PairAnyOptions {
            anchors: anchors.iter().map(|a| AnchorAddr::from(*a)).collect(),
            code: anchorage_node::pair::parse_code(Some(&minted.code), None).unwrap(),
            device_name: "roamer".into(),
            platform: "test".into(),
        };
        let endpoint = quinn::Endpoint::client(([127, 0, 0, 1], 0).into()).unwrap();
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                anchorage_node::pair::pair_any(&endpoint, &state, &opts, |_| {}).await
            })
        };
        let request = eventually(|| async {
            self.backend
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.device_name == "roamer")
        })
        .await
        .expect("the pairing request reaches the operator");
        self.backend
            .approve(&self.owner, &request.request_id)
            .await
            .unwrap();
        task.await.unwrap().expect("the node pairs")
    }
}

/// A loopback UDP address nothing answers on.
fn dead_addr() -> SocketAddr {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    socket.local_addr().unwrap()
}

/// Forwards one client's datagrams to `to` and back until paused.
struct Relay {
    addr: SocketAddr,
    paused: Arc<AtomicBool>,
    task: JoinHandle<()>,
}

impl Relay {
    async fn start(to: SocketAddr) -> Relay {
        let front = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        back.connect(to).await.unwrap();
        let addr = front.local_addr().unwrap();
        let paused = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn({
            let paused = paused.clone();
            async move {
                let (mut up, mut down) = (vec![0u8; 65_536], vec![0u8; 65_536]);
                let mut client = None;
                loop {
                    tokio::select! {
                        r = front.recv_from(&mut up) => {
                            let Ok((n, from)) = r else { return };
                            client = Some(from);
                            if !paused.load(Ordering::Relaxed) {
                                let _ = back.send(&up[..n]).await;
                            }
                        }
                        r = back.recv(&mut down) => {
                            let Ok(n) = r else { return };
                            if let Some(c) = client && !paused.load(Ordering::Relaxed) {
                                let _ = front.send_to(&down[..n], c).await;
                            }
                        }
                    }
                }
            }
        });
        Relay { addr, paused, task }
    }

    fn silence(&self) {
        self.paused.store(true, Ordering::Relaxed);
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A node agent running in a task until `stop`.
struct Node {
    task: JoinHandle<Result<(), RunError>>,
    stats: Arc<AgentStats>,
    stop: watch::Sender<bool>,
}

impl Node {
    /// Runs the paired node in `state`, dialing `anchors` in order.
    fn run(state: &StateDir, anchors: &[SocketAddr]) -> Node {
        let mut config = RunConfig::new(Default::default());
        config.anchor_addrs = anchors.to_vec();
        config.status_every = Some(Duration::from_millis(200));
        config.seed = Some(7);
        let stats = config.stats.clone();
        let (stop, mut stop_rx) = watch::channel(false);
        let task = tokio::spawn(anchorage_node::run(config, state.clone(), async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        }));
        Node { task, stats, stop }
    }

    /// Waits until it has registered `n` times in all and is registered with `anchor` now.
    async fn registered_with(&self, n: u64, anchor: SocketAddr) {
        let want = anchor.to_string();
        eventually(|| async {
            (self.stats.registrations.load(Ordering::Relaxed) >= n
                && self.stats.connected.load(Ordering::Relaxed)
                && self.stats.anchor_in_use().as_deref() == Some(want.as_str()))
            .then_some(())
        })
        .await
        .unwrap_or_else(|| {
            panic!(
                "not registered with {want}: in use {:?}, {} registrations, last error {:?}",
                self.stats.anchor_in_use(),
                self.stats.registrations.load(Ordering::Relaxed),
                self.stats.snapshot().last_error,
            )
        });
    }

    async fn stop(self) {
        let _ = self.stop.send(true);
        self.task.await.unwrap().unwrap();
    }
}

async fn eventually<T, F, Fut>(mut f: F) -> Option<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(v) = f().await {
            return Some(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn strings(list: &[AnchorAddr]) -> Vec<String> {
    list.iter().map(ToString::to_string).collect()
}

/// `anchor-node status --json` as a user runs it.
fn status(state: &StateDir) -> serde_json::Value {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_anchor-node"))
        .args(["status", "--json", "--state-dir"])
        .arg(state.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_given_a_dead_anchor_first_registers_with_the_live_one_and_keeps_its_list() {
    let anchor = Anchor::start().await;
    let (live, dead) = (anchor.addr(), dead_addr());
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    anchor.pair(&state, &[live, dead]).await;
    assert_eq!(
        strings(&state.anchors().unwrap().unwrap()),
        [live.to_string(), dead.to_string()],
        "pairing saves the anchors it was given"
    );

    let node = Node::run(&state, &[dead, live]);
    node.registered_with(1, live).await;
    // The anchor lists its cluster (on fjall: itself), and the node keeps that list.
    let saved = eventually(|| async {
        state
            .anchors()
            .unwrap()
            .filter(|list| strings(list) == [live.to_string()])
    })
    .await;
    assert!(saved.is_some(), "anchors.json: {:?}", state.anchors());

    // status.json is written every 2 s: wait for one written after the anchor's list came,
    // which puts the anchor in use first and keeps the given (seed) addresses after it.
    let expected = serde_json::json!([live.to_string(), dead.to_string()]);
    let shown = eventually(|| async {
        let s = status(&state);
        (s["anchor_in_use"] == live.to_string() && s["anchors"] == expected).then_some(s)
    })
    .await
    .expect("status shows the anchor in use and the anchors");
    assert_eq!(shown["connected"], true);
    assert_eq!(
        shown["anchor"],
        live.to_string(),
        "the anchor it paired with"
    );
    assert_eq!(
        node.stats.registrations.load(Ordering::Relaxed),
        1,
        "the dead address cost one skipped attempt, not a registration"
    );
    node.stop().await;
    anchor.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pairing_skips_an_anchor_that_does_not_answer() {
    let anchor = Anchor::start().await;
    let (live, dead) = (anchor.addr(), dead_addr());
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    let paired = anchor.pair(&state, &[dead, live]).await;
    assert_eq!(paired.anchor, live.to_string());
    assert_eq!(state.anchor().unwrap(), Some(live.to_string()));
    assert_eq!(
        strings(&state.anchors().unwrap().unwrap()),
        [dead.to_string(), live.to_string()]
    );
    // `run` without addresses dials what pairing saved, and gets through.
    let node = Node::run(&state, &[]);
    node.registered_with(1, live).await;
    node.stop().await;
    anchor.running.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anchor_that_falls_silent_is_left_for_the_next() {
    let anchor = Anchor::start().await;
    let live = anchor.addr();
    let relay = Relay::start(live).await;
    let dir = tempfile::tempdir().unwrap();
    let state = StateDir::new(dir.path().join("state"));
    anchor.pair(&state, &[live]).await;

    let node = Node::run(&state, &[relay.addr, live]);
    node.registered_with(1, relay.addr).await;
    // The path through the relay goes dead without anything closing.
    relay.silence();
    node.registered_with(2, live).await;
    let last_error = node.stats.snapshot().last_error.unwrap_or_default();
    assert!(last_error.contains("fell silent"), "{last_error}");
    node.stop().await;
    anchor.running.shutdown().await;
}
