//! GGUF weights: files written the way llama.cpp's tools write them load back and compute what
//! the f32 safetensors model computes, within bounds set by their storage type, and are what
//! llama.cpp expects (an independent forward pass with its conventions agrees).
//!
//! Logits are compared on 8 probe tokens, once at the start of a sequence and once after
//! [`DEPTH`] tokens of context. The exported files are cached beside the tiny models (keyed by
//! the exporter's source), so only a first run pays for writing them. Broken files, the
//! metadata and the command line are in `gguf_files.rs`.

mod common;

use std::path::Path;

use candle_core::quantized::gguf_file::Content;
use candle_core::quantized::{GgmlDType, QTensor};
use candle_core::{D, DType, Device, Tensor};
use llama_server::engine::gguf::GgufFile;
use llama_server::engine::weights::WeightFiles;
use llama_server::engine::{LlamaConfig, LlamaModel};
use llama_server::generate_model::ModelShape;
use llama_server::gguf_export::GgufFileType;

use common::gguf::{
    DEPTH, PROBE, Probed, compare, context, gguf_of, load, load_with_f32_cache, probe_logits,
    rewrite, scratch, without_tokenizer,
};
use common::tiny_model;

/// F16 weights: each weight is rounded to 11 significant bits (relative rms error 2e-4 on these
/// weights), which moves these logits (spread ≈ 0.16) by ~5e-5 rms; the bound is on the largest
/// of ~1M logits. The GGUF models also hold their keys and values in f16 (the default cache for
/// 16-bit and quantized weights); the f32 models in f32.
const F16_MAX_ABS: f32 = 1e-3;
/// Q8_0: 8-bit steps of each 32-weight block's largest value (relative rms error 5e-3, 26× the
/// f16 rounding), and the activations are quantized to 8 bits too, as in llama.cpp: ≈ 2e-3 rms
/// per logit, the largest of ~1M logits a 5σ tail.
const Q8_0_MAX_ABS: f32 = 0.03;

#[test]
fn tiny_files_match_the_f32_model() {
    let reference = Probed::of(&load(&tiny_model(ModelShape::Tiny, 42)));
    let file = |file_type| load(&gguf_of(ModelShape::Tiny, 42, file_type));
    for diff in reference.against(&file(GgufFileType::F16), "tiny f16") {
        assert!(diff.max_abs < F16_MAX_ABS, "{diff:?}");
        assert_eq!(diff.top1_agree, PROBE.len(), "{diff:?}");
    }
    for diff in reference.against(&file(GgufFileType::Q8_0), "tiny q8_0") {
        assert!(diff.max_abs < Q8_0_MAX_ABS, "{diff:?}");
        assert!(diff.rms < 0.02 * diff.spread, "{diff:?}");
        assert_eq!(diff.top1_agree, PROBE.len(), "{diff:?}");
    }

    // The tiny shape's 64-value rows do not split into K-quant blocks: llama.cpp's fallback
    // gives Q5_0 for Q4_K and Q8_0 for Q6_K (see the Tiny256 test for real K-quants).
    let path = gguf_of(ModelShape::Tiny, 42, GgufFileType::Q4KM);
    let gguf = GgufFile::open(&path).expect("open");
    assert_eq!(
        gguf.dtype("blk.0.attn_q.weight").ok(),
        Some(GgmlDType::Q5_0)
    );
    // Tied: the embeddings are the output projection, which gets Q6_K → Q8_0.
    assert_eq!(gguf.dtype("token_embd.weight").ok(), Some(GgmlDType::Q8_0));
    assert!(!gguf.contains("output.weight"));
    for diff in reference.against(&load(&path), "tiny q4_k_m (q5_0 fallback)") {
        // Q5_0 has 4% relative weight error: logits move by a few percent of their spread.
        assert!(diff.correlation > 0.99, "{diff:?}");
        assert!(diff.rms < 0.1 * diff.spread, "{diff:?}");
    }
}

/// TinyUntied has Llama 3.1 rope scaling, which a GGUF file carries only as the
/// `rope_freqs.weight` tensor: the loaded model must rotate with the scaled frequencies.
#[test]
fn tiny_untied_files_honour_llama3_rope_scaling() {
    let dir = tiny_model(ModelShape::TinyUntied, 7);
    let safetensors = load(&dir);
    let f16 = load(&gguf_of(ModelShape::TinyUntied, 7, GgufFileType::F16));
    let expected = safetensors.rope().frequencies().expect("frequencies");
    let actual = f16.rope().frequencies().expect("frequencies");
    let config = LlamaConfig::from_file(&dir.join("config.json")).expect("config");
    let unscaled_config = LlamaConfig {
        rope_scaling: None,
        ..config
    };
    let plain = llama_server::engine::rope::inverse_frequencies(&unscaled_config);
    println!("scaled {expected:?}\nfrom gguf {actual:?}\nunscaled {plain:?}");
    for (a, e) in actual.iter().zip(&expected) {
        assert!((a - e).abs() <= e * 1e-6, "{a} vs {e}");
    }
    assert!(
        plain.iter().zip(&expected).any(|(p, e)| *p > 7.9 * e),
        "scaling divides by 8"
    );

    let reference = Probed::of(&safetensors);
    let f16_diffs = reference.against(&f16, "untied f16");
    for diff in &f16_diffs {
        assert!(diff.max_abs < F16_MAX_ABS, "{diff:?}");
    }
    for diff in reference.against(
        &load(&gguf_of(ModelShape::TinyUntied, 7, GgufFileType::Q8_0)),
        "untied q8_0",
    ) {
        assert!(diff.max_abs < Q8_0_MAX_ABS, "{diff:?}");
        assert!(diff.rms < 0.02 * diff.spread, "{diff:?}");
    }

    // Random weights attend almost uniformly, so the rotation moves these logits only a
    // little; still, the f16 file is several times closer to the scaled model at depth than
    // the same weights without the scaling are.
    let unscaled = LlamaModel::from_weights(
        unscaled_config,
        &WeightFiles::open(&dir).expect("weights"),
        DType::F32,
        &[Device::Cpu],
    )
    .expect("unscaled model");
    let without = compare(&reference.0[1].1, &probe_logits(&unscaled, DEPTH));
    println!("untied without rope scaling at depth {DEPTH}: {without:?}");
    assert!(
        without.rms > 3.0 * f16_diffs[1].rms,
        "{without:?} vs {:?}",
        f16_diffs[1]
    );
}

/// Tiny256's rows split into 256-value blocks, so its Q4_K_M file really is llama.cpp's K-quant
/// mix. Q4_K keeps 4.5 bits per weight (relative rms error 7.5% on these weights, Q6_K 1.8%),
/// so single logits move by a good part of their spread, and greedy picks among 128k nearly
/// tied random logits can flip; the bounds are on correlation and on where the reference's
/// greedy token ranks. The quantized kernels themselves are held tight: against the same
/// weights dequantized only the 8-bit quantization of the activations differs.
#[test]
fn q4_k_m_of_tiny_256_uses_k_quants_and_tracks_the_f32_model() {
    let path = gguf_of(ModelShape::Tiny256, 3, GgufFileType::Q4KM);
    let file = GgufFile::open(&path).expect("open");
    let dtype = |name: &str| file.dtype(name).expect(name);
    assert_eq!(dtype("token_embd.weight"), GgmlDType::Q4K);
    assert_eq!(dtype("output.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.0.attn_q.weight"), GgmlDType::Q4K);
    assert_eq!(dtype("blk.0.ffn_down.weight"), GgmlDType::Q4K);
    assert_eq!(dtype("blk.1.ffn_down.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.1.attn_v.weight"), GgmlDType::Q6K);
    assert_eq!(dtype("blk.0.attn_norm.weight"), GgmlDType::F32);
    assert_eq!(dtype("rope_freqs.weight"), GgmlDType::F32);
    let (mut bytes, mut weights) = (0, 0);
    for name in file.tensor_names() {
        let count: usize = file.shape(name).expect(name).iter().product();
        bytes += count / dtype(name).block_size() * dtype(name).type_size();
        weights += count;
    }
    let bits = 8.0 * bytes as f64 / weights as f64;
    println!("q4_k_m: {bits:.2} bits per weight");
    // Q4_K is 4.5 bits, Q6_K 6.56; the Q6_K output projection is half of this model's weights.
    assert!((4.5..6.6).contains(&bits), "{bits}");

    let quantized = load(&path);
    // Every product on the engine's K-quant kernels (where the CPU has AVX2): its steps run on
    // the engine's step thread; the f32 model's dense products keep rayon's pool.
    assert_eq!(
        quantized.on_engine_kernels(),
        llama_server::engine::q8_0::supported()
    );
    let f32_model = load(&tiny_model(ModelShape::Tiny256, 3));
    assert!(!f32_model.on_engine_kernels());
    // Rope scaling is covered above; shallower context keeps this wider model quick.
    let depths = [0, 256];
    let reference = Probed::at(&f32_model, &depths);
    for diff in reference.against(&quantized, "tiny-256 q4_k_m") {
        assert!(diff.correlation > 0.97, "{diff:?}");
        assert!(diff.rms < 0.25 * diff.spread, "{diff:?}");
        assert!(diff.worst_rank < 50, "{diff:?}");
    }

    let out = scratch();
    let dequantized = out.path().join("dequantized.gguf");
    // F16 rounds 40× less than the activation quantization measured here.
    rewrite(&path, &dequantized, without_tokenizer, |_, tensor| {
        let dense = tensor.dequantize(&Device::Cpu).expect("dequantize");
        Some(QTensor::quantize(&dense, GgmlDType::F16).expect("f16"))
    });
    let twin = Probed::at(&load(&dequantized), &depths);
    for diff in twin.against(&quantized, "tiny-256 q4_k_m vs its weights dequantized") {
        assert!(diff.correlation > 0.999, "{diff:?}");
        assert!(diff.rms < 0.03 * diff.spread, "{diff:?}");
    }
}

/// An independent llama.cpp-style forward pass over the file's own tensors: Q and K as stored
/// (permuted) with llama.cpp's interleaved rotation (`rope_i`, pairs 2i/2i+1), frequencies
/// divided by `rope_freqs` as `ggml_rope_ext` does. Logits of the last `rows` positions.
fn llama_cpp_style_logits(path: &Path, tokens: &[u32], rows: usize) -> candle_core::Result<Tensor> {
    let cpu = Device::Cpu;
    let mut reader = std::io::BufReader::new(std::fs::File::open(path)?);
    let content = Content::read(&mut reader)?;
    let mut tensor = |name: &str| -> candle_core::Result<Tensor> {
        content.tensor(&mut reader, name, &cpu)?.dequantize(&cpu)
    };
    let meta = |key: &str| content.metadata.get(key).cloned().expect(key);
    let heads = meta("llama.attention.head_count").to_u32()? as usize;
    let kv_heads = meta("llama.attention.head_count_kv").to_u32()? as usize;
    let hidden = meta("llama.embedding_length").to_u32()? as usize;
    let layers = meta("llama.block_count").to_u32()? as usize;
    let eps = meta("llama.attention.layer_norm_rms_epsilon").to_f32()?;
    let theta = meta("llama.rope.freq_base").to_f32()?;
    let head_dim = hidden / heads;
    let half = head_dim / 2;
    let factors: Vec<f32> = if content.tensor_infos.contains_key("rope_freqs.weight") {
        tensor("rope_freqs.weight")?.to_vec1()?
    } else {
        vec![1.0; half]
    };
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| theta.powf(-2.0 * i as f32 / head_dim as f32) / factors[i])
        .collect();
    let t = tokens.len();
    let positions = Tensor::arange(0f32, t as f32, &cpu)?.reshape((t, 1))?;
    let angles = positions.broadcast_mul(&Tensor::from_vec(inv_freq, (1, half), &cpu)?)?;
    let (cos, sin) = (angles.cos()?, angles.sin()?);
    let mask: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (t, t), &cpu)?;
    let embeddings = tensor("token_embd.weight")?;
    let ids = Tensor::new(tokens, &cpu)?;
    let mut x = embeddings.index_select(&ids, 0)?;
    let heads_first = |m: Tensor, n: usize| -> candle_core::Result<Tensor> {
        m.reshape((t, n, head_dim))?
            .transpose(0, 1)?
            .unsqueeze(0)?
            .contiguous()
    };
    for l in 0..layers {
        let w = |part: &str| format!("blk.{l}.{part}.weight");
        let h = candle_nn::ops::rms_norm(&x, &tensor(&w("attn_norm"))?, eps)?;
        let q = heads_first(h.matmul(&tensor(&w("attn_q"))?.t()?)?, heads)?;
        let k = heads_first(h.matmul(&tensor(&w("attn_k"))?.t()?)?, kv_heads)?;
        let v = heads_first(h.matmul(&tensor(&w("attn_v"))?.t()?)?, kv_heads)?;
        let q = candle_nn::rotary_emb::rope_i(&q, &cos, &sin)?;
        let k = candle_nn::rotary_emb::rope_i(&k, &cos, &sin)?;
        // Query head h reads key/value head h / group, as ggml's broadcasting matmul does.
        let group = heads / kv_heads;
        let mut outputs = Vec::with_capacity(heads);
        for head in 0..heads {
            let qh = q.get(0)?.get(head)?;
            let kh = k.get(0)?.get(head / group)?;
            let vh = v.get(0)?.get(head / group)?;
            let scores = (qh.matmul(&kh.t()?)? / (head_dim as f64).sqrt())?.broadcast_add(&mask)?;
            outputs.push(candle_nn::ops::softmax(&scores, D::Minus1)?.matmul(&vh)?);
        }
        let attn = Tensor::cat(&outputs, 1)?;
        x = (x + attn.matmul(&tensor(&w("attn_output"))?.t()?)?)?;
        let h = candle_nn::ops::rms_norm(&x, &tensor(&w("ffn_norm"))?, eps)?;
        let gate = candle_nn::ops::silu(&h.matmul(&tensor(&w("ffn_gate"))?.t()?)?)?;
        let up = h.matmul(&tensor(&w("ffn_up"))?.t()?)?;
        x = (x + (gate * up)?.matmul(&tensor(&w("ffn_down"))?.t()?)?)?;
    }
    let x = candle_nn::ops::rms_norm(&x, &tensor("output_norm.weight")?, eps)?;
    let output = if content.tensor_infos.contains_key("output.weight") {
        tensor("output.weight")?
    } else {
        embeddings
    };
    x.narrow(0, t - rows, rows)?.matmul(&output.t()?)
}

/// The file is what llama.cpp expects, not merely what our own loader undoes: a forward pass
/// with llama.cpp's conventions over the stored tensors agrees with `load_gguf`, for the shape
/// with GQA, an untied output and rope scaling.
#[test]
fn a_llama_cpp_style_forward_pass_over_the_file_agrees_with_the_engine() {
    const CONTEXT: usize = 256;
    let path = gguf_of(ModelShape::TinyUntied, 7, GgufFileType::F16);
    let mut tokens = context(CONTEXT);
    tokens.extend(PROBE);
    let theirs: Vec<Vec<f32>> = llama_cpp_style_logits(&path, &tokens, PROBE.len())
        .expect("reference forward")
        .to_vec2()
        .expect("logits");
    let diff = compare(&theirs, &probe_logits(&load_with_f32_cache(&path), CONTEXT));
    println!("llama.cpp-style forward vs engine, same f16 file: {diff:?}");
    // Same weights, f32 compute both ways: only summation order differs.
    assert!(diff.max_abs < 1e-4, "{diff:?}");

    // The control: a file whose Q/K rows were not permuted the converter's way (so the engine's
    // restoration scrambles them) is far off.
    let out = scratch();
    let unpermuted = out.path().join("unpermuted.gguf");
    rewrite(&path, &unpermuted, without_tokenizer, |name, tensor| {
        let heads = match name.rsplit('.').nth(1) {
            Some("attn_q") => 4,
            Some("attn_k") => 2,
            _ => return Some(tensor),
        };
        let dense = tensor.dequantize(&Device::Cpu).expect("dequantize");
        let hf_rows = hf_rows_of(&dense, heads);
        Some(QTensor::quantize(&hf_rows, GgmlDType::F16).expect("quantize"))
    });
    let wrong = compare(
        &theirs,
        &probe_logits(&load_with_f32_cache(&unpermuted), CONTEXT),
    );
    println!("engine on a file with unpermuted Q/K rows: {wrong:?}");
    assert!(wrong.max_abs > 100.0 * diff.max_abs, "{wrong:?}");
}

/// The inverse of the converter's permutation, written out row by row: GGUF row `2i + j` of a
/// head holds Hugging Face row `j * d/2 + i`.
fn hf_rows_of(gguf_rows: &Tensor, heads: usize) -> Tensor {
    let rows = gguf_rows.dim(0).expect("rows");
    let head_dim = rows / heads;
    let order: Vec<u32> = (0..rows)
        .map(|hf| {
            let (head, r) = (hf / head_dim, hf % head_dim);
            let (j, i) = (r / (head_dim / 2), r % (head_dim / 2));
            (head * head_dim + 2 * i + j) as u32
        })
        .collect();
    let order = Tensor::new(order.as_slice(), &Device::Cpu).expect("order");
    gguf_rows.index_select(&order, 0).expect("reorder")
}

#[test]
fn a_gguf_model_split_over_two_devices_computes_what_it_does_on_one() {
    // The CPU stands in for both devices: this checks that the loader puts every layer's
    // quantized weights where the placement says and that the split model's logits are the
    // whole model's, bit for bit.
    let path = gguf_of(ModelShape::Tiny256, 3, GgufFileType::Q4KM);
    let two = [Device::Cpu, Device::Cpu];
    let split = LlamaModel::load_gguf_on(&path, DType::F32, &two, |_| 0).expect("split over two");
    // Its 32 M-parameter embedding and output outweigh both 0.6 M-parameter layers, so the
    // balance puts the layers on the second device; with room for a million tokens of keys
    // and values (512 bytes a token and layer in f16), the layers outweigh them and split.
    assert_eq!(split.placement().layer_counts(), vec![0, 2]);
    let with_cache = LlamaModel::load_gguf_on(&path, DType::F32, &two, |_| 1 << 20).expect("split");
    assert_eq!(with_cache.placement().layer_counts(), vec![1, 1]);
    let whole = load(&path);
    for depth in [0, 64] {
        let expected = probe_logits(&whole, depth);
        assert_eq!(probe_logits(&split, depth), expected, "depth {depth}");
        assert_eq!(probe_logits(&with_cache, depth), expected, "depth {depth}");
    }
}
