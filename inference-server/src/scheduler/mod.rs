//! Continuous batching: one engine thread owns the model and runs every admitted sequence
//! through one batched forward per step. HTTP handlers talk to it only through an
//! [`EngineHandle`]: they submit a [`GenerationRequest`] and read [`SequenceEvent`]s back.
//!
//! - Admission is bounded: at most `max_queue` requests wait; beyond that `submit` answers
//!   [`SubmitError::Overloaded`] at once (the HTTP layer's 429).
//! - A waiting request joins the running batch between two steps when a batch slot and its
//!   KV-cache reservation (prompt plus `max_tokens`) fit the budget; first come, first served.
//! - Prompts are fed in chunks of at most `prefill_chunk_tokens` per step, shared by all
//!   prefilling sequences, so a long prompt never stalls the sequences already decoding.
//! - Dropping the event receiver (the client went away) cancels the sequence; its cache is
//!   freed before the next step.

mod prefix_cache;
mod worker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

use tokio::sync::mpsc;

use crate::engine::LlamaModel;
use crate::generation::{Completion, GenerationRequest, TokenOutput};
use crate::metrics::EngineGauges;
use crate::tokenizer::LlamaTokenizer;

/// Limits of the scheduler.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SchedulerLimits {
    /// The context window served: the model's, or less when configured.
    pub context_tokens: usize,
    pub max_batch_size: usize,
    pub kv_cache_tokens: usize,
    pub max_queue: usize,
    pub prefill_chunk_tokens: usize,
    /// Keep the keys and values of sequences that leave the batch for prompts that start
    /// with the same tokens (see `prefix_cache`).
    pub prefix_cache: bool,
}

/// What the engine reports about one sequence, in order: tokens, then exactly one of
/// `Finished` or `Failed`.
#[derive(Debug)]
pub enum SequenceEvent {
    /// The sequence left the queue and its prompt is being processed; `cached_tokens` of
    /// the prompt's tokens came from the prefix cache.
    Started {
        cached_tokens: usize,
    },
    Token(TokenOutput),
    Finished(Completion),
    Failed(String),
}

/// Why a request was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    #[error("the server is at capacity: {queued} requests are already waiting")]
    Overloaded { queued: usize },
    #[error(
        "the prompt has {prompt} tokens; this deployment accepts at most {limit} prompt tokens"
    )]
    PromptTooLong { prompt: usize, limit: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("the engine has stopped")]
    Stopped,
}

/// One request on its way to the engine thread.
struct Job {
    request: GenerationRequest,
    /// Beam search with (width, n) instead of sampling one sequence.
    beam: Option<(usize, usize)>,
    events: mpsc::UnboundedSender<SequenceEvent>,
    enqueued: Instant,
}

/// Owned by the engine thread: clears the running flag when the thread ends, however it ends,
/// and logs a panic's end as an error.
struct RunningFlag(Arc<AtomicBool>);

impl Drop for RunningFlag {
    fn drop(&mut self) {
        self.0.store(false, Ordering::Release);
        if std::thread::panicking() {
            tracing::error!(
                "the engine thread stopped after a panic: requests fail from now on and \
                 /health/live answers 503 so that the server is restarted"
            );
        }
    }
}

/// The HTTP side's handle on the engine thread. Cheap to clone.
#[derive(Clone)]
pub struct EngineHandle {
    jobs: std::sync::mpsc::Sender<Job>,
    queued: Arc<AtomicUsize>,
    /// Cleared when the engine thread ends, by return or by panic.
    running: Arc<AtomicBool>,
    /// Its `context_tokens` is at most the model's window.
    limits: SchedulerLimits,
}

impl std::fmt::Debug for EngineHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EngineHandle")
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl EngineHandle {
    /// Starts the engine thread, which owns `model` until every handle is dropped.
    pub fn start(
        model: LlamaModel,
        tokenizer: Arc<LlamaTokenizer>,
        limits: SchedulerLimits,
        gauges: EngineGauges,
    ) -> std::io::Result<Self> {
        let (jobs, inbox) = std::sync::mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        // The context served never exceeds the model's: the handle's prompt check and the
        // worker's admission both read it from here.
        let limits = SchedulerLimits {
            context_tokens: limits.context_tokens.min(model.context_length()),
            ..limits
        };
        let worker = worker::Worker::new(model, tokenizer, limits, Arc::clone(&queued), gauges);
        let running = Arc::new(AtomicBool::new(true));
        let ended = RunningFlag(Arc::clone(&running));
        std::thread::Builder::new()
            .name("llama-engine".into())
            .spawn(move || {
                let _ended = ended;
                worker.run(inbox)
            })?;
        Ok(Self {
            jobs,
            queued,
            running,
            limits,
        })
    }

    /// Whether the engine thread still runs. It ends only when every handle is dropped, or
    /// when a step panics: then no request can be served again, and the server's liveness
    /// probe fails so that the pod is restarted.
    pub fn is_running(&self) -> bool {
        self.running.load(Ordering::Acquire)
    }

    /// The model's context window.
    pub fn context_length(&self) -> usize {
        self.limits.context_tokens
    }

    /// Most prompt tokens a request may have: one token must fit after it, in the context and
    /// in the KV budget.
    pub fn max_prompt_tokens(&self) -> usize {
        self.limits
            .context_tokens
            .min(self.limits.kv_cache_tokens)
            .saturating_sub(1)
    }

    /// Requests waiting for a batch slot.
    pub fn queued(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    /// Queues a request. Events arrive on the returned receiver; dropping it cancels.
    pub fn submit(
        &self,
        request: GenerationRequest,
    ) -> Result<mpsc::UnboundedReceiver<SequenceEvent>, SubmitError> {
        self.enqueue(request, None)
    }

    /// Queues a beam search of `width` beams; `n` `Finished` events arrive, best first.
    pub fn submit_beam(
        &self,
        request: GenerationRequest,
        width: usize,
        n: usize,
    ) -> Result<mpsc::UnboundedReceiver<SequenceEvent>, SubmitError> {
        self.enqueue(request, Some((width.max(1), n.max(1))))
    }

    fn enqueue(
        &self,
        request: GenerationRequest,
        beam: Option<(usize, usize)>,
    ) -> Result<mpsc::UnboundedReceiver<SequenceEvent>, SubmitError> {
        if request.prompt.is_empty() {
            return Err(SubmitError::EmptyPrompt);
        }
        let limit = self.max_prompt_tokens();
        if request.prompt.len() > limit {
            return Err(SubmitError::PromptTooLong {
                prompt: request.prompt.len(),
                limit,
            });
        }
        let max_queue = self.limits.max_queue;
        let claimed = self
            .queued
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max_queue).then_some(n + 1)
            });
        if let Err(queued) = claimed {
            return Err(SubmitError::Overloaded { queued });
        }
        let (events, receiver) = mpsc::unbounded_channel();
        let job = Job {
            request,
            beam,
            events,
            enqueued: Instant::now(),
        };
        if self.jobs.send(job).is_err() {
            self.queued.fetch_sub(1, Ordering::AcqRel);
            return Err(SubmitError::Stopped);
        }
        Ok(receiver)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use super::RunningFlag;

    #[test]
    fn the_running_flag_clears_when_its_thread_returns_or_panics() {
        for panics in [false, true] {
            let running = Arc::new(AtomicBool::new(true));
            let flag = RunningFlag(Arc::clone(&running));
            let (go, wait) = std::sync::mpsc::channel::<()>();
            let thread = std::thread::spawn(move || {
                let _flag = flag;
                let _ = wait.recv();
                assert!(!panics, "a step panicked");
            });
            assert!(running.load(Ordering::Acquire), "set while the thread runs");
            go.send(()).expect("send");
            assert_eq!(thread.join().is_err(), panics);
            assert!(!running.load(Ordering::Acquire), "panics: {panics}");
        }
    }
}
