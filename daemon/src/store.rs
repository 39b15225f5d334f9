//! The anchor's state on disk: one fjall database, one keyspace per record kind.
//!
//! Values are a schema-version byte followed by the postcard encoding of a record from
//! [`crate::records`]. A value with a newer schema version than this build knows, or a database
//! whose `meta` keyspace says so, is refused with a clear error rather than misread. Writes that
//! must agree go in one [`Batch`]; trust decisions are committed with `fdatasync` before they
//! are acknowledged, everything else is flushed to the OS (which survives `kill -9`).
//!
//! All methods are blocking; async callers go through `spawn_blocking` (see
//! [`Store::run`]). Record kinds live behind the [`Space`] enum rather than fjall types, so
//! another key-value backend could stand in for fjall.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use fjall::{Database, Keyspace, KeyspaceCreateOptions, PersistMode};
use serde::{Serialize, de::DeserializeOwned};

/// Schema version of every value written by this build.
pub const SCHEMA_VERSION: u8 = 1;

/// Errors of the store.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the database.
    #[error("the data directory {0} is locked by another anchord")]
    Locked(PathBuf),
    /// The data directory cannot be created or written.
    #[error("cannot use data directory {path}: {source}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The store was written by a newer Anchorage.
    #[error(
        "the store in {path} has schema version {found}, newer than this anchord supports ({supported}); upgrade anchord"
    )]
    NewerSchema {
        /// The directory.
        path: PathBuf,
        /// Found.
        found: u8,
        /// Supported.
        supported: u8,
    },
    /// The database could not be opened (damaged files, wrong format).
    #[error(
        "cannot open the store in {path}: {source}; restore the data directory from a backup or move it aside"
    )]
    Open {
        /// The directory.
        path: PathBuf,
        /// fjall's error.
        source: fjall::Error,
    },
    /// A value could not be decoded.
    #[error("corrupt record in keyspace {space}: {detail}")]
    Corrupt {
        /// Keyspace.
        space: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// fjall failed.
    #[error("store error: {0}")]
    Fjall(#[from] fjall::Error),
    /// A blocking task panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
}

/// The record kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Space {
    /// Store metadata (schema version).
    Meta,
    /// Pairing codes.
    Codes,
    /// Pairing requests.
    Requests,
    /// Devices.
    Devices,
    /// Revocations.
    Revocations,
    /// Node registrations.
    Nodes,
    /// Last-seen times.
    Presence,
    /// Invocations.
    Invocations,
    /// Console tokens.
    Tokens,
    /// Audit log.
    Audit,
}

impl Space {
    const ALL: [Space; 10] = [
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
    ];

    /// Keyspace name.
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
        }
    }
}

/// How durable a commit must be before it returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Flushed to the OS: survives a process crash.
    Flush,
    /// `fdatasync`ed: survives a power loss too. For trust decisions.
    Sync,
}

/// The store. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: Database,
    spaces: Vec<Keyspace>,
    path: PathBuf,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("path", &self.inner.path)
            .finish_non_exhaustive()
    }
}

impl Store {
    /// Opens (or creates) the store in `dir`.
    pub fn open(dir: &Path) -> Result<Store, StoreError> {
        std::fs::create_dir_all(dir).map_err(|source| StoreError::Dir {
            path: dir.to_path_buf(),
            source,
        })?;
        let db = Database::builder(dir).open().map_err(|e| match e {
            fjall::Error::Locked => StoreError::Locked(dir.to_path_buf()),
            fjall::Error::Io(source) => StoreError::Dir {
                path: dir.to_path_buf(),
                source,
            },
            other => StoreError::Open {
                path: dir.to_path_buf(),
                source: other,
            },
        })?;
        let mut spaces = Vec::with_capacity(Space::ALL.len());
        for space in Space::ALL {
            spaces.push(db.keyspace(space.name(), KeyspaceCreateOptions::default)?);
        }
        let store = Store {
            inner: Arc::new(Inner {
                db,
                spaces,
                path: dir.to_path_buf(),
            }),
        };
        store.check_schema()?;
        Ok(store)
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        let meta = self.ks(Space::Meta);
        match meta.get(b"schema_version")? {
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
                meta.insert(b"schema_version".as_slice(), vec![SCHEMA_VERSION])?;
                self.inner.db.persist(PersistMode::SyncAll)?;
            }
        }
        Ok(())
    }

    fn ks(&self, space: Space) -> &Keyspace {
        // `spaces` is built from `Space::ALL` in order, so the index always exists.
        &self.inner.spaces[space as usize]
    }

    /// Reads one record.
    pub fn get<T: DeserializeOwned>(
        &self,
        space: Space,
        key: &[u8],
    ) -> Result<Option<T>, StoreError> {
        match self.ks(space).get(key)? {
            Some(v) => Ok(Some(decode(space, &v)?)),
            None => Ok(None),
        }
    }

    /// Writes one record.
    pub fn put<T: Serialize>(
        &self,
        space: Space,
        key: &[u8],
        value: &T,
        durability: Durability,
    ) -> Result<(), StoreError> {
        let mut b = self.batch();
        b.put(space, key, value)?;
        b.commit(durability)
    }

    /// Every record of a keyspace, in key order.
    pub fn scan<T: DeserializeOwned>(&self, space: Space) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.scan_prefix(space, b"")
    }

    /// Records whose key starts with `prefix`, in key order.
    pub fn scan_prefix<T: DeserializeOwned>(
        &self,
        space: Space,
        prefix: &[u8],
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).prefix(prefix) {
            let (k, v) = guard.into_inner()?;
            out.push((k.to_vec(), decode(space, &v)?));
        }
        Ok(out)
    }

    /// The last `n` records of a keyspace in reverse key order (newest first for time keys).
    pub fn scan_rev<T: DeserializeOwned>(
        &self,
        space: Space,
        n: usize,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        self.scan_rev_matching(space, n, |_: &T| true)
    }

    /// The last `n` records of a keyspace that `keep` accepts, in reverse key order; reads
    /// only as far back as it needs to.
    pub fn scan_rev_matching<T: DeserializeOwned>(
        &self,
        space: Space,
        n: usize,
        keep: impl Fn(&T) -> bool,
    ) -> Result<Vec<(Vec<u8>, T)>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).iter().rev() {
            if out.len() >= n {
                break;
            }
            let (k, v) = guard.into_inner()?;
            let value: T = decode(space, &v)?;
            if keep(&value) {
                out.push((k.to_vec(), value));
            }
        }
        Ok(out)
    }

    /// Number of records (exact; walks the keyspace).
    pub fn count(&self, space: Space) -> Result<usize, StoreError> {
        Ok(self.ks(space).len()?)
    }

    /// A batch of writes committed atomically.
    pub fn batch(&self) -> Batch<'_> {
        Batch {
            store: self,
            inner: self.inner.db.batch(),
        }
    }

    /// Bytes on disk.
    pub fn disk_space(&self) -> u64 {
        self.inner.db.disk_space().unwrap_or(0)
    }

    /// `fdatasync`s the journal: every write committed before is then safe from power loss.
    pub fn sync(&self) -> Result<(), StoreError> {
        self.inner.db.persist(PersistMode::SyncData)?;
        Ok(())
    }

    /// Flushes and fsyncs everything (at shutdown).
    pub fn persist(&self) -> Result<(), StoreError> {
        self.inner.db.persist(PersistMode::SyncAll)?;
        Ok(())
    }

    /// The data directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs blocking store work off the async runtime.
    pub async fn run<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Store) -> Result<T, StoreError> + Send + 'static,
    {
        let store = self.clone();
        tokio::task::spawn_blocking(move || f(&store))
            .await
            .map_err(|e| StoreError::Task(e.to_string()))?
    }
}

/// Writes that commit together.
pub struct Batch<'a> {
    store: &'a Store,
    inner: fjall::OwnedWriteBatch,
}

impl Batch<'_> {
    /// Adds a record write.
    pub fn put<T: Serialize>(
        &mut self,
        space: Space,
        key: &[u8],
        value: &T,
    ) -> Result<(), StoreError> {
        let bytes = encode(space, value)?;
        self.inner.insert(self.store.ks(space), key.to_vec(), bytes);
        Ok(())
    }

    /// Adds an already encoded value (see [`Store::encode`]).
    pub fn put_raw(&mut self, space: Space, key: &[u8], value: Vec<u8>) {
        self.inner.insert(self.store.ks(space), key.to_vec(), value);
    }

    /// Adds a removal.
    pub fn remove(&mut self, space: Space, key: &[u8]) {
        self.inner.remove(self.store.ks(space), key.to_vec());
    }

    /// Commits atomically with the given durability.
    pub fn commit(self, durability: Durability) -> Result<(), StoreError> {
        let mode = match durability {
            Durability::Flush => PersistMode::Buffer,
            Durability::Sync => PersistMode::SyncData,
        };
        self.inner.durability(Some(mode)).commit()?;
        Ok(())
    }
}

impl Store {
    /// Encodes a record as stored (schema byte + postcard).
    pub fn encode<T: Serialize>(space: Space, value: &T) -> Result<Vec<u8>, StoreError> {
        encode(space, value)
    }

    /// Starts the writer thread: writes queued from async code are applied in order and
    /// committed in batches. Callers that must know a write is durable await
    /// [`Writer::barrier`].
    pub fn writer(&self) -> Writer {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteOp>(WRITER_QUEUE);
        let store = self.clone();
        let commit = move |ops: Vec<WriteOp>| {
            let mut batch = store.batch();
            let mut barriers = Vec::new();
            for o in ops {
                match o {
                    WriteOp::Put { space, key, value } => batch.put_raw(space, &key, value),
                    WriteOp::Remove { space, key } => batch.remove(space, &key),
                    WriteOp::Barrier(ack) => barriers.push(ack),
                }
            }
            let result = batch.commit(Durability::Flush).map_err(|e| e.to_string());
            if let Err(e) = &result {
                tracing::error!(error = %e, "store write failed");
            }
            for ack in barriers {
                let _ = ack.send(result.clone());
            }
        };
        match tokio::runtime::Handle::try_current() {
            // One task drains the queue in order; each batch commits on the blocking pool
            // (which also keeps a paused test clock from jumping while the disk works).
            Ok(handle) => {
                handle.spawn(async move {
                    while let Some(first) = rx.recv().await {
                        let mut ops = vec![first];
                        while ops.len() < WRITER_BATCH {
                            match rx.try_recv() {
                                Ok(op) => ops.push(op),
                                Err(_) => break,
                            }
                        }
                        let commit = commit.clone();
                        if tokio::task::spawn_blocking(move || commit(ops))
                            .await
                            .is_err()
                        {
                            tracing::error!("store writer task failed");
                        }
                    }
                });
            }
            Err(_) => {
                let spawned = std::thread::Builder::new()
                    .name("anchorage-store".into())
                    .spawn(move || {
                        while let Some(first) = rx.blocking_recv() {
                            let mut ops = vec![first];
                            while ops.len() < WRITER_BATCH {
                                match rx.try_recv() {
                                    Ok(op) => ops.push(op),
                                    Err(_) => break,
                                }
                            }
                            commit(ops);
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start the store writer thread");
                }
            }
        }
        Writer { tx }
    }
}

/// Writes queued before the writer blocks senders.
pub const WRITER_QUEUE: usize = 8192;
/// Most writes committed in one batch.
pub const WRITER_BATCH: usize = 1024;

enum WriteOp {
    Put {
        space: Space,
        key: Vec<u8>,
        value: Vec<u8>,
    },
    Remove {
        space: Space,
        key: Vec<u8>,
    },
    Barrier(tokio::sync::oneshot::Sender<Result<(), String>>),
}

/// A handle on the store's writer thread. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: tokio::sync::mpsc::Sender<WriteOp>,
}

impl std::fmt::Debug for WriteOp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WriteOp")
    }
}

impl Writer {
    /// Queues a record write (waits only if the queue is full).
    pub async fn put<T: Serialize>(&self, space: Space, key: &[u8], value: &T) {
        match encode(space, value) {
            Ok(value) => {
                let _ = self
                    .tx
                    .send(WriteOp::Put {
                        space,
                        key: key.to_vec(),
                        value,
                    })
                    .await;
            }
            Err(e) => tracing::error!(error = %e, "cannot encode a record"),
        }
    }

    /// Queues a write without waiting; `false` if the queue is full (the write is dropped).
    pub fn try_put<T: Serialize>(&self, space: Space, key: &[u8], value: &T) -> bool {
        match encode(space, value) {
            Ok(value) => self
                .tx
                .try_send(WriteOp::Put {
                    space,
                    key: key.to_vec(),
                    value,
                })
                .is_ok(),
            Err(_) => false,
        }
    }

    /// Queues a removal.
    pub async fn remove(&self, space: Space, key: &[u8]) {
        let _ = self
            .tx
            .send(WriteOp::Remove {
                space,
                key: key.to_vec(),
            })
            .await;
    }

    /// Resolves once every write queued before it is committed (flushed to the OS).
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(WriteOp::Barrier(ack))
            .await
            .map_err(|_| StoreError::Task("store writer stopped".into()))?;
        done.await
            .map_err(|_| StoreError::Task("store writer stopped".into()))?
            .map_err(StoreError::Task)
    }
}

fn encode<T: Serialize>(space: Space, value: &T) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![SCHEMA_VERSION]).map_err(|e| StoreError::Corrupt {
        space: space.name(),
        detail: format!("cannot encode: {e}"),
    })
}

fn decode<T: DeserializeOwned>(space: Space, bytes: &[u8]) -> Result<T, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt {
        space: space.name(),
        detail,
    };
    let (&version, body) = bytes
        .split_first()
        .ok_or_else(|| corrupt("empty value".into()))?;
    if version != SCHEMA_VERSION {
        return Err(corrupt(format!(
            "schema version {version}, this anchord reads {SCHEMA_VERSION}"
        )));
    }
    let (value, rest) = postcard::take_from_bytes(body).map_err(|e| corrupt(e.to_string()))?;
    if !rest.is_empty() {
        return Err(corrupt(format!("{} trailing bytes", rest.len())));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::AuditRecord;

    fn audit(n: u64) -> AuditRecord {
        AuditRecord {
            at_ms: n,
            actor: "tester".into(),
            action: "test".into(),
            target: format!("t{n}"),
            detail: String::new(),
        }
    }

    #[test]
    fn write_drop_reopen_read() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .put(Space::Audit, b"k1", &audit(1), Durability::Sync)
                .unwrap();
            let mut b = store.batch();
            b.put(Space::Audit, b"k2", &audit(2)).unwrap();
            b.put(Space::Audit, b"k3", &audit(3)).unwrap();
            b.commit(Durability::Flush).unwrap();
        }
        let store = Store::open(dir.path()).unwrap();
        let all: Vec<(Vec<u8>, AuditRecord)> = store.scan(Space::Audit).unwrap();
        assert_eq!(all.len(), 3);
        assert_eq!(all[2].1, audit(3));
        let newest: Vec<(Vec<u8>, AuditRecord)> = store.scan_rev(Space::Audit, 1).unwrap();
        assert_eq!(newest[0].0, b"k3");
        assert_eq!(
            store.get::<AuditRecord>(Space::Audit, b"k2").unwrap(),
            Some(audit(2))
        );
        assert_eq!(
            store.get::<AuditRecord>(Space::Audit, b"nope").unwrap(),
            None
        );
    }

    #[test]
    fn a_second_open_of_the_same_dir_is_refused_as_locked() {
        let dir = tempfile::tempdir().unwrap();
        let _first = Store::open(dir.path()).unwrap();
        match Store::open(dir.path()) {
            Err(StoreError::Locked(p)) => assert_eq!(p, dir.path()),
            other => panic!("expected Locked, got {other:?}"),
        }
    }

    #[test]
    fn newer_schema_is_refused_with_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = Store::open(dir.path()).unwrap();
            store
                .ks(Space::Meta)
                .insert(b"schema_version".as_slice(), vec![SCHEMA_VERSION + 1])
                .unwrap();
            store.persist().unwrap();
        }
        let err = Store::open(dir.path()).unwrap_err();
        assert!(
            matches!(err, StoreError::NewerSchema { found: 2, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("upgrade anchord"));
    }

    #[test]
    fn a_damaged_store_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        drop(Store::open(dir.path()).unwrap());
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
        match Store::open(dir.path()) {
            Err(
                e @ (StoreError::Open { .. } | StoreError::Corrupt { .. } | StoreError::Fjall(_)),
            ) => {
                let msg = e.to_string();
                assert!(!msg.is_empty());
            }
            Err(other) => panic!("unexpected error kind: {other}"),
            Ok(_) => panic!("a scrambled store opened"),
        }
    }

    #[test]
    fn corrupt_values_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let ks = store.ks(Space::Audit);
        ks.insert(b"a".as_slice(), vec![]).unwrap();
        ks.insert(b"b".as_slice(), vec![SCHEMA_VERSION, 0xff, 0xff])
            .unwrap();
        ks.insert(b"c".as_slice(), vec![9, 1, 2]).unwrap();
        for k in [b"a", b"b", b"c"] {
            let err = store.get::<AuditRecord>(Space::Audit, k).unwrap_err();
            assert!(
                matches!(err, StoreError::Corrupt { space: "audit", .. }),
                "{err}"
            );
        }
    }
}
