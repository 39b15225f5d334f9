//! [`MeshSocket`]: the node's one UDP socket, as quinn sees it.

use std::collections::VecDeque;
use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, SystemTime};

use anchorage_wire::DeviceId;
use anchorage_wire::peer::{MAX_RELAY_PACKET, PathKind, Probe, RelayPacket};
use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::{Notify, mpsc, watch};
use tokio::time::Instant;

use super::paths::{Outgoing, Paths, ProbeOutcome, Route, canonical, is_mesh_addr};

/// Most relayed packets waiting for quinn to read them; more are dropped, as a full socket
/// buffer would.
pub const RELAY_INBOX: usize = 1024;

/// The path to one peer now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathInfo {
    /// Direct, relayed (a relay is set and there is no direct path) or none.
    pub kind: PathKind,
    /// The peer's real address on a direct path.
    pub addr: Option<SocketAddr>,
    /// Round-trip time of the probes on the direct path (smoothed).
    pub rtt: Option<Duration>,
    /// Since when `kind` and `addr` have been what they are (on the wall clock).
    pub since: SystemTime,
}

/// What the socket did, since it was made. Datagrams count once per GSO segment.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MeshSocketStats {
    /// Datagrams to peers sent straight to a real address.
    pub sent_direct: u64,
    /// Their payload bytes.
    pub sent_direct_bytes: u64,
    /// Datagrams to peers handed to the relay.
    pub sent_relayed: u64,
    /// Their payload bytes.
    pub sent_relayed_bytes: u64,
    /// Datagrams to peers dropped: no direct path and no relay (or a made-up address that
    /// stands for nobody, or a packet too big for the relay).
    pub dropped_no_path: u64,
    /// Datagrams to peers dropped because the relay channel was full.
    pub dropped_relay_full: u64,
    /// Datagrams from a known address of a peer, handed to quinn as from the peer.
    pub received_direct: u64,
    /// Their payload bytes.
    pub received_direct_bytes: u64,
    /// Relayed datagrams handed to quinn.
    pub received_relayed: u64,
    /// Their payload bytes.
    pub received_relayed_bytes: u64,
    /// Relayed datagrams dropped: the inbox was full, or they were bigger than quinn's buffer
    /// or [`MAX_RELAY_PACKET`].
    pub dropped_relayed_in: u64,
    /// Probes sent (pings and pongs).
    pub probes_sent: u64,
    /// Valid probes received: pings from a known peer with its token, pongs to our pings.
    pub probes_received: u64,
    /// Probe-looking datagrams ignored: undecodable, from a stranger, with a wrong token, or
    /// answering nothing we asked.
    pub probes_ignored: u64,
}

/// The node's UDP socket for quinn: the anchor connection passes through unchanged, and each
/// peer appears as one stable made-up address whose packets go direct or through the relay.
///
/// See the [module docs](super) for the design.
pub struct MeshSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    /// Whether quinn's addresses are IPv6 (a dual-stack socket): made-up addresses are then
    /// reported IPv4-mapped, as quinn reports IPv4 peers on such a socket.
    ipv6: bool,
    paths: Mutex<Paths>,
    relay: Mutex<Option<mpsc::Sender<RelayPacket>>>,
    inbox: Mutex<Inbox>,
    counters: Counters,
    changes: watch::Sender<u64>,
    /// Wakes the probing task: a peer changed, or the socket is going away.
    wake: Arc<Notify>,
    stopped: Arc<AtomicBool>,
    /// Whether direct paths are tried at all (`false`: every peer packet is relayed).
    direct: AtomicBool,
}

#[derive(Debug, Default)]
struct Inbox {
    /// (made-up source address, packet)
    queue: VecDeque<(SocketAddr, Vec<u8>)>,
    waker: Option<Waker>,
}

impl MeshSocket {
    /// Wraps the node's real socket (a quinn::Runtime-wrapped UDP socket, or a netsim
    /// `SimSocket`). `me` goes into every probe.
    pub fn new(inner: Arc<dyn AsyncUdpSocket>, me: DeviceId) -> Arc<MeshSocket> {
        let ipv6 = inner.local_addr().is_ok_and(|a| a.is_ipv6());
        Arc::new(MeshSocket {
            inner,
            ipv6,
            paths: Mutex::new(Paths::new(me, now())),
            relay: Mutex::new(None),
            inbox: Mutex::new(Inbox::default()),
            counters: Counters::default(),
            changes: watch::channel(0).0,
            wake: Arc::new(Notify::new()),
            stopped: Arc::new(AtomicBool::new(false)),
            direct: AtomicBool::new(true),
        })
    }

    /// Turns direct paths off (every peer packet goes through the anchor's relay, probes are
    /// neither sent nor answered) or back on. For networks where peers must not see each
    /// other's addresses, and to measure the relay.
    pub fn set_direct(&self, direct: bool) {
        self.direct.store(direct, Ordering::Release);
    }

    /// Starts the probing task on the current tokio runtime. It holds no strong reference:
    /// it ends when the last `Arc` of the socket is dropped, or on [`shutdown`](Self::shutdown).
    pub fn start(self: &Arc<Self>) {
        tokio::spawn(drive(
            Arc::downgrade(self),
            self.wake.clone(),
            self.stopped.clone(),
        ));
    }

    /// Stops the probing task (packets still flow; direct paths die for want of pings).
    pub fn shutdown(&self) {
        self.stopped.store(true, Ordering::Release);
        self.wake.notify_one();
    }

    /// The stable made-up address quinn uses for `peer` (allocated on first use; never
    /// reused for another peer).
    pub fn peer_addr(&self, peer: DeviceId) -> SocketAddr {
        let addr = lock(&self.paths).peer_addr(now(), peer);
        self.outer(addr)
    }

    /// Which peer a made-up address stands for (IPv4 or IPv4-mapped IPv6).
    pub fn peer_of(&self, addr: SocketAddr) -> Option<DeviceId> {
        lock(&self.paths).peer_of(addr)
    }

    /// Where `peer` may be reached (from the anchor's Punch, or remembered from last time)
    /// and the pair's token; starts probing at once (this is the simultaneous open: the
    /// anchor tells both sides at the same moment). Replaces the token; merges addresses,
    /// keeping at most [`MAX_CANDIDATES`](anchorage_wire::peer::MAX_CANDIDATES).
    pub fn set_candidates(&self, peer: DeviceId, addrs: Vec<SocketAddr>, token: [u8; 16]) {
        let addrs = if self.direct.load(Ordering::Acquire) {
            addrs
        } else {
            Vec::new()
        };
        lock(&self.paths).set_candidates(now(), peer, &addrs, token);
        self.wake.notify_one();
    }

    /// What is known of a peer's addresses (including those learned from its probes) and its
    /// token, to save and reuse while the anchor is away. `None` before any
    /// [`set_candidates`](Self::set_candidates).
    pub fn candidates(&self, peer: DeviceId) -> Option<(Vec<SocketAddr>, [u8; 16])> {
        lock(&self.paths).candidates(peer)
    }

    /// The relay: packets for peers without a working direct path go here (`None`: no anchor
    /// now, and such packets are dropped).
    pub fn set_relay(&self, relay: Option<mpsc::Sender<RelayPacket>>) {
        let present = relay.is_some();
        *lock(&self.relay) = relay;
        let generation = {
            let mut paths = lock(&self.paths);
            paths.set_relay(now(), present);
            paths.generation()
        };
        self.publish(generation);
        // The punch schedule backs off only while relayed.
        self.wake.notify_one();
    }

    /// A packet the anchor relayed from `from`: delivered to quinn as if it came from
    /// [`peer_addr(from)`](Self::peer_addr). Dropped beyond [`RELAY_INBOX`] waiting packets.
    pub fn relay_received(&self, from: DeviceId, packet: Vec<u8>) {
        if packet.len() > MAX_RELAY_PACKET {
            Counters::bump(&self.counters.dropped_relayed_in, 1);
            return;
        }
        let source = lock(&self.paths).peer_addr(now(), from);
        let waker = {
            let mut inbox = lock(&self.inbox);
            if inbox.queue.len() >= RELAY_INBOX {
                Counters::bump(&self.counters.dropped_relayed_in, 1);
                return;
            }
            inbox.queue.push_back((source, packet));
            inbox.waker.take()
        };
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// The current path to a peer.
    pub fn path(&self, peer: DeviceId) -> PathInfo {
        let state = lock(&self.paths).path(peer);
        match state {
            Some(s) => PathInfo {
                kind: s.kind,
                addr: s.addr,
                rtt: s.rtt,
                since: wall_clock(s.since),
            },
            None => PathInfo {
                kind: PathKind::None,
                addr: None,
                rtt: None,
                since: SystemTime::now(),
            },
        }
    }

    /// Bumped whenever any peer's path changes kind or address.
    pub fn path_changes(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// Drops everything about a peer (no longer in the directory). Its made-up address stands
    /// for nobody from now on: quinn's packets to it are dropped.
    pub fn forget(&self, peer: DeviceId) {
        let generation = {
            let mut paths = lock(&self.paths);
            paths.forget(peer);
            paths.generation()
        };
        self.publish(generation);
    }

    /// Counters since the socket was made.
    pub fn stats(&self) -> MeshSocketStats {
        self.counters.snapshot()
    }

    /// Sends the probes due now; when the next ones are.
    fn tick(&self) -> Option<Instant> {
        let mut out = Vec::new();
        let (next, generation) = {
            let mut paths = lock(&self.paths);
            let next = paths.poll(now(), &mut out);
            (next, paths.generation())
        };
        self.send_probes(&out);
        self.publish(generation);
        next.map(Instant::from_std)
    }

    fn send_probes(&self, probes: &[Outgoing]) {
        for o in probes {
            let contents = o.probe.encode();
            let transmit = Transmit {
                destination: self.outer(o.dest),
                ecn: None,
                contents: &contents,
                segment_size: None,
                src_ip: None,
            };
            // A probe that cannot go now is lost, as UDP would lose it; the schedule retries.
            if self.inner.try_send(&transmit).is_ok() {
                Counters::bump(&self.counters.probes_sent, 1);
            }
        }
    }

    fn publish(&self, generation: u64) {
        self.changes.send_if_modified(|seen| {
            let changed = *seen != generation;
            *seen = generation;
            changed
        });
    }

    /// An address as quinn expects it on this socket.
    fn outer(&self, addr: SocketAddr) -> SocketAddr {
        match (self.ipv6, addr.ip()) {
            (true, IpAddr::V4(v4)) => SocketAddr::new(IpAddr::V6(v4.to_ipv6_mapped()), addr.port()),
            _ => addr,
        }
    }

    fn send_direct(&self, transmit: &Transmit<'_>, real: SocketAddr) -> io::Result<()> {
        let direct = Transmit {
            destination: self.outer(real),
            ecn: transmit.ecn,
            contents: transmit.contents,
            segment_size: transmit.segment_size,
            src_ip: transmit.src_ip,
        };
        self.inner.try_send(&direct)?;
        Counters::bump(
            &self.counters.sent_direct,
            segments(transmit).count() as u64,
        );
        Counters::bump(
            &self.counters.sent_direct_bytes,
            transmit.contents.len() as u64,
        );
        Ok(())
    }

    fn send_relayed(&self, transmit: &Transmit<'_>, peer: DeviceId) {
        let relay = lock(&self.relay);
        for segment in segments(transmit) {
            let Some(relay) = relay.as_ref().filter(|_| segment.len() <= MAX_RELAY_PACKET) else {
                Counters::bump(&self.counters.dropped_no_path, 1);
                continue;
            };
            let packet = RelayPacket {
                peer,
                packet: segment.to_vec(),
            };
            match relay.try_send(packet) {
                Ok(()) => {
                    Counters::bump(&self.counters.sent_relayed, 1);
                    Counters::bump(&self.counters.sent_relayed_bytes, segment.len() as u64);
                }
                Err(mpsc::error::TrySendError::Full(_)) => {
                    Counters::bump(&self.counters.dropped_relay_full, 1);
                }
                Err(mpsc::error::TrySendError::Closed(_)) => {
                    Counters::bump(&self.counters.dropped_no_path, 1);
                }
            }
        }
    }

    /// Moves up to `max` relayed packets into the first buffers; how many.
    fn take_relayed(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        max: usize,
    ) -> usize {
        let mut inbox = lock(&self.inbox);
        let mut filled = 0;
        while filled < max.min(bufs.len()).min(meta.len()) {
            let Some((source, packet)) = inbox.queue.pop_front() else {
                break;
            };
            let Some(buf) = bufs[filled].get_mut(..packet.len()) else {
                Counters::bump(&self.counters.dropped_relayed_in, 1);
                continue;
            };
            buf.copy_from_slice(&packet);
            let m = &mut meta[filled];
            m.addr = self.outer(source);
            m.len = packet.len();
            m.stride = packet.len();
            m.ecn = None;
            m.dst_ip = None;
            Counters::bump(&self.counters.received_relayed, 1);
            Counters::bump(&self.counters.received_relayed_bytes, packet.len() as u64);
            filled += 1;
        }
        filled
    }

    /// Registers the reader to be woken by [`relay_received`](Self::relay_received). Under
    /// the inbox lock, so that a packet that arrives after the last look is not missed.
    fn register_waker(&self, cx: &Context<'_>) -> bool {
        let mut inbox = lock(&self.inbox);
        if !inbox.queue.is_empty() {
            return true;
        }
        match &inbox.waker {
            Some(w) if w.will_wake(cx.waker()) => {}
            _ => inbox.waker = Some(cx.waker().clone()),
        }
        false
    }

    /// Consumes the probes among `n` datagrams the inner socket delivered, rewrites the
    /// sources of peers' datagrams, and packs what is left for quinn at the front. How many
    /// are left.
    fn filter_received(
        &self,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
        n: usize,
    ) -> usize {
        let mut replies = Vec::new();
        let mut probes = false;
        let mut kept = 0;
        let direct = self.direct.load(Ordering::Acquire);
        let generation = {
            let mut paths = lock(&self.paths);
            let now = now();
            for i in 0..n.min(bufs.len()).min(meta.len()) {
                let mut m = meta[i];
                let src = canonical(m.addr);
                let mut handle = |segment: &[u8]| {
                    probes = true;
                    let outcome = Probe::decode(segment)
                        .filter(|_| direct)
                        .map(|probe| paths.handle_probe(now, src, probe));
                    match outcome {
                        Some(ProbeOutcome::Accepted(out)) => {
                            Counters::bump(&self.counters.probes_received, 1);
                            replies.extend(out);
                        }
                        Some(ProbeOutcome::Ignored) | None => {
                            Counters::bump(&self.counters.probes_ignored, 1);
                        }
                    }
                };
                m.len = strip_probes(&mut bufs[i], m.len, m.stride, &mut handle);
                if m.len == 0 {
                    continue;
                }
                if let Some(mesh) = paths.mesh_source(src) {
                    m.addr = self.outer(mesh);
                    let count = m.len.div_ceil(m.stride.clamp(1, m.len));
                    Counters::bump(&self.counters.received_direct, count as u64);
                    Counters::bump(&self.counters.received_direct_bytes, m.len as u64);
                }
                if kept != i && !move_buffer(bufs, i, kept, m.len) {
                    continue;
                }
                meta[kept] = m;
                kept += 1;
            }
            paths.generation()
        };
        self.send_probes(&replies);
        self.publish(generation);
        if probes {
            // A probe may have made a path direct: its heartbeats need scheduling.
            self.wake.notify_one();
        }
        kept
    }
}

impl AsyncUdpSocket for MeshSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit<'_>) -> io::Result<()> {
        if !is_mesh_addr(transmit.destination) {
            return self.inner.try_send(transmit);
        }
        let route = lock(&self.paths).route(transmit.destination);
        match route {
            Route::Direct(real) => self.send_direct(transmit, real),
            Route::Relay(peer) => {
                self.send_relayed(transmit, peer);
                Ok(())
            }
            Route::Unknown => {
                Counters::bump(
                    &self.counters.dropped_no_path,
                    segments(transmit).count() as u64,
                );
                Ok(())
            }
        }
    }

    fn poll_recv(
        &self,
        cx: &mut Context<'_>,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let slots = bufs.len().min(meta.len());
        // At most half the batch from the relay, so that neither source starves the other.
        let mut filled = self.take_relayed(bufs, meta, slots.div_ceil(2));
        loop {
            if filled == slots {
                return Poll::Ready(Ok(filled));
            }
            if filled == 0 && self.register_waker(cx) {
                filled = self.take_relayed(bufs, meta, slots.div_ceil(2));
                continue;
            }
            match self
                .inner
                .poll_recv(cx, &mut bufs[filled..slots], &mut meta[filled..slots])
            {
                Poll::Ready(Ok(n)) => {
                    let kept =
                        self.filter_received(&mut bufs[filled..slots], &mut meta[filled..slots], n);
                    if kept > 0 || filled > 0 {
                        return Poll::Ready(Ok(filled + kept));
                    }
                    // Only probes: read on, so that the inner socket registers our waker.
                }
                // What the relay gave is returned now; the inner socket is asked again on
                // the next call (and has our waker if it was pending).
                Poll::Ready(Err(_)) | Poll::Pending if filled > 0 => {
                    return Poll::Ready(Ok(filled));
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

impl Drop for MeshSocket {
    fn drop(&mut self) {
        // The task holds only a weak reference: wake it to find the socket gone.
        self.wake.notify_one();
    }
}

impl fmt::Debug for MeshSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshSocket")
            .field("inner", &self.inner)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

/// The probing task: sends due probes, sleeps until the next, wakes early when a peer
/// changes. Ends when the socket is dropped or shut down.
async fn drive(socket: Weak<MeshSocket>, wake: Arc<Notify>, stopped: Arc<AtomicBool>) {
    loop {
        if stopped.load(Ordering::Acquire) {
            return;
        }
        let Some(next) = socket.upgrade().map(|s| s.tick()) else {
            return;
        };
        // `notify_one` leaves a permit if nobody waits, so a change between `tick` and here
        // is not missed.
        match next {
            Some(at) => {
                tokio::select! {
                    biased;
                    () = wake.notified() => {}
                    () = tokio::time::sleep_until(at) => {}
                }
            }
            None => wake.notified().await,
        }
    }
}

/// Removes the probes from a received buffer of `len` bytes in `stride`-byte datagrams
/// (GRO), handing each to `handle`, and closes the gaps; the bytes left.
fn strip_probes(buf: &mut [u8], len: usize, stride: usize, handle: &mut dyn FnMut(&[u8])) -> usize {
    let len = len.min(buf.len());
    let stride = if stride == 0 { len.max(1) } else { stride };
    let mut write = 0;
    let mut read = 0;
    while read < len {
        let end = (read + stride).min(len);
        if Probe::is_probe(&buf[read..end]) {
            handle(&buf[read..end]);
        } else {
            // Only whole strides go, so the datagrams left keep their boundaries.
            buf.copy_within(read..end, write);
            write += end - read;
        }
        read = end;
    }
    write
}

/// Copies the first `len` bytes of buffer `from` into the earlier buffer `to`; false if it
/// does not fit (quinn's buffers are all one size, so it always does).
fn move_buffer(bufs: &mut [IoSliceMut<'_>], from: usize, to: usize, len: usize) -> bool {
    let (head, tail) = bufs.split_at_mut(from);
    match (
        head.get_mut(to).and_then(|b| b.get_mut(..len)),
        tail.first().and_then(|b| b.get(..len)),
    ) {
        (Some(dst), Some(src)) => {
            dst.copy_from_slice(src);
            true
        }
        _ => false,
    }
}

/// The datagrams of a transmit (one per GSO segment).
fn segments<'a>(transmit: &Transmit<'a>) -> std::slice::Chunks<'a, u8> {
    let size = transmit
        .segment_size
        .unwrap_or(transmit.contents.len())
        .max(1);
    transmit.contents.chunks(size)
}

/// tokio's clock (virtual under a paused test runtime), as the pure rules take it.
fn now() -> std::time::Instant {
    Instant::now().into_std()
}

/// A monotonic instant on the wall clock.
fn wall_clock(at: std::time::Instant) -> SystemTime {
    let ago = now().saturating_duration_since(at);
    SystemTime::now()
        .checked_sub(ago)
        .unwrap_or_else(SystemTime::now)
}

/// Locks a mutex; the state is plain data, consistent after any panic of another holder.
fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[derive(Debug, Default)]
struct Counters {
    sent_direct: AtomicU64,
    sent_direct_bytes: AtomicU64,
    sent_relayed: AtomicU64,
    sent_relayed_bytes: AtomicU64,
    dropped_no_path: AtomicU64,
    dropped_relay_full: AtomicU64,
    received_direct: AtomicU64,
    received_direct_bytes: AtomicU64,
    received_relayed: AtomicU64,
    received_relayed_bytes: AtomicU64,
    dropped_relayed_in: AtomicU64,
    probes_sent: AtomicU64,
    probes_received: AtomicU64,
    probes_ignored: AtomicU64,
}

impl Counters {
    fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    fn snapshot(&self) -> MeshSocketStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        MeshSocketStats {
            sent_direct: get(&self.sent_direct),
            sent_direct_bytes: get(&self.sent_direct_bytes),
            sent_relayed: get(&self.sent_relayed),
            sent_relayed_bytes: get(&self.sent_relayed_bytes),
            dropped_no_path: get(&self.dropped_no_path),
            dropped_relay_full: get(&self.dropped_relay_full),
            received_direct: get(&self.received_direct),
            received_direct_bytes: get(&self.received_direct_bytes),
            received_relayed: get(&self.received_relayed),
            received_relayed_bytes: get(&self.received_relayed_bytes),
            dropped_relayed_in: get(&self.dropped_relayed_in),
            probes_sent: get(&self.probes_sent),
            probes_received: get(&self.probes_received),
            probes_ignored: get(&self.probes_ignored),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_leave_a_gro_buffer_and_the_rest_keeps_its_boundaries() {
        let probe = Probe::Ping(anchorage_wire::peer::Ping {
            from: DeviceId::from_bytes([1; 20]),
            token: [2; 16],
            tx: [3; 12],
        })
        .encode();
        let stride = probe.len();
        let mut buf = Vec::new();
        buf.extend(std::iter::repeat_n(0x40u8, stride));
        buf.extend_from_slice(&probe);
        buf.extend(std::iter::repeat_n(0x41u8, stride));
        buf.extend(std::iter::repeat_n(0x42u8, 5));
        let len = buf.len();
        let mut seen = 0;
        let left = strip_probes(&mut buf, len, stride, &mut |p| {
            assert_eq!(p, &probe[..]);
            seen += 1;
        });
        assert_eq!((seen, left), (1, 2 * stride + 5));
        assert!(buf[..stride].iter().all(|b| *b == 0x40));
        assert!(buf[stride..2 * stride].iter().all(|b| *b == 0x41));
        assert!(buf[2 * stride..left].iter().all(|b| *b == 0x42));
        // Without GRO (stride = len, or 0) a datagram is one unit.
        let mut one = probe.clone();
        assert_eq!(strip_probes(&mut one, probe.len(), 0, &mut |_| {}), 0);
        let mut empty: [u8; 0] = [];
        assert_eq!(strip_probes(&mut empty, 0, 0, &mut |_| {}), 0);
    }

    #[test]
    fn segments_follow_gso() {
        let data = [0u8; 25];
        let t = |segment_size| Transmit {
            destination: "10.0.0.1:1".parse().expect("addr"),
            ecn: None,
            contents: &data,
            segment_size,
            src_ip: None,
        };
        let sizes: Vec<usize> = segments(&t(Some(10))).map(<[u8]>::len).collect();
        assert_eq!(sizes, [10, 10, 5]);
        assert_eq!(segments(&t(None)).count(), 1);
    }
}
