//! [`EtcdStore`]: both store interfaces on an etcd v3 cluster (feature `etcd`), so several
//! anchors can share one mesh.
//!
//! Every record lives under the prefix as `<prefix>/<space>/<key>` (keys as in
//! [`super::kv`], binary), values exactly as fjall stores them. What the backend adds:
//!
//! - **Trust transactions** are optimistic: the body runs against reads recorded with their
//!   `mod_revision`, and the writes commit in one etcd transaction only if none of those keys
//!   changed (an absent key must still be absent). On a conflict the body runs again, up to
//!   [`MAX_ATTEMPTS`] times. Two anchors can therefore never both consume one code or approve
//!   one request: one of them re-reads and finds it used. Within one anchor they run one at a
//!   time, so only other anchors can cause a retry.
//! - **Runtime batches** are applied in order in transactions of at most [`MAX_TXN_OPS`]
//!   writes (etcd's default `--max-txn-ops` is 128), each atomic.
//! - **Sessions** (`<prefix>/sessions/<device>`) are written under this anchor's lease
//!   ([`SESSION_TTL`] after its last renewal, renewed by each announcement), so an anchor that
//!   dies lets go of every node it held within the TTL; a session is removed only while it is
//!   still under this anchor's lease (a compare on the key's lease), so a late removal never
//!   drops the claim of the anchor the node moved to.
//! - **Changes made by other anchors** reach the watchers through one etcd watch on the
//!   prefix: trust changes (tokens, revocations, requests, devices, the mesh policy), so a
//!   revocation, a policy or a token made anywhere is live everywhere, and runtime changes
//!   (registrations, last-seen,
//!   sessions, invocations), so every anchor shows every node and dispatches what others
//!   queued for the nodes it holds. The anchor's own commits reach them at once, before
//!   `transact` returns, and the watch leaves those revisions out ([`Own`]).
//!
//! The store traits block; every etcd call runs on the store's own small runtime, so callers
//! on the blocking pool (or anywhere) can wait for it.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, PutOptions, SortOrder,
    SortTarget, Txn, TxnOp, WatchOptions,
};
use tracing::{debug, warn};

use super::kv::{Kv, KvChange, KvPair, KvStore, KvTxn, KvWrite, Space};
use super::{Lease, StoreError, TxnOutcome};

/// Both store interfaces on etcd.
pub type EtcdStore = KvStore<EtcdKv>;

/// Attempts of a trust transaction that keeps meeting concurrent writers.
pub const MAX_ATTEMPTS: usize = 32;
/// Writes per etcd transaction of a runtime batch.
pub const MAX_TXN_OPS: usize = 64;
/// Bytes of values per etcd transaction of a runtime batch (etcd refuses requests over
/// 1.5 MiB by default).
pub const MAX_TXN_BYTES: usize = 1 << 20;
/// Where live anchors announce themselves, under the prefix (not a record space: leased keys,
/// never watched, never scanned with the records).
const INSTANCES: &[u8] = b"instances/";
/// Keys per page of a scan.
const PAGE: i64 = 512;
/// The longest an etcd request may take before the store reports etcd unreachable.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// How long this anchor's sessions outlive its last lease renewal.
pub const SESSION_TTL: Duration = Duration::from_secs(10);
/// Tries of a request that can be repeated safely.
pub const IDEMPOTENT_ATTEMPTS: usize = 3;

/// The etcd cluster under [`EtcdStore`].
pub struct EtcdKv {
    client: Client,
    /// `<prefix>/`, bytes.
    root: Vec<u8>,
    endpoints: Vec<String>,
    /// Held by a trust transaction of this process from its first read to its commit: the
    /// anchor's own transactions never conflict with each other (as on fjall, whose writer
    /// is single); only other anchors' can make one run again.
    serial: std::sync::Mutex<()>,
    /// The commits of this process, so the watch does not report them a second time.
    own: Arc<Own>,
    /// The lease this process's announcement and sessions are held under (granted at the
    /// first announcement or session, renewed by each announcement, granted again if it
    /// lapsed).
    lease: Mutex<Option<i64>>,
    /// The last full scan of each space readers list (trust records, registrations,
    /// last-seen): what reads answer with while etcd cannot be reached.
    last_view: Mutex<HashMap<Space, Arc<Vec<KvPair>>>>,
    /// Since when (Unix ms) reads have answered from `last_view`; 0 while etcd answers.
    stale_since: Arc<std::sync::atomic::AtomicU64>,
    /// Runs the client's futures; shut down without blocking when the store goes.
    runtime: Option<tokio::runtime::Runtime>,
}

impl std::fmt::Debug for EtcdKv {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &String::from_utf8_lossy(&self.root))
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdKv {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// An etcd error: [`StoreError::Unavailable`] when no member could answer (transport, leader
/// lost, deadline), else a backend error.
fn backend(e: etcd_client::Error) -> StoreError {
    use etcd_client::Error as E;
    let unreachable = match &e {
        E::TransportError(_) | E::IoError(_) => true,
        // gRPC codes 1 cancelled, 4 deadline exceeded, 14 unavailable.
        E::GRpcStatus(status) => matches!(status.code() as i32, 1 | 4 | 14),
        _ => false,
    };
    if unreachable {
        StoreError::Unavailable(format!("etcd: {e}"))
    } else {
        StoreError::Backend(format!("etcd: {e}"))
    }
}

impl KvStore<EtcdKv> {
    /// Connects to the etcd cluster at `endpoints` (`http://host:port`) and uses the keys
    /// under `prefix` (e.g. `/anchorage`). Fails if no endpoint answers within
    /// [`REQUEST_TIMEOUT`].
    pub fn connect(endpoints: &[String], prefix: &str) -> Result<EtcdStore, StoreError> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("anchorage-etcd")
            .enable_all()
            .build()
            .map_err(|e| StoreError::Task(format!("cannot start the etcd client: {e}")))?;
        let options = ConnectOptions::new()
            .with_connect_timeout(REQUEST_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // A member that dies is noticed within about two seconds, and its requests and
            // watch move to the others.
            .with_keep_alive(Duration::from_secs(1), Duration::from_secs(1))
            .with_keep_alive_while_idle(true);
        let eps = endpoints.to_vec();
        let client = run_on(&runtime, async move {
            Client::connect(eps, Some(options)).await
        })
        .map_err(|e| match e {
            StoreError::Backend(m) => {
                StoreError::Backend(format!("cannot reach etcd at {}: {m}", endpoints.join(",")))
            }
            other => other,
        })?;
        let mut root = prefix.trim_end_matches('/').as_bytes().to_vec();
        root.push(b'/');
        let kv = EtcdKv {
            client,
            root,
            endpoints: endpoints.to_vec(),
            serial: std::sync::Mutex::new(()),
            own: Arc::default(),
            lease: Mutex::new(None),
            last_view: Mutex::new(HashMap::new()),
            stale_since: Arc::default(),
            runtime: Some(runtime),
        };
        // Reachable at all? (`connect` is lazy about some failures.)
        kv.get(Space::Meta, b"schema_version")?;
        let path = std::path::PathBuf::from(format!("etcd:{}{prefix}", endpoints.join(",")));
        KvStore::new(kv, &path)
    }
}

/// Runs `fut` on `rt` and waits for it from any thread, bounded by [`REQUEST_TIMEOUT`].
fn run_on<T, F>(rt: &tokio::runtime::Runtime, fut: F) -> Result<T, StoreError>
where
    T: Send + 'static,
    F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    rt.spawn(async move {
        let _ = tx.send(tokio::time::timeout(REQUEST_TIMEOUT, fut).await);
    });
    match rx.recv() {
        Ok(Ok(Ok(v))) => Ok(v),
        Ok(Ok(Err(e))) => Err(backend(e)),
        Ok(Err(_)) => Err(StoreError::Unavailable(format!(
            "etcd did not answer within {} s",
            REQUEST_TIMEOUT.as_secs()
        ))),
        Err(_) => Err(StoreError::Task("the etcd client stopped".into())),
    }
}

impl EtcdKv {
    fn run<T, F>(&self, fut: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let result = match &self.runtime {
            Some(rt) => run_on(rt, fut),
            None => Err(StoreError::Task("the etcd client stopped".into())),
        };
        if result.is_ok() {
            self.stale_since.store(0, Ordering::Relaxed);
        }
        result
    }

    /// Whether reads of `space` fall back to the last view while etcd is unreachable: the
    /// record kinds the console lists, not the unbounded histories (invocations, audit,
    /// batches), which are read newest-first and page by page.
    fn viewed(space: Space) -> bool {
        !matches!(
            space,
            Space::Invocations | Space::Audit | Space::Batches | Space::Pending | Space::Sessions
        )
    }

    fn is_stale(&self) -> bool {
        self.stale_since.load(Ordering::Relaxed) != 0
    }

    /// The last view of `space`, marked stale from now, if there is one.
    fn last_view_of(&self, space: Space) -> Option<Arc<Vec<KvPair>>> {
        let view = self
            .last_view
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&space)
            .cloned()?;
        mark_stale(&self.stale_since);
        Some(view)
    }

    /// Runs a request that may safely be sent twice (a read, or writes without conditions)
    /// up to [`IDEMPOTENT_ATTEMPTS`] times: a member that just died fails the first try, and
    /// the client's balancer sends the next to a live one.
    fn run_idempotent<T, F, Fut>(&self, make: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>> + Send + 'static,
    {
        let mut last = None;
        for attempt in 0..IDEMPOTENT_ATTEMPTS {
            match self.run(make()) {
                Ok(v) => return Ok(v),
                Err(e) => {
                    debug!(attempt, error = %e, "etcd request failed; trying again");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Backend("etcd: no attempt made".into())))
    }

    fn grant(&self, ttl: Duration) -> Result<i64, StoreError> {
        let seconds = i64::try_from(ttl.as_secs().max(1)).unwrap_or(i64::MAX);
        let lease = self.run_idempotent(|| {
            let mut client = self.client.lease_client();
            async move { client.grant(seconds, None).await }
        })?;
        Ok(lease.id())
    }

    /// Whether lease `id` is still alive after one keep-alive.
    fn keep_alive(&self, id: i64) -> Result<bool, StoreError> {
        let ttl = self.run_idempotent(|| {
            let mut client = self.client.lease_client();
            async move {
                let (_keeper, mut stream) = client.keep_alive(id).await?;
                Ok(stream.message().await?.map_or(0, |r| r.ttl()))
            }
        })?;
        Ok(ttl > 0)
    }

    /// The lease sessions are written under, granted if there is none yet.
    fn session_lease(&self) -> Result<i64, StoreError> {
        let mut lease = self.lease.lock().unwrap_or_else(|e| e.into_inner());
        match *lease {
            Some(id) => Ok(id),
            None => {
                let id = self.grant(SESSION_TTL)?;
                *lease = Some(id);
                Ok(id)
            }
        }
    }

    /// `<prefix>/<space>/`.
    fn space_prefix(&self, space: Space) -> Vec<u8> {
        let mut k = self.root.clone();
        k.extend_from_slice(space.name().as_bytes());
        k.push(b'/');
        k
    }

    fn full_key(&self, space: Space, key: &[u8]) -> Vec<u8> {
        let mut k = self.space_prefix(space);
        k.extend_from_slice(key);
        k
    }

    /// The value and `mod_revision` (0: absent) of a full key.
    fn get_versioned(&self, full: Vec<u8>) -> Result<(Option<Vec<u8>>, i64), StoreError> {
        let resp = self.run_idempotent(|| {
            let (mut client, full) = (self.client.kv_client(), full.clone());
            async move { client.get(full, None).await }
        })?;
        Ok(match resp.kvs().first() {
            Some(kv) => (Some(kv.value().to_vec()), kv.mod_revision()),
            None => (None, 0),
        })
    }

    /// One page of a space: keys in `[from, to)`, ascending or descending.
    fn page(
        &self,
        from: Vec<u8>,
        to: Vec<u8>,
        descending: bool,
    ) -> Result<Vec<KvPair>, StoreError> {
        let mut options = GetOptions::new().with_range(to).with_limit(PAGE);
        if descending {
            options = options.with_sort(SortTarget::Key, SortOrder::Descend);
        }
        let mut resp = self.run_idempotent(|| {
            let (mut client, from, options) =
                (self.client.kv_client(), from.clone(), options.clone());
            async move { client.get(from, Some(options)).await }
        })?;
        Ok(resp
            .take_kvs()
            .into_iter()
            .map(|kv| kv.into_key_value())
            .collect())
    }

    /// Commits `ops` in one transaction, `when` all `compares` hold; the revision if it did.
    /// Without compares the writes may be sent again after a failure (the same values land
    /// twice); with them, never (the first try may have committed, and a second would fail
    /// its compares for the wrong reason).
    fn commit(&self, compares: Vec<Compare>, ops: Vec<TxnOp>) -> Result<Option<u64>, StoreError> {
        let repeatable = compares.is_empty();
        self.commit_tries(
            compares,
            ops,
            if repeatable { IDEMPOTENT_ATTEMPTS } else { 1 },
        )
    }

    /// Commits a conditional transaction that may safely be sent again (its compares hold
    /// or fail the same way whether or not a first try committed).
    fn commit_repeatable(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
    ) -> Result<Option<u64>, StoreError> {
        self.commit_tries(compares, ops, IDEMPOTENT_ATTEMPTS)
    }

    fn commit_tries(
        &self,
        compares: Vec<Compare>,
        ops: Vec<TxnOp>,
        attempts: usize,
    ) -> Result<Option<u64>, StoreError> {
        let txn = Txn::new().when(compares).and_then(ops);
        let mut last = None;
        for attempt in 0..attempts {
            match self.commit_once(txn.clone()) {
                Ok(rev) => return Ok(rev),
                Err(e) => {
                    debug!(attempt, error = %e, "etcd transaction failed");
                    last = Some(e);
                }
            }
        }
        Err(last.unwrap_or_else(|| StoreError::Backend("etcd: no attempt made".into())))
    }

    fn commit_once(&self, txn: Txn) -> Result<Option<u64>, StoreError> {
        let mut client = self.client.kv_client();
        let own = self.own.clone();
        own.in_flight.fetch_add(1, Ordering::SeqCst);
        // Settled on the client's runtime as soon as the answer is in, whether or not the
        // caller is still waiting for it (after a timeout the request's future still runs).
        self.run(async move {
            let resp = client.txn(txn).await;
            let rev = resp
                .as_ref()
                .ok()
                .filter(|r| r.succeeded())
                .map(|r| u64::try_from(r.header().map_or(0, |h| h.revision())).unwrap_or(0));
            own.settle(rev);
            resp.map(|_| rev)
        })
    }
}

/// The end of the key range of everything starting with `prefix`.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The revisions this process committed (the latest [`OWN_REVISIONS`]) and how many of its
/// commits are on their way. A watched change at a revision not (yet) known is held while a
/// commit is on its way, since it may be that commit's.
#[derive(Debug, Default)]
struct Own {
    in_flight: AtomicUsize,
    revisions: Mutex<VecDeque<u64>>,
    settled: tokio::sync::Notify,
}

/// How many of its own commit revisions a store remembers.
const OWN_REVISIONS: usize = 4096;

impl Own {
    fn settle(&self, rev: Option<u64>) {
        if let Some(rev) = rev {
            let mut revs = self.revisions.lock().unwrap_or_else(|e| e.into_inner());
            if revs.len() >= OWN_REVISIONS {
                revs.pop_front();
            }
            revs.push_back(rev);
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        self.settled.notify_waiters();
    }

    fn is_own(&self, rev: u64) -> bool {
        self.revisions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&rev)
    }

    /// Whether a watched change at `rev` is someone else's: waits (at most a request
    /// timeout) while this process has commits on their way.
    async fn is_foreign(&self, rev: u64) -> bool {
        let deadline = tokio::time::Instant::now() + REQUEST_TIMEOUT;
        loop {
            let settled = self.settled.notified();
            tokio::pin!(settled);
            settled.as_mut().enable();
            if self.is_own(rev) {
                return false;
            }
            if self.in_flight.load(Ordering::SeqCst) == 0 {
                return true;
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return !self.is_own(rev);
            }
        }
    }
}

/// An optimistic transaction: reads remembered with their revision, writes buffered.
struct EtcdTxn<'a> {
    kv: &'a EtcdKv,
    reads: HashMap<Vec<u8>, i64>,
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
}

impl KvTxn for EtcdTxn<'_> {
    fn get(&mut self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let full = self.kv.full_key(space, key);
        if let Some((_, v)) = self.writes.iter().rev().find(|(k, _)| *k == full) {
            return Ok(v.clone());
        }
        let (value, rev) = self.kv.get_versioned(full.clone())?;
        // The first read of a key is the one the commit must still see.
        self.reads.entry(full).or_insert(rev);
        Ok(value)
    }

    fn put(&mut self, space: Space, key: &[u8], value: Vec<u8>) {
        self.writes
            .push((self.kv.full_key(space, key), Some(value)));
    }

    fn remove(&mut self, space: Space, key: &[u8]) {
        self.writes.push((self.kv.full_key(space, key), None));
    }
}

/// Writes for one etcd transaction, which refuses two operations on one key: a later write
/// of a key replaces the earlier one (they commit together, so only the last counts).
#[derive(Default)]
struct Chunk {
    writes: Vec<(Vec<u8>, Option<Vec<u8>>)>,
    index: HashMap<Vec<u8>, usize>,
    bytes: usize,
}

impl Chunk {
    fn write(&mut self, key: Vec<u8>, value: Option<Vec<u8>>) {
        self.bytes += value.as_ref().map_or(0, Vec::len);
        match self.index.get(&key) {
            Some(&i) => self.writes[i].1 = value,
            None => {
                self.index.insert(key.clone(), self.writes.len());
                self.writes.push((key, value));
            }
        }
    }

    fn len(&self) -> usize {
        self.writes.len()
    }

    fn is_empty(&self) -> bool {
        self.writes.is_empty()
    }

    fn ops(self) -> Vec<TxnOp> {
        self.writes.into_iter().map(|(k, v)| op(k, v)).collect()
    }
}

fn op(key: Vec<u8>, value: Option<Vec<u8>>) -> TxnOp {
    match value {
        Some(v) => TxnOp::put(key, v, None),
        None => TxnOp::delete(key, None),
    }
}

impl Kv for EtcdKv {
    fn get(&self, space: Space, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        let lookup = |view: &[KvPair]| {
            view.binary_search_by(|(k, _)| k.as_slice().cmp(key))
                .ok()
                .map(|i| view[i].1.clone())
        };
        // Already unreachable: answer at once (the announcement probes etcd every few seconds
        // and clears the mark when it answers).
        if self.is_stale()
            && Self::viewed(space)
            && let Some(view) = self.last_view_of(space)
        {
            return Ok(lookup(&view));
        }
        match self.get_versioned(self.full_key(space, key)) {
            Ok((value, _)) => Ok(value),
            Err(StoreError::Unavailable(e)) => match self.last_view_of(space) {
                Some(view) => Ok(lookup(&view)),
                None => Err(StoreError::Unavailable(e)),
            },
            Err(e) => Err(e),
        }
    }

    fn scan(&self, space: Space) -> Result<Vec<KvPair>, StoreError> {
        if !Self::viewed(space) {
            return self.scan_prefix(space, b"");
        }
        if self.is_stale()
            && let Some(view) = self.last_view_of(space)
        {
            return Ok(Arc::unwrap_or_clone(view));
        }
        match self.scan_prefix(space, b"") {
            Ok(all) => {
                let view = Arc::new(all);
                self.last_view
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(space, view.clone());
                Ok(Arc::unwrap_or_clone(view))
            }
            Err(StoreError::Unavailable(e)) => match self.last_view_of(space) {
                Some(view) => Ok(Arc::unwrap_or_clone(view)),
                None => Err(StoreError::Unavailable(e)),
            },
            Err(e) => Err(e),
        }
    }

    fn stale_since(&self) -> Option<u64> {
        match self.stale_since.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    fn newest(
        &self,
        space: Space,
        each: &mut dyn FnMut(&[u8]) -> Result<bool, StoreError>,
    ) -> Result<(), StoreError> {
        let prefix = self.space_prefix(space);
        let mut to = prefix_end(&prefix);
        loop {
            let page = self.page(prefix.clone(), to.clone(), true)?;
            let full = page.len() as i64 == PAGE;
            for (k, v) in &page {
                if !each(v)? {
                    return Ok(());
                }
                to = k.clone();
            }
            if !full {
                return Ok(());
            }
        }
    }

    fn apply(&self, writes: Vec<KvWrite>) -> Result<(), StoreError> {
        let mut chunk = Chunk::default();
        let lease = if writes.iter().any(|(space, _, _)| *space == Space::Sessions) {
            Some(self.session_lease()?)
        } else {
            None
        };
        for (space, key, value) in writes {
            if let (Space::Sessions, Some(lease)) = (space, lease) {
                // Before anything written after it, so order holds across the two kinds.
                if !chunk.is_empty() {
                    self.commit(Vec::new(), std::mem::take(&mut chunk).ops())?;
                }
                let full = self.full_key(space, &key);
                let op = match value {
                    Some(v) => TxnOp::put(full, v, Some(PutOptions::new().with_lease(lease))),
                    None => {
                        // Removed only if still ours; a failed compare is not a failure.
                        let when = vec![Compare::lease(full.clone(), CompareOp::Equal, lease)];
                        self.commit_repeatable(when, vec![TxnOp::delete(full, None)])?;
                        continue;
                    }
                };
                self.commit(Vec::new(), vec![op])?;
                continue;
            }
            let size = value.as_ref().map_or(0, Vec::len);
            if !chunk.is_empty()
                && (chunk.len() >= MAX_TXN_OPS || chunk.bytes + size > MAX_TXN_BYTES)
            {
                self.commit(Vec::new(), std::mem::take(&mut chunk).ops())?;
            }
            chunk.write(self.full_key(space, &key), value);
        }
        if !chunk.is_empty() {
            self.commit(Vec::new(), chunk.ops())?;
        }
        Ok(())
    }

    fn transact(
        &self,
        body: &mut dyn FnMut(&mut dyn KvTxn) -> TxnOutcome,
    ) -> Result<Option<u64>, StoreError> {
        let _serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
        for attempt in 0..MAX_ATTEMPTS {
            if attempt > 0 {
                // Another anchor wrote a key this one read: let it finish, then read again
                // (jittered, so two anchors do not retry in step).
                let jitter = u64::from(std::process::id() % 7) + attempt as u64 * 3;
                std::thread::sleep(Duration::from_millis(jitter.min(50)));
            }
            let mut txn = EtcdTxn {
                kv: self,
                reads: HashMap::new(),
                writes: Vec::new(),
            };
            if body(&mut txn) == TxnOutcome::Abort {
                return Ok(None);
            }
            let compares = txn
                .reads
                .into_iter()
                .map(|(key, rev)| {
                    if rev == 0 {
                        Compare::create_revision(key, CompareOp::Equal, 0)
                    } else {
                        Compare::mod_revision(key, CompareOp::Equal, rev)
                    }
                })
                .collect();
            let mut chunk = Chunk::default();
            for (k, v) in txn.writes {
                chunk.write(k, v);
            }
            let ops = chunk.ops();
            if let Some(rev) = self.commit(compares, ops)? {
                return Ok(Some(rev));
            }
            debug!(
                attempt,
                "etcd transaction met a concurrent write; running it again"
            );
        }
        Err(StoreError::Backend(format!(
            "etcd: a transaction met concurrent writes {MAX_ATTEMPTS} times in a row"
        )))
    }

    fn follow(&self, sink: Box<dyn Fn(KvChange) + Send + Sync>) {
        let Some(rt) = &self.runtime else {
            return;
        };
        let (client, root, own) = (self.client.clone(), self.root.clone(), self.own.clone());
        // What follows the watch (the trust directory, the node table's view of the others)
        // is as fresh as the watch: when the watch cannot be set up again after it broke (the
        // gRPC keep-alive breaks it within about 2 s of etcd going away; a watch on one
        // member that died moves to another), the anchor's views are marked stale until etcd
        // answers again.
        let stale_since = self.stale_since.clone();
        let splitter = KeySplitter { root: root.clone() };
        rt.spawn(async move {
            let mut from: i64 = 0;
            loop {
                let mut watch = client.watch_client();
                let mut options = WatchOptions::new().with_prefix();
                if from > 0 {
                    options = options.with_start_revision(from);
                }
                let mut stream = match watch.watch(root.clone(), Some(options)).await {
                    Ok(s) => s,
                    Err(e) => {
                        mark_stale(&stale_since);
                        warn!(error = %e, "cannot watch etcd; retrying in 1 s");
                        tokio::time::sleep(Duration::from_secs(1)).await;
                        continue;
                    }
                };
                loop {
                    match stream.message().await {
                        Ok(Some(resp)) => {
                            for event in resp.events() {
                                let Some(kv) = event.kv() else { continue };
                                from = from.max(kv.mod_revision() + 1);
                                let Some((space, key)) = splitter.split(kv.key()) else {
                                    continue;
                                };
                                let value = match event.event_type() {
                                    EventType::Put => Some(kv.value().to_vec()),
                                    EventType::Delete => None,
                                };
                                let rev = u64::try_from(kv.mod_revision()).unwrap_or(0);
                                if !own.is_foreign(rev).await {
                                    continue;
                                }
                                sink(KvChange {
                                    rev,
                                    space,
                                    key,
                                    value,
                                });
                            }
                        }
                        Ok(None) => break,
                        Err(e) => {
                            warn!(error = %e, "the etcd watch broke; watching again");
                            break;
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        });
    }

    fn disk_space(&self) -> u64 {
        let mut client = self.client.maintenance_client();
        self.run(async move { client.status().await })
            .map(|s| u64::try_from(s.db_size()).unwrap_or(0))
            .unwrap_or(0)
    }

    fn announce(&self, key: &[u8], value: Vec<u8>, ttl: Duration) -> Result<Lease, StoreError> {
        // One lease for the announcement and every session: renewed here, granted again
        // (and the sessions written again by the anchor) if it lapsed while etcd was away.
        let held = *self.lease.lock().unwrap_or_else(|e| e.into_inner());
        let state = match held {
            Some(id) if self.keep_alive(id)? => Lease::Held,
            _ => {
                let id = self.grant(ttl.max(SESSION_TTL))?;
                *self.lease.lock().unwrap_or_else(|e| e.into_inner()) = Some(id);
                Lease::New
            }
        };
        let lease = self.session_lease()?;
        let full = [self.root.as_slice(), INSTANCES, key].concat();
        let options = PutOptions::new().with_lease(lease);
        self.run_idempotent(|| {
            let (mut client, full, value, options) = (
                self.client.kv_client(),
                full.clone(),
                value.clone(),
                options.clone(),
            );
            async move { client.put(full, value, Some(options)).await }
        })?;
        Ok(state)
    }

    fn shared(&self) -> bool {
        true
    }

    fn scan_prefix(&self, space: Space, prefix: &[u8]) -> Result<Vec<KvPair>, StoreError> {
        let space_prefix = self.space_prefix(space);
        let from = [space_prefix.as_slice(), prefix].concat();
        let end = prefix_end(&from);
        let mut out: Vec<KvPair> = Vec::new();
        let mut next = from;
        loop {
            let page = self.page(next.clone(), end.clone(), false)?;
            let full = page.len() as i64 == PAGE;
            if let Some((last, _)) = page.last() {
                next = last.clone();
                next.push(0);
            }
            out.extend(
                page.into_iter()
                    .map(|(k, v)| (k[space_prefix.len()..].to_vec(), v)),
            );
            if !full {
                return Ok(out);
            }
        }
    }

    fn announced(&self) -> Result<Vec<Vec<u8>>, StoreError> {
        let prefix = [self.root.as_slice(), INSTANCES].concat();
        let end = prefix_end(&prefix);
        Ok(self
            .page(prefix, end, false)?
            .into_iter()
            .map(|(_, v)| v)
            .collect())
    }

    fn persist(&self) -> Result<(), StoreError> {
        // etcd commits are durable (raft, fsynced by a quorum) before they are acknowledged.
        Ok(())
    }
}

/// Marks what this anchor shows as stale from now, unless it is already.
fn mark_stale(since: &std::sync::atomic::AtomicU64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_millis() as u64);
    let _ = since.compare_exchange(0, now, Ordering::Relaxed, Ordering::Relaxed);
}

/// Splits full keys for the watch task (which cannot borrow the store).
struct KeySplitter {
    root: Vec<u8>,
}

impl KeySplitter {
    fn split(&self, full: &[u8]) -> Option<(Space, Vec<u8>)> {
        let rest = full.strip_prefix(self.root.as_slice())?;
        let slash = rest.iter().position(|b| *b == b'/')?;
        let space = Space::named(std::str::from_utf8(&rest[..slash]).ok()?)?;
        Some((space, rest[slash + 1..].to_vec()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_ends_are_the_next_key_after_everything_with_the_prefix() {
        assert_eq!(prefix_end(b"/a/codes/"), b"/a/codes0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
    }

    #[test]
    fn full_keys_split_back_into_space_and_key() {
        let s = KeySplitter {
            root: b"/anchorage/".to_vec(),
        };
        assert_eq!(
            s.split(b"/anchorage/labels/d\x01/\x02"),
            Some((Space::Labels, b"d\x01/\x02".to_vec()))
        );
        assert_eq!(s.split(b"/other/labels/x"), None);
        assert_eq!(s.split(b"/anchorage/nothing/x"), None);
    }
}
