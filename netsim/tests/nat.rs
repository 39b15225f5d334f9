//! NAT boxes: mapping, filtering, timeouts, hairpinning, double NAT, firewalls, and QUIC hole
//! punching through them, on tokio's paused clock.
//!
//! Every test has a fixed seed, printed in its failure messages.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anchorage_netsim::{Host, LinkConfig, Nat, NatConfig, Network, SimSocket};
use common::{SERVER_NAME, client_config, round_trip, server_config};
use quinn::{ConnectionError, Endpoint, TransportConfig};
use tokio::time::{sleep, timeout};

/// Every scenario must finish within this much simulated time.
const SCENARIO_LIMIT: Duration = Duration::from_secs(3600);
/// One-way latency of every link but those between a NAT and its inside.
const LATENCY: Duration = Duration::from_millis(10);
/// Port of the rendezvous server (the anchor, in the mesh).
const RENDEZVOUS_PORT: u16 = 7444;

fn network(seed: u64) -> Network {
    let net = Network::new(seed);
    net.set_default_link(LinkConfig {
        latency: LATENCY,
        ..LinkConfig::default()
    })
    .expect("valid link");
    net
}

/// The next datagram `socket` receives within a second of simulated time.
async fn recv(socket: &SimSocket) -> Option<(Vec<u8>, SocketAddr)> {
    let mut buf = [0u8; 2048];
    match timeout(Duration::from_secs(1), socket.recv_from(&mut buf)).await {
        Ok(Ok((len, from))) => Some((buf[..len].to_vec(), from)),
        _ => None,
    }
}

/// Sends `msg` from `from` to `to`; returns the source address `to` saw, if it arrived.
async fn reaches(from: &SimSocket, to: &SimSocket, dest: SocketAddr) -> Option<SocketAddr> {
    from.send_to(b"ping", dest).expect("send");
    recv(to).await.map(|(data, src)| {
        assert_eq!(data, b"ping");
        src
    })
}

async fn bind(host: &Host, port: u16) -> Arc<SimSocket> {
    host.bind(port).expect("bind")
}

#[tokio::test(start_paused = true)]
async fn outside_sees_the_nat_public_address_and_cannot_reach_private_ones() {
    let seed = 1;
    let net = network(seed);
    let anchor = net.add_host("anchor");
    let nat = net.add_nat("home", NatConfig::default());
    let node = nat.add_host("node");
    assert!(
        node.ip().to_string().starts_with("192.168.1."),
        "seed {seed}: {}",
        node.ip()
    );
    let server = bind(&anchor, RENDEZVOUS_PORT).await;
    let client = bind(&node, 5000).await;
    let server_addr = server.addr();

    let seen = reaches(&client, &server, server_addr)
        .await
        .unwrap_or_else(|| panic!("seed {seed}: outbound lost"));
    assert_eq!(seen.ip(), nat.public_ip(), "seed {seed}");
    // The reply to the observed address is translated back.
    let back = reaches(&server, &client, seen).await;
    assert_eq!(back, Some(server_addr), "seed {seed}");
    // The private address means nothing outside.
    assert_eq!(
        reaches(&server, &client, client.addr()).await,
        None,
        "seed {seed}"
    );
    let counters = nat.counters();
    assert_eq!(
        (
            counters.outbound,
            counters.inbound,
            counters.mappings_created
        ),
        (1, 1, 1),
        "seed {seed}: {counters}"
    );
    assert_eq!(nat.mappings(), 1);
    assert_eq!(anchor.counters().tx.dropped.no_route, 1, "seed {seed}");
}

#[tokio::test(start_paused = true)]
async fn each_filtering_type_admits_what_it_promises() {
    let seed = 2;
    // (config, from the port sent to, from another port of that host, from another host)
    let cases = [
        ("full cone", NatConfig::full_cone(), [true, true, true]),
        (
            "restricted",
            NatConfig::restricted_cone(),
            [true, true, false],
        ),
        (
            "port-restricted",
            NatConfig::port_restricted_cone(),
            [true, false, false],
        ),
    ];
    for (name, config, expect) in cases {
        let net = network(seed);
        let server_host = net.add_host("server");
        let stranger_host = net.add_host("stranger");
        let nat = net.add_nat(name, config);
        let node = nat.add_host("node");
        let server = bind(&server_host, RENDEZVOUS_PORT).await;
        let other_port = bind(&server_host, 9000).await;
        let stranger = bind(&stranger_host, RENDEZVOUS_PORT).await;
        let client = bind(&node, 5000).await;

        // Before the node sent anything there is no mapping to reach.
        let public = SocketAddr::new(nat.public_ip(), 5000);
        assert_eq!(reaches(&stranger, &client, public).await, None);

        let mapped = reaches(&client, &server, server.addr())
            .await
            .unwrap_or_else(|| panic!("seed {seed} {name}: outbound lost"));
        let mut got = [false; 3];
        for (i, from) in [&server, &other_port, &stranger].into_iter().enumerate() {
            got[i] = reaches(from, &client, mapped).await.is_some();
        }
        assert_eq!(got, expect, "seed {seed} {name}: {}", nat.counters());
        let drops = nat.counters().dropped;
        let refused = expect.iter().filter(|ok| !**ok).count() as u64;
        assert_eq!(drops.filtered, refused, "seed {seed} {name}");
    }
}

#[tokio::test(start_paused = true)]
async fn symmetric_mapping_hides_the_port_a_rendezvous_server_saw() {
    let seed = 3;
    for (config, independent) in [
        (NatConfig::port_restricted_cone(), true),
        (NatConfig::symmetric(), false),
    ] {
        let net = network(seed);
        let rendezvous_host = net.add_host("rendezvous");
        let peer_host = net.add_host("peer");
        let nat = net.add_nat("nat", config.clone());
        let node = nat.add_host("node");
        let rendezvous = bind(&rendezvous_host, RENDEZVOUS_PORT).await;
        let peer = bind(&peer_host, 6000).await;
        let client = bind(&node, 5000).await;

        let seen_by_rendezvous = reaches(&client, &rendezvous, rendezvous.addr())
            .await
            .expect("to rendezvous");
        let seen_by_peer = reaches(&client, &peer, peer.addr()).await.expect("to peer");
        assert_eq!(
            seen_by_rendezvous == seen_by_peer,
            independent,
            "seed {seed} {:?}: {seen_by_rendezvous} vs {seen_by_peer}",
            config.mapping
        );
        // The peer learns the node's address from the rendezvous server and sends there;
        // the node has sent to the peer, so a cone NAT lets it in, a symmetric one does not.
        let arrived = reaches(&peer, &client, seen_by_rendezvous).await;
        assert_eq!(arrived.is_some(), independent, "seed {seed}");
    }
}

#[tokio::test(start_paused = true)]
async fn idle_mappings_expire_and_outbound_keepalives_hold_them() {
    let seed = 4;
    let net = network(seed);
    let server_host = net.add_host("server");
    let nat = net.add_nat("home", NatConfig::default());
    assert_eq!(nat.config().mapping_timeout, Duration::from_secs(30));
    let node = nat.add_host("node");
    let server = bind(&server_host, RENDEZVOUS_PORT).await;
    let client = bind(&node, 5000).await;

    let mapped = reaches(&client, &server, server.addr())
        .await
        .expect("outbound");
    // The server sends every 10 s: inbound traffic does not refresh the mapping.
    sleep(Duration::from_secs(10)).await;
    assert!(reaches(&server, &client, mapped).await.is_some());
    sleep(Duration::from_secs(20)).await;
    assert_eq!(
        reaches(&server, &client, mapped).await,
        None,
        "seed {seed}: mapping outlived 30 s idle"
    );
    assert_eq!(nat.counters().dropped.unmapped, 1, "seed {seed}");
    assert_eq!(nat.mappings(), 0);

    // A keep-alive from the inside every 20 s holds a new mapping for two minutes.
    let mapped = reaches(&client, &server, server.addr())
        .await
        .expect("outbound");
    for _ in 0..6 {
        sleep(Duration::from_secs(20)).await;
        assert_eq!(reaches(&client, &server, server.addr()).await, Some(mapped));
    }
    assert!(
        reaches(&server, &client, mapped).await.is_some(),
        "seed {seed}: kept-alive mapping expired"
    );
    assert_eq!(nat.counters().mappings_created, 2, "seed {seed}");
}

#[tokio::test(start_paused = true)]
async fn hairpinning_on_reaches_a_neighbour_through_its_mapping_off_drops() {
    let seed = 5;
    for hairpinning in [true, false] {
        let net = network(seed);
        let server_host = net.add_host("server");
        let nat = net.add_nat(
            "home",
            NatConfig {
                hairpinning,
                ..NatConfig::full_cone()
            },
        );
        let a = bind(&nat.add_host("a"), 5000).await;
        let b = bind(&nat.add_host("b"), 5000).await;
        let server = bind(&server_host, RENDEZVOUS_PORT).await;
        let a_public = reaches(&a, &server, server.addr()).await.expect("a out");
        let b_public = reaches(&b, &server, server.addr()).await.expect("b out");

        let seen = reaches(&a, &b, b_public).await;
        if hairpinning {
            // b sees a's public mapping, not its private address.
            assert_eq!(seen, Some(a_public), "seed {seed}");
            assert_eq!(nat.counters().hairpinned, 1, "seed {seed}");
        } else {
            assert_eq!(seen, None, "seed {seed}");
            assert_eq!(nat.counters().dropped.hairpin, 1, "seed {seed}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn behind_a_carrier_grade_nat_the_outside_sees_the_outer_address() {
    let seed = 6;
    let net = network(seed);
    let server_host = net.add_host("server");
    let carrier = net.add_nat("carrier", NatConfig::carrier_grade());
    let home = carrier.add_nat("home", NatConfig::default());
    let node = home.add_host("node");
    assert_ne!(home.public_ip(), carrier.public_ip());
    let server = bind(&server_host, RENDEZVOUS_PORT).await;
    let client = bind(&node, 5000).await;

    let seen = reaches(&client, &server, server.addr())
        .await
        .unwrap_or_else(|| panic!("seed {seed}: outbound lost"));
    assert_eq!(seen.ip(), carrier.public_ip(), "seed {seed}");
    assert_eq!(
        reaches(&server, &client, seen).await,
        Some(server.addr()),
        "seed {seed}"
    );
    // The home router's public address is private to the carrier.
    let inner = SocketAddr::new(home.public_ip(), seen.port());
    assert_eq!(reaches(&server, &client, inner).await, None, "seed {seed}");
    for nat in [&carrier, &home] {
        let c = nat.counters();
        assert_eq!((c.outbound, c.inbound), (1, 1), "seed {seed}: {c}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_firewall_lets_udp_through_to_the_anchor_only() {
    let seed = 7;
    let net = network(seed);
    let anchor_host = net.add_host("anchor");
    let peer_host = net.add_host("peer");
    let firewall = net.add_nat("office", NatConfig::firewall(anchor_host.ip()));
    let node = firewall.add_host("node");
    let anchor = bind(&anchor_host, RENDEZVOUS_PORT).await;
    let peer = bind(&peer_host, 6000).await;
    let client = bind(&node, 5000).await;

    let mapped = reaches(&client, &anchor, anchor.addr())
        .await
        .expect("the anchor is reachable");
    assert!(reaches(&anchor, &client, mapped).await.is_some());
    assert_eq!(reaches(&client, &peer, peer.addr()).await, None);
    assert_eq!(reaches(&peer, &client, mapped).await, None);
    assert_eq!(
        firewall.counters().dropped.not_allowed,
        2,
        "seed {seed}: {}",
        firewall.counters()
    );
}

#[tokio::test(start_paused = true)]
async fn hole_punching_matrix_over_raw_udp() {
    let seed = 8;
    let types = [
        ("full cone", NatConfig::full_cone()),
        ("restricted", NatConfig::restricted_cone()),
        ("port-restricted", NatConfig::port_restricted_cone()),
        ("symmetric", NatConfig::symmetric()),
    ];
    let mut failures = Vec::new();
    for (i, (name_a, a)) in types.iter().enumerate() {
        for (name_b, b) in &types[i..] {
            let punched = punch(seed, a.clone(), b.clone()).await;
            let expected = !matches!(
                (*name_a, *name_b),
                ("port-restricted", "symmetric") | ("symmetric", "symmetric")
            );
            if punched != expected {
                failures.push(format!("{name_a} x {name_b}: punched {punched}"));
            }
        }
    }
    assert!(failures.is_empty(), "seed {seed}: {failures:?}");
}

/// Both sides learn each other's address from a rendezvous server, then send to it every
/// 50 ms for a second, switching to wherever the other's datagrams come from (as QUIC answers
/// the source of a packet). True if each heard the other.
async fn punch(seed: u64, a: NatConfig, b: NatConfig) -> bool {
    let net = network(seed);
    let rendezvous = bind(&net.add_host("rendezvous"), RENDEZVOUS_PORT).await;
    let nat_a = net.add_nat("a", a);
    let nat_b = net.add_nat("b", b);
    let sock_a = bind(&nat_a.add_host("a"), 5000).await;
    let sock_b = bind(&nat_b.add_host("b"), 5000).await;
    // Where b sends to reach a, and where a sends to reach b.
    let mut target_a = reaches(&sock_a, &rendezvous, rendezvous.addr())
        .await
        .expect("a to rendezvous");
    let mut target_b = reaches(&sock_b, &rendezvous, rendezvous.addr())
        .await
        .expect("b to rendezvous");
    let (mut heard_a, mut heard_b) = (false, false);
    for _ in 0..20 {
        sock_a.send_to(b"punch", target_b).expect("send");
        sock_b.send_to(b"punch", target_a).expect("send");
        sleep(Duration::from_millis(50)).await;
        let mut buf = [0u8; 64];
        while let Ok(Ok((_, from))) =
            timeout(Duration::from_millis(1), sock_a.recv_from(&mut buf)).await
        {
            heard_a = true;
            target_b = from;
        }
        while let Ok(Ok((_, from))) =
            timeout(Duration::from_millis(1), sock_b.recv_from(&mut buf)).await
        {
            heard_b = true;
            target_a = from;
        }
    }
    heard_a && heard_b
}

/// A node of the hole-punching tests: a quinn endpoint that is both client and server, on a
/// socket the test can also send raw datagrams from.
struct Peer {
    nat: Nat,
    socket: Arc<SimSocket>,
    endpoint: Endpoint,
}

impl Peer {
    fn new(net: &Network, name: &str, config: NatConfig) -> Self {
        let nat = net.add_nat(name, config);
        let host = nat.add_host(name);
        let socket = host.bind(5000).expect("bind");
        let mut endpoint = Endpoint::new_with_abstract_socket(
            quinn::EndpointConfig::default(),
            Some(server_config(keepalive())),
            socket.clone(),
            Arc::new(quinn::TokioRuntime),
        )
        .expect("endpoint");
        endpoint.set_default_client_config(client_config(keepalive()));
        Self {
            nat,
            socket,
            endpoint,
        }
    }

    /// Connects to the rendezvous server, which answers with the address it sees; the
    /// connection stays open (its keep-alives hold the mapping).
    async fn observed_address(&self, rendezvous: SocketAddr) -> (quinn::Connection, SocketAddr) {
        let conn = self
            .endpoint
            .connect(rendezvous, SERVER_NAME)
            .expect("connect")
            .await
            .expect("rendezvous handshake");
        let mut stream = conn.accept_uni().await.expect("address stream");
        let text = stream.read_to_end(64).await.expect("address");
        let addr = String::from_utf8(text)
            .expect("utf-8")
            .parse()
            .expect("address");
        (conn, addr)
    }
}

/// Idle timeout 10 s (so a failed dial gives up soon), keep-alive every 5 s.
fn keepalive() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(Duration::from_secs(10).try_into().expect("valid")));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t
}

/// A rendezvous server that tells each client the address it sees it at.
fn rendezvous(net: &Network) -> (Endpoint, SocketAddr) {
    let host = net.add_host("rendezvous");
    let endpoint = host
        .endpoint(RENDEZVOUS_PORT, Some(server_config(keepalive())))
        .expect("rendezvous endpoint");
    let server = endpoint.clone();
    tokio::spawn(async move {
        while let Some(incoming) = server.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok(mut stream) = conn.open_uni().await else {
                    return;
                };
                let observed = conn.remote_address().to_string();
                let _ = stream.write_all(observed.as_bytes()).await;
                let _ = stream.finish();
                conn.closed().await;
            });
        }
    });
    (endpoint, SocketAddr::new(host.ip(), RENDEZVOUS_PORT))
}

/// What the mesh will do: the listener sends a few datagrams to the dialer's public address
/// first, opening its own NAT to it (they die at the dialer's NAT, or quinn ignores them),
/// then the dialer's QUIC Initial passes both NATs.
async fn punch_then_dial(
    listener: &Peer,
    dialer: &Peer,
    listener_public: SocketAddr,
    dialer_public: SocketAddr,
) -> Result<(quinn::Connection, quinn::Connection), ConnectionError> {
    for _ in 0..3 {
        // One zero byte: not a QUIC packet (the fixed bit is clear), so a receiver drops it.
        listener.socket.send_to(&[0], dialer_public).expect("punch");
        sleep(Duration::from_millis(5)).await;
    }
    dial(listener, dialer, listener_public).await
}

async fn dial(
    listener: &Peer,
    dialer: &Peer,
    listener_public: SocketAddr,
) -> Result<(quinn::Connection, quinn::Connection), ConnectionError> {
    let connecting = dialer
        .endpoint
        .connect(listener_public, SERVER_NAME)
        .expect("start dialing");
    // The listener's handshake only advances once its `Incoming` is accepted.
    let endpoint = listener.endpoint.clone();
    let accepting = tokio::spawn(async move {
        let incoming = endpoint.accept().await.expect("endpoint open");
        incoming.await.expect("listener handshake")
    });
    match connecting.await {
        Ok(client) => {
            let server = timeout(Duration::from_secs(5), accepting)
                .await
                .expect("the listener accepts what the dialer completed")
                .expect("accept task");
            Ok((client, server))
        }
        Err(error) => {
            accepting.abort();
            Err(error)
        }
    }
}

#[tokio::test(start_paused = true)]
async fn quic_hole_punch_through_two_cone_nats_needs_the_listener_to_punch_first() {
    let seed = 9;
    let net = network(seed);
    let (_rendezvous, rendezvous_addr) = rendezvous(&net);
    let a = Peer::new(&net, "a", NatConfig::port_restricted_cone());
    let b = Peer::new(&net, "b", NatConfig::port_restricted_cone());
    timeout(SCENARIO_LIMIT, async {
        let (_ra, a_public) = a.observed_address(rendezvous_addr).await;
        let (_rb, b_public) = b.observed_address(rendezvous_addr).await;
        assert_eq!(a_public.ip(), a.nat.public_ip(), "seed {seed}");
        assert_eq!(b_public.ip(), b.nat.public_ip(), "seed {seed}");

        // Dialing alone: b's NAT never saw b send to a, so it filters a's Initials.
        let error = dial(&b, &a, b_public)
            .await
            .expect_err("dial through a closed NAT");
        assert!(
            matches!(error, ConnectionError::TimedOut),
            "seed {seed}: {error:?}"
        );
        let filtered = b.nat.counters().dropped.filtered;
        assert!(filtered > 0, "seed {seed}: {}", b.nat.counters());

        // b punches, then a dials again: direct, through both NATs.
        let (a_conn, b_conn) = punch_then_dial(&b, &a, b_public, a_public)
            .await
            .unwrap_or_else(|e| panic!("seed {seed}: hole punch failed: {e:?}"));
        assert_eq!(a_conn.remote_address(), b_public, "seed {seed}");
        assert_eq!(b_conn.remote_address(), a_public, "seed {seed}");
        let answer = round_trip(&a_conn, &b_conn, b"over the punched hole").await;
        assert_eq!(answer, b"eloh dehcnup eht revo", "seed {seed}");
        // Once b had punched, its NAT filtered nothing more from a.
        assert_eq!(
            b.nat.counters().dropped.filtered,
            filtered,
            "seed {seed}: {}",
            b.nat.counters()
        );
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
    println!(
        "seed {seed}: a {}; b {}",
        a.nat.counters(),
        b.nat.counters()
    );
}

#[tokio::test(start_paused = true)]
async fn quic_hole_punch_fails_between_two_symmetric_nats() {
    let seed = 10;
    let net = network(seed);
    let (_rendezvous, rendezvous_addr) = rendezvous(&net);
    let a = Peer::new(&net, "a", NatConfig::symmetric());
    let b = Peer::new(&net, "b", NatConfig::symmetric());
    timeout(SCENARIO_LIMIT, async {
        let (_ra, a_public) = a.observed_address(rendezvous_addr).await;
        let (_rb, b_public) = b.observed_address(rendezvous_addr).await;
        let result = punch_then_dial(&b, &a, b_public, a_public).await;
        let error = result
            .err()
            .unwrap_or_else(|| panic!("seed {seed}: connected through two symmetric NATs"));
        assert!(
            matches!(error, ConnectionError::TimedOut),
            "seed {seed}: {error:?}"
        );
        // Each side's datagrams reached the other's rendezvous mapping, which only admits
        // the rendezvous server.
        assert!(a.nat.counters().dropped.filtered >= 3, "seed {seed}");
        assert!(b.nat.counters().dropped.filtered > 0, "seed {seed}");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: scenario hung"));
}
