//! Generation, sampling, stop handling and the tokenizer on a generated tiny model.

mod common;

use candle_core::{DType, Device};
use llama_server::engine::LlamaModel;
use llama_server::generate_model::ModelShape;
use llama_server::generation::{FinishReason, GenerationRequest, generate, generate_batch};
use llama_server::sampling::SamplingParams;
use llama_server::tokenizer::LlamaTokenizer;

use common::{golden, ids, tiny_model};

fn setup() -> (LlamaModel, LlamaTokenizer, serde_json::Value) {
    let dir = tiny_model(ModelShape::TinyUntied, 7);
    (
        LlamaModel::load(&dir, DType::F32, &Device::Cpu).expect("model loads"),
        LlamaTokenizer::from_dir(&dir).expect("tokenizer loads"),
        golden("tiny-untied-seed7.json"),
    )
}

fn request(prompt: Vec<u32>, max_tokens: usize, sampling: SamplingParams) -> GenerationRequest {
    GenerationRequest::new(prompt, Some(max_tokens), sampling)
}

/// Temperature sampling over the whole vocabulary. (Nucleus selection over a random model's
/// nearly flat distribution is slow in unoptimised test builds, so only one test uses top_p.)
fn sampled(seed: u64) -> SamplingParams {
    SamplingParams {
        temperature: 0.8,
        seed: Some(seed),
        ..SamplingParams::default()
    }
}

#[test]
fn greedy_generation_reproduces_the_reference_and_counts_tokens() {
    let (model, tokenizer, golden) = setup();
    for prompt in golden["prompts"].as_array().expect("prompts") {
        let input = ids(&prompt["input_ids"]);
        let reference = ids(&prompt["greedy"]);
        let completion = generate(
            &model,
            &tokenizer,
            request(input.clone(), 24, SamplingParams::greedy()),
        )
        .expect("generates");
        let expected: Vec<u32> = match reference.iter().position(|&t| tokenizer.is_stop(t)) {
            Some(stop) if stop < 24 => reference[..=stop].to_vec(),
            _ => reference[..24].to_vec(),
        };
        assert_eq!(completion.token_ids, expected);
        assert_eq!(completion.prompt_tokens, input.len());
        assert_eq!(completion.completion_tokens, expected.len());
        let finish = if expected.len() < 24 {
            FinishReason::Stop
        } else {
            FinishReason::Length
        };
        assert_eq!(completion.finish_reason, finish);
        assert_eq!(
            completion.text,
            tokenizer.decode(&expected, true).expect("decodes")
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible_and_seed_dependent() {
    let (model, tokenizer, golden) = setup();
    let prompt = ids(&golden["prompts"][2]["input_ids"]);
    let run = |seed| {
        generate(
            &model,
            &tokenizer,
            request(prompt.clone(), 16, sampled(seed)),
        )
        .expect("generates")
        .token_ids
    };
    let first = run(11);
    assert_eq!(first, run(11));
    assert_ne!(first, run(12));
    assert_ne!(
        first,
        ids(&golden["prompts"][2]["greedy"])[..first.len()].to_vec()
    );

    let nucleus = |seed| {
        let params = SamplingParams {
            top_p: 0.5,
            ..sampled(seed)
        };
        generate(&model, &tokenizer, request(prompt.clone(), 4, params))
            .expect("generates")
            .token_ids
    };
    assert_eq!(nucleus(11), nucleus(11));
}

#[test]
fn a_batch_produces_what_each_request_produces_alone() {
    let (model, tokenizer, golden) = setup();
    let prompts: Vec<Vec<u32>> = golden["prompts"]
        .as_array()
        .expect("prompts")
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect();
    let requests = vec![
        request(prompts[0].clone(), 12, SamplingParams::greedy()),
        request(prompts[1].clone(), 5, sampled(3)),
        request(prompts[2].clone(), 9, sampled(4)),
        request(prompts[3].clone(), 1, SamplingParams::greedy()),
    ];
    let alone: Vec<_> = requests
        .iter()
        .map(|r| generate(&model, &tokenizer, r.clone()).expect("alone"))
        .collect();
    let together = generate_batch(&model, &tokenizer, requests).expect("batch");
    for (t, a) in together.iter().zip(&alone) {
        assert_eq!(
            (&t.text, &t.token_ids, t.finish_reason),
            (&a.text, &a.token_ids, a.finish_reason)
        );
        // Log-probabilities agree to float rounding (batched matmuls sum in another order).
        assert!((t.cumulative_logprob - a.cumulative_logprob).abs() < 1e-4);
    }
    assert_eq!(
        together
            .iter()
            .map(|c| c.completion_tokens)
            .collect::<Vec<_>>(),
        vec![12, 5, 9, 1]
    );
}

#[test]
fn stop_strings_cut_the_text_before_them() {
    let (model, tokenizer, golden) = setup();
    let prompt = ids(&golden["prompts"][0]["input_ids"]);
    let full = generate(
        &model,
        &tokenizer,
        request(prompt.clone(), 20, SamplingParams::greedy()),
    )
    .expect("generates");
    // A stop string from the middle of the reference text, spanning a token boundary.
    let chars: Vec<char> = full.text.chars().collect();
    assert!(
        chars.len() > 12,
        "reference text is long enough: {:?}",
        full.text
    );
    let stop: String = chars[8..12].iter().collect();
    let before: String = chars[..8].iter().collect();
    let expected = full.text.split(&stop).next().expect("split").to_owned();
    assert!(expected.len() <= before.len());
    let mut with_stop = request(prompt, 20, SamplingParams::greedy());
    with_stop.stop = vec!["never appears ✗".into(), stop.clone()];
    let cut = generate(&model, &tokenizer, with_stop).expect("generates");
    assert_eq!(cut.text, expected);
    assert!(!cut.text.contains(&stop));
    assert_eq!(cut.finish_reason, FinishReason::Stop);
    assert!(cut.completion_tokens < full.completion_tokens);
    assert_eq!(cut.token_ids[..], full.token_ids[..cut.completion_tokens]);
}

#[test]
fn max_tokens_and_context_limits() {
    let (model, tokenizer, golden) = setup();
    let prompt = ids(&golden["prompts"][0]["input_ids"]);
    let none = generate(
        &model,
        &tokenizer,
        request(prompt.clone(), 0, SamplingParams::greedy()),
    )
    .expect("generates");
    assert_eq!((none.completion_tokens, none.text.as_str()), (0, ""));
    assert_eq!(none.finish_reason, FinishReason::Length);

    let context = model.context_length();
    let too_long = vec![791u32; context];
    let err = generate(
        &model,
        &tokenizer,
        request(too_long, 1, SamplingParams::greedy()),
    )
    .expect_err("does not fit");
    assert!(
        err.to_string().contains("does not fit the context window"),
        "{err}"
    );

    let err = generate(
        &model,
        &tokenizer,
        request(Vec::new(), 1, SamplingParams::greedy()),
    )
    .expect_err("empty prompt");
    assert!(err.to_string().contains("no tokens"), "{err}");

    let bad = SamplingParams {
        top_p: 0.0,
        ..SamplingParams::default()
    };
    let err = generate(&model, &tokenizer, request(prompt, 1, bad)).expect_err("bad top_p");
    assert!(err.to_string().contains("top_p"), "{err}");
}

#[test]
fn streamed_text_equals_the_full_decode() {
    let (_, tokenizer, _) = setup();
    let text = "Grüße 🦙🦙 東京 — ok\n\n  done";
    let tokens = tokenizer.encode(text, false).expect("encodes");
    let mut stream = tokenizer.decode_stream(true);
    let mut pieces = Vec::new();
    for &token in &tokens {
        pieces.push(stream.push(token).expect("decodes"));
    }
    assert_eq!(pieces.concat(), text);
    assert!(pieces.iter().all(|p| !p.contains('\u{FFFD}')));
    assert!(
        pieces.iter().any(String::is_empty),
        "a split emoji is held back once"
    );
}

#[test]
fn stop_tokens_are_the_llama3_ones() {
    let (_, tokenizer, _) = setup();
    for token in ["<|eot_id|>", "<|end_of_text|>"] {
        let id = tokenizer.token_id(token).expect("in vocabulary");
        assert!(tokenizer.is_stop(id), "{token}");
    }
    // <|eom_id|> is id 128008; this tokenizer file names it <|reserved_special_token_4|>, and
    // it is a stop token through config.json's eos_token_id.
    assert!(tokenizer.is_stop(128_008));
    assert_eq!(tokenizer.stop_ids(), &[128_001, 128_008, 128_009]);
    assert!(!tokenizer.is_stop(tokenizer.token_id("<|begin_of_text|>").expect("bos")));
    assert_eq!(tokenizer.vocab_size(), 128_256);
}

#[test]
fn streamed_deltas_add_up_to_the_completion_text() {
    use llama_server::generation::ActiveSequence;
    let (model, tokenizer, golden) = setup();
    let prompt = ids(&golden["prompts"][1]["input_ids"]);
    let full = generate(
        &model,
        &tokenizer,
        request(prompt.clone(), 16, SamplingParams::greedy()),
    )
    .expect("generates");
    let chars: Vec<char> = full.text.chars().collect();
    assert!(chars.len() > 6, "{:?}", full.text);
    let mut with_stop = request(prompt, 16, SamplingParams::greedy());
    // The last characters: a stop string that may never complete, held back then flushed.
    with_stop.stop = vec![chars[chars.len() - 2..].iter().collect::<String>() + "\u{1}"];
    let mut sequence = ActiveSequence::new(&model, &tokenizer, with_stop).expect("valid");
    let mut deltas = Vec::new();
    while !sequence.is_finished() {
        let logits = model
            .forward(&mut [sequence.step(usize::MAX)])
            .expect("forward");
        let output = sequence.advance(&logits[0]).expect("advance");
        deltas.push(output.expect("a token after the whole prompt").text);
    }
    let completion = sequence.into_completion();
    assert_eq!(deltas.concat(), completion.text);
    assert_eq!(completion.text, full.text);
    assert_eq!(deltas.len(), completion.completion_tokens);
}
