//! The trust service: pairing codes and requests, devices, tokens, the revocation set, the
//! mesh policy and the audit log.
//!
//! Every decision is one store transaction ([`crate::store::transact`]): it reads the records
//! it needs, applies a rule from [`rules`], writes the results with their audit record, and
//! commits synced before the call returns. The in-memory mirrors (tokens for fast
//! authentication, the revocation set checked at every handshake, the bootstrap streams
//! waiting for a decision) are refreshed from the store's watch, not patched by hand, so a
//! change is live the moment its transaction commits. Methods block (store, signing): async
//! callers use `spawn_blocking`. Closing sessions and publishing events is the caller's part.

pub mod directory;
pub mod rules;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use anchorage_console::api::{CreatedToken, Permission, Principal, Scope, Selector};
use anchorage_mesh::DeviceId;
use anchorage_mesh::pairing::{AfterKeys, CodeId, CodeSecret, QrPayload, random_id};
use anchorage_mesh::pki::{CertificateAuthority, csr_device_id_checked};
use anchorage_mesh::tls::RevocationSet;
use anchorage_wire::bootstrap::CsrSubmit;
use data_encoding::BASE32_NOPAD;
use ring::digest;
use subtle::ConstantTimeEq;
use tokio::sync::Notify;

use crate::clock::{Clock, to_ms};
use crate::metrics::Metrics;
use crate::policy::{Policy, PolicyVersion};
use crate::records::*;
use crate::store::{LabelOwner, Revision, Revoked, StoreError, TrustChange, TrustStore, transact};

pub use rules::{Attempt, CodeUnusable, DecisionRefused, code_state, request_state};

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
    /// Bad input from the caller.
    #[error("{0}")]
    BadInput(String),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Certificate issuance or key generation failed.
    #[error("certificate: {0}")]
    Pki(String),
    /// A policy file with errors, each with its line; nothing was changed.
    #[error("the policy has {} error(s)", .0.len())]
    InvalidPolicy(Vec<crate::policy::PolicyError>),
}

/// Prefix of every token secret.
pub const TOKEN_PREFIX: &str = "anc_";
/// Shortest TTL of a code.
pub const MIN_TTL: Duration = Duration::from_secs(30);
/// Longest TTL of a code.
pub const MAX_TTL: Duration = Duration::from_secs(24 * 3600);
/// Default TTL of a code.
pub const DEFAULT_TTL: Duration = Duration::from_secs(600);

/// The actor string of a principal in audit records.
pub fn actor(who: &Principal) -> String {
    who.actor()
}

fn hash_secret(secret: &str) -> [u8; 32] {
    let d = digest::digest(&digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// A minted code with its secret, as returned once to the operator.
#[derive(Debug, Clone)]
pub struct Minted {
    /// The stored record.
    pub record: CodeRecord,
    /// What a person types or scans.
    pub code: String,
    /// QR URI, for QR codes.
    pub uri: Option<String>,
}

/// What a pairing attempt on a code led to, for the bootstrap stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptError {
    /// No such code.
    Unknown,
    /// The code cannot be used.
    Unusable(CodeUnusable),
    /// A wrong secret; the code lives on.
    Wrong,
    /// A wrong secret burned the code.
    Burned,
}

/// Why a pairing request could not be recorded.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// The CSR is malformed or its key unusable.
    #[error("{0}")]
    BadCsr(String),
    /// The device is revoked.
    #[error("this device is revoked; an operator must remove it before it can pair again")]
    DeviceRevoked,
    /// A request with this id exists already.
    #[error("request already exists")]
    Exists,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Mirrors of trust state kept in memory, refreshed from the store's watch.
#[derive(Default)]
struct Mirrors {
    /// Tokens by id, with the revision they were last written at.
    tokens: RwLock<HashMap<String, (u64, TokenRecord)>>,
    /// Limits of the tokens that have some, by token id, with the scope parsed.
    limits: RwLock<HashMap<String, (TokenLimits, Scope)>>,
    /// Revision of the last change applied per revocation key.
    revocation_revs: Mutex<HashMap<Revoked, u64>>,
    /// Bootstrap streams waiting for a decision on a request.
    waiters: Mutex<HashMap<String, Arc<Notify>>>,
    /// Devices, their labels and pending requests, for views of the whole fleet.
    directory: directory::Directory,
}

impl Mirrors {
    fn apply(&self, revocation: &RevocationSet, change: &Revision<TrustChange>, now_ms: u64) {
        self.directory.apply(change, now_ms);
        match &change.change {
            TrustChange::Token(t) => {
                let mut tokens = self.tokens.write().unwrap_or_else(|e| e.into_inner());
                let newer = tokens.get(&t.id).is_none_or(|(rev, _)| *rev <= change.rev);
                if newer {
                    tokens.insert(t.id.clone(), (change.rev, t.clone()));
                }
            }
            TrustChange::Revocation(key, record) => {
                let mut revs = self
                    .revocation_revs
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if revs.get(key).is_some_and(|rev| *rev > change.rev) {
                    return;
                }
                revs.insert(key.clone(), change.rev);
                match (key, record.is_some()) {
                    (Revoked::Device(d), true) => revocation.revoke_device(*d),
                    (Revoked::Device(d), false) => revocation.forget_device(d),
                    (Revoked::Serial(s), true) => revocation.revoke_serial(s.clone()),
                    // Serials are never un-revoked: a removed device's certificate stays
                    // refused until the CA is replaced.
                    (Revoked::Serial(_), false) => {}
                }
            }
            TrustChange::Request(r) => {
                let waiter = self
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get(&r.request_id)
                    .cloned();
                if let Some(n) = waiter {
                    n.notify_waiters();
                }
            }
            TrustChange::TokenLimits(id, limits) => {
                self.limits
                    .write()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(id.clone(), (limits.clone(), scope_of(limits)));
            }
            TrustChange::Device(..) | TrustChange::Labels(..) | TrustChange::Policy(_) => {}
        }
    }
}

/// A stored policy version, parsed. A stored text that no longer parses (written by a later
/// anchord with a richer grammar) is logged and taken as the empty policy: it allows less,
/// never more.
pub fn policy_version(record: PolicyRecord) -> PolicyVersion {
    let policy = Policy::parse(&record.text).unwrap_or_else(|errors| {
        tracing::error!(
            version = record.version,
            errors = errors.len(),
            "the stored mesh policy does not parse; nothing is allowed until it is set again"
        );
        Policy::empty()
    });
    PolicyVersion {
        version: record.version,
        text: record.text,
        policy,
        updated_ms: record.updated_ms,
        updated_by: record.updated_by,
    }
}

/// The scope a token's stored limits give. A selector that no longer parses (a stored value
/// from a later grammar) matches nothing rather than everything.
fn scope_of(limits: &TokenLimits) -> Scope {
    let selector = limits.selector.parse().unwrap_or_else(|_| {
        "node.anchorage/invalid-selector"
            .parse()
            .unwrap_or_else(|_| Selector::everything())
    });
    Scope {
        selector,
        capabilities: limits.capabilities.clone(),
    }
}

/// A token with what is kept beside it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenEntry {
    /// The token.
    pub record: TokenRecord,
    /// Its limits and expiry.
    pub limits: TokenLimits,
    /// When it last authenticated a request.
    pub last_used_ms: Option<u64>,
}

/// How often a token's last use is written to the store, at most.
pub const TOKEN_USE_WRITE_INTERVAL_MS: u64 = 60_000;

/// When each token was last used, and when that was last written.
#[derive(Debug, Default)]
struct TokenUse {
    used: HashMap<String, u64>,
    written: HashMap<String, u64>,
}

/// Settings of the trust service.
#[derive(Debug, Clone, Copy)]
pub struct TrustSettings {
    /// Validity of issued client certificates.
    pub cert_validity: Duration,
    /// Wrong secrets before a code burns.
    pub pairing_max_attempts: u32,
}

/// The trust service.
pub struct Trust {
    store: Arc<dyn TrustStore>,
    ca: CertificateAuthority,
    revocation: Arc<RevocationSet>,
    mirrors: Arc<Mirrors>,
    clock: Clock,
    settings: TrustSettings,
    metrics: Arc<Metrics>,
    token_use: Mutex<TokenUse>,
}

impl std::fmt::Debug for Trust {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Trust").finish_non_exhaustive()
    }
}

impl Trust {
    /// The service over `store`: loads tokens and revocations and watches for changes.
    pub fn new(
        store: Arc<dyn TrustStore>,
        ca: CertificateAuthority,
        clock: Clock,
        settings: TrustSettings,
        metrics: Arc<Metrics>,
    ) -> Result<Trust, StoreError> {
        let revocation = Arc::new(RevocationSet::new());
        let mirrors = Arc::new(Mirrors::default());
        {
            let (m, r, c) = (mirrors.clone(), revocation.clone(), clock);
            store.watch(Arc::new(move |change| m.apply(&r, change, c.now_ms())));
        }
        for (key, record) in store.revocations()? {
            mirrors.apply(
                &revocation,
                &Revision {
                    remote: false,
                    rev: 0,
                    change: TrustChange::Revocation(key, Some(record)),
                },
                clock.now_ms(),
            );
        }
        mirrors.directory.load(
            store.devices()?,
            store.all_labels()?,
            store.requests()?,
            clock.now_ms(),
        );
        {
            let mut tokens = mirrors.tokens.write().unwrap_or_else(|e| e.into_inner());
            for t in store.tokens()? {
                tokens.entry(t.id.clone()).or_insert((0, t));
            }
            let mut limits = mirrors.limits.write().unwrap_or_else(|e| e.into_inner());
            for (id, l) in store.token_limits()? {
                let scope = scope_of(&l);
                limits.entry(id).or_insert((l, scope));
            }
        }
        Ok(Trust {
            store,
            ca,
            revocation,
            mirrors,
            clock,
            settings,
            metrics,
            token_use: Mutex::new(TokenUse::default()),
        })
    }

    /// Takes back when each token was last used, as stored.
    pub fn restore_token_use(&self, used: impl IntoIterator<Item = (String, u64)>) {
        let mut u = self.token_use.lock().unwrap_or_else(|e| e.into_inner());
        for (id, at) in used {
            u.written.insert(id.clone(), at);
            u.used.insert(id, at);
        }
    }

    /// Notes that token `id` was used now. Returns the time to write to the store when the
    /// last written use is older than [`TOKEN_USE_WRITE_INTERVAL_MS`] (so a busy token costs
    /// one write a minute).
    pub fn note_use(&self, id: &str) -> Option<u64> {
        let now = self.now_ms();
        let mut u = self.token_use.lock().unwrap_or_else(|e| e.into_inner());
        u.used.insert(id.to_string(), now);
        let due = u
            .written
            .get(id)
            .is_none_or(|at| now.saturating_sub(*at) >= TOKEN_USE_WRITE_INTERVAL_MS);
        if due {
            u.written.insert(id.to_string(), now);
            Some(now)
        } else {
            None
        }
    }

    /// The CA.
    pub fn ca(&self) -> &CertificateAuthority {
        &self.ca
    }

    /// The live revocation set (checked at every handshake).
    pub fn revocation(&self) -> &Arc<RevocationSet> {
        &self.revocation
    }

    fn now_ms(&self) -> u64 {
        self.clock.now_ms()
    }

    fn audit(&self, actor: &str, action: &str, target: &str, detail: &str) -> AuditRecord {
        AuditRecord {
            at_ms: self.now_ms(),
            actor: actor.to_string(),
            action: action.to_string(),
            target: target.to_string(),
            detail: detail.to_string(),
        }
    }

    // -----------------------------------------------------------------------------------
    // Tokens

    /// The principal of a bearer secret `anc_<id>_<secret>`, if it is a live token.
    pub fn authenticate(&self, token: &str) -> Option<Principal> {
        let rest = token.strip_prefix(TOKEN_PREFIX)?;
        let (id, secret) = rest.split_once('_')?;
        let tokens = self
            .mirrors
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (_, record) = tokens.get(id)?;
        if record.revoked_at_ms.is_some() {
            return None;
        }
        if !bool::from(hash_secret(secret).ct_eq(&record.secret_hash)) {
            return None;
        }
        let limits = self
            .mirrors
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (stored, scope) = limits.get(id).cloned().unwrap_or_default();
        if stored.expires_at_ms.is_some_and(|at| self.now_ms() >= at) {
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
            scope,
        })
    }

    /// Every token, as mirrored, oldest first.
    pub fn tokens(&self) -> Vec<TokenEntry> {
        let tokens = self
            .mirrors
            .tokens
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let mut list: Vec<TokenEntry> = tokens
            .values()
            .map(|(_, t)| self.token_entry(t.clone()))
            .collect();
        list.sort_by_key(|t| t.record.created_at_ms);
        list
    }

    fn token_entry(&self, record: TokenRecord) -> TokenEntry {
        let limits = self
            .mirrors
            .limits
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&record.id)
            .map(|(l, _)| l.clone())
            .unwrap_or_default();
        let last_used_ms = self
            .token_use
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .used
            .get(&record.id)
            .copied();
        TokenEntry {
            record,
            limits,
            last_used_ms,
        }
    }

    /// Creates a token; only its hash is stored. `scope` limits it to part of the fleet,
    /// `lifetime` ends it (a token with a scope cannot manage tokens).
    pub fn create_token(
        &self,
        actor_name: &str,
        name: String,
        permissions: Vec<Permission>,
        scope: Scope,
        lifetime: Option<Duration>,
    ) -> Result<CreatedToken, TrustError> {
        if !scope.is_unlimited() && permissions.contains(&Permission::TokensManage) {
            return Err(TrustError::BadInput(
                "a token limited to a selector or capabilities cannot carry tokens.manage".into(),
            ));
        }
        if permissions.is_empty() {
            return Err(TrustError::BadInput(
                "a token needs at least one permission".into(),
            ));
        }
        if name.len() > 64
            || name
                .chars()
                .any(|c| c.is_control() || rules::is_bidi_control(c))
        {
            return Err(TrustError::BadInput(
                "token names are at most 64 printable characters, without direction controls"
                    .into(),
            ));
        }
        let rand = |n: usize| -> Result<String, TrustError> {
            let bytes = random_id::<32>().map_err(|e| TrustError::Pki(e.to_string()))?;
            Ok(BASE32_NOPAD.encode(&bytes).to_ascii_lowercase()[..n].to_string())
        };
        let id = rand(10)?;
        let secret = rand(40)?;
        let mut perms = permissions;
        perms.sort();
        perms.dedup();
        let record = TokenRecord {
            id: id.clone(),
            name: name.clone(),
            secret_hash: hash_secret(&secret),
            permissions: perms.iter().map(|p| p.as_str().to_string()).collect(),
            created_at_ms: self.now_ms(),
            created_by: actor_name.to_string(),
            revoked_at_ms: None,
        };
        let limits = TokenLimits {
            selector: scope.selector.to_string(),
            capabilities: scope.capabilities.clone(),
            expires_at_ms: lifetime.map(|l| {
                record
                    .created_at_ms
                    .saturating_add(u64::try_from(l.as_millis()).unwrap_or(u64::MAX))
            }),
        };
        let mut detail = record.permissions.join(",");
        if !limits.selector.is_empty() {
            detail.push_str(&format!(" selector={}", limits.selector));
        }
        if !limits.capabilities.is_empty() {
            detail.push_str(&format!(" capabilities={}", limits.capabilities.join(",")));
        }
        if let Some(l) = lifetime {
            detail.push_str(&format!(
                " expires_in={}",
                anchorage_wire::duration::format_duration(l)
            ));
        }
        let audit = self.audit(actor_name, "token.create", &id, &detail);
        let has_limits = limits != TokenLimits::default();
        transact(&*self.store, |txn| {
            if has_limits {
                txn.put_token_limits(&record.id, &limits)?;
            }
            txn.put_token(&record)?;
            txn.audit(&audit)
        })?;
        Ok(CreatedToken {
            token: format!("{TOKEN_PREFIX}{id}_{secret}"),
            id,
            name,
            permissions: perms,
            scope,
            expires_at: limits.expires_at_ms.map(crate::clock::to_odt),
        })
    }

    /// Revokes a token (a no-op if it is revoked already).
    pub fn revoke_token(&self, who: &Principal, id: &str) -> Result<TokenEntry, TrustError> {
        let now = self.now_ms();
        let audit = self.audit(&actor(who), "token.revoke", id, "");
        transact(&*self.store, |txn| {
            let mut record = txn
                .token(id)?
                .ok_or_else(|| TrustError::NotFound(format!("token {id}")))?;
            if record.revoked_at_ms.is_none() {
                record.revoked_at_ms = Some(now);
                txn.put_token(&record)?;
                txn.audit(&audit)?;
            }
            Ok(record)
        })
        .map(|record| self.token_entry(record))
    }

    // -----------------------------------------------------------------------------------
    // Devices

    /// One device.
    pub fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.store.device(id)
    }

    /// Every device.
    pub fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.store.devices()
    }

    /// Every device with its labels, and the pending pairing requests, from memory (no
    /// certificates or CSRs: see [`directory`]). Views of the whole fleet read this.
    pub fn directory(&self) -> directory::DirectoryView {
        self.mirrors.directory.view(self.now_ms())
    }

    /// One device with its labels, from the directory, or from the store when the directory
    /// does not hold it (yet: paired on another anchor a moment ago). No certificate when it
    /// comes from the directory.
    pub fn device_with_labels(
        &self,
        id: &DeviceId,
    ) -> Result<Option<(Arc<DeviceRecord>, Labels)>, StoreError> {
        if let Some(d) = self.mirrors.directory.device(id) {
            return Ok(Some((d, self.mirrors.directory.labels_of(id))));
        }
        match self.store.device(id)? {
            Some(d) => Ok(Some((Arc::new(d), self.labels_of(id)?))),
            None => Ok(None),
        }
    }

    /// The pairing requests pending approval, from the directory (no CSRs).
    pub fn pending_requests(&self) -> Vec<Arc<RequestRecord>> {
        self.mirrors.directory.pending(self.now_ms())
    }

    /// One device from the directory (no certificate: see [`directory`]).
    pub fn directory_device(&self, id: &DeviceId) -> Option<Arc<DeviceRecord>> {
        self.mirrors.directory.device(id)
    }

    /// One device's labels from the directory (none: empty).
    pub fn directory_labels(&self, id: &DeviceId) -> Labels {
        self.mirrors.directory.labels_of(id)
    }

    /// One device's labels (none: empty).
    pub fn labels_of(&self, id: &DeviceId) -> Result<Labels, StoreError> {
        Ok(self
            .store
            .labels_of(&LabelOwner::Device(*id))?
            .unwrap_or_default())
    }

    /// The labels of every device that has some.
    pub fn all_labels(&self) -> Result<HashMap<DeviceId, Labels>, StoreError> {
        Ok(self
            .store
            .all_labels()?
            .into_iter()
            .filter_map(|(owner, labels)| match owner {
                LabelOwner::Device(id) => Some((id, labels)),
                LabelOwner::Code(_) => None,
            })
            .collect())
    }

    /// The labels of every pairing code that has some, by code id.
    pub fn code_labels(&self) -> Result<HashMap<String, Labels>, StoreError> {
        Ok(self
            .store
            .all_labels()?
            .into_iter()
            .filter_map(|(owner, labels)| match owner {
                LabelOwner::Code(id) => Some((id, labels)),
                LabelOwner::Device(_) => None,
            })
            .collect())
    }

    /// Applies label changes to a device in order (refusing bad and reserved keys, whoever
    /// calls); audited as `device.label`. Returns the device's labels after.
    pub fn label_device(
        &self,
        who: &Principal,
        id: &DeviceId,
        changes: &[anchorage_wire::labels::LabelChange],
    ) -> Result<Labels, TrustError> {
        use anchorage_wire::labels::{LabelChange, LabelError, MAX_LABELS, is_reserved};
        for change in changes {
            let checked = match change {
                LabelChange::Set(k, v) => anchorage_wire::labels::validate_operator_label(k, v),
                LabelChange::Remove(k) if is_reserved(k) => Err(LabelError::Reserved(k.clone())),
                LabelChange::Remove(k) => anchorage_wire::labels::validate_key(k),
            };
            checked.map_err(|e| TrustError::BadInput(e.to_string()))?;
        }
        let detail: Vec<String> = changes
            .iter()
            .map(|c| match c {
                LabelChange::Set(k, v) => format!("{k}={v}"),
                LabelChange::Remove(k) => format!("{k}-"),
            })
            .collect();
        let audit = self.audit(
            &actor(who),
            "device.label",
            &id.to_string(),
            &detail.join(" "),
        );
        transact(&*self.store, |txn| {
            txn.device(id)?
                .ok_or_else(|| TrustError::NotFound(format!("device {id}")))?;
            let owner = LabelOwner::Device(*id);
            let mut labels = txn.labels(&owner)?.unwrap_or_default();
            for change in changes {
                change.apply(&mut labels);
            }
            if labels.len() > MAX_LABELS {
                return Err(TrustError::BadInput(format!(
                    "a device has at most {MAX_LABELS} labels; this would make {}",
                    labels.len()
                )));
            }
            txn.put_labels(&owner, &labels)?;
            txn.audit(&audit)?;
            Ok(labels)
        })
    }

    /// Revokes a device: once this returns, the live check refuses it. The caller closes its
    /// session.
    pub fn revoke_device(
        &self,
        who: &Principal,
        id: &DeviceId,
        reason: Option<String>,
    ) -> Result<DeviceRecord, TrustError> {
        let now = self.now_ms();
        let reason = reason.unwrap_or_else(|| "revoked by operator".into());
        let audit = self.audit(&actor(who), "device.revoke", &id.to_string(), &reason);
        transact(&*self.store, |txn| {
            let record = txn
                .device(id)?
                .ok_or_else(|| TrustError::NotFound(format!("device {id}")))?;
            let Some(revoked) = rules::revoke(&record, &reason, now) else {
                return Ok(record);
            };
            txn.put_device(&revoked)?;
            txn.revoke(
                &Revoked::Device(*id),
                &RevocationRecord {
                    at_ms: now,
                    reason: reason.clone(),
                },
            )?;
            txn.audit(&audit)?;
            Ok(revoked)
        })
    }

    /// Marks a rotation as wanted. The caller tells the node if it is connected.
    pub fn rotate_device(
        &self,
        who: &Principal,
        id: &DeviceId,
    ) -> Result<DeviceRecord, TrustError> {
        let audit = self.audit(&actor(who), "device.rotate", &id.to_string(), "");
        transact(&*self.store, |txn| {
            let mut record = txn
                .device(id)?
                .ok_or_else(|| TrustError::NotFound(format!("device {id}")))?;
            if record.trust != DeviceTrust::Trusted {
                return Err(TrustError::Conflict(format!("device {id} is revoked")));
            }
            record.rotation_pending = true;
            txn.put_device(&record)?;
            txn.audit(&audit)?;
            Ok(record)
        })
    }

    /// Removes a device. Its current certificate stays refused (by serial), so only a new
    /// pairing brings it back. The caller closes its session and forgets its node.
    pub fn remove_device(&self, who: &Principal, id: &DeviceId) -> Result<(), TrustError> {
        let now = self.now_ms();
        let audit = self.audit(&actor(who), "device.remove", &id.to_string(), "");
        transact(&*self.store, |txn| {
            let record = txn
                .device(id)?
                .ok_or_else(|| TrustError::NotFound(format!("device {id}")))?;
            txn.remove_device(id)?;
            txn.unrevoke(&Revoked::Device(*id))?;
            txn.revoke(
                &Revoked::Serial(record.cert_serial.clone()),
                &RevocationRecord {
                    at_ms: now,
                    reason: "device removed".into(),
                },
            )?;
            txn.audit(&audit)?;
            Ok(())
        })
    }

    /// Signs a renewal CSR for `device` (its own key only). Returns the new certificate DER
    /// and the CA DER.
    pub fn renew(&self, device: &DeviceId, csr_der: &[u8]) -> Result<(Vec<u8>, Vec<u8>), String> {
        let csr_device = csr_device_id_checked(csr_der).map_err(|e| e.to_string())?;
        if csr_device != *device {
            return Err("the CSR must use the device's own key".into());
        }
        let now = self.clock.now();
        let validity = self.settings.cert_validity;
        let result: Result<(Vec<u8>, bool), TrustError> = transact(&*self.store, |txn| {
            let mut record = txn
                .device(device)?
                .ok_or_else(|| TrustError::NotFound("device".into()))?;
            if record.trust != DeviceTrust::Trusted {
                return Err(TrustError::Conflict("device revoked".into()));
            }
            let issued = self
                .ca
                .sign_csr(csr_der, &record.name, validity, now)
                .map_err(|e| TrustError::Pki(e.to_string()))?;
            record.cert_serial = issued.info.serial.clone();
            record.cert_der = issued.der.to_vec();
            record.cert_not_before_ms = to_ms(issued.info.not_before);
            record.cert_not_after_ms = to_ms(issued.info.not_after);
            let was_rotation = record.rotation_pending;
            record.rotation_pending = false;
            txn.put_device(&record)?;
            let detail = if was_rotation { "rotation" } else { "renewal" };
            txn.audit(&self.audit("anchor", "certificate.renew", &device.to_string(), detail))?;
            Ok((issued.der.to_vec(), was_rotation))
        });
        match result {
            Ok((der, was_rotation)) => {
                tracing::info!(device_id = %device, rotation = was_rotation, "certificate renewed");
                Ok((der, self.ca.cert_der().to_vec()))
            }
            Err(TrustError::NotFound(_)) => Err("unknown device".into()),
            Err(TrustError::Conflict(m)) => Err(m),
            Err(e) => {
                tracing::warn!(error = %e, "renewal failed");
                Err("internal error".into())
            }
        }
    }

    // -----------------------------------------------------------------------------------
    // Pairing

    /// Every code.
    pub fn codes(&self) -> Result<Vec<CodeRecord>, StoreError> {
        self.store.codes()
    }

    /// Every request.
    pub fn requests(&self) -> Result<Vec<RequestRecord>, StoreError> {
        self.store.requests()
    }

    /// One request.
    pub fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.store.request(id)
    }

    // -----------------------------------------------------------------------------------
    // Mesh policy

    /// The mesh policy in force as stored (the empty default, version 0, if none was ever
    /// set).
    pub fn policy(&self) -> Result<PolicyVersion, StoreError> {
        match self.store.policy()? {
            Some(record) => Ok(policy_version(record)),
            None => Ok(PolicyVersion::default_empty()),
        }
    }

    /// The newest `limit` versions of the mesh policy, newest first.
    pub fn policy_history(&self, limit: usize) -> Result<Vec<PolicyRecord>, StoreError> {
        self.store.policy_history(limit)
    }

    /// Sets the mesh policy from the file `text`: checked first (every error, with its
    /// line, and nothing changed), then written as the next version with its audit record
    /// (`policy.set`, target `policy`, detail `version N, K rules`) in one transaction. The
    /// caller puts the result in force ([`crate::policy::PolicyFeed::replace`]) and
    /// announces it.
    pub fn set_policy(&self, who: &Principal, text: &str) -> Result<PolicyVersion, TrustError> {
        let policy = Policy::parse(text).map_err(TrustError::InvalidPolicy)?;
        let rules = policy.rules().len();
        let actor = actor(who);
        let now = self.now_ms();
        let record = transact(&*self.store, |txn| {
            let version = txn.policy()?.map_or(1, |p| p.version + 1);
            let record = PolicyRecord {
                version,
                text: text.to_string(),
                updated_ms: now,
                updated_by: actor.clone(),
            };
            txn.put_policy(&record)?;
            let detail = format!(
                "version {version}, {rules} rule{}",
                if rules == 1 { "" } else { "s" }
            );
            txn.audit(&self.audit(&actor, "policy.set", "policy", &detail))?;
            Ok::<_, TrustError>(record)
        })?;
        Ok(PolicyVersion {
            version: record.version,
            text: record.text,
            policy,
            updated_ms: record.updated_ms,
            updated_by: record.updated_by,
        })
    }

    /// The newest `limit` audit records `keep` accepts.
    pub fn audit_log(
        &self,
        limit: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.store.audit_newest(limit, keep)
    }

    /// Mints a code. `anchor_addr` goes into QR codes.
    pub fn mint_code(
        &self,
        who: &Principal,
        method: CodeMethod,
        ttl: Duration,
        anchor_addr: String,
        labels: &Labels,
    ) -> Result<Minted, TrustError> {
        check_labels(labels)?;
        if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
            return Err(TrustError::BadInput(format!(
                "ttl must be between 30s and 24h, got {}s",
                ttl.as_secs()
            )));
        }
        let pki = |e: anchorage_mesh::pairing::PairingCryptoError| TrustError::Pki(e.to_string());
        let secret = match method {
            CodeMethod::Pin => CodeSecret::random_pin(),
            CodeMethod::Qr => CodeSecret::random_qr(),
        }
        .map_err(pki)?;
        let now = self.now_ms();
        let ttl_ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        let method_name = match method {
            CodeMethod::Pin => "pin",
            CodeMethod::Qr => "qr",
        };
        let (code_id, record) = transact(&*self.store, |txn| {
            let random_id = || match method {
                CodeMethod::Pin => CodeId::random(),
                CodeMethod::Qr => CodeId::random_qr(),
            };
            let mut code_id = random_id().map_err(pki)?;
            for _ in 0..16 {
                if txn.code(code_id.as_str())?.is_none() {
                    break;
                }
                code_id = random_id().map_err(pki)?;
            }
            let record = CodeRecord {
                code_id: code_id.to_string(),
                method,
                secret: secret.expose().to_string(),
                state: CodeState::Active,
                failed_attempts: 0,
                created_at_ms: now,
                expires_at_ms: now.saturating_add(ttl_ms),
                ttl_ms,
                created_by: actor(who),
            };
            txn.put_code(&record)?;
            txn.put_labels(&LabelOwner::Code(code_id.to_string()), labels)?;
            let detail = if labels.is_empty() {
                method_name.to_string()
            } else {
                format!("{method_name} {}", labels_detail(labels))
            };
            txn.audit(&self.audit(&actor(who), "pairing.mint", code_id.as_str(), &detail))?;
            Ok::<_, TrustError>((code_id, record))
        })?;
        let (code, uri) = match method {
            CodeMethod::Pin => (format!("{}-{}", code_id.grouped(), secret.expose()), None),
            CodeMethod::Qr => {
                let uri = QrPayload {
                    anchor: anchor_addr,
                    code_id: code_id.clone(),
                    secret,
                    ca_fingerprint: self.ca.fingerprint(),
                }
                .to_uri();
                (uri.clone(), Some(uri))
            }
        };
        self.metrics.pairing_outcome("code_minted");
        Ok(Minted { record, code, uri })
    }

    /// The code `id`, in whatever state, if its secret is known (the bootstrap stream's first
    /// look: records from before secrets were kept have none).
    pub fn code_for_pairing(&self, id: &CodeId) -> Result<Option<CodeRecord>, StoreError> {
        Ok(self
            .store
            .code(id.as_str())?
            .filter(|c| !c.secret.is_empty()))
    }

    /// Counts an attempt at a code: a right secret consumes it, a wrong one counts against it
    /// (burning it at the limit).
    pub fn record_attempt(&self, id: &CodeId, correct: bool) -> Result<(), AttemptFailure> {
        let now = self.now_ms();
        let max = self.settings.pairing_max_attempts;
        transact(&*self.store, |txn| {
            let code = txn
                .code(id.as_str())?
                .ok_or(AttemptFailure::Refused(AttemptError::Unknown))?;
            let (next, outcome) = rules::attempt(&code, correct, max, now)
                .map_err(|u| AttemptFailure::Refused(AttemptError::Unusable(u)))?;
            txn.put_code(&next)?;
            match outcome {
                Attempt::Consumed => Ok(()),
                // The wrong guess must be counted, so this commits; the refusal is reported
                // after the commit below.
                Attempt::Wrong | Attempt::Burned => {
                    if outcome == Attempt::Burned {
                        txn.audit(&self.audit(
                            "anchor",
                            "pairing.burn",
                            id.as_str(),
                            "too many wrong secrets",
                        ))?;
                    }
                    Ok(())
                }
            }
            .map(|()| outcome)
        })
        .and_then(|outcome| match outcome {
            Attempt::Consumed => Ok(()),
            Attempt::Wrong => Err(AttemptFailure::Refused(AttemptError::Wrong)),
            Attempt::Burned => Err(AttemptFailure::Refused(AttemptError::Burned)),
        })
    }

    /// Records a pairing request from a node that proved the code.
    pub fn create_request(
        &self,
        code: &CodeRecord,
        csr: CsrSubmit,
        request_id: String,
        sas: String,
        keys: AfterKeys,
    ) -> Result<RequestRecord, RequestError> {
        let device_id: DeviceId =
            csr_device_id_checked(&csr.csr_der).map_err(|e| RequestError::BadCsr(e.to_string()))?;
        let now = self.now_ms();
        let clean = |s: &str| rules::display_name(s, 64);
        let request = RequestRecord {
            request_id: request_id.clone(),
            code_id: code.code_id.clone(),
            device_id,
            device_name: clean(&csr.device_name),
            platform: clean(&csr.platform),
            csr_der: csr.csr_der,
            sas,
            keys,
            state: RequestState::PendingApproval,
            requested_at_ms: now,
            expires_at_ms: now.saturating_add(code.ttl_ms),
            cert_der: None,
            decided_by: None,
            decided_at_ms: None,
            reason: None,
        };
        let audit = self.audit(
            "anchor",
            "pairing.request",
            &request_id,
            &device_id.to_string(),
        );
        transact(&*self.store, |txn| {
            if txn
                .device(&device_id)?
                .is_some_and(|d| d.trust == DeviceTrust::Revoked)
            {
                return Err(RequestError::DeviceRevoked);
            }
            if txn.request(&request_id)?.is_some() {
                return Err(RequestError::Exists);
            }
            txn.put_request(&request)?;
            txn.audit(&audit)?;
            Ok(())
        })?;
        Ok(request)
    }

    /// Approves a pending request: signs the CSR and records the device. Returns the request
    /// and whether an earlier pairing of the device was replaced (its session must close).
    pub fn approve(
        &self,
        who: &Principal,
        request_id: &str,
        extra_labels: &Labels,
    ) -> Result<(RequestRecord, bool), TrustError> {
        check_labels(extra_labels)?;
        let now_ms = self.now_ms();
        let now = self.clock.now();
        let validity = self.settings.cert_validity;
        let result = transact(&*self.store, |txn| {
            let req = txn
                .request(request_id)?
                .ok_or_else(|| TrustError::NotFound(format!("pairing request {request_id}")))?;
            rules::pending(&req, now_ms).map_err(|r| refused(request_id, &req, r))?;
            let existing = txn.device(&req.device_id)?;
            if existing
                .as_ref()
                .is_some_and(|d| d.trust == DeviceTrust::Revoked)
            {
                return Err(refused(request_id, &req, DecisionRefused::DeviceRevoked));
            }
            let issued = self
                .ca
                .sign_csr(&req.csr_der, &req.device_name, validity, now)
                .map_err(|e| TrustError::Pki(e.to_string()))?;
            let approval = rules::approve(
                &req,
                existing.as_ref(),
                rules::Issued {
                    serial: issued.info.serial.clone(),
                    der: issued.der.to_vec(),
                    not_before_ms: to_ms(issued.info.not_before),
                    not_after_ms: to_ms(issued.info.not_after),
                },
                &actor(who),
                now_ms,
            )
            .map_err(|r| refused(request_id, &req, r))?;
            txn.put_request(&approval.request)?;
            txn.put_device(&approval.device)?;
            if let Some(old) = &approval.replaced {
                txn.revoke(
                    &Revoked::Serial(old.clone()),
                    &RevocationRecord {
                        at_ms: now_ms,
                        reason: "replaced by a new pairing".into(),
                    },
                )?;
            }
            txn.audit(&self.audit(
                &actor(who),
                "pairing.approve",
                request_id,
                &req.device_id.to_string(),
            ))?;
            // The device gets its code's labels (like a tagged auth key) and the approver's.
            let owner = LabelOwner::Device(req.device_id);
            let mut labels = txn.labels(&owner)?.unwrap_or_default();
            let before = labels.clone();
            labels.extend(
                txn.labels(&LabelOwner::Code(req.code_id.clone()))?
                    .unwrap_or_default(),
            );
            labels.extend(extra_labels.clone());
            if labels != before {
                if labels.len() > anchorage_wire::labels::MAX_LABELS {
                    return Err(TrustError::BadInput(format!(
                        "a device has at most {} labels; this would make {}",
                        anchorage_wire::labels::MAX_LABELS,
                        labels.len()
                    )));
                }
                txn.put_labels(&owner, &labels)?;
                txn.audit(&self.audit(
                    &actor(who),
                    "device.label",
                    &req.device_id.to_string(),
                    &labels_detail(&labels),
                ))?;
            }
            Ok((approval.request, approval.replaced.is_some()))
        })?;
        self.metrics.pairing_outcome("approved");
        Ok(result)
    }

    /// Rejects a pending request.
    pub fn reject(
        &self,
        who: &Principal,
        request_id: &str,
        reason: Option<String>,
    ) -> Result<RequestRecord, TrustError> {
        let now_ms = self.now_ms();
        let reason = reason.unwrap_or_else(|| "rejected by operator".into());
        let record = transact(&*self.store, |txn| {
            let req = txn
                .request(request_id)?
                .ok_or_else(|| TrustError::NotFound(format!("pairing request {request_id}")))?;
            let rejected = rules::reject(&req, &reason, &actor(who), now_ms)
                .map_err(|r| refused(request_id, &req, r))?;
            txn.put_request(&rejected)?;
            txn.audit(&self.audit(
                &actor(who),
                "pairing.reject",
                request_id,
                rejected.reason.as_deref().unwrap_or_default(),
            ))?;
            Ok::<_, TrustError>(rejected)
        })?;
        self.metrics.pairing_outcome("rejected");
        Ok(record)
    }

    /// The node received its certificate: the request is completed. `true` if this call
    /// completed it.
    pub fn mark_completed(&self, request_id: &str) -> Result<bool, StoreError> {
        transact(&*self.store, |txn| {
            let Some(req) = txn.request(request_id)? else {
                return Ok(false);
            };
            match rules::complete(&req) {
                Some(done) => {
                    txn.put_request(&done)?;
                    Ok(true)
                }
                None => Ok(false),
            }
        })
    }

    /// A waiter woken when request `id` changes (on any anchor sharing the store).
    pub fn waiter(&self, request_id: &str) -> Arc<Notify> {
        self.mirrors
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(request_id.to_string())
            .or_default()
            .clone()
    }

    /// Drops the waiter of a request that no stream waits on any more.
    pub fn forget_waiter(&self, request_id: &str) {
        self.mirrors
            .waiters
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(request_id);
    }
}

/// Why an attempt at a code failed.
#[derive(Debug, thiserror::Error)]
pub enum AttemptFailure {
    /// Refused by the rules.
    #[error("{0:?}")]
    Refused(AttemptError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Refuses labels an operator may not set (the API checks first; this holds for every
/// caller).
fn check_labels(labels: &Labels) -> Result<(), TrustError> {
    for (k, v) in labels {
        anchorage_wire::labels::validate_operator_label(k, v)
            .map_err(|e| TrustError::BadInput(e.to_string()))?;
    }
    Ok(())
}

/// Labels as the audit log shows them: `key=value` separated by spaces.
fn labels_detail(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn refused(request_id: &str, req: &RequestRecord, r: DecisionRefused) -> TrustError {
    match r {
        DecisionRefused::Expired => {
            TrustError::Expired(format!("pairing request {request_id} expired"))
        }
        DecisionRefused::Decided(state) => TrustError::Conflict(format!(
            "pairing request {request_id} is already {}",
            state.as_str()
        )),
        DecisionRefused::DeviceRevoked => TrustError::Conflict(format!(
            "device {} is revoked; remove it before pairing it again",
            req.device_id
        )),
    }
}
