//! The anchor's state behind transaction-level interfaces.
//!
//! Two interfaces, one per kind of state:
//!
//! - [`TrustStore`]: codes, requests, devices, tokens, revocations, the mesh policy (every
//!   version, up to [`POLICY_HISTORY`]) and the audit log. Every
//!   change is a read-modify-write in [`TrustStore::transact`]: the closure reads what it
//!   needs and writes through a [`TrustTxn`]; the backend commits it atomically and durably
//!   (synced to disk) before `transact` returns, and two transactions never interleave (a
//!   code is consumed once, a request approved once, no write is lost). Every committed change
//!   is announced to watchers ([`TrustStore::watch`]) with the revision it was committed at, so
//!   in-memory mirrors (tokens, the revocation set) refresh from the store instead of being
//!   patched by hand, whichever anchor made the change.
//! - [`RuntimeStore`]: node registrations, last-seen times (written in batches), invocations
//!   and their pruning, each device's history (samples and presence changes). Writes go
//!   through the ordered [`Writer`], which batches them and
//!   commits them (on its own task when that cannot wait, else on the blocking pool); a [`Writer::barrier`] resolves once every write queued
//!   before it is on disk (flushed to the OS, which survives `kill -9`).
//!
//! [`FjallStore`] implements both on one fjall database. [`conformance`] is the suite any
//! backend must pass. Values are a schema-version byte followed by postcard; records are in
//! [`crate::records`]. All methods of both traits block: async callers go through
//! `spawn_blocking` (see [`blocking`]) or the [`Writer`].

use std::path::PathBuf;
use std::sync::Arc;

use anchorage_mesh::DeviceId;
use anchorage_wire::invoke::InvocationId;

use crate::records::*;

pub mod conformance;
#[cfg(feature = "etcd")]
mod etcd;
mod fjall;
pub mod kv;

#[cfg(feature = "etcd")]
pub use self::etcd::{EtcdKv, EtcdStore};
pub use self::fjall::{FjallKv, FjallStore};

/// Schema version of every value written by this build.
pub const SCHEMA_VERSION: u8 = 1;

/// Versions of the mesh policy the store keeps (older ones are dropped as new ones are set).
pub const POLICY_HISTORY: usize = 100;

/// Errors of the store. Backend-specific errors are carried as text, so no backend's types
/// leak into the anchor.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// Another process holds the database.
    #[error("the data directory {0} is locked by another anchord")]
    Locked(PathBuf),
    /// The data directory cannot be created or written.
    #[error("cannot use data directory {path}: {message}")]
    Dir {
        /// The directory.
        path: PathBuf,
        /// The operating system's error.
        message: String,
    },
    /// The store was written by a newer Anchorage.
    #[error(
        "the store in {path} has schema version {found}, newer than this anchord supports ({supported}); upgrade anchord"
    )]
    NewerSchema {
        /// The directory.
        path: PathBuf,
        /// Version found on disk.
        found: u8,
        /// Newest version this build reads.
        supported: u8,
    },
    /// The database could not be opened (damaged files, wrong format).
    #[error(
        "cannot open the store in {path}: {message}; restore the data directory from a backup or move it aside"
    )]
    Open {
        /// The directory.
        path: PathBuf,
        /// The backend's error.
        message: String,
    },
    /// A value could not be decoded.
    #[error("corrupt record in {space}: {detail}")]
    Corrupt {
        /// Record kind (keyspace name).
        space: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// The backend failed to read or write.
    #[error("store error: {0}")]
    Backend(String),
    /// A shared store cannot be reached now (no etcd member answered in time); worth trying
    /// again later, and nothing was changed by the failed request (or, for a write that timed
    /// out, it may have been).
    #[error("the store cannot be reached: {0}")]
    Unavailable(String),
    /// A blocking task panicked, or the writer stopped.
    #[error("store task failed: {0}")]
    Task(String),
}

/// A revocation's key: a whole device, or one certificate serial (a removed device's last
/// certificate, or one replaced by a new pairing).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Revoked {
    /// Every certificate of the device.
    Device(DeviceId),
    /// One certificate, by serial.
    Serial(Vec<u8>),
}

/// What labels belong to.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LabelOwner {
    /// A device.
    Device(DeviceId),
    /// A pairing code (by id): its labels go to the device it pairs.
    Code(String),
}

/// A change committed to the trust state, as watchers see it.
#[derive(Debug, Clone, PartialEq)]
pub enum TrustChange {
    /// A token was created or changed (revoked).
    Token(TokenRecord),
    /// A token's limits were written (with the token, when it is created).
    TokenLimits(String, TokenLimits),
    /// A revocation was added (`Some`) or lifted (`None`).
    Revocation(Revoked, Option<RevocationRecord>),
    /// A pairing request was created or changed state.
    Request(RequestRecord),
    /// A device was paired, changed, or removed (`None`).
    Device(DeviceId, Option<DeviceRecord>),
    /// The labels of a device or a pairing code were set (`None`: removed, or set empty). A
    /// removed device's labels go with it without a change of their own.
    Labels(LabelOwner, Option<Labels>),
    /// A new version of the mesh policy was set.
    Policy(PolicyRecord),
}

/// A committed change with the store revision it was committed at. Revisions increase with
/// every commit; a mirror ignores a change older than the one it last applied for a key.
#[derive(Debug, Clone, PartialEq)]
pub struct Revision<T> {
    /// The commit's revision.
    pub rev: u64,
    /// What changed.
    pub change: T,
    /// Committed by another anchor sharing the store (reported by its watch), not by this one.
    pub remote: bool,
}

/// A watcher of trust changes. It is called after each commit, before `transact` returns to
/// the caller that made it (so a revocation is live when the operator is told it is done). It
/// must be quick and must not call the store.
pub type TrustWatcher = Arc<dyn Fn(&Revision<TrustChange>) + Send + Sync>;

/// What a transaction body decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TxnOutcome {
    /// Commit the writes.
    Commit,
    /// Discard them.
    Abort,
}

/// Reads and writes inside one trust transaction. Reads see the transaction's own writes.
pub trait TrustTxn {
    /// A pairing code by id.
    fn code(&mut self, id: &str) -> Result<Option<CodeRecord>, StoreError>;
    /// Writes a code.
    fn put_code(&mut self, code: &CodeRecord) -> Result<(), StoreError>;
    /// A pairing request by id.
    fn request(&mut self, id: &str) -> Result<Option<RequestRecord>, StoreError>;
    /// Writes a request.
    fn put_request(&mut self, request: &RequestRecord) -> Result<(), StoreError>;
    /// A device by id.
    fn device(&mut self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    /// Writes a device.
    fn put_device(&mut self, device: &DeviceRecord) -> Result<(), StoreError>;
    /// The labels an operator set on a device or a pairing code.
    fn labels(&mut self, owner: &LabelOwner) -> Result<Option<Labels>, StoreError>;
    /// Writes the labels of a device or a pairing code (empty: none).
    fn put_labels(&mut self, owner: &LabelOwner, labels: &Labels) -> Result<(), StoreError>;
    /// Removes a device with its labels, node registration and last-seen record.
    fn remove_device(&mut self, id: &DeviceId) -> Result<(), StoreError>;
    /// A token by id.
    fn token(&mut self, id: &str) -> Result<Option<TokenRecord>, StoreError>;
    /// Writes a token.
    fn put_token(&mut self, token: &TokenRecord) -> Result<(), StoreError>;
    /// Writes a token's limits.
    fn put_token_limits(&mut self, id: &str, limits: &TokenLimits) -> Result<(), StoreError>;
    /// Adds a revocation.
    fn revoke(&mut self, key: &Revoked, record: &RevocationRecord) -> Result<(), StoreError>;
    /// Lifts a revocation.
    fn unrevoke(&mut self, key: &Revoked) -> Result<(), StoreError>;
    /// Appends an audit record (the store orders records by `at_ms`, then by commit).
    fn audit(&mut self, record: &AuditRecord) -> Result<(), StoreError>;
    /// The cluster's CA, sealed (a shared store only; fjall anchors keep theirs in files).
    fn cluster_ca(&mut self) -> Result<Option<crate::cluster::SealedCa>, StoreError>;
    /// Writes the cluster's CA.
    fn put_cluster_ca(&mut self, ca: &crate::cluster::SealedCa) -> Result<(), StoreError>;
    /// The mesh policy in force (`None`: never set, the empty default).
    fn policy(&mut self) -> Result<Option<PolicyRecord>, StoreError>;
    /// Puts `record` in force as the newest version (its version must be one more than the
    /// current one's), dropping versions older than the newest [`POLICY_HISTORY`].
    fn put_policy(&mut self, record: &PolicyRecord) -> Result<(), StoreError>;
}

/// The trust state: read-modify-write in transactions, reads, and a watch of changes.
pub trait TrustStore: Send + Sync + 'static {
    /// Runs `body` in a transaction and commits its writes atomically and synced to disk if it
    /// returns [`TxnOutcome::Commit`]. Transactions never interleave; a backend may run `body`
    /// more than once (optimistic retries), so it must have no effects beyond the transaction.
    /// Returns whether it committed. Use [`transact`] for a typed result.
    fn transact_dyn(
        &self,
        body: &mut dyn FnMut(&mut dyn TrustTxn) -> TxnOutcome,
    ) -> Result<bool, StoreError>;
    /// Registers a watcher of committed changes.
    fn watch(&self, watcher: TrustWatcher);
    /// Every pairing code.
    fn codes(&self) -> Result<Vec<CodeRecord>, StoreError>;
    /// One pairing code.
    fn code(&self, id: &str) -> Result<Option<CodeRecord>, StoreError>;
    /// Every pairing request.
    fn requests(&self) -> Result<Vec<RequestRecord>, StoreError>;
    /// One pairing request.
    fn request(&self, id: &str) -> Result<Option<RequestRecord>, StoreError>;
    /// Every device.
    fn devices(&self) -> Result<Vec<DeviceRecord>, StoreError>;
    /// One device.
    fn device(&self, id: &DeviceId) -> Result<Option<DeviceRecord>, StoreError>;
    /// The labels of one device or pairing code.
    fn labels_of(&self, owner: &LabelOwner) -> Result<Option<Labels>, StoreError>;
    /// The labels of every device and pairing code that has some.
    fn all_labels(&self) -> Result<Vec<(LabelOwner, Labels)>, StoreError>;
    /// Every token.
    fn tokens(&self) -> Result<Vec<TokenRecord>, StoreError>;
    /// The limits of every token that has some, by token id.
    fn token_limits(&self) -> Result<Vec<(String, TokenLimits)>, StoreError>;
    /// Every revocation.
    fn revocations(&self) -> Result<Vec<(Revoked, RevocationRecord)>, StoreError>;
    /// The mesh policy in force (`None`: never set).
    fn policy(&self) -> Result<Option<PolicyRecord>, StoreError>;
    /// The newest `limit` versions of the mesh policy, newest first.
    fn policy_history(&self, limit: usize) -> Result<Vec<PolicyRecord>, StoreError>;
    /// The newest `limit` audit records that `keep` accepts, newest first; reads only as far
    /// back as it needs.
    fn audit_newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&AuditRecord) -> bool,
    ) -> Result<Vec<AuditRecord>, StoreError>;
}

/// Runs `body` in a trust transaction: commits if it returns `Ok`, aborts on `Err`.
pub fn transact<T, E>(
    store: &dyn TrustStore,
    mut body: impl FnMut(&mut dyn TrustTxn) -> Result<T, E>,
) -> Result<T, E>
where
    E: From<StoreError>,
{
    let mut result = None;
    store.transact_dyn(&mut |txn| {
        let r = body(txn);
        let outcome = if r.is_ok() {
            TxnOutcome::Commit
        } else {
            TxnOutcome::Abort
        };
        result = Some(r);
        outcome
    })?;
    result.unwrap_or_else(|| Err(StoreError::Task("the transaction body never ran".into()).into()))
}

/// What the runtime state holds at start-up.
#[derive(Debug, Default)]
pub struct RuntimeSnapshot {
    /// Every node registration.
    pub nodes: Vec<NodeRecord>,
    /// Last-seen of each node.
    pub presence: Vec<(DeviceId, PresenceRecord)>,
    /// Invocations not finished yet, oldest first.
    pub unfinished: Vec<InvocationRecord>,
    /// Batches not finished yet, oldest first.
    pub batches: Vec<BatchRecord>,
    /// When each token last authenticated a request.
    pub token_use: Vec<(String, u64)>,
    /// Who holds each node's session (a shared store only: the other anchors of the cluster).
    pub sessions: Vec<(DeviceId, SessionRecord)>,
    /// Every device's history entries, by device, oldest first.
    pub history: Vec<(DeviceId, HistoryEntry)>,
}

/// One write of runtime state.
#[derive(Debug, Clone)]
pub enum RuntimeWrite {
    /// A node's registration.
    Node(NodeRecord),
    /// A node's last-seen.
    Presence(DeviceId, PresenceRecord),
    /// An invocation's current record.
    Invocation(InvocationRecord),
    /// A batch (written at creation and once more when it ends).
    Batch(BatchRecord),
    /// A token was last used then (Unix ms).
    TokenUsed(String, u64),
    /// This anchor holds the node's session (`Some`, under its lease in a shared store) or no
    /// longer does (`None`: removed only if it is still this anchor's). A store only this
    /// anchor uses keeps no sessions.
    Session(DeviceId, Option<SessionRecord>),
    /// Adds an entry to a device's history (one of the same time and kind is replaced).
    History(DeviceId, HistoryEntry),
    /// Removes that entry (by its device, time and kind) from the device's history.
    HistoryRemove(DeviceId, HistoryEntry),
    /// Removes the device's whole history (it was removed).
    HistoryForget(DeviceId),
}

/// A change of runtime state committed by another anchor sharing the store.
#[derive(Debug, Clone)]
pub enum RuntimeChange {
    /// A node registered there.
    Node(NodeRecord),
    /// Its last-seen, from that anchor's batch.
    Presence(DeviceId, PresenceRecord),
    /// Who holds the node's session now (`None`: nobody: ended, or its holder's lease lapsed).
    Session(DeviceId, Option<SessionRecord>),
    /// An invocation was created or changed state there.
    Invocation(InvocationRecord),
}

/// A watcher of [`RuntimeChange`]s; called on the store's own thread, so it must be quick and
/// must not call the store.
pub type RuntimeWatcher = Box<dyn Fn(RuntimeChange) + Send + Sync>;

/// The state of this anchor's announcement after [`RuntimeStore::announce`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lease {
    /// Nobody else shares the store.
    Local,
    /// Held, renewed.
    Held,
    /// A new lease: the first, or one after the last had lapsed (etcd was away longer than
    /// its TTL), so what was under the old one (the sessions this anchor holds) is gone and
    /// must be written again.
    New,
}

/// Runtime state: registrations, last-seen, invocations.
pub trait RuntimeStore: Send + Sync + 'static {
    /// Everything needed at start-up.
    fn load(&self) -> Result<RuntimeSnapshot, StoreError>;
    /// Applies writes atomically, in order, flushed to the OS (not synced).
    fn apply(&self, writes: &[RuntimeWrite]) -> Result<(), StoreError>;
    /// Whether [`RuntimeStore::apply`] may have to wait now (on the network, or on a durable
    /// commit's sync): the [`Writer`] then commits on the blocking pool.
    fn apply_may_wait(&self) -> bool {
        true
    }
    /// One invocation.
    fn invocation(&self, id: &InvocationId) -> Result<Option<InvocationRecord>, StoreError>;
    /// The newest `limit` invocations that `keep` accepts, newest first.
    fn invocations_newest(
        &self,
        limit: usize,
        keep: &dyn Fn(&InvocationRecord) -> bool,
    ) -> Result<Vec<InvocationRecord>, StoreError>;
    /// One batch.
    fn batch(&self, id: &[u8; 16]) -> Result<Option<BatchRecord>, StoreError>;
    /// The newest `limit` batches, newest first.
    fn batches_newest(&self, limit: usize) -> Result<Vec<BatchRecord>, StoreError>;
    /// Deletes finished batches that ended before `finished_before_ms`. Returns how many went.
    fn prune_batches(&self, finished_before_ms: u64) -> Result<usize, StoreError>;
    /// Deletes finished invocations that ended before `finished_before_ms`, and the oldest
    /// finished ones beyond `keep_at_most`. Returns how many went.
    fn prune_invocations(
        &self,
        finished_before_ms: u64,
        keep_at_most: usize,
    ) -> Result<usize, StoreError>;
    /// Bytes on disk (0 when unknown).
    fn disk_space(&self) -> u64;
    /// Makes everything written so far survive a power loss (at shutdown).
    fn persist(&self) -> Result<(), StoreError>;
    /// Announces this anchor (`value`: its inventory instance, JSON) until `ttl` after the
    /// last call, renewing the lease its sessions are held under.
    fn announce(
        &self,
        id: &str,
        value: Vec<u8>,
        ttl: std::time::Duration,
    ) -> Result<Lease, StoreError>;
    /// Every live anchor's announcement.
    fn announced(&self) -> Result<Vec<Vec<u8>>, StoreError>;
    /// Whether other anchors share this store.
    fn shared(&self) -> bool;
    /// Since when (Unix ms) reads have answered from this anchor's last view of a shared
    /// store it cannot reach (writes fail meanwhile); `None` while the store answers.
    fn stale_since(&self) -> Option<u64>;
    /// The unfinished invocations of `device` (a shared store: whatever anchor created them).
    fn pending_for(&self, device: &DeviceId) -> Result<Vec<InvocationRecord>, StoreError>;
    /// Calls `watcher` with every runtime change other anchors commit from now on.
    fn follow(&self, watcher: RuntimeWatcher);
}

impl std::fmt::Debug for dyn RuntimeStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RuntimeStore")
    }
}

/// Both halves of a backend.
#[derive(Clone)]
pub struct Stores {
    /// Trust state.
    pub trust: Arc<dyn TrustStore>,
    /// Runtime state.
    pub runtime: Arc<dyn RuntimeStore>,
}

impl std::fmt::Debug for Stores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Stores")
    }
}

impl Stores {
    /// Both halves from one backend that implements both.
    pub fn from_backend<B: TrustStore + RuntimeStore>(backend: B) -> Stores {
        let backend = Arc::new(backend);
        Stores {
            trust: backend.clone(),
            runtime: backend,
        }
    }
}

/// Runs blocking store work off the async runtime.
pub async fn blocking<T, E, F>(f: F) -> Result<T, E>
where
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
    F: FnOnce() -> Result<T, E> + Send + 'static,
{
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| E::from(StoreError::Task(e.to_string())))?
}

/// Writes queued before [`Writer::put`] waits.
pub const WRITER_QUEUE: usize = 8192;
/// Most writes committed in one batch.
pub const WRITER_BATCH: usize = 1024;

// Writes are the common case; boxing them would cost an allocation each.
#[allow(clippy::large_enum_variant)]
enum WriteOp {
    Write(RuntimeWrite),
    Barrier(tokio::sync::oneshot::Sender<Result<(), StoreError>>),
}

/// Most writes in a batch the [`Writer`] commits on its own task (when the backend says it
/// will not wait); a larger batch goes to the blocking pool.
pub const WRITER_INLINE_BATCH: usize = 16;

/// Commits one batch of the [`Writer`]'s queue and answers its barriers.
fn commit(store: &dyn RuntimeStore, batch: Vec<WriteOp>) {
    let mut writes = Vec::with_capacity(batch.len());
    let mut barriers = Vec::new();
    for op in batch {
        match op {
            WriteOp::Write(w) => writes.push(w),
            WriteOp::Barrier(ack) => barriers.push(ack),
        }
    }
    let result = if writes.is_empty() {
        Ok(())
    } else {
        store.apply(&writes)
    };
    if let Err(e) = &result {
        tracing::error!(error = %e, "store write failed");
    }
    for ack in barriers {
        let _ = ack.send(result.clone());
    }
}

/// The ordered writer of runtime state, for any [`RuntimeStore`]. Cheap to clone.
///
/// One task drains the queue in order, so a later write of a record always lands after an
/// earlier one. It commits a small batch itself when the backend will not wait (fjall, while
/// no durable commit is syncing its journal: a write syscall), and any other batch on the
/// blocking pool (etcd; a large batch; fjall during a sync, whose journal lock the write
/// would wait for), which keeps the async workers from blocking on the disk or the network.
#[derive(Clone, Debug)]
pub struct Writer {
    tx: tokio::sync::mpsc::Sender<WriteOp>,
}

impl Writer {
    /// Starts the writer on the current tokio runtime (an error outside one). It stops when
    /// every handle is dropped.
    pub fn start(store: Arc<dyn RuntimeStore>) -> Result<Writer, StoreError> {
        let runtime = tokio::runtime::Handle::try_current().map_err(|_| {
            StoreError::Task("the store writer needs a tokio runtime to run on".into())
        })?;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<WriteOp>(WRITER_QUEUE);
        runtime.spawn(async move {
            let mut ops = Vec::with_capacity(WRITER_BATCH);
            while rx.recv_many(&mut ops, WRITER_BATCH).await > 0 {
                let batch = std::mem::take(&mut ops);
                // A small batch the backend takes without waiting is committed here: the
                // hop to the blocking pool and back would cost more than the write.
                if batch.len() <= WRITER_INLINE_BATCH && !store.apply_may_wait() {
                    commit(&*store, batch);
                    continue;
                }
                let store = store.clone();
                let done = tokio::task::spawn_blocking(move || commit(&*store, batch)).await;
                if done.is_err() {
                    tracing::error!("store writer task failed");
                }
            }
        });
        Ok(Writer { tx })
    }

    /// Queues a write (waits only while the queue is full).
    pub async fn put(&self, write: RuntimeWrite) {
        let _ = self.tx.send(WriteOp::Write(write)).await;
    }

    /// Queues a write without waiting; `false` if the queue is full (the write is dropped).
    pub fn try_put(&self, write: RuntimeWrite) -> bool {
        self.tx.try_send(WriteOp::Write(write)).is_ok()
    }

    /// Resolves once every write queued before it is committed (flushed to the OS).
    pub async fn barrier(&self) -> Result<(), StoreError> {
        let (ack, done) = tokio::sync::oneshot::channel();
        let stopped = || StoreError::Task("store writer stopped".into());
        self.tx
            .send(WriteOp::Barrier(ack))
            .await
            .map_err(|_| stopped())?;
        done.await.map_err(|_| stopped())?
    }
}

/// Encodes a record as stored: schema byte, then postcard.
pub(crate) fn encode<T: serde::Serialize>(
    space: &'static str,
    value: &T,
) -> Result<Vec<u8>, StoreError> {
    postcard::to_extend(value, vec![SCHEMA_VERSION]).map_err(|e| StoreError::Corrupt {
        space,
        detail: format!("cannot encode: {e}"),
    })
}

/// Decodes a stored record, refusing other schema versions and trailing bytes.
pub(crate) fn decode<T: serde::de::DeserializeOwned>(
    space: &'static str,
    bytes: &[u8],
) -> Result<T, StoreError> {
    let corrupt = |detail: String| StoreError::Corrupt { space, detail };
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
