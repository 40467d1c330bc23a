//! The autoscaler's step of a reconcile: which instance count to run, and what to report.

use super::Context;
use crate::api::{AutoscalingStatus, LlamaDeployment};
use crate::autoscale::{self, ScaleChange, scrape};
use crate::build::selector_string;
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::jiff::Timestamp;
use kube::api::ListParams;
use kube::{Api, ResourceExt};
use std::time::Duration;

/// An evaluation counts as due this much before its interval is over (requeues are not exact).
const SLACK: Duration = Duration::from_millis(500);

/// The autoscaler's outcome for one reconcile.
pub struct Scaling {
    /// The instance count to run (before the quota cap).
    pub instances: i32,
    /// `status.autoscaling`.
    pub status: AutoscalingStatus,
    /// A change made now, for an Event.
    pub change: Option<ScaleChange>,
    /// Instances whose metrics went missing at this evaluation, for a Warning Event.
    pub newly_missing: Vec<String>,
    /// When the next evaluation is due.
    pub next: Duration,
}

/// Evaluates the autoscaler when it is on for `ld` and an evaluation is due; between
/// evaluations the last decision stands. `None` when autoscaling is off.
pub async fn evaluate(
    ctx: &Context,
    ld: &LlamaDeployment,
    ns: &str,
) -> Result<Option<Scaling>, kube::Error> {
    let compute = &ld.spec.compute;
    let Some(bounds) = compute.autoscaling_bounds(ld.annotations()) else {
        return Ok(None);
    };
    let spec = &compute.autoscaling;
    let interval = Duration::from_secs(spec.scrape_interval_seconds.max(1) as u64);
    let previous = ld.status.as_ref().and_then(|s| s.autoscaling.as_ref());
    let now = Timestamp::now();
    let since_last = previous
        .and_then(|p| p.last_evaluation_time.as_ref())
        .map(|t| now.duration_since(t.0).as_secs_f64());
    if let (Some(previous), Some(elapsed)) = (previous, since_last)
        && elapsed >= 0.0
        && elapsed + SLACK.as_secs_f64() < interval.as_secs_f64()
    {
        let low = bounds.0.max(1);
        let mut status = previous.clone();
        status.desired_instances = status.desired_instances.clamp(low, bounds.1.max(low));
        return Ok(Some(Scaling {
            instances: status.desired_instances,
            status,
            change: None,
            newly_missing: Vec::new(),
            next: interval.saturating_sub(Duration::from_secs_f64(elapsed)),
        }));
    }
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), ns);
    let pods = pods
        .list(&ListParams::default().labels(&selector_string(&ld.name_any())))
        .await?
        .items;
    let targets = scrape::targets(&pods);
    let load = ctx.autoscaler.observe(&targets).await;
    let was_missing = previous
        .map(|p| p.load.instances_missing.clone())
        .unwrap_or_default();
    let newly_missing: Vec<String> = load
        .instances_missing
        .iter()
        .filter(|p| !was_missing.contains(p))
        .cloned()
        .collect();
    let decision = autoscale::decide(spec, bounds, compute.instance_count, previous, load, now);
    tracing::debug!(
        recommended = decision.status.recommended_instances,
        desired = decision.status.desired_instances,
        reporting = decision.status.load.instances_reporting,
        missing = ?decision.status.load.instances_missing,
        pending_since = ?decision.status.scale_down_pending_since.as_ref().map(|t| t.0),
        previous_evaluation = ?previous.and_then(|p| p.last_evaluation_time.as_ref()).map(|t| t.0),
        "autoscaler evaluation"
    );
    if let Some(change) = &decision.change {
        tracing::info!(from = change.from, to = change.to, message = %change.message, "autoscaling");
    }
    ctx.metrics.record_autoscale(
        ns,
        &ld.name_any(),
        decision.status.desired_instances,
        decision.status.load.requests_in_flight,
        decision
            .change
            .as_ref()
            .map(|c| if c.to > c.from { "up" } else { "down" }),
    );
    Ok(Some(Scaling {
        instances: decision.status.desired_instances,
        status: decision.status,
        change: decision.change,
        newly_missing,
        next: interval,
    }))
}
