//! The engine against Hugging Face transformers: goldens made by
//! scripts/reference/make_goldens.py from the same generated tiny models.

mod common;

use candle_core::{DType, Device};
use llama_server::chat_template::ChatTemplate;
use llama_server::engine::{LlamaModel, LogitsFor, Placement, SequenceStep};
use llama_server::generate_model::ModelShape;
use llama_server::sampling::argmax;
use llama_server::tokenizer::LlamaTokenizer;

use common::{GOLDEN_MODELS, golden, ids, tiny_model};

const TOLERANCE: f32 = 1e-3;

struct Loaded {
    name: String,
    model: LlamaModel,
    tokenizer: LlamaTokenizer,
    golden: serde_json::Value,
}

/// Every golden model in f32 with its default (f32) key/value cache.
fn load_all() -> Vec<Loaded> {
    load_all_with(DType::F32)
}

/// Every golden model in f32, its key/value cache held in `kv_dtype`.
fn load_all_with(kv_dtype: DType) -> Vec<Loaded> {
    GOLDEN_MODELS
        .iter()
        .map(|&(shape, name, seed)| {
            let dir = tiny_model(shape, seed);
            let mut model = LlamaModel::load(&dir, DType::F32, &Device::Cpu).expect("model loads");
            // f32 weights keep an f32 cache unless one is chosen (`auto_kv_dtype`).
            assert_eq!(model.kv_dtype(), DType::F32, "{name}");
            model
                .set_kv_dtype(kv_dtype)
                .expect("an empty pool changes type");
            Loaded {
                name: format!("{name} ({kv_dtype:?} cache)"),
                model,
                tokenizer: LlamaTokenizer::from_dir(&dir).expect("tokenizer loads"),
                golden: golden(&format!("{name}-seed{seed}.json")),
            }
        })
        .collect()
}

fn prompts(golden: &serde_json::Value) -> &Vec<serde_json::Value> {
    golden["prompts"].as_array().expect("prompts")
}

/// Greedy continuation of `prompt` alone, without stop tokens.
fn greedy_alone(model: &LlamaModel, prompt: &[u32], steps: usize) -> Vec<u32> {
    let mut cache = model.new_cache();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..steps {
        let logits = model
            .forward(&mut [SequenceStep {
                tokens: &input,
                cache: &mut cache,
                logits: LogitsFor::Last,
            }])
            .expect("forward");
        let row: Vec<f32> = logits[0]
            .flatten_all()
            .and_then(|t| t.to_vec1())
            .expect("logits");
        let token = argmax(&row);
        out.push(token);
        input = vec![token];
    }
    out
}

/// Greedy continuations of `prompts` run together, every sequence in every forward step.
fn greedy_together(model: &LlamaModel, prompts: &[Vec<u32>], steps: usize) -> Vec<Vec<u32>> {
    let mut caches: Vec<_> = prompts.iter().map(|_| model.new_cache()).collect();
    let mut inputs = prompts.to_vec();
    let mut outputs = vec![Vec::new(); prompts.len()];
    for _ in 0..steps {
        let mut batch: Vec<SequenceStep<'_>> = inputs
            .iter()
            .zip(caches.iter_mut())
            .map(|(tokens, cache)| SequenceStep {
                tokens,
                cache,
                logits: LogitsFor::Last,
            })
            .collect();
        let logits = model.forward(&mut batch).expect("forward");
        for (i, row) in logits.iter().enumerate() {
            let row: Vec<f32> = row.flatten_all().and_then(|t| t.to_vec1()).expect("row");
            let token = argmax(&row);
            outputs[i].push(token);
            inputs[i] = vec![token];
        }
    }
    outputs
}

#[test]
fn tokenization_and_chat_rendering_match_transformers() {
    for loaded in load_all() {
        let template = ChatTemplate::from_tokenizer(&loaded.tokenizer).expect("has template");
        for prompt in prompts(&loaded.golden) {
            let expected = ids(&prompt["input_ids"]);
            let actual = if let Some(messages) = prompt.get("messages") {
                let rendered = template.render_json(messages, None, true).expect("renders");
                assert_eq!(rendered, prompt["rendered"].as_str().expect("rendered"));
                loaded.tokenizer.encode(&rendered, false).expect("encodes")
            } else {
                let text = prompt["text"].as_str().expect("text");
                loaded.tokenizer.encode(text, true).expect("encodes")
            };
            assert_eq!(actual, expected, "{} / {}", loaded.name, prompt["name"]);
        }
    }
}

#[test]
fn prompt_logits_match_transformers_within_tolerance() {
    for loaded in load_all().into_iter().chain(load_all_with(DType::F16)) {
        let logit_ids = ids(&loaded.golden["logit_ids"]);
        for prompt in prompts(&loaded.golden) {
            let input = ids(&prompt["input_ids"]);
            let mut cache = loaded.model.new_cache();
            let logits = loaded
                .model
                .forward(&mut [SequenceStep {
                    tokens: &input,
                    cache: &mut cache,
                    logits: LogitsFor::All,
                }])
                .expect("forward");
            let rows: Vec<Vec<f32>> = logits[0].to_vec2().expect("logits");
            assert_eq!(rows.len(), input.len());
            let expected = prompt["logits_at_ids"].as_array().expect("logits");
            let mut worst = 0f32;
            for (position, (row, want)) in rows.iter().zip(expected).enumerate() {
                for (&id, want) in logit_ids.iter().zip(want.as_array().expect("row")) {
                    let want = want.as_f64().expect("number") as f32;
                    let diff = (row[id as usize] - want).abs();
                    worst = worst.max(diff);
                    assert!(
                        diff <= TOLERANCE,
                        "{} / {} position {position} token {id}: {} vs reference {want}",
                        loaded.name,
                        prompt["name"],
                        row[id as usize]
                    );
                }
            }
            let last = rows.last().expect("a row");
            for pair in prompt["last_top10"].as_array().expect("top10") {
                let id = pair[0].as_u64().expect("id") as usize;
                let want = pair[1].as_f64().expect("logit") as f32;
                assert!((last[id] - want).abs() <= TOLERANCE, "top-10 token {id}");
            }
            eprintln!(
                "{} / {}: worst logit difference {worst:e}",
                loaded.name, prompt["name"]
            );
        }
    }
}

#[test]
fn greedy_continuations_match_transformers() {
    for loaded in load_all().into_iter().chain(load_all_with(DType::F16)) {
        for prompt in prompts(&loaded.golden) {
            let expected = ids(&prompt["greedy"]);
            let actual = greedy_alone(&loaded.model, &ids(&prompt["input_ids"]), expected.len());
            assert_eq!(actual, expected, "{} / {}", loaded.name, prompt["name"]);
        }
    }
}

#[test]
fn batched_sequences_of_different_lengths_match_running_alone() {
    // Both ways decoding sequences attend: one by one on views of their rows (the CPU
    // default), and gathered into one padded batch (the GPU default).
    for (batched, mut loaded) in [false, true].into_iter().flat_map(|b| {
        load_all()
            .into_iter()
            .chain(load_all_with(DType::F16))
            .map(move |l| (b, l))
    }) {
        loaded.model.set_batched_decode(batched);
        let prompts: Vec<Vec<u32>> = prompts(&loaded.golden)
            .iter()
            .map(|p| ids(&p["input_ids"]))
            .collect();
        let expected: Vec<Vec<u32>> = crate::prompts(&loaded.golden)
            .iter()
            .map(|p| ids(&p["greedy"]))
            .collect();
        let outputs = greedy_together(&loaded.model, &prompts, expected[0].len());
        assert_eq!(
            outputs, expected,
            "{} (batched decode {batched})",
            loaded.name
        );
    }
}

#[test]
fn a_model_split_over_several_devices_matches_transformers() {
    // The CPU stands in for every device (a forward step hands the hidden state over between
    // runs of layers, a no-op here); what this checks is the bookkeeping: each device's layers
    // with their own attention plan, rotary tables and key/value tensors. Layers go round
    // three devices, so consecutive layers are on different ones, and the embedding's device
    // holds none at first.
    for &(shape, name, seed) in &GOLDEN_MODELS {
        let dir = tiny_model(shape, seed);
        let golden = golden(&format!("{name}-seed{seed}.json"));
        let layers = llama_server::engine::LlamaConfig::from_file(&dir.join("config.json"))
            .expect("config")
            .num_hidden_layers;
        let placement = Placement::new(
            vec![Device::Cpu; 3],
            (0..layers).map(|i| [1, 2, 0][i % 3]).collect(),
        )
        .expect("placement");
        let mut model = LlamaModel::load_placed(&dir, DType::F32, placement).expect("loads");
        assert_eq!(model.placement().devices().len(), 3, "{name}");
        assert_eq!(model.placement().device_index(0), 1, "{name}");
        assert_eq!(model.kv_pool().num_layers(), layers, "{name}");
        let prompts: Vec<Vec<u32>> = prompts(&golden)
            .iter()
            .map(|p| ids(&p["input_ids"]))
            .collect();
        let expected: Vec<Vec<u32>> = crate::prompts(&golden)
            .iter()
            .map(|p| ids(&p["greedy"]))
            .collect();
        for (prompt, want) in prompts.iter().zip(&expected) {
            assert_eq!(&greedy_alone(&model, prompt, want.len()), want, "{name}");
        }
        for batched in [false, true] {
            model.set_batched_decode(batched);
            let together = greedy_together(&model, &prompts, expected[0].len());
            assert_eq!(together, expected, "{name} (batched decode {batched})");
        }
    }
    // A placement of another layer count is refused, naming both counts.
    let dir = tiny_model(ModelShape::Tiny, 42);
    let wrong = Placement::new(vec![Device::Cpu; 2], vec![0, 1, 1, 1, 1]).expect("placement");
    let err = LlamaModel::load_placed(&dir, DType::F32, wrong).expect_err("5 layers for 2");
    assert!(
        err.to_string().contains("5 layers for a model of 2"),
        "{err}"
    );
}

#[test]
fn sequences_can_join_a_running_batch() {
    // The second sequence's prompt is prefilled in the same forward pass as a decode step of
    // the first, ten steps in: both must still produce their reference continuations.
    let loaded = load_all().remove(1);
    let prompts: Vec<Vec<u32>> = crate::prompts(&loaded.golden)
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect();
    let expected: Vec<Vec<u32>> = crate::prompts(&loaded.golden)
        .iter()
        .map(|p| ids(&p["greedy"]))
        .collect();
    let (first, second) = (0, 2);
    let mut caches = [loaded.model.new_cache(), loaded.model.new_cache()];
    let mut inputs = [prompts[first].clone(), prompts[second].clone()];
    let mut outputs: [Vec<u32>; 2] = [Vec::new(), Vec::new()];
    for step in 0..40 {
        let active: Vec<usize> = if step < 10 { vec![0] } else { vec![0, 1] };
        let [cache_a, cache_b] = &mut caches;
        let mut batch = Vec::new();
        for (&i, cache) in active.iter().zip([cache_a, cache_b]) {
            batch.push(SequenceStep {
                tokens: &inputs[i],
                cache,
                logits: LogitsFor::Last,
            });
        }
        let logits = loaded.model.forward(&mut batch).expect("forward");
        let tokens: Vec<u32> = logits
            .iter()
            .map(|row| argmax(&row.flatten_all().and_then(|t| t.to_vec1()).expect("row")))
            .collect();
        for (&i, token) in active.iter().zip(tokens) {
            outputs[i].push(token);
            inputs[i] = vec![token];
        }
    }
    assert_eq!(outputs[0], expected[first][..40]);
    assert_eq!(outputs[1], expected[second][..30]);
}

#[test]
fn a_prompt_joins_two_decoding_sequences_with_batched_decode() {
    // Two sequences decode as one padded batch while a third prompt is prefilled in the same
    // forward steps, in chunks: every continuation is still the reference one, and the
    // logits agree with the one-by-one path.
    let mut loaded = load_all().remove(0);
    let prompts: Vec<Vec<u32>> = crate::prompts(&loaded.golden)
        .iter()
        .map(|p| ids(&p["input_ids"]))
        .collect();
    let expected: Vec<Vec<u32>> = crate::prompts(&loaded.golden)
        .iter()
        .map(|p| ids(&p["greedy"]))
        .collect();
    let run = |model: &LlamaModel| {
        let order = [1, 0, 2];
        let mut caches: Vec<_> = order.iter().map(|_| model.new_cache()).collect();
        let mut inputs: Vec<Vec<u32>> = order.iter().map(|&i| prompts[i].clone()).collect();
        let mut fed = [0usize; 3];
        let mut outputs = vec![Vec::new(); 3];
        let mut rows = Vec::new();
        for step in 0..30 {
            // The third sequence joins at step 5 and feeds its prompt 3 tokens at a time.
            let active: Vec<usize> = if step < 5 { vec![0, 1] } else { vec![0, 2, 1] };
            let mut steps = Vec::new();
            let mut chunks = Vec::new();
            for &i in &active {
                let chunk = if i == 2 && fed[2] < inputs[2].len() {
                    let end = (fed[2] + 3).min(inputs[2].len());
                    inputs[2][fed[2]..end].to_vec()
                } else if i == 2 {
                    inputs[2][inputs[2].len() - 1..].to_vec()
                } else {
                    inputs[i].clone()
                };
                chunks.push(chunk);
            }
            let mut cache_refs: Vec<Option<&mut _>> = caches.iter_mut().map(Some).collect();
            for (&i, chunk) in active.iter().zip(&chunks) {
                steps.push(SequenceStep {
                    tokens: chunk,
                    cache: cache_refs[i].take().expect("each cache once"),
                    logits: LogitsFor::Last,
                });
            }
            let logits = model.forward(&mut steps).expect("forward");
            drop(steps);
            for ((&i, chunk), row) in active.iter().zip(&chunks).zip(&logits) {
                let row: Vec<f32> = row.flatten_all().and_then(|t| t.to_vec1()).expect("row");
                if i == 2 && fed[2] < inputs[2].len() {
                    fed[2] += chunk.len();
                    if fed[2] < inputs[2].len() {
                        continue;
                    }
                }
                let token = argmax(&row);
                outputs[i].push(token);
                rows.push(row);
                if i == 2 {
                    inputs[2].push(token);
                } else {
                    inputs[i] = vec![token];
                }
            }
        }
        (outputs, rows)
    };
    loaded.model.set_batched_decode(true);
    let (batched, batched_rows) = run(&loaded.model);
    loaded.model.set_batched_decode(false);
    let (alone, alone_rows) = run(&loaded.model);
    for (k, &i) in [1, 0, 2].iter().enumerate() {
        let n = batched[k].len();
        assert!(n >= 10, "sequence {k} produced {n} tokens");
        assert_eq!(batched[k], expected[i][..n], "sequence {k} (prompt {i})");
    }
    assert_eq!(batched, alone);
    let worst = batched_rows
        .iter()
        .zip(&alone_rows)
        .flat_map(|(a, b)| a.iter().zip(b).map(|(x, y)| (x - y).abs()))
        .fold(0f32, f32::max);
    assert!(
        worst <= 1e-4,
        "batched and one-by-one logits differ by {worst}"
    );
}
