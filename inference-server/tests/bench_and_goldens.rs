//! The binary's GPU-check tools, run here on the CPU: `check-goldens` against the committed
//! goldens (and against a doctored one, which must fail), `bench` on the tiny shape, and the
//! errors a build without CUDA gives when a GPU is asked for.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::tokenizer_dir;

fn llama_server() -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_llama-server"));
    command.env("RUST_LOG", "warn");
    command.env_remove("LLAMA_SERVER_DEVICE");
    command
}

fn run(command: &mut Command) -> (Output, String, String) {
    let output = command.output().expect("llama-server runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    (output, stdout, stderr)
}

fn goldens_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/goldens")
}

#[test]
fn check_goldens_passes_on_the_cpu_in_f32_and_bf16() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let json = scratch.path().join("goldens.json");
    let (output, stdout, stderr) = run(llama_server()
        .args(["check-goldens", "--device", "cpu", "--dtypes", "f32,bf16"])
        .arg("--goldens")
        .arg(goldens_dir())
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir())
        .arg("--json")
        .arg(&json));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    // A header, one line per golden model and dtype, the verdict.
    assert_eq!(lines.len(), 1 + 2 * 2 + 1, "{stdout}");
    assert!(lines[0].starts_with("golden") && lines[0].contains("max |Δlogit|"));
    assert_eq!(lines[5], "check-goldens: passed on cpu");
    for line in &lines[1..5] {
        assert!(line.ends_with("ok"), "{line}");
    }

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    let models = report["models"].as_array().expect("models");
    let names: Vec<(&str, &str)> = models
        .iter()
        .map(|m| {
            (
                m["golden"].as_str().expect("golden"),
                m["dtype"].as_str().expect("dtype"),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("tiny-seed42", "f32"),
            ("tiny-seed42", "bf16"),
            ("tiny-untied-seed7", "f32"),
            ("tiny-untied-seed7", "bf16"),
        ]
    );
    for model in models {
        assert_eq!(model["passed"], true);
        let prompts = model["prompts"].as_array().expect("prompts");
        assert_eq!(prompts.len(), 4);
        for prompt in prompts {
            let diff = prompt["max_logit_diff"].as_f64().expect("diff");
            let tokens = prompt["greedy_tokens"].as_u64().expect("tokens");
            assert_eq!(tokens, 64);
            if model["dtype"] == "f32" {
                // Exact: every greedy token, alone and batched, and logits like the tests'.
                assert!(diff < 1e-4, "{prompt}");
                assert_eq!(prompt["greedy_alone_matching"], 64, "{prompt}");
                assert_eq!(prompt["greedy_batched_matching"], 64, "{prompt}");
                assert_eq!(prompt["worst_margin"], 0.0, "{prompt}");
            } else {
                // bf16 really differs from f32, within the stated tolerance.
                assert!(diff > 1e-5 && diff <= 3e-2, "{prompt}");
            }
        }
    }
}

#[test]
fn check_goldens_passes_with_the_layers_split_round_three_devices() {
    // `--gpus N` on the CPU: N stand-ins for GPUs, every layer boundary a handover (the dry run
    // of what a multi-GPU host checks with --device cuda --gpus N).
    let scratch = tempfile::tempdir().expect("tempdir");
    let json = scratch.path().join("goldens.json");
    let (output, stdout, stderr) = run(llama_server()
        .args([
            "check-goldens",
            "--device",
            "cpu",
            "--gpus",
            "3",
            "--dtypes",
            "f32",
        ])
        .arg("--goldens")
        .arg(goldens_dir())
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir())
        .arg("--json")
        .arg(&json));
    assert!(output.status.success(), "{stdout}\n{stderr}");
    assert_eq!(
        stdout.lines().last(),
        Some("check-goldens: passed on cpu, layers split over 3 devices"),
        "{stdout}"
    );
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(report["gpus"], 3);
    assert_eq!(report["models"].as_array().map(Vec::len), Some(2));

    let (output, _, stderr) = run(llama_server().args([
        "check-goldens",
        "--device",
        "cpu",
        "--gpus",
        "0",
        "--goldens",
        ".",
    ]));
    assert!(!output.status.success());
    assert!(stderr.contains("--gpus"), "{stderr}");
}

#[test]
fn check_goldens_fails_on_a_doctored_golden() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let text =
        std::fs::read_to_string(goldens_dir().join("tiny-seed42.json")).expect("golden exists");
    let mut golden: serde_json::Value = serde_json::from_str(&text).expect("json");
    // Only the first prompt is kept (the check is quicker), and its 11th greedy token becomes
    // another one.
    let first = golden["prompts"][0].clone();
    golden["prompts"] = serde_json::json!([first]);
    let token = &mut golden["prompts"][0]["greedy"][10];
    *token = serde_json::json!((token.as_u64().expect("id") + 1) % 128_000);
    std::fs::write(scratch.path().join("tiny-seed42.json"), golden.to_string()).expect("write");
    let (output, stdout, stderr) = run(llama_server()
        .args(["check-goldens", "--dtypes", "f32"])
        .arg("--goldens")
        .arg(scratch.path())
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir()));
    assert_eq!(output.status.code(), Some(1), "{stdout}\n{stderr}");
    // The first 10 tokens still match, alone and batched.
    assert!(stdout.contains(" 10/64 "), "{stdout}");
    assert!(
        stdout.ends_with("check-goldens: FAILED on cpu\n"),
        "{stdout}"
    );

    let empty = tempfile::tempdir().expect("tempdir");
    let (output, _, stderr) = run(llama_server()
        .arg("check-goldens")
        .arg("--goldens")
        .arg(empty.path())
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir()));
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr.contains("no golden model files"), "{stderr}");
}

#[test]
fn bench_measures_prefill_and_decode_on_the_tiny_shape() {
    let scratch = tempfile::tempdir().expect("tempdir");
    let json = scratch.path().join("bench.json");
    let (output, stdout, stderr) = run(llama_server()
        .args([
            "bench",
            "--device",
            "cpu",
            "--shape",
            "tiny",
            "--batch",
            "1,3",
            "--prompt-tokens",
            "12",
            "--decode-tokens",
            "5",
            "--prefill-tokens",
            "8,40",
            // The 40-token prompt and the three 12-token ones go in over several steps.
            "--prefill-chunk-tokens",
            "16",
            "--repeats",
            "2",
            "--bandwidth-gbs",
            "10",
        ])
        .arg("--tokenizer-dir")
        .arg(tokenizer_dir())
        .arg("--json")
        .arg(&json));
    assert!(output.status.success(), "{stdout}\n{stderr}");

    let lines: Vec<&str> = stdout.lines().collect();
    assert!(
        lines[0]
            .starts_with("llama-server bench: tiny (0.008 B parameters, 0.033 GB in f32) on cpu"),
        "{stdout}"
    );
    assert!(
        lines[1].starts_with("bandwidth 10 GB/s: decode ceiling"),
        "{stdout}"
    );
    let header: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(
        header,
        [
            "metric", "batch", "prompt", "tokens", "seconds", "tokens/s", "per", "stream",
            "ceiling"
        ]
    );
    assert!(lines[lines.len() - 1].starts_with("peak RSS "), "{stdout}");
    let rows: Vec<Vec<&str>> = lines[3..lines.len() - 1]
        .iter()
        .map(|l| l.split_whitespace().collect())
        .collect();
    let keys: Vec<(&str, &str, &str, &str)> =
        rows.iter().map(|r| (r[0], r[1], r[2], r[3])).collect();
    assert_eq!(
        keys,
        [
            ("prefill", "1", "8", "8"),
            ("time_to_first_token", "1", "8", "1"),
            ("prefill", "1", "40", "40"),
            ("time_to_first_token", "1", "40", "1"),
            ("decode", "1", "12", "5"),
            ("decode", "3", "12", "15"),
        ]
    );
    assert!(rows[4][7].ends_with('%') && rows[0][7] == "-", "{stdout}");

    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("json written")).expect("json");
    assert_eq!(report["device"], "cpu");
    assert_eq!(report["dtype"], "f32");
    // tiny: 128256 × 64 tied embeddings, 2 layers, a final norm.
    assert_eq!(report["parameters"], 8_282_432);
    assert_eq!(report["weight_bytes"], 4 * 8_282_432);
    assert!(report["threads"].as_u64().is_some_and(|t| t >= 1));
    assert!(report["peak_rss_bytes"].as_u64().is_some_and(|b| b > 0));
    // The safetensors file: the weights and its header.
    assert!(
        report["model_file_bytes"]
            .as_u64()
            .is_some_and(|b| b > 4 * 8_282_432)
    );
    // Decode sequences end with 12 prompt tokens, the first sample and three 5-step windows
    // (warm-up and two measured), the last sample not cached: 27 tokens, 3 of them at once.
    assert_eq!(report["kv_tokens"], 3 * 27);
    let per_token = report["kv_bytes_per_token"]
        .as_u64()
        .expect("bytes per token");
    assert_eq!(report["kv_budget_bytes"].as_u64(), Some(3 * 27 * per_token));
    let ceiling = report["ceiling_tokens_per_second"]
        .as_f64()
        .expect("ceiling");
    assert!((ceiling - 10e9 / (4.0 * 8_282_432.0)).abs() < 1e-6);
    for m in report["measurements"].as_array().expect("measurements") {
        let seconds = m["seconds"].as_f64().expect("seconds");
        let rate = m["tokens_per_second"].as_f64().expect("rate");
        let tokens = m["tokens"].as_f64().expect("tokens");
        // Real work was timed: more than nothing, less than the whole test budget.
        assert!(seconds > 1e-6 && seconds < 60.0, "{m}");
        assert_eq!(m["runs_seconds"].as_array().map(Vec::len), Some(2), "{m}");
        assert!(
            (rate * seconds - tokens).abs() < 1e-6 * tokens.max(1.0),
            "{m}"
        );
        if m["metric"] == "decode" {
            let batch = m["batch"].as_f64().expect("batch");
            let per_stream = m["per_stream_tokens_per_second"].as_f64().expect("rate");
            assert!((per_stream * batch - rate).abs() < 1e-6 * rate, "{m}");
            let fraction = m["ceiling_fraction"].as_f64().expect("fraction");
            assert!((fraction - per_stream / ceiling).abs() < 1e-9, "{m}");
        } else {
            assert!(m["ceiling_fraction"].is_null(), "{m}");
        }
    }
}

#[test]
fn bench_rejects_what_it_cannot_measure() {
    let (output, _, stderr) = run(llama_server().args([
        "bench",
        "--shape",
        "tiny",
        "--batch",
        "0",
        "--tokenizer-dir",
        "/nonexistent",
    ]));
    assert_eq!(output.status.code(), Some(1));
    assert!(
        stderr.contains("every --batch must be at least 1"),
        "{stderr}"
    );
    // Neither --model nor --shape: a usage error from the argument parser.
    let (output, _, _) = run(llama_server().arg("bench"));
    assert_eq!(output.status.code(), Some(2));
}

#[test]
fn a_gpu_asked_of_a_build_without_cuda_is_a_clear_error() {
    if cfg!(feature = "cuda") {
        // scripts/test.sh checks the CUDA binary's own message on a machine without a GPU.
        return;
    }
    let expected = "this llama-server was built without CUDA; use the CUDA image";
    let serve = llama_server()
        .args(["serve", "--device", "cuda", "--listen", "127.0.0.1:0"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&serve.stderr);
    assert_eq!(serve.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");

    let from_env = llama_server()
        .args(["--listen", "127.0.0.1:0"])
        .env("LLAMA_SERVER_DEVICE", "cuda:1")
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&from_env.stderr);
    assert_eq!(from_env.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("device cuda:1: this llama-server was built without CUDA"),
        "{stderr}"
    );

    let bench = llama_server()
        .args(["bench", "--device", "cuda", "--model", "/nonexistent"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&bench.stderr);
    assert_eq!(bench.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains(expected), "{stderr}");

    let bad = llama_server()
        .args(["serve", "--device", "tpu"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("unknown device 'tpu'"), "{stderr}");
}
