//! Beam search on a generated model: one beam is greedy decoding; wider beams return
//! hypotheses best first whose scores are their true summed log-probabilities.

mod common;

use candle_core::{DType, Device};
use common::tiny_model;
use llama_server::beam::{BeamRequest, BeamSearch};
use llama_server::engine::{LlamaModel, LogitsFor, SequenceStep};
use llama_server::generate_model::ModelShape;
use llama_server::generation::{GenerationRequest, generate, log_probability};
use llama_server::sampling::SamplingParams;
use llama_server::tokenizer::LlamaTokenizer;

const PROMPT: &[u32] = &[128_000, 9906, 11, 1917, 0, 578, 374];

fn setup() -> (LlamaModel, LlamaTokenizer) {
    let dir = tiny_model(ModelShape::Tiny, 42);
    (
        LlamaModel::load(&dir, DType::F32, &Device::Cpu).expect("model"),
        LlamaTokenizer::from_dir(&dir).expect("tokenizer"),
    )
}

fn search<'t>(
    model: &LlamaModel,
    tokenizer: &'t LlamaTokenizer,
    width: usize,
    n: usize,
) -> BeamSearch<'t> {
    let mut search = BeamSearch::new(
        model,
        tokenizer,
        BeamRequest {
            prompt: PROMPT.to_vec(),
            width,
            n,
            max_tokens: 8,
            stop: Vec::new(),
            stop_token_ids: Vec::new(),
            ignore_eos: true,
            skip_special_tokens: true,
        },
    );
    while !search.is_finished() {
        search.step(model).expect("step");
    }
    search
}

/// Summed log-probability of `completion` after `PROMPT`, scored in one forward pass.
fn score(model: &LlamaModel, completion: &[u32]) -> f64 {
    let mut tokens = PROMPT.to_vec();
    tokens.extend_from_slice(completion);
    let mut cache = model.new_cache();
    let logits = model
        .forward(&mut [SequenceStep {
            tokens: &tokens,
            cache: &mut cache,
            logits: LogitsFor::All,
        }])
        .expect("forward");
    let rows: Vec<Vec<f32>> = logits[0].to_vec2().expect("rows");
    completion
        .iter()
        .enumerate()
        .map(|(i, &t)| f64::from(log_probability(&rows[PROMPT.len() - 1 + i], t, 0).0))
        .sum()
}

#[test]
fn one_beam_is_greedy_decoding() {
    let (model, tokenizer) = setup();
    let mut request = GenerationRequest::new(PROMPT.to_vec(), Some(8), SamplingParams::greedy());
    request.ignore_eos = true;
    let greedy = generate(&model, &tokenizer, request).expect("greedy");
    let beams = search(&model, &tokenizer, 1, 1).completions();
    assert_eq!(beams[0].token_ids, greedy.token_ids);
    assert_eq!(beams[0].text, greedy.text);
}

#[test]
fn wider_beams_are_ranked_by_their_true_scores() {
    let (model, tokenizer) = setup();
    let beams = search(&model, &tokenizer, 4, 3).completions();
    assert_eq!(beams.len(), 3);
    let mut previous = f64::INFINITY;
    for beam in &beams {
        assert_eq!(beam.completion_tokens, 8);
        let truth = score(&model, &beam.token_ids);
        assert!(
            (truth - beam.cumulative_logprob).abs() < 1e-3,
            "{truth} vs {}",
            beam.cumulative_logprob
        );
        assert!(beam.cumulative_logprob <= previous + 1e-9);
        previous = beam.cumulative_logprob;
    }
    assert_ne!(beams[0].token_ids, beams[1].token_ids);
}
