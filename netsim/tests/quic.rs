//! Real quinn (and rustls) over the simulated network, on tokio's paused clock.
//!
//! Every test has a fixed seed, printed in its failure messages; rerunning with that seed
//! replays the same network decisions.

mod common;

use std::time::Duration;

use anchorage_netsim::{LinkConfig, Loss, Network, Preset};
use bytes::Bytes;
use common::{Pair, keepalive_transport, pattern, round_trip, transfer};
use quinn::{ConnectionError, TransportConfig};
use tokio::time::{Instant, timeout};

/// Every scenario must finish within this much simulated time, so a hang fails fast (under
/// paused time a hung test advances straight to the deadline).
const SCENARIO_LIMIT: Duration = Duration::from_secs(3 * 3600);

#[tokio::test(start_paused = true)]
async fn stream_of_megabytes_crosses_lossy_reordering_link_byte_exact() {
    let seed = 1;
    let link = LinkConfig {
        loss: Loss::Independent(0.20),
        latency: Duration::from_millis(50),
        jitter: Duration::from_millis(10),
        reorder: 0.05,
        reorder_delay: Duration::from_millis(20),
        ..LinkConfig::default()
    };
    let pair = Pair::new(seed, link, TransportConfig::default);
    let data = pattern(4 * 1024 * 1024, seed);
    let start = Instant::now();
    let received = timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        transfer(&client, &server, &data).await
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: transfer did not finish"));
    assert_eq!(received.len(), data.len(), "seed {seed}: length differs");
    assert!(received == data, "seed {seed}: stream content differs");

    // The link really was that bad: about 20 % of the client's packets were lost.
    let up = pair
        .net
        .link_counters(pair.client_host.id(), pair.server_host.id());
    println!(
        "seed {seed}: {} bytes in {:?} simulated; {up}",
        data.len(),
        start.elapsed()
    );
    let loss = up.dropped.loss as f64 / up.sent as f64;
    assert!(
        (0.17..0.23).contains(&loss),
        "seed {seed}: loss rate {loss} from {up:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn datagrams_arrive_at_the_rate_the_loss_allows() {
    let seed = 2;
    let sent = 2000u32;
    let link = LinkConfig {
        loss: Loss::Independent(0.10),
        latency: Duration::from_millis(20),
        ..LinkConfig::default()
    };
    let pair = Pair::new(seed, link, keepalive_transport);
    let received = timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let send = async {
            for seq in 0..sent {
                let mut body = vec![0u8; 100];
                body[..4].copy_from_slice(&seq.to_be_bytes());
                client
                    .send_datagram(Bytes::from(body))
                    .expect("datagrams supported");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let recv = async {
            let mut seen = vec![false; sent as usize];
            // Until no datagram has arrived for a second after the last was sent.
            while let Ok(Ok(d)) = timeout(Duration::from_secs(1), server.read_datagram()).await {
                let seq = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
                seen[seq as usize] = true;
            }
            seen.iter().filter(|s| **s).count()
        };
        tokio::join!(send, recv).1
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
    // Binomial(2000, 0.9): mean 1800, sd 13.4; the bounds are 6 sd out, and fail for a
    // network that drops nothing or everything.
    let rate = received as f64 / f64::from(sent);
    assert!(
        (0.86..=0.94).contains(&rate),
        "seed {seed}: {received} of {sent} datagrams arrived ({rate})"
    );
}

#[tokio::test(start_paused = true)]
async fn partition_times_out_on_simulated_clock_and_heal_allows_new_connection() {
    let seed = 3;
    let link = LinkConfig {
        latency: Duration::from_millis(10),
        ..LinkConfig::default()
    };
    let pair = Pair::new(seed, link, keepalive_transport);
    let real_start = std::time::Instant::now();
    timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        // Keep-alives hold the connection well past the idle timeout.
        tokio::time::sleep(Duration::from_secs(120)).await;
        assert!(
            client.close_reason().is_none(),
            "seed {seed}: died unpartitioned"
        );

        pair.net
            .partition(&[pair.client_host.id()], &[pair.server_host.id()]);
        let cut = Instant::now();
        let error = client.closed().await;
        let after = cut.elapsed();
        assert!(
            matches!(error, ConnectionError::TimedOut),
            "seed {seed}: expected TimedOut, got {error:?}"
        );
        // Idle timeout 30 s, restarted by the last packet exchanged around the cut (keep-alives
        // every 5 s; quinn also restarts it on sending after a receipt).
        assert!(
            (Duration::from_secs(24)..=Duration::from_secs(36)).contains(&after),
            "seed {seed}: timed out {after:?} after the partition"
        );
        assert!(matches!(server.closed().await, ConnectionError::TimedOut));
        let dropped = pair.net.counters().dropped.partition;
        assert!(dropped > 0, "seed {seed}: no partition drops counted");

        // While partitioned, a new connection cannot be made either.
        let attempt = pair
            .client
            .connect(pair.server_addr(), common::SERVER_NAME)
            .expect("start connecting");
        assert!(
            attempt.await.is_err(),
            "seed {seed}: connected across a partition"
        );

        pair.net.heal();
        let (client, server) = pair.connect().await;
        assert_eq!(round_trip(&client, &server, b"healed").await, b"delaeh");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
    println!(
        "seed {seed}: partition scenario took {:?} of real time",
        real_start.elapsed()
    );
}

#[tokio::test(start_paused = true)]
async fn thirty_minutes_of_heartbeats_run_on_simulated_time() {
    let seed = 4;
    let pair = Pair::new(seed, LinkConfig::preset(Preset::Lte), keepalive_transport);
    let real_start = std::time::Instant::now();
    let sim_start = Instant::now();
    let heartbeats = 120u32; // one every 15 s for 30 minutes
    let received = timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let send = async {
            let mut tick = tokio::time::interval(Duration::from_secs(15));
            for seq in 0..heartbeats {
                tick.tick().await;
                client
                    .send_datagram(Bytes::copy_from_slice(&seq.to_be_bytes()))
                    .expect("datagrams supported");
            }
            tokio::time::sleep(Duration::from_secs(15)).await;
        };
        let recv = async {
            let mut count = 0u32;
            while let Ok(Ok(_)) = timeout(Duration::from_secs(60), server.read_datagram()).await {
                count += 1;
            }
            count
        };
        let ((), count) = tokio::join!(send, recv);
        assert_eq!(
            round_trip(&client, &server, b"still here").await,
            b"ereh llits"
        );
        count
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
    let simulated = sim_start.elapsed();
    let real = real_start.elapsed();
    println!("seed {seed}: {simulated:?} simulated in {real:?} real");
    assert!(
        simulated >= Duration::from_secs(30 * 60),
        "seed {seed}: only {simulated:?} simulated"
    );
    // Had real time driven it, it would have taken 30 minutes.
    assert!(
        real < Duration::from_secs(300),
        "seed {seed}: 30 simulated minutes took {real:?} of real time"
    );
    // LTE loses 0.5 % of packets.
    assert!(
        received >= heartbeats - 6 && received <= heartbeats,
        "seed {seed}: {received} of {heartbeats} heartbeats arrived"
    );
}

#[tokio::test(start_paused = true)]
async fn host_down_briefly_keeps_connection_and_down_long_times_out() {
    let seed = 5;
    let link = LinkConfig {
        latency: Duration::from_millis(10),
        ..LinkConfig::default()
    };
    let pair = Pair::new(seed, link, keepalive_transport);
    timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        pair.client_host.set_up(false);
        tokio::time::sleep(Duration::from_secs(10)).await;
        pair.client_host.set_up(true);
        assert_eq!(round_trip(&client, &server, b"back").await, b"kcab");
        let down = pair.client_host.counters().tx.dropped.host_down;
        assert!(down > 0, "seed {seed}: nothing dropped while down");

        pair.client_host.set_up(false);
        let error = client.closed().await;
        assert!(
            matches!(error, ConnectionError::TimedOut),
            "seed {seed}: expected TimedOut, got {error:?}"
        );
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
}

#[tokio::test(start_paused = true)]
async fn host_with_new_address_keeps_its_connection_and_data_flowing() {
    let seed = 6;
    let link = LinkConfig {
        latency: Duration::from_millis(15),
        jitter: Duration::from_millis(5),
        ..LinkConfig::default()
    };
    let pair = Pair::new(seed, link, keepalive_transport);
    let data = pattern(1024 * 1024, seed);
    timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let id = client.stable_id();
        let old = server.remote_address();
        assert_eq!(round_trip(&client, &server, b"before").await, b"erofeb");

        // Rebind in the middle of a transfer.
        let rebind = async {
            tokio::time::sleep(Duration::from_millis(300)).await;
            pair.client_host.rebind()
        };
        let (received, new_ip) = tokio::join!(transfer(&client, &server, &data), rebind);
        assert!(
            received == data,
            "seed {seed}: stream differs across rebind"
        );
        assert_eq!(round_trip(&client, &server, b"after").await, b"retfa");

        assert_eq!(
            client.stable_id(),
            id,
            "seed {seed}: not the same connection"
        );
        assert!(client.close_reason().is_none());
        let now = server.remote_address();
        assert_ne!(now, old, "seed {seed}: server still sees the old address");
        assert_eq!(now.ip(), new_ip, "seed {seed}: server sees {now}");
        // The server kept sending to the old address until it saw the new one.
        let unrouted = pair.server_host.counters().tx.dropped.no_route;
        assert!(unrouted > 0, "seed {seed}: nothing went to the old address");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
}

#[tokio::test(start_paused = true)]
async fn one_megabit_link_moves_about_one_megabit_of_stream_data() {
    let seed = 7;
    let rate = 1_000_000u64;
    let pair = Pair::new(seed, LinkConfig::default(), TransportConfig::default);
    let (up, down) = (pair.client_host.id(), pair.server_host.id());
    pair.net
        .set_link(
            up,
            down,
            LinkConfig {
                rate: Some(rate),
                queue_bytes: 64 * 1024,
                latency: Duration::from_millis(20),
                ..LinkConfig::default()
            },
        )
        .expect("valid link");
    pair.net
        .set_link(
            down,
            up,
            LinkConfig {
                latency: Duration::from_millis(20),
                ..LinkConfig::default()
            },
        )
        .expect("valid link");
    let data = pattern(2 * 1024 * 1024, seed);
    let (received, elapsed) = timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let start = Instant::now();
        let received = transfer(&client, &server, &data).await;
        (received, start.elapsed())
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
    assert!(received == data, "seed {seed}: stream differs");
    let goodput = data.len() as f64 * 8.0 / elapsed.as_secs_f64();
    println!("seed {seed}: {goodput:.0} bit/s of stream data in {elapsed:?}");
    assert!(
        (0.8e6..=1.0e6).contains(&goodput),
        "seed {seed}: {goodput:.0} bit/s over a {rate} bit/s link"
    );
}

/// A scenario with every kind of impairment; returns everything a run reports.
async fn impaired_run(seed: u64) -> (Vec<anchorage_netsim::Counters>, Duration) {
    let pair = Pair::new(
        seed,
        LinkConfig::preset(Preset::Congested3g),
        keepalive_transport,
    );
    let start = Instant::now();
    timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let data = pattern(200 * 1024, seed);
        assert!(transfer(&client, &server, &data).await == data);
        for i in 0..50u8 {
            let _ = client.send_datagram(Bytes::from(vec![i; 200]));
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(round_trip(&client, &server, b"done").await, b"enod");
        client.close(0u32.into(), b"bye");
        pair.client.wait_idle().await;
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
    let (c, s) = (pair.client_host.id(), pair.server_host.id());
    let counters = vec![
        pair.net.counters(),
        pair.net.link_counters(c, s),
        pair.net.link_counters(s, c),
    ];
    (counters, start.elapsed())
}

#[tokio::test(start_paused = true)]
async fn same_seed_gives_same_counters() {
    let seed = 8;
    let first = impaired_run(seed).await;
    let second = impaired_run(seed).await;
    assert_eq!(first, second, "seed {seed}: two runs differ");
    let (counters, _) = &first;
    assert!(counters[0].dropped.loss > 0, "seed {seed}: {counters:?}");
    assert!(counters[0].duplicated + counters[0].dropped.total() > 0);
    let other = impaired_run(seed + 1).await;
    assert_ne!(
        first,
        other,
        "seeds {seed} and {} gave the same run",
        seed + 1
    );
}

#[tokio::test(start_paused = true)]
async fn conditions_change_while_running() {
    let seed = 9;
    let pair = Pair::new(seed, LinkConfig::default(), keepalive_transport);
    let (c, s) = (pair.client_host.id(), pair.server_host.id());
    timeout(SCENARIO_LIMIT, async {
        let (client, server) = pair.connect().await;
        let before = Instant::now();
        round_trip(&client, &server, b"fast").await;
        let fast = before.elapsed();
        pair.net
            .set_link_both(c, s, LinkConfig::preset(Preset::Satellite))
            .expect("valid link");
        let before = Instant::now();
        round_trip(&client, &server, b"slow").await;
        let slow = before.elapsed();
        // A request and its response cross the 300 ms satellite hop at least twice; on the
        // ideal link only quinn's ack delay (25 ms) shows.
        assert!(fast < Duration::from_millis(100), "seed {seed}: {fast:?}");
        assert!(slow >= Duration::from_millis(570), "seed {seed}: {slow:?}");
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: did not finish"));
}

#[tokio::test(start_paused = true)]
async fn every_preset_carries_a_connection() {
    for (i, preset) in Preset::ALL.into_iter().enumerate() {
        let seed = 100 + i as u64;
        let pair = Pair::new(seed, LinkConfig::preset(preset), keepalive_transport);
        let data = pattern(64 * 1024, seed);
        timeout(SCENARIO_LIMIT, async {
            let (client, server) = pair.connect().await;
            assert!(
                transfer(&client, &server, &data).await == data,
                "seed {seed}: {preset} corrupted the stream"
            );
        })
        .await
        .unwrap_or_else(|_| panic!("seed {seed}: {preset} did not finish"));
        let counters = pair.net.counters();
        let mean = LinkConfig::preset(preset).loss.mean();
        if mean >= 0.1 {
            let rate = counters.dropped.loss as f64 / counters.sent as f64;
            assert!(
                (rate - mean).abs() < 0.1,
                "seed {seed}: {preset} lost {rate}, expected about {mean}"
            );
        }
    }
}

#[test]
fn network_handle_is_usable_outside_a_runtime_until_binding() {
    let net = Network::new(10);
    let host = net.add_host("lonely");
    assert!(host.bind(0).is_err(), "bound without a runtime");
}
