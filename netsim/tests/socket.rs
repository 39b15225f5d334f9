//! The simulated socket at the UDP level: what quinn's `AsyncUdpSocket` contract asks for,
//! and each impairment and fault seen by a raw sender and receiver.

use std::future::poll_fn;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anchorage_netsim::{LinkConfig, Network, SimSocket};
use quinn::AsyncUdpSocket;
use quinn::udp::{EcnCodepoint, RecvMeta, Transmit};
use tokio::time::{Instant, timeout};

const QUIET: Duration = Duration::from_secs(1);

/// Two hosts with one socket each, linked by `link` both ways.
fn two_sockets(seed: u64, link: LinkConfig) -> (Network, Arc<SimSocket>, Arc<SimSocket>) {
    let net = Network::new(seed);
    let a = net.add_host("a");
    let b = net.add_host("b");
    net.set_link_both(a.id(), b.id(), link).expect("valid link");
    let sa = a.bind(1000).expect("bind a");
    let sb = b.bind(2000).expect("bind b");
    (net, sa, sb)
}

/// Receives until nothing arrives for a (simulated) second.
async fn drain(socket: &SimSocket) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 65536];
    while let Ok(Ok((len, _))) = timeout(QUIET, socket.recv_from(&mut buf)).await {
        out.push(buf[..len].to_vec());
    }
    out
}

#[tokio::test(start_paused = true)]
async fn addresses_are_assigned_and_ports_are_exclusive() {
    let net = Network::new(1);
    let a = net.add_host("a");
    let b = net.add_host("b");
    assert_eq!(a.ip(), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 1)));
    assert_eq!(b.ip(), IpAddr::V4(Ipv4Addr::new(10, 0, 0, 2)));
    let s = a.bind(7444).expect("bind");
    assert_eq!(s.addr(), "10.0.0.1:7444".parse().expect("addr"));
    assert_eq!(s.local_addr().expect("local addr"), s.addr());
    let err = a.bind(7444).expect_err("port taken");
    assert_eq!(err.kind(), io::ErrorKind::AddrInUse);
    let e1 = a.bind(0).expect("ephemeral");
    let e2 = a.bind(0).expect("ephemeral");
    assert_ne!(e1.addr().port(), e2.addr().port());
    assert!(e1.addr().port() >= 49152);
    drop(s);
    a.bind(7444).expect("port free after drop");
    assert!(net.add_host_with_ip("dup", a.ip()).is_err());
    assert!(
        net.add_host_with_ip("zero", Ipv4Addr::UNSPECIFIED.into())
            .is_err()
    );
    let v6 = net
        .add_host_with_ip("v6", IpAddr::V6(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 1)))
        .expect("ipv6 host");
    let v6_socket = v6.bind(1).expect("bind v6");
    assert!(v6_socket.addr().is_ipv6());
    assert!(v6.rebind().is_ipv6(), "an IPv6 host stays IPv6");
    assert_eq!(v6_socket.addr().ip(), v6.ip());
}

#[tokio::test(start_paused = true)]
async fn in_flight_bytes_per_link_are_bounded() {
    let (net, a, b) = two_sockets(
        17,
        LinkConfig {
            latency: Duration::from_secs(10),
            mtu: 100_000,
            ..LinkConfig::default()
        },
    );
    let chunk = vec![0u8; 60_000];
    let n = 1200u64; // 72 MB, more than the 64 MiB a link holds in flight
    for _ in 0..n {
        a.send_to(&chunk, b.addr()).expect("send");
    }
    let c = net.link_counters(a.host(), b.host());
    let fits = (anchorage_netsim::network::MAX_IN_FLIGHT_BYTES / chunk.len()) as u64;
    assert_eq!(c.dropped.queue_full, n - fits, "{c:?}");
    assert_eq!(net.in_flight() as u64, fits);
}

#[tokio::test(start_paused = true)]
async fn recv_meta_is_filled_as_quinn_expects() {
    let (_net, a, b) = two_sockets(2, LinkConfig::default());
    a.try_send(&Transmit {
        destination: b.addr(),
        ecn: Some(EcnCodepoint::Ect0),
        contents: b"hello",
        segment_size: None,
        src_ip: None,
    })
    .expect("send");
    let mut storage = [[0u8; 1500]; 4];
    let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut meta = [RecvMeta::default(); 4];
    let n = poll_fn(|cx| b.poll_recv(cx, &mut bufs, &mut meta))
        .await
        .expect("recv");
    assert_eq!(n, 1);
    assert_eq!(meta[0].addr, a.addr());
    assert_eq!(meta[0].len, 5);
    assert_eq!(meta[0].stride, 5);
    assert_eq!(meta[0].ecn, Some(EcnCodepoint::Ect0));
    assert_eq!(meta[0].dst_ip, Some(b.addr().ip()));
    assert_eq!(&bufs[0][..5], b"hello");
    assert_eq!(b.max_receive_segments(), 1);
    assert!(!b.may_fragment());
}

#[tokio::test(start_paused = true)]
async fn gso_transmits_are_split_into_segments() {
    let (net, a, b) = two_sockets(3, LinkConfig::default());
    assert!(a.max_transmit_segments() > 1);
    let contents: Vec<u8> = (0..1200u32).map(|i| i as u8).collect();
    a.try_send(&Transmit {
        destination: b.addr(),
        ecn: None,
        contents: &contents,
        segment_size: Some(500),
        src_ip: None,
    })
    .expect("send");
    // Received in one batch, one datagram per buffer.
    let mut storage = [[0u8; 1500]; 8];
    let mut bufs: Vec<IoSliceMut<'_>> = storage.iter_mut().map(|b| IoSliceMut::new(b)).collect();
    let mut meta = [RecvMeta::default(); 8];
    let n = poll_fn(|cx| b.poll_recv(cx, &mut bufs, &mut meta))
        .await
        .expect("recv");
    assert_eq!(n, 3);
    let lens: Vec<usize> = meta[..3].iter().map(|m| m.len).collect();
    assert_eq!(lens, [500, 500, 200]);
    assert_eq!(&bufs[1][..500], &contents[500..1000]);
    assert_eq!(&bufs[2][..200], &contents[1000..]);
    assert_eq!(net.counters().sent, 3);
}

#[tokio::test(start_paused = true)]
async fn invalid_gso_transmits_are_refused_without_sending() {
    let (net, a, b) = two_sockets(4, LinkConfig::default());
    let contents = vec![0u8; 1100];
    let refused = |segment_size| {
        a.try_send(&Transmit {
            destination: b.addr(),
            ecn: None,
            contents: &contents,
            segment_size,
            src_ip: None,
        })
        .expect_err("refused")
        .kind()
    };
    assert_eq!(refused(Some(0)), io::ErrorKind::InvalidInput);
    // 11 segments of 100 bytes: more than a transmit may carry.
    assert_eq!(refused(Some(100)), io::ErrorKind::InvalidInput);
    assert_eq!(net.counters().sent, 0);
}

#[tokio::test(start_paused = true)]
async fn datagram_larger_than_the_buffer_is_dropped_and_counted() {
    let (net, a, b) = two_sockets(5, LinkConfig::default());
    a.send_to(&[1u8; 1000], b.addr()).expect("send");
    a.send_to(&[2u8; 10], b.addr()).expect("send");
    let mut small = [0u8; 100];
    let (len, from) = b.recv_from(&mut small).await.expect("recv");
    assert_eq!((len, from), (10, a.addr()));
    assert_eq!(small[..10], [2u8; 10]);
    let c = net.link_counters(a.host(), b.host());
    assert_eq!(c.dropped.truncated, 1);
    assert_eq!(c.delivered, 1);
}

#[tokio::test(start_paused = true)]
async fn latency_is_applied_on_the_virtual_clock_and_reader_is_woken() {
    let latency = Duration::from_millis(50);
    let (_net, a, b) = two_sockets(
        6,
        LinkConfig {
            latency,
            ..LinkConfig::default()
        },
    );
    // The reader waits first, so delivery must wake it.
    let reader = {
        let b = b.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 100];
            b.recv_from(&mut buf).await.expect("recv");
            Instant::now()
        })
    };
    tokio::task::yield_now().await;
    let sent = Instant::now();
    a.send_to(b"ping", b.addr()).expect("send");
    let arrived = reader.await.expect("reader");
    let took = arrived - sent;
    // Tokio's timer resolution is 1 ms.
    assert!(
        took >= latency && took <= latency + Duration::from_millis(1),
        "took {took:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn mtu_drops_what_is_larger_counting_headers() {
    let (net, a, b) = two_sockets(
        7,
        LinkConfig {
            mtu: 1228,
            ..LinkConfig::default()
        },
    );
    a.send_to(&[0u8; 1200], b.addr()).expect("send");
    a.send_to(&[0u8; 1201], b.addr()).expect("send");
    let got = drain(&b).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), 1200);
    assert_eq!(net.link_counters(a.host(), b.host()).dropped.mtu, 1);
}

#[tokio::test(start_paused = true)]
async fn bandwidth_queue_serializes_and_drops_tail() {
    // 1 Mbit/s: a 1000-byte datagram (1028 on the wire) takes 8.224 ms; the queue holds 9.
    let (net, a, b) = two_sockets(
        8,
        LinkConfig {
            rate: Some(1_000_000),
            queue_bytes: 10_000,
            ..LinkConfig::default()
        },
    );
    let start = Instant::now();
    for _ in 0..20 {
        a.send_to(&[0u8; 1000], b.addr()).expect("send");
    }
    let c = net.link_counters(a.host(), b.host());
    assert_eq!(c.dropped.queue_full, 11);
    assert_eq!(c.queued_bytes, 9 * 1028);
    let mut buf = [0u8; 2000];
    let mut last = start;
    for _ in 0..9 {
        b.recv_from(&mut buf).await.expect("recv");
        last = Instant::now();
    }
    let took = last - start;
    let expected = Duration::from_micros(9 * 8224);
    assert!(
        took >= expected && took <= expected + Duration::from_millis(1),
        "took {took:?}"
    );
    assert_eq!(net.link_counters(a.host(), b.host()).queued_bytes, 0);
}

#[tokio::test(start_paused = true)]
async fn partition_blocks_both_ways_until_healed() {
    let (net, a, b) = two_sockets(9, LinkConfig::default());
    net.partition(&[a.host()], &[b.host()]);
    a.send_to(b"x", b.addr()).expect("send");
    b.send_to(b"y", a.addr()).expect("send");
    assert!(drain(&b).await.is_empty());
    assert!(drain(&a).await.is_empty());
    assert_eq!(net.counters().dropped.partition, 2);
    net.heal();
    a.send_to(b"x", b.addr()).expect("send");
    assert_eq!(drain(&b).await, [b"x".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn in_flight_datagrams_are_dropped_when_a_partition_starts() {
    let (net, a, b) = two_sockets(
        10,
        LinkConfig {
            latency: Duration::from_millis(100),
            ..LinkConfig::default()
        },
    );
    a.send_to(b"x", b.addr()).expect("send");
    assert_eq!(net.in_flight(), 1);
    net.partition(&[a.host()], &[b.host()]);
    assert!(drain(&b).await.is_empty());
    assert_eq!(net.counters().dropped.partition, 1);
}

#[tokio::test(start_paused = true)]
async fn host_down_drops_and_host_up_restores() {
    let net = Network::new(11);
    let ha = net.add_host("a");
    let hb = net.add_host("b");
    let a = ha.bind(1).expect("bind");
    let b = hb.bind(1).expect("bind");
    hb.set_up(false);
    assert!(!hb.is_up());
    a.send_to(b"to down host", b.addr()).expect("send");
    b.send_to(b"from down host", a.addr()).expect("send");
    assert!(drain(&b).await.is_empty());
    assert!(drain(&a).await.is_empty());
    assert_eq!(hb.counters().rx.dropped.host_down, 1);
    assert_eq!(hb.counters().tx.dropped.host_down, 1);
    hb.set_up(true);
    a.send_to(b"back", b.addr()).expect("send");
    assert_eq!(drain(&b).await, [b"back".to_vec()]);
}

#[tokio::test(start_paused = true)]
async fn rebind_moves_the_socket_and_orphans_the_old_address() {
    let net = Network::new(12);
    let ha = net.add_host("a");
    let hb = net.add_host("b");
    let a = ha.bind(1).expect("bind");
    let b = hb.bind(1).expect("bind");
    let old = b.addr();
    let new_ip = hb.rebind();
    assert_ne!(new_ip, old.ip());
    assert_eq!(b.addr(), SocketAddr::new(new_ip, 1));
    assert_eq!(hb.ip(), new_ip);
    a.send_to(b"old", old).expect("send");
    a.send_to(b"new", b.addr()).expect("send");
    b.send_to(b"from new", a.addr()).expect("send");
    assert_eq!(drain(&b).await, [b"new".to_vec()]);
    let mut buf = [0u8; 100];
    let (_, from) = a.recv_from(&mut buf).await.expect("recv");
    assert_eq!(from, b.addr());
    // No host has the old address any more.
    assert_eq!(ha.counters().tx.dropped.no_route, 1);
    let chosen: IpAddr = "10.9.9.9".parse().expect("ip");
    hb.rebind_to(chosen).expect("free address");
    assert_eq!(b.addr().ip(), chosen);
    assert!(hb.rebind_to(ha.ip()).is_err());
}

#[tokio::test(start_paused = true)]
async fn unknown_destinations_are_counted_not_reported() {
    let net = Network::new(13);
    let h = net.add_host("a");
    let s = h.bind(0).expect("bind");
    s.send_to(b"void", "192.0.2.1:9".parse().expect("addr"))
        .expect("sending never fails");
    s.send_to(b"closed port", SocketAddr::new(h.ip(), 9))
        .expect("sending never fails");
    tokio::time::sleep(QUIET).await;
    let c = h.counters();
    assert_eq!(c.tx.sent, 2);
    assert_eq!(c.tx.dropped.no_route, 2);
}

#[tokio::test(start_paused = true)]
async fn counters_balance_once_the_network_is_quiet() {
    let (net, a, b) = two_sockets(14, LinkConfig::preset(anchorage_netsim::Preset::Hostile));
    for i in 0..2000u32 {
        a.send_to(&i.to_be_bytes(), b.addr()).expect("send");
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let got = drain(&b).await;
    let c = net.link_counters(a.host(), b.host());
    assert_eq!(net.in_flight(), 0);
    assert_eq!(
        c.sent + c.duplicated,
        c.delivered + c.dropped.total(),
        "seed 14: {c:?}"
    );
    assert_eq!(c.delivered, got.len() as u64);
    assert!(c.duplicated > 0 && c.dropped.loss > 0, "seed 14: {c:?}");
    // Duplicates and reordering are visible to the receiver.
    let seqs: Vec<u32> = got
        .iter()
        .map(|d| u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
        .collect();
    assert!(
        seqs.windows(2).any(|w| w[0] == w[1]),
        "seed 14: no duplicate seen"
    );
    assert!(
        seqs.windows(2).any(|w| w[0] > w[1]),
        "seed 14: no reordering seen"
    );
    assert_eq!(net.counters(), c, "seed 14: one link carries everything");
}

#[tokio::test(start_paused = true)]
async fn receive_buffer_is_bounded() {
    let (net, a, b) = two_sockets(
        15,
        LinkConfig {
            mtu: 100_000,
            ..LinkConfig::default()
        },
    );
    let chunk = vec![0u8; 60_000];
    let n = 50; // 3 MB, more than the 2 MiB receive buffer
    for _ in 0..n {
        a.send_to(&chunk, b.addr()).expect("send");
    }
    tokio::time::sleep(Duration::from_millis(1)).await;
    let got = drain(&b).await;
    let c = net.link_counters(a.host(), b.host());
    assert!(c.dropped.recv_buffer > 0, "{c:?}");
    assert_eq!(got.len() as u64 + c.dropped.recv_buffer, n);
}

#[tokio::test(start_paused = true)]
async fn same_host_sockets_talk_over_an_ideal_loopback() {
    let net = Network::new(16);
    net.set_default_link(LinkConfig::preset(anchorage_netsim::Preset::Hostile))
        .expect("valid link");
    let h = net.add_host("a");
    let s1 = h.bind(1).expect("bind");
    let s2 = h.bind(2).expect("bind");
    for _ in 0..100 {
        s1.send_to(b"local", s2.addr()).expect("send");
    }
    assert_eq!(drain(&s2).await.len(), 100);
}
