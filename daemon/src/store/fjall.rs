//! [`FjallStore`]: both store interfaces on one embedded fjall database.
//!
//! One keyspace per [`Space`]. Trust transactions are fjall's single-writer transactions (so
//! they never interleave); each commits flushed to the OS while it holds the writer, and the
//! `fdatasync` that makes it survive a power loss runs after the writer is released, so
//! concurrent transactions share disk syncs instead of queueing behind each other's (a group
//! commit). `transact` returns only after that sync. Runtime writes are plain atomic batches.
//! The records on top are [`KvStore`]'s.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use ::fjall::{
    KeyspaceCreateOptions, PersistMode, Readable, SingleWriterTxDatabase, SingleWriterTxKeyspace,
    SingleWriterWriteTx,
};

use super::StoreError;
use super::kv::{Kv, KvPair, KvStore, KvTxn, KvWrite, Space};
use super::{Lease, TxnOutcome};

fn backend(e: ::fjall::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// Both store interfaces on fjall.
pub type FjallStore = KvStore<FjallKv>;

/// The fjall database under [`FjallStore`].
pub struct FjallKv {
    db: SingleWriterTxDatabase,
    spaces: Vec<SingleWriterTxKeyspace>,
    path: PathBuf,
    /// Commit revision of trust transactions (in memory: mirrors are rebuilt at start-up).
    revision: AtomicU64,
    /// This process's announcement: nobody else opens the database, so memory is enough.
    announced: std::sync::Mutex<Option<Vec<u8>>>,
    /// Syncs of the journal in progress (they hold its lock, which a write waits for).
    syncing: AtomicUsize,
}

/// Counts a sync of the journal while it lasts.
struct Syncing<'a>(&'a AtomicUsize);

impl<'a> Syncing<'a> {
    fn start(count: &'a AtomicUsize) -> Syncing<'a> {
        count.fetch_add(1, Ordering::AcqRel);
        Syncing(count)
    }
}

impl Drop for Syncing<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for FjallKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FjallStore")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl KvStore<FjallKv> {
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
        let kv = FjallKv {
            db,
            spaces,
            path: dir.to_path_buf(),
            revision: AtomicU64::new(0),
            announced: std::sync::Mutex::new(None),
            syncing: AtomicUsize::new(0),
        };
        KvStore::new(kv, dir)
    }

    /// The directory of the database.
    pub fn path(&self) -> &Path {
        &self.kv.path
    }
}

impl FjallKv {
    fn ks(&self, space: Space) -> &SingleWriterTxKeyspace {
        // `spaces` is built from `Space::ALL` in order, so every index exists.
        &self.spaces[space as usize]
    }

    /// Writes raw bytes under a key, bypassing the record types (tests of corrupt data).
    #[cfg(test)]
    fn put_raw(&self, space: Space, key: &[u8], value: Vec<u8>) {
        self.ks(space)
            .insert(key.to_vec(), value)
            .expect("raw write in a test");
    }
}

struct FjallTxn<'a> {
    kv: &'a FjallKv,
    tx: SingleWriterWriteTx<'a>,
}

impl KvTxn for FjallTxn<'_> {
    fn get(&mut self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tx
            .get(self.kv.ks(space), key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn put(&mut self, space: Space, key: &[u8], value: Vec<u8>) {
        self.tx.insert(self.kv.ks(space), key.to_vec(), value);
    }

    fn remove(&mut self, space: Space, key: &[u8]) {
        self.tx.remove(self.kv.ks(space), key.to_vec());
    }
}

impl Kv for FjallKv {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .ks(space)
            .get(key)
            .map_err(backend)?
            .map(|v| v.to_vec()))
    }

    fn scan(&self, space: Space) -> Result<Vec<KvPair>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).inner().iter() {
            let (k, v) = guard.into_inner().map_err(backend)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<KvPair>, StoreError> {
        let mut out = Vec::new();
        for guard in self.ks(space).inner().prefix(prefix) {
            let (k, v) = guard.into_inner().map_err(backend)?;
            out.push((k.to_vec(), v.to_vec()));
        }
        Ok(out)
    }

    fn newest(
        &self,
        space: Space,
        each: &mut dyn FnMut(&[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        for guard in self.ks(space).inner().iter().rev() {
            let (_, v) = guard.into_inner().map_err(backend)?;
            if !each(&v)? {
                break;
            }
        }
        Ok(())
    }

    fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        if writes.is_empty() {
            return Ok(());
        }
        let mut batch = self.db.inner().batch();
        for (space, key, value) in writes {
            match value {
                Some(v) => batch.insert(self.ks(space).inner(), key, v),
                None => batch.remove(self.ks(space).inner(), key),
            }
        }
        batch
            .durability(Some(PersistMode::Buffer))
            .commit()
            .map_err(backend)
    }

    fn transact(
        &self,
        body: &mut dyn FnMut(&mut dyn KvTxn) -> TxnOutcome,
    ) -> Result<Option<u64>, StoreError> {
        let rev = {
            let mut txn = FjallTxn {
                kv: self,
                tx: self.db.write_tx().durability(Some(PersistMode::Buffer)),
            };
            if body(&mut txn) == TxnOutcome::Abort {
                txn.tx.rollback();
                return Ok(None);
            }
            // Taken while the writer is held, so revisions follow commit order.
            let rev = self.revision.fetch_add(1, Ordering::Relaxed) + 1;
            txn.tx.commit().map_err(backend)?;
            rev
        };
        // The group commit: synced after the writer is released.
        let _syncing = Syncing::start(&self.syncing);
        self.db.persist(PersistMode::SyncData).map_err(backend)?;
        Ok(Some(rev))
    }

    fn disk_space(&self) -> u64 {
        self.db.disk_space().unwrap_or(0)
    }

    fn persist(&self) -> Result<(), StoreError> {
        let _syncing = Syncing::start(&self.syncing);
        self.db.persist(PersistMode::SyncAll).map_err(backend)
    }

    fn apply_may_wait(&self) -> bool {
        self.syncing.load(Ordering::Acquire) > 0
    }

    fn announce(
        &self,
        _key: &[u8],
        value: Vec<u8>,
        _ttl: std::time::Duration,
    ) -> Result<Lease, StoreError> {
        *self.announced.lock().unwrap_or_else(|e| e.into_inner()) = Some(value);
        Ok(Lease::Local)
    }

    fn announced(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        Ok(self
            .announced
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::conformance;
    use crate::store::{RuntimeStore, SCHEMA_VERSION, Stores, TrustStore};

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
            store
                .kv
                .put_raw(Space::Meta, b"schema_version", vec![SCHEMA_VERSION + 1]);
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
        store.kv.put_raw(Space::Requests, b"a", vec![]);
        store
            .kv
            .put_raw(Space::Requests, b"b", vec![SCHEMA_VERSION, 0xff, 0xff]);
        store.kv.put_raw(Space::Requests, b"c", vec![9, 1, 2]);
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
