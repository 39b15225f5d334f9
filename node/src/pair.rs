//! The pairing client: from a code to a certificate.
//!
//! [`pair`] runs the bootstrap exchange of `wire::bootstrap` on a quinn endpoint the caller
//! provides (a real UDP socket, or a netsim host). While the request waits for an operator it
//! reports [`PairProgress::Pending`] with the SAS; if the connection drops, it resumes with the
//! request id and a PAKE-derived proof, retrying with capped exponential backoff until the
//! request expires. The key is generated (or reused) in the state directory and never leaves it.
//!
//! [`pair_any`] does the same through any of several anchors of one cluster: it tries them in
//! order, skipping those whose name does not resolve or that do not answer the handshake
//! (within [`ANCHOR_SILENCE`] when there is another to try), and a request left waiting on an
//! anchor that went away is resumed through the next ones. The anchor that completed the
//! pairing is saved as the node's `anchor`, the whole list as its known anchors.

use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anchorage_mesh::conn_error::ConnFailure;
use anchorage_mesh::framed::{FramedRecv, FramedSend, StreamError, framed};
use anchorage_mesh::pairing::{EXPORTER_LABEL, EXPORTER_LEN, NodeHandshake, PinCode, QrPayload};
use anchorage_mesh::{DeviceId, Fingerprint, tls};
use anchorage_wire::bootstrap::*;
use anchorage_wire::{ANCHOR_SERVER_NAME, ErrorCode, PROTOCOL_VERSION};
use tracing::{debug, info};

use crate::anchors::ANCHOR_SILENCE;
use crate::anchors::ResolveError;
use crate::anchors::{self, AnchorAddr};
use crate::state::{PendingPairing, StateDir, StateError};

/// Time to wait for each answer of the anchor (except the operator's decision).
pub const STEP_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest a request can wait (the longest code TTL).
pub const MAX_PENDING: Duration = Duration::from_secs(24 * 3600);
/// Longest pause between reconnection attempts while pending.
pub const RETRY_CAP: Duration = Duration::from_secs(30);

/// What the node pairs with.
#[derive(Debug, Clone)]
pub enum PairCode {
    /// A typed PIN.
    Pin(PinCode),
    /// A scanned QR URI (carries the CA fingerprint to pin).
    Qr(QrPayload),
}

/// Options of a pairing with one anchor at a known address.
#[derive(Debug, Clone)]
pub struct PairOptions {
    /// Where the anchor is (as the user gave it; saved for `run`).
    pub anchor: String,
    /// Its resolved address.
    pub anchor_addr: SocketAddr,
    /// The code.
    pub code: PairCode,
    /// Name to ask for.
    pub device_name: String,
    /// Platform string.
    pub platform: String,
}

/// Options of a pairing through any of several anchors ([`pair_any`]).
#[derive(Debug, Clone)]
pub struct PairAnyOptions {
    /// The anchors, in the order to try them (names are resolved at each attempt).
    pub anchors: Vec<AnchorAddr>,
    /// The code.
    pub code: PairCode,
    /// Name to ask for.
    pub device_name: String,
    /// Platform string.
    pub platform: String,
}

/// Progress reported while pairing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PairProgress {
    /// Connected and authenticated by the code; the request waits for an operator.
    Pending {
        /// Request id.
        request_id: String,
        /// Compare this with what the console shows.
        sas: String,
        /// Expiry, Unix ms.
        expires_at_ms: u64,
    },
    /// The connection dropped while pending; retrying after `delay`.
    Reconnecting {
        /// Pause before the next attempt.
        delay: Duration,
        /// Why.
        reason: String,
    },
}

/// A completed pairing.
#[derive(Debug, Clone)]
pub struct Paired {
    /// This device's id.
    pub device_id: DeviceId,
    /// The anchor that completed the pairing, as given (saved for `run`).
    pub anchor: String,
    /// Certificate expiry.
    pub cert_expires_at: SystemTime,
}

/// Why pairing failed. The message is one line, for the CLI.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PairError {
    /// The anchor's name does not resolve (the last one tried, when there were several).
    #[error(transparent)]
    Resolve(#[from] ResolveError),
    /// The anchor could not be reached (the last one tried, when there were several).
    #[error("cannot reach the anchor at {addr}: {reason}")]
    Unreachable {
        /// Address.
        addr: SocketAddr,
        /// Why.
        reason: DialError,
    },
    /// The connection was lost after it was established (retried while a request is
    /// pending).
    #[error("protocol error: connection lost: {0}")]
    ConnectionLost(LostReason),
    /// The anchor refused: wrong code, expired, burned, rejected and so on.
    #[error("{}", describe(*.reason, .message))]
    Refused {
        /// Stable reason.
        reason: PairFailure,
        /// The anchor's message.
        message: String,
    },
    /// The anchor's key confirmation did not verify: wrong code, or someone in the middle.
    #[error("the anchor could not prove it knows the code (wrong code, or a relay in the middle)")]
    AnchorNotAuthenticated,
    /// The anchor broke the protocol: what it did.
    #[error("protocol error: {0}")]
    Protocol(&'static str),
    /// The anchor's handshake message did not verify (the SPAKE2 library's message).
    #[error("protocol error: {0}")]
    Handshake(String),
    /// The certificate the anchor issued cannot be parsed.
    #[error("protocol error: {0}")]
    BadCertificate(anchorage_mesh::pki::PkiError),
    /// The certificate request could not be built (rcgen's message).
    #[error("protocol error: cannot make a CSR: {0}")]
    Csr(String),
    /// No anchor address was given.
    #[error("no anchor address to pair with")]
    NoAnchor,
    /// The pending request expired while the anchor was unreachable.
    #[error("the pairing request expired before it was approved")]
    Expired,
    /// The state directory failed.
    #[error(transparent)]
    State(#[from] StateError),
}

fn describe(reason: PairFailure, message: &str) -> String {
    let head = match reason {
        PairFailure::UnknownCode => "unknown pairing code",
        PairFailure::CodeExpired => "the pairing code has expired",
        PairFailure::CodeConsumed => "the pairing code was already used",
        PairFailure::CodeBurned => "the pairing code is burned after too many wrong attempts",
        // The anchor answers an unknown, expired, used or burned code the same way, so that
        // codes cannot be found by trying ids.
        PairFailure::WrongSecret => {
            "wrong pairing code (or not valid: check it, or ask for a new one)"
        }
        PairFailure::Rejected => "an operator rejected the pairing",
        PairFailure::RequestExpired => "the pairing request expired before an operator approved it",
        PairFailure::UnknownRequest => "the anchor does not know this pairing request",
        PairFailure::DeviceRevoked => "this device is revoked; an operator must remove it first",
        PairFailure::BadCsr => "the anchor refused the certificate request",
        PairFailure::UnsupportedVersion => "the anchor does not support this protocol version",
        PairFailure::Overloaded => "the anchor refused for now",
        _ => "pairing failed",
    };
    // These heads say all there is; the anchor's message for them says it again in other words.
    let complete = matches!(
        reason,
        PairFailure::WrongSecret
            | PairFailure::CodeExpired
            | PairFailure::CodeConsumed
            | PairFailure::CodeBurned
    );
    if complete || message.is_empty() || head.contains(message) {
        head.to_string()
    } else {
        format!("{head}: {message}")
    }
}

/// Why the anchor could not be reached.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DialError {
    /// The TLS configuration could not be built.
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    /// The endpoint refused to start the connection.
    #[error(transparent)]
    Connect(#[from] quinn::ConnectError),
    /// The handshake failed (classified; quinn's message shown).
    #[error("{error}")]
    Handshake {
        /// What the classifier made of it.
        failure: ConnFailure,
        /// quinn's error.
        error: quinn::ConnectionError,
    },
    /// No answer within [`STEP_TIMEOUT`] ([`ANCHOR_SILENCE`] when another anchor was left to
    /// try).
    #[error("timed out")]
    TimedOut,
}

/// How an established pairing connection was lost.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LostReason {
    /// The connection failed or was closed (classified).
    #[error("{error}")]
    Connection {
        /// What the classifier made of it.
        failure: ConnFailure,
        /// quinn's error.
        error: quinn::ConnectionError,
    },
    /// Reading or writing the bootstrap stream failed.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The anchor did not answer within [`STEP_TIMEOUT`].
    #[error("the anchor did not answer")]
    NoAnswer,
    /// The anchor ended the stream.
    #[error("stream ended")]
    StreamEnded,
    /// The anchor ended the connection while the request waited.
    #[error("connection ended by the anchor")]
    EndedByAnchor,
}

impl LostReason {
    fn connection(error: quinn::ConnectionError) -> LostReason {
        LostReason::Connection {
            failure: ConnFailure::classify(&error),
            error,
        }
    }
}

impl PairError {
    /// Whether trying again later (with the same code) could succeed.
    fn is_transient(&self) -> bool {
        matches!(
            self,
            PairError::Unreachable { .. } | PairError::ConnectionLost(_) | PairError::Resolve(_)
        )
    }
}

type Tx = FramedSend<BootstrapRequest>;
type Rx = FramedRecv<BootstrapResponse>;

/// Pairs this node with the anchor at `opts.anchor_addr`: runs the exchange, waits for
/// approval, saves key, certificate and CA.
pub async fn pair(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    opts: &PairOptions,
    progress: impl FnMut(PairProgress),
) -> Result<Paired, PairError> {
    let targets = Targets::fixed(opts.anchor.clone(), opts.anchor_addr);
    let request = Request {
        code: &opts.code,
        device_name: &opts.device_name,
        platform: &opts.platform,
    };
    pair_through(endpoint, state, targets, &request, progress).await
}

/// Pairs this node through the first of `opts.anchors` that answers, as the module docs say.
pub async fn pair_any(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    opts: &PairAnyOptions,
    progress: impl FnMut(PairProgress),
) -> Result<Paired, PairError> {
    let targets = Targets::resolved(&opts.anchors).ok_or(PairError::NoAnchor)?;
    let request = Request {
        code: &opts.code,
        device_name: &opts.device_name,
        platform: &opts.platform,
    };
    pair_through(endpoint, state, targets, &request, progress).await
}

/// What a pairing asks for, besides where.
struct Request<'a> {
    code: &'a PairCode,
    device_name: &'a str,
    platform: &'a str,
}

async fn pair_through(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    mut targets: Targets,
    opts: &Request<'_>,
    mut progress: impl FnMut(PairProgress),
) -> Result<Paired, PairError> {
    let key = state.key_or_generate()?;
    let (code_id, secret, pinned) = match opts.code {
        PairCode::Pin(p) => (p.code_id.to_string(), p.secret.clone(), None),
        PairCode::Qr(q) => (
            q.code_id.to_string(),
            q.secret.clone(),
            Some(q.ca_fingerprint),
        ),
    };
    let conn = targets.dial(endpoint, pinned).await?;
    let (send_s, recv_s) = conn
        .open_bi()
        .await
        .map_err(|e| PairError::ConnectionLost(LostReason::connection(e)))?;
    let (mut tx, mut rx) = framed::<BootstrapRequest, BootstrapResponse>(send_s, recv_s);

    let (handshake, spake_msg) = NodeHandshake::start(&code_id, &secret);
    send(
        &mut tx,
        BootstrapRequest::Hello(PairHello {
            version: PROTOCOL_VERSION,
            code_id: code_id.clone(),
            spake_msg,
        }),
    )
    .await?;
    let BootstrapResponse::Challenge(challenge) = recv(&mut rx).await? else {
        return Err(PairError::Protocol("expected Challenge"));
    };
    let keys = handshake
        .finish(&challenge.spake_msg, &exporter(&conn)?)
        .map_err(|e| PairError::Handshake(e.to_string()))?;
    send(
        &mut tx,
        BootstrapRequest::Confirm(KeyConfirm {
            mac: keys.node_confirmation(),
        }),
    )
    .await?;
    let BootstrapResponse::Confirm(confirm) = recv(&mut rx).await? else {
        return Err(PairError::Protocol("expected Confirm"));
    };
    if !keys.verify_anchor_confirmation(&confirm.mac) {
        anchorage_mesh::framed::close(&conn, ErrorCode::PairingFailed, "anchor not authenticated");
        return Err(PairError::AnchorNotAuthenticated);
    }
    let csr_der = key
        .csr_der(opts.device_name)
        .map_err(|e| PairError::Csr(e.to_string()))?;
    // The request id is derived from the transcript: saved before the CSR goes out, a pairing
    // whose connection drops from here on can resume.
    let mut saved = PendingPairing {
        anchor: targets.first().to_string(),
        anchors: targets.given(),
        request_id: keys.request_id().to_string(),
        sas: keys.sas().to_string(),
        expires_at_ms: unix_ms().saturating_add(MAX_PENDING.as_millis() as u64),
        pinned_ca: pinned.map(|f| f.to_string()),
        keys: keys.after().clone(),
    };
    state.save_pending(&saved)?;
    let mac = keys.csr_mac(&csr_der, opts.device_name, opts.platform);
    let submitted = async {
        send(
            &mut tx,
            BootstrapRequest::Csr(CsrSubmit {
                csr_der,
                device_name: opts.device_name.to_string(),
                platform: opts.platform.to_string(),
                mac,
            }),
        )
        .await?;
        match recv(&mut rx).await? {
            BootstrapResponse::Pending(p) => Ok(p),
            _ => Err(PairError::Protocol("expected Pending")),
        }
    }
    .await;
    let result = match submitted {
        Ok(pending) => {
            saved.expires_at_ms = pending.expires_at_ms;
            state.save_pending(&saved)?;
            progress(PairProgress::Pending {
                request_id: pending.request_id.clone(),
                sas: pending.sas.clone(),
                expires_at_ms: pending.expires_at_ms,
            });
            wait_result(&conn, &mut tx, &mut rx, state, &saved, targets.current()).await
        }
        Err(e) => Err(e),
    };
    match result {
        Err(e) if e.is_transient() => {
            targets.skip();
            resume_loop(endpoint, state, &mut targets, &saved, &mut progress, e).await
        }
        other => other,
    }
}

/// Resumes a pending pairing saved in the state directory (after the process restarted)
/// through `anchors`, tried in order; with none, through the anchors it was started with.
pub async fn resume(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    anchors: &[AnchorAddr],
    mut progress: impl FnMut(PairProgress),
) -> Result<Option<Paired>, PairError> {
    let Some(saved) = state.pending()? else {
        return Ok(None);
    };
    let mut targets = match Targets::resolved(anchors) {
        Some(t) => t,
        None => Targets::resolved(&saved_anchors(&saved)).ok_or(PairError::NoAnchor)?,
    };
    progress(PairProgress::Pending {
        request_id: saved.request_id.clone(),
        sas: saved.sas.clone(),
        expires_at_ms: saved.expires_at_ms,
    });
    match resume_once(endpoint, state, &mut targets, &saved).await {
        Err(e) if e.is_transient() => {
            targets.skip();
            resume_loop(endpoint, state, &mut targets, &saved, &mut progress, e)
                .await
                .map(Some)
        }
        other => other.map(Some),
    }
}

/// The anchors a pending pairing was started with (the one `anchor` of older files).
pub fn saved_anchors(saved: &PendingPairing) -> Vec<AnchorAddr> {
    let list = if saved.anchors.is_empty() {
        std::slice::from_ref(&saved.anchor)
    } else {
        &saved.anchors[..]
    };
    list.iter().filter_map(|a| a.parse().ok()).collect()
}

async fn resume_loop(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    targets: &mut Targets,
    saved: &PendingPairing,
    progress: &mut impl FnMut(PairProgress),
    mut last: PairError,
) -> Result<Paired, PairError> {
    let mut delay = Duration::from_millis(500);
    loop {
        if unix_ms() >= saved.expires_at_ms {
            state.clear_pending();
            return Err(PairError::Expired);
        }
        progress(PairProgress::Reconnecting {
            delay,
            reason: last.to_string(),
        });
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(RETRY_CAP);
        match resume_once(endpoint, state, targets, saved).await {
            Err(e) if e.is_transient() => {
                // The next try starts with the anchor after the one that went away.
                targets.skip();
                last = e;
            }
            other => return other,
        }
    }
}

async fn resume_once(
    endpoint: &quinn::Endpoint,
    state: &StateDir,
    targets: &mut Targets,
    saved: &PendingPairing,
) -> Result<Paired, PairError> {
    let pinned = saved
        .pinned_ca
        .as_deref()
        .and_then(|s| s.parse::<Fingerprint>().ok());
    let conn = targets.dial(endpoint, pinned).await?;
    let (send_s, recv_s) = conn
        .open_bi()
        .await
        .map_err(|e| PairError::ConnectionLost(LostReason::connection(e)))?;
    let (mut tx, mut rx) = framed::<BootstrapRequest, BootstrapResponse>(send_s, recv_s);
    let proof = saved
        .keys
        .resume_proof(&saved.request_id, &exporter(&conn)?);
    send(
        &mut tx,
        BootstrapRequest::Resume(PairResume {
            version: PROTOCOL_VERSION,
            request_id: saved.request_id.clone(),
            proof,
        }),
    )
    .await?;
    wait_result(&conn, &mut tx, &mut rx, state, saved, targets.current()).await
}

/// Waits for the operator's decision on `conn` to the anchor given as `anchor`.
async fn wait_result(
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    state: &StateDir,
    saved: &PendingPairing,
    anchor: &str,
) -> Result<Paired, PairError> {
    loop {
        // The operator may take until the request expires; the anchor ends it then.
        let msg = match rx.recv().await {
            Ok(Some(m)) => m,
            Ok(None) => return Err(PairError::ConnectionLost(LostReason::EndedByAnchor)),
            Err(e) => return Err(PairError::ConnectionLost(e.into())),
        };
        match msg {
            BootstrapResponse::Pending(_) => continue,
            BootstrapResponse::Approved(approved) => {
                if !saved.keys.verify_approved_mac(
                    &saved.request_id,
                    &approved.cert_der,
                    &approved.ca_der,
                    &approved.mac,
                ) {
                    return Err(PairError::Protocol("the certificate's MAC does not verify"));
                }
                if let Some(pin) = &saved.pinned_ca
                    && Fingerprint::of(&approved.ca_der).to_string() != *pin
                {
                    return Err(PairError::Protocol("the CA does not match the QR code"));
                }
                let info = anchorage_mesh::pki::parse_cert(&approved.cert_der)
                    .map_err(PairError::BadCertificate)?;
                let key = state
                    .key()?
                    .ok_or_else(|| StateError::NotPaired(state.path().into()))?;
                if info.key_id != key.device_id() {
                    return Err(PairError::Protocol("the certificate is not for this key"));
                }
                state.save_certificate(&approved.cert_der, &approved.ca_der)?;
                state.save_anchor(anchor)?;
                // The anchors of an earlier pairing must not outlive it.
                match anchors::parse_list(&saved.anchors) {
                    Ok(list) if !list.is_empty() => state.save_anchors(&list)?,
                    _ => state.clear_anchors(),
                }
                state.clear_pending();
                // Tell the anchor the files are safe: it marks the request completed.
                let _ = tx.finish();
                let _ = tokio::time::timeout(Duration::from_secs(2), conn.closed()).await;
                info!(device_id = %info.key_id, %anchor, "paired");
                return Ok(Paired {
                    device_id: info.key_id,
                    anchor: anchor.to_string(),
                    cert_expires_at: info.not_after,
                });
            }
            BootstrapResponse::Failed(f) => {
                if matches!(
                    f.reason,
                    PairFailure::Rejected
                        | PairFailure::RequestExpired
                        | PairFailure::UnknownRequest
                ) {
                    state.clear_pending();
                }
                anchorage_mesh::framed::close(conn, ErrorCode::NoError, "");
                return Err(PairError::Refused {
                    reason: f.reason,
                    message: f.message,
                });
            }
            _ => {
                return Err(PairError::Protocol("unexpected message while pending"));
            }
        }
    }
}

/// An anchor to pair through: as given, and its address when it is fixed (else resolved at
/// each attempt).
#[derive(Debug, Clone)]
struct Target {
    given: String,
    fixed: Option<SocketAddr>,
}

/// The anchors of a pairing and the one in use.
#[derive(Debug)]
struct Targets {
    list: Vec<Target>,
    current: usize,
}

impl Targets {
    fn fixed(given: String, addr: SocketAddr) -> Targets {
        Targets {
            list: vec![Target {
                given,
                fixed: Some(addr),
            }],
            current: 0,
        }
    }

    /// `None` when `anchors` is empty.
    fn resolved(anchors: &[AnchorAddr]) -> Option<Targets> {
        let list: Vec<Target> = anchors
            .iter()
            .map(|a| Target {
                given: a.to_string(),
                fixed: a.literal(),
            })
            .collect();
        (!list.is_empty()).then_some(Targets { list, current: 0 })
    }

    fn first(&self) -> &str {
        &self.list[0].given
    }

    fn current(&self) -> &str {
        &self.list[self.current].given
    }

    fn given(&self) -> Vec<String> {
        self.list.iter().map(|t| t.given.clone()).collect()
    }

    /// Moves past the anchor in use (it went away).
    fn skip(&mut self) {
        self.current = (self.current + 1) % self.list.len();
    }

    /// Connects to the anchor in use or, failing that, to the next ones: one round at most.
    /// Returns the last failure when none answered.
    async fn dial(
        &mut self,
        endpoint: &quinn::Endpoint,
        pinned: Option<Fingerprint>,
    ) -> Result<quinn::Connection, PairError> {
        // With another anchor to try, one that does not answer is not waited on for long.
        let limit = if self.list.len() > 1 {
            ANCHOR_SILENCE
        } else {
            STEP_TIMEOUT
        };
        let mut last = None;
        for _ in 0..self.list.len() {
            let target = &self.list[self.current];
            let addr = match target.fixed {
                Some(a) => Ok(a),
                None => crate::anchors::resolve(&target.given).await,
            };
            let result = match addr {
                Ok(addr) => connect(endpoint, addr, pinned, limit).await,
                Err(e) => Err(e.into()),
            };
            match result {
                Ok(conn) => return Ok(conn),
                Err(e) => {
                    debug!(anchor = %target.given, error = %e, "cannot pair through this anchor");
                    last = Some(e);
                    self.skip();
                }
            }
        }
        Err(last.unwrap_or(PairError::NoAnchor))
    }
}

async fn connect(
    endpoint: &quinn::Endpoint,
    addr: SocketAddr,
    pinned: Option<Fingerprint>,
    limit: Duration,
) -> Result<quinn::Connection, PairError> {
    let unreachable = |reason: DialError| PairError::Unreachable { addr, reason };
    let config = tls::bootstrap_client_config(pinned).map_err(|e| unreachable(e.into()))?;
    let connecting = endpoint
        .connect_with(config, addr, ANCHOR_SERVER_NAME)
        .map_err(|e| unreachable(e.into()))?;
    match tokio::time::timeout(limit, connecting).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(error)) => Err(unreachable(DialError::Handshake {
            failure: ConnFailure::classify(&error),
            error,
        })),
        Err(_) => Err(unreachable(DialError::TimedOut)),
    }
}

/// When the probe datagrams of [`port_unreachable`] are sent, from its start.
const PROBE_AT: [Duration; 4] = [
    Duration::ZERO,
    Duration::from_millis(500),
    Duration::from_millis(1500),
    Duration::from_millis(3500),
];

/// Resolves when the network says that nothing listens on UDP `addr`; never resolves
/// otherwise (race it against the handshake).
///
/// quinn's socket is not connected, so the ICMP "port unreachable" a host answers for a closed
/// port never reaches the handshake, which waits for its timeout. This sends a one-byte
/// datagram (too short for a QUIC packet: an anchor drops it) from a connected socket of its
/// own at each of [`PROBE_AT`], where the kernel reports that ICMP as `ECONNREFUSED`
/// (Linux and the BSDs do). A dropped datagram, a firewall or a silent host tell nothing.
/// It sends real datagrams: only for real networks, not simulated ones.
pub async fn port_unreachable(addr: SocketAddr) {
    let local: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let Ok(socket) = tokio::net::UdpSocket::bind(local).await else {
        return std::future::pending().await;
    };
    if socket.connect(addr).await.is_err() {
        return std::future::pending().await;
    }
    let start = tokio::time::Instant::now();
    let mut buf = [0u8; 64];
    for (i, at) in PROBE_AT.iter().enumerate() {
        tokio::time::sleep_until(start + *at).await;
        if is_refused(socket.send(&[0]).await.err()) {
            return;
        }
        let until = start
            + PROBE_AT
                .get(i + 1)
                .copied()
                .unwrap_or(Duration::from_secs(5));
        // Anything but a refusal (an answer, a timeout, another error) tells nothing.
        if let Ok(Err(e)) = tokio::time::timeout_at(until, socket.recv(&mut buf)).await
            && is_refused(Some(e))
        {
            return;
        }
    }
    std::future::pending().await
}

fn is_refused(e: Option<std::io::Error>) -> bool {
    e.is_some_and(|e| e.kind() == std::io::ErrorKind::ConnectionRefused)
}

fn exporter(conn: &quinn::Connection) -> Result<[u8; EXPORTER_LEN], PairError> {
    let mut out = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut out, EXPORTER_LABEL, b"")
        .map_err(|_| PairError::Protocol("TLS exporter unavailable"))?;
    Ok(out)
}

async fn send(tx: &mut Tx, msg: BootstrapRequest) -> Result<(), PairError> {
    tx.send(&msg)
        .await
        .map_err(|e| PairError::ConnectionLost(e.into()))
}

async fn recv(rx: &mut Rx) -> Result<BootstrapResponse, PairError> {
    match tokio::time::timeout(STEP_TIMEOUT, rx.recv()).await {
        Err(_) => Err(PairError::ConnectionLost(LostReason::NoAnswer)),
        Ok(Ok(Some(BootstrapResponse::Failed(f)))) => Err(PairError::Refused {
            reason: f.reason,
            message: f.message,
        }),
        Ok(Ok(Some(m))) => Ok(m),
        Ok(Ok(None)) => Err(PairError::ConnectionLost(LostReason::StreamEnded)),
        Ok(Err(e)) => {
            debug!(error = %e, "bootstrap read failed");
            Err(PairError::ConnectionLost(e.into()))
        }
    }
}

fn unix_ms() -> u64 {
    u64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

pub use crate::capability::platform;

/// Why a pairing code given by a user was not accepted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CodeError {
    /// The PIN or QR URI is malformed.
    #[error(transparent)]
    Malformed(#[from] anchorage_mesh::pairing::PairingCryptoError),
    /// Neither or both of a PIN and a QR URI were given.
    #[error("give exactly one of --code, --code-stdin or --qr")]
    OneOf,
}

/// Parses what a user gave as `--code` (a PIN, or a QR URI pasted there) or `--qr` (a URI).
pub fn parse_code(pin: Option<&str>, qr: Option<&str>) -> Result<PairCode, CodeError> {
    match (pin, qr) {
        (Some(p), None) if p.trim().starts_with("anchorage://") => {
            Ok(PairCode::Qr(p.trim().parse::<QrPayload>()?))
        }
        (Some(p), None) => Ok(PairCode::Pin(p.parse::<PinCode>()?)),
        (None, Some(q)) => Ok(PairCode::Qr(q.parse::<QrPayload>()?)),
        _ => Err(CodeError::OneOf),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_refusal_about_the_code_says_it_once() {
        let e = PairError::Refused {
            reason: PairFailure::CodeBurned,
            message: "the pairing code was burned after too many wrong attempts".into(),
        };
        assert_eq!(
            e.to_string(),
            "the pairing code is burned after too many wrong attempts"
        );
        let e = PairError::Refused {
            reason: PairFailure::Overloaded,
            message: "try again in 3 s".into(),
        };
        assert_eq!(
            e.to_string(),
            "the anchor refused for now: try again in 3 s"
        );
    }

    #[tokio::test]
    async fn a_closed_udp_port_is_reported_by_the_probe() {
        let closed = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = closed.local_addr().unwrap();
        drop(closed);
        tokio::time::timeout(Duration::from_secs(10), port_unreachable(addr))
            .await
            .expect("ICMP port unreachable on loopback is seen");
        // A port something listens on (and does not answer) tells nothing.
        let open = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let quiet = tokio::time::timeout(
            Duration::from_secs(1),
            port_unreachable(open.local_addr().unwrap()),
        )
        .await;
        assert!(quiet.is_err());
    }

    #[test]
    fn codes_are_a_pin_or_a_qr_uri_and_exactly_one() {
        assert!(matches!(
            parse_code(Some("K7QF-M2XA-482913"), None),
            Ok(PairCode::Pin(_))
        ));
        assert!(matches!(
            parse_code(Some("not a pin"), None),
            Err(CodeError::Malformed(_))
        ));
        assert!(matches!(
            parse_code(None, Some("anchorage://pair?nonsense")),
            Err(CodeError::Malformed(_))
        ));
        // A QR URI pasted as --code is read as one.
        assert!(matches!(
            parse_code(Some(" anchorage://pair?x"), None),
            Err(CodeError::Malformed(_))
        ));
        for (pin, qr) in [
            (None, None),
            (Some("K7QF-M2XA-482913"), Some("anchorage://pair")),
        ] {
            let err = parse_code(pin, qr).unwrap_err();
            assert!(matches!(err, CodeError::OneOf), "{err}");
            assert!(err.to_string().contains("--code"), "{err}");
        }
    }
}
