//! The store conformance suite against a real three-member etcd cluster (feature `etcd`),
//! every check on its own key prefix of one cluster.

#![cfg(feature = "etcd")]
#![allow(clippy::unwrap_used)]

use anchorage_daemon::store::conformance::{self, Backend};
use anchorage_daemon::store::{EtcdStore, StoreError, Stores};
use anchorage_sim::etcd::EtcdCluster;

/// One check of the suite.
type Check = fn(&dyn Backend);

struct OnEtcd {
    endpoints: Vec<String>,
    prefix: String,
}

impl Backend for OnEtcd {
    fn open(&self) -> Result<Stores, StoreError> {
        Ok(Stores::from_backend(EtcdStore::connect(
            &self.endpoints,
            &self.prefix,
        )?))
    }
}

#[test]
fn the_store_conformance_suite_passes_on_a_three_member_etcd_cluster() {
    let Some(cluster) = EtcdCluster::start(3) else {
        return;
    };
    let checks: [(&str, Check); 14] = [
        (
            "write_drop_reopen_check",
            conformance::write_drop_reopen_check,
        ),
        (
            "aborted_transactions_write_nothing",
            conformance::aborted_transactions_write_nothing,
        ),
        (
            "concurrent_read_modify_writes_lose_nothing",
            conformance::concurrent_read_modify_writes_lose_nothing,
        ),
        (
            "a_code_is_consumed_once",
            conformance::a_code_is_consumed_once,
        ),
        (
            "watchers_see_each_commit_in_order",
            conformance::watchers_see_each_commit_in_order,
        ),
        (
            "removing_a_device_removes_its_runtime_records",
            conformance::removing_a_device_removes_its_runtime_records,
        ),
        (
            "labels_are_kept_per_device_and_go_with_it",
            conformance::labels_are_kept_per_device_and_go_with_it,
        ),
        (
            "audit_is_newest_first_filtered_and_bounded",
            conformance::audit_is_newest_first_filtered_and_bounded,
        ),
        (
            "invocations_load_query_and_prune",
            conformance::invocations_load_query_and_prune,
        ),
        (
            "batches_load_query_and_prune",
            conformance::batches_load_query_and_prune,
        ),
        (
            "token_limits_and_uses_are_kept_and_watched",
            conformance::token_limits_and_uses_are_kept_and_watched,
        ),
        (
            "the_writer_keeps_order_and_barriers_wait",
            conformance::the_writer_keeps_order_and_barriers_wait,
        ),
        (
            "the_policy_is_versioned_kept_and_watched",
            conformance::the_policy_is_versioned_kept_and_watched,
        ),
        (
            "write_drop_reopen_check (again, same prefix)",
            conformance::write_drop_reopen_check,
        ),
    ];
    for (i, (name, check)) in checks.iter().enumerate() {
        eprintln!("conformance on etcd: {name}");
        check(&OnEtcd {
            endpoints: cluster.endpoints(),
            prefix: format!("/conformance/{i}"),
        });
    }
}
