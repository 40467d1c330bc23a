//! The autoscaler's decision: a pure function of the targets, the observed load, the previous
//! decision and the time.

use crate::api::{AutoscalingSpec, AutoscalingStatus, ObservedLoad};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;

/// Load within this fraction above what the instances are sized for does not add one.
pub const TOLERANCE: f64 = 0.1;

/// A change of the instance count, for an Event.
#[derive(Clone, Debug, PartialEq)]
pub struct ScaleChange {
    pub from: i32,
    pub to: i32,
    /// `ScaledUp` or `ScaledDown`.
    pub reason: &'static str,
    pub message: String,
}

/// The outcome of one evaluation.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub status: AutoscalingStatus,
    pub change: Option<ScaleChange>,
}

/// One load signal against its per-instance target.
struct Signal {
    what: &'static str,
    total: f64,
    target: f64,
    unit: &'static str,
}

impl Signal {
    fn instances(&self) -> f64 {
        self.total / self.target
    }

    fn describe(&self) -> String {
        format!(
            "{} {} over a target of {} per instance",
            round(self.total),
            self.what,
            round(self.target)
        ) + self.unit
    }
}

fn round(v: f64) -> String {
    let r = (v * 100.0).round() / 100.0;
    if r.fract() == 0.0 {
        format!("{r:.0}")
    } else {
        format!("{r}")
    }
}

/// Decides the instance count for `load`, given the bounds `[min, max]`, the spec's targets, the
/// previous status (or `start`, the spec's instanceCount, at the first evaluation) and `now`.
///
/// - The recommendation is the largest ceil(total ÷ target) over the signals.
/// - Above the current count (beyond the tolerance) it is taken at once.
/// - Below it, it is taken only once every evaluation for `scaleDownStabilizationSeconds` has
///   called for fewer instances, and then the highest of those counts is taken.
/// - While any running instance did not answer, or none did, there is no scale-down and the
///   stabilization window starts over: missing data is not idleness.
/// - The result stays within [max(min, 1), max]: without an instance there is no load to see.
pub fn decide(
    spec: &AutoscalingSpec,
    (min, max): (i32, i32),
    start: i32,
    previous: Option<&AutoscalingStatus>,
    load: ObservedLoad,
    now: Timestamp,
) -> Decision {
    let low = min.max(1);
    let high = max.max(low);
    let current = previous
        .map(|p| p.desired_instances)
        .filter(|d| *d > 0)
        .unwrap_or(start)
        .clamp(low, high);
    let mut signals = vec![
        Signal {
            what: "requests in flight",
            total: load.requests_in_flight,
            target: spec.target_requests_in_flight,
            unit: "",
        },
        Signal {
            what: "queued requests",
            total: load.queue_depth,
            target: spec.target_queue_depth,
            unit: "",
        },
        Signal {
            what: "% KV cache",
            total: load.kv_cache_percent,
            target: spec.target_kv_cache_percent,
            unit: "",
        },
    ];
    if let (Some(target), Some(tps)) = (spec.target_tokens_per_second, load.tokens_per_second) {
        signals.push(Signal {
            what: "tokens/s",
            total: tps,
            target,
            unit: "",
        });
    }
    let top = signals
        .iter()
        .filter(|s| s.target > 0.0 && s.total.is_finite())
        .max_by(|a, b| a.instances().total_cmp(&b.instances()));
    let needed = top.map_or(0.0, Signal::instances);
    let mut recommended = needed.ceil() as i32;
    if recommended > current && needed <= f64::from(current) * (1.0 + TOLERANCE) {
        recommended = current;
    }
    let why = top.map_or_else(|| "no load".to_owned(), Signal::describe);
    let complete = load.instances_missing.is_empty() && load.instances_reporting > 0;

    let mut status = previous.cloned().unwrap_or_default();
    status.recommended_instances = recommended;
    status.last_evaluation_time = Some(Time(now));
    status.load = load;
    let bounded = recommended.clamp(low, high);
    let mut target = current;
    if bounded > current {
        target = bounded;
        status.scale_down_pending_since = None;
        status.scale_down_pending_to = None;
    } else if bounded < current && complete {
        let since = status.scale_down_pending_since.as_ref().map(|t| t.0);
        let to = status.scale_down_pending_to.unwrap_or(bounded).max(bounded);
        match since {
            Some(since)
                if now.duration_since(since).as_secs_f64()
                    >= spec.scale_down_stabilization_seconds as f64 =>
            {
                target = to.clamp(low, high);
                status.scale_down_pending_since = None;
                status.scale_down_pending_to = None;
            }
            Some(_) => status.scale_down_pending_to = Some(to),
            None => {
                status.scale_down_pending_since = Some(Time(now));
                status.scale_down_pending_to = Some(bounded);
                if spec.scale_down_stabilization_seconds == 0 {
                    target = bounded;
                    status.scale_down_pending_since = None;
                    status.scale_down_pending_to = None;
                }
            }
        }
    } else {
        status.scale_down_pending_since = None;
        status.scale_down_pending_to = None;
    }
    status.desired_instances = target;
    let change = (target != current).then(|| {
        let (reason, verb) = if target > current {
            ("ScaledUp", "scaled up")
        } else {
            ("ScaledDown", "scaled down")
        };
        let mut message = format!("{verb} from {current} to {target}: {why}");
        if target == high && recommended > high {
            message.push_str(&format!(" (capped at maxInstances {high})"));
        }
        if target < current {
            message.push_str(&format!(" for {} s", spec.scale_down_stabilization_seconds));
        }
        ScaleChange {
            from: current,
            to: target,
            reason,
            message,
        }
    });
    if let Some(change) = &change {
        status.last_scale_time = Some(Time(now));
        status.last_decision = Some(change.message.clone());
    } else if status.last_decision.is_none() {
        status.last_decision = Some(format!("holding {current}: {why}"));
    }
    Decision { status, change }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> AutoscalingSpec {
        serde_yaml::from_str(yaml).expect("spec")
    }

    fn load(in_flight: f64, reporting: i32, missing: &[&str]) -> ObservedLoad {
        ObservedLoad {
            instances_reporting: reporting,
            instances_missing: missing.iter().map(|s| s.to_string()).collect(),
            requests_in_flight: in_flight,
            ..Default::default()
        }
    }

    fn at(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).expect("time")
    }

    #[test]
    fn defaults_are_documented_values() {
        let s = spec("{}");
        assert_eq!(s.target_requests_in_flight, 8.0);
        assert_eq!(s.target_queue_depth, 2.0);
        assert_eq!(s.target_kv_cache_percent, 80.0);
        assert_eq!(s.target_tokens_per_second, None);
        assert_eq!(s.scrape_interval_seconds, 15);
        assert_eq!(s.scale_down_stabilization_seconds, 300);
    }

    #[test]
    fn scales_up_at_once_to_what_the_load_calls_for() {
        let d = decide(&spec("{}"), (1, 5), 1, None, load(22.0, 1, &[]), at(0));
        assert_eq!(d.status.desired_instances, 3);
        let change = d.change.expect("a change");
        assert_eq!((change.from, change.to, change.reason), (1, 3, "ScaledUp"));
        assert_eq!(
            change.message,
            "scaled up from 1 to 3: 22 requests in flight over a target of 8 per instance"
        );
    }

    #[test]
    fn never_beyond_max_and_says_so() {
        let d = decide(&spec("{}"), (1, 4), 1, None, load(100.0, 1, &[]), at(0));
        assert_eq!(d.status.desired_instances, 4);
        assert_eq!(d.status.recommended_instances, 13);
        assert!(
            d.change
                .expect("change")
                .message
                .ends_with("(capped at maxInstances 4)"),
        );
    }

    #[test]
    fn within_tolerance_no_instance_is_added() {
        let d = decide(&spec("{}"), (1, 5), 2, None, load(17.0, 2, &[]), at(0));
        assert_eq!(d.status.desired_instances, 2);
        assert!(d.change.is_none());
    }

    #[test]
    fn the_busiest_signal_wins() {
        let mut l = load(4.0, 2, &[]);
        l.queue_depth = 9.0;
        l.kv_cache_percent = 90.0;
        let d = decide(&spec("{}"), (1, 10), 2, None, l, at(0));
        assert_eq!(d.status.desired_instances, 5);
        assert!(
            d.change
                .expect("change")
                .message
                .contains("9 queued requests")
        );
        let mut l = load(1.0, 1, &[]);
        l.tokens_per_second = Some(250.0);
        let d = decide(
            &spec("targetTokensPerSecond: 100"),
            (1, 10),
            1,
            None,
            l,
            at(0),
        );
        assert_eq!(d.status.desired_instances, 3);
    }

    #[test]
    fn scales_down_only_after_the_window_to_the_highest_count_seen() {
        let s = spec("scaleDownStabilizationSeconds: 60");
        let up = decide(&s, (1, 5), 1, None, load(40.0, 1, &[]), at(0));
        assert_eq!(up.status.desired_instances, 5);
        let d1 = decide(&s, (1, 5), 1, Some(&up.status), load(15.0, 5, &[]), at(10));
        assert_eq!(d1.status.desired_instances, 5);
        assert_eq!(d1.status.scale_down_pending_to, Some(2));
        let d2 = decide(&s, (1, 5), 1, Some(&d1.status), load(0.0, 5, &[]), at(40));
        assert_eq!(d2.status.desired_instances, 5);
        assert_eq!(d2.status.scale_down_pending_to, Some(2));
        let d3 = decide(&s, (1, 5), 1, Some(&d2.status), load(0.0, 5, &[]), at(70));
        assert_eq!(d3.status.desired_instances, 2);
        let change = d3.change.expect("change");
        assert_eq!(change.reason, "ScaledDown");
        assert!(change.message.ends_with("for 60 s"), "{}", change.message);
        let d4 = decide(&s, (1, 5), 1, Some(&d3.status), load(0.0, 2, &[]), at(80));
        assert_eq!(d4.status.desired_instances, 2);
        let d5 = decide(&s, (1, 5), 1, Some(&d4.status), load(0.0, 2, &[]), at(141));
        assert_eq!(d5.status.desired_instances, 1);
    }

    #[test]
    fn load_returning_inside_the_window_cancels_the_scale_down() {
        let s = spec("scaleDownStabilizationSeconds: 60");
        let up = decide(&s, (1, 5), 1, None, load(24.0, 1, &[]), at(0));
        let quiet = decide(&s, (1, 5), 1, Some(&up.status), load(0.0, 3, &[]), at(10));
        assert!(quiet.status.scale_down_pending_since.is_some());
        let busy = decide(
            &s,
            (1, 5),
            1,
            Some(&quiet.status),
            load(24.0, 3, &[]),
            at(30),
        );
        assert_eq!(busy.status.scale_down_pending_since, None);
        let quiet = decide(&s, (1, 5), 1, Some(&busy.status), load(0.0, 3, &[]), at(50));
        let still = decide(
            &s,
            (1, 5),
            1,
            Some(&quiet.status),
            load(0.0, 3, &[]),
            at(80),
        );
        assert_eq!(still.status.desired_instances, 3);
    }

    #[test]
    fn missing_metrics_are_not_idleness() {
        let s = spec("scaleDownStabilizationSeconds: 0");
        let up = decide(&s, (1, 5), 1, None, load(24.0, 1, &[]), at(0));
        let d = decide(
            &s,
            (1, 5),
            1,
            Some(&up.status),
            load(0.0, 2, &["pod-c"]),
            at(10),
        );
        assert_eq!(d.status.desired_instances, 3);
        assert!(d.change.is_none());
        let none = decide(&s, (1, 5), 1, Some(&up.status), load(0.0, 0, &[]), at(10));
        assert_eq!(none.status.desired_instances, 3);
        // Scale-up still works on the instances that answer.
        let d = decide(
            &s,
            (1, 5),
            1,
            Some(&up.status),
            load(40.0, 2, &["pod-c"]),
            at(20),
        );
        assert_eq!(d.status.desired_instances, 5);
    }

    #[test]
    fn the_start_count_is_clamped_and_min_zero_keeps_one() {
        let d = decide(&spec("{}"), (0, 3), 0, None, load(0.0, 1, &[]), at(0));
        assert_eq!(d.status.desired_instances, 1);
        let d = decide(&spec("{}"), (2, 3), 1, None, load(0.0, 1, &[]), at(0));
        assert_eq!(d.status.desired_instances, 2);
    }
}
