//! Helpers shared by the integration tests: TLS and quinn configs, a client/server pair on a
//! simulated network, and transfers.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use anchorage_netsim::{Host, LinkConfig, Network};
use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use quinn::{ClientConfig, Connection, Endpoint, ServerConfig, TransportConfig};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

/// Name in the test certificate.
pub const SERVER_NAME: &str = "anchorage.test";
/// Port the test server listens on.
pub const SERVER_PORT: u16 = 4433;
/// Largest stream the tests read.
pub const MAX_READ: usize = 64 * 1024 * 1024;

/// A self-signed Ed25519 certificate, made once per test binary. Ed25519 signatures have a
/// fixed length, so handshake packet sizes do not vary between runs.
pub struct Tls {
    pub cert: CertificateDer<'static>,
    pub key: Vec<u8>,
}

pub fn tls() -> &'static Tls {
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

pub fn server_config(transport: TransportConfig) -> ServerConfig {
    let tls = tls();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(tls.key.clone()));
    let mut crypto = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_no_client_auth()
        .with_single_cert(vec![tls.cert.clone()], key)
        .expect("server cert");
    crypto.alpn_protocols = vec![b"netsim-test".to_vec()];
    let crypto = QuicServerConfig::try_from(crypto).expect("QUIC server crypto");
    let mut config = ServerConfig::with_crypto(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config
}

pub fn client_config(transport: TransportConfig) -> ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(tls().cert.clone()).expect("trust the test cert");
    let mut crypto = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("TLS 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    crypto.alpn_protocols = vec![b"netsim-test".to_vec()];
    let crypto = QuicClientConfig::try_from(crypto).expect("QUIC client crypto");
    let mut config = ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport));
    config
}

/// Idle timeout 30 s, keep-alive every 5 s: a connection that only dies when the path does.
pub fn keepalive_transport() -> TransportConfig {
    let mut t = TransportConfig::default();
    t.max_idle_timeout(Some(
        Duration::from_secs(30)
            .try_into()
            .expect("valid idle timeout"),
    ));
    t.keep_alive_interval(Some(Duration::from_secs(5)));
    t
}

/// A server host and a client host on one network, each with a quinn endpoint.
pub struct Pair {
    pub net: Network,
    pub server_host: Host,
    pub client_host: Host,
    pub server: Endpoint,
    pub client: Endpoint,
}

impl Pair {
    /// Both directions between the hosts get `link`; `transport` builds both sides' config.
    pub fn new(seed: u64, link: LinkConfig, transport: fn() -> TransportConfig) -> Self {
        let net = Network::new(seed);
        let server_host = net.add_host("server");
        let client_host = net.add_host("client");
        net.set_link_both(server_host.id(), client_host.id(), link)
            .expect("valid link");
        let server = server_host
            .endpoint(SERVER_PORT, Some(server_config(transport())))
            .expect("server endpoint");
        let mut client = client_host.endpoint(0, None).expect("client endpoint");
        client.set_default_client_config(client_config(transport()));
        Self {
            net,
            server_host,
            client_host,
            server,
            client,
        }
    }

    pub fn server_addr(&self) -> SocketAddr {
        SocketAddr::new(self.server_host.ip(), SERVER_PORT)
    }

    /// Connects the client to the server; returns (client side, server side).
    pub async fn connect(&self) -> (Connection, Connection) {
        connect(&self.client, &self.server, self.server_addr()).await
    }
}

/// Connects `client` to `server` at `addr`; returns (client side, server side).
pub async fn connect(
    client: &Endpoint,
    server: &Endpoint,
    addr: SocketAddr,
) -> (Connection, Connection) {
    let connecting = client.connect(addr, SERVER_NAME).expect("start connecting");
    let accept = async {
        let incoming = server.accept().await.expect("server endpoint open");
        incoming.await.expect("server handshake")
    };
    let (client_conn, server_conn) = tokio::join!(connecting, accept);
    (client_conn.expect("client handshake"), server_conn)
}

/// Sends `data` on a new unidirectional stream from `from`; returns what `to` read.
pub async fn transfer(from: &Connection, to: &Connection, data: &[u8]) -> Vec<u8> {
    let send = async {
        let mut stream = from.open_uni().await.expect("open stream");
        stream.write_all(data).await.expect("write stream");
        stream.finish().expect("finish stream");
        // Keep the stream alive until the peer has everything.
        let _ = stream.stopped().await;
    };
    let recv = async {
        let mut stream = to.accept_uni().await.expect("accept stream");
        stream.read_to_end(MAX_READ).await.expect("read stream")
    };
    tokio::join!(send, recv).1
}

/// Sends `request` on a bidirectional stream; the peer answers with the same bytes reversed.
pub async fn round_trip(client: &Connection, server: &Connection, request: &[u8]) -> Vec<u8> {
    let ask = async {
        let (mut send, mut recv) = client.open_bi().await.expect("open bi stream");
        send.write_all(request).await.expect("write request");
        send.finish().expect("finish request");
        recv.read_to_end(MAX_READ).await.expect("read response")
    };
    let answer = async {
        let (mut send, mut recv) = server.accept_bi().await.expect("accept bi stream");
        let mut body = recv.read_to_end(MAX_READ).await.expect("read request");
        body.reverse();
        send.write_all(&body).await.expect("write response");
        send.finish().expect("finish response");
        let _ = send.stopped().await;
    };
    tokio::join!(ask, answer).0
}

/// `len` bytes of a deterministic pattern in which every 8-byte block differs, so lost,
/// duplicated or reordered data cannot go unnoticed.
pub fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut state = seed;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state = state
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}
