//! One enrolled node's connection: the control stream, registration, renewal and rotation.
//!
//! A session exists from a successful `Register` until the connection ends. A newer
//! connection from the same device replaces the older one (closed with `Replaced`), so a
//! device never shows two sessions and a stale session can never mark it online.

use std::time::Duration;

use anchorage_mesh::framed::{FramedRecv, FramedSend, close, framed};
use anchorage_mesh::{CertInfo, DeviceId};
use anchorage_wire::control::*;
use anchorage_wire::{ErrorCode, PROTOCOL_VERSION};
use tokio::sync::mpsc;
use tracing::{Instrument, debug, info, info_span, warn};

use crate::anchor::Anchor;
use crate::records::{DeviceRecord, DeviceTrust};
use crate::store::Space;
use crate::trust::audit;

/// Time a node has to open its control stream and register.
pub const REGISTER_TIMEOUT: Duration = Duration::from_secs(15);
/// Commands queued per session before senders wait.
pub const COMMAND_BUFFER: usize = 16;

/// A handle on a live session.
#[derive(Debug, Clone)]
pub(crate) struct SessionHandle {
    pub id: u64,
    pub conn: quinn::Connection,
    pub cmd: mpsc::Sender<Command>,
}

/// Things other tasks ask of a session.
#[derive(Debug)]
pub(crate) enum Command {
    /// Tell the node to renew now.
    Rotate,
}

/// Closes a device's live session, if any, with `code`.
pub(crate) fn close_session(anchor: &Anchor, device: &DeviceId, code: ErrorCode, reason: &str) {
    let handle = anchor
        .shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(device);
    if let Some(h) = handle {
        info!(device_id = %device, %code, "closing node session");
        close(&h.conn, code, reason);
    }
}

/// Asks a connected node to rotate its certificate (a no-op when it is not connected: it is
/// told at its next registration).
pub(crate) fn request_rotation(anchor: &Anchor, device: &DeviceId) {
    let handle = anchor
        .shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(device)
        .cloned();
    if let Some(h) = handle {
        let _ = h.cmd.try_send(Command::Rotate);
    }
}

type Tx = FramedSend<ControlDown>;
type Rx = FramedRecv<ControlUp>;

/// Serves an enrolled node's connection until it ends.
pub(crate) async fn serve_node(
    anchor: Anchor,
    conn: quinn::Connection,
    cert: CertInfo,
    renewal_only: bool,
) {
    let device = cert.key_id;
    let span = info_span!("node", device_id = %device);
    async move {
        let record = match anchor.device_record(&device) {
            Ok(Some(r)) => r,
            Ok(None) => {
                anchor.shared.metrics.handshake_failure("unknown_device");
                close(
                    &conn,
                    ErrorCode::Unauthenticated,
                    "unknown device; pair it first",
                );
                return;
            }
            Err(e) => {
                warn!(error = %e, "store read failed");
                close(&conn, ErrorCode::Internal, "internal error");
                return;
            }
        };
        if record.trust != DeviceTrust::Trusted {
            close(&conn, ErrorCode::Revoked, "device revoked");
            return;
        }
        let (send, recv) = match tokio::time::timeout(REGISTER_TIMEOUT, conn.accept_bi()).await {
            Ok(Ok(s)) => s,
            Ok(Err(_)) => return,
            Err(_) => {
                close(&conn, ErrorCode::Timeout, "no control stream");
                return;
            }
        };
        let (mut tx, mut rx) = framed::<ControlDown, ControlUp>(send, recv);
        let register = match tokio::time::timeout(REGISTER_TIMEOUT, rx.recv()).await {
            Ok(Ok(Some(ControlUp::Register(r)))) => r,
            Ok(Ok(Some(_))) => {
                close(
                    &conn,
                    ErrorCode::ProtocolViolation,
                    "the first message must be Register",
                );
                return;
            }
            Ok(Err(e)) if e.is_peer_fault() => {
                close(&conn, e.code(), "bad frame");
                return;
            }
            Ok(_) => return,
            Err(_) => {
                close(&conn, ErrorCode::Timeout, "no registration");
                return;
            }
        };
        if register.version != PROTOCOL_VERSION {
            close(
                &conn,
                ErrorCode::UnsupportedVersion,
                "unsupported protocol version",
            );
            return;
        }
        if renewal_only {
            serve_renewal_only(&anchor, &conn, &mut tx, &mut rx, &cert).await;
            return;
        }
        run_session(anchor, conn, device, record, register, tx, rx).await;
    }
    .instrument(span)
    .await
}

async fn serve_renewal_only(
    anchor: &Anchor,
    conn: &quinn::Connection,
    tx: &mut Tx,
    rx: &mut Rx,
    cert: &CertInfo,
) {
    let grace_ends = crate::clock::to_ms(cert.not_after + anchor.shared.config.renewal_grace);
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
                let renewed = renew(anchor, &cert.key_id, req.csr_der).await;
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
                close(conn, ErrorCode::ProtocolViolation, "already registered");
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

async fn run_session(
    anchor: Anchor,
    conn: quinn::Connection,
    device: DeviceId,
    record: DeviceRecord,
    register: Register,
    mut tx: Tx,
    mut rx: Rx,
) {
    let id = anchor
        .shared
        .next_session
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (cmd_tx, mut cmd_rx) = mpsc::channel(COMMAND_BUFFER);
    let handle = SessionHandle {
        id,
        conn: conn.clone(),
        cmd: cmd_tx,
    };
    let previous = anchor
        .shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(device, handle.clone());
    if let Some(old) = previous {
        close(
            &old.conn,
            ErrorCode::Replaced,
            "a newer connection replaced this one",
        );
    }
    let interval = anchor.shared.config.presence.heartbeat_interval;
    let registered = ControlDown::Registered(Registered {
        version: PROTOCOL_VERSION,
        heartbeat_interval_ms: u32::try_from(interval.as_millis()).unwrap_or(u32::MAX),
        anchor_time_ms: anchor.now_ms(),
        device_id: device.to_string(),
    });
    if tx.send(&registered).await.is_err() {
        remove_if_current(&anchor, &device, id);
        return;
    }
    info!(name = %register.name, remote = %conn.remote_address(), "node registered");
    anchor
        .shared
        .runtime
        .registered(&anchor, &device, &handle, &register);
    if record.rotation_pending {
        let _ = tx.send(&ControlDown::RotateNow).await;
    }
    let reason = loop {
        tokio::select! {
            msg = rx.recv() => match msg {
                Ok(Some(ControlUp::Event(NodeEvent::Stopping { reason }))) => {
                    debug!(%reason, "node stopping");
                    anchor.shared.runtime.stopping(&anchor, &device, id);
                }
                Ok(Some(ControlUp::Event(NodeEvent::CapabilityChanged(cap)))) => {
                    anchor.shared.runtime.capability_changed(&anchor, &device, id, cap);
                }
                Ok(Some(ControlUp::Renew(req))) => {
                    let reply = renew(&anchor, &device, req.csr_der).await;
                    if tx.send(&reply).await.is_err() {
                        break "control stream lost";
                    }
                }
                Ok(Some(ControlUp::Register(_))) => {
                    close(&conn, ErrorCode::ProtocolViolation, "already registered");
                    break "protocol violation";
                }
                Ok(None) => break "control stream finished",
                Err(e) => {
                    if e.is_peer_fault() {
                        close(&conn, e.code(), "bad frame on control stream");
                    }
                    break "control stream failed";
                }
            },
            cmd = cmd_rx.recv() => match cmd {
                Some(Command::Rotate) => {
                    if tx.send(&ControlDown::RotateNow).await.is_err() {
                        break "control stream lost";
                    }
                }
                None => break "session dropped",
            },
            dg = conn.read_datagram() => match dg {
                Ok(bytes) => anchor.shared.runtime.datagram(&anchor, &device, id, &conn, &bytes),
                Err(_) => break "connection closed",
            },
        }
    };
    debug!(reason, "node session ended");
    remove_if_current(&anchor, &device, id);
    anchor.shared.runtime.disconnected(&anchor, &device, id);
}

fn remove_if_current(anchor: &Anchor, device: &DeviceId, id: u64) {
    let mut sessions = anchor
        .shared
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    if sessions.get(device).is_some_and(|h| h.id == id) {
        sessions.remove(device);
    }
}

/// Signs a renewal CSR for `device` (same key only).
async fn renew(anchor: &Anchor, device: &DeviceId, csr_der: Vec<u8>) -> ControlDown {
    let a = anchor.clone();
    let device = *device;
    let result = tokio::task::spawn_blocking(move || renew_blocking(&a, &device, &csr_der)).await;
    match result {
        Ok(Ok(renewed)) => {
            anchor.publish("device.rotated", Some(&device), serde_json::json!({}));
            ControlDown::Renewed(renewed)
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

fn renew_blocking(anchor: &Anchor, device: &DeviceId, csr_der: &[u8]) -> Result<Renewed, String> {
    let csr_device =
        anchorage_mesh::pki::csr_device_id_checked(csr_der).map_err(|e| e.to_string())?;
    if csr_device != *device {
        return Err("the CSR must use the device's own key".into());
    }
    let mut trust = anchor.trust();
    let store = &anchor.shared.store;
    let mut record: DeviceRecord = store
        .get(Space::Devices, device.as_bytes())
        .map_err(|e| e.to_string())?
        .ok_or("unknown device")?;
    if record.trust != DeviceTrust::Trusted {
        return Err("device revoked".into());
    }
    let issued = anchor
        .shared
        .ca
        .sign_csr(
            csr_der,
            &record.name,
            anchor.shared.config.cert_validity,
            anchor.now(),
        )
        .map_err(|e| e.to_string())?;
    record.cert_serial = issued.info.serial.clone();
    record.cert_der = issued.der.to_vec();
    record.cert_not_before_ms = crate::clock::to_ms(issued.info.not_before);
    record.cert_not_after_ms = crate::clock::to_ms(issued.info.not_after);
    let was_rotation = record.rotation_pending;
    record.rotation_pending = false;
    let mut batch = store.batch();
    batch
        .put(Space::Devices, device.as_bytes(), &record)
        .map_err(|e| e.to_string())?;
    let detail = if was_rotation { "rotation" } else { "renewal" };
    audit(
        anchor,
        &mut batch,
        "anchor",
        "certificate.renew",
        &device.to_string(),
        detail,
    )
    .map_err(|e| e.to_string())?;
    trust.commit(batch).map_err(|e| e.to_string())?;
    trust.release().map_err(|e| e.to_string())?;
    info!(device_id = %device, serial = %issued.info.serial_hex(), detail, "certificate renewed");
    Ok(Renewed {
        cert_der: issued.der.to_vec(),
        ca_der: anchor.shared.ca.cert_der().to_vec(),
    })
}
