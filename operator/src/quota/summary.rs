//! The status of a ComputeQuota: usage per family, and the namespace's cost totals. Pure.

use super::ledger::Holding;
use crate::api::{
    ComputeQuota, ComputeQuotaStatus, FamilyUsage, QuotaHolder, QuotaSource, RetiredDeployment,
};

/// How many deleted deployments a ComputeQuota's status remembers (`recentlyRetired`).
pub const RETIRED_KEPT: usize = 50;

/// The status `quota` should have.
///
/// `holders` are the namespace's quota holdings, `costs` the (core-hours, cost) totals of its
/// live deployments, and `retired` the final totals of a deployment being deleted. A deployment
/// already in `recentlyRetired` (by UID) is not added again: its deletion may be processed more
/// than once (a retried finalizer, or a reconcile that saw a stale cache).
pub fn quota_status(
    quota: &ComputeQuota,
    holders: &[Holding],
    costs: &[(f64, f64)],
    retired: Option<&RetiredDeployment>,
    currency: &str,
) -> ComputeQuotaStatus {
    let old = quota.status.clone().unwrap_or_default();
    let mut retired_hours = old.retired_core_hours.unwrap_or(0.0);
    let mut retired_cost = old.retired_cost.unwrap_or(0.0);
    let mut recently_retired = old.recently_retired.clone();
    if let Some(r) = retired.filter(|r| !recently_retired.iter().any(|o| o.uid == r.uid)) {
        retired_hours += r.core_hours;
        retired_cost += r.estimated_cost;
        recently_retired.push(r.clone());
        let excess = recently_retired.len().saturating_sub(RETIRED_KEPT);
        recently_retired.drain(..excess);
    }
    let dedicated = || {
        holders
            .iter()
            .filter(|h| h.source == QuotaSource::Dedicated)
    };
    let families = quota
        .spec
        .limits
        .iter()
        .map(|l| {
            let mine: Vec<&Holding> = dedicated().filter(|h| h.family == l.family).collect();
            let used: i64 = mine.iter().map(|h| h.cores).sum();
            FamilyUsage {
                family: l.family.clone(),
                limit: l.cores,
                used,
                available: (l.cores - used).max(0),
                holders: mine
                    .iter()
                    .map(|h| QuotaHolder {
                        name: h.name.clone(),
                        cores: h.cores,
                        source: Some(h.source),
                    })
                    .collect(),
            }
        })
        .collect();
    ComputeQuotaStatus {
        observed_generation: quota.metadata.generation,
        conditions: old.conditions,
        families,
        gpus_used: Some(dedicated().map(|h| h.gpus).sum()),
        core_hours: Some(retired_hours + costs.iter().map(|c| c.0).sum::<f64>()),
        estimated_cost: Some(retired_cost + costs.iter().map(|c| c.1).sum::<f64>()),
        currency: Some(currency.to_owned()),
        retired_core_hours: Some(retired_hours),
        retired_cost: Some(retired_cost),
        recently_retired,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn quota(yaml: &str) -> ComputeQuota {
        serde_yaml::from_str(yaml).expect("a ComputeQuota")
    }

    const QUOTA: &str = r#"
apiVersion: llama-operator.io/v1alpha1
kind: ComputeQuota
metadata: {name: default, namespace: team-a, generation: 3}
spec:
  limits: [{family: StandardNCADSA100v4Family, cores: 96}]
status:
  retiredCoreHours: 10.0
  retiredCost: 1.5
  recentlyRetired:
  - {name: old, uid: u-old, coreHours: 10.0, estimatedCost: 1.5}
"#;

    fn retired(uid: &str, hours: f64) -> RetiredDeployment {
        RetiredDeployment {
            name: format!("ld-{uid}"),
            uid: uid.into(),
            core_hours: hours,
            estimated_cost: hours / 10.0,
            retired_at: None,
        }
    }

    #[test]
    fn a_deletion_is_counted_once_however_often_it_is_processed() {
        let mut q = quota(QUOTA);
        let live = [(5.0, 0.5)];
        let r = retired("u-new", 120.0);
        let first = quota_status(&q, &[], &live, Some(&r), "USD");
        assert_eq!(first.retired_core_hours, Some(130.0));
        assert_eq!(first.retired_cost, Some(13.5));
        assert_eq!(first.core_hours, Some(135.0));
        assert_eq!(first.recently_retired.len(), 2);
        q.status = Some(first.clone());
        let second = quota_status(&q, &[], &live, Some(&r), "USD");
        assert_eq!(second, first);
    }

    #[test]
    fn only_the_newest_deletions_are_remembered_and_the_sums_keep_all() {
        let mut q = quota(QUOTA);
        for i in 0..RETIRED_KEPT + 5 {
            let r = retired(&format!("u{i}"), 1.0);
            q.status = Some(quota_status(&q, &[], &[], Some(&r), "USD"));
        }
        let st = q.status.expect("a status");
        assert_eq!(st.recently_retired.len(), RETIRED_KEPT);
        assert_eq!(st.recently_retired[0].uid, "u5");
        assert_eq!(
            st.recently_retired.last().map(|r| r.uid.as_str()),
            Some("u54")
        );
        assert_eq!(
            st.retired_core_hours,
            Some(10.0 + (RETIRED_KEPT + 5) as f64)
        );
    }

    #[test]
    fn usage_counts_dedicated_holders_of_each_family() {
        let q = quota(QUOTA);
        let hold = |name: &str, cores, source| Holding {
            namespace: "team-a".into(),
            name: name.into(),
            family: "StandardNCADSA100v4Family".into(),
            cores,
            gpus: 2,
            source,
        };
        let holders = [
            hold("a", 48, QuotaSource::Dedicated),
            hold("b", 24, QuotaSource::Shared),
        ];
        let st = quota_status(&q, &holders, &[], None, "USD");
        assert_eq!(st.families.len(), 1);
        assert_eq!(st.families[0].used, 48);
        assert_eq!(st.families[0].available, 48);
        assert_eq!(st.families[0].holders.len(), 1);
        assert_eq!(st.gpus_used, Some(2));
        assert_eq!(st.observed_generation, Some(3));
        assert_eq!(st.retired_core_hours, Some(10.0));
    }
}
