//! The impairment proxy on real loopback sockets, in-process and as the binary.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use anchorage_netsim::proxy::{Proxy, ProxyConfig};
use anchorage_netsim::{LinkConfig, Loss};
use common::{SERVER_NAME, client_config, pattern, server_config, transfer};
use quinn::{Endpoint, TransportConfig};

const BIN: &str = env!("CARGO_BIN_EXE_anchorage-netsim");

#[tokio::test]
async fn quinn_stream_crosses_proxy_at_ten_percent_loss_byte_exact() {
    let seed = 21;
    let loopback: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let server = Endpoint::server(server_config(TransportConfig::default()), loopback)
        .expect("server endpoint");
    let proxy = Proxy::bind(ProxyConfig {
        listen: loopback,
        upstream: server.local_addr().expect("server addr"),
        link: LinkConfig {
            loss: Loss::Independent(0.10),
            latency: Duration::from_millis(2),
            ..LinkConfig::default()
        },
        seed,
    })
    .await
    .expect("proxy binds");
    let proxy_addr = proxy.local_addr().expect("proxy addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let proxy = tokio::spawn(proxy.run(async {
        let _ = stopped.await;
    }));

    let mut client = Endpoint::client(loopback).expect("client endpoint");
    client.set_default_client_config(client_config(TransportConfig::default()));
    let data = pattern(512 * 1024, seed);
    let received = tokio::time::timeout(Duration::from_secs(60), async {
        let connecting = client.connect(proxy_addr, SERVER_NAME).expect("connect");
        let accept = async {
            server
                .accept()
                .await
                .expect("incoming")
                .await
                .expect("server handshake")
        };
        let (client_conn, server_conn) = tokio::join!(connecting, accept);
        let client_conn = client_conn.expect("client handshake");
        let received = transfer(&client_conn, &server_conn, &data).await;
        client_conn.close(0u32.into(), b"done");
        received
    })
    .await
    .unwrap_or_else(|_| panic!("seed {seed}: transfer through the proxy did not finish"));
    assert!(received == data, "seed {seed}: stream differs");

    // Let the last datagrams (the close) through before stopping.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).expect("proxy running");
    let counters = proxy.await.expect("proxy task");
    println!("seed {seed}:\n{counters}");
    let (up, down) = (counters.to_upstream, counters.to_client);
    for (name, c) in [("to upstream", up), ("to client", down)] {
        assert!(
            c.dropped.loss > 0,
            "seed {seed}: {name} lost nothing: {c:?}"
        );
        assert_eq!(
            c.delivered + c.dropped.total(),
            c.sent,
            "seed {seed}: {name}: {c:?}"
        );
    }
    // The number of datagrams depends on real timing, so the bound is statistical: with
    // several hundred datagrams, 5-15 % is more than 3.5 standard deviations around 10 %.
    let sent = up.sent + down.sent;
    let lost = up.dropped.loss + down.dropped.loss;
    assert!(sent > 300, "seed {seed}: only {sent} datagrams relayed");
    let loss = lost as f64 / sent as f64;
    assert!(
        (0.05..=0.15).contains(&loss),
        "seed {seed}: the proxy lost {loss} of {sent} datagrams"
    );
}

#[test]
fn bad_flags_exit_64_with_a_message() {
    let cases: &[&[&str]] = &[
        &[],
        &["proxy"],
        &["proxy", "--listen", "nowhere", "--upstream", "127.0.0.1:1"],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--loss",
            "1.5",
        ],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--preset",
            "dialup",
        ],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--delay",
            "50",
        ],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--rate",
            "0",
        ],
        &[
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:1",
            "--bogus",
        ],
    ];
    for args in cases {
        let out = Command::new(BIN).args(*args).output().expect("run binary");
        assert_eq!(out.status.code(), Some(64), "{args:?}: {out:?}");
        assert!(!out.stderr.is_empty(), "{args:?}: no message");
    }
    let help = Command::new(BIN)
        .args(["proxy", "--help"])
        .output()
        .expect("run binary");
    assert_eq!(help.status.code(), Some(0));
    let text = String::from_utf8_lossy(&help.stdout);
    for flag in [
        "--listen",
        "--upstream",
        "--preset",
        "--loss",
        "--delay",
        "--jitter",
        "--reorder",
        "--duplicate",
        "--rate",
        "--seed",
    ] {
        assert!(text.contains(flag), "help lacks {flag}");
    }
}

#[cfg(unix)]
#[test]
fn binary_prints_counters_on_interrupt() {
    let mut child = Command::new(BIN)
        .args([
            "proxy",
            "--listen",
            "127.0.0.1:0",
            "--upstream",
            "127.0.0.1:9",
            "--loss",
            "50%",
            "--seed",
            "1",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start proxy");
    let mut stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let mut first = String::new();
    stdout.read_line(&mut first).expect("first line");
    let addr: SocketAddr = first
        .split("listening on ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|a| a.trim().parse().ok())
        .unwrap_or_else(|| panic!("no address in {first:?}"));

    let socket = UdpSocket::bind("127.0.0.1:0").expect("client socket");
    for i in 0..200u32 {
        socket.send_to(&i.to_be_bytes(), addr).expect("send");
    }
    std::thread::sleep(Duration::from_millis(500));
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .expect("kill");
    assert!(status.success());
    let mut rest = String::new();
    stdout.read_to_string(&mut rest).expect("rest of output");
    let exit = child.wait().expect("proxy exits");
    assert!(exit.success(), "{exit:?}\n{rest}");
    let line = rest
        .lines()
        .find(|l| l.starts_with("client -> upstream:"))
        .unwrap_or_else(|| panic!("no counters in {rest:?}"));
    assert!(line.contains("sent 200 "), "{line}");
    let lost: u64 = line
        .split("[loss ")
        .nth(1)
        .and_then(|r| r.split(',').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no loss count in {line}"));
    assert!(
        (60..=140).contains(&lost),
        "seed 1: lost {lost} of 200 at 50 %: {line}"
    );
}
