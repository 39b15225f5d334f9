//! The anchor as rendezvous and relay of the peer mesh, and the operators' view of it, against
//! a real anchor on real QUIC: each node here is a raw quinn client with its own CA-issued
//! certificate (paired as a node pairs) that speaks the node protocol by hand, so the test
//! sees exactly what a node would: its directory, punches, unreachable answers and relayed
//! packets.
//!
//! Each test starts its own anchor on 127.0.0.1 port 0 in a temp dir. Nodes connect from
//! their own loopback address (127.0.0.2, 127.0.0.3, ...), so the address the anchor observes
//! tells them apart. The policy is put in force on the anchor's policy feed directly.

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use anchorage_console::api::{LabelRequest, MintCodeRequest, PairMethod};
use anchorage_console::client::ControlPlaneClient as Client;
use anchorage_daemon::config::AnchorConfig;
use anchorage_daemon::policy::{Policy, PolicyVersion};
use anchorage_mesh::DeviceId;
use anchorage_mesh::framed::{self, FramedRecv, FramedSend};
use anchorage_node::pair::{PairOptions, PairProgress};
use anchorage_node::state::{Identity, StateDir};
use anchorage_sim::prom;
use anchorage_wire::control::{ControlDown, ControlUp, Register};
use anchorage_wire::peer::{
    Candidates, Directory, PathKind, PathReport, PeerPath, Punch, Relay, RelayPacket,
    RendezvousRequest, ServiceList, Unreachable,
};
use anchorage_wire::{ANCHOR_SERVER_NAME, ErrorCode, PROTOCOL_VERSION};

const STEP: Duration = Duration::from_secs(20);
/// How long a test waits to be sure something does not arrive.
const QUIET: Duration = Duration::from_millis(300);

struct Anchor {
    running: anchorage_daemon::Running,
    client: Client,
    dir: tempfile::TempDir,
}

impl Anchor {
    async fn start_with(tweak: impl FnOnce(&mut AnchorConfig)) -> Anchor {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AnchorConfig::for_tests(dir.path().join("anchor"));
        tweak(&mut config);
        let running = anchorage_daemon::start(config).await.unwrap();
        let token = running.anchor.owner_token().unwrap();
        let client = Client::new(&running.console_url(), token).unwrap();
        Anchor {
            running,
            client,
            dir,
        }
    }

    async fn start() -> Anchor {
        Anchor::start_with(|_| {}).await
    }

    fn addr(&self) -> SocketAddr {
        self.running.quic_addr
    }

    /// Puts `text` in force as policy `version`.
    fn set_policy(&self, version: u64, text: &str) {
        let policy = Policy::parse(text).unwrap();
        let replaced = self
            .running
            .anchor
            .services()
            .policy
            .replace(PolicyVersion {
                version,
                text: text.into(),
                policy,
                updated_ms: 1,
                updated_by: "test".into(),
            });
        assert!(replaced, "policy {version} is newer");
    }

    /// Pairs a device named `name` with `labels` from loopback address `from`.
    async fn pair(&self, name: &str, labels: &[(&str, &str)], from: u8) -> Identity {
        let minted = self
            .client
            .mint_code(MintCodeRequest {
                method: PairMethod::Pin,
                ttl_secs: None,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let endpoint = quinn::Endpoint::client(SocketAddr::new(loopback(from), 0)).unwrap();
        let state = StateDir::new(self.dir.path().join(name));
        let opts = PairOptions {
            anchor: self.addr().to_string(),
            anchor_addr: self.addr(),
            code: anchorage_node::pair::parse_code(Some(&minted.code), None).unwrap(),
            device_name: name.into(),
            platform: "test".into(),
        };
        let (req_tx, mut req_rx) = tokio::sync::mpsc::unbounded_channel();
        let task = {
            let state = state.clone();
            tokio::spawn(async move {
                anchorage_node::pair::pair(&endpoint, &state, &opts, move |p| {
                    if let PairProgress::Pending { request_id, .. } = p {
                        let _ = req_tx.send(request_id);
                    }
                })
                .await
            })
        };
        let request_id = tokio::time::timeout(STEP, req_rx.recv())
            .await
            .unwrap()
            .unwrap();
        let labels: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        self.client
            .approve_labelled(&request_id, labels)
            .await
            .unwrap();
        task.await.unwrap().expect("the node pairs");
        state.identity().unwrap()
    }

    async fn scrape(&self) -> prom::Exposition {
        let text = self.client.metrics().await.unwrap();
        prom::parse(&text).unwrap_or_else(|e| panic!("{e}\n{text}"))
    }

    /// Waits until the metric `name{labels}` reaches `at_least`, and returns it.
    async fn metric_at_least(&self, name: &str, labels: &[(&str, &str)], at_least: f64) -> f64 {
        anchorage_sim::eventually(STEP, || async {
            let v = self.scrape().await.value(name, labels).unwrap_or(0.0);
            (v >= at_least).then_some(v)
        })
        .await
        .unwrap_or_else(|| panic!("{name}{labels:?} never reached {at_least}"))
    }
}

fn loopback(last: u8) -> IpAddr {
    IpAddr::from([127, 0, 0, last])
}

/// A node connected to the anchor, speaking the protocol by hand.
struct Node {
    id: DeviceId,
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    tx: FramedSend<ControlUp>,
    rx: FramedRecv<ControlDown>,
}

impl Node {
    /// Connects from `from`, registers, and waits for `Registered`.
    async fn connect(anchor: &Anchor, identity: &Identity, from: u8) -> Node {
        let client = anchorage_mesh::tls::node_client_config(
            &identity.ca,
            vec![identity.cert.clone()],
            identity.key.private_key_der(),
        )
        .unwrap();
        let endpoint = quinn::Endpoint::client(SocketAddr::new(loopback(from), 0)).unwrap();
        let conn = endpoint
            .connect_with(client, anchor.addr(), ANCHOR_SERVER_NAME)
            .unwrap()
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let (mut tx, mut rx) = framed::framed::<ControlUp, ControlDown>(send, recv);
        tx.send(&ControlUp::Register(Register {
            version: PROTOCOL_VERSION,
            name: "raw".into(),
            platform: "test".into(),
            agent_version: "0".into(),
            capabilities: Vec::new(),
        }))
        .await
        .unwrap();
        let first = tokio::time::timeout(STEP, rx.recv())
            .await
            .unwrap()
            .unwrap();
        assert!(
            matches!(first, Some(ControlDown::Registered(_))),
            "{first:?}"
        );
        Node {
            id: identity.cert_info.key_id,
            endpoint,
            conn,
            tx,
            rx,
        }
    }

    /// The address the anchor sees this node at.
    fn observed(&self) -> String {
        self.endpoint.local_addr().unwrap().to_string()
    }

    async fn send(&mut self, msg: ControlUp) {
        self.tx.send(&msg).await.unwrap();
    }

    /// The next message that is not a revocation set or anchor list, if one comes within
    /// `limit`.
    async fn next_within(&mut self, limit: Duration) -> Option<ControlDown> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let msg = tokio::time::timeout_at(deadline, self.rx.recv())
                .await
                .ok()?;
            match msg.unwrap() {
                Some(ControlDown::Revoked(_) | ControlDown::Anchors(_)) => continue,
                Some(other) => return Some(other),
                None => panic!("the anchor finished the control stream"),
            }
        }
    }

    async fn next(&mut self) -> ControlDown {
        self.next_within(STEP)
            .await
            .expect("a message from the anchor")
    }

    /// The next whole directory (a replacing message and the ones that add to it).
    async fn directory(&mut self) -> Directory {
        match self.next().await {
            ControlDown::Directory(d) => {
                assert!(d.replace, "a directory starts with replace: {d:?}");
                d
            }
            other => panic!("expected a directory, got {other:?}"),
        }
    }

    /// The next whole directory for which `want` holds (earlier ones are skipped: a change
    /// may reach a session in more than one step).
    async fn directory_where(&mut self, want: impl Fn(&Directory) -> bool) -> Directory {
        loop {
            let d = self.directory().await;
            if want(&d) {
                return d;
            }
        }
    }

    /// The next message that is no directory.
    async fn answer(&mut self) -> ControlDown {
        loop {
            match self.next().await {
                ControlDown::Directory(_) => continue,
                other => return other,
            }
        }
    }

    async fn punch(&mut self) -> Punch {
        match self.answer().await {
            ControlDown::Punch(p) => p,
            other => panic!("expected a punch, got {other:?}"),
        }
    }

    async fn unreachable(&mut self) -> Unreachable {
        match self.answer().await {
            ControlDown::Unreachable(u) => u,
            other => panic!("expected unreachable, got {other:?}"),
        }
    }

    async fn rendezvous(&mut self, peer: DeviceId) {
        self.send(ControlUp::Rendezvous(RendezvousRequest { peer }))
            .await;
    }

    /// Opens the relay stream and says hello.
    async fn relay(&self) -> (FramedSend<Relay>, FramedRecv<Relay>) {
        let (send, recv) = self.conn.open_bi().await.unwrap();
        let (mut tx, rx) = framed::framed::<Relay, Relay>(send, recv);
        tx.send(&Relay::Hello).await.unwrap();
        (tx, rx)
    }
}

fn peers(d: &Directory) -> Vec<DeviceId> {
    d.peers.iter().map(|p| p.device_id).collect()
}

const DISPLAYS_SEE_CAMERAS: &str = r#"
[[allow]]
from = "role=display"
to = "role=camera"
capabilities = ["camera.*"]
services = ["rtsp"]
"#;

#[tokio::test]
async fn each_node_gets_the_peers_the_policy_relates_it_to_and_follows_changes() {
    let anchor = Anchor::start().await;
    let display = anchor.pair("display", &[("role", "display")], 2).await;
    let camera = anchor.pair("camera", &[("role", "camera")], 3).await;
    let printer = anchor.pair("printer", &[("role", "printer")], 4).await;
    let mut d = Node::connect(&anchor, &display, 2).await;
    let mut c = Node::connect(&anchor, &camera, 3).await;
    let mut p = Node::connect(&anchor, &printer, 4).await;

    // The default policy relates nobody: each node is told so once.
    for node in [&mut d, &mut c, &mut p] {
        let dir = node.directory().await;
        assert!(dir.peers.is_empty(), "{dir:?}");
        assert_eq!(dir.policy_version, 0);
    }

    // The camera exposes a service (and a name that is no service name, dropped).
    c.send(ControlUp::Services(ServiceList {
        names: vec!["rtsp".into(), "Not A Service".into()],
    }))
    .await;
    // An answer on the same stream: the services were taken before it.
    c.rendezvous(d.id).await;
    assert!(
        c.unreachable()
            .await
            .reason
            .contains("not allowed by policy")
    );
    anchor.set_policy(1, DISPLAYS_SEE_CAMERAS);

    let dir = d.directory().await;
    assert_eq!(dir.policy_version, 1);
    assert_eq!(peers(&dir), vec![c.id]);
    let entry = &dir.peers[0];
    assert_eq!(entry.name, "camera");
    assert!(entry.labels.contains(&("role".into(), "camera".into())));
    assert_eq!(entry.services, vec!["rtsp".to_string()]);
    assert!(entry.outbound.allows_capability("camera.snapshot"));
    assert!(entry.outbound.allows_service("rtsp"));
    assert!(
        entry.inbound.is_empty(),
        "the camera may not call the display"
    );

    let dir = c.directory().await;
    assert_eq!(peers(&dir), vec![d.id]);
    assert!(dir.peers[0].outbound.is_empty());
    assert!(dir.peers[0].inbound.allows_capability("camera.snapshot"));

    // The printer's directory did not change: it hears nothing.
    assert_eq!(p.next_within(QUIET).await, None);

    // A label change brings the printer in (it is now a camera too).
    anchor
        .client
        .label(
            &p.id,
            &LabelRequest {
                set: [("role".to_string(), "camera".to_string())].into(),
                remove: Vec::new(),
            },
        )
        .await
        .unwrap();
    let mut want = vec![c.id, p.id];
    want.sort();
    d.directory_where(|dir| peers(dir) == want).await;
    assert_eq!(peers(&p.directory().await), vec![d.id]);

    // A new policy: displays see printers only. The camera disappears from the display's
    // directory and the display from the camera's.
    anchor.set_policy(
        2,
        "[[allow]]\nfrom = \"role=display\"\nto = \"role=camera,name=printer\"\n\
         capabilities = [\"echo\"]\n",
    );
    // No device has a `name` label: nobody is related now.
    assert!(d.directory().await.peers.is_empty());
    assert!(c.directory().await.peers.is_empty());
    assert!(p.directory().await.peers.is_empty());
    anchor.set_policy(3, DISPLAYS_SEE_CAMERAS);
    let dir = d.directory().await;
    assert_eq!((dir.policy_version, peers(&dir)), (3, want));
    assert_eq!(dir.peers[0].services.len() + dir.peers[1].services.len(), 1);

    // Revoking the printer takes it out of the display's directory.
    anchor.client.revoke(&p.id, None).await.unwrap();
    d.directory_where(|dir| peers(dir) == vec![c.id]).await;

    // When the camera's session ends, its services are forgotten.
    c.conn.close(0u32.into(), b"bye");
    let dir = d
        .directory_where(|dir| dir.peers.iter().all(|p| p.services.is_empty()))
        .await;
    assert_eq!(peers(&dir), vec![c.id], "still related while away");
    anchor.running.shutdown().await;
}

#[tokio::test]
async fn rendezvous_punches_both_sides_with_one_token_or_says_why_not() {
    let anchor = Anchor::start().await;
    let display = anchor.pair("display", &[("role", "display")], 2).await;
    let camera = anchor.pair("camera", &[("role", "camera")], 3).await;
    let printer = anchor.pair("printer", &[("role", "printer")], 4).await;
    anchor.set_policy(1, DISPLAYS_SEE_CAMERAS);
    let mut d = Node::connect(&anchor, &display, 2).await;
    let mut c = Node::connect(&anchor, &camera, 3).await;
    let mut p = Node::connect(&anchor, &printer, 4).await;
    for node in [&mut d, &mut c, &mut p] {
        node.directory().await;
    }
    let _ = &p;

    // Garbage candidates are dropped, the rest kept in order.
    d.send(ControlUp::Candidates(Candidates {
        addrs: vec![
            "10.1.2.3:5000".into(),
            "not an address".into(),
            "10.1.2.3".into(),
            "[2001:db8::7]:9".into(),
        ],
    }))
    .await;
    c.send(ControlUp::Candidates(Candidates {
        addrs: vec!["192.168.1.9:4000".into()],
    }))
    .await;
    // The camera asks for the display (it is reached by it: related either way).
    c.rendezvous(d.id).await;
    let to_c = c.punch().await;
    let to_d = d.punch().await;
    assert_eq!(to_c.peer, d.id);
    assert_eq!(to_d.peer, c.id);
    assert_eq!(to_c.token, to_d.token, "one token for the pair");
    assert_ne!(to_c.token, [0; 16]);
    assert_eq!(
        to_c.addrs,
        vec![
            d.observed(),
            "10.1.2.3:5000".to_string(),
            "[2001:db8::7]:9".to_string()
        ],
        "the observed address first, then the valid candidates"
    );
    assert_eq!(
        to_d.addrs,
        vec![c.observed(), "192.168.1.9:4000".to_string()]
    );
    assert!(to_d.addrs[0].starts_with("127.0.0.3:"), "{:?}", to_d.addrs);

    // A fresh token every time.
    d.rendezvous(c.id).await;
    let again = d.punch().await;
    assert_ne!(again.token, to_d.token);
    c.punch().await;

    // Unrelated, unknown, and not connected.
    p.rendezvous(c.id).await;
    let u = p.unreachable().await;
    assert_eq!(u.peer, c.id);
    assert!(u.reason.contains("not allowed by policy"), "{u:?}");
    assert_eq!(c.next_within(QUIET).await, None, "the camera hears nothing");
    let stranger = DeviceId::from_bytes([9; 20]);
    d.rendezvous(stranger).await;
    let u = d.unreachable().await;
    assert!(u.reason.contains("unknown device"), "{u:?}");
    c.conn.close(0u32.into(), b"bye");
    c.endpoint.wait_idle().await;
    let deadline = tokio::time::Instant::now() + STEP;
    let u = loop {
        d.rendezvous(c.id).await;
        let u = d.unreachable().await;
        if u.reason.contains("not connected") {
            break u;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the camera stays connected: {u:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(u.peer, c.id);

    // Too many requests: the excess is refused, the session goes on.
    for _ in 0..40 {
        d.rendezvous(stranger).await;
    }
    let mut limited = 0;
    for _ in 0..40 {
        if d.unreachable().await.reason.contains("too many requests") {
            limited += 1;
        }
    }
    assert!(limited > 0, "a burst of 40 is over the bound");
    let m = anchor.scrape().await;
    assert!(m.value("anchorage_rendezvous_total", &[("outcome", "punched")]) >= Some(2.0));
    assert!(m.value("anchorage_rendezvous_total", &[("outcome", "rate_limited")]) >= Some(1.0));
    assert!(m.value("anchorage_rendezvous_total", &[("outcome", "not_allowed")]) >= Some(1.0));
    assert!(d.conn.close_reason().is_none());
    anchor.running.shutdown().await;
}

/// Reads relayed packets until `n` arrived; panics if they stop coming.
async fn receive(rx: &mut FramedRecv<Relay>, n: usize) -> Vec<RelayPacket> {
    let mut out = Vec::new();
    while out.len() < n {
        match tokio::time::timeout(STEP, rx.recv())
            .await
            .unwrap()
            .unwrap()
        {
            Some(Relay::Packet(p)) => out.push(p),
            other => panic!("expected a packet, got {other:?}"),
        }
    }
    out
}

#[tokio::test]
async fn the_relay_forwards_between_related_peers_only_within_its_bound() {
    // 4 KiB/s a node: a burst of 4 packets of 1000 bytes, then a trickle.
    let anchor = Anchor::start_with(|c| c.relay_limits.node_bytes_per_sec = 4096).await;
    let display = anchor.pair("display", &[("role", "display")], 2).await;
    let camera = anchor.pair("camera", &[("role", "camera")], 3).await;
    let printer = anchor.pair("printer", &[("role", "printer")], 4).await;
    anchor.set_policy(1, DISPLAYS_SEE_CAMERAS);
    let d = Node::connect(&anchor, &display, 2).await;
    let c = Node::connect(&anchor, &camera, 3).await;
    let p = Node::connect(&anchor, &printer, 4).await;
    let (mut d_tx, _d_rx) = d.relay().await;
    let (_c_tx, mut c_rx) = c.relay().await;
    let (mut p_tx, _p_rx) = p.relay().await;
    // The relay streams are up once the anchor has read the hellos: a packet to the camera
    // arrives then.
    let hello = |n: u8| {
        Relay::Packet(RelayPacket {
            peer: c.id,
            packet: vec![n; 100],
        })
    };
    let deadline = tokio::time::Instant::now() + STEP;
    let first = loop {
        d_tx.send(&hello(1)).await.unwrap();
        if let Ok(got) = tokio::time::timeout(QUIET, c_rx.recv()).await {
            break got.unwrap().unwrap();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no packet ever arrives"
        );
    };
    assert_eq!(
        first,
        Relay::Packet(RelayPacket {
            peer: d.id,
            packet: vec![1; 100]
        }),
        "the packet arrives unchanged, with its source"
    );
    // Drain the ones sent while the streams came up.
    while let Ok(Ok(Some(_))) = tokio::time::timeout(QUIET, c_rx.recv()).await {}

    // The printer is not related to the camera: its packets go nowhere.
    p_tx.send(&hello(2)).await.unwrap();
    anchor
        .metric_at_least(
            "anchorage_relay_dropped_total",
            &[("reason", "policy")],
            1.0,
        )
        .await;
    // The bandwidth bound: 100 packets of 1000 bytes at once, far over 4 KiB/s.
    let before = anchor.scrape().await;
    let relayed_before = before
        .value("anchorage_relay_packets_total", &[])
        .unwrap_or(0.0);
    let rate_before = before
        .value("anchorage_relay_dropped_total", &[("reason", "rate")])
        .unwrap_or(0.0);
    for i in 0..100u32 {
        let mut packet = vec![0u8; 1000];
        packet[..4].copy_from_slice(&i.to_be_bytes());
        d_tx.send(&Relay::Packet(RelayPacket { peer: c.id, packet }))
            .await
            .unwrap();
    }
    let accounted = anchorage_sim::eventually(STEP, || async {
        let m = anchor.scrape().await;
        let relayed = m.value("anchorage_relay_packets_total", &[]).unwrap_or(0.0) - relayed_before;
        let rate = m
            .value("anchorage_relay_dropped_total", &[("reason", "rate")])
            .unwrap_or(0.0)
            - rate_before;
        (relayed + rate >= 100.0).then_some((relayed, rate))
    })
    .await
    .expect("every packet is relayed or dropped");
    let (relayed, dropped) = accounted;
    assert_eq!(relayed + dropped, 100.0);
    assert!(dropped >= 1.0, "the excess is dropped: {accounted:?}");
    assert!(relayed >= 4.0, "the burst passes: {accounted:?}");
    let got = receive(&mut c_rx, relayed as usize).await;
    assert!(got.iter().all(|p| p.peer == d.id && p.packet.len() == 1000));
    assert!(
        tokio::time::timeout(QUIET, c_rx.recv()).await.is_err(),
        "nothing more than what the anchor counted as relayed arrives (the printer's neither)"
    );
    let m = anchor.scrape().await;
    assert!(m.value("anchorage_relay_bytes_total", &[]) >= Some(4000.0));
    anchor.running.shutdown().await;
}

#[tokio::test]
async fn bad_mesh_input_costs_only_the_sender() {
    let anchor = Anchor::start().await;
    let display = anchor.pair("display", &[("role", "display")], 2).await;
    let camera = anchor.pair("camera", &[("role", "camera")], 3).await;
    let rogue = anchor.pair("rogue", &[("role", "display")], 5).await;
    anchor.set_policy(1, DISPLAYS_SEE_CAMERAS);
    let mut d = Node::connect(&anchor, &display, 2).await;
    let mut c = Node::connect(&anchor, &camera, 3).await;
    d.directory().await;
    c.directory().await;

    // A relay stream that does not start with Hello is reset; the connection goes on, and a
    // second extra stream is refused too (one per connection).
    let mut r = Node::connect(&anchor, &rogue, 5).await;
    r.directory().await;
    let (send, recv) = r.conn.open_bi().await.unwrap();
    let (mut tx, mut rx) = framed::framed::<Relay, Relay>(send, recv);
    tx.send(&Relay::Packet(RelayPacket {
        peer: c.id,
        packet: vec![0; 10],
    }))
    .await
    .unwrap();
    let refused = tokio::time::timeout(STEP, rx.recv()).await.unwrap();
    assert!(refused.is_err(), "reset: {refused:?}");
    let (_tx2, mut rx2) = r.relay().await;
    assert!(
        tokio::time::timeout(STEP, rx2.recv())
            .await
            .unwrap()
            .is_err()
    );
    r.rendezvous(c.id).await;
    assert!(matches!(r.next().await, ControlDown::Punch(_)));
    c.punch().await;
    assert!(r.conn.close_reason().is_none(), "the connection goes on");

    // An oversized candidate list is a bad frame: it ends the rogue's session only.
    r.send(ControlUp::Candidates(Candidates {
        addrs: (0..64).map(|i| format!("10.0.0.{i}:1")).collect(),
    }))
    .await;
    let err = tokio::time::timeout(STEP, r.conn.closed()).await.unwrap();
    assert_eq!(
        anchorage_mesh::framed::close_code(&err),
        Some(ErrorCode::BadFrame.as_u32()),
        "{err}"
    );

    // The others are served as before.
    d.rendezvous(c.id).await;
    assert_eq!(d.punch().await.peer, c.id);
    assert_eq!(c.punch().await.peer, d.id);
    let (_d_tx, _d_rx) = d.relay().await;
    assert!(d.conn.close_reason().is_none() && c.conn.close_reason().is_none());
    anchor.running.shutdown().await;
}

#[tokio::test]
async fn operators_see_the_links_the_nodes_report() {
    let anchor = Anchor::start().await;
    let display = anchor.pair("display", &[("role", "display")], 2).await;
    let camera = anchor.pair("camera", &[("role", "camera")], 3).await;
    anchor.set_policy(1, DISPLAYS_SEE_CAMERAS);
    let mut d = Node::connect(&anchor, &display, 2).await;
    let mut c = Node::connect(&anchor, &camera, 3).await;
    assert!(anchor.client.mesh().await.unwrap().links.is_empty());

    let since_ms = 1_700_000_000_000;
    d.send(ControlUp::Paths(PathReport {
        paths: vec![PeerPath {
            peer: c.id,
            path: PathKind::Relayed,
            addr: None,
            rtt_us: Some(9000),
            since_ms,
        }],
    }))
    .await;
    c.send(ControlUp::Paths(PathReport {
        paths: vec![PeerPath {
            peer: d.id,
            path: PathKind::Direct,
            addr: Some("127.0.0.2:40000".into()),
            rtt_us: Some(2500),
            since_ms: since_ms + 1000,
        }],
    }))
    .await;
    let links = anchorage_sim::eventually(STEP, || async {
        let links = anchor.client.mesh().await.unwrap().links;
        (links.len() == 1 && links[0].path == "direct").then_some(links)
    })
    .await
    .expect("the pair shows up merged from both reports");
    let link = &links[0];
    let mut ids = [d.id, c.id];
    ids.sort();
    assert_eq!((link.a, link.b), (ids[0], ids[1]));
    let names = [link.a_name.as_str(), link.b_name.as_str()];
    assert!(
        names.contains(&"raw"),
        "names as the nodes registered: {names:?}"
    );
    assert_eq!(link.addr.as_deref(), Some("127.0.0.2:40000"));
    assert_eq!(link.rtt_ms, Some(2.5));
    assert_eq!(
        link.since.unix_timestamp(),
        i64::try_from((since_ms + 1000) / 1000).unwrap()
    );

    // The raw JSON is what docs/console.md shows.
    let token = anchor.running.anchor.owner_token().unwrap();
    let json: serde_json::Value = reqwest::Client::new()
        .get(format!("{}/console/v1/mesh", anchor.running.console_url()))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let entry = &json["links"][0];
    for key in [
        "a", "a_name", "b", "b_name", "path", "addr", "rtt_ms", "since",
    ] {
        assert!(entry.get(key).is_some(), "{key} missing in {json}");
    }
    let no_token = reqwest::Client::new()
        .get(format!("{}/console/v1/mesh", anchor.running.console_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(no_token.status(), 401);

    // The device's inventory entry lists its links.
    let entry = anchor.client.inventory_device(&d.id).await.unwrap();
    assert_eq!(entry.peers, links);

    // `anchorctl mesh` shows the pair.
    let mut out = Vec::new();
    let url = anchor.running.console_url();
    let cli = anchorage_console::cli::parse_from([
        "anchorctl",
        "--url",
        url.as_str(),
        "--token",
        token.as_str(),
        "mesh",
    ])
    .unwrap();
    anchorage_console::cli::run(cli, &mut out, std::future::pending())
        .await
        .unwrap();
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("A "), "{text}");
    assert!(
        text.contains("direct") && text.contains("127.0.0.2:40000"),
        "{text}"
    );

    // A session that ends takes its report with it; the other side's remains.
    c.conn.close(0u32.into(), b"bye");
    let links = anchorage_sim::eventually(STEP, || async {
        let links = anchor.client.mesh().await.unwrap().links;
        (links.len() == 1 && links[0].path == "relayed").then_some(links)
    })
    .await
    .expect("only the display's report is left");
    assert_eq!(links[0].rtt_ms, Some(9.0));
    let _ = d.next_within(QUIET).await;
    anchor.running.shutdown().await;
}
