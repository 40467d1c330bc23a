//! One instance's load, read from the text exposition of its `/metrics`.

/// What one llama-server instance reported.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Sample {
    /// `llama_server_requests_in_flight`: requests being served, queued ones included.
    pub requests_in_flight: f64,
    /// `llama_server_queue_depth`: requests waiting for a batch slot.
    pub queue_depth: f64,
    /// `llama_server_completion_tokens_total`: generated tokens since the server started.
    pub completion_tokens: f64,
    /// `llama_server_kv_cache_reserved_tokens`.
    pub kv_reserved_tokens: f64,
    /// `llama_server_kv_cache_budget_tokens`.
    pub kv_budget_tokens: f64,
}

/// Why an exposition cannot be used.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SampleError {
    #[error("metric {0} is missing from /metrics")]
    Missing(&'static str),
    #[error("metric {name} has a value that is not a number: {value:?}")]
    NotANumber { name: String, value: String },
}

impl Sample {
    /// KV-cache reservation in percent of the budget (0 when the budget is unknown).
    pub fn kv_cache_percent(&self) -> f64 {
        if self.kv_budget_tokens > 0.0 {
            100.0 * self.kv_reserved_tokens / self.kv_budget_tokens
        } else {
            0.0
        }
    }

    /// Reads the metrics the autoscaler uses from a Prometheus or OpenMetrics text exposition.
    /// The load gauges must be present; the KV-cache ones may be absent (reported as 0).
    pub fn parse(text: &str) -> Result<Self, SampleError> {
        let mut sample = Sample::default();
        let mut seen = [false; 3];
        for line in text.lines() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.split_whitespace();
            let (Some(series), Some(value)) = (parts.next(), parts.next()) else {
                continue;
            };
            // Only unlabelled series are used; labelled ones are skipped.
            if series.contains('{') {
                continue;
            }
            let slot = match series {
                "llama_server_requests_in_flight" => {
                    seen[0] = true;
                    &mut sample.requests_in_flight
                }
                "llama_server_queue_depth" => {
                    seen[1] = true;
                    &mut sample.queue_depth
                }
                "llama_server_completion_tokens_total" => {
                    seen[2] = true;
                    &mut sample.completion_tokens
                }
                "llama_server_kv_cache_reserved_tokens" => &mut sample.kv_reserved_tokens,
                "llama_server_kv_cache_budget_tokens" => &mut sample.kv_budget_tokens,
                _ => continue,
            };
            *slot = value
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| SampleError::NotANumber {
                    name: series.to_owned(),
                    value: value.to_owned(),
                })?;
        }
        for (seen, name) in seen.iter().zip([
            "llama_server_requests_in_flight",
            "llama_server_queue_depth",
            "llama_server_completion_tokens_total",
        ]) {
            if !seen {
                return Err(SampleError::Missing(name));
            }
        }
        Ok(sample)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_servers_own_exposition() {
        let text = r#"# HELP llama_server_requests_in_flight Chat completion requests being served, queued ones included.
# TYPE llama_server_requests_in_flight gauge
llama_server_requests_in_flight 12
# TYPE llama_server_requests counter
llama_server_requests_total{route="/chat/completions",status="200"} 40
llama_server_completion_tokens_total 5120
llama_server_queue_depth 3
llama_server_kv_cache_reserved_tokens 3072
llama_server_kv_cache_budget_tokens 4096
# EOF
"#;
        let s = Sample::parse(text).expect("parse");
        assert_eq!(s.requests_in_flight, 12.0);
        assert_eq!(s.queue_depth, 3.0);
        assert_eq!(s.completion_tokens, 5120.0);
        assert_eq!(s.kv_cache_percent(), 75.0);
    }

    #[test]
    fn a_missing_load_gauge_is_an_error_not_zero() {
        let err =
            Sample::parse("llama_server_queue_depth 0\nllama_server_completion_tokens_total 1\n")
                .expect_err("must fail");
        assert_eq!(err, SampleError::Missing("llama_server_requests_in_flight"));
        let err = Sample::parse(
            "llama_server_requests_in_flight NaN\nllama_server_queue_depth 0\nllama_server_completion_tokens_total 1\n",
        )
        .expect_err("must fail");
        assert!(
            err.to_string().contains("llama_server_requests_in_flight"),
            "{err}"
        );
    }

    #[test]
    fn kv_percent_without_budget_is_zero() {
        let s = Sample::parse(
            "llama_server_requests_in_flight 0\nllama_server_queue_depth 0\nllama_server_completion_tokens_total 0\n",
        )
        .expect("parse");
        assert_eq!(s.kv_cache_percent(), 0.0);
    }
}
