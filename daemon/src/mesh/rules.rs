//! Pure rules of the mesh service: token buckets, the per-node directory, and the operators'
//! view of the links. Time is an argument; nothing here reads a clock or touches a socket.

use std::collections::BTreeMap;

use anchorage_mesh::DeviceId;
use anchorage_wire::peer::{PathKind, PeerEntry, PeerPath};

use crate::policy::Policy;
use crate::records::Labels;

/// A token bucket: `rate` tokens a second, holding at most `burst`.
#[derive(Debug, Clone)]
pub struct Bucket {
    rate: u64,
    burst: u64,
    /// Tokens held, in thousandths (so that a refill of less than one whole token a
    /// millisecond is not lost to rounding).
    milli: u64,
    last_ms: u64,
}

impl Bucket {
    /// A full bucket at `now_ms`.
    pub fn new(rate: u64, burst: u64, now_ms: u64) -> Bucket {
        Bucket {
            rate,
            burst,
            milli: burst.saturating_mul(1000),
            last_ms: now_ms,
        }
    }

    /// Takes `n` tokens if the bucket holds them at `now_ms`; else takes none.
    pub fn take(&mut self, n: u64, now_ms: u64) -> bool {
        let elapsed = now_ms.saturating_sub(self.last_ms);
        self.last_ms = self.last_ms.max(now_ms);
        self.milli = self
            .milli
            .saturating_add(elapsed.saturating_mul(self.rate))
            .min(self.burst.saturating_mul(1000));
        let want = n.saturating_mul(1000);
        if self.milli >= want {
            self.milli -= want;
            true
        } else {
            false
        }
    }

    /// Gives back `n` tokens taken by a [`take`](Bucket::take) whose work did not happen.
    pub fn give_back(&mut self, n: u64) {
        self.milli = self
            .milli
            .saturating_add(n.saturating_mul(1000))
            .min(self.burst.saturating_mul(1000));
    }
}

/// An approved, unrevoked device as the directory needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its name.
    pub name: String,
    /// Its labels.
    pub labels: Labels,
}

/// Whether the policy relates devices labelled `a` and `b` in either direction.
pub fn related(policy: &Policy, a: &Labels, b: &Labels) -> bool {
    !policy.is_empty() && (!policy.grant(a, b).is_empty() || !policy.grant(b, a).is_empty())
}

/// The directory of `me`: every other member the policy lets it reach or be reached by,
/// sorted by device id, with the services each exposes now.
pub fn directory(
    policy: &Policy,
    members: &BTreeMap<DeviceId, Member>,
    services: impl Fn(&DeviceId) -> Vec<String>,
    me: &DeviceId,
) -> Vec<PeerEntry> {
    // The default policy relates nobody: no member is looked at.
    if policy.is_empty() {
        return Vec::new();
    }
    let Some(mine) = members.get(me) else {
        return Vec::new();
    };
    members
        .iter()
        .filter(|(id, _)| *id != me)
        .filter_map(|(id, m)| {
            let outbound = policy.grant(&mine.labels, &m.labels);
            let inbound = policy.grant(&m.labels, &mine.labels);
            if outbound.is_empty() && inbound.is_empty() {
                return None;
            }
            Some(PeerEntry {
                device_id: *id,
                name: m.name.clone(),
                labels: m
                    .labels
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect(),
                services: services(id),
                outbound,
                inbound,
            })
        })
        .collect()
}

/// One peer connection as the operators see it, merged from both sides' reports.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Link {
    /// The side with the smaller device id.
    pub a: DeviceId,
    /// The other side.
    pub b: DeviceId,
    /// How they reach each other: direct if either side says so, else relayed if either
    /// does, else none.
    pub path: PathKind,
    /// The address in use on a direct path (as the reporting side dials it).
    pub addr: Option<String>,
    /// The smaller round-trip time the two report, microseconds.
    pub rtt_us: Option<u32>,
    /// Unix ms since when the path has been what it is (from the report that gave `path`).
    pub since_ms: u64,
}

fn rank(p: PathKind) -> u8 {
    match p {
        PathKind::Direct => 2,
        PathKind::Relayed => 1,
        PathKind::None => 0,
    }
}

/// Merges every node's latest path report into one link per pair.
pub fn links<'a>(reports: impl IntoIterator<Item = (&'a DeviceId, &'a [PeerPath])>) -> Vec<Link> {
    let mut out: BTreeMap<(DeviceId, DeviceId), Link> = BTreeMap::new();
    for (me, paths) in reports {
        for p in paths {
            if p.peer == *me {
                continue;
            }
            let key = if *me < p.peer {
                (*me, p.peer)
            } else {
                (p.peer, *me)
            };
            let link = out.entry(key).or_insert_with(|| Link {
                a: key.0,
                b: key.1,
                path: p.path,
                addr: None,
                rtt_us: None,
                since_ms: p.since_ms,
            });
            if rank(p.path) > rank(link.path) {
                link.path = p.path;
                link.since_ms = p.since_ms;
                link.addr = None;
            }
            if p.path == link.path && link.addr.is_none() && p.path == PathKind::Direct {
                link.addr.clone_from(&p.addr);
            }
            link.rtt_us = match (link.rtt_us, p.rtt_us) {
                (Some(x), Some(y)) => Some(x.min(y)),
                (x, y) => x.or(y),
            };
        }
    }
    out.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u8) -> DeviceId {
        DeviceId::from_bytes([n; 20])
    }

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn a_bucket_passes_its_burst_then_its_rate() {
        let mut b = Bucket::new(1000, 1000, 0);
        assert!(b.take(600, 0));
        assert!(!b.take(600, 0), "only 400 left");
        assert!(b.take(400, 0));
        assert!(!b.take(1, 0));
        assert!(b.take(100, 100), "100 ms refill 100");
        assert!(!b.take(1, 100));
        // Never more than the burst, however long it rested.
        assert!(!b.take(1001, 1_000_000));
        assert!(b.take(1000, 1_000_000));
        b.give_back(10);
        assert!(b.take(10, 1_000_000));
        // A clock that steps back takes nothing and gives nothing.
        assert!(!b.take(1, 0));
    }

    #[test]
    fn the_directory_lists_who_the_policy_relates_either_way() {
        let policy = Policy::parse(
            "[[allow]]\nfrom = \"role=display\"\nto = \"role=camera\"\ncapabilities = [\"echo\"]\n",
        )
        .unwrap();
        let members: BTreeMap<DeviceId, Member> = [
            (1, "display"),
            (2, "camera"),
            (3, "printer"),
            (4, "display"),
        ]
        .into_iter()
        .map(|(n, role)| {
            (
                id(n),
                Member {
                    name: format!("d{n}"),
                    labels: labels(&[("role", role)]),
                },
            )
        })
        .collect();
        let services = |d: &DeviceId| {
            if *d == id(2) {
                vec!["rtsp".to_string()]
            } else {
                Vec::new()
            }
        };
        let d1 = directory(&policy, &members, services, &id(1));
        assert_eq!(d1.len(), 1);
        assert_eq!(d1[0].device_id, id(2));
        assert_eq!(d1[0].services, vec!["rtsp".to_string()]);
        assert!(d1[0].outbound.allows_capability("echo") && d1[0].inbound.is_empty());
        let d2 = directory(&policy, &members, services, &id(2));
        assert_eq!(
            d2.iter().map(|p| p.device_id).collect::<Vec<_>>(),
            vec![id(1), id(4)]
        );
        assert!(d2[0].outbound.is_empty() && d2[0].inbound.allows_capability("echo"));
        assert!(directory(&policy, &members, services, &id(3)).is_empty());
        assert!(directory(&Policy::empty(), &members, services, &id(1)).is_empty());
        assert!(related(
            &policy,
            &members[&id(2)].labels,
            &members[&id(1)].labels
        ));
        assert!(!related(
            &policy,
            &members[&id(3)].labels,
            &members[&id(1)].labels
        ));
    }

    #[test]
    fn links_merge_both_sides_reports() {
        let path = |peer: u8, path, addr: Option<&str>, rtt, since| PeerPath {
            peer: id(peer),
            path,
            addr: addr.map(str::to_string),
            rtt_us: rtt,
            since_ms: since,
        };
        let r1 = vec![
            path(2, PathKind::Relayed, None, Some(9000), 10),
            path(3, PathKind::None, None, None, 5),
        ];
        let r2 = vec![path(
            1,
            PathKind::Direct,
            Some("10.0.0.1:5000"),
            Some(4000),
            20,
        )];
        let l = links([(&id(2), r2.as_slice()), (&id(1), r1.as_slice())]);
        assert_eq!(l.len(), 2);
        assert_eq!((l[0].a, l[0].b), (id(1), id(2)));
        assert_eq!(l[0].path, PathKind::Direct);
        assert_eq!(l[0].addr.as_deref(), Some("10.0.0.1:5000"));
        assert_eq!((l[0].rtt_us, l[0].since_ms), (Some(4000), 20));
        assert_eq!((l[1].b, l[1].path), (id(3), PathKind::None));
    }
}
