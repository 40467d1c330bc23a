//! Quota decisions, pure: who may hold how many vCPU cores of which family, from where.
//!
//! A deployment of `n` instances holds ceil(surge × n) × cores of its instance type's family
//! (the surge reserve lets a rolling update run, as on Azure). It is admitted on the namespace's
//! dedicated quota when that covers it, else — if it acknowledged `useSharedQuota` — on the
//! cluster's shared pool, else it waits. Once admitted it stays on its source; growing beyond what
//! the source allows is capped.

use crate::api::QuotaSource;
use std::collections::BTreeMap;

/// Cores held by one deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Holding {
    pub namespace: String,
    pub name: String,
    pub family: String,
    pub cores: i64,
    /// GPUs held (counted against the namespace's optional GPU total).
    pub gpus: i64,
    pub source: QuotaSource,
}

/// What a deployment asks for.
#[derive(Clone, Debug, PartialEq)]
pub struct Request {
    pub family: String,
    pub cores_per_instance: i64,
    pub gpus_per_instance: i64,
    pub instances: i32,
    pub surge_factor: f64,
    pub use_shared_quota: bool,
    /// Its current admission: source and the instances it was admitted with.
    pub admitted: Option<(QuotaSource, i32)>,
}

/// The quota around a deployment, itself excluded.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Ledger {
    /// The namespace's dedicated limits per family; `None` when the namespace has no
    /// ComputeQuota (dedicated quota is then not enforced).
    pub dedicated_limits: Option<BTreeMap<String, i64>>,
    /// Dedicated holdings of the other deployments of the namespace.
    pub dedicated_used: BTreeMap<String, i64>,
    /// The namespace's optional limit on GPUs held on dedicated quota.
    pub dedicated_gpu_limit: Option<i64>,
    /// GPUs the other deployments of the namespace hold on dedicated quota.
    pub dedicated_gpus_used: i64,
    /// The shared pool per family.
    pub shared_pool: BTreeMap<String, i64>,
    /// Shared holdings of every other deployment of the cluster.
    pub shared_used: BTreeMap<String, i64>,
}

/// The outcome for one deployment.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// Admitted on `source` with `instances` (≤ requested; fewer means capped by quota) holding
    /// `cores`.
    Admitted {
        source: QuotaSource,
        instances: i32,
        cores: i64,
        gpus: i64,
        capped: bool,
    },
    /// Not admitted: the numbers for the message.
    Exceeded {
        family: String,
        needed: i64,
        dedicated_available: Option<i64>,
        shared_available: Option<i64>,
        /// Set when the namespace's GPU total is what is short: (needed, available).
        gpus_short: Option<(i64, i64)>,
    },
}

/// Cores held by `instances` instances.
pub fn reserve(instances: i32, cores_per_instance: i64, surge_factor: f64) -> i64 {
    if instances <= 0 {
        return 0;
    }
    // The epsilon keeps 1.2 × 5 = 6.000000000000001 from rounding up to 7.
    let with_surge = (f64::from(instances) * surge_factor - 1e-9).ceil() as i64;
    with_surge.max(i64::from(instances)) * cores_per_instance
}

impl Ledger {
    fn available(&self, source: QuotaSource, family: &str) -> Option<i64> {
        match source {
            QuotaSource::Dedicated => {
                let limits = self.dedicated_limits.as_ref()?;
                let limit = limits.get(family).copied().unwrap_or(0);
                Some((limit - self.dedicated_used.get(family).copied().unwrap_or(0)).max(0))
            }
            QuotaSource::Shared => {
                let pool = self.shared_pool.get(family).copied().unwrap_or(0);
                Some((pool - self.shared_used.get(family).copied().unwrap_or(0)).max(0))
            }
        }
    }

    /// Decides admission and the instance count allowed.
    pub fn decide(&self, req: &Request) -> Decision {
        let gpus_fit = |n: i32| match self.dedicated_gpu_limit {
            None => true,
            Some(limit) => {
                reserve(n, req.gpus_per_instance, req.surge_factor)
                    <= limit - self.dedicated_gpus_used
            }
        };
        let fits = |source: QuotaSource, n: i32| {
            let cores_fit = match self.available(source, &req.family) {
                None => true,
                Some(avail) => reserve(n, req.cores_per_instance, req.surge_factor) <= avail,
            };
            cores_fit && (source == QuotaSource::Shared || gpus_fit(n))
        };
        let admitted = |source, n: i32, capped| Decision::Admitted {
            source,
            instances: n,
            cores: reserve(n, req.cores_per_instance, req.surge_factor),
            gpus: reserve(n, req.gpus_per_instance, req.surge_factor),
            capped,
        };
        if let Some((source, before)) = req.admitted {
            if fits(source, req.instances) {
                return admitted(source, req.instances, false);
            }
            // Grow only as far as the source allows; never below what was admitted before.
            let mut n = before.min(req.instances).max(0);
            while n < req.instances && fits(source, n + 1) {
                n += 1;
            }
            return admitted(source, n, n < req.instances);
        }
        if fits(QuotaSource::Dedicated, req.instances) {
            return admitted(QuotaSource::Dedicated, req.instances, false);
        }
        if req.use_shared_quota && fits(QuotaSource::Shared, req.instances) {
            return admitted(QuotaSource::Shared, req.instances, false);
        }
        Decision::Exceeded {
            family: req.family.clone(),
            needed: reserve(req.instances, req.cores_per_instance, req.surge_factor),
            dedicated_available: self.available(QuotaSource::Dedicated, &req.family),
            shared_available: self.available(QuotaSource::Shared, &req.family),
            gpus_short: (!gpus_fit(req.instances)).then(|| {
                let limit = self.dedicated_gpu_limit.unwrap_or(0);
                (
                    reserve(req.instances, req.gpus_per_instance, req.surge_factor),
                    (limit - self.dedicated_gpus_used).max(0),
                )
            }),
        }
    }

    /// Adds other deployments' holdings to the ledger.
    pub fn hold(&mut self, holding: &Holding) {
        if holding.source == QuotaSource::Dedicated {
            self.dedicated_gpus_used += holding.gpus;
        }
        let map = match holding.source {
            QuotaSource::Dedicated => &mut self.dedicated_used,
            QuotaSource::Shared => &mut self.shared_used,
        };
        *map.entry(holding.family.clone()).or_default() += holding.cores;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(instances: i32, shared: bool) -> Request {
        Request {
            family: "A100".into(),
            cores_per_instance: 24,
            gpus_per_instance: 1,
            instances,
            surge_factor: 1.2,
            use_shared_quota: shared,
            admitted: None,
        }
    }

    fn ledger(limit: Option<i64>, used: i64, pool: i64) -> Ledger {
        Ledger {
            dedicated_limits: limit.map(|l| BTreeMap::from([("A100".to_owned(), l)])),
            dedicated_used: BTreeMap::from([("A100".to_owned(), used)]),
            shared_pool: BTreeMap::from([("A100".to_owned(), pool)]),
            shared_used: BTreeMap::new(),
            dedicated_gpu_limit: None,
            dedicated_gpus_used: 0,
        }
    }

    #[test]
    fn surge_reserve_is_azures_ceil_of_1_2() {
        assert_eq!(reserve(1, 24, 1.2), 48); // ceil(1.2) = 2
        assert_eq!(reserve(2, 24, 1.2), 72); // ceil(2.4) = 3
        assert_eq!(reserve(5, 24, 1.2), 144); // 6, not 7
        assert_eq!(reserve(0, 24, 1.2), 0);
        assert_eq!(reserve(3, 24, 1.0), 72);
    }

    #[test]
    fn dedicated_when_it_fits_shared_when_acknowledged_else_exceeded() {
        let l = ledger(Some(96), 0, 96);
        assert!(matches!(
            l.decide(&req(2, false)),
            Decision::Admitted {
                source: QuotaSource::Dedicated,
                cores: 72,
                ..
            }
        ));
        let l = ledger(Some(96), 48, 96);
        assert!(matches!(
            l.decide(&req(2, true)),
            Decision::Admitted {
                source: QuotaSource::Shared,
                ..
            }
        ));
        assert_eq!(
            l.decide(&req(2, false)),
            Decision::Exceeded {
                family: "A100".into(),
                needed: 72,
                dedicated_available: Some(48),
                shared_available: Some(96),
                gpus_short: None,
            }
        );
    }

    #[test]
    fn the_gpu_total_limits_dedicated_admission() {
        let mut l = ledger(Some(1000), 0, 0);
        l.dedicated_gpu_limit = Some(4);
        l.dedicated_gpus_used = 2;
        // 2 instances hold ceil(2.4) = 3 GPUs; 2 are left.
        match l.decide(&req(2, false)) {
            Decision::Exceeded { gpus_short, .. } => assert_eq!(gpus_short, Some((3, 2))),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            l.decide(&req(1, false)),
            Decision::Admitted { gpus: 2, .. }
        ));
    }

    #[test]
    fn no_compute_quota_means_dedicated_is_not_enforced() {
        let l = ledger(None, 0, 0);
        assert!(matches!(
            l.decide(&req(50, false)),
            Decision::Admitted {
                source: QuotaSource::Dedicated,
                capped: false,
                ..
            }
        ));
    }

    #[test]
    fn scaling_up_is_capped_at_what_fits() {
        // 200 cores: 6 instances hold ceil(7.2) × 24 = 192; 7 would hold ceil(8.4) × 24 = 216.
        let l = ledger(Some(200), 0, 0);
        let mut r = req(8, false);
        r.admitted = Some((QuotaSource::Dedicated, 4));
        match l.decide(&r) {
            Decision::Admitted {
                instances,
                capped,
                cores,
                ..
            } => {
                assert_eq!((instances, capped), (6, true));
                assert_eq!(cores, 192);
            }
            other => panic!("{other:?}"),
        }
    }
}
