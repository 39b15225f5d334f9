//! [`FjallStore`]: both store interfaces on one embedded fjall database.
//!
//! One keyspace per record kind. Trust transactions are fjall's single-writer transactions
//! (so they never interleave); each commits flushed to the OS while it holds the writer, and
//! the `fdatasync` that makes it survive a power loss runs after the writer is released, so
//! concurrent transactions share disk syncs instead of queueing behind each other's (a group
//! commit). `transact` returns only after that sync. Runtime writes are plain atomic batches.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use ::fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx,
};
use anchorage_mesh::DeviceId;
use anchorage_mesh::identity::DEVICE_ID_LEN;
use anchorage_wire::invoke::InvocationId;
use serde::Serialize;
use serde::de::DeserializeOwned;

use super::*;

/// The record kinds, one keyspace each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Space {
    Meta,
    Codes,
    Requests,
    Devices,
    Revocations,
    Nodes,
    Presence,
    Invocations,
    Tokens,
    Audit,
    Labels,
    TokenLimits,
    TokenUse,
    Batches,
}

impl Space {
    const ALL: [Space; 14] = [
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
    ];

    const fn name(self) -> &'static str {
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
        }
    }
}

fn backend(e: ::fjall::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Both store interfaces on fjall. Cheap to clone.
#[derive(Clone)]
pub struct FjallStore {
    inner: Arc<Inner>,
}

struct Inner {
    db: SingleWriterTxDatabase,
    spaces: Vec<SingleWriterTxKeyspace>,
    path: PathBuf,
    /// Commit revision of trust transactions (in memory: mirrors are rebuilt at start-up).
    revision: AtomicU64,
    /// Tie-breaker of audit keys written in the same millisecond.
    audit_seq: AtomicU64,
    watchers: RwLock<Vec<TrustWatcher>>,
}

impl std::fmt::Debug for FjallStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl FjallStore {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<FjallStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Dir {
            path: dir.to_path_buf(),
            message: e.to_string(),
        })?;
        let db = SingleWriterTxDatabase::builder(dir)
            .open()
            .map_err(|e| match e {
                ::fjall::Error::Locked => StoreError::Locked(dir.to_path_buf()),
                ::fjall::Error::Io(source) => StoreError::Dir {
                    path: dir.to_path_buf(),
                    message: source.to_string(),
                },
                other => StoreError::Open {
                    path: dir.to_path_buf(),
                    message: other.to_string(),
                },
            })?;
        let mut spaces = Vec::with_capacity(Space::ALL.len());
        for space in Space::ALL {
            spaces.push(
                db.keyspace(space.name(), KeyspaceCreateOptions::default)
                    .map_err(|e| StoreError::Open {
                        path: dir.to_path_buf(),
                        message: e.to_string(),
                    })?,
            );
        }
        let store = FjallStore {
            inner: Arc::new(Inner {
                db,
                spaces,
                path: dir.to_path_buf(),
                revision: AtomicU64::new(0),
                audit_seq: AtomicU64::new(0),
                watchers: RwLock::new(Vec::new()),
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.ks(Space::Meta);
        match meta.get(b"schema_version").map_err(backend)? {
            Some(v) => {
                let found = v.first().copied().unwrap_or(0);
                if found > SCHEMA_VERSION {
                    return Err(StoreError::NewerSchema {
                        path: self.inner.path.clone(),
                        found,
                        supported: SCHEMA_VERSION,
                    });
                }
            }
            None => {
                meta.insert(b"schema_version".as_slice(), vec![SCHEMA_VERSION])
                    .map_err(backend)?;
                self.inner
                    .db
                    .persist(PersistMode::SyncAll)
                    .map_err(backend)?;
            }
        }
        Ok(())
    }

    fn ks(&self, space: Space) -> &SingleWriterTxKeyspace {
        // `spaces` is built from `Space::ALL` in order, so every index exists.
        &self.inner.spaces[space as usize]
    }

    fn get<T: DeserializeOwned>(&self, space: Space, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.ks(space).get(key).map_err(backend)? {
            Some(v) => Ok(Some(decode(space.name(), &v)?)),
            None => Ok(None),
        }
    }

    fn scan<T: DeserializeOwned>(&self, space: Space) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).inner().iter() {
            let (k, v) = guard.into_inner().map_err(backend)?;
            out.push((k.to_vec(), decode(space.name(), &v)?));
        }
        Ok(out)
    }

    fn newest<T: DeserializeOwned>(
        &self,
        space: Space,
        limit: usize,
        keep: &dyn Fn(&T) -> bool,
    ) -> Result<Vec<T>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).inner().iter().rev() {
            if out.len() >= limit {
                break;
            }
            let (_, v) = guard.into_inner().map_err(backend)?;
            let value: T = decode(space.name(), &v)?;
            if keep(&value) {
                out.push(value);
            }
        }
        Ok(out)
    }

    /// Deletes `keys` of `space` in one batch, flushed to the OS; returns how many.
    fn remove_all(
        &self,
        space: Space,
        keys: impl IntoIterator<Item = Vec<u8>>,
    ) -> Result<usize, StoreError> {
        let mut batch = self.inner.db.inner().batch();
        let mut n = 0;
        for key in keys {
            batch.remove(self.ks(space).inner(), key);
            n += 1;
        }
        if n > 0 {
            batch
                .durability(Some(PersistMode::Buffer))
                .commit()
                .map_err(backend)?;
        }
        Ok(n)
    }

    /// Writes raw bytes under a key, bypassing the record types (tests of corrupt data).
    #[cfg(test)]
    fn put_raw(&self, space: Space, key: &[u8], value: Vec<u8>) {
        self.ks(space)
            .insert(key.to_vec(), value)
            .expect("raw write in a test");
    }
}

fn revocation_key(key: &Revoked) -> Vec<u8> {
    match key {
        Revoked::Device(id) => {
            let mut k = vec![b'd'];
            k.extend_from_slice(id.as_bytes());
            k
        }
        Revoked::Serial(serial) => {
            let mut k = vec![b's'];
            k.extend_from_slice(serial);
            k
        }
    }
}

fn label_key(owner: &LabelOwner) -> Vec<u8> {
    match owner {
        LabelOwner::Device(id) => {
            let mut k = vec![b'd'];
            k.extend_from_slice(id.as_bytes());
            k
        }
        LabelOwner::Code(id) => {
            let mut k = vec![b'c'];
            k.extend_from_slice(id.as_bytes());
            k
        }
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

/// One trust transaction on fjall: the write transaction plus the changes to announce.
struct Txn<'a> {
    store: &'a FjallStore,
    tx: SingleWriterWriteTx<'a>,
    changes: Vec<TrustChange>,
}

impl Txn<'_> {
    fn get<T: DeserializeOwned>(&self, space: Space, key: &[u8]) -> Result<Option<T>, StoreError> {
        match self.tx.get(self.store.ks(space), key).map_err(backend)? {
            Some(v) => Ok(Some(decode(space.name(), &v)?)),
            None => Ok(None),
        }
    }

    fn put<T: Serialize>(&mut self, space: Space, key: &[u8], value: &T) -> Result<(), StoreError> {
        let bytes = encode(space.name(), value)?;
        self.tx.insert(self.store.ks(space), key.to_vec(), bytes);
        Ok(())
    }

    fn remove(&mut self, space: Space, key: &[u8]) {
        self.tx.remove(self.store.ks(space), key.to_vec());
    }
}

impl TrustTxn for Txn<'_> {
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
            self.remove(Space::Labels, &label_key(owner));
            Ok(())
        } else {
            self.put(Space::Labels, &label_key(owner), labels)
        }
    }

    fn remove_device(&mut self, id: &DeviceId) -> Result<(), StoreError> {
        self.remove(Space::Devices, id.as_bytes());
        self.remove(Space::Labels, &label_key(&LabelOwner::Device(*id)));
        self.remove(Space::Nodes, id.as_bytes());
        self.remove(Space::Presence, id.as_bytes());
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
        self.remove(Space::Revocations, &revocation_key(key));
        self.changes
            .push(TrustChange::Revocation(key.clone(), None));
        Ok(())
    }

    fn audit(&mut self, record: &AuditRecord) -> Result<(), StoreError> {
        let seq = self.store.inner.audit_seq.fetch_add(1, Ordering::Relaxed);
        let mut key = record.at_ms.to_be_bytes().to_vec();
        key.extend_from_slice(&seq.to_be_bytes());
        self.put(Space::Audit, &key, record)
    }
}

impl TrustStore for FjallStore {
    fn transact_dyn(
        &self,
        body: &mut dyn FnMut(&mut dyn TrustTxn) -> TxnOutcome,
    ) -> Result<bool, StoreError> {
        let (rev, changes) = {
            let mut txn = Txn {
                store: self,
                tx: self
                    .inner
                    .db
                    .write_tx()
                    .durability(Some(PersistMode::Buffer)),
                changes: Vec::new(),
            };
            let outcome = body(&mut txn);
            if outcome == TxnOutcome::Abort {
                txn.tx.rollback();
                return Ok(false);
            }
            // Taken while the writer is held, so revisions follow commit order.
            let rev = self.inner.revision.fetch_add(1, Ordering::Relaxed) + 1;
            let changes = std::mem::take(&mut txn.changes);
            txn.tx.commit().map_err(backend)?;
            (rev, changes)
        };
        if !changes.is_empty() {
            let watchers = self
                .inner
                .watchers
                .read()
                .unwrap_or_else(|e| e.into_inner());
            for change in changes {
                let change = Revision { rev, change };
                for w in watchers.iter() {
                    w(&change);
                }
            }
        }
        // The group commit: synced after the writer is released.
        self.inner
            .db
            .persist(PersistMode::SyncData)
            .map_err(backend)?;
        Ok(true)
    }

    fn watch(&self, watcher: TrustWatcher) {
        self.inner
            .watchers
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(watcher);
    }

    fn codes(&self) -> Result<Vec<CodeRecord>, StoreError> {
        Ok(self
            .scan(Space::Codes)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn code(&self, id: &str) -> Result<Option<CodeRecord>, StoreError> {
        self.get(Space::Codes, id.as_bytes())
    }

    fn requests(&self) -> Result<Vec<RequestRecord>, StoreError> {
        Ok(self
            .scan(Space::Requests)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError> {
        self.get(Space::Requests, id.as_bytes())
    }

    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError> {
        Ok(self
            .scan(Space::Devices)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
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
        Ok(self
            .scan(Space::Tokens)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
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

    fn audit_newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError> {
        self.newest(Space::Audit, limit, keep)
    }
}

impl RuntimeStore for FjallStore {
    fn load(&self) -> Result<RuntimeSnapshot, StoreError> {
        let nodes = self
            .scan::<NodeRecord>(Space::Nodes)?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let presence = self
            .scan::<PresenceRecord>(Space::Presence)?
            .into_iter()
            .filter_map(|(k, v)| {
                let id = <[u8; DEVICE_ID_LEN]>::try_from(k.as_slice()).ok()?;
                Some((DeviceId::from_bytes(id), v))
            })
            .collect();
        let unfinished = self
            .scan::<InvocationRecord>(Space::Invocations)?
            .into_iter()
            .map(|(_, v)| v)
            .filter(|r| !r.state.is_final())
            .collect();
        let batches = self
            .scan::<BatchRecord>(Space::Batches)?
            .into_iter()
            .map(|(_, v)| v)
            .filter(|b| b.finished_at_ms.is_none())
            .collect();
        let token_use = self
            .scan::<u64>(Space::TokenUse)?
            .into_iter()
            .map(|(k, v)| (String::from_utf8_lossy(&k).into_owned(), v))
            .collect();
        Ok(RuntimeSnapshot {
            nodes,
            presence,
            unfinished,
            batches,
            token_use,
        })
    }

    fn apply(&self, writes: &[RuntimeWrite]) -> Result<(), StoreError> {
        let mut batch = self.inner.db.inner().batch();
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
                RuntimeWrite::Invocation(r) => (
                    Space::Invocations,
                    r.id.to_vec(),
                    encode(Space::Invocations.name(), r)?,
                ),
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
            };
            batch.insert(self.ks(space).inner(), key, value);
        }
        batch
            .durability(Some(PersistMode::Buffer))
            .commit()
            .map_err(backend)
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
        let all: Vec<(Vec<u8>, BatchRecord)> = self.scan(Space::Batches)?;
        let old = all
            .into_iter()
            .filter(|(_, b)| b.finished_at_ms.is_some_and(|at| at < finished_before_ms))
            .map(|(key, _)| key);
        self.remove_all(Space::Batches, old)
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
        let gone = finished
            .iter()
            .enumerate()
            .filter(|(i, (_, rec))| {
                *i < over || rec.finished_at_ms.unwrap_or(rec.created_at_ms) < finished_before_ms
            })
            .map(|(_, (key, _))| key.clone());
        self.remove_all(Space::Invocations, gone)
    }

    fn disk_space(&self) -> u64 {
        self.inner.db.disk_space().unwrap_or(0)
    }

    fn persist(&self) -> Result<(), StoreError> {
        self.inner.db.persist(PersistMode::SyncAll).map_err(backend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fjall(tempfile::TempDir);

    impl conformance::Backend for Fjall {
        fn open(&self) -> Result<Stores, StoreError> {
            Ok(Stores::from_backend(FjallStore::open(self.0.path())?))
        }
    }

    fn backend() -> Fjall {
        Fjall(tempfile::tempdir().expect("temp dir"))
    }

    conformance::suite!(backend);

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = FjallStore::open(dir.path()).unwrap();
        match FjallStore::open(dir.path()) {
            Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FjallStore::open(dir.path()).unwrap();
            store.put_raw(Space::Meta, b"schema_version", vec![SCHEMA_VERSION + 1]);
            RuntimeStore::persist(&store).unwrap();
        }
        let err = FjallStore::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade anchord"));
    }

    #[test]
    fn a_damaged_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(FjallStore::open(dir.path()).unwrap());
        // Overwrite every file of the database with garbage.
        fn scramble(p: &std::path::Path) {
            for e in std::fs::read_dir(p).unwrap() {
                let path = e.unwrap().path();
                if path.is_dir() {
                    scramble(&path);
                } else if !path.ends_with("lock") {
                    std::fs::write(&path, b"\xde\xad\xbe\xef not a database").unwrap();
                }
            }
        }
        scramble(dir.path());
        match FjallStore::open(dir.path()) {
            Err(e @ (StoreError::Open { .. } | StoreError::Corrupt { .. })) => {
                let msg = e.to_string();
                assert!(msg.contains(&dir.path().display().to_string()), "{msg}");
            }
            Err(StoreError::Backend(msg)) => assert!(!msg.is_empty()),
            Err(other) => panic!("unexpected error kind: {other}"),
            Ok(_) => panic!("a scrambled store opened"),
        }
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = FjallStore::open(dir.path()).unwrap();
        store.put_raw(Space::Requests, b"a", vec![]);
        store.put_raw(Space::Requests, b"b", vec![SCHEMA_VERSION, 0xff, 0xff]);
        store.put_raw(Space::Requests, b"c", vec![9, 1, 2]);
        for k in ["a", "b", "c"] {
            let err = TrustStore::request(&store, k).unwrap_err();
            assert!(
                matches!(
                    err,
                    StoreError::Corrupt {
                        space: "requests",
                        ..
                    }
                ),
                "{err}"
            );
        }
        assert!(TrustStore::requests(&store).is_err());
    }
}
