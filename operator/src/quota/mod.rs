//! Quota admission, expiry and cost: the I/O around the pure ledger and accrual.
//!
//! Admission decisions are serialized by one lock in the operator (and, across replicas, by the
//! leader lease) and read every holding fresh from the API server, so concurrent deployments can
//! never over-allocate. A deployment's holding is recorded in its own status (`quotaSource`,
//! `instanceFamily`, `reservedCores`) before anything is built for it.

pub mod cost;
pub mod ledger;
pub mod summary;

use crate::api::{
    ComputeQuota, LlamaDeployment, LlamaDeploymentStatus, Phase, QuotaSource, RetiredDeployment,
};
use crate::config::OperatorConfig;
use crate::controller::conditions;
use crate::error::Error;
use crate::validate::Plan;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, ListParams, Patch, PatchParams};
use kube::{Client, ResourceExt};
use ledger::{Decision, Holding, Ledger, Request, reserve};
use std::collections::BTreeMap;

pub const QUOTA_EXCEEDED: &str = "QuotaExceeded";
pub const SCALE_LIMITED: &str = "ScaleLimitedByQuota";
const FIELD_MANAGER: &str = crate::controller::FIELD_MANAGER;

/// Serializes quota decisions within this operator process.
#[derive(Debug, Default)]
pub struct QuotaKeeper {
    lock: tokio::sync::Mutex<()>,
}

/// What a deployment holds, from its status; none while it is being deleted.
pub fn holding_of(ld: &LlamaDeployment) -> Option<Holding> {
    if ld.metadata.deletion_timestamp.is_some() {
        return None;
    }
    let s = ld.status.as_ref()?;
    Some(Holding {
        namespace: ld.namespace().unwrap_or_default(),
        name: ld.name_any(),
        family: s.instance_family.clone()?,
        cores: s.reserved_cores?,
        gpus: s.reserved_gpus.unwrap_or(0),
        source: s.quota_source?,
    })
}

/// The outcome of admission, and the status to build on.
pub struct Admission {
    pub decision: Decision,
    pub status: LlamaDeploymentStatus,
    /// Whether the status changed (and was written).
    pub written: bool,
}

impl QuotaKeeper {
    /// Admits `ld` for `plan.instances`, or says why not. Records the decision in its status.
    pub async fn admit(
        &self,
        client: &Client,
        ld: &LlamaDeployment,
        plan: &Plan,
        config: &OperatorConfig,
        now: Timestamp,
    ) -> Result<Admission, Error> {
        let family = plan.instance.family.clone();
        let cores = i64::from(plan.instance.cores);
        let want = reserve(plan.instances, cores, config.surge_factor);
        let status = ld.status.clone().unwrap_or_default();
        let limited =
            conditions::get(&status.conditions, SCALE_LIMITED).is_some_and(|c| c.status == "True");
        if let (Some(source), Some(held)) = (status.quota_source, status.reserved_cores)
            && status.instance_family.as_deref() == Some(family.as_str())
            && held == want
            && !limited
        {
            let decision = Decision::Admitted {
                source,
                instances: plan.instances,
                cores: held,
                gpus: status.reserved_gpus.unwrap_or(0),
                capped: false,
            };
            return Ok(Admission {
                decision,
                status,
                written: false,
            });
        }

        let _guard = self.lock.lock().await;
        let ns = ld.namespace().unwrap_or_default();
        let name = ld.name_any();
        let quotas = Api::<ComputeQuota>::namespaced(client.clone(), &ns)
            .list(&ListParams::default())
            .await?
            .items;
        // Without a ComputeQuota dedicated quota is not enforced: no need to read the others.
        let in_namespace = if quotas.is_empty() {
            Vec::new()
        } else {
            let lds: Api<LlamaDeployment> = Api::namespaced(client.clone(), &ns);
            lds.list(&ListParams::default()).await?.items
        };
        let fresh = in_namespace
            .iter()
            .find(|o| o.name_any() == name)
            .cloned()
            .unwrap_or_else(|| ld.clone());

        let mut ledger = Ledger {
            shared_pool: config.shared_quota.clone(),
            ..Default::default()
        };
        if !quotas.is_empty() {
            let mut limits = BTreeMap::new();
            for q in &quotas {
                for l in &q.spec.limits {
                    *limits.entry(l.family.clone()).or_insert(0) += l.cores;
                }
            }
            ledger.dedicated_limits = Some(limits);
            let gpu_limits: Vec<i64> = quotas.iter().filter_map(|q| q.spec.gpus).collect();
            if !gpu_limits.is_empty() {
                ledger.dedicated_gpu_limit = Some(gpu_limits.iter().sum());
            }
        }
        for h in in_namespace
            .iter()
            .filter(|o| o.name_any() != name)
            .filter_map(holding_of)
        {
            if h.source == QuotaSource::Dedicated {
                ledger.hold(&h);
            }
        }
        if !config.shared_quota.is_empty() {
            let all = Api::<LlamaDeployment>::all(client.clone())
                .list(&ListParams::default())
                .await?
                .items;
            for h in all.iter().filter_map(holding_of) {
                if h.source == QuotaSource::Shared && !(h.namespace == ns && h.name == name) {
                    ledger.hold(&h);
                }
            }
        }
        let mut status = fresh.status.clone().unwrap_or_default();
        let admitted = status
            .quota_source
            .zip(status.instances.as_ref().map(|i| i.desired));
        let decision = ledger.decide(&Request {
            family: family.clone(),
            cores_per_instance: cores,
            gpus_per_instance: i64::from(plan.instance.gpu_count),
            instances: plan.instances,
            surge_factor: config.surge_factor,
            use_shared_quota: ld.spec.quota.use_shared_quota,
            admitted: admitted
                .filter(|_| status.instance_family.as_deref() == Some(family.as_str())),
        });
        let generation = ld.metadata.generation;
        match &decision {
            Decision::Admitted {
                source,
                instances,
                cores: held,
                gpus,
                capped,
            } => {
                status.reserved_gpus = Some(*gpus);
                status.quota_source = Some(*source);
                status.instance_family = Some(family.clone());
                status.reserved_cores = Some(*held);
                if *source == QuotaSource::Shared && status.expires_at.is_none() {
                    let created = ld
                        .metadata
                        .creation_timestamp
                        .as_ref()
                        .map(|t| t.0)
                        .unwrap_or(now);
                    let hours = SignedDuration::from_secs_f64(config.shared_quota_hours * 3600.0);
                    status.expires_at = Some(Time(created.checked_add(hours).unwrap_or(created)));
                }
                if *source == QuotaSource::Dedicated {
                    status.expires_at = None;
                }
                conditions::set(
                    &mut status.conditions,
                    QUOTA_EXCEEDED,
                    false,
                    "Admitted",
                    format!(
                        "holding {held} vCPU cores of {family} on {} quota",
                        source_name(*source)
                    ),
                    generation,
                    now,
                );
                if *capped {
                    conditions::set(
                        &mut status.conditions,
                        SCALE_LIMITED,
                        true,
                        "QuotaLimit",
                        format!(
                            "{} {} is capped at {instances}: {family} quota has room for no more (ceil({} × instances) × {cores} cores each)",
                            if ld
                                .spec
                                .compute
                                .autoscaling_bounds(ld.annotations())
                                .is_some()
                            {
                                "the autoscaler's instance count"
                            } else {
                                "spec.compute.instanceCount"
                            },
                            plan.instances,
                            config.surge_factor
                        ),
                        generation,
                        now,
                    );
                } else if conditions::get(&status.conditions, SCALE_LIMITED).is_some() {
                    conditions::set(
                        &mut status.conditions,
                        SCALE_LIMITED,
                        false,
                        "WithinQuota",
                        format!("{instances} instances fit the quota"),
                        generation,
                        now,
                    );
                }
            }
            Decision::Exceeded {
                family,
                needed,
                dedicated_available,
                shared_available,
                gpus_short,
            } => {
                let mut message = exceeded_message(
                    family,
                    *needed,
                    *dedicated_available,
                    *shared_available,
                    ld.spec.quota.use_shared_quota,
                    config,
                    plan,
                );
                if let Some((need, have)) = gpus_short {
                    message = format!(
                        "GPU quota exceeded: needs {need} GPUs, {have} available under the namespace's ComputeQuota spec.gpus; {message}"
                    );
                }
                conditions::set(
                    &mut status.conditions,
                    QUOTA_EXCEEDED,
                    true,
                    "InsufficientQuota",
                    message.clone(),
                    generation,
                    now,
                );
                conditions::set(
                    &mut status.conditions,
                    conditions::READY,
                    false,
                    QUOTA_EXCEEDED,
                    message,
                    generation,
                    now,
                );
                status.phase = Some(Phase::QuotaExceeded);
                status.observed_generation = generation;
            }
        }
        conditions::set_kstatus(
            &mut status.conditions,
            status.phase == Some(Phase::Failed),
            generation,
            now,
        );
        let written = fresh.status.as_ref() != Some(&status);
        if written {
            write_status(client, &ns, &name, &status).await?;
        }
        // The namespace's quota objects show the new usage.
        let mut holders: Vec<Holding> = in_namespace
            .iter()
            .filter(|o| o.name_any() != name)
            .filter_map(holding_of)
            .collect();
        let mut me = fresh.clone();
        me.status = Some(status.clone());
        holders.extend(holding_of(&me));
        let costs: Vec<(f64, f64)> = in_namespace
            .iter()
            .filter(|o| o.name_any() != name)
            .chain(std::iter::once(&me))
            .filter_map(|o| {
                o.status
                    .as_ref()
                    .map(|s| (s.core_hours.unwrap_or(0.0), s.estimated_cost.unwrap_or(0.0)))
            })
            .collect();
        write_quota_statuses(
            client,
            &quotas,
            &holders,
            &costs,
            None,
            &plan.instance.currency,
        )
        .await?;
        Ok(Admission {
            decision,
            status,
            written,
        })
    }

    /// Recomputes the namespace's ComputeQuota statuses, adding the final totals of a deployment
    /// being deleted (`retired`, counted once by UID). Serialized with admissions.
    pub async fn refresh(
        &self,
        client: &Client,
        ns: &str,
        retired: Option<&RetiredDeployment>,
        currency: &str,
    ) -> Result<(), Error> {
        let _guard = self.lock.lock().await;
        let quotas = Api::<ComputeQuota>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items;
        if quotas.is_empty() {
            return Ok(());
        }
        let lds = Api::<LlamaDeployment>::namespaced(client.clone(), ns)
            .list(&ListParams::default())
            .await?
            .items;
        let holders: Vec<Holding> = lds.iter().filter_map(holding_of).collect();
        let costs: Vec<(f64, f64)> = lds
            .iter()
            .filter(|o| o.metadata.deletion_timestamp.is_none())
            .filter_map(|o| {
                o.status
                    .as_ref()
                    .map(|s| (s.core_hours.unwrap_or(0.0), s.estimated_cost.unwrap_or(0.0)))
            })
            .collect();
        write_quota_statuses(client, &quotas, &holders, &costs, retired, currency).await
    }
}

fn source_name(source: QuotaSource) -> &'static str {
    match source {
        QuotaSource::Dedicated => "dedicated",
        QuotaSource::Shared => "shared",
    }
}

fn exceeded_message(
    family: &str,
    needed: i64,
    dedicated: Option<i64>,
    shared: Option<i64>,
    use_shared: bool,
    config: &OperatorConfig,
    plan: &Plan,
) -> String {
    let dedicated = dedicated.map_or("unlimited".to_owned(), |d| d.to_string());
    let shared = shared.unwrap_or(0);
    let how = format!(
        "ceil({} × {} instances) × {} cores",
        config.surge_factor, plan.instances, plan.instance.cores
    );
    let option = if use_shared {
        format!("the shared pool has {shared} cores of {family} available, too few as well")
    } else {
        format!(
            "set spec.quota.useSharedQuota: true to use the shared pool ({shared} cores of {family} available; a deployment on shared quota is deleted {} hours after creation)",
            config.shared_quota_hours
        )
    };
    format!(
        "quota exceeded for {family}: needs {needed} vCPU cores ({how}), {dedicated} available in the namespace's dedicated quota (ComputeQuota); {option}; or raise the ComputeQuota, or lower spec.compute.instanceCount"
    )
}

async fn write_status(
    client: &Client,
    ns: &str,
    name: &str,
    status: &LlamaDeploymentStatus,
) -> Result<(), Error> {
    let api: Api<LlamaDeployment> = Api::namespaced(client.clone(), ns);
    let patch = serde_json::json!({
        "apiVersion": "llama-operator.io/v1alpha1", "kind": "LlamaDeployment", "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

async fn write_quota_statuses(
    client: &Client,
    quotas: &[ComputeQuota],
    holders: &[Holding],
    costs: &[(f64, f64)],
    retired: Option<&RetiredDeployment>,
    currency: &str,
) -> Result<(), Error> {
    for q in quotas {
        let ns = q.namespace().unwrap_or_default();
        let status = summary::quota_status(q, holders, costs, retired, currency);
        if q.status.as_ref() == Some(&status) {
            continue;
        }
        let api: Api<ComputeQuota> = Api::namespaced(client.clone(), &ns);
        let patch = serde_json::json!({
            "apiVersion": "llama-operator.io/v1alpha1", "kind": "ComputeQuota", "status": status,
        });
        api.patch_status(
            &q.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(())
}
