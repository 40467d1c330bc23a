//! The autoscaler: reads every instance's `/metrics`, sums the load, and decides the instance
//! count of a LlamaDeployment whose `minInstances` < `maxInstances`.
//!
//! It runs inside the reconcile (at most once per `scrapeIntervalSeconds`), so its decision
//! passes through the same quota admission, node-pool and workload steps as any other count.
//! Its state lives in `status.autoscaling`, so a restarted or newly elected operator carries on
//! the stabilization window where the previous one left it.

pub mod decide;
pub mod sample;
pub mod scrape;

pub use decide::{Decision, ScaleChange, decide};

use crate::api::ObservedLoad;
use sample::Sample;
use scrape::Target;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

/// The autoscaler's shared parts: one HTTP client, and each instance's last token counter (for
/// tokens per second between two evaluations).
pub struct Autoscaler {
    pub http: reqwest::Client,
    counters: Mutex<HashMap<String, (f64, Instant)>>,
}

impl Default for Autoscaler {
    fn default() -> Self {
        Self {
            http: reqwest::Client::builder()
                .connect_timeout(scrape::SCRAPE_TIMEOUT)
                .pool_max_idle_per_host(1)
                .build()
                .unwrap_or_default(),
            counters: Mutex::new(HashMap::new()),
        }
    }
}

impl Autoscaler {
    /// Reads the instances and sums their load.
    pub async fn observe(&self, targets: &[Target]) -> ObservedLoad {
        let results = scrape::scrape(&self.http, targets).await;
        let now = Instant::now();
        let mut counters = match self.counters.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let load = sum_load(&results, &mut counters, now);
        // Forget instances that are gone.
        let live: std::collections::HashSet<&str> =
            targets.iter().map(|t| t.uid.as_str()).collect();
        counters.retain(|uid, _| live.contains(uid.as_str()));
        for (target, result) in &results {
            if let Err(why) = result {
                tracing::info!(pod = %target.pod, %why, "instance metrics unavailable");
            }
        }
        load
    }
}

/// Sums the samples that arrived; names the instances that did not. Tokens per second come from
/// each instance's counter against its previous reading in `counters` (updated here).
pub fn sum_load(
    results: &[(Target, Result<Sample, String>)],
    counters: &mut HashMap<String, (f64, Instant)>,
    now: Instant,
) -> ObservedLoad {
    let mut load = ObservedLoad::default();
    let mut rate: Option<f64> = None;
    for (target, result) in results {
        match result {
            Ok(sample) => {
                load.instances_reporting += 1;
                load.requests_in_flight += sample.requests_in_flight;
                load.queue_depth += sample.queue_depth;
                load.kv_cache_percent += sample.kv_cache_percent();
                if let Some((before, at)) = counters.get(&target.uid) {
                    let seconds = now.duration_since(*at).as_secs_f64();
                    let delta = sample.completion_tokens - before;
                    // A counter that went down belongs to a restarted server: no rate this time.
                    if seconds > 0.0 && delta >= 0.0 {
                        *rate.get_or_insert(0.0) += delta / seconds;
                    }
                }
                counters.insert(target.uid.clone(), (sample.completion_tokens, now));
            }
            Err(_) => load.instances_missing.push(target.pod.clone()),
        }
    }
    load.tokens_per_second = rate.map(|r| (r * 100.0).round() / 100.0);
    load.kv_cache_percent = (load.kv_cache_percent * 100.0).round() / 100.0;
    load
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn target(pod: &str) -> Target {
        Target {
            pod: pod.into(),
            uid: format!("uid-{pod}"),
            url: format!("http://{pod}/metrics"),
        }
    }

    fn sample(in_flight: f64, tokens: f64) -> Sample {
        Sample {
            requests_in_flight: in_flight,
            queue_depth: 1.0,
            completion_tokens: tokens,
            kv_reserved_tokens: 50.0,
            kv_budget_tokens: 100.0,
        }
    }

    #[test]
    fn sums_reporting_instances_and_names_the_silent_ones() {
        let mut counters = HashMap::new();
        let t0 = Instant::now();
        let first = sum_load(
            &[
                (target("a"), Ok(sample(3.0, 100.0))),
                (target("b"), Ok(sample(5.0, 1000.0))),
                (target("c"), Err("timeout".into())),
            ],
            &mut counters,
            t0,
        );
        assert_eq!(first.instances_reporting, 2);
        assert_eq!(first.instances_missing, ["c"]);
        assert_eq!(first.requests_in_flight, 8.0);
        assert_eq!(first.queue_depth, 2.0);
        assert_eq!(first.kv_cache_percent, 100.0);
        assert_eq!(first.tokens_per_second, None);
        let second = sum_load(
            &[
                (target("a"), Ok(sample(0.0, 300.0))),
                // b restarted: its counter went down, so it adds no rate.
                (target("b"), Ok(sample(0.0, 10.0))),
            ],
            &mut counters,
            t0 + Duration::from_secs(10),
        );
        assert_eq!(second.tokens_per_second, Some(20.0));
        assert!(second.instances_missing.is_empty());
    }
}
