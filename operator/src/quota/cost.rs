//! Core-hour and cost accrual, pure: each running instance accrues its instance type's cores and
//! hourly price for the time it ran since the last checkpoint.

use k8s_openapi::jiff::Timestamp;

/// The accrued totals of a deployment, as checkpointed in its status.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Accrued {
    pub core_hours: f64,
    pub cost: f64,
    /// Time up to which the totals are accrued.
    pub until: Option<Timestamp>,
}

/// Adds what `running` instances (their start times) accrued up to `now`. Never decreases: a
/// clock that went backwards accrues nothing.
pub fn accrue(
    previous: &Accrued,
    running: &[Timestamp],
    cores: u32,
    hourly_price: f64,
    now: Timestamp,
) -> Accrued {
    let mut next = previous.clone();
    // Nothing runs: nothing accrues, and the checkpoint stays (a later instance counts from its
    // own start).
    if running.is_empty() {
        return next;
    }
    let mut instance_hours = 0.0;
    for start in running {
        let from = match previous.until {
            Some(until) if until > *start => until,
            _ => *start,
        };
        let seconds = now.duration_since(from).as_secs_f64();
        if seconds > 0.0 {
            instance_hours += seconds / 3600.0;
        }
    }
    next.core_hours += instance_hours * f64::from(cores);
    next.cost += instance_hours * hourly_price;
    if previous.until.is_none_or(|u| now > u) {
        next.until = Some(now);
    }
    next
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(secs: i64) -> Timestamp {
        Timestamp::from_second(1_700_000_000 + secs).expect("ts")
    }

    #[test]
    fn two_24_core_instances_for_2_5_hours_are_120_core_hours() {
        let a = accrue(&Accrued::default(), &[t(0), t(0)], 24, 3.673, t(9_000));
        assert!((a.core_hours - 120.0).abs() < 1e-9, "{}", a.core_hours);
        assert!((a.cost - 2.0 * 2.5 * 3.673).abs() < 1e-9);
        assert_eq!(a.until, Some(t(9_000)));
    }

    #[test]
    fn checkpoints_add_up_and_late_starters_count_from_their_start() {
        let a = accrue(&Accrued::default(), &[t(0)], 24, 1.0, t(3_600));
        let b = accrue(&a, &[t(0), t(5_400)], 24, 1.0, t(7_200));
        // First instance: 2 h; second: 0.5 h.
        assert!((b.core_hours - 2.5 * 24.0).abs() < 1e-9, "{}", b.core_hours);
    }

    #[test]
    fn idle_accrues_nothing_and_keeps_the_checkpoint() {
        let a = accrue(&Accrued::default(), &[], 24, 1.0, t(3_600));
        assert_eq!(a, Accrued::default());
        let b = accrue(&Accrued::default(), &[t(0)], 24, 1.0, t(3_600));
        assert_eq!(accrue(&b, &[], 24, 1.0, t(7_200)), b);
    }

    #[test]
    fn a_clock_going_backwards_accrues_nothing() {
        let a = accrue(&Accrued::default(), &[t(0)], 24, 1.0, t(3_600));
        let b = accrue(&a, &[t(0)], 24, 1.0, t(1_000));
        assert_eq!(b.core_hours, a.core_hours);
        assert_eq!(b.until, a.until);
    }
}
