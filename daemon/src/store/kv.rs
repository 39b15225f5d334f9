//! The record layer, written once over any ordered key-value backend with transactions.
//!
//! [`KvStore`] implements [`TrustStore`] and [`RuntimeStore`] (records, keys, what a change
//! means to watchers) over a [`Kv`]: the few primitives a backend provides (get, scan, newest
//! first, an atomic batch, a serialisable transaction). fjall and etcd are two `Kv`s; the
//! conformance suite holds both to the same behaviour.
//!
//! The layout is the same everywhere: one [`Space`] per record kind, keys as below, values as
//! [`encode`]d.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use anchorage_mesh::DeviceId;
use anchorage_mesh::identity::DEVICE_ID_LEN;
use anchorage_wire::invoke::InvocationId;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;

/// The record kinds, one keyspace (fjall) or key prefix (etcd) each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Space {
    /// The schema version.
    Meta,
    /// Pairing codes, by id.
    Codes,
    /// Pairing requests, by id.
    Requests,
    /// Devices, by device id.
    Devices,
    /// Revocations: `d` + device id, `s` + serial.
    Revocations,
    /// Node registrations, by device id.
    Nodes,
    /// Last-seen, by device id.
    Presence,
    /// Invocations, by id (UUID v7: by age).
    Invocations,
    /// Tokens, by id.
    Tokens,
    /// Audit, by time and a tie-breaker.
    Audit,
    /// Labels: `d` + device id, `c` + code id.
    Labels,
    /// Token limits, by token id.
    TokenLimits,
    /// Token last use, by token id.
    TokenUse,
    /// Batches, by id (UUID v7).
    Batches,
    /// Who holds each node's session, by device id (a shared store only: under the holder's
    /// lease).
    Sessions,
    /// Unfinished invocations by device: device id + invocation id, empty values (a shared
    /// store only: how the anchor a node registers with finds the work waiting for it).
    Pending,
    /// Versions of the mesh policy, by version (8 bytes, big-endian: oldest first); which is
    /// in force is [`POLICY_VERSION_KEY`] in [`Space::Meta`].
    Policy,
    /// Each device's history: device id + time (8 bytes, big-endian) + kind (0 a sample, 1 a
    /// presence change), so one device's entries are one key range, oldest first.
    History,
}

impl Space {
    /// Every space, in a fixed order.
    pub const ALL: [Space; 18] = [
        Space::Meta,
        Space::Codes,
        Space::Requests,
        Space::Devices,
        Space::Revocations,
        Space::Nodes,
        Space::Presence,
        Space::Invocations,
        Space::Tokens,
        Space::Audit,
        Space::Labels,
        Space::TokenLimits,
        Space::TokenUse,
        Space::Batches,
        Space::Sessions,
        Space::Pending,
        Space::Policy,
        Space::History,
    ];

    /// Its name (fjall keyspace, etcd key segment, error messages).
    pub const fn name(self) -> &'static str {
        match self {
            Space::Meta => "meta",
            Space::Codes => "codes",
            Space::Requests => "requests",
            Space::Devices => "devices",
            Space::Revocations => "revocations",
            Space::Nodes => "nodes",
            Space::Presence => "presence",
            Space::Invocations => "invocations",
            Space::Tokens => "tokens",
            Space::Audit => "audit",
            Space::Labels => "labels",
            Space::TokenLimits => "token_limits",
            Space::TokenUse => "token_use",
            Space::Batches => "batches",
            Space::Sessions => "sessions",
            Space::Pending => "pending",
            Space::Policy => "policy",
            Space::History => "history",
        }
    }

    /// The space named `name`.
    pub fn named(name: &str) -> Option<Space> {
        Space::ALL.into_iter().find(|s| s.name() == name)
    }
}

/// A key and its value.
pub type KvPair = (Vec<u8>, Vec<u8>);

/// One write of a batch: a value, or a removal.
pub type KvWrite = (Space, Vec<u8>, Option<Vec<u8>>);

/// A committed change as a backend's watch reports it, from this process or another.
#[derive(Debug, Clone)]
pub struct KvChange {
    /// The revision it was committed at.
    pub rev: u64,
    /// Where.
    pub space: Space,
    /// The key.
    pub key: Vec<u8>,
    /// The value written, or `None` for a removal.
    pub value: Option<Vec<u8>>,
}

/// Reads and writes of one transaction of a [`Kv`]. Reads see the transaction's writes.
pub trait KvTxn {
    /// The value under `key`.
    fn get(&mut self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Writes `value` under `key`.
    fn put(&mut self, space: Space, key: &[u8], value: Vec<u8>);
    /// Removes `key`.
    fn remove(&mut self, space: Space, key: &[u8]);
}

/// What a backend provides. Every method blocks.
pub trait Kv: Send + Sync + 'static {
    /// The value under `key`.
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError>;
    /// Every key and value of `space`, in key order.
    fn scan(&self, space: Space) -> Result<Vec<KvPair>, StoreError>;
    /// Values of `space` from the last key backwards, handed to `each` until it returns
    /// `Ok(false)`.
    fn newest(
        &self,
        space: Space,
        each: &mut dyn FnMut(&[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError>;
    /// Applies `writes` in order (atomically where the backend can: see its docs).
    fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError>;
    /// Runs `body` in a serialisable transaction and commits its writes, durably, if it says
    /// so; may run `body` again after a conflict. Returns the commit's revision, or `None`
    /// when the body aborted.
    fn transact(
        &self,
        body: &mut dyn FnMut(&mut dyn KvTxn) -> TxnOutcome,
    ) -> Result<Option<u64>, StoreError>;
    /// Announces this process under `key` with `value` for as long as it lives and calls
    /// again within `ttl`: a shared backend drops the announcement (and this process's
    /// sessions) `ttl` after the last call. Returns the state of the lease.
    fn announce(
        &self,
        key: &[u8],
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<Lease, StoreError>;
    /// Every live announcement (this process's included).
    fn announced(&self) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Calls `sink` with every change committed from now on by anyone else sharing the
    /// backend (a backend only this process uses has nothing to report).
    fn follow(&self, _sink: Box<dyn Fn(KvChange) + Send + Sync>) {}
    /// Whether other processes share the backend. A shared backend keeps [`Space::Sessions`]
    /// under this process's lease (a put is leased; a removal happens only while the key is
    /// still under that lease) and [`Space::Pending`].
    fn shared(&self) -> bool {
        false
    }
    /// Whether [`Kv::apply`] may have to wait now (for the network, or for the journal a
    /// durable commit is syncing): the writer then commits on the blocking pool, otherwise on
    /// its own task, which saves a thread hand-off per batch.
    fn apply_may_wait(&self) -> bool {
        true
    }
    /// Since when (Unix ms) reads have answered from the backend's last view because it
    /// cannot be reached; `None` while they answer from the backend itself.
    fn stale_since(&self) -> Option<u64> {
        None
    }
    /// Keys and values of `space` that start with `prefix`, in key order.
    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<KvPair>, StoreError> {
        Ok(self
            .scan(space)?
            .into_iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .collect())
    }
    /// Bytes on disk, if known.
    fn disk_space(&self) -> u64;
    /// Makes everything written so far durable.
    fn persist(&self) -> Result<(), StoreError>;
}

/// Both store interfaces over a [`Kv`].
pub struct KvStore<K> {
    pub(crate) kv: K,
    watchers: Arc<RwLock<Vec<TrustWatcher>>>,
    runtime_watchers: Arc<RwLock<Vec<RuntimeWatcher>>>,
    /// Tie-breaker of audit keys written in the same millisecond: random high bits, so
    /// anchors sharing a backend never collide.
    audit_seq: AtomicU64,
}

impl<K: std::fmt::Debug> std::fmt::Debug for KvStore<K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.kv.fmt(f)
    }
}

impl<K: Kv> KvStore<K> {
    /// The store over `kv`, checking the schema version (and writing it on a new store).
    pub fn new(kv: K, path: &std::path::Path) -> Result<KvStore<K>, StoreError> {
        let watchers: Arc<RwLock<Vec<TrustWatcher>>> = Arc::default();
        let runtime_watchers: Arc<RwLock<Vec<RuntimeWatcher>>> = Arc::default();
        {
            let (watchers, runtime) = (watchers.clone(), runtime_watchers.clone());
            kv.follow(Box::new(move |c| {
                if let Some(change) = trust_change(&c) {
                    let change = Revision {
                        rev: c.rev,
                        change,
                        remote: true,
                    };
                    for w in watchers.read().unwrap_or_else(|e| e.into_inner()).iter() {
                        w(&change);
                    }
                } else if let Some(change) = runtime_change(&c) {
                    for w in runtime.read().unwrap_or_else(|e| e.into_inner()).iter() {
                        w(change.clone());
                    }
                }
            }));
        }
        let mut seed = [0u8; 4];
        // A fixed seed only weakens the tie-break between anchors, never correctness.
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut seed);
        let store = KvStore {
            kv,
            watchers,
            runtime_watchers,
            audit_seq: AtomicU64::new(u64::from(u32::from_be_bytes(seed)) << 32),
        };
        store.check_schema(path)?;
        Ok(store)
    }

    fn check_schema(&self, path: &std::path::Path) -> Result<(), StoreError> {
        match self.kv.get(Space::Meta, b"schema_version")? {
            Some(v) => {
                let found = v.first().copied().unwrap_or(0);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: path.to_path_buf(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                self.kv.apply(vec![(
                    Space::Meta,
                    b"schema_version".to_vec(),
                    Some(vec![SCHEMA_VERSION]),
                )])?;
                self.kv.persist()?;
            }
        }
        Ok(())
    }

    fn get<T: DeserializeOwned>(&self, space: Space, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.kv.get(space, key)? {
            Some(v) => Ok(Some(decode(space.name(), &v)?)),
            None => Ok(None),
        }
    }

    fn scan<T: DeserializeOwned>(&self, space: Space) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.kv
            .scan(space)?
            .into_iter()
            .map(|(k, v)| Ok((k, decode(space.name(), &v)?)))
            .collect()
    }

    fn values<T: DeserializeOwned>(&self, space: Space) -> Result<Vec<T>, StoreError> {
        Ok(self.scan(space)?.into_iter().map(|(_, v)| v).collect())
    }

    fn newest<T: DeserializeOwned>(
        &self,
        space: Space,
        limit: usize,
        keep: &dyn Fn(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        if limit == 0 {
            return Ok(out);
        }
        self.kv.newest(space, &mut |v| {
            let value: T = decode(space.name(), v)?;
            if keep(&value) {
                out.push(value);
            }
            Ok(out.len() < limit)
        })?;
        Ok(out)
    }
}

/// A change's value decoded (`Some(None)`: a removal; `None`: a value that does not decode).
fn written<T: DeserializeOwned>(c: &KvChange) -> Option<Option<T>> {
    match &c.value {
        Some(v) => Some(Some(decode(c.space.name(), v).ok()?)),
        None => Some(None),
    }
}

/// What a committed write means to the trust watchers, if anything.
fn trust_change(c: &KvChange) -> Option<TrustChange> {
    match c.space {
        Space::Tokens => Some(TrustChange::Token(
            decode(c.space.name(), c.value.as_ref()?).ok()?,
        )),
        Space::TokenLimits => Some(TrustChange::TokenLimits(
            String::from_utf8(c.key.clone()).ok()?,
            decode(c.space.name(), c.value.as_ref()?).ok()?,
        )),
        Space::Revocations => {
            let key = parse_revocation_key(&c.key)?;
            let record = written(c)?;
            Some(TrustChange::Revocation(key, record))
        }
        Space::Requests => Some(TrustChange::Request(
            decode(c.space.name(), c.value.as_ref()?).ok()?,
        )),
        Space::Devices => {
            let id = DeviceId::from_bytes(<[u8; DEVICE_ID_LEN]>::try_from(c.key.as_slice()).ok()?);
            let record = written(c)?;
            Some(TrustChange::Device(id, record))
        }
        Space::Policy => Some(TrustChange::Policy(
            decode(c.space.name(), c.value.as_ref()?).ok()?,
        )),
        Space::Labels => {
            let owner = parse_label_key(&c.key)?;
            let labels = written(c)?;
            Some(TrustChange::Labels(owner, labels))
        }
        _ => None,
    }
}

/// What a committed write by another anchor means to the runtime watchers, if anything.
fn runtime_change(c: &KvChange) -> Option<RuntimeChange> {
    let device = || {
        <[u8; DEVICE_ID_LEN]>::try_from(c.key.as_slice())
            .ok()
            .map(DeviceId::from_bytes)
    };
    let name = c.space.name();
    match c.space {
        Space::Nodes => Some(RuntimeChange::Node(decode(name, c.value.as_deref()?).ok()?)),
        Space::Presence => Some(RuntimeChange::Presence(
            device()?,
            decode(name, c.value.as_deref()?).ok()?,
        )),
        Space::Sessions => Some(RuntimeChange::Session(
            device()?,
            match &c.value {
                Some(v) => Some(decode(name, v).ok()?),
                None => None,
            },
        )),
        Space::Invocations => Some(RuntimeChange::Invocation(
            decode(name, c.value.as_deref()?).ok()?,
        )),
        _ => None,
    }
}

/// The key of the sealed cluster CA in [`Space::Meta`].
const CLUSTER_CA_KEY: &[u8] = b"cluster_ca";

/// The key in [`Space::Meta`] of the version of the mesh policy in force. Every change reads
/// and writes it in its transaction, so two anchors setting a policy at once never both make
/// the same version (on etcd the second one's compare fails and it runs again).
pub const POLICY_VERSION_KEY: &[u8] = b"policy_version";

/// The key of a policy version.
fn policy_key(version: u64) -> [u8; 8] {
    version.to_be_bytes()
}

/// The key of a history entry: device id, time (big-endian), kind.
pub fn history_key(device: &DeviceId, entry: &HistoryEntry) -> Vec<u8> {
    let mut key = Vec::with_capacity(DEVICE_ID_LEN + 9);
    key.extend_from_slice(device.as_bytes());
    key.extend_from_slice(&entry.at_ms().to_be_bytes());
    key.push(entry.kind());
    key
}

/// The key of a revocation.
pub fn revocation_key(key: &Revoked) -> Vec<u8> {
    match key {
        Revoked::Device(id) => [b"d".as_slice(), id.as_bytes()].concat(),
        Revoked::Serial(serial) => [b"s".as_slice(), serial].concat(),
    }
}

/// The key of a label set.
pub fn label_key(owner: &LabelOwner) -> Vec<u8> {
    match owner {
        LabelOwner::Device(id) => [b"d".as_slice(), id.as_bytes()].concat(),
        LabelOwner::Code(id) => [b"c".as_slice(), id.as_bytes()].concat(),
    }
}

fn parse_label_key(key: &[u8]) -> Option<LabelOwner> {
    match key.split_first()? {
        (b'd', rest) => Some(LabelOwner::Device(DeviceId::from_bytes(
            <[u8; DEVICE_ID_LEN]>::try_from(rest).ok()?,
        ))),
        (b'c', rest) => Some(LabelOwner::Code(String::from_utf8(rest.to_vec()).ok()?)),
        _ => None,
    }
}

fn parse_revocation_key(key: &[u8]) -> Option<Revoked> {
    match key.split_first()? {
        (b'd', rest) => Some(Revoked::Device(DeviceId::from_bytes(
            <[u8; DEVICE_ID_LEN]>::try_from(rest).ok()?,
        ))),
        (b's', rest) => Some(Revoked::Serial(rest.to_vec())),
        _ => None,
    }
}

/// A trust transaction over a [`KvTxn`]: records in, bytes out, changes noted for watchers.
struct RecordTxn<'a> {
    kv: &'a mut dyn KvTxn,
    audit_seq: &'a AtomicU64,
    changes: Vec<TrustChange>,
}

impl RecordTxn<'_> {
    fn get<T: DeserializeOwned>(
        &mut self,
        space: Space,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.kv.get(space, key)? {
            Some(v) => Ok(Some(decode(space.name(), &v)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&mut self, space: Space, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = encode(space.name(), value)?;
        self.kv.put(space, key, bytes);
        Ok(())
    }
}

impl TrustTxn for RecordTxn<'_> {
    fn code(&mut self, id: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.get(Space::Codes, id.as_bytes())
    }

    fn put_code(&mut self, code: &CodeRecord) -> Result<(), StoreError> {
        self.put(Space::Codes, code.code_id.as_bytes(), code)
    }

    fn request(&mut self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.get(Space::Requests, id.as_bytes())
    }

    fn put_request(&mut self, request: &RequestRecord) -> Result<(), StoreError> {
        self.put(Space::Requests, request.request_id.as_bytes(), request)?;
        self.changes.push(TrustChange::Request(request.clone()));
        Ok(())
    }

    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(Space::Devices, id.as_bytes())
    }

    fn put_device(&mut self, device: &DeviceRecord) -> Result<(), StoreError> {
        self.put(Space::Devices, device.device_id.as_bytes(), device)?;
        self.changes
            .push(TrustChange::Device(device.device_id, Some(device.clone())));
        Ok(())
    }

    fn labels(&mut self, owner: &LabelOwner) -> Result<Option<Labels>, StoreError> {
        self.get(Space::Labels, &label_key(owner))
    }

    fn put_labels(&mut self, owner: &LabelOwner, labels: &Labels) -> Result<(), StoreError> {
        if labels.is_empty() {
            self.kv.remove(Space::Labels, &label_key(owner));
        } else {
            self.put(Space::Labels, &label_key(owner), labels)?;
        }
        let set = Some(labels.clone()).filter(|l| !l.is_empty());
        self.changes.push(TrustChange::Labels(owner.clone(), set));
        Ok(())
    }

    fn remove_device(&mut self, id: &DeviceId) -> Result<(), StoreError> {
        self.kv.remove(Space::Devices, id.as_bytes());
        self.kv
            .remove(Space::Labels, &label_key(&LabelOwner::Device(*id)));
        self.kv.remove(Space::Nodes, id.as_bytes());
        self.kv.remove(Space::Presence, id.as_bytes());
        self.changes.push(TrustChange::Device(*id, None));
        Ok(())
    }

    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError> {
        self.get(Space::Tokens, id.as_bytes())
    }

    fn put_token(&mut self, token: &TokenRecord) -> Result<(), StoreError> {
        self.put(Space::Tokens, token.id.as_bytes(), token)?;
        self.changes.push(TrustChange::Token(token.clone()));
        Ok(())
    }

    fn put_token_limits(&mut self, id: &str, limits: &TokenLimits) -> Result<(), StoreError> {
        self.put(Space::TokenLimits, id.as_bytes(), limits)?;
        self.changes
            .push(TrustChange::TokenLimits(id.to_string(), limits.clone()));
        Ok(())
    }

    fn revoke(&mut self, key: &Revoked, record: &RevocationRecord) -> Result<(), StoreError> {
        self.put(Space::Revocations, &revocation_key(key), record)?;
        self.changes
            .push(TrustChange::Revocation(key.clone(), Some(record.clone())));
        Ok(())
    }

    fn unrevoke(&mut self, key: &Revoked) -> Result<(), StoreError> {
        self.kv.remove(Space::Revocations, &revocation_key(key));
        self.changes
            .push(TrustChange::Revocation(key.clone(), None));
        Ok(())
    }

    fn cluster_ca(&mut self) -> Result<Option<crate::cluster::SealedCa>, StoreError> {
        self.get(Space::Meta, CLUSTER_CA_KEY)
    }

    fn put_cluster_ca(&mut self, ca: &crate::cluster::SealedCa) -> Result<(), StoreError> {
        self.put(Space::Meta, CLUSTER_CA_KEY, ca)
    }

    fn policy(&mut self) -> Result<Option<PolicyRecord>, StoreError> {
        match self.get::<u64>(Space::Meta, POLICY_VERSION_KEY)? {
            Some(version) => self.get(Space::Policy, &policy_key(version)),
            None => Ok(None),
        }
    }

    fn put_policy(&mut self, record: &PolicyRecord) -> Result<(), StoreError> {
        self.put(Space::Policy, &policy_key(record.version), record)?;
        self.put(Space::Meta, POLICY_VERSION_KEY, &record.version)?;
        if let Some(gone) = record.version.checked_sub(POLICY_HISTORY as u64)
            && gone > 0
        {
            self.kv.remove(Space::Policy, &policy_key(gone));
        }
        self.changes.push(TrustChange::Policy(record.clone()));
        Ok(())
    }

    fn audit(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        let seq = self.audit_seq.fetch_add(1, Ordering::Relaxed);
        let key = [record.at_ms.to_be_bytes(), seq.to_be_bytes()].concat();
        self.put(Space::Audit, &key, record)
    }
}

impl<K: Kv> TrustStore for KvStore<K> {
    fn transact_dyn(
        &self,
        body: &mut dyn FnMut(&mut dyn TrustTxn) -> TxnOutcome,
    ) -> Result<bool, StoreError> {
        let mut changes = Vec::new();
        let committed = self.kv.transact(&mut |kv| {
            let mut txn = RecordTxn {
                kv,
                audit_seq: &self.audit_seq,
                changes: Vec::new(),
            };
            let outcome = body(&mut txn);
            changes = txn.changes;
            outcome
        })?;
        let Some(rev) = committed else {
            return Ok(false);
        };
        if !changes.is_empty() {
            let watchers = self.watchers.read().unwrap_or_else(|e| e.into_inner());
            for change in changes {
                let change = Revision {
                    rev,
                    change,
                    remote: false,
                };
                for w in watchers.iter() {
                    w(&change);
                }
            }
        }
        Ok(true)
    }

    fn watch(&self, watcher: TrustWatcher) {
        self.watchers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }

    fn codes(&self) -> Result<Vec<CodeRecord>, StoreError> {
        self.values(Space::Codes)
    }

    fn code(&self, id: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.get(Space::Codes, id.as_bytes())
    }

    fn requests(&self) -> Result<Vec<RequestRecord>, StoreError> {
        self.values(Space::Requests)
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.get(Space::Requests, id.as_bytes())
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        self.values(Space::Devices)
    }

    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError> {
        self.get(Space::Devices, id.as_bytes())
    }

    fn labels_of(&self, owner: &LabelOwner) -> Result<Option<Labels>, StoreError> {
        self.get(Space::Labels, &label_key(owner))
    }

    fn all_labels(&self) -> Result<Vec<(LabelOwner, Labels)>, StoreError> {
        Ok(self
            .scan::<Labels>(Space::Labels)?
            .into_iter()
            .filter_map(|(k, v)| Some((parse_label_key(&k)?, v)))
            .collect())
    }

    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError> {
        self.values(Space::Tokens)
    }

    fn token_limits(&self) -> Result<Vec<(String, TokenLimits)>, StoreError> {
        Ok(self
            .scan::<TokenLimits>(Space::TokenLimits)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect())
    }

    fn revocations(&self) -> Result<Vec<(Revoked, RevocationRecord)>, StoreError> {
        Ok(self
            .scan::<RevocationRecord>(Space::Revocations)?
            .into_iter()
            .filter_map(|(k, v)| parse_revocation_key(&k).map(|key| (key, v)))
            .collect())
    }

    fn policy(&self) -> Result<Option<PolicyRecord>, StoreError> {
        match self.get::<u64>(Space::Meta, POLICY_VERSION_KEY)? {
            Some(version) => self.get(Space::Policy, &policy_key(version)),
            None => Ok(None),
        }
    }

    fn policy_history(&self, limit: usize) -> Result<Vec<PolicyRecord>, StoreError> {
        self.newest(Space::Policy, limit, &|_| true)
    }

    fn audit_newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.newest(Space::Audit, limit, keep)
    }
}

impl<K: Kv> RuntimeStore for KvStore<K> {
    fn load(&self) -> Result<RuntimeSnapshot, StoreError> {
        let presence = self
            .scan::<PresenceRecord>(Space::Presence)?
            .into_iter()
            .filter_map(|(k, v)| {
                let id = <[u8; DEVICE_ID_LEN]>::try_from(k.as_slice()).ok()?;
                Some((DeviceId::from_bytes(id), v))
            })
            .collect();
        let unfinished = self
            .values::<InvocationRecord>(Space::Invocations)?
            .into_iter()
            .filter(|r| !r.state.is_final())
            .collect();
        let batches = self
            .values::<BatchRecord>(Space::Batches)?
            .into_iter()
            .filter(|b| b.finished_at_ms.is_none())
            .collect();
        let token_use = self
            .scan::<u64>(Space::TokenUse)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect();
        let sessions = if self.kv.shared() {
            self.scan::<SessionRecord>(Space::Sessions)?
                .into_iter()
                .filter_map(|(k, v)| {
                    let id = <[u8; DEVICE_ID_LEN]>::try_from(k.as_slice()).ok()?;
                    Some((DeviceId::from_bytes(id), v))
                })
                .collect()
        } else {
            Vec::new()
        };
        let history = self
            .scan::<HistoryEntry>(Space::History)?
            .into_iter()
            .filter_map(|(k, v)| {
                let id = <[u8; DEVICE_ID_LEN]>::try_from(k.get(..DEVICE_ID_LEN)?).ok()?;
                Some((DeviceId::from_bytes(id), v))
            })
            .collect();
        Ok(RuntimeSnapshot {
            history,
            nodes: self.values(Space::Nodes)?,
            presence,
            unfinished,
            batches,
            token_use,
            sessions,
        })
    }

    fn apply(&self, writes: &[RuntimeWrite]) -> Result<(), StoreError> {
        let shared = self.kv.shared();
        let mut out = Vec::with_capacity(writes.len());
        for w in writes {
            let (space, key, value) = match w {
                RuntimeWrite::Node(n) => (
                    Space::Nodes,
                    n.device_id.as_bytes().to_vec(),
                    encode(Space::Nodes.name(), n)?,
                ),
                RuntimeWrite::Presence(id, p) => (
                    Space::Presence,
                    id.as_bytes().to_vec(),
                    encode(Space::Presence.name(), p)?,
                ),
                RuntimeWrite::Invocation(r) => {
                    if shared {
                        // The index the anchor a node registers with reads its work from.
                        let key = [r.device_id.as_bytes().as_slice(), &r.id].concat();
                        let index = (!r.state.is_final()).then(Vec::new);
                        out.push((Space::Pending, key, index));
                    }
                    (
                        Space::Invocations,
                        r.id.to_vec(),
                        encode(Space::Invocations.name(), r)?,
                    )
                }
                RuntimeWrite::Batch(b) => (
                    Space::Batches,
                    b.id.to_vec(),
                    encode(Space::Batches.name(), b)?,
                ),
                RuntimeWrite::TokenUsed(id, at) => (
                    Space::TokenUse,
                    id.as_bytes().to_vec(),
                    encode(Space::TokenUse.name(), at)?,
                ),
                RuntimeWrite::Session(id, record) => {
                    if shared {
                        let value = match record {
                            Some(r) => Some(encode(Space::Sessions.name(), r)?),
                            None => None,
                        };
                        out.push((Space::Sessions, id.as_bytes().to_vec(), value));
                    }
                    continue;
                }
                RuntimeWrite::History(id, entry) => (
                    Space::History,
                    history_key(id, entry),
                    encode(Space::History.name(), entry)?,
                ),
                RuntimeWrite::HistoryRemove(id, entry) => {
                    out.push((Space::History, history_key(id, entry), None));
                    continue;
                }
                RuntimeWrite::HistoryForget(id) => {
                    for (key, _) in self.kv.scan_prefix(Space::History, id.as_bytes())? {
                        out.push((Space::History, key, None));
                    }
                    continue;
                }
            };
            out.push((space, key, Some(value)));
        }
        self.kv.apply(out)
    }

    fn invocation(&self, id: &InvocationId) -> Result<Option<InvocationRecord>, StoreError> {
        self.get(Space::Invocations, &id.0)
    }

    fn invocations_newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&InvocationRecord) -> bool,
    ) -> Result<Vec<InvocationRecord>, StoreError> {
        self.newest(Space::Invocations, limit, keep)
    }

    fn batch(&self, id: &[u8; 16]) -> Result<Option<BatchRecord>, StoreError> {
        self.get(Space::Batches, id)
    }

    fn batches_newest(&self, limit: usize) -> Result<Vec<BatchRecord>, StoreError> {
        self.newest(Space::Batches, limit, &|_| true)
    }

    fn prune_batches(&self, finished_before_ms: u64) -> Result<usize, StoreError> {
        let gone: Vec<KvWrite> = self
            .scan::<BatchRecord>(Space::Batches)?
            .into_iter()
            .filter(|(_, b)| b.finished_at_ms.is_some_and(|at| at < finished_before_ms))
            .map(|(key, _)| (Space::Batches, key, None))
            .collect();
        let n = gone.len();
        self.kv.apply(gone)?;
        Ok(n)
    }

    fn prune_invocations(
        &self,
        finished_before_ms: u64,
        keep_at_most: usize,
    ) -> Result<usize, StoreError> {
        let all: Vec<(Vec<u8>, InvocationRecord)> = self.scan(Space::Invocations)?;
        let finished: Vec<&(Vec<u8>, InvocationRecord)> =
            all.iter().filter(|(_, r)| r.state.is_final()).collect();
        let over = finished.len().saturating_sub(keep_at_most);
        // Keys sort by creation time: the first `over` are the oldest.
        let gone: Vec<KvWrite> = finished
            .iter()
            .enumerate()
            .filter(|(i, (_, rec))| {
                *i < over || rec.finished_at_ms.unwrap_or(rec.created_at_ms) < finished_before_ms
            })
            .map(|(_, (key, _))| (Space::Invocations, key.clone(), None))
            .collect();
        let n = gone.len();
        self.kv.apply(gone)?;
        Ok(n)
    }

    fn disk_space(&self) -> u64 {
        self.kv.disk_space()
    }

    fn persist(&self) -> Result<(), StoreError> {
        self.kv.persist()
    }

    fn announce(
        &self,
        id: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<Lease, StoreError> {
        self.kv.announce(id.as_bytes(), value, ttl)
    }

    fn announced(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        self.kv.announced()
    }

    fn shared(&self) -> bool {
        self.kv.shared()
    }

    fn apply_may_wait(&self) -> bool {
        self.kv.apply_may_wait()
    }

    fn stale_since(&self) -> Option<u64> {
        self.kv.stale_since()
    }

    fn pending_for(&self, device: &DeviceId) -> Result<Vec<InvocationRecord>, StoreError> {
        if !self.kv.shared() {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for (key, _) in self.kv.scan_prefix(Space::Pending, device.as_bytes())? {
            let Some(id) = key.get(DEVICE_ID_LEN..) else {
                continue;
            };
            if let Some(r) = self.get::<InvocationRecord>(Space::Invocations, id)?
                && !r.state.is_final()
            {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn follow(&self, watcher: RuntimeWatcher) {
        self.runtime_watchers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }
}
