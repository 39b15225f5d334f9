//! Trust operations: tokens, audit, and device revoke / rotate / remove.
//!
//! Every decision is written with its audit record in one batch, fsynced before the call
//! returns, then applied to the live state (revocation set, sessions).

use anchorage_console::api::{CreatedToken, Permission, Principal};
use anchorage_mesh::DeviceId;
use anchorage_mesh::pairing::random_id;
use anchorage_wire::ErrorCode;
use data_encoding::BASE32_NOPAD;
use ring::digest;

use crate::anchor::Anchor;
use crate::records::{AuditRecord, DeviceRecord, DeviceTrust, RevocationRecord, TokenRecord};
use crate::store::{Batch, Space, StoreError};

/// Why a trust operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TrustError {
    /// No such thing.
    #[error("{0} not found")]
    NotFound(String),
    /// Not allowed in the current state.
    #[error("{0}")]
    Conflict(String),
    /// Expired.
    #[error("{0}")]
    Expired(String),
    /// Bad input.
    #[error("{0}")]
    BadInput(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificate issuance failed.
    #[error("certificate: {0}")]
    Pki(String),
}

/// Prefix of every token secret.
pub const TOKEN_PREFIX: &str = "anc_";

/// The actor string of a principal in audit records.
pub fn actor(who: &Principal) -> String {
    format!("{} ({})", who.name, who.token_id)
}

/// Appends an audit record to `batch`.
pub fn audit(
    anchor: &Anchor,
    batch: &mut Batch<'_>,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), StoreError> {
    let at_ms = anchor.now_ms();
    let seq = anchor
        .shared
        .audit_seq
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut key = at_ms.to_be_bytes().to_vec();
    key.extend_from_slice(&seq.to_be_bytes());
    batch.put(
        Space::Audit,
        &key,
        &AuditRecord {
            at_ms,
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        },
    )
}

fn hash_secret(secret: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// The principal of a bearer secret `anc_<id>_<secret>`, if it is a live token.
pub fn authenticate(anchor: &Anchor, token: &str) -> Option<Principal> {
    let rest = token.strip_prefix(TOKEN_PREFIX)?;
    let (id, secret) = rest.split_once('_')?;
    let tokens = anchor
        .shared
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    let record = tokens.get(id)?;
    if record.revoked_at_ms.is_some() {
        return None;
    }
    let presented = hash_secret(secret);
    // Compare the digests without an early exit.
    let diff = presented
        .iter()
        .zip(record.secret_hash.iter())
        .fold(0u8, |acc, (a, b)| acc | (a ^ b));
    if diff != 0 {
        return None;
    }
    Some(Principal {
        token_id: record.id.clone(),
        name: record.name.clone(),
        permissions: record
            .permissions
            .iter()
            .filter_map(|p| p.parse::<Permission>().ok())
            .collect(),
    })
}

/// Creates a token (blocking; stores only the hash).
pub fn create_token_internal(
    anchor: &Anchor,
    actor_name: &str,
    name: String,
    permissions: Vec<Permission>,
) -> Result<CreatedToken, TrustError> {
    if permissions.is_empty() {
        return Err(TrustError::BadInput(
            "a token needs at least one permission".into(),
        ));
    }
    if name.len() > 64 || name.chars().any(char::is_control) {
        return Err(TrustError::BadInput(
            "token names are at most 64 printable characters".into(),
        ));
    }
    let rand = |n: usize| -> Result<String, TrustError> {
        let bytes = random_id::<32>().map_err(|e| TrustError::Pki(e.to_string()))?;
        Ok(BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()[..n].to_string())
    };
    let id = rand(10)?;
    let secret = rand(40)?;
    let mut perms: Vec<Permission> = permissions;
    perms.sort();
    perms.dedup();
    let record = TokenRecord {
        id: id.clone(),
        name: name.clone(),
        secret_hash: hash_secret(&secret),
        permissions: perms.iter().map(|p| p.as_str().to_string()).collect(),
        created_at_ms: anchor.now_ms(),
        created_by: actor_name.to_string(),
        revoked_at_ms: None,
    };
    let store = &anchor.shared.store;
    let mut trust = anchor.trust();
    let mut batch = store.batch();
    batch.put(Space::Tokens, id.as_bytes(), &record)?;
    let perm_list = record.permissions.join(",");
    audit(
        anchor,
        &mut batch,
        actor_name,
        "token.create",
        &id,
        &perm_list,
    )?;
    trust.commit(batch)?;
    anchor
        .shared
        .tokens
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(id.clone(), record);
    trust.release()?;
    Ok(CreatedToken {
        token: format!("{TOKEN_PREFIX}{id}_{secret}"),
        id,
        name,
        permissions: perms,
    })
}

/// Revokes a token.
pub fn revoke_token(anchor: &Anchor, who: &Principal, id: &str) -> Result<TokenRecord, TrustError> {
    let mut trust = anchor.trust();
    let store = &anchor.shared.store;
    let mut record: TokenRecord = store
        .get(Space::Tokens, id.as_bytes())?
        .ok_or_else(|| TrustError::NotFound(format!("token {id}")))?;
    if record.revoked_at_ms.is_none() {
        record.revoked_at_ms = Some(anchor.now_ms());
        let mut batch = store.batch();
        batch.put(Space::Tokens, id.as_bytes(), &record)?;
        audit(anchor, &mut batch, &actor(who), "token.revoke", id, "")?;
        trust.commit(batch)?;
        anchor
            .shared
            .tokens
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.to_string(), record.clone());
    }
    trust.release()?;
    Ok(record)
}

fn load_device(anchor: &Anchor, id: &DeviceId) -> Result<DeviceRecord, TrustError> {
    anchor
        .device_record(id)?
        .ok_or_else(|| TrustError::NotFound(format!("device {id}")))
}

/// Revocation key of a whole device.
pub fn device_revocation_key(id: &DeviceId) -> Vec<u8> {
    let mut k = vec![b'd'];
    k.extend_from_slice(id.as_bytes());
    k
}

/// Revocation key of one certificate serial.
pub fn serial_revocation_key(serial: &[u8]) -> Vec<u8> {
    let mut k = vec![b's'];
    k.extend_from_slice(serial);
    k
}

/// Revokes a device: persisted, then the live check refuses it and its session is closed.
pub fn revoke_device(
    anchor: &Anchor,
    who: &Principal,
    id: &DeviceId,
    reason: Option<String>,
) -> Result<DeviceRecord, TrustError> {
    let record = {
        let mut trust = anchor.trust();
        let mut record = load_device(anchor, id)?;
        if record.trust != DeviceTrust::Revoked {
            let now = anchor.now_ms();
            let reason = reason.unwrap_or_else(|| "revoked by operator".into());
            record.trust = DeviceTrust::Revoked;
            record.revoked_at_ms = Some(now);
            record.revoked_reason = Some(reason.clone());
            let store = &anchor.shared.store;
            let mut batch = store.batch();
            batch.put(Space::Devices, id.as_bytes(), &record)?;
            batch.put(
                Space::Revocations,
                &device_revocation_key(id),
                &RevocationRecord {
                    at_ms: now,
                    reason: reason.clone(),
                },
            )?;
            audit(
                anchor,
                &mut batch,
                &actor(who),
                "device.revoke",
                &id.to_string(),
                &reason,
            )?;
            trust.commit(batch)?;
            anchor.shared.revocation.revoke_device(*id);
        }
        trust.release()?;
        record
    };
    crate::session::close_session(anchor, id, ErrorCode::Revoked, "device revoked");
    anchor.publish(
        "device.revoked",
        Some(id),
        serde_json::json!({ "reason": record.revoked_reason }),
    );
    Ok(record)
}

/// Marks a rotation as wanted and tells the node if it is connected.
pub fn rotate_device(
    anchor: &Anchor,
    who: &Principal,
    id: &DeviceId,
) -> Result<DeviceRecord, TrustError> {
    let record = {
        let mut trust = anchor.trust();
        let mut record = load_device(anchor, id)?;
        if record.trust != DeviceTrust::Trusted {
            return Err(TrustError::Conflict(format!("device {id} is revoked")));
        }
        record.rotation_pending = true;
        let mut batch = anchor.shared.store.batch();
        batch.put(Space::Devices, id.as_bytes(), &record)?;
        audit(
            anchor,
            &mut batch,
            &actor(who),
            "device.rotate",
            &id.to_string(),
            "",
        )?;
        trust.commit(batch)?;
        trust.release()?;
        record
    };
    crate::session::request_rotation(anchor, id);
    Ok(record)
}

/// Removes a device. Its current certificate stays refused (by serial), so only a new pairing
/// brings it back.
pub fn remove_device(anchor: &Anchor, who: &Principal, id: &DeviceId) -> Result<(), TrustError> {
    {
        let mut trust = anchor.trust();
        let record = load_device(anchor, id)?;
        let now = anchor.now_ms();
        let mut batch = anchor.shared.store.batch();
        batch.remove(Space::Devices, id.as_bytes());
        batch.remove(Space::Nodes, id.as_bytes());
        batch.remove(Space::Presence, id.as_bytes());
        batch.remove(Space::Revocations, &device_revocation_key(id));
        batch.put(
            Space::Revocations,
            &serial_revocation_key(&record.cert_serial),
            &RevocationRecord {
                at_ms: now,
                reason: "device removed".into(),
            },
        )?;
        audit(
            anchor,
            &mut batch,
            &actor(who),
            "device.remove",
            &id.to_string(),
            "",
        )?;
        trust.commit(batch)?;
        anchor
            .shared
            .revocation
            .revoke_serial(record.cert_serial.clone());
        anchor.shared.revocation.forget_device(id);
        anchor.shared.runtime.forget(id);
        trust.release()?;
    }
    crate::session::close_session(anchor, id, ErrorCode::Removed, "device removed");
    anchor.publish("device.removed", Some(id), serde_json::json!({}));
    Ok(())
}
