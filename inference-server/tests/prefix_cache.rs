//! The prefix cache through the scheduler: a prompt that starts with tokens a finished or
//! running sequence holds computes only the rest, and answers exactly what it answers with
//! the cache off.

mod common;

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};
use llama_server::engine::LlamaModel;
use llama_server::generate_model::ModelShape;
use llama_server::generation::{Completion, GenerationRequest};
use llama_server::gguf_export::GgufFileType;
use llama_server::metrics::{EngineGauges, Metrics};
use llama_server::sampling::SamplingParams;
use llama_server::scheduler::{EngineHandle, SchedulerLimits, SequenceEvent};
use llama_server::tokenizer::LlamaTokenizer;
use tokio::sync::mpsc::UnboundedReceiver;

use common::gguf::gguf_of;
use common::{golden, ids, tiny_model};

/// The scheduler over the model at `model` (a directory or a GGUF file) with the tokenizer of
/// `tokenizer`.
fn start(
    model: &Path,
    tokenizer: &Path,
    prefix_cache: bool,
    kv_cache_tokens: usize,
    prefill_chunk_tokens: usize,
) -> (EngineHandle, EngineGauges) {
    let model = LlamaModel::load(model, DType::F32, &Device::Cpu).expect("model loads");
    let tokenizer = Arc::new(LlamaTokenizer::from_dir(tokenizer).expect("tokenizer loads"));
    let gauges = Metrics::new().engine.clone();
    let limits = SchedulerLimits {
        context_tokens: model.context_length(),
        max_batch_size: 8,
        kv_cache_tokens,
        max_queue: 16,
        prefill_chunk_tokens,
        prefix_cache,
    };
    let handle =
        EngineHandle::start(model, tokenizer, limits, gauges.clone()).expect("engine starts");
    (handle, gauges)
}

/// The scheduler over the tiny untied model, prompts fed 512 tokens a step.
fn engine(prefix_cache: bool, kv_cache_tokens: usize) -> (EngineHandle, EngineGauges) {
    let dir = tiny_model(ModelShape::TinyUntied, 7);
    start(&dir, &dir, prefix_cache, kv_cache_tokens, 512)
}

fn greedy(prompt: Vec<u32>, max_tokens: usize) -> GenerationRequest {
    let mut request = GenerationRequest::new(prompt, Some(max_tokens), SamplingParams::greedy());
    // Log-probabilities make the sequence return its logits, so they can be compared.
    request.logprobs = Some(0);
    request
}

/// Waits for the sequence's end: its completion and the cached tokens it started with.
fn wait(events: UnboundedReceiver<SequenceEvent>) -> (Completion, usize) {
    wait_after(events, None)
}

/// [`wait`] for a sequence whose `Started` event was read already (`cached`).
fn wait_after(
    mut events: UnboundedReceiver<SequenceEvent>,
    mut cached: Option<usize>,
) -> (Completion, usize) {
    while let Some(event) = events.blocking_recv() {
        match event {
            SequenceEvent::Started { cached_tokens } => cached = Some(cached_tokens),
            SequenceEvent::Token(_) => {}
            SequenceEvent::Finished(completion) => {
                return (completion, cached.expect("Started comes first"));
            }
            SequenceEvent::Failed(message) => panic!("generation failed: {message}"),
        }
    }
    panic!("the engine stopped before the sequence finished");
}

fn run(handle: &EngineHandle, request: GenerationRequest) -> (Completion, usize) {
    wait(handle.submit(request).expect("accepted"))
}

/// The tokens the prefix cache keeps once the engine is idle (a sequence's cache is handed
/// over after its last event, and the gauges are published when the loop comes round).
fn kept_when_idle(gauges: &EngineGauges) -> usize {
    for _ in 0..1000 {
        if gauges.running.get() == 0 && gauges.kv_reserved_tokens.get() == 0 {
            return usize::try_from(gauges.prefix_cache_tokens.get()).expect("not negative");
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    panic!("the engine did not go idle");
}

fn prompts() -> Vec<Vec<u32>> {
    golden("tiny-untied-seed7.json")["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect()
}

/// The same completion: tokens, text and finish reason equal, log-probabilities within float
/// rounding (the reused keys were computed in another forward call).
fn assert_same(with: &Completion, without: &Completion, what: &str) {
    assert_eq!(
        (&with.token_ids, &with.text, with.finish_reason),
        (&without.token_ids, &without.text, without.finish_reason),
        "{what}"
    );
    assert!(
        (with.cumulative_logprob - without.cumulative_logprob).abs() < 1e-3,
        "{what}: {} against {}",
        with.cumulative_logprob,
        without.cumulative_logprob
    );
}

#[test]
fn a_conversations_next_turn_and_a_shared_start_compute_only_their_new_tokens() {
    let (cached, gauges) = engine(true, 4096);
    let (plain, _) = engine(false, 4096);
    let prompts = prompts();
    let first = prompts[0].clone();

    // Turn one: nothing kept yet.
    let (one, reused) = run(&cached, greedy(first.clone(), 12));
    assert_eq!(reused, 0);
    assert_same(&one, &run(&plain, greedy(first.clone(), 12)).0, "turn one");
    // Kept: the prompt and every generated token but the last (never fed).
    let kept = first.len() + one.token_ids.len() - 1;
    assert_eq!(kept_when_idle(&gauges), kept);

    // Turn two sends the conversation so far and more: all that was kept is reused.
    let mut second = first.clone();
    second.extend(&one.token_ids);
    second.extend(&prompts[1][1..]);
    let (two, reused) = run(&cached, greedy(second.clone(), 12));
    assert_eq!(reused, kept);
    assert_eq!(two.cached_tokens, kept);
    assert_same(&two, &run(&plain, greedy(second.clone(), 12)).0, "turn two");
    // The next turn took the entry over and left its own, longer one.
    let kept_two = second.len() + two.token_ids.len() - 1;
    assert_eq!(kept_when_idle(&gauges), kept_two);

    // Another request that shares only the start copies it and leaves the entry in place.
    let shared = 5;
    let mut other = second[..shared].to_vec();
    other.extend(&prompts[2][1..]);
    assert_ne!(other[shared], second[shared]);
    let (three, reused) = run(&cached, greedy(other.clone(), 8));
    assert_eq!(reused, shared);
    assert_same(
        &three,
        &run(&plain, greedy(other.clone(), 8)).0,
        "shared start",
    );
    let kept_three = other.len() + three.token_ids.len() - 1;
    assert_eq!(kept_when_idle(&gauges), kept_two + kept_three);

    // The same prompt again: all but its last two tokens come from the cache (a step of two
    // takes the prompt kernels, so the answer is the same bits).
    let (again, reused) = run(&cached, greedy(other.clone(), 8));
    assert_eq!(reused, other.len() - 2);
    assert_same(&again, &three, "the same prompt again");

    // The counters add up; with the cache off nothing is counted.
    assert_eq!(
        gauges.prefix_hit_tokens.get(),
        (kept + shared + other.len() - 2) as u64
    );
    assert_eq!(
        gauges.prefix_prompt_tokens.get(),
        (first.len() + second.len() + 2 * other.len()) as u64
    );
}

#[test]
fn a_running_sequence_lends_its_prompt_and_kept_entries_give_way_to_admissions() {
    // A budget of 300 tokens: each request below reserves 100 or more.
    let (cached, gauges) = engine(true, 300);
    let (plain, _) = engine(false, 300);
    let prompts = prompts();
    let long = prompts[0].clone();

    // A long answer keeps the first sequence running while the second is admitted.
    let mut first = cached.submit(greedy(long.clone(), 80)).expect("accepted");
    let mut first_cached = None;
    let first_token = loop {
        match first.blocking_recv().expect("events") {
            SequenceEvent::Started { cached_tokens } => first_cached = Some(cached_tokens),
            SequenceEvent::Token(output) => break output.token,
            SequenceEvent::Failed(message) => panic!("{message}"),
            SequenceEvent::Finished(_) => panic!("finished before its first token"),
        }
    };
    assert_eq!(first_cached, Some(0));
    let mut second = long.clone();
    second.extend([if first_token == 11 { 12 } else { 11 }, 13]);
    let (two, reused) = run(&cached, greedy(second.clone(), 8));
    assert_eq!(
        reused,
        long.len(),
        "the running sequence's prompt is copied"
    );
    assert_same(
        &two,
        &run(&plain, greedy(second.clone(), 8)).0,
        "from a running one",
    );
    let (one, _) = wait_after(first, first_cached);
    assert_same(&one, &run(&plain, greedy(long.clone(), 80)).0, "the lender");
    assert!(kept_when_idle(&gauges) > 0);

    // A request that needs the whole budget evicts what was kept, and still runs.
    let big = prompts[3].clone();
    let room = 300 - big.len();
    let (alone, _) = run(&cached, greedy(big.clone(), room));
    assert_eq!(
        kept_when_idle(&gauges),
        big.len() + alone.token_ids.len() - 1,
        "only the last sequence's tokens are kept"
    );
    // The kept entries gave way in the pool too: it never grew past the budget's rows.
    assert!(
        gauges.kv_pool_tokens.get() <= 300,
        "{}",
        gauges.kv_pool_tokens.get()
    );
    assert_same(&alone, &run(&plain, greedy(big, room)).0, "after eviction");
}

#[test]
fn requests_sharing_a_prompt_wait_for_its_prefill_and_copy_it() {
    // A prompt of 150 tokens fed 16 a step: computed once, then copied to the others.
    let dir = tiny_model(ModelShape::TinyUntied, 7);
    let (cached, gauges) = start(&dir, &dir, true, 4096, 16);
    let (plain, _) = engine(false, 4096);
    let prompts = prompts();
    let body: Vec<u32> = prompts.iter().flat_map(|p| p[1..].to_vec()).collect();
    let mut shared = vec![prompts[0][0]];
    shared.extend(body.iter().cycle().take(149));
    assert_eq!(shared.len(), 150);
    let mut other = shared.clone();
    other.extend(&prompts[1][1..6]);
    // Submitted together, as the choices of an `n` = 3 request and a third request.
    let receivers = [
        cached.submit(greedy(shared.clone(), 6)).expect("accepted"),
        cached.submit(greedy(shared.clone(), 6)).expect("accepted"),
        cached.submit(greedy(other.clone(), 6)).expect("accepted"),
    ];
    let results: Vec<(Completion, usize)> = receivers.into_iter().map(wait).collect();
    assert_eq!(results[0].1, 0, "the first computes the prompt");
    assert_eq!(
        results[1].1,
        shared.len() - 2,
        "the same prompt: all but its last two"
    );
    assert_eq!(results[2].1, shared.len(), "the shared start, copied");
    let alone = run(&plain, greedy(shared.clone(), 6)).0;
    assert_same(&results[0].0, &alone, "first");
    assert_same(&results[1].0, &alone, "second");
    assert_same(&results[2].0, &run(&plain, greedy(other, 6)).0, "third");
    // The shared tokens were computed once. Fed: the first's prompt and 5 generated tokens
    // (the sixth is never fed); the second's last two prompt tokens and 5; the third's 5 own
    // prompt tokens and 5.
    assert_eq!(
        gauges.step_tokens.get(),
        ((150 + 5) + (2 + 5) + (5 + 5)) as u64
    );
}

#[test]
fn a_prompts_answer_does_not_depend_on_how_the_steps_split_it() {
    // Quantized weights, head size 64 (the tiled prompt kernel). On the Llama-3.2-1B shape a
    // one-token step (the decode path) rounds differently from a prompt step, so the
    // scheduler never makes one of a longer prompt (`prompt_step`, unit-tested); on this
    // small shape any split must give the same bits.
    let path = gguf_of(ModelShape::Tiny256, 3, GgufFileType::Q4KM);
    let tokenizer = tiny_model(ModelShape::Tiny256, 3);
    let engine = |chunk| start(&path, &tokenizer, false, 4096, chunk).0;
    let prompt: Vec<u32> = (0..41)
        .map(|i| ((i * 7919 + 13) % 128_000) as u32)
        .collect();
    let whole = run(&engine(4096), greedy(prompt.clone(), 8)).0;
    // Chunks of 40 would leave the last token alone; of 1, every token.
    for chunk in [40, 39, 1] {
        let split = run(&engine(chunk), greedy(prompt.clone(), 8)).0;
        assert_eq!(split.token_ids, whole.token_ids, "chunk {chunk}");
        assert_eq!(
            split.cumulative_logprob, whole.cumulative_logprob,
            "chunk {chunk}: the same bits"
        );
    }
}
