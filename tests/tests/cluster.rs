//! Several anchors on one etcd cluster (feature `etcd`), with the real binaries: one CA and one
//! owner token for the cluster, tokens and pairing codes that work on every anchor, a pairing
//! that starts on one anchor and is approved on another, and a wrong cluster key refused.
//! Then sessions across anchors: every anchor shows, dispatches to and revokes the nodes the
//! others hold.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use anchorage_console::ControlPlaneClient;
use anchorage_console::api::{CreateTokenRequest, MintCodeRequest, Permission, RequestState};
use anchorage_sim::etcd::EtcdCluster;
use anchorage_sim::procs::{self, Proc, bins, command};

/// Starts `anchord --store etcd` on `cluster` under `prefix` with `key_file`.
fn anchord(cluster: &EtcdCluster, data: &Path, key_file: &Path, prefix: &str) -> procs::Anchord {
    let endpoints = cluster.endpoints().join(",");
    procs::Anchord::start(
        data,
        "127.0.0.1:0",
        "127.0.0.1:0",
        &[
            "--store",
            "etcd",
            "--etcd-endpoints",
            &endpoints,
            "--etcd-prefix",
            prefix,
            "--cluster-key-file",
            key_file.to_str().unwrap(),
        ],
        data.parent().unwrap(),
    )
}

/// `anchorctl --url <anchor> --token-file <its owner token> ARGS`.
fn run_ctl(anchor: &procs::Anchord, cwd: &Path, args: &[&str]) -> procs::Output {
    procs::run(
        "anchorctl",
        command(&bins().anchorctl, cwd)
            .args(["--url", &anchor.ready.console, "--token-file"])
            .arg(&anchor.ready.owner_token)
            .args(args),
        Duration::from_secs(30),
    )
}

/// Polls `f` every 50 ms until it is true, for at most `limit`; whether it became true.
async fn within(limit: Duration, mut f: impl AsyncFnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        if f().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_anchors_share_the_ca_tokens_codes_and_pairings_of_one_mesh() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let key_file = dir.path().join("cluster.key");
    let (data_a, data_b) = (dir.path().join("a"), dir.path().join("b"));
    let a = anchord(&cluster, &data_a, &key_file, "/mesh");
    assert!(
        key_file.is_file(),
        "the first anchor created the cluster key"
    );
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&key_file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let b = anchord(&cluster, &data_b, &key_file, "/mesh");

    // One CA for the cluster, and its key is not in etcd in the clear.
    let ca_a = std::fs::read_to_string(data_a.join("ca.pem")).unwrap();
    let ca_b = std::fs::read_to_string(data_b.join("ca.pem")).unwrap();
    assert_eq!(ca_a, ca_b, "both anchors use the cluster's CA");
    assert!(!data_b.join("ca.key").exists(), "no CA key file on disk");

    // One owner token, created by the first anchor, works on both.
    let owner = a.owner_token();
    assert!(!data_b.join("owner.token").exists());
    let on_a = ControlPlaneClient::new(&a.ready.console, &owner).unwrap();
    let on_b = ControlPlaneClient::new(&b.ready.console, &owner).unwrap();
    on_b.list_devices().await.unwrap();

    // A token made on B works on A within a second; revoked on A, it stops on B as fast.
    let made = on_b
        .create_token(CreateTokenRequest {
            name: Some("reader".into()),
            permissions: vec![Permission::ObservabilityRead],
            ..Default::default()
        })
        .await
        .unwrap();
    let reader_a = ControlPlaneClient::new(&a.ready.console, &made.token).unwrap();
    let reader_b = ControlPlaneClient::new(&b.ready.console, &made.token).unwrap();
    assert!(
        within(Duration::from_secs(1), async || reader_a
            .list_devices()
            .await
            .is_ok())
        .await,
        "a token created on B works on A within a second"
    );
    on_a.revoke_token(&made.id).await.unwrap();
    assert!(
        within(Duration::from_secs(1), async || reader_b
            .list_devices()
            .await
            .is_err())
        .await,
        "a token revoked on A stops working on B within a second"
    );

    // A code minted on A pairs a node through B; approving on A completes it.
    let code = on_a
        .mint_code(MintCodeRequest::default())
        .await
        .unwrap()
        .code;
    let state = dir.path().join("node");
    let mut pair = command(&bins().anchor_node, dir.path());
    pair.args([
        "pair",
        "--anchor",
        &b.ready.quic.to_string(),
        "--code",
        &code,
    ])
    .args(["--name", "roamer", "--json", "--state-dir"])
    .arg(&state);
    let pairing = Proc::spawn("anchor-node pair", &mut pair);
    let mut pending = None;
    assert!(
        within(Duration::from_secs(30), async || {
            pending = on_a
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.device_name == "roamer");
            pending.is_some()
        })
        .await,
        "the request made through B is pending on A: {}",
        b.proc.stderr()
    );
    on_a.approve(&pending.unwrap().request_id).await.unwrap();
    let out = pairing.finish(Duration::from_secs(30));
    assert_eq!(
        out.code(),
        Some(0),
        "the node waiting on B was approved on A: {out:?}"
    );
    let device = out.json()["device_id"].as_str().unwrap().to_string();
    let seen_on_b = on_b.device(&device).await.unwrap();
    assert_eq!(seen_on_b.name, "roamer");

    // One etcd member of three killed: operators see no error, writes included.
    let mut cluster = cluster;
    cluster.kill(0);
    let killed = Instant::now();
    for _ in 0..20 {
        on_a.list_devices().await.unwrap();
        on_b.device(&device).await.unwrap();
    }
    eprintln!("40 reads with a member down took {:?}", killed.elapsed());
    let made = on_b
        .create_token(CreateTokenRequest {
            name: Some("after-loss".into()),
            permissions: vec![Permission::ObservabilityRead],
            ..Default::default()
        })
        .await
        .unwrap();
    let after = ControlPlaneClient::new(&a.ready.console, &made.token).unwrap();
    let made_at = Instant::now();
    assert!(
        within(Duration::from_secs(10), async || after
            .list_devices()
            .await
            .is_ok())
        .await,
        "a token made with one etcd member down works on the other anchor"
    );
    eprintln!(
        "a token made with a member down worked on the other anchor after {:?}",
        made_at.elapsed()
    );
    cluster.restart(0);
    cluster.wait_ready();
    eprintln!("member back after {:?}", killed.elapsed());

    // etcd unreachable altogether: a write is refused with 503 and a stable code, and the
    // anchors recover by themselves when etcd is back.
    for i in 0..3 {
        cluster.kill(i);
    }
    let outage = Instant::now();
    let err = on_a
        .create_token(CreateTokenRequest {
            name: Some("while-down".into()),
            permissions: vec![Permission::ObservabilityRead],
            ..Default::default()
        })
        .await
        .unwrap_err();
    match err {
        anchorage_console::client::ClientError::Api { status, code, .. } => {
            assert_eq!((status, code.as_str()), (503, "store_unavailable"));
        }
        other => panic!("expected a 503, got {other:?}"),
    }
    eprintln!(
        "a write with etcd down was refused after {:?}",
        outage.elapsed()
    );
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_ready();
    let back = Instant::now();
    assert!(
        within(Duration::from_secs(20), async || {
            on_a.create_token(CreateTokenRequest {
                name: Some("after-outage".into()),
                permissions: vec![Permission::ObservabilityRead],
                ..Default::default()
            })
            .await
            .is_ok()
        })
        .await,
        "writes work again once etcd is back, without restarting the anchor"
    );
    eprintln!(
        "writes worked again {:?} after etcd was back",
        back.elapsed()
    );

    // Every anchor lists every live anchor; one killed with SIGKILL drops out within its
    // lease (10 s).
    let listed = on_a.inventory().await.unwrap().instances;
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().any(
            |i| i.console == b.ready.console.trim_start_matches("http://")
                || b.ready.console.ends_with(&i.console)
        ),
        "{listed:?}"
    );
    assert!(
        listed
            .iter()
            .all(|i| i.store == "etcd" && i.lease == "held"),
        "{listed:?}"
    );
    let out = run_ctl(&a, dir.path(), &["instances", "--json"]);
    assert_eq!(out.json().as_array().unwrap().len(), 2, "{out:?}");
    b.proc.kill();
    let dead = Instant::now();
    assert!(
        within(Duration::from_secs(15), async || {
            on_a.inventory().await.unwrap().instances.len() == 1
        })
        .await,
        "a killed anchor leaves the instance list within its lease"
    );
    eprintln!("a killed anchor left the list after {:?}", dead.elapsed());

    // An anchor given another cluster key cannot open the cluster's CA.
    let wrong = dir.path().join("other.key");
    let mut cmd = command(&bins().anchord, dir.path());
    cmd.arg("--data-dir")
        .arg(dir.path().join("c"))
        .args(["--listen", "127.0.0.1:0", "--console", "127.0.0.1:0"])
        .args([
            "--store",
            "etcd",
            "--etcd-endpoints",
            &cluster.endpoints().join(","),
        ])
        .args(["--etcd-prefix", "/mesh", "--cluster-key-file"])
        .arg(&wrong);
    let started = Instant::now();
    let out = Proc::spawn("anchord (wrong key)", &mut cmd).finish(Duration::from_secs(30));
    eprintln!(
        "the anchord with a wrong key stopped after {:?}",
        started.elapsed()
    );
    assert_ne!(out.code(), Some(0));
    assert!(
        out.stderr.contains("does not open with this cluster key"),
        "{}",
        out.stderr
    );
}

/// Pairs a node named `name` through `via`, with a code minted and approved on `on`; its
/// state directory and device id.
async fn pair(
    on: &ControlPlaneClient,
    via: &procs::Anchord,
    dir: &Path,
    name: &str,
) -> (std::path::PathBuf, String) {
    let code = on.mint_code(MintCodeRequest::default()).await.unwrap().code;
    let state = dir.join(name);
    let mut cmd = command(&bins().anchor_node, dir);
    cmd.args([
        "pair",
        "--anchor",
        &via.ready.quic.to_string(),
        "--code",
        &code,
    ])
    .args(["--name", name, "--json", "--state-dir"])
    .arg(&state);
    let pairing = Proc::spawn("anchor-node pair", &mut cmd);
    let mut pending = None;
    assert!(
        within(Duration::from_secs(30), async || {
            pending = on
                .list_requests(Some(RequestState::PendingApproval))
                .await
                .unwrap()
                .into_iter()
                .find(|r| r.device_name == name);
            pending.is_some()
        })
        .await,
        "{name}'s request is pending"
    );
    on.approve(&pending.unwrap().request_id).await.unwrap();
    let out = pairing.finish(Duration::from_secs(30));
    assert_eq!(out.code(), Some(0), "{out:?}");
    (state, out.json()["device_id"].as_str().unwrap().to_string())
}

/// `anchor-node run` for the node in `state`, with `extra` arguments.
fn run_node(dir: &Path, state: &Path, extra: &[&str]) -> Proc {
    let mut cmd = command(&bins().anchor_node, dir);
    cmd.arg("run").arg("--state-dir").arg(state).args(extra);
    Proc::spawn("anchor-node run", &mut cmd)
}

/// `n` anchors of one mesh on `cluster` under `prefix`, in `dir`: the anchors (the first made
/// the cluster key and the owner token), the owner token, and a client of each.
fn mesh(
    cluster: &EtcdCluster,
    dir: &Path,
    prefix: &str,
    n: usize,
) -> (Vec<procs::Anchord>, String, Vec<ControlPlaneClient>) {
    let key_file = dir.join("cluster.key");
    let anchors: Vec<procs::Anchord> = (0..n)
        .map(|i| anchord(cluster, &dir.join(format!("anchor-{i}")), &key_file, prefix))
        .collect();
    let owner = anchors[0].owner_token();
    let clients = anchors
        .iter()
        .map(|a| ControlPlaneClient::new(&a.ready.console, &owner).unwrap())
        .collect();
    (anchors, owner, clients)
}

/// An invocation of `capability` without input.
fn call(capability: &str, timeout_ms: u64, async_: bool) -> anchorage_console::api::InvokeRequest {
    anchorage_console::api::InvokeRequest {
        capability: capability.into(),
        input: serde_json::Value::Null,
        timeout_ms: Some(timeout_ms),
        async_,
    }
}

/// Polls `on` for the invocation `id` until it is final (at most `limit`); its last state.
async fn final_invocation(
    on: &ControlPlaneClient,
    id: &anchorage_console::api::InvocationId,
    limit: Duration,
) -> Option<anchorage_console::api::Invocation> {
    let mut last = None;
    within(limit, async || {
        last = on.invocation(id).await.ok();
        last.as_ref().is_some_and(|i| i.state.is_final())
    })
    .await;
    last
}

/// The instance id of the anchor whose console is `client`'s.
/// Waits for that anchor's first announcement to reach the store.
async fn instance_id(client: &ControlPlaneClient, console: &str) -> String {
    let mut found = None;
    within(Duration::from_secs(10), async || {
        let listed = client.inventory().await.map(|i| i.instances);
        found = listed
            .unwrap_or_default()
            .into_iter()
            .find(|i| console.ends_with(&i.console))
            .map(|i| i.id);
        found.is_some()
    })
    .await;
    found.unwrap_or_else(|| panic!("no anchor at {console} announced itself"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_anchor_shows_dispatches_to_and_revokes_the_nodes_of_the_others() {
    use anchorage_console::api::{BatchRequest, InvocationState, Presence};
    use futures_util::StreamExt;

    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (anchors, owner, clients) = mesh(&cluster, dir.path(), "/one", 2);
    let [a, b]: [procs::Anchord; 2] = anchors.try_into().ok().unwrap();
    let [on_a, on_b]: [ControlPlaneClient; 2] = clients.try_into().ok().unwrap();
    let b_id = instance_id(&on_a, &b.ready.console).await;
    let mut events_a = Box::pin(on_a.events().await.unwrap());

    // Paired through B, the node runs against B; A shows it connected there, online.
    let (state_b, on_b_node) = pair(&on_a, &b, dir.path(), "held-by-b").await;
    let (state_a, on_a_node) = pair(&on_a, &a, dir.path(), "held-by-a").await;
    let node_b = run_node(dir.path(), &state_b, &[]);
    let node_a = run_node(dir.path(), &state_a, &[]);
    let started = Instant::now();
    let mut seen = None;
    assert!(
        within(Duration::from_secs(20), async || {
            seen = on_a.node(&on_b_node).await.ok();
            seen.as_ref().is_some_and(|n| n.connected)
        })
        .await,
        "A shows the node connected to B: {seen:?}\n{}",
        node_b.log_tail()
    );
    eprintln!(
        "A saw the node on B connected after {:?}",
        started.elapsed()
    );
    let seen = seen.unwrap();
    assert_eq!(seen.presence, Presence::Online);
    assert_eq!(seen.anchor.as_deref(), Some(b_id.as_str()));
    assert!(
        within(Duration::from_secs(20), async || on_b
            .node(&on_a_node)
            .await
            .is_ok_and(|n| n.connected && n.presence == Presence::Online))
        .await,
        "B shows the node connected to A"
    );

    // An invocation made on A for the node on B is dispatched by B and answers on A.
    let mut rtts = Vec::new();
    for _ in 0..20 {
        let t = Instant::now();
        let inv = on_a
            .invoke(&on_b_node, call("system.health", 10_000, false))
            .await
            .unwrap();
        rtts.push(t.elapsed());
        assert_eq!(inv.state, InvocationState::Succeeded, "{inv:?}");
    }
    rtts.sort();
    eprintln!(
        "invoke on A for a node on B: p50 {:?}, max {:?}",
        rtts[rtts.len() / 2],
        rtts[rtts.len() - 1]
    );

    // The event stream of A carries what B did: the node's registration and invocations.
    let mut kinds = std::collections::BTreeSet::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        while let Some(Ok(e)) = events_a.next().await {
            if e.device_id.map(|d| d.to_string()) == Some(on_b_node.clone()) {
                kinds.insert(e.kind.clone());
            }
            if kinds.contains("node.registered") && kinds.contains("invocation") {
                break;
            }
        }
    })
    .await;
    assert!(
        kinds.contains("node.registered") && kinds.contains("invocation"),
        "A's events about the node on B: {kinds:?}"
    );

    // A batch made on B covers both nodes, whichever anchor holds them.
    let batch = on_b
        .create_batch(&BatchRequest {
            selector: anchorage_wire::labels::Selector::everything(),
            capability: "system.health".into(),
            input: serde_json::Value::Null,
            timeout_ms: Some(20_000),
            max_concurrency: None,
            devices: None,
        })
        .await
        .unwrap();
    let mut done = None;
    assert!(
        within(Duration::from_secs(25), async || {
            done = on_b.batch(&batch.info.batch_id).await.ok();
            done.as_ref().is_some_and(|b| b.info.done)
        })
        .await,
        "the batch ends: {done:?}"
    );
    let done = done.unwrap();
    assert_eq!((done.info.total, done.info.succeeded), (2, 2), "{done:?}");

    // Labels set on B reach A's inventory (held in memory there, following the store's watch),
    // and so does their removal.
    let set = anchorage_console::api::LabelRequest {
        set: [("site".to_string(), "lab".to_string())].into(),
        remove: Vec::new(),
    };
    on_b.label(&on_a_node, &set).await.unwrap();
    let site_on_a = async |want: Option<&str>| {
        within(Duration::from_secs(5), async || {
            on_a.inventory().await.is_ok_and(|i| {
                i.devices.iter().any(|d| {
                    d.device_id.to_string() == on_a_node
                        && d.labels.get("site").map(String::as_str) == want
                })
            })
        })
        .await
    };
    assert!(site_on_a(Some("lab")).await, "A shows the label B set");
    let unset = anchorage_console::api::LabelRequest {
        set: Default::default(),
        remove: vec!["site".into()],
    };
    on_b.label(&on_a_node, &unset).await.unwrap();
    assert!(site_on_a(None).await, "A shows the label removed on B");

    // Revoked on A, the node held by B is cut off within a second, and refused after.
    let mut node_b = node_b;
    on_a.revoke(&on_b_node, Some("lost laptop".into()))
        .await
        .unwrap();
    let revoked = Instant::now();
    let status = node_b.wait_exit_async(Duration::from_secs(10)).await;
    eprintln!(
        "the node held by B stopped {:?} after its revocation on A",
        revoked.elapsed()
    );
    assert!(!status.success(), "a revoked node stops with an error");
    assert!(
        revoked.elapsed() < Duration::from_secs(3),
        "closed by B within a second (plus the node's exit and a loaded machine's slack)"
    );
    assert!(
        within(Duration::from_secs(5), async || on_b
            .node(&on_b_node)
            .await
            .is_ok_and(|n| !n.connected))
        .await
    );
    assert!(
        within(Duration::from_secs(5), async || on_b
            .inventory()
            .await
            .is_ok_and(|i| i.devices.iter().any(|d| d
                .device_id
                .to_string()
                == on_b_node
                && d.trust == anchorage_console::api::TrustState::Revoked)))
        .await,
        "B's inventory shows the device revoked on A"
    );
    let again = run_node(dir.path(), &state_b, &[]).finish(Duration::from_secs(20));
    assert_ne!(
        again.code(),
        Some(0),
        "the revoked node is refused: {again:?}"
    );

    // etcd unreachable altogether: the node stays connected, reads answer from the anchor's
    // last view, marked stale within a few seconds (as soon as the anchor's watch of etcd
    // breaks, or a read of etcd fails), and the mark goes by itself when etcd is back.
    let mut cluster = cluster;
    for i in 0..3 {
        cluster.kill(i);
    }
    let down = Instant::now();
    let t = Instant::now();
    on_a.inventory().await.unwrap();
    eprintln!(
        "the first read with etcd down answered after {:?}",
        t.elapsed()
    );
    let mut inventory = None;
    assert!(
        within(Duration::from_secs(5), async || {
            inventory = on_a.inventory().await.ok();
            inventory.as_ref().is_some_and(|i| i.stale_since.is_some())
        })
        .await,
        "marked stale: {inventory:?}"
    );
    eprintln!("marked stale {:?} after etcd went away", down.elapsed());
    let inventory = inventory.unwrap();
    assert!(
        inventory
            .devices
            .iter()
            .any(|d| d.device_id.to_string() == on_a_node && d.connected),
        "the node on A is still shown connected: {inventory:?}"
    );
    let t = Instant::now();
    let listed = on_a.list_devices().await.unwrap();
    eprintln!("a read once stale answered after {:?}", t.elapsed());
    // Devices paired since the anchor started are still there (its directory, not a view of
    // etcd from before they paired).
    assert!(
        listed.iter().any(|d| d.device_id.to_string() == on_a_node),
        "{listed:?}"
    );
    on_a.device(&on_a_node).await.unwrap();
    let raw = reqwest::Client::new()
        .get(format!("{}/console/v1/devices", a.ready.console))
        .bearer_auth(&owner)
        .send()
        .await
        .unwrap();
    assert_eq!(raw.status(), 200);
    assert!(
        raw.headers().contains_key("anchorage-stale-since"),
        "{:?}",
        raw.headers()
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(node_a.try_wait().is_none(), "the node kept running");
    for i in 0..3 {
        cluster.restart(i);
    }
    cluster.wait_ready();
    let back = Instant::now();
    assert!(
        within(Duration::from_secs(20), async || on_a
            .inventory()
            .await
            .is_ok_and(|i| i.stale_since.is_none()))
        .await,
        "fresh again once etcd is back"
    );
    eprintln!("fresh again {:?} after etcd was back", back.elapsed());
    assert!(
        within(Duration::from_secs(15), async || on_b
            .node(&on_a_node)
            .await
            .is_ok_and(|n| n.connected))
        .await,
        "the node on A is connected, as B sees it, after the outage"
    );
    drop(node_a);
}

/// Which anchor should hold the nodes.
#[derive(Clone, Copy)]
enum Holder<'a> {
    /// This one.
    Is(&'a str),
    /// Any other.
    Not(&'a str),
}

/// Whether `on` shows every one of `devices` connected, online, and held as `holder` says.
async fn held(on: &ControlPlaneClient, devices: &[String], holder: Holder<'_>) -> bool {
    let listed = on.list_nodes().await.unwrap_or_default();
    devices.iter().all(|d| {
        listed.iter().any(|n| {
            n.device_id.to_string() == *d
                && n.connected
                && n.presence == anchorage_console::api::Presence::Online
                && match holder {
                    Holder::Is(h) => n.anchor.as_deref() == Some(h),
                    Holder::Not(h) => n.anchor.is_some() && n.anchor.as_deref() != Some(h),
                }
        })
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_nodes_of_a_killed_anchor_register_with_the_others_and_lose_no_work() {
    use anchorage_console::api::{InvocationState, Presence};

    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (anchors, _, clients) = mesh(&cluster, dir.path(), "/failover", 3);
    let [a, _b, c]: [procs::Anchord; 3] = anchors.try_into().ok().unwrap();
    let [on_a, on_b, _]: [ControlPlaneClient; 3] = clients.try_into().ok().unwrap();
    let c_id = instance_id(&on_a, &c.ready.console).await;

    // Three nodes paired through A, all running against C; each has a slow capability that
    // notes every run in a file.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let name = format!("n{i}");
        let (state, device) = pair(&on_a, &a, dir.path(), &name).await;
        let runs = dir.path().join(format!("{name}.runs"));
        let config = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &config,
            format!(
                "[capabilities.slow]\ncommand = [\"sh\", \"-c\", \"echo run >> {}; sleep 2; echo '{{}}'\"]\ntimeout = \"20s\"\n",
                runs.display()
            ),
        )
        .unwrap();
        let c_addr = c.ready.quic.to_string();
        let mut cmd = command(&bins().anchor_node, dir.path());
        cmd.arg("run")
            .arg("--state-dir")
            .arg(&state)
            .arg("--config")
            .arg(&config)
            .args(["--anchor", &c_addr]);
        nodes.push((device, runs, Proc::spawn("anchor-node run", &mut cmd)));
    }
    let devices: Vec<String> = nodes.iter().map(|(d, _, _)| d.clone()).collect();
    assert!(
        within(Duration::from_secs(30), async || held(
            &on_a,
            &devices,
            Holder::Is(&c_id)
        )
        .await)
        .await,
        "every node registered with C: {:?}\n{}",
        on_a.list_nodes().await,
        nodes[0].2.log_tail()
    );
    // Let the nodes hear of every anchor (sent at registration and on each change).
    tokio::time::sleep(Duration::from_secs(4)).await;

    // An invocation made on A runs on a node held by C; C dies while it runs.
    let slow = match on_a.invoke(&nodes[0].0, call("slow", 30_000, true)).await {
        Ok(s) => s,
        Err(e) => panic!("{e}\n{}", a.proc.log_tail()),
    };
    assert!(
        within(Duration::from_secs(10), async || std::fs::read_to_string(
            &nodes[0].1
        )
        .is_ok())
        .await,
        "the slow capability started on the node"
    );
    // C dies, and the third node with it (it never comes back).
    nodes[2].2.kill();
    c.proc.kill();
    let killed = Instant::now();
    // Made for the node that is gone, while C's lease still says it holds it: nobody will
    // run it, and the anchor that made it times it out after its deadline.
    let abandoned = on_a
        .invoke(&nodes[2].0, call("system.health", 2_000, true))
        .await
        .unwrap();
    // Queued while the node's holder is dead: delivered once the node is elsewhere.
    let queued = on_a
        .invoke(&nodes[1].0, call("system.health", 30_000, true))
        .await
        .unwrap();

    assert!(
        within(Duration::from_secs(20), async || held(
            &on_a,
            &devices[..2],
            Holder::Not(&c_id)
        )
        .await)
        .await,
        "every node of C registered with A or B: {:?}\n{}",
        on_a.list_nodes().await,
        nodes[0].2.log_tail()
    );
    let moved = killed.elapsed();
    eprintln!("the nodes of the killed anchor were registered elsewhere after {moved:?}");
    assert!(
        moved < Duration::from_secs(12),
        "within 10 s (and a loaded machine's slack): {moved:?}"
    );
    // The same presence on every anchor.
    for (device, _, _) in nodes.iter().take(2) {
        let seen_b = on_b.node(device).await.unwrap();
        assert!(
            seen_b.connected && seen_b.presence == Presence::Online,
            "{seen_b:?}"
        );
    }
    // Both invocations end well, and the slow one ran once.
    for (id, what) in [
        (slow.invocation_id, "in flight"),
        (queued.invocation_id, "queued"),
    ] {
        let last = final_invocation(&on_a, &id, Duration::from_secs(30)).await;
        assert_eq!(
            last.as_ref().map(|i| i.state),
            Some(InvocationState::Succeeded),
            "the {what} invocation ends well: {last:?}"
        );
    }
    let runs = std::fs::read_to_string(&nodes[0].1).unwrap();
    assert_eq!(
        runs.lines().count(),
        1,
        "the in-flight invocation ran once: {runs:?}"
    );
    let last = final_invocation(&on_a, &abandoned.invocation_id, Duration::from_secs(20)).await;
    assert_eq!(
        last.as_ref().map(|i| i.state),
        Some(InvocationState::TimedOut),
        "the invocation nobody could take ends: {last:?}"
    );
    // The node that went with C is no longer connected anywhere, as every anchor sees it.
    assert!(
        within(Duration::from_secs(15), async || on_b
            .node(&nodes[2].0)
            .await
            .is_ok_and(|n| !n.connected))
        .await,
        "the lease of the dead anchor let go of its node"
    );
}
