//! Per-instance rate limits: requests per minute and tokens per minute, as token buckets that
//! refill continuously. A request takes one request and its prompt tokens when it is admitted;
//! generated tokens are charged as they are produced (the bucket may go negative, which holds
//! later requests back until it refills).

use std::sync::Mutex;
use std::time::Instant;

/// Which limit turned a request away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Requests,
    Tokens,
}

impl Limit {
    pub fn label(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::Tokens => "tokens",
        }
    }
}

/// A refused request: which limit, and seconds until it would pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refusal {
    pub limit: Limit,
    pub retry_after: u64,
}

/// What remains after a decision, for the `x-ratelimit-remaining-*` headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Remaining {
    pub requests: u64,
    pub tokens: u64,
}

#[derive(Debug)]
struct Buckets {
    requests: f64,
    tokens: f64,
    at: Instant,
}

/// The limiter of one server.
#[derive(Debug)]
pub struct RateLimiter {
    requests_per_minute: f64,
    tokens_per_minute: f64,
    state: Mutex<Buckets>,
}

impl RateLimiter {
    pub fn new(requests_per_minute: u64, tokens_per_minute: u64) -> Self {
        Self {
            requests_per_minute: requests_per_minute as f64,
            tokens_per_minute: tokens_per_minute as f64,
            state: Mutex::new(Buckets {
                requests: requests_per_minute as f64,
                tokens: tokens_per_minute as f64,
                at: Instant::now(),
            }),
        }
    }

    fn refill(&self, buckets: &mut Buckets, now: Instant) {
        let minutes = now.saturating_duration_since(buckets.at).as_secs_f64() / 60.0;
        buckets.requests =
            (buckets.requests + minutes * self.requests_per_minute).min(self.requests_per_minute);
        buckets.tokens =
            (buckets.tokens + minutes * self.tokens_per_minute).min(self.tokens_per_minute);
        buckets.at = now;
    }

    /// Admits one request with `prompt_tokens`, or says which limit refuses it and when to
    /// retry. A prompt larger than the whole per-minute budget is admitted once the bucket is
    /// full, so it is not refused forever.
    pub fn admit(&self, prompt_tokens: u64, now: Instant) -> Result<Remaining, Refusal> {
        let Ok(mut b) = self.state.lock() else {
            return Ok(Remaining {
                requests: 0,
                tokens: 0,
            });
        };
        self.refill(&mut b, now);
        if b.requests < 1.0 {
            let minutes = (1.0 - b.requests) / self.requests_per_minute;
            return Err(Refusal {
                limit: Limit::Requests,
                retry_after: seconds(minutes),
            });
        }
        let need = (prompt_tokens as f64).min(self.tokens_per_minute);
        if b.tokens < need {
            let minutes = (need - b.tokens) / self.tokens_per_minute;
            return Err(Refusal {
                limit: Limit::Tokens,
                retry_after: seconds(minutes),
            });
        }
        b.requests -= 1.0;
        b.tokens -= prompt_tokens as f64;
        Ok(remaining(&b))
    }

    /// Charges generated tokens.
    pub fn charge(&self, tokens: u64) {
        if let Ok(mut b) = self.state.lock() {
            b.tokens -= tokens as f64;
        }
    }

    /// What is left now.
    pub fn remaining(&self, now: Instant) -> Remaining {
        match self.state.lock() {
            Ok(mut b) => {
                self.refill(&mut b, now);
                remaining(&b)
            }
            Err(_) => Remaining {
                requests: 0,
                tokens: 0,
            },
        }
    }
}

fn remaining(b: &Buckets) -> Remaining {
    Remaining {
        requests: b.requests.max(0.0) as u64,
        tokens: b.tokens.max(0.0) as u64,
    }
}

fn seconds(minutes: f64) -> u64 {
    ((minutes * 60.0).ceil() as u64).max(1)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn requests_per_minute_then_refill() {
        let limiter = RateLimiter::new(2, 1_000_000);
        let t0 = Instant::now();
        assert!(limiter.admit(1, t0).is_ok());
        assert_eq!(limiter.admit(1, t0).expect("second").requests, 0);
        let refused = limiter.admit(1, t0).expect_err("third");
        assert_eq!(refused.limit, Limit::Requests);
        assert_eq!(refused.retry_after, 30);
        assert!(limiter.admit(1, t0 + Duration::from_secs(31)).is_ok());
    }

    #[test]
    fn tokens_per_minute_counts_prompt_and_generated_tokens() {
        let limiter = RateLimiter::new(100, 600);
        let t0 = Instant::now();
        assert!(limiter.admit(100, t0).is_ok());
        limiter.charge(450);
        let refused = limiter.admit(100, t0).expect_err("tokens");
        assert_eq!(refused.limit, Limit::Tokens);
        // 50 left, 100 needed, 10 tokens/second.
        assert_eq!(refused.retry_after, 5);
        assert!(limiter.admit(100, t0 + Duration::from_secs(5)).is_ok());
    }

    #[test]
    fn a_huge_prompt_is_not_refused_forever() {
        let limiter = RateLimiter::new(100, 50);
        assert!(limiter.admit(500, Instant::now()).is_ok());
    }
}
