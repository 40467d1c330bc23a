//! `llama-load`: drives a chat endpoint with N concurrent streaming clients for T seconds and
//! prints requests/s, tokens/s, time to first token and latency percentiles.
//!
//! ```text
//! llama-load --endpoint http://127.0.0.1:8080 --key KEY --clients 8 --seconds 30 [--max-tokens 64]
//! ```

use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use futures::StreamExt;

/// Load generator for an Azure AI Model Inference chat endpoint.
#[derive(Debug, Parser)]
#[command(name = "llama-load", version)]
struct Args {
    /// Base URL; `/chat/completions` is appended.
    #[arg(long)]
    endpoint: String,
    /// Key sent in the `api-key` header.
    #[arg(long)]
    key: String,
    /// Concurrent streaming clients, each sending one request after another.
    #[arg(long, default_value_t = 8)]
    clients: usize,
    /// How long to run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// `max_tokens` of each request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// The user message.
    #[arg(long, default_value = "Write a short story about a lighthouse keeper.")]
    prompt: String,
}

#[derive(Debug, Default)]
struct Totals {
    ok: usize,
    throttled: usize,
    failed: usize,
    tokens: usize,
    ttft: Vec<f64>,
    latency: Vec<f64>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llama-load: {err}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(run(args))
}

async fn run(args: Args) -> ExitCode {
    let client = match reqwest::Client::builder().build() {
        Ok(client) => client,
        Err(err) => {
            eprintln!("llama-load: {err}");
            return ExitCode::FAILURE;
        }
    };
    let url = format!("{}/chat/completions", args.endpoint.trim_end_matches('/'));
    let totals = Arc::new(Mutex::new(Totals::default()));
    let start = Instant::now();
    let until = start + Duration::from_secs(args.seconds);
    let body = serde_json::json!({
        "messages": [{"role": "user", "content": args.prompt}],
        "max_tokens": args.max_tokens,
        "stream": true,
        "stream_options": {"include_usage": true},
    });
    let mut tasks = Vec::new();
    for _ in 0..args.clients {
        let (client, url, key, body, totals) = (
            client.clone(),
            url.clone(),
            args.key.clone(),
            body.clone(),
            Arc::clone(&totals),
        );
        tasks.push(tokio::spawn(async move {
            while Instant::now() < until {
                let sent = Instant::now();
                let outcome = one_request(&client, &url, &key, &body, sent).await;
                let wait = {
                    let Ok(mut t) = totals.lock() else { return };
                    match outcome {
                        Outcome::Done { ttft, tokens } => {
                            t.ok += 1;
                            t.tokens += tokens;
                            t.ttft.push(ttft);
                            t.latency.push(sent.elapsed().as_secs_f64());
                            None
                        }
                        Outcome::Throttled(wait) => {
                            t.throttled += 1;
                            Some(wait)
                        }
                        Outcome::Failed => {
                            t.failed += 1;
                            None
                        }
                    }
                };
                if let Some(wait) = wait {
                    tokio::time::sleep(wait).await;
                }
            }
        }));
    }
    for task in tasks {
        let _ = task.await;
    }
    let elapsed = start.elapsed().as_secs_f64();
    let Ok(mut t) = totals.lock() else {
        return ExitCode::FAILURE;
    };
    let (ttft, latency) = (pcts(&mut t.ttft), pcts(&mut t.latency));
    println!("clients {}  duration {elapsed:.1} s", args.clients);
    println!(
        "requests: {} ok, {} throttled (429/503), {} failed",
        t.ok, t.throttled, t.failed
    );
    println!(
        "throughput: {:.2} requests/s, {:.1} tokens/s",
        t.ok as f64 / elapsed,
        t.tokens as f64 / elapsed
    );
    println!(
        "time to first token: p50 {:.3} s  p90 {:.3} s  p99 {:.3} s",
        ttft.0, ttft.1, ttft.2
    );
    println!(
        "latency:             p50 {:.3} s  p90 {:.3} s  p99 {:.3} s",
        latency.0, latency.1, latency.2
    );
    if t.ok == 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

enum Outcome {
    Done { ttft: f64, tokens: usize },
    Throttled(Duration),
    Failed,
}

async fn one_request(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &serde_json::Value,
    sent: Instant,
) -> Outcome {
    let Ok(response) = client
        .post(url)
        .header("api-key", key)
        .json(body)
        .send()
        .await
    else {
        return Outcome::Failed;
    };
    let status = response.status().as_u16();
    if status == 429 || status == 503 {
        let wait = response
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok())
            .unwrap_or(1);
        return Outcome::Throttled(Duration::from_secs(wait.min(5)));
    }
    if status != 200 {
        return Outcome::Failed;
    }
    let mut stream = response.bytes_stream();
    let mut buffer = String::new();
    let (mut ttft, mut tokens, mut done) = (None, 0usize, false);
    while let Some(chunk) = stream.next().await {
        let Ok(chunk) = chunk else {
            return Outcome::Failed;
        };
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.trim().strip_prefix("data: ") else {
                continue;
            };
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let Ok(json) = serde_json::from_str::<serde_json::Value>(data) else {
                return Outcome::Failed;
            };
            if json.get("error").is_some() {
                return Outcome::Failed;
            }
            let has_content = json["choices"][0]["delta"]["content"]
                .as_str()
                .is_some_and(|c| !c.is_empty());
            if has_content && ttft.is_none() {
                ttft = Some(sent.elapsed().as_secs_f64());
            }
            if json["choices"].as_array().is_some_and(Vec::is_empty)
                && let Some(n) = json["usage"]["completion_tokens"].as_u64()
            {
                tokens = n as usize;
            }
        }
    }
    if !done {
        return Outcome::Failed;
    }
    Outcome::Done {
        ttft: ttft.unwrap_or_else(|| sent.elapsed().as_secs_f64()),
        tokens,
    }
}

/// p50, p90, p99 of `values` (0 when empty).
fn pcts(values: &mut [f64]) -> (f64, f64, f64) {
    if values.is_empty() {
        return (0.0, 0.0, 0.0);
    }
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.5), at(0.9), at(0.99))
}
