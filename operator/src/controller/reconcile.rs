//! One reconcile: dereference → validate → build → apply → prune → observe → status.

use super::Context;
use super::autoscaling;
use super::conditions;
use super::dereference;
use super::karpenter_status::{PoolProblem, pool_problem};
use super::observe::{
    DownloadProgress, Observed, Transition, download_failure, downloading_pod, load_failure,
    parse_download_progress, status_for, status_for_invalid,
};
use crate::api::{LlamaDeployment, LlamaDeploymentStatus, NodePoolProvider, QuotaSource};
use crate::build::{
    self, DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL, KWOK_PROVISIONER_LABEL, POOL_LABEL,
    endpoint_url, kwok_node, kwok_node_name, kwok_pool_indices, pool_id, selector_string,
};
use crate::error::Error;
use crate::quota::cost::{Accrued, accrue};
use crate::validate::{SpecError, validate};
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, DynamicObject, ListParams, LogParams, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{self, Event as Finalize, finalizer};
use kube::{Api, Resource, ResourceExt};
use serde::Serialize;
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};
use std::collections::BTreeSet;
use std::fmt::Debug;
use std::sync::Arc;
use std::time::Duration;

/// The one field manager for everything the operator applies.
pub const FIELD_MANAGER: &str = "llama-operator";
/// How often the `fetch-model` log is read again while the weights download.
const DOWNLOAD_PROGRESS_INTERVAL: Duration = Duration::from_secs(10);
/// How often a Karpenter pool short of nodes is looked at again.
const KARPENTER_PROVISIONING_INTERVAL: Duration = Duration::from_secs(10);
/// Log lines read from the end of the `fetch-model` log (progress lines are the frequent ones).
const DOWNLOAD_LOG_TAIL_LINES: i64 = 5;
/// The longest a reconcile waits for that log (the API server asks the kubelet for it).
const DOWNLOAD_LOG_TIMEOUT: Duration = Duration::from_secs(5);
/// Finalizer that releases node pools (cluster-scoped, out of garbage collection's reach).
pub const FINALIZER: &str = "llama-operator.io/node-pool";

#[tracing::instrument(skip_all, fields(namespace = %ld.namespace().unwrap_or_default(), name = %ld.name_any()))]
pub async fn reconcile(ld: Arc<LlamaDeployment>, ctx: Arc<Context>) -> Result<Action, Error> {
    let _timer = ctx.metrics.start();
    tracing::debug!("reconciling");
    let ns = ld
        .namespace()
        .ok_or_else(|| Error::Other("LlamaDeployment without namespace".into()))?;
    let api: Api<LlamaDeployment> = Api::namespaced(ctx.client.clone(), &ns);
    let name = ld.name_any();
    let result = finalizer(&api, FINALIZER, ld, |event| async {
        match event {
            Finalize::Apply(ld) => apply(&ld, &ctx, &ns).await,
            Finalize::Cleanup(ld) => cleanup(&ld, &ctx).await,
        }
    })
    .await
    .map_err(|err| match err {
        finalizer::Error::ApplyFailed(e) | finalizer::Error::CleanupFailed(e) => e,
        other => Error::Finalizer(other.to_string()),
    });
    if result.is_ok() {
        ctx.reconciled(&ns, &name);
    }
    result
}

async fn apply(ld: &LlamaDeployment, ctx: &Context, ns: &str) -> Result<Action, Error> {
    let original_ld = ld.clone();
    let client = &ctx.client;
    let config = ctx.config();
    let name = ld.name_any();

    // Dereference and validate: a spec the user must fix is reported, not retried.
    let refs = dereference::references(client, ld, ns).await?;
    let plan = match validate(ld, &config.catalog(), &refs) {
        Ok(plan) => plan,
        Err(spec_error) => {
            tracing::info!(reason = spec_error.reason(), "spec needs a fix");
            let (status, transitions) = status_for_invalid(ld, &spec_error, Timestamp::now());
            write_status(ctx, ld, ns, status, transitions).await?;
            return Ok(Action::await_change());
        }
    };
    let now = config.now();

    // Shared-quota deployments expire: warn ahead, delete at expiresAt.
    let mut expiry_warning = ld.status.as_ref().and_then(|s| s.expiry_warning_hours);
    let mut next_event: Option<Duration> = None;
    if let Some(status) = &ld.status
        && status.quota_source == Some(QuotaSource::Shared)
        && let Some(Time(expires)) = status.expires_at
    {
        if now >= expires {
            tracing::info!("shared-quota deployment expired; deleting");
            publish(
                ctx,
                ld,
                EventType::Warning,
                "Expired",
                "Delete",
                format!(
                    "deleted: it ran on shared quota, which ends {} hours after creation",
                    config.shared_quota_hours
                ),
            )
            .await;
            let api: Api<LlamaDeployment> = Api::namespaced(client.clone(), ns);
            api.delete(&name, &DeleteParams::default()).await?;
            return Ok(Action::await_change());
        }
        let left = expires.duration_since(now).as_secs_f64();
        let mut thresholds = config.expiry_warning_hours.clone();
        thresholds.sort_by(|a, b| b.total_cmp(a));
        if let Some(due) = thresholds.iter().copied().rfind(|h| left <= h * 3600.0)
            && expiry_warning.is_none_or(|last| due < last)
        {
            publish(ctx, ld, EventType::Warning, "ExpiringSoon", "Expire",
                format!("this deployment runs on shared quota and will be deleted at {expires} (in {:.1} hours)", left / 3600.0)).await;
            expiry_warning = Some(due);
        }
        let until_next = thresholds
            .iter()
            .map(|h| left - h * 3600.0)
            .filter(|s| *s > 0.0)
            .fold(left, f64::min);
        next_event = Some(Duration::from_secs_f64(until_next.max(0.5)));
    }

    // Autoscaling: the count the load calls for takes the place of spec.compute.instanceCount.
    let mut plan = plan;
    let scaling = autoscaling::evaluate(ctx, ld, ns).await?;
    if let Some(scaling) = &scaling {
        plan.instances = scaling.instances;
        if let Some(change) = &scaling.change {
            publish(
                ctx,
                ld,
                EventType::Normal,
                change.reason,
                "Autoscale",
                change.message.clone(),
            )
            .await;
        }
        // One event per silent instance, with the pod as its related object: events of the
        // same reason about the same object are merged into one series that keeps the first
        // note, so a second instance falling silent within the series' lifetime would
        // otherwise be reported under the first one's name.
        for pod in &scaling.newly_missing {
            let event = Event {
                type_: EventType::Warning,
                reason: "MetricsUnavailable".to_owned(),
                note: Some(format!(
                    "no metrics from {pod}: the autoscaler will not scale down while an \
                     instance does not answer"
                )),
                action: "Autoscale".to_owned(),
                secondary: Some(pod_reference(ns, pod)),
            };
            publish_event(ctx, ld, &event).await;
        }
    }

    // Quota: admitted (maybe capped) or waiting; nothing is built without it.
    let admission = ctx.quota.admit(client, ld, &plan, &config, now).await?;
    for (type_, event_reason) in [
        (crate::quota::QUOTA_EXCEEDED, true),
        (crate::quota::SCALE_LIMITED, true),
    ] {
        let before = ld
            .status
            .as_ref()
            .and_then(|s| conditions::get(&s.conditions, type_))
            .map(|c| (c.status.clone(), c.reason.clone()));
        let after = conditions::get(&admission.status.conditions, type_)
            .map(|c| (c.status.clone(), c.reason.clone(), c.message.clone()));
        if let Some((st, reason, message)) = after
            && before.as_ref().map(|b| (&b.0, &b.1)) != Some((&st, &reason))
            && event_reason
        {
            let kind = if st == "True" {
                EventType::Warning
            } else {
                EventType::Normal
            };
            publish(
                ctx,
                ld,
                kind,
                if st == "True" { type_ } else { &reason },
                "Admit",
                message,
            )
            .await;
        }
    }
    match admission.decision {
        crate::quota::ledger::Decision::Exceeded { .. } => return Ok(Action::await_change()),
        crate::quota::ledger::Decision::Admitted { instances, .. } => plan.instances = instances,
    }
    let mut view = ld.clone();
    view.status = Some(admission.status);
    let view_status = view.status.get_or_insert_with(Default::default);
    view_status.expiry_warning_hours = expiry_warning;
    view_status.autoscaling = scaling.as_ref().map(|s| s.status.clone());
    let ld = &view;
    let pool = pool_id(ns, &name, &plan);

    // Build (pure) and apply, in dependency order: the node pool, then the Secret and ConfigMap,
    // then the pods that need all three.
    let node_pools: Api<DynamicObject> =
        Api::all_with(client.clone(), &build::karpenter_node_pool_resource());
    let nodes = pool_nodes(client, ns, &name).await?;
    let mut wanted = BTreeSet::new();
    let mut applied_node_pool = None;
    match plan.provider {
        NodePoolProvider::Kwok => {
            let existing: Vec<String> = nodes
                .iter()
                .filter(|n| n.labels().get(POOL_LABEL) == Some(&pool))
                .map(|n| n.name_any())
                .collect();
            let occupied = occupied_nodes(client, ns, &name).await?;
            let api: Api<Node> = Api::all(client.clone());
            for index in kwok_pool_indices(&pool, plan.instances, &existing, &occupied) {
                let node = kwok_node(ld, &plan, &pool, index)?;
                wanted.insert(kwok_node_name(&pool, index));
                apply_with(&api, &node).await?;
            }
        }
        NodePoolProvider::Karpenter => {
            let np = build::karpenter_node_pool(ld, &plan, &pool, &config.karpenter)?;
            let name = build::karpenter_node_pool_name(&pool);
            match node_pools
                .patch(
                    &name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&np),
                )
                .await
            {
                Ok(applied) => applied_node_pool = Some((name, applied)),
                Err(kube::Error::Api(e)) if e.code == 404 => {
                    let err = SpecError::ProviderUnavailable {
                        message: "spec.nodePool.provider is karpenter, but the karpenter.sh/v1 NodePool API is not installed in this cluster; install Karpenter or choose another provider".into(),
                    };
                    let (status, transitions) = status_for_invalid(ld, &err, Timestamp::now());
                    write_status(ctx, ld, ns, status, transitions).await?;
                    return Ok(Action::requeue(Duration::from_secs(300)));
                }
                Err(e) => return Err(e.into()),
            }
        }
        NodePoolProvider::Existing => {}
    }
    if ld.spec.auth.secret_ref.is_none() {
        let keys = dereference::generated_keys(client, ns, &name).await?;
        apply_object(client, ns, &build::generated_keys_secret(ld, &keys)?).await?;
    }
    let config_map = build::server_config_map(ld, &plan)?;
    let config_hash = hash_of(&config_map.data);
    apply_object(client, ns, &config_map).await?;
    let deployment = build::server_deployment(ld, &plan, &config, &pool, &config_hash)?;
    let applied = apply_object(client, ns, &deployment).await?;
    apply_object(client, ns, &build::server_service(ld)?).await?;
    apply_object(client, ns, &build::server_pdb(ld)?).await?;

    // Prune what is no longer wanted.
    if ld.spec.auth.secret_ref.is_some() {
        delete_if_exists::<Secret>(client, ns, &build::generated_secret_name(&name)).await?;
    }
    let rolled_out = rollout_complete(&applied);
    for node in nodes
        .iter()
        .filter(|n| n.labels().contains_key(KWOK_PROVISIONER_LABEL))
    {
        let node_name = node.name_any();
        let same_pool = node.labels().get(POOL_LABEL) == Some(&pool);
        // Old pools go once the servers have moved; nodes of this pool once they are empty
        // (kwok_pool_indices keeps every node that holds a server pod).
        if !wanted.contains(&node_name) && (same_pool || rolled_out) {
            tracing::info!(node = %node_name, "releasing node");
            delete_cluster_scoped::<Node>(client, &node_name).await?;
        }
    }

    if rolled_out || plan.provider != NodePoolProvider::Karpenter {
        for np in owned_node_pools(&node_pools, ns, &name).await? {
            let keep = plan.provider == NodePoolProvider::Karpenter
                && np.labels().get(POOL_LABEL) == Some(&pool);
            if !keep {
                delete_dynamic(&node_pools, &np.name_any()).await?;
            }
        }
    }

    // Observe and report.
    let mut observed = observe(client, ns, &name, &applied, &nodes, &wanted, &pool).await?;
    if let Some((np_name, np)) = &applied_node_pool
        && observed.nodes_ready < plan.instances
    {
        observed.pool_problem = karpenter_problem(client, ns, np_name, np, &observed).await?;
    }
    let (mut status, transitions) = status_for(
        ld,
        &plan,
        &observed,
        endpoint_url(&name, ns),
        selector_string(&name),
        Timestamp::now(),
    );
    let accrual = Duration::from_secs(config.accrual_seconds.max(1));
    accrue_into(
        ctx,
        ld,
        &plan.instance,
        &observed.running_since,
        now,
        Some(accrual),
        &mut status,
    );
    let ready = status.phase == Some(crate::api::Phase::Ready);
    let cost_changed = original_ld.status.as_ref().and_then(|s| s.core_hours) != status.core_hours;
    write_status(ctx, &original_ld, ns, status, transitions).await?;
    if cost_changed {
        ctx.quota
            .refresh(client, ns, None, &plan.instance.currency)
            .await?;
    }
    let mut wait = if ready {
        Duration::from_secs(300)
    } else {
        Duration::from_secs(30)
    };
    if !observed.running_since.is_empty() {
        wait = wait.min(Duration::from_secs(config.accrual_seconds.max(1)));
    }
    if let Some(next) = next_event {
        wait = wait.min(next);
    }
    if applied_node_pool.is_some() && observed.nodes_ready < plan.instances {
        // Nothing the controller watches changes when Karpenter reports a problem (its NodePool,
        // NodeClaims and Events are not watched): look again soon.
        wait = wait.min(KARPENTER_PROVISIONING_INTERVAL);
    }
    if observed.downloading {
        // Pod status does not change while the weights download: look at the progress again.
        wait = wait.min(DOWNLOAD_PROGRESS_INTERVAL);
    }
    if let Some(scaling) = &scaling {
        wait = wait.min(scaling.next.max(Duration::from_millis(200)));
    }
    Ok(Action::requeue(wait))
}

/// Releases the node pool; garbage collection removes the namespaced children.
async fn cleanup(ld: &LlamaDeployment, ctx: &Context) -> Result<Action, Error> {
    let ns = ld.namespace().unwrap_or_default();
    let name = ld.name_any();
    for node in pool_nodes(&ctx.client, &ns, &name).await? {
        if node.labels().contains_key(KWOK_PROVISIONER_LABEL) {
            delete_cluster_scoped::<Node>(&ctx.client, &node.name_any()).await?;
        }
    }
    // Karpenter removes the nodes of a deleted NodePool itself.
    let node_pools: Api<DynamicObject> =
        Api::all_with(ctx.client.clone(), &build::karpenter_node_pool_resource());
    for np in owned_node_pools(&node_pools, &ns, &name).await? {
        delete_dynamic(&node_pools, &np.name_any()).await?;
    }
    publish(
        ctx,
        ld,
        EventType::Normal,
        "NodePoolReleased",
        "Deleting",
        "node pool released".into(),
    )
    .await;

    // Final accrual; the totals stay in the namespace's summary.
    let config = ctx.config();
    let catalog = config.catalog();
    let now = config.now();
    let mut status = ld.status.clone().unwrap_or_default();
    let instance_type_name = crate::validate::instance_type_of(ld, &catalog).unwrap_or_default();
    if let Some(instance) = catalog.instance_types.get(&instance_type_name) {
        let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
        let listed = pods
            .list(&ListParams::default().labels(&selector_string(&name)))
            .await?;
        let running = running_since(&listed.items);
        accrue_into(ctx, ld, instance, &running, now, None, &mut status);
        let retired = crate::api::RetiredDeployment {
            name: name.clone(),
            uid: ld.uid().unwrap_or_default(),
            core_hours: status.core_hours.unwrap_or(0.0),
            estimated_cost: status.estimated_cost.unwrap_or(0.0),
            retired_at: Some(Time(now)),
        };
        ctx.quota
            .refresh(&ctx.client, &ns, Some(&retired), &instance.currency)
            .await?;
    }
    ctx.metrics
        .forget_deployment(&ns, &name, &instance_type_name);
    // Quota was released: deployments waiting for it try again.
    let all = Api::<LlamaDeployment>::all(ctx.client.clone())
        .list(&ListParams::default())
        .await?;
    for other in all.items.iter().filter(|o| super::waiting_on_quota(o)) {
        let _ = ctx
            .retrigger
            .send(kube::runtime::reflector::ObjectRef::from_obj(other));
    }
    Ok(Action::await_change())
}

async fn pool_nodes(client: &kube::Client, ns: &str, name: &str) -> Result<Vec<Node>, kube::Error> {
    let selector = format!("{DEPLOYMENT_NAMESPACE_LABEL}={ns},{DEPLOYMENT_NAME_LABEL}={name}");
    Ok(Api::<Node>::all(client.clone())
        .list(&ListParams::default().labels(&selector))
        .await?
        .items)
}

/// The nodes that server pods of the deployment are bound to, terminating ones included.
async fn occupied_nodes(
    client: &kube::Client,
    ns: &str,
    name: &str,
) -> Result<BTreeSet<String>, kube::Error> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    Ok(pods
        .list(&ListParams::default().labels(&selector_string(name)))
        .await?
        .items
        .into_iter()
        .filter_map(|p| p.spec?.node_name)
        .collect())
}

/// Start times of the server pods that run (they accrue core-hours).
fn running_since(pods: &[Pod]) -> Vec<Timestamp> {
    pods.iter()
        .filter(|p| p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running"))
        .filter_map(|p| p.status.as_ref()?.start_time.as_ref().map(|t| t.0))
        .collect()
}

/// Checkpoints core-hours and cost into `status` and the Prometheus counters.
/// At most one checkpoint per `min_interval` (each one is a status write, and a status write
/// triggers a reconcile); `None` forces one (at deletion).
fn accrue_into(
    ctx: &Context,
    ld: &LlamaDeployment,
    instance: &crate::catalog::InstanceType,
    running: &[Timestamp],
    now: Timestamp,
    min_interval: Option<Duration>,
    status: &mut LlamaDeploymentStatus,
) {
    let previous = Accrued {
        core_hours: status.core_hours.unwrap_or(0.0),
        cost: status.estimated_cost.unwrap_or(0.0),
        until: status.cost_accrued_until.as_ref().map(|t| t.0),
    };
    if let (Some(min), Some(until)) = (min_interval, previous.until)
        && now.duration_since(until).as_secs_f64() < min.as_secs_f64()
    {
        return;
    }
    let next = accrue(
        &previous,
        running,
        instance.cores,
        instance.hourly_price,
        now,
    );
    if next.until.is_none() {
        return;
    }
    ctx.metrics.record_cost(
        &ld.namespace().unwrap_or_default(),
        &ld.name_any(),
        &instance.name,
        previous.core_hours,
        previous.cost,
        next.core_hours,
        next.cost,
    );
    status.core_hours = Some(next.core_hours);
    status.estimated_cost = Some(next.cost);
    status.currency = Some(instance.currency.clone());
    status.cost_accrued_until = next.until.map(Time);
}

/// Why Karpenter brings no nodes for the NodePool `np_name` (as just applied, with the status
/// Karpenter last wrote): from its NodeClaims and, failing those, its latest `FailedScheduling`
/// Event on a server pod. Only asked while the pool is short of nodes.
async fn karpenter_problem(
    client: &kube::Client,
    ns: &str,
    np_name: &str,
    np: &DynamicObject,
    observed: &Observed,
) -> Result<Option<PoolProblem>, Error> {
    let node_pool = serde_json::to_value(np).map_err(|e| Error::Other(e.to_string()))?;
    if let Some(problem) = pool_problem(np_name, Some(&node_pool), &[], None) {
        return Ok(Some(problem));
    }
    let claims: Api<DynamicObject> =
        Api::all_with(client.clone(), &build::karpenter_node_claim_resource());
    let claims = match claims
        .list(&ListParams::default().labels(&format!("karpenter.sh/nodepool={np_name}")))
        .await
    {
        Ok(list) => list
            .items
            .iter()
            .filter_map(|c| serde_json::to_value(c).ok())
            .collect::<Vec<_>>(),
        Err(kube::Error::Api(e)) if e.code == 404 => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let failed_scheduling = if claims.is_empty() && !observed.pod_names.is_empty() {
        let events: Api<k8s_openapi::api::core::v1::Event> = Api::namespaced(client.clone(), ns);
        let params = ListParams::default()
            .fields("involvedObject.kind=Pod,reason=FailedScheduling,source=karpenter");
        events
            .list(&params)
            .await?
            .items
            .into_iter()
            .filter(|e| {
                e.involved_object
                    .name
                    .as_ref()
                    .is_some_and(|n| observed.pod_names.contains(n))
            })
            .max_by_key(|e| {
                e.last_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .or(e.event_time.as_ref().map(|t| t.0))
            })
            .and_then(|e| e.message)
    } else {
        None
    };
    Ok(pool_problem(
        np_name,
        Some(&node_pool),
        &claims,
        failed_scheduling.as_deref(),
    ))
}

/// The NodePools of a deployment; none when Karpenter is not installed.
async fn owned_node_pools(
    api: &Api<DynamicObject>,
    ns: &str,
    name: &str,
) -> Result<Vec<DynamicObject>, Error> {
    let selector = format!("{DEPLOYMENT_NAMESPACE_LABEL}={ns},{DEPLOYMENT_NAME_LABEL}={name}");
    match api.list(&ListParams::default().labels(&selector)).await {
        Ok(list) => Ok(list.items),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_dynamic(api: &Api<DynamicObject>, name: &str) -> Result<(), Error> {
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn rollout_complete(deployment: &Deployment) -> bool {
    let want = deployment
        .spec
        .as_ref()
        .and_then(|s| s.replicas)
        .unwrap_or(1);
    let Some(status) = &deployment.status else {
        return false;
    };
    status.observed_generation == deployment.metadata.generation
        && status.updated_replicas.unwrap_or(0) == want
        && status.ready_replicas.unwrap_or(0) == want
        && status.replicas.unwrap_or(0) == want
}

async fn observe(
    client: &kube::Client,
    ns: &str,
    name: &str,
    deployment: &Deployment,
    nodes: &[Node],
    wanted: &BTreeSet<String>,
    pool: &str,
) -> Result<Observed, kube::Error> {
    let status = deployment.status.clone().unwrap_or_default();
    let api: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pods = api
        .list(&ListParams::default().labels(&selector_string(name)))
        .await?
        .items;
    let unschedulable = pods.iter().find_map(|pod| {
        let conds = pod.status.as_ref()?.conditions.as_ref()?;
        let c = conds
            .iter()
            .find(|c| c.type_ == "PodScheduled" && c.status == "False")?;
        c.message.clone().or(c.reason.clone())
    });
    let downloading = pods.iter().any(|pod| {
        pod.status
            .as_ref()
            .and_then(|s| s.init_container_statuses.as_ref())
            .is_some_and(|inits| {
                inits
                    .iter()
                    .any(|i| i.state.as_ref().is_some_and(|st| st.running.is_some()))
            })
    });
    let download_progress = match downloading_pod(&pods) {
        Some(pod) => download_progress(&api, &pod).await,
        None => None,
    };
    let nodes_ready = nodes
        .iter()
        .filter(|n| {
            wanted.contains(&n.name_any())
                || (wanted.is_empty() && n.labels().get(POOL_LABEL) == Some(&pool.to_owned()))
        })
        .filter(|n| {
            n.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count() as i32;
    let current_generation = status.observed_generation == deployment.metadata.generation;
    Ok(Observed {
        running_since: running_since(&pods),
        pod_names: pods.iter().map(|p| p.name_any()).collect(),
        pool_problem: None,
        nodes_ready,
        replicas: status.replicas.unwrap_or(0),
        ready_replicas: status.ready_replicas.unwrap_or(0),
        updated_replicas: if current_generation {
            status.updated_replicas.unwrap_or(0)
        } else {
            0
        },
        unschedulable,
        downloading,
        download_progress,
        download_failed: download_failure(&pods),
        load_failed: load_failure(&pods),
    })
}

/// The latest progress of the download in `pod`, from the tail of its `fetch-model` log. A log
/// that cannot be read (RBAC, a kubelet that is not reachable) leaves the plain message: it never
/// fails the reconcile.
async fn download_progress(api: &Api<Pod>, pod: &str) -> Option<DownloadProgress> {
    let params = LogParams {
        container: Some(build::FETCH_CONTAINER.to_owned()),
        tail_lines: Some(DOWNLOAD_LOG_TAIL_LINES),
        ..LogParams::default()
    };
    match tokio::time::timeout(DOWNLOAD_LOG_TIMEOUT, api.logs(pod, &params)).await {
        Ok(Ok(log)) => parse_download_progress(&log),
        Ok(Err(err)) => {
            tracing::warn!(pod, error = %err, "cannot read the fetch-model log; reporting no progress");
            None
        }
        Err(_) => {
            tracing::warn!(
                pod,
                "the fetch-model log did not come in time; reporting no progress"
            );
            None
        }
    }
}

async fn write_status(
    ctx: &Context,
    ld: &LlamaDeployment,
    ns: &str,
    mut status: LlamaDeploymentStatus,
    transitions: Vec<Transition>,
) -> Result<(), Error> {
    conditions::set_kstatus(
        &mut status.conditions,
        status.phase == Some(crate::api::Phase::Failed),
        ld.metadata.generation,
        Timestamp::now(),
    );
    if ld.status.as_ref() != Some(&status) {
        let api: Api<LlamaDeployment> = Api::namespaced(ctx.client.clone(), ns);
        let patch = serde_json::json!({
            "apiVersion": "llama-operator.io/v1alpha1",
            "kind": "LlamaDeployment",
            "status": status,
        });
        api.patch_status(
            &ld.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    for t in transitions {
        let quiet = [
            "Provisioning",
            "Loading",
            "WaitingForNodes",
            "Progressing",
            "Downloading",
        ];
        let type_ = if t.status || quiet.contains(&t.reason.as_str()) {
            EventType::Normal
        } else {
            EventType::Warning
        };
        let note = format!(
            "{} is {}: {}",
            t.type_,
            if t.status { "True" } else { "False" },
            t.message
        );
        publish(ctx, ld, type_, &t.reason, "Reconcile", note).await;
    }
    Ok(())
}

async fn publish(
    ctx: &Context,
    ld: &LlamaDeployment,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let event = Event {
        type_,
        reason: reason.to_owned(),
        note: Some(note),
        action: action.to_owned(),
        secondary: None,
    };
    publish_event(ctx, ld, &event).await;
}

/// Publishes `event` about `ld`; a failure is logged, not returned.
async fn publish_event(ctx: &Context, ld: &LlamaDeployment, event: &Event) {
    if let Err(err) = ctx.recorder.publish(event, &ld.object_ref(&())).await {
        tracing::warn!(%err, "cannot publish event");
    }
}

/// A reference to pod `name` in namespace `ns`, for an event's related object.
fn pod_reference(ns: &str, name: &str) -> k8s_openapi::api::core::v1::ObjectReference {
    k8s_openapi::api::core::v1::ObjectReference {
        api_version: Some("v1".to_owned()),
        kind: Some("Pod".to_owned()),
        namespace: Some(ns.to_owned()),
        name: Some(name.to_owned()),
        ..Default::default()
    }
}

/// Server-side apply of a built namespaced object under the operator's field manager.
async fn apply_object<K>(client: &kube::Client, ns: &str, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + Serialize
        + DeserializeOwned,
{
    apply_with(&Api::namespaced(client.clone(), ns), object).await
}

async fn apply_with<K>(api: &Api<K>, object: &K) -> Result<K, Error>
where
    K: Resource<DynamicType = ()> + Clone + Debug + Serialize + DeserializeOwned,
{
    let name = object
        .meta()
        .name
        .clone()
        .ok_or_else(|| Error::Other("built object without a name".into()))?;
    Ok(api
        .patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(object),
        )
        .await?)
}

async fn delete_if_exists<K>(client: &kube::Client, ns: &str, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::namespaced(client.clone(), ns);
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

async fn delete_cluster_scoped<K>(client: &kube::Client, name: &str) -> Result<(), Error>
where
    K: Resource<DynamicType = (), Scope = k8s_openapi::ClusterResourceScope>
        + Clone
        + Debug
        + DeserializeOwned,
{
    let api: Api<K> = Api::all(client.clone());
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

fn hash_of<T: Serialize>(value: &T) -> String {
    let bytes = serde_json::to_vec(value).unwrap_or_default();
    Sha256::digest(bytes)
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect()
}
