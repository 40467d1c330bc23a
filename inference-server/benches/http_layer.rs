//! The HTTP layer's own cost, measured against the engine in the same run:
//!
//! 1. `/info` requests per second (authenticated), from 32 concurrent keep-alive clients;
//! 2. time per streamed token through HTTP (SSE) versus the same generation submitted to the
//!    engine directly, and the difference (the per-token overhead of the HTTP layer);
//! 3. 1,000 concurrent streaming clients against a server with a bounded queue: how many are
//!    served, how many get 429, whether anything else happens, whether `/health/live` keeps
//!    answering, and the process's peak memory before and after.
//!
//! `cargo bench -p llama-server --bench http_layer` (needs LLAMA_TOKENIZER_DIR, printed by
//! scripts/setup-tokenizer.sh). Prints a table and writes docs/benchmarks/http-layer.md.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use llama_server::auth::{Authenticator, KeyStore};
use llama_server::generation::GenerationRequest;
use llama_server::sampling::SamplingParams;
use llama_server::scheduler::SequenceEvent;
use llama_server::server_config::ServerConfig;
use llama_server::state::AppState;

const KEY: &str = "bench-key-0123456789abcdef012345";
const TOKENS: usize = 64;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(0.0, |kib| kib / 1024.0)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(run())
}

async fn run() -> Result<(), Box<dyn std::error::Error>> {
    let tokenizer_dir = std::env::var("LLAMA_TOKENIZER_DIR")
        .map_err(|_| "set LLAMA_TOKENIZER_DIR (scripts/setup-tokenizer.sh prints it)")?;
    let mut config = ServerConfig::from_yaml(&format!(
        "modelName: bench\nmodelPath: demo\ntokenizerDir: {tokenizer_dir}\n\
         rateLimits: {{requestsPerMinute: 100000000, tokensPerMinute: 1000000000}}\n\
         engine: {{maxBatchSize: 16, maxQueue: 256}}\n"
    ))?;
    config.http.max_body_bytes = 1 << 20;
    let state = AppState::new(config, Authenticator::Keys(KeyStore::fixed(&[KEY])));
    let loader = Arc::clone(&state);
    tokio::task::spawn_blocking(move || loader.load_engine()).await??;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let app = llama_server::app(Arc::clone(&state));
    tokio::spawn(async move { axum::serve(listener, app).await });
    let base = format!("http://{addr}");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2048)
        .build()?;
    let rss_start = peak_rss_mib();

    // 1. /info requests per second.
    let info_rps = {
        let done = Arc::new(AtomicUsize::new(0));
        let until = Instant::now() + Duration::from_secs(3);
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (client, url, done) = (client.clone(), format!("{base}/info"), Arc::clone(&done));
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    if let Ok(r) = client.get(&url).header("api-key", KEY).send().await
                        && r.status().is_success()
                        && r.bytes().await.is_ok()
                    {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }));
        }
        for t in tasks {
            t.await?;
        }
        done.load(Ordering::Relaxed) as f64 / 3.0
    };

    // 2. Per-token time: engine directly vs through HTTP streaming (same prompt, greedy).
    let engine = state.engine().ok_or("engine not loaded")?;
    let prompt_text = engine.template.render_json(
        &serde_json::json!([{"role": "user", "content": "Tell me a long story."}]),
        None,
        true,
    )?;
    let prompt = engine.tokenizer.encode(&prompt_text, false)?;
    let mut direct = Vec::new();
    let mut via_http = Vec::new();
    for _ in 0..5 {
        let mut request =
            GenerationRequest::new(prompt.clone(), Some(TOKENS), SamplingParams::greedy());
        request.ignore_eos = true;
        let mut rx = engine.handle.submit(request)?;
        let (mut first, mut last, mut n) = (None, Instant::now(), 0usize);
        while let Some(event) = rx.recv().await {
            match event {
                SequenceEvent::Token(_) => {
                    last = Instant::now();
                    first.get_or_insert(last);
                    n += 1;
                }
                SequenceEvent::Finished(_) | SequenceEvent::Failed(_) => break,
                SequenceEvent::Started { .. } => {}
            }
        }
        if let Some(first) = first {
            direct.push(last.duration_since(first).as_secs_f64() / (n.max(2) - 1) as f64);
        }

        let body = serde_json::json!({
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": TOKENS, "temperature": 0, "stream": true, "ignore_eos": true,
        });
        let response = client
            .post(format!("{base}/chat/completions"))
            .header("api-key", KEY)
            .header("extra-parameters", "pass-through")
            .json(&body)
            .send()
            .await?;
        let mut stream = response.bytes_stream();
        let (mut first, mut last, mut chunks) = (None, Instant::now(), 0usize);
        while let Some(Ok(bytes)) = stream.next().await {
            let text = String::from_utf8_lossy(&bytes);
            let content_chunks = text.matches("\"content\":\"").count();
            if content_chunks > 0 {
                last = Instant::now();
                first.get_or_insert(last);
                chunks += content_chunks;
            }
        }
        if let Some(first) = first {
            via_http.push(last.duration_since(first).as_secs_f64() / (chunks.max(2) - 1) as f64);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let (direct_ms, http_ms) = (median(&mut direct) * 1e3, median(&mut via_http) * 1e3);

    // 3. 1,000 concurrent streaming clients.
    let rss_before_storm = peak_rss_mib();
    let counts: Arc<[AtomicUsize; 4]> = Arc::new(Default::default()); // 200, 429, other, error
    let storm_start = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..1000 {
        let (client, url, counts) = (
            client.clone(),
            format!("{base}/chat/completions"),
            Arc::clone(&counts),
        );
        tasks.push(tokio::spawn(async move {
            let body = serde_json::json!({
                "messages": [{"role": "user", "content": format!("client {i}")}],
                "max_tokens": 16, "stream": true, "seed": i,
            });
            match client
                .post(&url)
                .header("api-key", KEY)
                .json(&body)
                .send()
                .await
            {
                Ok(r) if r.status() == 200 => {
                    let mut s = r.bytes_stream();
                    let mut ok = false;
                    while let Some(chunk) = s.next().await {
                        match chunk {
                            Ok(b) => ok |= b.ends_with(b"data: [DONE]\n\n"),
                            Err(_) => break,
                        }
                    }
                    counts[if ok { 0 } else { 3 }].fetch_add(1, Ordering::Relaxed);
                }
                Ok(r) if r.status() == 429 => {
                    counts[1].fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {
                    counts[2].fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    counts[3].fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    // Liveness while the storm runs.
    let mut live_ok = 0;
    let mut live_total = 0;
    while tasks.iter().any(|t| !t.is_finished()) && live_total < 600 {
        live_total += 1;
        if let Ok(r) = client.get(format!("{base}/health/live")).send().await
            && r.status().is_success()
        {
            live_ok += 1;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for t in tasks {
        t.await?;
    }
    let storm_seconds = storm_start.elapsed().as_secs_f64();
    let c: Vec<usize> = counts.iter().map(|a| a.load(Ordering::Relaxed)).collect();
    let rss_end = peak_rss_mib();

    let machine = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_owned())
        })
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let table = format!(
        "| measure | value |\n|---|---|\n\
         | `/info` requests/s (32 clients, keep-alive, key auth) | {info_rps:.0} |\n\
         | time per token, engine directly (median of 5 × {TOKENS} tokens) | {direct_ms:.3} ms |\n\
         | time per token, streamed over HTTP (SSE) | {http_ms:.3} ms |\n\
         | added by the HTTP layer per streamed token | {:.3} ms ({:+.1} %) |\n\
         | 1,000 concurrent streams: completed with `[DONE]` | {} |\n\
         | 1,000 concurrent streams: 429 (queue of 256 full) | {} |\n\
         | 1,000 concurrent streams: other status / broken | {} / {} |\n\
         | `/health/live` answered during the storm | {live_ok} of {live_total} |\n\
         | storm duration | {storm_seconds:.1} s |\n\
         | peak RSS: start / before storm / after storm | {rss_start:.0} / {rss_before_storm:.0} / {rss_end:.0} MiB |\n",
        http_ms - direct_ms,
        (http_ms / direct_ms.max(1e-9) - 1.0) * 100.0,
        c[0],
        c[1],
        c[2],
        c[3],
    );
    println!("{table}");
    let doc = format!(
        "# llama-server HTTP layer benchmark\n\n\
         `cargo bench -p llama-server --bench http_layer` on {machine} ({cores} cores), demo \
         model (tiny Llama shape, real Llama 3 tokenizer), server and clients in one process.\n\n\
         {table}\n\
         The per-token overhead compares the same greedy generation submitted to the engine \
         thread directly and streamed through `/chat/completions`; both run through the same \
         batching engine, so the difference is routing, JSON encoding, SSE framing and the \
         socket.\n"
    );
    let out =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks/http-layer.md");
    std::fs::write(&out, doc)?;
    println!("wrote {}", out.display());
    Ok(())
}
