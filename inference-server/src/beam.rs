//! Beam search (`use_beam_search` with `best_of` beams and temperature 0): keeps the `width`
//! most likely partial completions by summed log-probability, extends each by its most likely
//! tokens every step, and returns the `n` best finished ones by length-normalised score.
//! Driven by the scheduler one step at a time, like a sequence, with one batched forward over
//! its beams per step.

use candle_core::Tensor;

use crate::engine::error::Result;
use crate::engine::{KvCache, LlamaModel, LogitsFor, SequenceStep};
use crate::generation::{Completion, FinishReason, log_probability};
use crate::stop_strings::StopStrings;
use crate::tokenizer::LlamaTokenizer;

struct Beam {
    tokens: Vec<u32>,
    cache: KvCache,
    score: f64,
    /// The token to feed next (the prompt's remainder at first).
    input: Vec<u32>,
}

/// A finished hypothesis.
#[derive(Debug, Clone)]
struct Hypothesis {
    tokens: Vec<u32>,
    score: f64,
    finish: FinishReason,
}

/// One beam search in progress.
pub struct BeamSearch<'t> {
    tokenizer: &'t LlamaTokenizer,
    width: usize,
    n: usize,
    prompt_tokens: usize,
    max_tokens: usize,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    skip_special_tokens: bool,
    beams: Vec<Beam>,
    finished: Vec<Hypothesis>,
    done: bool,
}

impl std::fmt::Debug for BeamSearch<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BeamSearch")
            .field("width", &self.width)
            .field("beams", &self.beams.len())
            .field("finished", &self.finished.len())
            .finish_non_exhaustive()
    }
}

/// What a beam search needs besides the model.
#[derive(Debug, Clone)]
pub struct BeamRequest {
    pub prompt: Vec<u32>,
    pub width: usize,
    pub n: usize,
    pub max_tokens: usize,
    pub stop: Vec<String>,
    pub stop_token_ids: Vec<u32>,
    pub ignore_eos: bool,
    pub skip_special_tokens: bool,
}

impl<'t> BeamSearch<'t> {
    pub fn new(model: &LlamaModel, tokenizer: &'t LlamaTokenizer, request: BeamRequest) -> Self {
        let done = request.max_tokens == 0;
        Self {
            tokenizer,
            width: request.width.max(1),
            n: request.n.clamp(1, request.width.max(1)),
            prompt_tokens: request.prompt.len(),
            max_tokens: request.max_tokens,
            stop: request.stop,
            stop_token_ids: request.stop_token_ids,
            ignore_eos: request.ignore_eos,
            skip_special_tokens: request.skip_special_tokens,
            beams: vec![Beam {
                tokens: Vec::new(),
                cache: model.new_cache(),
                score: 0.0,
                input: request.prompt,
            }],
            finished: Vec::new(),
            done,
        }
    }

    pub fn is_finished(&self) -> bool {
        self.done
    }

    /// Beams alive (batch slots used).
    pub fn width(&self) -> usize {
        self.width
    }

    /// Tokens in the beams' caches.
    pub fn cached_tokens(&self) -> usize {
        self.beams.iter().map(|b| b.cache.len()).sum()
    }

    /// Runs one step: a forward over every live beam, then the best `width` extensions.
    pub fn step(&mut self, model: &LlamaModel) -> Result<()> {
        if self.done {
            return Ok(());
        }
        let mut steps: Vec<SequenceStep<'_>> = self
            .beams
            .iter_mut()
            .map(|b| SequenceStep {
                tokens: &b.input,
                cache: &mut b.cache,
                logits: LogitsFor::Last,
            })
            .collect();
        let logits: Vec<Tensor> = model.forward(&mut steps)?;
        drop(steps);
        // Every beam's best `width` continuations, scored by summed log-probability.
        let mut candidates: Vec<(usize, u32, f64)> = Vec::new();
        for (parent, logits) in logits.iter().enumerate() {
            let row: Vec<f32> = logits.flatten_all()?.to_vec1()?;
            let (_, top) = log_probability(&row, 0, self.width);
            let base = self.beams[parent].score;
            candidates.extend(
                top.into_iter()
                    .map(|(token, lp)| (parent, token, base + f64::from(lp))),
            );
        }
        candidates.sort_by(|a, b| b.2.total_cmp(&a.2).then(a.1.cmp(&b.1)));
        let mut uses = vec![0usize; self.beams.len()];
        let mut chosen = Vec::new();
        for (parent, token, score) in candidates {
            if chosen.len() >= self.width {
                break;
            }
            let mut tokens = self.beams[parent].tokens.clone();
            let is_stop = (!self.ignore_eos && self.tokenizer.is_stop(token))
                || self.stop_token_ids.contains(&token);
            tokens.push(token);
            if is_stop {
                self.finished.push(Hypothesis {
                    tokens,
                    score,
                    finish: FinishReason::Stop,
                });
                continue;
            }
            if tokens.len() >= self.max_tokens {
                self.finished.push(Hypothesis {
                    tokens,
                    score,
                    finish: FinishReason::Length,
                });
                continue;
            }
            uses[parent] += 1;
            chosen.push((parent, tokens, score));
        }
        // The last child of a parent takes its cache; earlier children get copies.
        let mut remaining = uses.clone();
        let mut parents: Vec<Option<KvCache>> =
            self.beams.drain(..).map(|b| Some(b.cache)).collect();
        let mut beams = Vec::with_capacity(chosen.len());
        for (parent, tokens, score) in chosen {
            remaining[parent] -= 1;
            let cache = if remaining[parent] == 0 {
                parents[parent].take()
            } else {
                parents[parent].as_ref().map(KvCache::fork).transpose()?
            };
            let Some(cache) = cache else { continue };
            let input = vec![*tokens.last().unwrap_or(&0)];
            beams.push(Beam {
                tokens,
                cache,
                score,
                input,
            });
        }
        self.beams = beams;
        if self.beams.is_empty() || self.finished.len() >= self.width {
            self.done = true;
        }
        Ok(())
    }

    /// The `n` best hypotheses (finished first, then live beams), best first.
    pub fn completions(&self) -> Vec<Completion> {
        let normalised = |h: &Hypothesis| h.score / h.tokens.len().max(1) as f64;
        let mut all: Vec<Hypothesis> = self.finished.clone();
        all.extend(self.beams.iter().map(|b| Hypothesis {
            tokens: b.tokens.clone(),
            score: b.score,
            finish: FinishReason::Length,
        }));
        all.sort_by(|a, b| normalised(b).total_cmp(&normalised(a)));
        all.truncate(self.n);
        all.into_iter()
            .map(|h| {
                let visible: Vec<u32> = h
                    .tokens
                    .iter()
                    .copied()
                    .filter(|&t| {
                        !(h.finish == FinishReason::Stop
                            && h.tokens.last() == Some(&t)
                            && (self.tokenizer.is_stop(t) || self.stop_token_ids.contains(&t)))
                    })
                    .collect();
                let text = self
                    .tokenizer
                    .decode(&visible, self.skip_special_tokens)
                    .unwrap_or_default();
                let mut stops = StopStrings::new(&self.stop);
                let check = stops.push(&text);
                let (text, finish) = if check.stopped {
                    (check.emit, FinishReason::Stop)
                } else {
                    (text, h.finish)
                };
                Completion {
                    text,
                    completion_tokens: h.tokens.len(),
                    token_ids: h.tokens,
                    prompt_tokens: self.prompt_tokens,
                    finish_reason: finish,
                    cached_tokens: 0,
                    cumulative_logprob: h.score,
                }
            })
            .collect()
    }
}
