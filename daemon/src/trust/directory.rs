//! The directory: every device record, device labels and pending pairing request, kept in
//! memory from the store's watch, so views of the whole fleet (the inventory, the peer
//! roster, the metrics) read no store records.
//!
//! It follows the same rule as the other trust mirrors: every entry carries the store revision
//! it was last written at, and a change older than that is ignored, so a commit of this anchor
//! and the watch of another's can arrive in either order. A removal is kept as an empty entry
//! with its revision (a tombstone), for the same reason. What is kept is what views show:
//! device records without their certificate, requests without their CSR and certificate.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use anchorage_mesh::DeviceId;

use crate::records::{DeviceRecord, Labels, RequestRecord, RequestState};
use crate::store::{LabelOwner, Revision, TrustChange};

/// One key's last write: its revision, and the value (`None`: removed, or no longer kept).
type Entry<T> = (u64, Option<Arc<T>>);

/// A snapshot of the directory, for one view.
#[derive(Debug, Clone, Default)]
pub struct DirectoryView {
    /// Every device, without its certificate (`cert_der` is empty), in no order.
    pub devices: Vec<Arc<DeviceRecord>>,
    /// The operator's labels of each device that has some.
    pub labels: HashMap<DeviceId, Arc<Labels>>,
    /// Pairing requests pending approval and not expired, without CSR or certificate.
    pub pending: Vec<Arc<RequestRecord>>,
}

#[derive(Debug, Default)]
struct Tables {
    devices: HashMap<DeviceId, Entry<DeviceRecord>>,
    labels: HashMap<DeviceId, Entry<Labels>>,
    /// Requests pending approval; a request that left that state stays as a tombstone until
    /// it would have expired (a late copy of its pending state is then refused as expired).
    requests: HashMap<String, (u64, u64, Option<Arc<RequestRecord>>)>,
    /// Tombstones among `requests` when they were last pruned.
    pruned_at: usize,
}

/// The directory (see the module documentation).
#[derive(Debug, Default)]
pub struct Directory {
    tables: RwLock<Tables>,
}

fn newer<T>(entry: Option<&Entry<T>>, rev: u64) -> bool {
    entry.is_none_or(|(r, _)| *r <= rev)
}

fn without_cert(d: &DeviceRecord) -> DeviceRecord {
    DeviceRecord {
        cert_der: Vec::new(),
        ..d.clone()
    }
}

fn without_keys(r: &RequestRecord) -> RequestRecord {
    RequestRecord {
        csr_der: Vec::new(),
        cert_der: None,
        ..r.clone()
    }
}

impl Directory {
    /// Applies a committed change at `now_ms` (changes that are not the directory's are
    /// ignored).
    pub fn apply(&self, change: &Revision<TrustChange>, now_ms: u64) {
        let ours = matches!(
            change.change,
            TrustChange::Device(..) | TrustChange::Labels(..) | TrustChange::Request(_)
        );
        if !ours {
            return;
        }
        let rev = change.rev;
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        match &change.change {
            TrustChange::Device(id, record) => {
                if newer(t.devices.get(id), rev) {
                    let kept = record.as_ref().map(|d| Arc::new(without_cert(d)));
                    t.devices.insert(*id, (rev, kept));
                }
                // A removed device's labels go with it, in the same commit.
                if record.is_none() && newer(t.labels.get(id), rev) {
                    t.labels.insert(*id, (rev, None));
                }
            }
            TrustChange::Labels(LabelOwner::Device(id), labels) if newer(t.labels.get(id), rev) => {
                let kept = labels.as_ref().filter(|l| !l.is_empty()).cloned();
                t.labels.insert(*id, (rev, kept.map(Arc::new)));
            }
            TrustChange::Request(r) => {
                let id = &r.request_id;
                if t.requests.get(id).is_some_and(|(at, _, _)| *at > rev) {
                    return;
                }
                let pending = r.state == RequestState::PendingApproval && r.expires_at_ms > now_ms;
                let kept = pending.then(|| Arc::new(without_keys(r)));
                t.requests.insert(id.clone(), (rev, r.expires_at_ms, kept));
                t.prune_requests(now_ms);
            }
            _ => {}
        }
    }

    /// Loads what the store holds at start-up, at revision 0: a change the watch delivered
    /// meanwhile is newer and stays.
    pub fn load(
        &self,
        devices: Vec<DeviceRecord>,
        labels: Vec<(LabelOwner, Labels)>,
        requests: Vec<RequestRecord>,
        now_ms: u64,
    ) {
        let mut t = self.tables.write().unwrap_or_else(|e| e.into_inner());
        for d in devices {
            t.devices
                .entry(d.device_id)
                .or_insert_with(|| (0, Some(Arc::new(without_cert(&d)))));
        }
        for (owner, l) in labels {
            if let LabelOwner::Device(id) = owner {
                t.labels.entry(id).or_insert((0, Some(Arc::new(l))));
            }
        }
        for r in requests {
            if r.state == RequestState::PendingApproval && r.expires_at_ms > now_ms {
                let kept = Arc::new(without_keys(&r));
                t.requests
                    .entry(r.request_id.clone())
                    .or_insert((0, r.expires_at_ms, Some(kept)));
            }
        }
    }

    /// One device, without its certificate.
    pub fn device(&self, id: &DeviceId) -> Option<Arc<DeviceRecord>> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        t.devices.get(id).and_then(|(_, d)| d.clone())
    }

    /// One device's labels (none: empty).
    pub fn labels_of(&self, id: &DeviceId) -> Labels {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        t.labels
            .get(id)
            .and_then(|(_, l)| l.as_deref().cloned())
            .unwrap_or_default()
    }

    /// The requests pending approval and not expired at `now_ms`.
    pub fn pending(&self, now_ms: u64) -> Vec<Arc<RequestRecord>> {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        t.pending(now_ms).collect()
    }

    /// What views read now (`now_ms`: requests that expired by then are left out).
    pub fn view(&self, now_ms: u64) -> DirectoryView {
        let t = self.tables.read().unwrap_or_else(|e| e.into_inner());
        DirectoryView {
            devices: t.devices.values().filter_map(|(_, d)| d.clone()).collect(),
            labels: t
                .labels
                .iter()
                .filter_map(|(id, (_, l))| Some((*id, l.clone()?)))
                .collect(),
            pending: t.pending(now_ms).collect(),
        }
    }
}

impl Tables {
    fn pending(&self, now_ms: u64) -> impl Iterator<Item = Arc<RequestRecord>> + '_ {
        self.requests
            .values()
            .filter(move |(_, expires, _)| *expires > now_ms)
            .filter_map(|(_, _, r)| r.clone())
    }

    /// Drops request entries past their expiry once their number has doubled since the last
    /// prune, so the table stays the size of the requests still pending (amortised O(1)).
    fn prune_requests(&mut self, now_ms: u64) {
        if self.requests.len() < 64 || self.requests.len() < 2 * self.pruned_at {
            return;
        }
        self.requests.retain(|_, (_, expires, _)| *expires > now_ms);
        self.pruned_at = self.requests.len();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{DeviceTrust, RequestState};

    fn device(n: u8) -> DeviceRecord {
        DeviceRecord {
            device_id: DeviceId::from_bytes([n; anchorage_mesh::identity::DEVICE_ID_LEN]),
            name: format!("node-{n}"),
            platform: "linux-x86_64".into(),
            trust: DeviceTrust::Trusted,
            cert_serial: vec![n],
            cert_der: vec![7; 500],
            cert_not_before_ms: 0,
            cert_not_after_ms: 10_000,
            paired_at_ms: 0,
            revoked_at_ms: None,
            revoked_reason: None,
            rotation_pending: false,
        }
    }

    fn at(rev: u64, change: TrustChange) -> Revision<TrustChange> {
        Revision {
            rev,
            change,
            remote: false,
        }
    }

    fn request(id: &str, state: RequestState, expires_at_ms: u64) -> RequestRecord {
        RequestRecord {
            request_id: id.into(),
            code_id: "ABCD".into(),
            device_id: DeviceId::from_bytes([9; anchorage_mesh::identity::DEVICE_ID_LEN]),
            device_name: "node-9".into(),
            platform: "linux".into(),
            csr_der: vec![1; 300],
            sas: "12-34".into(),
            keys: anchorage_mesh::pairing::AfterKeys {
                result: [1; 32],
                resume: [2; 32],
            },
            state,
            requested_at_ms: 0,
            expires_at_ms,
            cert_der: None,
            decided_by: None,
            decided_at_ms: None,
            reason: None,
        }
    }

    #[test]
    fn keeps_devices_without_certificates_and_newest_revision_wins() {
        let dir = Directory::default();
        let d = device(1);
        let mut renamed = d.clone();
        renamed.name = "renamed".into();
        dir.apply(&at(5, TrustChange::Device(d.device_id, Some(renamed))), 0);
        // An older write arriving late (another anchor's, through the watch) is ignored.
        dir.apply(&at(3, TrustChange::Device(d.device_id, Some(d.clone()))), 0);
        let view = dir.view(0);
        assert_eq!(view.devices.len(), 1);
        assert_eq!(view.devices[0].name, "renamed");
        assert!(view.devices[0].cert_der.is_empty());
        // The store's state at start-up does not overwrite what the watch delivered.
        dir.load(vec![d.clone()], Vec::new(), Vec::new(), 0);
        assert_eq!(dir.view(0).devices[0].name, "renamed");
        // A removal takes the labels with it, and a late older write does not bring it back.
        let labels = Labels::from([("site".to_string(), "lab".to_string())]);
        let owner = LabelOwner::Device(d.device_id);
        dir.apply(&at(6, TrustChange::Labels(owner, Some(labels.clone()))), 0);
        assert_eq!(dir.view(0).labels[&d.device_id].as_ref(), &labels);
        dir.apply(&at(7, TrustChange::Device(d.device_id, None)), 0);
        dir.apply(&at(6, TrustChange::Device(d.device_id, Some(d.clone()))), 0);
        let view = dir.view(0);
        assert!(view.devices.is_empty());
        assert!(view.labels.is_empty());
    }

    #[test]
    fn holds_only_pending_requests_until_they_expire() {
        let dir = Directory::default();
        dir.apply(
            &at(
                1,
                TrustChange::Request(request("a", RequestState::PendingApproval, 100)),
            ),
            0,
        );
        dir.apply(
            &at(
                2,
                TrustChange::Request(request("b", RequestState::PendingApproval, 900)),
            ),
            0,
        );
        let view = dir.view(50);
        assert_eq!(view.pending.len(), 2);
        assert!(view.pending.iter().all(|r| r.csr_der.is_empty()));
        assert_eq!(dir.view(200).pending.len(), 1, "a expired");
        dir.apply(
            &at(
                4,
                TrustChange::Request(request("b", RequestState::Approved, 900)),
            ),
            0,
        );
        // The pending state again, from a late watch event: older, ignored.
        dir.apply(
            &at(
                2,
                TrustChange::Request(request("b", RequestState::PendingApproval, 900)),
            ),
            0,
        );
        assert!(dir.view(200).pending.is_empty(), "b was approved");
    }

    #[test]
    fn request_tombstones_are_pruned_after_expiry() {
        let dir = Directory::default();
        for i in 0..1_000u64 {
            let id = format!("r{i}");
            dir.apply(
                &at(
                    i,
                    TrustChange::Request(request(&id, RequestState::Completed, i)),
                ),
                i + 1,
            );
        }
        let t = dir.tables.read().unwrap();
        assert!(t.requests.len() < 200, "{} entries kept", t.requests.len());
    }
}
