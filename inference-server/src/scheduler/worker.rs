//! The engine thread's loop: take in new requests, admit what fits, run one batched step,
//! hand out the tokens, retire finished and cancelled sequences.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::Instant;

use tokio::sync::mpsc::UnboundedSender;

use super::prefix_cache::PrefixCache;
use super::{Job, SchedulerLimits, SequenceEvent};
use crate::beam::{BeamRequest, BeamSearch};
use crate::engine::{LlamaModel, SequenceStep};
use crate::generation::ActiveSequence;
use crate::metrics::EngineGauges;
use crate::tokenizer::LlamaTokenizer;

pub(super) struct Worker {
    model: LlamaModel,
    tokenizer: Arc<LlamaTokenizer>,
    limits: SchedulerLimits,
    queued: Arc<AtomicUsize>,
    gauges: EngineGauges,
}

struct Running<'t> {
    sequence: ActiveSequence<'t>,
    events: UnboundedSender<SequenceEvent>,
    reserved: usize,
    /// A step failed for it: its cache may be inconsistent, so the prefix cache does not
    /// keep it.
    failed: bool,
}

/// Where a new sequence's prompt finds keys and values already computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reuse {
    /// A prefix-cache entry: copied, or taken over when `take`.
    Kept { id: u64, len: usize, take: bool },
    /// A sequence in the running batch (copied).
    Running { index: usize, len: usize },
}

struct RunningBeam<'t> {
    search: BeamSearch<'t>,
    events: UnboundedSender<SequenceEvent>,
    reserved: usize,
}

impl Worker {
    pub(super) fn new(
        model: LlamaModel,
        tokenizer: Arc<LlamaTokenizer>,
        limits: SchedulerLimits,
        queued: Arc<AtomicUsize>,
        gauges: EngineGauges,
    ) -> Self {
        // The pool grows to the budget's rows and, where kept prefixes can give way, no
        // further (see `room_for`).
        model.kv_pool().set_row_cap(limits.kv_cache_tokens);
        Self {
            model,
            tokenizer,
            limits,
            queued,
            gauges,
        }
    }

    /// Runs until every [`super::EngineHandle`] is gone and no work is left.
    pub(super) fn run(self, inbox: Receiver<Job>) {
        let tokenizer = Arc::clone(&self.tokenizer);
        let mut waiting: VecDeque<Job> = VecDeque::new();
        let mut running: Vec<Running<'_>> = Vec::new();
        let mut beams: Vec<RunningBeam<'_>> = Vec::new();
        let mut reserved = 0usize;
        let mut prefix = PrefixCache::default();
        let mut open = true;
        loop {
            // Intake: block only when there is nothing to do.
            if running.is_empty() && beams.is_empty() && waiting.is_empty() {
                self.publish(&waiting, &running, reserved, &prefix);
                if !open {
                    return;
                }
                match inbox.recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(_) => return,
                }
            }
            loop {
                match inbox.try_recv() {
                    Ok(job) => waiting.push_back(job),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        open = false;
                        break;
                    }
                }
            }
            // Requests whose clients left while waiting never start.
            let before = waiting.len();
            waiting.retain(|job| !job.events.is_closed());
            self.queued
                .fetch_sub(before - waiting.len(), Ordering::AcqRel);

            // Admission, first come first served.
            while running.len() < self.limits.max_batch_size {
                let Some(job) = waiting.front() else { break };
                let prompt = job.request.prompt.len();
                let budget = self.limits.kv_cache_tokens;
                // The context served (`contextLength`, at most the model's: see
                // `EngineHandle::start`) bounds prompt and completion together, as the prompt
                // check on submission does.
                let room = self
                    .limits
                    .context_tokens
                    .min(budget)
                    .saturating_sub(prompt);
                let want = prompt + job.request.max_tokens.unwrap_or(room).min(room);
                if reserved + want > budget && !running.is_empty() {
                    break;
                }
                let width = job.beam.map_or(1, |(width, _)| width);
                let reuse = if self.limits.prefix_cache && job.beam.is_none() {
                    best_source(&prefix, &running, &job.request.prompt)
                } else {
                    None
                };
                if self.limits.prefix_cache
                    && job.beam.is_none()
                    && worth_waiting(&running, &job.request.prompt, reuse)
                {
                    // A running sequence is computing much of this prompt right now (the
                    // other choices of an `n` > 1 request, a burst sharing a system prompt):
                    // computing it twice would only slow both down. It is copied once there.
                    break;
                }
                let reuse = make_room(&mut prefix, reuse, budget, reserved + want * width);
                let Some(mut job) = waiting.pop_front() else {
                    break;
                };
                self.queued.fetch_sub(1, Ordering::AcqRel);
                self.gauges
                    .queue_seconds
                    .observe(job.enqueued.elapsed().as_secs_f64());
                job.request.max_tokens = Some(want - prompt);
                if let Some((width, n)) = job.beam {
                    let r = job.request;
                    let search = BeamSearch::new(
                        &self.model,
                        &tokenizer,
                        BeamRequest {
                            prompt: r.prompt,
                            width,
                            n,
                            max_tokens: want - prompt,
                            stop: r.stop,
                            stop_token_ids: r.stop_token_ids,
                            ignore_eos: r.ignore_eos,
                            skip_special_tokens: r.skip_special_tokens,
                        },
                    );
                    let _ = job.events.send(SequenceEvent::Started { cached_tokens: 0 });
                    reserved += want * width;
                    beams.push(RunningBeam {
                        search,
                        events: job.events,
                        reserved: want * width,
                    });
                    continue;
                }
                match ActiveSequence::new(&self.model, &tokenizer, job.request) {
                    Ok(mut sequence) => {
                        let cached_tokens =
                            apply_reuse(&mut sequence, reuse, &mut prefix, &running);
                        if self.limits.prefix_cache {
                            self.gauges.prefix_prompt_tokens.inc_by(prompt as u64);
                            self.gauges.prefix_hit_tokens.inc_by(cached_tokens as u64);
                        }
                        let _ = job.events.send(SequenceEvent::Started { cached_tokens });
                        reserved += want;
                        running.push(Running {
                            sequence,
                            events: job.events,
                            reserved: want,
                            failed: false,
                        });
                    }
                    Err(err) => {
                        let _ = job.events.send(SequenceEvent::Failed(err.to_string()));
                    }
                }
            }
            // Cancelled or already finished (max_tokens 0) sequences leave before the step.
            running.retain_mut(|entry| {
                let keep = !entry.events.is_closed() && !entry.sequence.is_finished();
                if !keep {
                    reserved -= entry.reserved;
                    if entry.sequence.is_finished() {
                        finish(entry);
                    }
                    self.keep_prefix(&mut prefix, entry);
                }
                keep
            });
            self.step_beams(&mut beams, &mut reserved);
            self.publish(&waiting, &running, reserved, &prefix);
            if running.is_empty() {
                continue;
            }
            self.step(&mut running, &mut prefix);
            running.retain_mut(|entry| {
                let done = entry.sequence.is_finished() || entry.events.is_closed();
                if done {
                    reserved -= entry.reserved;
                    if entry.sequence.is_finished() {
                        finish(entry);
                    }
                    self.keep_prefix(&mut prefix, entry);
                }
                !done
            });
        }
    }

    /// One batched forward over every running sequence: decoding sequences feed one token,
    /// prefilling ones share the chunk budget (the oldest first).
    fn step(&self, running: &mut [Running<'_>], prefix: &mut PrefixCache) {
        let started = Instant::now();
        let mut chunk_left = self.limits.prefill_chunk_tokens;
        let mut selected: Vec<usize> = Vec::with_capacity(running.len());
        let mut chunks: Vec<usize> = Vec::with_capacity(running.len());
        for (index, entry) in running.iter().enumerate() {
            if entry.sequence.in_prefill() {
                if chunk_left == 0 {
                    continue;
                }
                let take = entry.sequence.next_step_tokens(chunk_left);
                chunk_left = chunk_left.saturating_sub(take);
                chunks.push(take);
            } else {
                chunks.push(1);
            }
            selected.push(index);
        }
        // Room for the step's tokens first, within the budget's rows while kept prefixes can
        // give way; a sequence that gets none fails alone instead of failing the step.
        let mut ready = Vec::with_capacity(selected.len());
        // A chunk is the number of tokens the sequence feeds: `next_step_tokens` gives the
        // same count again for it.
        for (&index, &chunk) in selected.iter().zip(&chunks) {
            let entry = &mut running[index];
            match room_for(&mut entry.sequence, chunk, prefix, None) {
                Ok(()) => ready.push((index, chunk)),
                Err(err) => fail(entry, &format!("no room in the key/value cache: {err}")),
            }
        }
        let (selected, chunks): (Vec<usize>, Vec<usize>) = ready.into_iter().unzip();
        if selected.is_empty() {
            return;
        }
        let mut steps: Vec<SequenceStep<'_>> = Vec::with_capacity(selected.len());
        let mut picked: Vec<&mut Running<'_>> = running
            .iter_mut()
            .enumerate()
            .filter(|(i, _)| selected.contains(i))
            .map(|(_, entry)| entry)
            .collect();
        for (entry, &chunk) in picked.iter_mut().zip(&chunks) {
            steps.push(entry.sequence.step(chunk));
        }
        let tokens: usize = steps.iter().map(|s| s.tokens.len()).sum();
        let result = self.model.forward(&mut steps);
        drop(steps);
        match result {
            Ok(logits) => {
                for (entry, logits) in picked.into_iter().zip(logits) {
                    match entry.sequence.advance(&logits) {
                        Ok(Some(output)) => {
                            let _ = entry.events.send(SequenceEvent::Token(output));
                        }
                        Ok(None) => {}
                        Err(err) => fail(entry, &err.to_string()),
                    }
                }
            }
            Err(err) => {
                tracing::error!(error = %err, "batched forward failed");
                for entry in picked {
                    fail(entry, &err.to_string());
                }
            }
        }
        self.gauges.step_tokens.inc_by(tokens as u64);
        self.gauges
            .step_seconds
            .observe(started.elapsed().as_secs_f64());
    }

    /// One step of every beam search; finished or abandoned ones leave.
    fn step_beams(&self, beams: &mut Vec<RunningBeam<'_>>, reserved: &mut usize) {
        beams.retain_mut(|entry| {
            if entry.events.is_closed() {
                *reserved -= entry.reserved;
                return false;
            }
            if let Err(err) = entry.search.step(&self.model) {
                let _ = entry.events.send(SequenceEvent::Failed(err.to_string()));
                *reserved -= entry.reserved;
                return false;
            }
            if entry.search.is_finished() {
                for completion in entry.search.completions() {
                    let _ = entry.events.send(SequenceEvent::Finished(completion));
                }
                *reserved -= entry.reserved;
                return false;
            }
            true
        });
    }

    /// Hands a leaving sequence's cache to the prefix cache (when it is on and the sequence
    /// did not fail).
    fn keep_prefix(&self, prefix: &mut PrefixCache, entry: &mut Running<'_>) {
        if self.limits.prefix_cache && !entry.failed {
            let (tokens, cache) = entry.sequence.take_cache();
            prefix.insert(tokens, cache);
        }
    }

    fn publish(
        &self,
        waiting: &VecDeque<Job>,
        running: &[Running<'_>],
        reserved: usize,
        prefix: &PrefixCache,
    ) {
        self.gauges.prefix_cache_tokens.set(prefix.held() as i64);
        self.gauges
            .kv_pool_tokens
            .set(self.model.kv_pool().rows() as i64);
        self.gauges.queue_depth.set(waiting.len() as i64);
        self.gauges.running.set(running.len() as i64);
        self.gauges.kv_reserved_tokens.set(reserved as i64);
        let cached: usize = running.iter().map(|r| r.sequence.cached_tokens()).sum();
        self.gauges.kv_cached_tokens.set(cached as i64);
    }
}

/// Sends the completion of a finished sequence.
fn finish(entry: &mut Running<'_>) {
    let completion = entry.sequence.completion();
    let _ = entry.events.send(SequenceEvent::Finished(completion));
}

/// Ends a sequence with an error; it leaves the batch before the next step.
fn fail(entry: &mut Running<'_>, message: &str) {
    let _ = entry.events.send(SequenceEvent::Failed(message.to_owned()));
    entry.failed = true;
    // Closing our side makes `is_closed` true, so the sequence is retired.
    entry.events = closed_sender();
}

fn closed_sender() -> UnboundedSender<SequenceEvent> {
    let (sender, _) = tokio::sync::mpsc::unbounded_channel();
    sender
}

/// The most leading prompt tokens whose keys and values some kept entry or running sequence
/// already holds, leaving at least two prompt tokens to compute: the last one's logits give
/// the first sampled token, and a step of two or more takes the prompt kernels, so the reused
/// and computed keys and values are those of the prompt computed without the cache, bit for
/// bit (see `generation::prompt_step`).
fn best_source(prefix: &PrefixCache, running: &[Running<'_>], prompt: &[u32]) -> Option<Reuse> {
    let most = reusable(prompt);
    let kept = prefix.best(prompt).map(|m| Reuse::Kept {
        id: m.id,
        len: m.len.min(most),
        take: m.whole,
    });
    let live = running
        .iter()
        .enumerate()
        .map(|(index, r)| (index, r.sequence.shared_prefix(prompt).min(most)))
        .max_by_key(|&(_, len)| len)
        .map(|(index, len)| Reuse::Running { index, len });
    [kept, live]
        .into_iter()
        .flatten()
        .filter(|r| reuse_len(*r) > 0)
        .max_by_key(|r| reuse_len(*r))
}

/// Fewest shared prompt tokens a new sequence waits for another's prefill to compute.
const WAIT_FOR_SHARED_TOKENS: usize = 64;

/// Whether a running sequence still feeding its prompt shares so much of `prompt` (at least
/// [`WAIT_FOR_SHARED_TOKENS`] and half of it), more than can be reused now, that the new
/// sequence should wait for that prefill and copy it. The wait ends with that sequence's
/// prefill (or its end): prefilling sequences are fed every step.
fn worth_waiting(running: &[Running<'_>], prompt: &[u32], reuse: Option<Reuse>) -> bool {
    let now = reuse.map_or(0, reuse_len);
    let most = reusable(prompt);
    running
        .iter()
        .filter(|r| r.sequence.in_prefill())
        .map(|r| r.sequence.prompt_overlap(prompt).min(most))
        .any(|shared| {
            shared >= WAIT_FOR_SHARED_TOKENS && 2 * shared >= prompt.len() && shared > now
        })
}

/// The most prompt tokens a new sequence takes from elsewhere (see [`best_source`]).
fn reusable(prompt: &[u32]) -> usize {
    prompt.len().saturating_sub(2)
}

fn reuse_len(reuse: Reuse) -> usize {
    match reuse {
        Reuse::Kept { len, .. } | Reuse::Running { len, .. } => len,
    }
}

/// Evicts kept entries, least recently used first, until `needed` tokens of the budget are
/// free beside them, sparing the entry `reuse` will copy. When even that one is in the way,
/// it is taken over instead of copied.
fn make_room(
    prefix: &mut PrefixCache,
    reuse: Option<Reuse>,
    budget: usize,
    needed: usize,
) -> Option<Reuse> {
    let spare = match reuse {
        Some(Reuse::Kept { id, .. }) => Some(id),
        _ => None,
    };
    prefix.evict_to(budget.saturating_sub(needed), spare);
    let over = needed + prefix.held() > budget;
    match reuse {
        Some(Reuse::Kept { id, len, take }) => Some(Reuse::Kept {
            id,
            len,
            take: take || over,
        }),
        other => other,
    }
}

/// Makes room for `tokens` more tokens of `sequence` in the key/value pool without growing
/// it past its cap (the budget's rows), evicting kept entries (least recently used first,
/// never `spare`) while the cap is in the way: kept entries scattered over the pool must not
/// make it grow. Once none is left to evict the pool grows past the cap, as it would without
/// a prefix cache (running sequences' runs can be scattered too).
fn room_for(
    sequence: &mut ActiveSequence<'_>,
    tokens: usize,
    prefix: &mut PrefixCache,
    spare: Option<u64>,
) -> crate::engine::Result<()> {
    while !sequence.reserve_cache(tokens, true)? {
        if !prefix.evict_oldest(spare) {
            sequence.reserve_cache(tokens, false)?;
            break;
        }
    }
    Ok(())
}

/// Gives a new sequence the keys and values `reuse` points at; returns the prompt tokens it
/// got. A failed copy only costs the time of computing the prompt.
fn apply_reuse(
    sequence: &mut ActiveSequence<'_>,
    reuse: Option<Reuse>,
    prefix: &mut PrefixCache,
    running: &[Running<'_>],
) -> usize {
    let Some(reuse) = reuse else { return 0 };
    let result = match reuse {
        Reuse::Kept {
            id,
            len,
            take: true,
        } => prefix
            .take(id)
            .map(|cache| sequence.adopt_cache(cache, len)),
        Reuse::Kept {
            id,
            len,
            take: false,
        } => match room_for(sequence, len, prefix, Some(id)) {
            Err(err) => Some(Err(err)),
            Ok(()) => prefix
                .cache(id)
                .map(|cache| sequence.reuse_prefix(cache, len)),
        },
        Reuse::Running { index, len } => match room_for(sequence, len, prefix, None) {
            Err(err) => Some(Err(err)),
            Ok(()) => running
                .get(index)
                .map(|r| sequence.reuse_prefix(r.sequence.cache(), len)),
        },
    };
    match result {
        Some(Ok(())) => reuse_len(reuse),
        Some(Err(err)) => {
            tracing::warn!(error = %err, "the prefix cache could not be reused; computing the whole prompt");
            0
        }
        None => 0,
    }
}
