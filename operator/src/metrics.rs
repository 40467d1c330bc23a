//! Prometheus metrics of the operator.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
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
        Self {
            core_hours,
            cost,
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
