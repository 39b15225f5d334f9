//! The mesh socket over netsim: QUIC between two nodes, direct through NATs that allow it,
//! relayed when none does, moving between the two without failing a stream, and deaf to
//! strangers. The test plays the anchor: it observes each node's public address, introduces
//! the two with one token, and forwards their relayed packets.
//!
//! Every test has a fixed seed, printed in its failure messages.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anchorage_netsim::{Host, LinkConfig, NatConfig, Network, SimSocket};
use anchorage_node::mesh::{MeshSocket, PATH_TIMEOUT};
use anchorage_wire::DeviceId;
use anchorage_wire::peer::{PROBE_MAGIC, PathKind, Ping, Pong, Probe, RelayPacket};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, EndpointConfig, ServerConfig, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::sync::mpsc;
use tokio::time::{sleep, timeout};

/// Every scenario must finish within this much simulated time.
const SCENARIO_LIMIT: Duration = Duration::from_secs(600);
const LATENCY: Duration = Duration::from_millis(10);
/// One way through the (test's) anchor.
const RELAY_LATENCY: Duration = Duration::from_millis(30);
const ANCHOR_PORT: u16 = 7444;
const SERVER_NAME: &str = "peer.test";
const TOKEN: [u8; 16] = *b"pair-token-01234";

/// One node: its real socket, the mesh socket over it and a quinn endpoint on that.
struct Node {
    id: DeviceId,
    inner: Arc<SimSocket>,
    mesh: Arc<MeshSocket>,
    endpoint: Endpoint,
    /// Its address as the anchor sees it.
    public: SocketAddr,
}

fn network(seed: u64) -> Network {
    let net = Network::new(seed);
    net.set_default_link(LinkConfig {
        latency: LATENCY,
        ..LinkConfig::default()
    })
    .expect("valid link");
    net
}

fn id(n: u8) -> DeviceId {
    DeviceId::from_bytes([n; 20])
}

/// A node on `host`, introduced to the anchor (which learns its public address).
async fn node(host: &Host, n: u8, anchor: &SimSocket, seed: u64) -> Node {
    let inner = host.bind(0).expect("bind");
    let mesh = MeshSocket::new(inner.clone(), id(n));
    mesh.start();
    let mut config = EndpointConfig::default();
    let mut rng = [n; 32];
    rng[..8].copy_from_slice(&seed.to_le_bytes());
    config.rng_seed(Some(rng));
    let mut endpoint = Endpoint::new_with_abstract_socket(
        config,
        Some(server_config()),
        mesh.clone(),
        Arc::new(quinn::TokioRuntime),
    )
    .expect("endpoint");
    endpoint.set_default_client_config(client_config());
    inner
        .send_to(b"hello anchor", anchor.addr())
        .expect("send to anchor");
    let mut buf = [0u8; 64];
    let (_, public) = timeout(Duration::from_secs(1), anchor.recv_from(&mut buf))
        .await
        .expect("the anchor hears the node")
        .expect("recv");
    Node {
        id: id(n),
        inner,
        mesh,
        endpoint,
        public,
    }
}

/// What the anchor does for a pair: both are told of each other at once, with one token,
/// and each one's relayed packets are forwarded to the other.
fn introduce(a: &Node, b: &Node) {
    wire_relay(a, b);
    wire_relay(b, a);
    a.mesh
        .set_candidates(b.id, vec![b.public, b.inner.addr()], TOKEN);
    b.mesh
        .set_candidates(a.id, vec![a.public, a.inner.addr()], TOKEN);
}

fn wire_relay(from: &Node, to: &Node) {
    let (tx, mut rx) = mpsc::channel::<RelayPacket>(256);
    from.mesh.set_relay(Some(tx));
    let (source, dest, target) = (from.id, to.id, Arc::downgrade(&to.mesh));
    tokio::spawn(async move {
        while let Some(p) = rx.recv().await {
            if p.peer != dest {
                continue;
            }
            let target = target.clone();
            tokio::spawn(async move {
                sleep(RELAY_LATENCY).await;
                if let Some(t) = target.upgrade() {
                    t.relay_received(source, p.packet);
                }
            });
        }
    });
}

/// `a` dials `b` at the made-up address `a` has for it; returns (a's side, b's side).
async fn connect(a: &Node, b: &Node) -> (Connection, Connection) {
    let dial = a
        .endpoint
        .connect(a.mesh.peer_addr(b.id), SERVER_NAME)
        .expect("start connecting");
    let accept = async {
        let incoming = b.endpoint.accept().await.expect("endpoint open");
        incoming.await.expect("server handshake")
    };
    let (client, server) = tokio::join!(dial, accept);
    (client.expect("client handshake"), server)
}

/// Waits up to `within` (simulated) for `mesh`'s path to `peer` to be `kind`.
async fn path_becomes(mesh: &MeshSocket, peer: DeviceId, kind: PathKind, within: Duration) -> bool {
    let mut changes = mesh.path_changes();
    timeout(within, async {
        while mesh.path(peer).kind != kind {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    })
    .await
    .is_ok()
}

/// Sends `request` on a bidirectional stream; the other side answers it reversed.
async fn echo(client: &Connection, server: &Connection, request: &[u8]) -> Vec<u8> {
    let ask = async {
        let (mut send, mut recv) = client.open_bi().await.expect("open");
        send.write_all(request).await.expect("write");
        send.finish().expect("finish");
        recv.read_to_end(1 << 24).await.expect("read answer")
    };
    let answer = async {
        let (mut send, mut recv) = server.accept_bi().await.expect("accept");
        let mut body = recv.read_to_end(1 << 24).await.expect("read request");
        body.reverse();
        send.write_all(&body).await.expect("write answer");
        send.finish().expect("finish");
        let _ = send.stopped().await;
    };
    tokio::join!(ask, answer).0
}

fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 56) as u8
        })
        .collect()
}

/// Two nodes, one behind each NAT (`None`: on the public network), and an anchor.
async fn pair(seed: u64, nats: [Option<NatConfig>; 2]) -> (Network, Host, Node, Node) {
    let net = network(seed);
    let anchor_host = net.add_host("anchor");
    let anchor = anchor_host.bind(ANCHOR_PORT).expect("bind anchor");
    let mut nodes = Vec::new();
    for (i, nat) in nats.into_iter().enumerate() {
        let n = u8::try_from(i + 1).expect("two nodes");
        let host = match nat {
            Some(config) => net.add_nat(&format!("nat{n}"), config).add_host("node"),
            None => net.add_host(&format!("node{n}")),
        };
        nodes.push(node(&host, n, &anchor, seed).await);
    }
    let b = nodes.pop().expect("two nodes");
    let a = nodes.pop().expect("two nodes");
    (net, anchor_host, a, b)
}

#[tokio::test(start_paused = true)]
async fn same_network_goes_direct_and_echoes() {
    let seed = 11;
    timeout(SCENARIO_LIMIT, async {
        let (_net, _anchor, a, b) = pair(seed, [None, None]).await;
        introduce(&a, &b);
        let (client, server) = connect(&a, &b).await;
        assert_eq!(
            server.remote_address(),
            b.mesh.peer_addr(a.id),
            "seed {seed}"
        );
        for (x, y) in [(&a, &b), (&b, &a)] {
            assert!(
                path_becomes(&x.mesh, y.id, PathKind::Direct, Duration::from_secs(2)).await,
                "seed {seed}: {:?}",
                x.mesh.path(y.id)
            );
        }
        let path = a.mesh.path(b.id);
        assert_eq!(path.addr, Some(b.inner.addr()), "seed {seed}");
        assert!(
            path.rtt.is_some_and(|r| r >= 2 * LATENCY),
            "seed {seed}: {path:?}"
        );
        let data = pattern(200_000, seed);
        let mut reversed = data.clone();
        reversed.reverse();
        assert!(
            echo(&client, &server, &data).await == reversed,
            "seed {seed}: echo"
        );
        let stats = a.mesh.stats();
        assert!(stats.sent_direct_bytes > 200_000, "seed {seed}: {stats:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}

#[tokio::test(start_paused = true)]
async fn punchable_nats_go_direct() {
    let seed = 12;
    let cases = [
        (
            "port-restricted × full cone",
            NatConfig::port_restricted_cone(),
            NatConfig::full_cone(),
        ),
        (
            "restricted × restricted",
            NatConfig::restricted_cone(),
            NatConfig::restricted_cone(),
        ),
        (
            "port-restricted × port-restricted",
            NatConfig::port_restricted_cone(),
            NatConfig::port_restricted_cone(),
        ),
    ];
    for (name, x, y) in cases {
        timeout(SCENARIO_LIMIT, async {
            let (net, _anchor, a, b) = pair(seed, [Some(x), Some(y)]).await;
            introduce(&a, &b);
            let (client, server) = connect(&a, &b).await;
            for (p, q) in [(&a, &b), (&b, &a)] {
                assert!(
                    path_becomes(&p.mesh, q.id, PathKind::Direct, Duration::from_secs(3)).await,
                    "seed {seed} {name}: {:?} {}",
                    p.mesh.path(q.id),
                    net.nat_counters()
                );
            }
            assert_eq!(a.mesh.path(b.id).addr, Some(b.public), "seed {seed} {name}");
            assert_eq!(
                echo(&client, &server, b"ping").await,
                b"gnip",
                "seed {seed} {name}"
            );
        })
        .await
        .unwrap_or_else(|_| panic!("seed {seed} {name}: scenario hung"));
    }
}

#[tokio::test(start_paused = true)]
async fn symmetric_nats_on_both_sides_relay() {
    let seed = 13;
    timeout(SCENARIO_LIMIT, async {
        let (_net, _anchor, a, b) = pair(
            seed,
            [Some(NatConfig::symmetric()), Some(NatConfig::symmetric())],
        )
        .await;
        introduce(&a, &b);
        let (client, server) = connect(&a, &b).await;
        let data = pattern(100_000, seed);
        let mut reversed = data.clone();
        reversed.reverse();
        assert!(
            echo(&client, &server, &data).await == reversed,
            "seed {seed}: echo"
        );
        // Long after every punch round of the burst and some of the background ones.
        sleep(Duration::from_secs(20)).await;
        for (p, q) in [(&a, &b), (&b, &a)] {
            assert_eq!(p.mesh.path(q.id).kind, PathKind::Relayed, "seed {seed}");
        }
        let stats = a.mesh.stats();
        assert!(stats.sent_relayed_bytes > 100_000, "seed {seed}: {stats:?}");
        assert!(stats.received_relayed > 0, "seed {seed}: {stats:?}");
        assert_eq!(stats.sent_direct, 0, "seed {seed}: {stats:?}");
        assert!(
            stats.probes_sent > 10,
            "seed {seed}: still punching: {stats:?}"
        );
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}

#[tokio::test(start_paused = true)]
async fn a_transfer_survives_moving_from_relay_to_direct_and_back() {
    let seed = 14;
    timeout(SCENARIO_LIMIT, async {
        let (net, _anchor, a, b) = pair(seed, [None, None]).await;
        let (ha, hb) = (a.inner.host(), b.inner.host());
        net.partition(&[ha], &[hb]);
        introduce(&a, &b);
        let (client, server) = connect(&a, &b).await;
        assert_eq!(a.mesh.path(b.id).kind, PathKind::Relayed, "seed {seed}");

        const CHUNK: usize = 16 * 1024;
        const CHUNKS: usize = 150; // one every 200 ms: 30 s of transfer
        let data = pattern(CHUNK * CHUNKS, seed);
        let received = AtomicUsize::new(0);
        let send = async {
            let mut stream = client.open_uni().await.expect("open");
            for chunk in data.chunks(CHUNK) {
                stream.write_all(chunk).await.expect("write");
                sleep(Duration::from_millis(200)).await;
            }
            stream.finish().expect("finish");
            let _ = stream.stopped().await;
        };
        let recv = async {
            let mut stream = server.accept_uni().await.expect("accept");
            let mut got = Vec::new();
            let mut buf = vec![0u8; 64 * 1024];
            while let Some(n) = stream.read(&mut buf).await.expect("read") {
                got.extend_from_slice(&buf[..n]);
                received.store(got.len(), Ordering::Relaxed);
            }
            got
        };
        let control = async {
            sleep(Duration::from_secs(3)).await;
            net.heal();
            assert!(
                path_becomes(&a.mesh, b.id, PathKind::Direct, Duration::from_secs(6)).await,
                "seed {seed}: not direct after heal: {:?}",
                a.mesh.path(b.id)
            );
            let direct_at = received.load(Ordering::Relaxed);
            sleep(Duration::from_secs(3)).await;
            net.partition(&[ha], &[hb]);
            assert!(
                path_becomes(&a.mesh, b.id, PathKind::Relayed, PATH_TIMEOUT + Duration::from_secs(2))
                    .await,
                "seed {seed}: still {:?} after the partition",
                a.mesh.path(b.id)
            );
            let relayed_at = received.load(Ordering::Relaxed);
            (direct_at, relayed_at)
        };
        let ((), got, (direct_at, relayed_at)) = tokio::join!(send, recv, control);
        let total = data.len();
        assert!(
            0 < direct_at && direct_at < relayed_at && relayed_at < total,
            "seed {seed}: the transfer was in flight at both switches: {direct_at} {relayed_at} {total}"
        );
        assert!(got == data, "seed {seed}: the transfer arrived intact");
        let stats = a.mesh.stats();
        assert!(
            stats.sent_direct_bytes > 0 && stats.sent_relayed_bytes > 0,
            "seed {seed}: {stats:?}"
        );
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}

#[tokio::test(start_paused = true)]
async fn strangers_wrong_tokens_and_garbage_are_ignored() {
    let seed = 15;
    timeout(SCENARIO_LIMIT, async {
        let net = network(seed);
        let anchor_host = net.add_host("anchor");
        let anchor = anchor_host.bind(ANCHOR_PORT).expect("bind anchor");
        let a = node(&net.add_host("a"), 1, &anchor, seed).await;
        let b = node(&net.add_host("b"), 2, &anchor, seed).await;
        let stranger = net.add_host("stranger").bind(0).expect("bind");
        // A knows B; B has not been told of A, so it ignores A's pings.
        a.mesh.set_candidates(b.id, vec![b.public], TOKEN);
        let to_a = a.public;
        let ping = |from, token| {
            Probe::Ping(Ping {
                from,
                token,
                tx: [7; 12],
            })
            .encode()
        };
        let garbage: Vec<Vec<u8>> = vec![
            ping(id(9), TOKEN),  // a stranger's id
            ping(b.id, [0; 16]), // B's id, wrong token
            ping(a.id, TOKEN),   // A's own id
            Probe::Pong(Pong {
                from: b.id,
                token: TOKEN,
                tx: [1; 12],
                observed: to_a,
            })
            .encode(), // a pong nobody asked for
            PROBE_MAGIC.to_vec(), // magic and nothing
            [&PROBE_MAGIC[..], &[0xff; 200]].concat(), // magic and junk
            Vec::new(),
            vec![0],
            vec![0xc3; 1400], // looks like QUIC, is not
        ];
        for datagram in &garbage {
            stranger.send_to(datagram, to_a).expect("send");
        }
        sleep(Duration::from_secs(3)).await;
        let mut buf = [0u8; 2048];
        let answer = timeout(Duration::from_secs(1), stranger.recv_from(&mut buf)).await;
        assert!(answer.is_err(), "seed {seed}: a stranger got an answer");
        assert_eq!(a.mesh.path(b.id).kind, PathKind::None, "seed {seed}");
        let stats = a.mesh.stats();
        assert_eq!(stats.probes_received, 0, "seed {seed}: {stats:?}");
        assert!(stats.probes_ignored >= 6, "seed {seed}: {stats:?}");
        assert!(
            b.mesh.stats().probes_ignored > 0,
            "seed {seed}: B ignored A's pings"
        );

        // Nothing broke: once both are introduced, they connect directly.
        introduce(&a, &b);
        let (client, server) = connect(&a, &b).await;
        assert!(
            path_becomes(&a.mesh, b.id, PathKind::Direct, Duration::from_secs(2)).await,
            "seed {seed}: {:?}",
            a.mesh.path(b.id)
        );
        assert_eq!(
            echo(&client, &server, b"still fine").await,
            b"enif llits",
            "seed {seed}"
        );
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}

#[tokio::test(start_paused = true)]
async fn without_a_working_path_packets_are_dropped_and_counted() {
    let seed = 16;
    timeout(SCENARIO_LIMIT, async {
        let (_net, _anchor, a, b) = pair(seed, [None, None]).await;
        // A relay that takes one packet and is never read, as an anchor stalled.
        let (tx, _stalled) = mpsc::channel::<RelayPacket>(1);
        a.mesh.set_relay(Some(tx));
        assert_eq!(
            a.mesh.path(b.id).kind,
            PathKind::None,
            "seed {seed}: unknown peer"
        );
        let dial = a
            .endpoint
            .connect(a.mesh.peer_addr(b.id), SERVER_NAME)
            .expect("start connecting");
        assert_eq!(a.mesh.path(b.id).kind, PathKind::Relayed, "seed {seed}");
        let dial = tokio::spawn(dial);
        sleep(Duration::from_secs(3)).await;
        let stats = a.mesh.stats();
        assert_eq!(stats.sent_relayed, 1, "seed {seed}: {stats:?}");
        assert!(stats.dropped_relay_full > 0, "seed {seed}: {stats:?}");
        a.mesh.set_relay(None);
        assert_eq!(a.mesh.path(b.id).kind, PathKind::None, "seed {seed}");
        sleep(Duration::from_secs(5)).await;
        let stats = a.mesh.stats();
        assert!(stats.dropped_no_path > 0, "seed {seed}: {stats:?}");
        assert_eq!(b.mesh.stats().received_relayed, 0, "seed {seed}");
        // The handshake never got through: quinn gives up on its own.
        let outcome = dial.await.expect("dial task");
        assert!(outcome.is_err(), "seed {seed}: connected without a path");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}

struct Tls {
    cert: CertificateDer<'static>,
    key: Vec<u8>,
}

/// A self-signed Ed25519 certificate (fixed-length signatures keep runs repeatable).
fn tls() -> &'static Tls {
    static TLS: OnceLock<Tls> = OnceLock::new();
    TLS.get_or_init(|| {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).expect("ed25519 key");
        let params =
            rcgen::CertificateParams::new(vec![SERVER_NAME.to_owned()]).expect("cert params");
        let cert = params.self_signed(&key).expect("self-signed cert");
        Tls {
            cert: cert.der().clone(),
            key: key.serialize_der(),
        }
    })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn transport() -> Arc<TransportConfig> {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        Duration::from_secs(30).try_into().expect("idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    Arc::new(t)
}

fn server_config() -> ServerConfig {
    let tls = tls();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.key.clone()));
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![tls.cert.clone()], key)
        .expect("server cert");
    crypto.alpn_protocols = vec![b"mesh-test".to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).expect("QUIC server crypto");
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(transport());
    // A peer's made-up address never changes: nothing to migrate to.
    config.migration(false);
    config
}

fn client_config() -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls().cert.clone()).expect("trust the test cert");
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"mesh-test".to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).expect("QUIC client crypto");
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(transport());
    config
}
