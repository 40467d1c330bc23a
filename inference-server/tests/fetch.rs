//! `llama-server fetch`, the real binary against a real HTTP server on 127.0.0.1: URL downloads
//! with and without a matching SHA-256, archives, a fake Hugging Face endpoint with a gated
//! repository, retries, and the skip on a second run.

use std::collections::HashMap;
use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Output;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

const TOKEN: &str = "hf_test_token_0123456789";

/// What the fake server answers, and what it was asked.
#[derive(Default)]
struct Served {
    /// Path → body.
    files: HashMap<String, Vec<u8>>,
    /// Path → how many more times it answers 500 before its body.
    failures: HashMap<String, usize>,
    /// When set, every path needs `Authorization: Bearer <token>`.
    token: Option<String>,
    /// Every path requested, in order.
    requests: Vec<String>,
}

type Shared = Arc<Mutex<Served>>;

async fn serve_file(State(served): State<Shared>, uri: Uri, headers: HeaderMap) -> Response {
    let Ok(mut served) = served.lock() else {
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    };
    let path = uri.path().to_owned();
    served.requests.push(path.clone());
    if let Some(token) = &served.token {
        let expected = format!("Bearer {token}");
        let given = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        match given {
            None => return StatusCode::UNAUTHORIZED.into_response(),
            Some(given) if given != expected => return StatusCode::FORBIDDEN.into_response(),
            Some(_) => {}
        }
    }
    if let Some(left) = served.failures.get_mut(&path)
        && *left > 0
    {
        *left -= 1;
        return StatusCode::INTERNAL_SERVER_ERROR.into_response();
    }
    match served.files.get(&path) {
        Some(body) => Body::from(body.clone()).into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Serves `served` on 127.0.0.1:0 for the rest of the test; returns its base URL.
async fn start(served: Shared) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr: SocketAddr = listener.local_addr().expect("addr");
    let app = Router::new().fallback(serve_file).with_state(served);
    tokio::spawn(async move {
        axum::serve(listener, app).await.expect("serve");
    });
    format!("http://{addr}")
}

fn shared(files: &[(&str, &[u8])]) -> Shared {
    Arc::new(Mutex::new(Served {
        files: files
            .iter()
            .map(|(path, body)| ((*path).to_owned(), body.to_vec()))
            .collect(),
        ..Served::default()
    }))
}

fn requests(served: &Shared) -> Vec<String> {
    served.lock().expect("lock").requests.clone()
}

/// Runs `llama-server fetch ARGS` with `env` (and without any HF_TOKEN of the caller's).
async fn fetch(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_llama-server"));
    command.arg("fetch").args(args).env_remove("HF_TOKEN");
    for (key, value) in env {
        command.env(key, value);
    }
    command.output().await.expect("run llama-server fetch")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

fn sha256(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The names in `dir`, sorted.
fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("read dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn path_str(path: &Path) -> &str {
    path.to_str().expect("utf-8 path")
}

#[tokio::test]
async fn gguf_url_with_matching_sha256_is_saved_under_its_name() {
    let weights = b"GGUF\x03\x00\x00\x00 pretend weights".repeat(1000);
    let served = shared(&[("/models/tiny.Q8_0.gguf", &weights)]);
    let base = start(served.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    // Upper-case hex and a query string, as a signed URL has.
    let sha = sha256(&weights).to_ascii_uppercase();
    let url = format!("{base}/models/tiny.Q8_0.gguf?signature=abc");
    let output = fetch(
        &["--out", path_str(&out), "--url", &url, "--sha256", &sha],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        std::fs::read(out.join("tiny.Q8_0.gguf")).expect("weights"),
        weights
    );
    assert_eq!(
        listing(&out),
        [".llama-fetch-complete", "tiny.Q8_0.gguf"],
        "no .partial left"
    );
    assert!(
        stdout.contains("tiny.Q8_0.gguf") && stdout.contains("(100%)"),
        "{stdout}"
    );
    assert!(stdout.contains("fetch: done: 1 file(s)"), "{stdout}");
    assert!(!stdout.contains("signature=abc"), "{stdout}");
}

#[tokio::test]
async fn sha256_mismatch_fails_naming_both_hashes_and_leaves_no_weights() {
    let weights = b"not the weights you expected".to_vec();
    let served = shared(&[("/m.gguf", &weights)]);
    let base = start(served).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let termination_log = dir.path().join("termination-log");
    std::fs::write(&termination_log, "").expect("termination log");
    let expected = "0".repeat(64);
    let output = fetch(
        &[
            "--out",
            path_str(&out),
            "--url",
            &format!("{base}/m.gguf"),
            "--sha256",
            &expected,
            "--termination-log",
            path_str(&termination_log),
        ],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        !output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let actual = sha256(&weights);
    assert!(
        stderr.contains(&expected) && stderr.contains(&actual),
        "{stderr}"
    );
    assert!(listing(&out).is_empty(), "left behind: {:?}", listing(&out));
    let message = std::fs::read_to_string(&termination_log).expect("read termination log");
    assert!(
        message.contains("sha256 mismatch") && message.contains(&actual),
        "{message}"
    );
}

/// A `.tar.gz` holding `entries` (path, body), with paths written as given, unchecked, so that
/// hostile archives can be built too.
fn tar_gz(entries: &[(&str, &[u8])]) -> Vec<u8> {
    let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    let mut builder = tar::Builder::new(gz);
    for (path, body) in entries {
        let mut header = tar::Header::new_old();
        let name = path.as_bytes();
        header.as_old_mut().name[..name.len()].copy_from_slice(name);
        header.set_size(body.len() as u64);
        header.set_mode(0o644);
        header.set_entry_type(tar::EntryType::Regular);
        header.set_cksum();
        builder.append(&header, *body).expect("append");
    }
    let mut gz = builder.into_inner().expect("finish tar");
    gz.flush().expect("flush");
    gz.finish().expect("finish gzip")
}

#[tokio::test]
async fn tar_gz_archive_is_unpacked_into_out() {
    let archive = tar_gz(&[
        ("config.json", br#"{"hidden_size": 64}"#),
        ("model.safetensors", b"safetensors bytes"),
        ("tokenizer/tokenizer.json", b"{}"),
    ]);
    let served = shared(&[("/llama.tar.gz", &archive)]);
    let base = start(served).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let sha = sha256(&archive);
    let output = fetch(
        &[
            "--out",
            path_str(&out),
            "--url",
            &format!("{base}/llama.tar.gz"),
            "--sha256",
            &sha,
        ],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert_eq!(
        listing(&out),
        [
            ".llama-fetch-complete",
            "config.json",
            "model.safetensors",
            "tokenizer"
        ]
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).expect("weights"),
        b"safetensors bytes"
    );
    assert_eq!(
        std::fs::read(out.join("tokenizer/tokenizer.json")).expect("tokenizer"),
        b"{}"
    );
    assert!(stdout.contains("fetch: done: 3 file(s)"), "{stdout}");
}

#[tokio::test]
async fn path_traversal_archive_is_rejected_and_nothing_is_unpacked() {
    let archive = tar_gz(&[("config.json", b"{}"), ("../escaped.txt", b"outside")]);
    let served = shared(&[("/evil.tgz", &archive)]);
    let base = start(served).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let output = fetch(
        &[
            "--out",
            path_str(&out),
            "--url",
            &format!("{base}/evil.tgz"),
        ],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        !output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("unsafe archive entry") && stderr.contains("../escaped.txt"),
        "{stderr}"
    );
    assert!(listing(&out).is_empty(), "left behind: {:?}", listing(&out));
    assert_eq!(listing(dir.path()), ["models"], "nothing escaped");
}

/// A Hugging Face repository as the hub lists and resolves it, needing [`TOKEN`].
fn gated_repository() -> Shared {
    let listing = serde_json::json!({
        "id": "meta-llama/Tiny-Llama",
        "siblings": [
            {"rfilename": ".gitattributes"},
            {"rfilename": "README.md"},
            {"rfilename": "config.json"},
            {"rfilename": "generation_config.json"},
            {"rfilename": "model.safetensors"},
            {"rfilename": "original/consolidated.00.pth"},
            {"rfilename": "tokenizer.json"},
            {"rfilename": "tokenizer_config.json"},
        ],
    })
    .to_string();
    let prefix = "/meta-llama/Tiny-Llama/resolve/main";
    let files: Vec<(String, Vec<u8>)> = vec![
        (
            "/api/models/meta-llama/Tiny-Llama/revision/main".into(),
            listing.into_bytes(),
        ),
        (format!("{prefix}/config.json"), b"{\"config\":1}".to_vec()),
        (format!("{prefix}/generation_config.json"), b"{}".to_vec()),
        (format!("{prefix}/model.safetensors"), vec![7u8; 4096]),
        (format!("{prefix}/tokenizer.json"), b"{\"tok\":1}".to_vec()),
        (format!("{prefix}/tokenizer_config.json"), b"{}".to_vec()),
        (format!("{prefix}/README.md"), b"readme".to_vec()),
    ];
    Arc::new(Mutex::new(Served {
        files: files.into_iter().collect(),
        token: Some(TOKEN.to_owned()),
        ..Served::default()
    }))
}

#[tokio::test]
async fn hugging_face_gated_repository_needs_the_token_and_a_second_run_downloads_nothing() {
    let served = gated_repository();
    let base = start(served.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let args = [
        "--out",
        path_str(&out),
        "--hugging-face",
        "meta-llama/Tiny-Llama",
        "--revision",
        "main",
    ];

    let without = fetch(&args, &[("HF_ENDPOINT", &base)]).await;
    let (stdout, stderr) = text(&without);
    assert!(
        !without.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("gated") && stderr.contains("tokenSecretRef"),
        "{stderr}"
    );

    let wrong = fetch(
        &args,
        &[("HF_ENDPOINT", &base), ("HF_TOKEN", "hf_wrong_token")],
    )
    .await;
    let (stdout, stderr) = text(&wrong);
    assert!(
        !wrong.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("lacks access"), "{stderr}");
    assert!(!format!("{stdout}{stderr}").contains("hf_wrong_token"));

    let with = fetch(&args, &[("HF_ENDPOINT", &base), ("HF_TOKEN", TOKEN)]).await;
    let (stdout, stderr) = text(&with);
    assert!(with.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        !stdout.contains(TOKEN) && !stderr.contains(TOKEN),
        "the token was printed"
    );
    assert_eq!(
        listing(&out),
        [
            ".llama-fetch-complete",
            "config.json",
            "generation_config.json",
            "model.safetensors",
            "tokenizer.json",
            "tokenizer_config.json",
        ]
    );
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).expect("weights"),
        vec![7u8; 4096]
    );
    assert!(stdout.contains("fetch: done: 5 file(s)"), "{stdout}");

    let before = requests(&served).len();
    let again = fetch(&args, &[("HF_ENDPOINT", &base), ("HF_TOKEN", TOKEN)]).await;
    let (stdout, stderr) = text(&again);
    assert!(again.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(stdout.contains("nothing to do"), "{stdout}");
    assert_eq!(
        requests(&served).len(),
        before,
        "the second run made requests"
    );
}

#[tokio::test]
async fn unknown_revision_is_reported_as_not_found() {
    let served = gated_repository();
    let base = start(served).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let output = fetch(
        &[
            "--out",
            path_str(&out),
            "--hugging-face",
            "meta-llama/Tiny-Llama",
            "--revision",
            "v9",
        ],
        &[("HF_ENDPOINT", &base), ("HF_TOKEN", TOKEN)],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        !output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("not found") && stderr.contains("\"v9\""),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_server_error_is_retried_and_a_second_run_is_skipped() {
    let weights = b"GGUF weights after a hiccup".to_vec();
    let served = shared(&[("/m.gguf", &weights)]);
    served
        .lock()
        .expect("lock")
        .failures
        .insert("/m.gguf".into(), 1);
    let base = start(served.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let url = format!("{base}/m.gguf");
    let args = ["--out", path_str(&out), "--url", &url];

    let output = fetch(&args, &[]).await;
    let (stdout, stderr) = text(&output);
    assert!(
        output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stdout.contains("HTTP 500") && stdout.contains("retrying"),
        "{stdout}"
    );
    assert_eq!(requests(&served), ["/m.gguf", "/m.gguf"]);
    assert_eq!(std::fs::read(out.join("m.gguf")).expect("weights"), weights);

    let again = fetch(&args, &[]).await;
    assert!(again.status.success());
    assert_eq!(
        requests(&served).len(),
        2,
        "the second run downloaded again"
    );

    // A different source in the same directory is fetched, not skipped.
    let other = fetch(
        &[
            "--out",
            path_str(&out),
            "--url",
            &format!("{base}/m.gguf?v=2"),
        ],
        &[],
    )
    .await;
    assert!(other.status.success());
    assert_eq!(requests(&served).len(), 3);
}

#[tokio::test]
async fn persistent_server_errors_give_up_after_a_few_attempts() {
    let served = shared(&[("/m.gguf", b"never served")]);
    served
        .lock()
        .expect("lock")
        .failures
        .insert("/m.gguf".into(), 100);
    let base = start(served.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let output = fetch(
        &["--out", path_str(&out), "--url", &format!("{base}/m.gguf")],
        &[],
    )
    .await;
    let (stdout, stderr) = text(&output);
    assert!(
        !output.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(stderr.contains("gave up after 4 attempts"), "{stderr}");
    assert_eq!(requests(&served).len(), 4);
    assert!(listing(&out).is_empty(), "left behind: {:?}", listing(&out));
}

/// A repository of GGUF files, one per type, as GGUF publishers lay them out (public: no token).
fn gguf_repository() -> Shared {
    let names = [
        "Llama-3.2-1B-Instruct-Q4_K_M.gguf",
        "Llama-3.2-1B-Instruct-Q8_0.gguf",
        "Llama-3.2-1B-Instruct-f16.gguf",
        // A type split in two, in a directory of its own.
        "Llama-3.2-1B-Instruct-Q6_K/Llama-3.2-1B-Instruct-Q6_K-00001-of-00002.gguf",
        "Llama-3.2-1B-Instruct-Q6_K/Llama-3.2-1B-Instruct-Q6_K-00002-of-00002.gguf",
    ];
    let listing = serde_json::json!({
        "id": "publisher/Llama-3.2-1B-Instruct-GGUF",
        "siblings": std::iter::once("README.md")
            .chain(names)
            .map(|n| serde_json::json!({"rfilename": n}))
            .collect::<Vec<_>>(),
    })
    .to_string();
    let prefix = "/publisher/Llama-3.2-1B-Instruct-GGUF/resolve/main";
    let mut files: Vec<(String, Vec<u8>)> = vec![(
        "/api/models/publisher/Llama-3.2-1B-Instruct-GGUF/revision/main".into(),
        listing.into_bytes(),
    )];
    for (i, name) in names.iter().enumerate() {
        files.push((format!("{prefix}/{name}"), vec![i as u8 + 1; 1024]));
    }
    Arc::new(Mutex::new(Served {
        files: files.into_iter().collect(),
        ..Served::default()
    }))
}

#[tokio::test]
async fn a_gguf_repository_gives_the_file_of_the_type_asked_for() {
    let served = gguf_repository();
    let base = start(served.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("models");
    let repository = ["--hugging-face", "publisher/Llama-3.2-1B-Instruct-GGUF"];
    let env = [("HF_ENDPOINT", base.as_str())];

    // Three files and no type: refused after the listing, before any download.
    let mut args = vec!["--out", path_str(&out)];
    args.extend(repository);
    let refused = fetch(&args, &env).await;
    let (stdout, stderr) = text(&refused);
    assert!(
        !refused.status.success(),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    assert!(
        stderr.contains("holds 3 .gguf files") && stderr.contains("spec.source.quantization"),
        "{stderr}"
    );
    assert!(
        requests(&served).iter().all(|r| !r.ends_with(".gguf")),
        "{:?}",
        requests(&served)
    );

    let mut typed = args.clone();
    typed.extend(["--gguf-type", "Q8_0"]);
    let run = fetch(&typed, &env).await;
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        listing(&out),
        [".llama-fetch-complete", "Llama-3.2-1B-Instruct-Q8_0.gguf"]
    );
    assert_eq!(
        std::fs::read(out.join("Llama-3.2-1B-Instruct-Q8_0.gguf")).expect("weights"),
        vec![2u8; 1024]
    );

    // A split type: both parts, saved side by side at the top.
    let split_out = dir.path().join("split");
    let mut split = vec!["--out", path_str(&split_out)];
    split.extend(repository);
    split.extend(["--gguf-type", "Q6_K"]);
    let run = fetch(&split, &env).await;
    let (stdout, stderr) = text(&run);
    assert!(run.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert_eq!(
        listing(&split_out),
        [
            ".llama-fetch-complete",
            "Llama-3.2-1B-Instruct-Q6_K-00001-of-00002.gguf",
            "Llama-3.2-1B-Instruct-Q6_K-00002-of-00002.gguf",
        ]
    );

    // A type the repository lacks names the files it has.
    let mut missing = args.clone();
    missing.extend(["--gguf-type", "Q5_K_M"]);
    let other = dir.path().join("other");
    missing[1] = path_str(&other);
    let run = fetch(&missing, &env).await;
    let (_, stderr) = text(&run);
    assert!(!run.status.success());
    assert!(
        stderr.contains("no .gguf file of type Q5_K_M")
            && stderr.contains("Llama-3.2-1B-Instruct-f16.gguf"),
        "{stderr}"
    );
}
