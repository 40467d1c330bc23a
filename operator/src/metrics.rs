//! Prometheus metrics of the operator.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;
use std::time::Instant;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeploymentLabels {
    pub namespace: String,
    pub name: String,
    pub instance_type: String,
}

type FloatCounter = Counter<f64, std::sync::atomic::AtomicU64>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AutoscaleLabels {
    pub namespace: String,
    pub name: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScaleLabels {
    pub namespace: String,
    pub name: String,
    /// `up` or `down`.
    pub direction: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub error: String,
}

/// Reconcile metrics: `llama_operator_reconcile_runs_total`, `..._failures_total{error}` and
/// `..._duration_seconds`.
#[derive(Debug)]
pub struct Metrics {
    /// Requests the operator sent to the Kubernetes API.
    pub api_requests: Counter,
    pub runs: Counter,
    pub failures: Family<ErrorLabels, Counter>,
    pub duration: Histogram,
    /// `llama_deployment_core_hours_total` and `llama_deployment_cost_total`.
    pub core_hours: Family<DeploymentLabels, FloatCounter>,
    pub cost: Family<DeploymentLabels, FloatCounter>,
    /// `llama_deployment_autoscaler_desired_instances`, `..._requests_in_flight` and
    /// `..._scale_events_total{direction}`.
    pub autoscaler_desired: Family<AutoscaleLabels, Gauge>,
    pub autoscaler_in_flight: Family<AutoscaleLabels, FloatGauge>,
    pub autoscaler_events: Family<ScaleLabels, Counter>,
    pub registry: Registry,
    /// Deployments whose counters were initialised from their checkpointed status.
    seen: std::sync::Mutex<std::collections::HashSet<(String, String)>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let runs = Counter::default();
        let api_requests = Counter::default();
        let failures = Family::<ErrorLabels, Counter>::default();
        let duration = Histogram::new([
            0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0,
        ]);
        let mut root = Registry::default();
        let registry = root.sub_registry_with_prefix("llama_operator");
        registry.register("reconcile_runs", "Reconciles started", runs.clone());
        registry.register(
            "api_requests",
            "Requests sent to the Kubernetes API",
            api_requests.clone(),
        );
        registry.register(
            "reconcile_failures",
            "Reconciles that failed, by error",
            failures.clone(),
        );
        registry.register(
            "reconcile_duration_seconds",
            "Reconcile duration",
            duration.clone(),
        );
        let core_hours = Family::<DeploymentLabels, FloatCounter>::default();
        let cost = Family::<DeploymentLabels, FloatCounter>::default();
        let deployments = root.sub_registry_with_prefix("llama_deployment");
        deployments.register("core_hours", "vCPU core-hours consumed", core_hours.clone());
        deployments.register(
            "cost",
            "Estimated cost, in the instance type's currency",
            cost.clone(),
        );
        let autoscaler_desired = Family::<AutoscaleLabels, Gauge>::default();
        let autoscaler_in_flight = Family::<AutoscaleLabels, FloatGauge>::default();
        let autoscaler_events = Family::<ScaleLabels, Counter>::default();
        deployments.register(
            "autoscaler_desired_instances",
            "Instances the autoscaler wants (before a quota cap)",
            autoscaler_desired.clone(),
        );
        deployments.register(
            "autoscaler_requests_in_flight",
            "Requests in flight over the instances, as the autoscaler last read them",
            autoscaler_in_flight.clone(),
        );
        deployments.register(
            "autoscaler_scale_events",
            "Autoscaler decisions that changed the instance count, by direction",
            autoscaler_events.clone(),
        );
        Self {
            core_hours,
            cost,
            autoscaler_desired,
            autoscaler_in_flight,
            autoscaler_events,
            api_requests,
            runs,
            failures,
            duration,
            registry: root,
            seen: Default::default(),
        }
    }
}

impl Metrics {
    /// Counts a reconcile and times it until the guard drops.
    pub fn start(&self) -> ReconcileTimer<'_> {
        self.runs.inc();
        ReconcileTimer {
            metrics: self,
            start: Instant::now(),
        }
    }

    pub fn failed(&self, label: &str) {
        self.failures
            .get_or_create(&ErrorLabels {
                error: label.to_owned(),
            })
            .inc();
    }

    /// Adds a deployment's accrual to the cost counters. The first time a deployment is seen
    /// (after a restart), its counters start at the checkpointed totals, so they match status.
    #[allow(clippy::too_many_arguments)]
    pub fn record_cost(
        &self,
        namespace: &str,
        name: &str,
        instance_type: &str,
        before_hours: f64,
        before_cost: f64,
        after_hours: f64,
        after_cost: f64,
    ) {
        let labels = DeploymentLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            instance_type: instance_type.to_owned(),
        };
        let first = self
            .seen
            .lock()
            .map(|mut seen| seen.insert((namespace.to_owned(), name.to_owned())))
            .unwrap_or(false);
        let (from_hours, from_cost) = if first {
            (0.0, 0.0)
        } else {
            (before_hours, before_cost)
        };
        self.core_hours
            .get_or_create(&labels)
            .inc_by((after_hours - from_hours).max(0.0));
        self.cost
            .get_or_create(&labels)
            .inc_by((after_cost - from_cost).max(0.0));
    }

    /// Records an autoscaler evaluation: the count it wants, the load it read, and a change.
    pub fn record_autoscale(
        &self,
        namespace: &str,
        name: &str,
        desired: i32,
        in_flight: f64,
        change: Option<&str>,
    ) {
        let labels = AutoscaleLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.autoscaler_desired
            .get_or_create(&labels)
            .set(i64::from(desired));
        self.autoscaler_in_flight
            .get_or_create(&labels)
            .set(in_flight);
        if let Some(direction) = change {
            self.autoscaler_events
                .get_or_create(&ScaleLabels {
                    namespace: namespace.to_owned(),
                    name: name.to_owned(),
                    direction: direction.to_owned(),
                })
                .inc();
        }
    }

    /// Drops a deleted deployment's series.
    pub fn forget_deployment(&self, namespace: &str, name: &str, instance_type: &str) {
        if let Ok(mut seen) = self.seen.lock() {
            seen.remove(&(namespace.to_owned(), name.to_owned()));
        }
        let labels = DeploymentLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            instance_type: instance_type.to_owned(),
        };
        self.core_hours.remove(&labels);
        self.cost.remove(&labels);
        let labels = AutoscaleLabels {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        };
        self.autoscaler_desired.remove(&labels);
        self.autoscaler_in_flight.remove(&labels);
        for direction in ["up", "down"] {
            self.autoscaler_events.remove(&ScaleLabels {
                namespace: namespace.to_owned(),
                name: name.to_owned(),
                direction: direction.into(),
            });
        }
    }

    /// The text exposition format.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

pub struct ReconcileTimer<'a> {
    metrics: &'a Metrics,
    start: Instant,
}

impl Drop for ReconcileTimer<'_> {
    fn drop(&mut self) {
        self.metrics
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn autoscaler_series_appear_and_go_with_the_deployment() {
        let m = Metrics::default();
        m.record_autoscale("team-a", "chat", 3, 21.5, Some("up"));
        let text = m.encode();
        assert!(
            text.contains(
                r#"llama_deployment_autoscaler_desired_instances{namespace="team-a",name="chat"} 3"#
            ),
            "{text}"
        );
        assert!(text.contains(
            r#"llama_deployment_autoscaler_requests_in_flight{namespace="team-a",name="chat"} 21.5"#
        ));
        assert!(text.contains(
            r#"llama_deployment_autoscaler_scale_events_total{namespace="team-a",name="chat",direction="up"} 1"#
        ));
        m.forget_deployment("team-a", "chat", "Standard_NC24ads_A100_v4");
        assert!(!m.encode().contains("team-a"));
    }
}
