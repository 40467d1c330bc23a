//! The LlamaDeployment controller: watches, context, error policy.

mod autoscaling;
pub mod conditions;
mod dereference;
pub mod karpenter_status;
pub mod observe;
mod reconcile;

pub use reconcile::{FIELD_MANAGER, FINALIZER};

use crate::api::{ComputeQuota, LlamaDeployment};
use crate::build::{DEPLOYMENT_NAME_LABEL, DEPLOYMENT_NAMESPACE_LABEL};
use crate::config::OperatorConfig;
use crate::error::Error;
use crate::metrics::Metrics;
use futures::StreamExt;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, PersistentVolumeClaim, Pod, Secret};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use std::future::Future;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Reconciles running at the same time.
pub const RECONCILE_CONCURRENCY: u16 = 16;

/// Shared state of all reconciles.
pub struct Context {
    pub client: Client,
    config: RwLock<Arc<OperatorConfig>>,
    pub recorder: Recorder,
    pub metrics: Arc<Metrics>,
    pub quota: crate::quota::QuotaKeeper,
    /// Reads instances' metrics for deployments that autoscale.
    pub autoscaler: crate::autoscale::Autoscaler,
    /// Deployments to reconcile again (waiting for quota another one released).
    pub retrigger: tokio::sync::mpsc::UnboundedSender<ObjectRef<LlamaDeployment>>,
    retrigger_rx:
        std::sync::Mutex<Option<tokio::sync::mpsc::UnboundedReceiver<ObjectRef<LlamaDeployment>>>>,
    /// Consecutive failed reconciles per deployment (namespace, name), for the back-off.
    failures: std::sync::Mutex<std::collections::HashMap<(String, String), u32>>,
}

impl Context {
    pub fn new(
        client: Client,
        config: OperatorConfig,
        metrics: Arc<Metrics>,
        instance: String,
    ) -> Self {
        let reporter = Reporter {
            controller: "llama-operator".into(),
            instance: Some(instance),
        };
        let (retrigger, rx) = tokio::sync::mpsc::unbounded_channel();
        Self {
            failures: Default::default(),
            recorder: Recorder::new(client.clone(), reporter),
            quota: Default::default(),
            autoscaler: Default::default(),
            retrigger,
            retrigger_rx: std::sync::Mutex::new(Some(rx)),
            client,
            config: RwLock::new(Arc::new(config)),
            metrics,
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> Arc<OperatorConfig> {
        match self.config.read() {
            Ok(guard) => guard.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the configuration (on reload).
    pub fn set_config(&self, config: OperatorConfig) {
        match self.config.write() {
            Ok(mut guard) => *guard = Arc::new(config),
            Err(poisoned) => *poisoned.into_inner() = Arc::new(config),
        }
    }
}

/// Which namespaces the controller serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum Scope {
    /// Every namespace (the default).
    #[default]
    Cluster,
    /// One namespace only.
    Namespace(String),
}

impl Scope {
    fn api<K>(&self, client: &Client) -> Api<K>
    where
        K: kube::Resource<DynamicType = (), Scope = k8s_openapi::NamespaceResourceScope>,
    {
        match self {
            Scope::Cluster => Api::all(client.clone()),
            Scope::Namespace(ns) => Api::namespaced(client.clone(), ns),
        }
    }
}

/// Runs the controller until `shutdown` completes. Every item of `reconcile_all` (a
/// configuration reload) re-reconciles every deployment.
pub async fn run(
    ctx: Arc<Context>,
    scope: Scope,
    reconcile_all: impl futures::Stream<Item = ()> + Send + 'static,
    shutdown: impl Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    let managed = watcher::Config::default().labels("app.kubernetes.io/managed-by=llama-operator");
    let node_selector = match &scope {
        Scope::Cluster => DEPLOYMENT_NAME_LABEL.to_owned(),
        Scope::Namespace(ns) => {
            format!("{DEPLOYMENT_NAME_LABEL},{DEPLOYMENT_NAMESPACE_LABEL}={ns}")
        }
    };
    // A bounded number of reconciles at once: a burst of applies queues in the controller
    // instead of flooding the API server with hundreds of concurrent request chains.
    let controller = Controller::new(
        scope.api::<LlamaDeployment>(&client),
        watcher::Config::default(),
    )
    .with_config(kube::runtime::controller::Config::default().concurrency(RECONCILE_CONCURRENCY));
    let store = controller.store();
    let by_labels = |labels: &std::collections::BTreeMap<String, String>, ns: Option<String>| {
        let name = labels.get(DEPLOYMENT_NAME_LABEL)?;
        let ns = ns.or_else(|| labels.get(DEPLOYMENT_NAMESPACE_LABEL).cloned())?;
        Some(ObjectRef::<LlamaDeployment>::new(name).within(&ns))
    };
    let mut retriggers = ctx.retrigger_rx.lock().ok().and_then(|mut rx| rx.take());
    let retrigger_stream = futures::stream::poll_fn(move |cx| match retriggers.as_mut() {
        Some(rx) => rx.poll_recv(cx),
        None => std::task::Poll::Ready(None),
    });
    let quota_store = store.clone();
    let secret_store = store.clone();
    let pvc_store = store.clone();
    controller
        .owns(scope.api::<Deployment>(&client), managed.clone())
        .watches(scope.api::<Pod>(&client), managed, move |pod| {
            by_labels(pod.labels(), pod.namespace())
        })
        .watches(
            Api::<Node>::all(client.clone()),
            watcher::Config::default().labels(&node_selector),
            move |node| by_labels(node.labels(), None),
        )
        .watches(
            scope.api::<Secret>(&client),
            watcher::Config::default(),
            move |secret| {
                referring(&secret_store, secret.namespace(), |ld| {
                    let auth = ld.spec.auth.secret_ref.as_ref().map(|r| r.name.as_str());
                    let token = ld
                        .spec
                        .source
                        .hugging_face
                        .as_ref()
                        .and_then(|h| h.token_secret_ref.as_ref())
                        .map(|r| r.name.as_str());
                    auth == Some(&secret.name_any()) || token == Some(&secret.name_any())
                })
            },
        )
        .watches(
            scope.api::<PersistentVolumeClaim>(&client),
            watcher::Config::default(),
            move |pvc| {
                referring(&pvc_store, pvc.namespace(), |ld| {
                    ld.spec.source.pvc.as_ref().map(|p| p.claim_name.as_str())
                        == Some(&pvc.name_any())
                })
            },
        )
        .watches(
            scope.api::<ComputeQuota>(&client),
            watcher::Config::default(),
            move |quota| {
                // Only deployments waiting on quota care about a quota change.
                referring(&quota_store, quota.namespace(), waiting_on_quota)
            },
        )
        .reconcile_on(retrigger_stream)
        .reconcile_all_on(reconcile_all)
        .graceful_shutdown_on(shutdown)
        .run(reconcile::reconcile, error_policy, ctx)
        .for_each(|result| async move {
            if let Err(err) = result {
                tracing::debug!(%err, "reconcile did not complete");
            }
        })
        .await;
}

/// Whether a deployment waits for quota (not admitted, or capped).
pub fn waiting_on_quota(ld: &LlamaDeployment) -> bool {
    ld.status.as_ref().is_some_and(|s| {
        s.conditions.iter().any(|c| {
            (c.type_ == crate::quota::QUOTA_EXCEEDED || c.type_ == crate::quota::SCALE_LIMITED)
                && c.status == "True"
        })
    })
}

/// The deployments of `namespace` for which `refers` holds.
fn referring(
    store: &Store<LlamaDeployment>,
    namespace: Option<String>,
    refers: impl Fn(&LlamaDeployment) -> bool,
) -> Vec<ObjectRef<LlamaDeployment>> {
    store
        .state()
        .into_iter()
        .filter(|ld| ld.namespace() == namespace && refers(ld))
        .map(|ld| ObjectRef::from_obj(&*ld))
        .collect()
}

/// Transient failures are retried with a short delay; spec problems never reach here.
fn error_policy(ld: Arc<LlamaDeployment>, error: &Error, ctx: Arc<Context>) -> Action {
    ctx.metrics.failed(error.label());
    let key = (ld.namespace().unwrap_or_default(), ld.name_any());
    let failures = ctx.failures.lock().map_or(1, |mut map| {
        let n = map.entry(key).or_insert(0);
        *n = n.saturating_add(1);
        *n
    });
    let delay = retry_delay(failures);
    tracing::warn!(namespace = %ld.namespace().unwrap_or_default(), name = %ld.name_any(), %error, failures, retry_in_s = delay.as_secs(), "reconcile failed; retrying");
    Action::requeue(delay)
}

impl Context {
    /// Forgets a deployment's failures after a reconcile that succeeded.
    pub(crate) fn reconciled(&self, namespace: &str, name: &str) {
        if let Ok(mut map) = self.failures.lock() {
            map.remove(&(namespace.to_owned(), name.to_owned()));
        }
    }
}

/// The wait before retrying a reconcile that failed `failures` times in a row: 5 s, doubling
/// up to 5 minutes, so a persistent API error (an admission webhook refusing, RBAC) is not
/// hammered, and a transient one is retried soon.
fn retry_delay(failures: u32) -> Duration {
    const FIRST: u64 = 5;
    const MAX: u64 = 300;
    let doublings = failures.saturating_sub(1).min(16);
    Duration::from_secs((FIRST << doublings).min(MAX))
}

#[cfg(test)]
mod tests {
    use super::retry_delay;
    use std::time::Duration;

    #[test]
    fn failed_reconciles_back_off_exponentially_to_five_minutes() {
        let secs: Vec<u64> = (1..=9).map(|n| retry_delay(n).as_secs()).collect();
        assert_eq!(secs, [5, 10, 20, 40, 80, 160, 300, 300, 300]);
        assert_eq!(retry_delay(u32::MAX), Duration::from_secs(300));
        assert_eq!(retry_delay(0), Duration::from_secs(5));
    }
}
