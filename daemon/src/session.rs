//! One enrolled node's connection (IO driver): the control stream, registration, heartbeats,
//! renewal and rotation.
//!
//! A session exists from a successful `Register` until the connection ends. Registration,
//! heartbeats and the end of the session go to the node table; once registered, the node's
//! waiting invocations are offered to this session.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anchorage_mesh::CertInfo;
use anchorage_mesh::framed::{FramedRecv, FramedSend, close, framed};
use anchorage_wire::control::*;
use anchorage_wire::datagram::Datagram;
use anchorage_wire::{ErrorCode, PROTOCOL_VERSION};
use tracing::{debug, info, warn};

use crate::events::AnchorEvent;
use crate::nodes::{Registration, SessionHandle, SessionId};
use crate::records::{CapabilityRecord, DeviceTrust};
use crate::services::Services;
use crate::store::blocking;

/// Time a node has to open its control stream and register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);

type Tx = FramedSend<ControlDown>;
type Rx = FramedRecv<ControlUp>;

fn cap_record(c: &CapabilityInfo) -> CapabilityRecord {
    CapabilityRecord {
        name: c.name.clone(),
        available: c.available,
        reason: c.reason.clone(),
        description: c.description.clone(),
    }
}

/// Why the anchor refuses or ends a node's session: the one place where each maps to the
/// QUIC application close code and reason the node sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    /// The certificate is valid but the device is not in the registry.
    UnknownDevice,
    /// The device is revoked.
    Revoked,
    /// No control stream within [`REGISTER_TIMEOUT`].
    NoControlStream,
    /// No `Register` within [`REGISTER_TIMEOUT`].
    NoRegistration,
    /// The first message was not `Register`, or a second one came.
    NotRegisterFirst,
    /// A second `Register` on a registered session.
    AlreadyRegistered,
    /// A frame that does not decode (the framing layer's own code).
    BadFrame(ErrorCode),
    /// A protocol version this anchor does not speak.
    UnsupportedVersion,
    /// The anchor failed (store); not the node's fault.
    Internal,
}

impl Refusal {
    fn close(self, conn: &quinn::Connection) {
        let (code, reason) = match self {
            Refusal::UnknownDevice => (ErrorCode::Unauthenticated, "unknown device; pair it first"),
            Refusal::Revoked => (ErrorCode::Revoked, "device revoked"),
            Refusal::NoControlStream => (ErrorCode::Timeout, "no control stream"),
            Refusal::NoRegistration => (ErrorCode::Timeout, "no registration"),
            Refusal::NotRegisterFirst => (
                ErrorCode::ProtocolViolation,
                "the first message must be Register",
            ),
            Refusal::AlreadyRegistered => (ErrorCode::ProtocolViolation, "already registered"),
            Refusal::BadFrame(code) => (code, "bad frame on the control stream"),
            Refusal::UnsupportedVersion => (
                ErrorCode::UnsupportedVersion,
                "unsupported protocol version",
            ),
            Refusal::Internal => (ErrorCode::Internal, "internal error"),
        };
        close(conn, code, reason);
    }
}

/// Serves an enrolled node's connection until it ends.
///
/// Not an `async fn`: the future lives as long as the node stays connected, and one would keep
/// its arguments (the whole certificate) beside the session for all that time.
pub fn serve(
    services: Arc<Services>,
    conn: quinn::Connection,
    cert: CertInfo,
    renewal_only: bool,
) -> impl Future<Output = ()> {
    let device = cert.key_id;
    let not_after = cert.not_after;
    drop(cert);
    // Called inside the connection's span (`anchor::spawn_incoming`), which has the field.
    tracing::Span::current().record("device_id", tracing::field::display(&device));
    async move {
        let (rotation_pending, register, mut tx, mut rx) =
            match accept(&services, &conn, &device).await {
                Ok(a) => a,
                Err(None) => return,
                Err(Some(refusal)) => {
                    if refusal == Refusal::UnknownDevice {
                        services.metrics.handshake_failure("unknown_device");
                    }
                    refusal.close(&conn);
                    return;
                }
            };
        // In the QUIC counters from here until the session ends.
        let _tracked = services.metrics.track_connection(&conn);
        if renewal_only {
            serve_renewal_only(&services, &conn, &mut tx, &mut rx, &device, not_after).await;
            return;
        }
        let registration = Registration {
            name: register.name,
            platform: register.platform,
            agent_version: register.agent_version,
            capabilities: register.capabilities.iter().map(cap_record).collect(),
        };
        run_session(
            services,
            conn,
            device,
            rotation_pending,
            registration,
            tx,
            rx,
        )
        .await;
    }
}

/// Checks the device and takes its registration. `Err(None)`: the node went away.
async fn accept(
    services: &Arc<Services>,
    conn: &quinn::Connection,
    device: &anchorage_mesh::DeviceId,
) -> Result<(bool, Register, Tx, Rx), Option<Refusal>> {
    // The trust directory follows the store's watch: no store read per registration (a
    // restarted anchor takes all of its nodes back at once). A device it does not hold yet
    // may have paired on another anchor a moment ago: the store has the last word.
    let record = match services.trust.directory_device(device) {
        Some(r) => r,
        None => {
            let s = services.clone();
            let d = *device;
            match blocking(move || s.trust.device(&d)).await {
                Ok(Some(r)) => std::sync::Arc::new(r),
                Ok(None) => return Err(Some(Refusal::UnknownDevice)),
                Err(e) => {
                    warn!(error = %e, "store read failed");
                    return Err(Some(Refusal::Internal));
                }
            }
        }
    };
    if record.trust != DeviceTrust::Trusted {
        return Err(Some(Refusal::Revoked));
    }
    let (send, recv) = match tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi()).await {
        Ok(Ok(s)) => s,
        Ok(Err(_)) => return Err(None),
        Err(_) => return Err(Some(Refusal::NoControlStream)),
    };
    let (tx, mut rx) = framed::<ControlDown, ControlUp>(send, recv);
    let register = match tokio::time::timeout(REGISTER_TIMEOUT, rx.recv()).await {
        Ok(Ok(Some(ControlUp::Register(r)))) => r,
        Ok(Ok(Some(_))) => return Err(Some(Refusal::NotRegisterFirst)),
        Ok(Err(e)) if e.is_peer_fault() => return Err(Some(Refusal::BadFrame(e.code()))),
        Ok(_) => return Err(None),
        Err(_) => return Err(Some(Refusal::NoRegistration)),
    };
    if register.version != PROTOCOL_VERSION {
        return Err(Some(Refusal::UnsupportedVersion));
    }
    Ok((record.rotation_pending, register, tx, rx))
}

async fn serve_renewal_only(
    services: &Arc<Services>,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    device: &anchorage_mesh::DeviceId,
    not_after: SystemTime,
) {
    let grace_ends = crate::clock::to_ms(not_after + services.config.renewal_grace);
    if tx
        .send(&ControlDown::RenewalOnly(RenewalOnly {
            grace_ends_ms: grace_ends,
        }))
        .await
        .is_err()
    {
        return;
    }
    loop {
        match tokio::time::timeout(REGISTER_TIMEOUT, rx.recv()).await {
            Ok(Ok(Some(ControlUp::Renew(req)))) => {
                let renewed = renew(services, device, req.csr_der).await;
                let ok = matches!(renewed, ControlDown::Renewed(_));
                let _ = tx.send(&renewed).await;
                let _ = tx.finish();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn.closed()).await;
                let reason = if ok {
                    "renewed; reconnect with the new certificate"
                } else {
                    "renewal refused"
                };
                close(conn, ErrorCode::CertificateExpired, reason);
                return;
            }
            // Events are ignored: nothing but renewal is served here.
            Ok(Ok(Some(ControlUp::Event(_)))) => continue,
            Ok(Ok(Some(ControlUp::Register(_)))) => {
                Refusal::AlreadyRegistered.close(conn);
                return;
            }
            _ => {
                close(
                    conn,
                    ErrorCode::CertificateExpired,
                    "certificate expired; renew",
                );
                return;
            }
        }
    }
}

/// The registered node's session: what the anchor sends it, what it reads from its control
/// stream, until either side ends it.
///
/// Not an `async fn`: the future lives as long as the node stays connected, and an `async fn`
/// keeps a second copy of each argument beside the one it moved into its body.
#[expect(
    clippy::manual_async_fn,
    reason = "an async fn holds its arguments twice for the session's lifetime"
)]
fn run_session(
    services: Arc<Services>,
    conn: quinn::Connection,
    device: anchorage_mesh::DeviceId,
    rotation_pending: bool,
    registration: Registration,
    mut tx: Tx,
    mut rx: Rx,
) -> impl Future<Output = ()> {
    async move {
        {
            let interval = services.config.presence.heartbeat_interval;
            let registered = ControlDown::Registered(Registered {
                version: PROTOCOL_VERSION,
                heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
                anchor_time_ms: services.clock.now_ms(),
                device_id: device.to_string(),
            });
            if tx.send(&registered).await.is_err() {
                return;
            }
        }
        // Only the mesh needs the name again, once: the node table keeps the registration.
        let name = registration.name.clone();
        info!(%name, remote = %conn.remote_address(), "node registered");
        let session: SessionId =
            services
                .nodes
                .register(device, SessionHandle { conn: conn.clone() }, registration);
        // Boxed, like every await that only registration takes: the session's future is held for
        // as long as the node is connected, sized by its largest await (these two were two thirds
        // of it).
        let work = if services.stores.runtime.shared() {
            // Work other anchors queued for the node while it was elsewhere (or nowhere).
            let store = services.stores.runtime.clone();
            let pending = blocking(move || store.pending_for(&device))
                .await
                .unwrap_or_else(|e| {
                    warn!(error = %e, "cannot read the node's pending invocations");
                    Vec::new()
                });
            Box::pin(services.invocations.adopt(pending, &device, session)).await
        } else {
            Box::pin(services.invocations.session_up(&device, session)).await
        };
        crate::dispatch::spawn(&services, work);
        let mut anchors = services.anchors.subscribe();
        anchors.mark_changed();
        let mut revoked = services.trust.revocation().subscribe();
        revoked.mark_changed();
        let mut mesh = services.mesh.join(device, session, &name, conn.clone());
        drop(name);
        // An operator's rotation reaches a connected node through its mesh queue: one asked for
        // since the device record was read, before the join, is in the directory instead.
        let rotate = rotation_pending
            || services
                .trust
                .directory_device(&device)
                .is_some_and(|d| d.rotation_pending);
        if rotate {
            let _ = tx.send(&ControlDown::RotateNow).await;
        }
        // Datagrams (heartbeats, result copies) on a task of their own, ended with the session: a
        // heartbeat then wakes that loop alone. In the select below, each wake dropped and made
        // again the waits on every source, some shared by every session (the watch channels, the
        // shutdown token), and at 10,000 nodes that was a good part of a heartbeat's cost.
        let _datagrams = services.spawn_scoped(read_datagrams(
            services.clone(),
            conn.clone(),
            device,
            session,
        ));
        // None until the first directory is sent (an empty one too: the node may hold one from
        // an earlier session); the first waits for the revocation set.
        let mut directory = None;
        let mut revoked_sent = false;
        let mut relay_taken = false;
        let reason = loop {
            tokio::select! {
                changed = mesh.generation.changed(), if revoked_sent => {
                    if changed.is_err() {
                        break "anchor shutting down";
                    }
                    mesh.generation.borrow_and_update();
                    if send_directory(&services, &device, &mut directory, &mut tx).await.is_err() {
                        break "control stream lost";
                    }
                }
                Some(down) = mesh.down.recv() => {
                    if tx.send(&down).await.is_err() {
                        break "control stream lost";
                    }
                }
                changed = revoked.changed() => {
                    if changed.is_err() {
                        break "anchor shutting down";
                    }
                    revoked.borrow_and_update();
                    if send_revoked(&services, &mut tx).await.is_err() {
                        break "control stream lost";
                    }
                    revoked_sent = true;
                }
                changed = anchors.changed() => {
                    if changed.is_err() {
                        break "anchor shutting down";
                    }
                    let addrs = anchors.borrow_and_update().clone();
                    if !addrs.is_empty()
                        && tx.send(&ControlDown::Anchors(AnchorList { addrs })).await.is_err()
                    {
                        break "control stream lost";
                    }
                }
                msg = rx.recv() => match msg {
                    Ok(Some(ControlUp::Event(NodeEvent::Stopping { reason }))) => {
                        debug!(%reason, "node stopping");
                        services.nodes.stopping(&device, session);
                        break "node stopping";
                    }
                    Ok(Some(ControlUp::Event(NodeEvent::CapabilityChanged(cap)))) => {
                        services.nodes.capability_changed(&device, session, cap_record(&cap));
                    }
                    Ok(Some(ControlUp::Renew(req))) => {
                        let reply = renew(&services, &device, req.csr_der).await;
                        if tx.send(&reply).await.is_err() {
                            break "control stream lost";
                        }
                    }
                    Ok(Some(ControlUp::Register(_))) => {
                        Refusal::AlreadyRegistered.close(&conn);
                        break "protocol violation";
                    }
                    Ok(Some(ControlUp::Candidates(c))) => {
                        let kept = services.mesh.set_candidates(&device, session, &c.addrs);
                        if kept < c.addrs.len() {
                            debug!(dropped = c.addrs.len() - kept, "dropped bad candidates");
                        }
                    }
                    Ok(Some(ControlUp::Services(list))) => {
                        services.mesh.set_services(&device, session, &list.names);
                    }
                    Ok(Some(ControlUp::Rendezvous(r))) => {
                        let reply = services.mesh.rendezvous(
                            &services.policy.current(),
                            |p| services.nodes.held_elsewhere(p),
                            &device,
                            session,
                            &r.peer,
                        );
                        if tx.send(&reply).await.is_err() {
                            break "control stream lost";
                        }
                    }
                    Ok(Some(ControlUp::Paths(report))) => {
                        services.mesh.set_paths(&device, session, report.paths);
                    }
                    Ok(None) => break "control stream finished",
                    Err(e) => {
                        if e.is_peer_fault() {
                            Refusal::BadFrame(e.code()).close(&conn);
                        }
                        break "control stream failed";
                    }
                },
                // Besides the control stream a node opens one relay stream, and nothing else.
                stream = conn.accept_bi() => match stream {
                    Ok(stream) if !relay_taken => {
                        relay_taken = true;
                        services.spawn(crate::peering::serve_relay(
                            services.clone(),
                            device,
                            session,
                            stream,
                        ));
                    }
                    Ok(stream) => {
                        debug!("refused an unexpected stream");
                        crate::streams::refuse(&services.metrics, stream);
                    }
                    Err(_) => break "connection closed",
                },
                _ = services.cancel.cancelled() => break "anchor shutting down",
            }
        };
        debug!(reason, "node session ended");
        services.mesh.leave(&device, session);
        services.nodes.disconnected(&device, session);
    }
}

/// Sends the node the whole revocation set: one list that replaces what it held, then as
/// many more as the set needs.
async fn send_revoked(services: &Services, tx: &mut Tx) -> Result<(), ()> {
    use anchorage_wire::limits::MAX_REVOKED;
    let (devices, serials) = services.trust.revocation().snapshot();
    let devices: Vec<String> = devices.iter().map(ToString::to_string).collect();
    let parts = devices
        .len()
        .div_ceil(MAX_REVOKED)
        .max(serials.len().div_ceil(MAX_REVOKED))
        .max(1);
    for part in 0..parts {
        let slice = |n: usize| (part * MAX_REVOKED).min(n)..((part + 1) * MAX_REVOKED).min(n);
        let list = RevokedList {
            replace: part == 0,
            devices: devices[slice(devices.len())].to_vec(),
            serials: serials[slice(serials.len())].to_vec(),
        };
        tx.send(&ControlDown::Revoked(list)).await.map_err(|_| ())?;
    }
    Ok(())
}

/// Sends the node its directory unless it is `last` (what it got before): one message that
/// replaces what it held, then as many more as the directory needs.
async fn send_directory(
    services: &Services,
    device: &anchorage_mesh::DeviceId,
    last: &mut Option<Vec<anchorage_wire::peer::PeerEntry>>,
    tx: &mut Tx,
) -> Result<(), ()> {
    use anchorage_wire::peer::{Directory, MAX_DIRECTORY_CHUNK};
    let policy = services.policy.current();
    let peers = services.mesh.directory(&policy.policy, device);
    if last.as_ref() == Some(&peers) {
        return Ok(());
    }
    let total = u32::try_from(peers.len()).unwrap_or(u32::MAX);
    let mut chunks = peers.chunks(MAX_DIRECTORY_CHUNK);
    let first = chunks.next().unwrap_or_default();
    tx.send(&ControlDown::Directory(Directory {
        replace: true,
        policy_version: policy.version,
        total,
        peers: first.to_vec(),
    }))
    .await
    .map_err(|_| ())?;
    for chunk in chunks {
        tx.send(&ControlDown::Directory(Directory {
            replace: false,
            policy_version: policy.version,
            total,
            peers: chunk.to_vec(),
        }))
        .await
        .map_err(|_| ())?;
    }
    *last = Some(peers);
    Ok(())
}

/// A datagram on a node session: a heartbeat is recorded (QUIC's own ACK answers it: an
/// ack datagram back would make the node's stack send an ACK-only packet, a second received
/// packet per heartbeat); a result copy goes to the dispatch waiting for it.
/// Takes the node's datagrams until its connection closes.
async fn read_datagrams(
    services: Arc<Services>,
    conn: quinn::Connection,
    device: anchorage_mesh::DeviceId,
    session: SessionId,
) {
    while let Ok(bytes) = conn.read_datagram().await {
        datagram(&services, &device, session, &bytes);
    }
}

fn datagram(
    services: &Services,
    device: &anchorage_mesh::DeviceId,
    session: SessionId,
    bytes: &[u8],
) {
    let dg = match Datagram::decode(bytes) {
        Ok(dg) if dg.validate().is_ok() => dg,
        Ok(_) | Err(_) => {
            debug!(device_id = %device, "dropped a datagram that does not decode");
            services.metrics.datagram_dropped("malformed");
            return;
        }
    };
    match dg {
        Datagram::Heartbeat(hb) => {
            services.nodes.heartbeat(device, session, hb.seq);
        }
        Datagram::ResultCopy(copy) => {
            // Late (the stream answered first) or not this node's: nothing waits for it.
            services.invocations.copies().deliver(device, session, copy);
        }
        _ => {
            debug!(device_id = %device, "dropped a datagram a node does not send");
            services.metrics.datagram_dropped("unexpected");
        }
    }
}

/// Signs a renewal CSR for `device` (same key only).
async fn renew(
    services: &Arc<Services>,
    device: &anchorage_mesh::DeviceId,
    csr_der: Vec<u8>,
) -> ControlDown {
    let s = services.clone();
    let d = *device;
    let result = tokio::task::spawn_blocking(move || s.trust.renew(&d, &csr_der)).await;
    match result {
        Ok(Ok((cert_der, ca_der))) => {
            services
                .events
                .publish(AnchorEvent::DeviceRotated { device: *device });
            ControlDown::Renewed(Renewed { cert_der, ca_der })
        }
        Ok(Err(message)) => ControlDown::RenewRefused(RenewRefused { message }),
        Err(e) => {
            warn!(error = %e, "renewal task failed");
            ControlDown::RenewRefused(RenewRefused {
                message: "internal error".into(),
            })
        }
    }
}
