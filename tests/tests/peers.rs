//! The peer-to-peer mesh end to end over netsim (issue 14): a real anchor and real node agents
//! on one simulated network, nodes behind every kind of NAT, the policy deciding who may reach
//! whom. Simulated time: every "within a second" below is the simulated clock's.

#![allow(clippy::unwrap_used)]

use std::sync::Arc;
use std::time::Duration;

use anchorage_console::Backend;
use anchorage_daemon::policy::{Policy, PolicyVersion};
use anchorage_netsim::{LinkConfig, NatConfig};
use anchorage_node::peer::{PeerError, Peers};
use anchorage_sim::{RunningAgent, Sim, SimNode, eventually, lossy};
use anchorage_wire::DeviceId;
use anchorage_wire::invoke::Outcome;

const POLICY: &str = r#"
[[allow]]
from = "role=display"
to = "role=camera"
capabilities = ["echo", "system.*"]
services = ["web"]
"#;

/// One node of a scenario.
struct Member {
    _node: SimNode,
    id: DeviceId,
    agent: RunningAgent,
}

impl Member {
    fn peers(&self) -> Arc<Peers> {
        self.agent
            .peers
            .get()
            .expect("the agent runs the mesh")
            .clone()
    }
}

/// Where a node lives.
#[derive(Clone)]
enum Place {
    Open,
    Behind(NatConfig),
    /// A home router of this kind behind its own carrier-grade NAT (a NAT behind a NAT).
    BehindCarrier(NatConfig),
    /// A firewall that lets UDP through only to the anchor.
    Firewalled,
}

/// Pairs and labels a node at `place`, and starts its agent with the mesh.
async fn member(sim: &Sim, name: &str, role: &str, place: Place) -> Member {
    let node = match place {
        Place::Open => sim.add_node(name),
        Place::Behind(config) => {
            let nat = sim.net.add_nat(&format!("{name}-nat"), config);
            sim.add_node_behind(name, &nat)
        }
        Place::BehindCarrier(config) => {
            let carrier = sim
                .net
                .add_nat(&format!("{name}-carrier"), NatConfig::carrier_grade());
            let home = carrier.add_nat(&format!("{name}-home"), config);
            sim.add_node_behind(name, &home)
        }
        Place::Firewalled => {
            let firewall = sim.net.add_nat(
                &format!("{name}-firewall"),
                NatConfig::firewall(sim.addr().ip()),
            );
            sim.add_node_behind(name, &firewall)
        }
    };
    let id = sim.pair(&node).await.device_id;
    sim.backend()
        .label(
            &sim.owner,
            id,
            vec![format!("role={role}").parse().unwrap()],
        )
        .await
        .unwrap();
    let agent = node.start_mesh_agent(sim.addr(), |_| {});
    assert!(
        agent.registered(1, Duration::from_secs(60)).await,
        "{name} registers"
    );
    Member {
        _node: node,
        id,
        agent,
    }
}

fn set_policy(sim: &Sim, version: u64, text: &str) {
    let policy = Policy::parse(text).unwrap();
    let replaced = sim.anchor().services().policy.replace(PolicyVersion {
        version,
        text: text.into(),
        policy,
        updated_ms: 0,
        updated_by: "test".into(),
    });
    assert!(replaced);
}

/// Waits until `who` holds `peer` in its directory.
async fn knows(who: &Member, peer: DeviceId, limit: Duration) -> bool {
    let peers = who.peers();
    eventually(limit, || {
        let peers = peers.clone();
        async move {
            peers
                .list()
                .iter()
                .any(|p| p.device_id == peer)
                .then_some(())
        }
    })
    .await
    .is_some()
}

async fn echo(from: &Member, to: &Member) -> Result<Outcome, PeerError> {
    from.peers()
        .call(
            to.id,
            "echo",
            br#"{"hello":1}"#.to_vec(),
            Duration::from_secs(20),
        )
        .await
        .map(|(_, r)| r.outcome)
}

/// The path `from` uses to `to` now.
fn path(from: &Member, to: &Member) -> &'static str {
    from.peers()
        .list()
        .into_iter()
        .find(|p| p.device_id == to.id)
        .map_or("none", |p| p.path)
}

async fn path_becomes(from: &Member, to: &Member, want: &str, limit: Duration) -> bool {
    eventually(limit, || async { (path(from, to) == want).then_some(()) })
        .await
        .is_some()
}

/// A display and a camera, each at its place, with the example policy in force and each in
/// the other's directory.
async fn pair_of(seed: u64, link: LinkConfig, a: Place, b: Place) -> (Sim, Member, Member) {
    let sim = Sim::start(seed, link, |_| {}).await;
    let display = member(&sim, "display", "display", a).await;
    let camera = member(&sim, "camera", "camera", b).await;
    set_policy(&sim, 1, POLICY);
    assert!(
        knows(&display, camera.id, Duration::from_secs(5)).await,
        "seed {seed}"
    );
    assert!(
        knows(&camera, display.id, Duration::from_secs(5)).await,
        "seed {seed}"
    );
    (sim, display, camera)
}

#[tokio::test(start_paused = true)]
async fn the_policy_decides_who_may_call_whom_and_the_first_call_works_at_once() {
    let seed = 0x9e11;
    let sim = Sim::start(seed, lossy(0.0), |_| {}).await;
    let display = member(&sim, "display", "display", Place::Open).await;
    let camera = member(&sim, "camera", "camera", Place::Open).await;
    // By default nobody reaches anybody.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(display.peers().list().is_empty(), "seed {seed}");
    assert!(matches!(
        display.peers().resolve("camera"),
        Err(PeerError::Resolve(_))
    ));

    set_policy(&sim, 1, POLICY);
    // The directory reaches both within a second.
    assert!(
        knows(&display, camera.id, Duration::from_secs(1)).await,
        "seed {seed}"
    );
    assert!(
        knows(&camera, display.id, Duration::from_secs(1)).await,
        "seed {seed}"
    );
    assert_eq!(display.peers().resolve("camera").unwrap(), camera.id);

    let started = tokio::time::Instant::now();
    assert_eq!(
        echo(&display, &camera).await.unwrap(),
        Outcome::Succeeded,
        "seed {seed}"
    );
    let first = started.elapsed();
    assert!(
        first < Duration::from_secs(5),
        "seed {seed}: first call took {first:?}"
    );
    assert!(
        path_becomes(&display, &camera, "direct", Duration::from_secs(5)).await,
        "seed {seed}: on one LAN the path goes direct"
    );
    // What the rule does not name is refused by the caller, and by the callee for a caller
    // the rule does not cover.
    let refused = display
        .peers()
        .call(
            camera.id,
            "desktop.open_url",
            b"{}".to_vec(),
            Duration::from_secs(5),
        )
        .await;
    assert!(
        matches!(refused, Err(PeerError::NotAllowed(_))),
        "{refused:?}"
    );
    let back = camera
        .peers()
        .call(display.id, "echo", b"{}".to_vec(), Duration::from_secs(5))
        .await;
    assert!(matches!(back, Err(PeerError::NotAllowed(_))), "{back:?}");
}

/// Every pair of NAT types: a call always works; the path is direct where the NATs allow
/// punching and relayed where they do not (docs/netsim.md has the matrix).
#[tokio::test(start_paused = true)]
async fn every_pair_of_nat_types_gets_a_connection_direct_where_possible() {
    nat_matrix(0.0, 0x4a7).await;
}

/// The same matrix with 5 % of packets lost on every link.
#[tokio::test(start_paused = true)]
async fn every_pair_of_nat_types_gets_a_connection_under_five_percent_loss() {
    nat_matrix(0.05, 0x5a7).await;
}

async fn nat_matrix(loss: f64, first_seed: u64) {
    let types = [
        ("full-cone", NatConfig::full_cone()),
        ("restricted", NatConfig::restricted_cone()),
        ("port-restricted", NatConfig::port_restricted_cone()),
        ("symmetric", NatConfig::symmetric()),
    ];
    let mut seen = Vec::new();
    for (i, (an, a)) in types.iter().enumerate() {
        for (bn, b) in types.iter().skip(i) {
            let seed = first_seed + seen.len() as u64;
            let (_sim, display, camera) = pair_of(
                seed,
                lossy(loss),
                Place::Behind(a.clone()),
                Place::Behind(b.clone()),
            )
            .await;
            assert_eq!(
                echo(&display, &camera).await.unwrap(),
                Outcome::Succeeded,
                "seed {seed}: {an} x {bn} at {loss} loss"
            );
            let hard = |n: &str| n == "symmetric";
            let direct_possible = !(hard(an) && (hard(bn) || *bn == "port-restricted")
                || hard(bn) && *an == "port-restricted");
            let want = if direct_possible { "direct" } else { "relayed" };
            assert!(
                path_becomes(&display, &camera, want, Duration::from_secs(15)).await,
                "seed {seed}: {an} x {bn} at {loss} loss should be {want}, is {}",
                path(&display, &camera)
            );
            // And calls keep working on that path.
            assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
            seen.push(format!("{an} x {bn}: {want}"));
        }
    }
    println!("{}", seen.join("\n"));
}

/// The places outside the four-by-four matrix: no NAT at all, a NAT behind a carrier's NAT,
/// and a firewall open only to the anchor (which leaves the relay as the only path).
#[tokio::test(start_paused = true)]
async fn open_hosts_carrier_grade_nats_and_firewalls_get_a_connection_too() {
    let cases = [
        (
            "open",
            Place::Open,
            "symmetric",
            Place::Behind(NatConfig::symmetric()),
            "direct",
        ),
        ("open", Place::Open, "open", Place::Open, "direct"),
        (
            "carrier-grade",
            Place::BehindCarrier(NatConfig::port_restricted_cone()),
            "full-cone",
            Place::Behind(NatConfig::full_cone()),
            "direct",
        ),
        (
            "carrier-grade",
            Place::BehindCarrier(NatConfig::port_restricted_cone()),
            "carrier-grade",
            Place::BehindCarrier(NatConfig::full_cone()),
            "direct",
        ),
        (
            "firewall",
            Place::Firewalled,
            "open",
            Place::Open,
            "relayed",
        ),
        (
            "firewall",
            Place::Firewalled,
            "full-cone",
            Place::Behind(NatConfig::full_cone()),
            "relayed",
        ),
    ];
    for (i, (an, a, bn, b, want)) in cases.into_iter().enumerate() {
        let seed = 0x0e0 + i as u64;
        let (_sim, display, camera) = pair_of(seed, lossy(0.0), a, b).await;
        assert_eq!(
            echo(&display, &camera).await.unwrap(),
            Outcome::Succeeded,
            "seed {seed}: {an} x {bn}"
        );
        assert!(
            path_becomes(&display, &camera, want, Duration::from_secs(15)).await,
            "seed {seed}: {an} x {bn} should be {want}, is {}",
            path(&display, &camera)
        );
        if want == "relayed" {
            // The background punching goes on, and still finds no way through the firewall.
            tokio::time::sleep(Duration::from_secs(30)).await;
            assert_eq!(
                path(&display, &camera),
                "relayed",
                "seed {seed}: {an} x {bn}"
            );
        }
        assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
    }
}

#[tokio::test(start_paused = true)]
async fn under_five_percent_loss_behind_nats_calls_work_and_the_path_goes_direct() {
    let seed = 0x5105;
    let (_sim, display, camera) = pair_of(
        seed,
        lossy(0.05),
        Place::Behind(NatConfig::port_restricted_cone()),
        Place::Behind(NatConfig::restricted_cone()),
    )
    .await;
    for i in 0..20 {
        assert_eq!(
            echo(&display, &camera).await.unwrap(),
            Outcome::Succeeded,
            "seed {seed}: call {i}"
        );
    }
    assert!(
        path_becomes(&display, &camera, "direct", Duration::from_secs(20)).await,
        "seed {seed}"
    );
}

#[tokio::test(start_paused = true)]
async fn revocation_and_policy_changes_cut_a_peer_off_within_a_second() {
    let seed = 0xc07;
    let (sim, display, camera) = pair_of(seed, lossy(0.0), Place::Open, Place::Open).await;
    assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);

    // A policy that no longer relates them: both drop the connection at once.
    set_policy(
        &sim,
        2,
        "[[allow]]\nfrom = \"role=nobody\"\nto = \"role=camera\"\ncapabilities = [\"echo\"]\n",
    );
    let cut = eventually(Duration::from_secs(1), || async {
        (display.peers().list().is_empty() && camera.peers().list().is_empty()).then_some(())
    })
    .await;
    assert!(
        cut.is_some(),
        "seed {seed}: the directory shrank within a second"
    );
    let refused = echo(&display, &camera).await;
    assert!(
        matches!(refused, Err(PeerError::NotAllowed(_))),
        "{refused:?}"
    );

    // Back in; then the display is revoked: the camera refuses it within a second.
    set_policy(&sim, 3, POLICY);
    assert!(knows(&display, camera.id, Duration::from_secs(1)).await);
    assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
    sim.backend()
        .revoke(&sim.owner, display.id, Some("stolen".into()))
        .await
        .unwrap();
    let gone = eventually(Duration::from_secs(1), || async {
        (!camera
            .peers()
            .list()
            .iter()
            .any(|p| p.device_id == display.id && p.connected))
        .then_some(())
    })
    .await;
    assert!(
        gone.is_some(),
        "seed {seed}: the camera closed the revoked peer"
    );
}

#[tokio::test(start_paused = true)]
async fn with_the_anchor_partitioned_away_direct_peers_keep_calling() {
    let seed = 0xa11;
    let (sim, display, camera) = pair_of(
        seed,
        lossy(0.0),
        Place::Behind(NatConfig::full_cone()),
        Place::Behind(NatConfig::port_restricted_cone()),
    )
    .await;
    assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
    assert!(path_becomes(&display, &camera, "direct", Duration::from_secs(10)).await);
    sim.anchor_host.set_up(false);
    // Long after both lost the anchor, and NAT mappings would have timed out while idle.
    for minute in 0..3 {
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(
            echo(&display, &camera).await.unwrap(),
            Outcome::Succeeded,
            "seed {seed}: minute {minute} without the anchor"
        );
    }
    assert!(!display.agent.connected(), "the anchor really is away");
    assert_eq!(path(&display, &camera), "direct");
}

#[tokio::test(start_paused = true)]
async fn a_node_that_changes_address_gets_its_peer_back() {
    let seed = 0x4eb;
    let (_sim, display, camera) = pair_of(seed, lossy(0.0), Place::Open, Place::Open).await;
    assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
    assert!(path_becomes(&display, &camera, "direct", Duration::from_secs(10)).await);
    camera._node.host.rebind();
    // Within a bounded time (the probes' timeout plus a round of punching) calls work again.
    let back = eventually(Duration::from_secs(30), || async {
        matches!(echo(&display, &camera).await, Ok(Outcome::Succeeded)).then_some(())
    })
    .await;
    assert!(back.is_some(), "seed {seed}");
    assert!(path_becomes(&display, &camera, "direct", Duration::from_secs(20)).await);
}

#[tokio::test(start_paused = true)]
async fn a_node_restarted_while_the_anchor_is_away_reaches_a_known_peer_directly() {
    let seed = 0x0ff1;
    let (sim, display, camera) = pair_of(
        seed,
        lossy(0.0),
        Place::Behind(NatConfig::port_restricted_cone()),
        Place::Behind(NatConfig::full_cone()),
    )
    .await;
    assert_eq!(echo(&display, &camera).await.unwrap(), Outcome::Succeeded);
    assert!(path_becomes(&display, &camera, "direct", Duration::from_secs(10)).await);
    // peers.json is written off the async threads; give it a moment.
    tokio::time::sleep(Duration::from_secs(2)).await;

    sim.anchor_host.set_up(false);
    let Member {
        _node: node,
        id,
        agent,
    } = display;
    agent.stop().await.unwrap();
    // A new process on a new socket (so a new NAT mapping), with only what it saved.
    let agent = node.start_mesh_agent(sim.addr(), |_| {});
    let started = eventually(Duration::from_secs(5), || async {
        agent.peers.get().map(|_| ())
    })
    .await;
    assert!(
        started.is_some(),
        "seed {seed}: the restarted node runs its peers"
    );
    let display = Member {
        _node: node,
        id,
        agent,
    };
    assert!(
        knows(&display, camera.id, Duration::from_millis(10)).await,
        "seed {seed}: the directory came from peers.json"
    );
    let back = eventually(Duration::from_secs(30), || async {
        matches!(echo(&display, &camera).await, Ok(Outcome::Succeeded)).then_some(())
    })
    .await;
    assert!(
        back.is_some(),
        "seed {seed}: reached the camera without the anchor"
    );
    assert!(!display.agent.connected(), "the anchor really is away");
    assert_eq!(path(&display, &camera), "direct");
}
