//! Progress lines for a download: bytes done / total, percent and rate, throttled.

use std::time::{Duration, Instant};

/// No two lines closer than this.
const MIN_INTERVAL: Duration = Duration::from_secs(1);
/// A stalled or size-less download still shows a line this often.
const MAX_INTERVAL: Duration = Duration::from_secs(10);
/// Percent steps worth a line.
const STEP_PERCENT: u64 = 5;

/// Tracks one download and decides when it is worth a line.
#[derive(Debug)]
pub struct Progress {
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
    last_step: u64,
}

impl Progress {
    pub fn new(label: impl Into<String>, total: Option<u64>, now: Instant) -> Self {
        Self {
            label: label.into(),
            total,
            done: 0,
            started: now,
            last_line: now,
            last_step: 0,
        }
    }

    /// Bytes received so far.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Counts `bytes` more; returns a line when one is due: at least a second after the last,
    /// and either a new 5% step or ten seconds of silence.
    pub fn advance(&mut self, bytes: u64, now: Instant) -> Option<String> {
        self.done += bytes;
        let since = now.saturating_duration_since(self.last_line);
        if since < MIN_INTERVAL {
            return None;
        }
        let step = self.percent().map_or(0, |p| p / STEP_PERCENT);
        if step > self.last_step || since >= MAX_INTERVAL {
            self.last_step = step;
            self.last_line = now;
            return Some(self.line(now));
        }
        None
    }

    /// The closing line of this download.
    pub fn finish(&self, now: Instant) -> String {
        self.line(now)
    }

    fn percent(&self) -> Option<u64> {
        self.total
            .filter(|&total| total > 0)
            .map(|total| (self.done.min(total) * 100) / total)
    }

    fn line(&self, now: Instant) -> String {
        let elapsed = now.saturating_duration_since(self.started).as_secs_f64();
        let rate = if elapsed > 0.0 {
            format!(", {}/s", format_bytes((self.done as f64 / elapsed) as u64))
        } else {
            String::new()
        };
        match (self.total, self.percent()) {
            (Some(total), Some(percent)) => format!(
                "fetch: {} {} / {} ({percent}%){rate}",
                self.label,
                format_bytes(self.done),
                format_bytes(total)
            ),
            _ => format!("fetch: {} {}{rate}", self.label, format_bytes(self.done)),
        }
    }
}

/// `1536` → `1.5 KiB`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_read_in_binary_units() {
        assert_eq!(format_bytes(0), "0 B");
        assert_eq!(format_bytes(1023), "1023 B");
        assert_eq!(format_bytes(1536), "1.5 KiB");
        assert_eq!(format_bytes(5 * 1024 * 1024 * 1024), "5.0 GiB");
    }

    #[test]
    fn lines_come_at_most_once_a_second_and_per_five_percent() {
        let t0 = Instant::now();
        let mut p = Progress::new("model.gguf", Some(1000), t0);
        // 10% within the first second: too soon.
        assert_eq!(p.advance(100, t0 + Duration::from_millis(500)), None);
        let line = p
            .advance(0, t0 + Duration::from_secs(1))
            .expect("a line after 1 s");
        assert_eq!(line, "fetch: model.gguf 100 B / 1000 B (10%), 100 B/s");
        // A second later but still in the same 5% step: nothing.
        assert_eq!(p.advance(20, t0 + Duration::from_secs(2)), None);
        // The next step, a second later: a line.
        assert!(p.advance(40, t0 + Duration::from_secs(3)).is_some());
        // Stalled: a line after ten silent seconds all the same.
        assert_eq!(p.advance(0, t0 + Duration::from_secs(12)), None);
        assert!(p.advance(0, t0 + Duration::from_secs(13)).is_some());
        assert_eq!(p.done(), 160);
    }

    #[test]
    fn unknown_size_shows_bytes_only() {
        let t0 = Instant::now();
        let mut p = Progress::new("x", None, t0);
        assert_eq!(p.advance(2048, t0), None);
        assert_eq!(
            p.finish(t0 + Duration::from_secs(2)),
            "fetch: x 2.0 KiB, 1.0 KiB/s"
        );
    }
}
