//! Choosing the next token from logits: greedy, or temperature + nucleus (top-p) sampling with
//! a seed, after OpenAI-style presence and frequency penalties.

use std::collections::HashMap;

use crate::engine::error::{EngineError, Result};
use crate::rng::SplitMix64;

/// How to pick tokens. The defaults are the Azure API's: temperature 1, top_p 1, no penalties.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplingParams {
    /// 0 means greedy (always the most likely token).
    pub temperature: f32,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`.
    pub top_p: f32,
    /// Same seed, same prompt, same parameters → same tokens. `None` draws a fresh seed.
    pub seed: Option<u64>,
    /// Subtracted once from the logit of every token already generated, in [-2, 2].
    pub presence_penalty: f32,
    /// Subtracted from a token's logit per time it was generated, in [-2, 2].
    pub frequency_penalty: f32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            seed: None,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
        }
    }
}

impl SamplingParams {
    /// Deterministic argmax decoding.
    pub fn greedy() -> Self {
        Self {
            temperature: 0.0,
            ..Self::default()
        }
    }

    /// Checks the ranges the API allows.
    pub fn validate(&self) -> Result<()> {
        let bad = |name, reason: String| Err(EngineError::InvalidSampling { name, reason });
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return bad(
                "temperature",
                format!("{} is not a number ≥ 0", self.temperature),
            );
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("{} is not in (0, 1]", self.top_p));
        }
        for (name, value) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(-2.0..=2.0).contains(&value) {
                return bad(name, format!("{value} is not in [-2, 2]"));
            }
        }
        Ok(())
    }
}

/// The sampling state of one sequence: its random stream and the counts of its tokens.
#[derive(Debug, Clone)]
pub struct Sampler {
    params: SamplingParams,
    rng: SplitMix64,
    counts: HashMap<u32, u32>,
}

impl Sampler {
    /// A sampler for one completion.
    pub fn new(params: SamplingParams) -> Result<Self> {
        params.validate()?;
        let seed = params.seed.unwrap_or_else(fresh_seed);
        Ok(Self {
            rng: SplitMix64::for_stream(seed, "sampling"),
            params,
            counts: HashMap::new(),
        })
    }

    /// Picks the next token from `logits` (one per vocabulary entry) and records it for the
    /// penalties of later steps.
    pub fn sample(&mut self, logits: &[f32]) -> Result<u32> {
        if logits.is_empty() {
            return Err(EngineError::InvalidInput("no logits to sample from".into()));
        }
        let penalised;
        let logits = if self.has_penalties() {
            let mut copy = logits.to_vec();
            self.apply_penalties(&mut copy);
            penalised = copy;
            &penalised[..]
        } else {
            logits
        };
        let token = if self.params.temperature == 0.0 {
            argmax(logits)
        } else {
            self.sample_top_p(logits)
        };
        self.record(token);
        Ok(token)
    }

    /// Whether the next token is simply the most likely one: greedy, with no penalties to
    /// apply first (so it can be picked without the logits, as the device's argmax).
    pub fn is_plain_greedy(&self) -> bool {
        self.params.temperature == 0.0 && !self.has_penalties()
    }

    /// Records a token picked elsewhere (the device's argmax) for the penalties of later steps.
    pub fn record(&mut self, token: u32) {
        *self.counts.entry(token).or_insert(0) += 1;
    }

    fn has_penalties(&self) -> bool {
        self.params.presence_penalty != 0.0 || self.params.frequency_penalty != 0.0
    }

    fn apply_penalties(&self, logits: &mut [f32]) {
        let (presence, frequency) = (self.params.presence_penalty, self.params.frequency_penalty);
        for (&token, &count) in &self.counts {
            if let Some(logit) = logits.get_mut(token as usize) {
                *logit -= presence + frequency * count as f32;
            }
        }
    }

    fn sample_top_p(&mut self, logits: &[f32]) -> u32 {
        let temperature = f64::from(self.params.temperature);
        let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut probs: Vec<(u32, f64)> = logits
            .iter()
            .enumerate()
            .map(|(i, &l)| (i as u32, (f64::from(l - max) / temperature).exp()))
            .collect();
        let total: f64 = probs.iter().map(|(_, p)| p).sum();
        let nucleus: &[(u32, f64)] = if self.params.top_p >= 1.0 {
            &probs
        } else {
            let threshold = f64::from(self.params.top_p) * total;
            nucleus(&mut probs, threshold)
        };
        let mass: f64 = nucleus.iter().map(|(_, p)| p).sum();
        let mut target = self.rng.next_f64() * mass;
        for (token, p) in nucleus {
            target -= p;
            if target < 0.0 {
                return *token;
            }
        }
        nucleus.last().map_or(0, |(token, _)| *token)
    }
}

/// The most likely entries of `probs` whose mass first reaches `threshold`, most likely first
/// (ties by id, so the result never depends on the selection algorithm). Selects a growing
/// top-k instead of sorting the whole vocabulary.
fn nucleus(probs: &mut [(u32, f64)], threshold: f64) -> &[(u32, f64)] {
    let order = |a: &(u32, f64), b: &(u32, f64)| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0));
    let n = probs.len();
    let mut k = n.min(64);
    loop {
        if k < n {
            probs.select_nth_unstable_by(k - 1, order);
        }
        probs[..k].sort_unstable_by(order);
        let mut mass = 0.0;
        for (i, (_, p)) in probs[..k].iter().enumerate() {
            mass += p;
            if mass >= threshold {
                return &probs[..=i];
            }
        }
        if k == n {
            return probs;
        }
        k = (k * 4).min(n);
    }
}

/// Index of the largest logit; the lowest index among equals (like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn fresh_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, seed: u64) -> SamplingParams {
        SamplingParams {
            temperature,
            top_p,
            seed: Some(seed),
            ..SamplingParams::default()
        }
    }

    fn draw(params: SamplingParams, logits: &[f32], n: usize) -> Vec<u32> {
        let mut sampler = Sampler::new(params).expect("valid");
        (0..n)
            .map(|_| sampler.sample(logits).expect("sample"))
            .collect()
    }

    #[test]
    fn greedy_takes_the_first_maximum() {
        assert_eq!(
            draw(SamplingParams::greedy(), &[0.1, 3.0, 3.0, -1.0], 3),
            vec![1, 1, 1]
        );
    }

    #[test]
    fn same_seed_same_tokens_other_seed_other_tokens() {
        let logits: Vec<f32> = (0..50).map(|i| (i % 7) as f32 * 0.3).collect();
        let a = draw(params(1.0, 1.0, 5), &logits, 40);
        assert_eq!(a, draw(params(1.0, 1.0, 5), &logits, 40));
        assert_ne!(a, draw(params(1.0, 1.0, 6), &logits, 40));
    }

    #[test]
    fn top_p_only_draws_from_the_nucleus() {
        // p ≈ [0.64, 0.24, 0.09, 0.03]: top_p 0.8 keeps tokens 0 and 1.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let tokens = draw(params(1.0, 0.8, 1), &logits, 500);
        assert!(tokens.iter().all(|&t| t < 2), "{tokens:?}");
        assert!(tokens.contains(&0) && tokens.contains(&1));
        let share = tokens.iter().filter(|&&t| t == 0).count() as f64 / 500.0;
        // Renormalised within the nucleus: 0.64 / 0.88 ≈ 0.73.
        assert!((share - 0.73).abs() < 0.07, "share of token 0: {share}");
    }

    #[test]
    fn nucleus_selection_equals_a_full_sort_prefix() {
        let mut rng = SplitMix64::new(9);
        for n in [1usize, 10, 64, 65, 1000, 5000] {
            // Coarse values so that ties occur.
            let probs: Vec<(u32, f64)> = (0..n)
                .map(|i| (i as u32, (rng.next_f64() * 50.0).floor().exp()))
                .collect();
            let total: f64 = probs.iter().map(|(_, p)| p).sum();
            let mut sorted = probs.clone();
            sorted.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            for top_p in [0.01, 0.5, 0.9, 0.999999] {
                let mut work = probs.clone();
                let got = nucleus(&mut work, top_p * total).to_vec();
                let mut mass = 0.0;
                let want_len = sorted
                    .iter()
                    .position(|(_, p)| {
                        mass += p;
                        mass >= top_p * total
                    })
                    .map_or(n, |i| i + 1);
                assert_eq!(got, sorted[..want_len].to_vec(), "n {n} top_p {top_p}");
            }
        }
    }

    #[test]
    fn low_temperature_concentrates_on_the_top_token() {
        let tokens = draw(params(0.05, 1.0, 3), &[1.0, 0.5, 0.0], 200);
        assert!(tokens.iter().all(|&t| t == 0));
    }

    #[test]
    fn penalties_push_repeated_tokens_down() {
        let logits = [1.0f32, 0.9, 0.0];
        let mut frequency = Sampler::new(SamplingParams {
            frequency_penalty: 0.2,
            ..SamplingParams::greedy()
        })
        .expect("valid");
        let tokens: Vec<u32> = (0..4)
            .map(|_| frequency.sample(&logits).expect("ok"))
            .collect();
        // 1.0 → 0.8 after one use, below 0.9; then 0.9 → 0.7 below 0.8; …
        assert_eq!(tokens, vec![0, 1, 0, 1]);
        let mut presence = Sampler::new(SamplingParams {
            presence_penalty: 2.0,
            ..SamplingParams::greedy()
        })
        .expect("valid");
        let tokens: Vec<u32> = (0..3)
            .map(|_| presence.sample(&logits).expect("ok"))
            .collect();
        assert_eq!(tokens, vec![0, 1, 2]);
    }

    #[test]
    fn out_of_range_parameters_are_rejected() {
        for bad in [
            SamplingParams {
                temperature: -0.1,
                ..SamplingParams::default()
            },
            SamplingParams {
                temperature: f32::NAN,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 0.0,
                ..SamplingParams::default()
            },
            SamplingParams {
                top_p: 1.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                presence_penalty: 2.5,
                ..SamplingParams::default()
            },
            SamplingParams {
                frequency_penalty: -3.0,
                ..SamplingParams::default()
            },
        ] {
            assert!(Sampler::new(bad.clone()).is_err(), "{bad:?}");
        }
        assert!(Sampler::new(SamplingParams::greedy()).is_ok_and(|mut s| s.sample(&[]).is_err()));
    }
}
