//! Leader election on a coordination.k8s.io Lease, so that of several operator replicas exactly
//! one reconciles. The leader renews the lease every `renew_every`; a replica takes over once the
//! lease has not been renewed for `lease_duration`. A leader that cannot renew in time stops
//! leading before another can take over.

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::Client;
use kube::api::{Api, ObjectMeta, PostParams};
use std::time::Duration;

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseSettings {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub lease_duration: Duration,
    pub renew_every: Duration,
}

/// Holds or waits for the lease.
pub struct LeaderElector {
    api: Api<Lease>,
    settings: LeaseSettings,
}

impl LeaderElector {
    pub fn new(client: Client, settings: LeaseSettings) -> Self {
        Self {
            api: Api::namespaced(client, &settings.namespace),
            settings,
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        let mut announced = false;
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => {
                    tracing::info!(identity = %self.settings.identity, lease = %self.settings.name, "became leader");
                    return;
                }
                Ok(false) => {
                    if !announced {
                        tracing::info!(identity = %self.settings.identity, "waiting for leadership");
                        announced = true;
                    }
                }
                Err(err) => tracing::warn!(%err, "leader election"),
            }
            tokio::time::sleep(self.settings.renew_every).await;
        }
    }

    /// Renews the lease until a renewal fails for longer than is safe; then returns (the caller
    /// must stop reconciling at once).
    pub async fn hold(&self) {
        // Stop before anyone else may take over: well within the lease duration.
        let deadline = self.settings.lease_duration.mul_f64(0.66);
        let mut last_renewed = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.settings.renew_every).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last_renewed = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("lease taken by another replica");
                    return;
                }
                Err(err) => tracing::warn!(%err, "lease renewal failed"),
            }
            if last_renewed.elapsed() > deadline {
                tracing::error!("could not renew the lease in time");
                return;
            }
        }
    }

    /// One attempt: true when this replica holds the lease afterwards.
    async fn try_acquire_or_renew(&self) -> Result<bool, kube::Error> {
        let now = Timestamp::now();
        let s = &self.settings;
        let duration_secs = s.lease_duration.as_secs().max(1) as i32;
        let Some(mut lease) = self.api.get_opt(&s.name).await? else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(s.name.clone()),
                    ..Default::default()
                },
                spec: Some(k8s_openapi::api::coordination::v1::LeaseSpec {
                    holder_identity: Some(s.identity.clone()),
                    lease_duration_seconds: Some(duration_secs),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            };
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        let mine = spec.holder_identity.as_deref() == Some(s.identity.as_str());
        let expired = match (&spec.renew_time, spec.lease_duration_seconds) {
            (Some(MicroTime(renewed)), Some(secs)) => {
                *renewed + SignedDuration::from_secs(i64::from(secs)) < now
            }
            _ => true,
        };
        if !mine && !expired {
            return Ok(false);
        }
        if !mine {
            spec.holder_identity = Some(s.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.renew_time = Some(MicroTime(now));
        spec.lease_duration_seconds = Some(duration_secs);
        // Optimistic concurrency: the replace fails with 409 if anyone else wrote in between.
        match self
            .api
            .replace(&s.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
            Err(e) => Err(e),
        }
    }
}
