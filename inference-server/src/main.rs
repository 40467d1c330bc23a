//! The `llama-server` binary.

use std::process::ExitCode;

use clap::Parser;
use llama_server::args::{Cli, Command, FetchArgs, GenerateModelArgs, ServeArgs};
use llama_server::fetch;
use llama_server::generate_model::GenerateModel;
use llama_server::malloc_tuning;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    let tunables = std::env::var("GLIBC_TUNABLES").ok();
    let threshold = malloc_tuning::fix_mmap_threshold(tunables.as_deref());
    let trim = malloc_tuning::fix_trim_threshold(tunables.as_deref());
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    tracing::debug!(?threshold, ?trim, "malloc mmap and trim thresholds");
    match Cli::parse().into_command() {
        Command::Serve(args) => serve(args),
        Command::GenerateModel(args) => generate_model(args),
        Command::Fetch(args) => fetch(args),
        Command::Bench(args) => bench(&args),
        Command::CheckGoldens(args) => check_goldens(&args),
    }
}

/// Measures the engine; the table goes to stdout.
fn bench(args: &llama_server::bench::BenchArgs) -> ExitCode {
    match llama_server::bench::run(args) {
        Ok(report) => {
            print!("{}", report.table());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("llama-server bench: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Compares the engine with the transformers goldens; exits 1 on any mismatch.
fn check_goldens(args: &llama_server::check_goldens::CheckGoldensArgs) -> ExitCode {
    match llama_server::check_goldens::run(args) {
        Ok(report) => {
            print!("{}", report.table());
            if report.passed() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(err) => {
            eprintln!("llama-server check-goldens: {err}");
            ExitCode::FAILURE
        }
    }
}

/// Downloads the weights; a failure goes to stderr and to the termination-message file, where
/// Kubernetes (and so the operator) reads it.
fn fetch(args: FetchArgs) -> ExitCode {
    let source = match (&args.url, &args.hugging_face) {
        (Some(url), _) => fetch::Source::url(url, args.sha256.as_deref()),
        (None, Some(repository)) => fetch::Source::hugging_face(
            repository,
            &args.revision,
            std::env::var("HF_ENDPOINT").ok().as_deref(),
            std::env::var("HF_TOKEN").ok(),
        )
        .map(|source| source.with_gguf_type(args.gguf_type.clone())),
        (None, None) => Err(fetch::FetchError::InvalidUrl {
            url: String::new(),
            reason: "give --url or --hugging-face".to_owned(),
        }),
    };
    let result = source.and_then(|source| {
        fetch::Fetch {
            source,
            out: args.out,
            retry: fetch::http::RetryPolicy::default(),
        }
        .run()
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llama-server fetch: {err}");
            fetch::write_termination_message(&args.termination_log, &err.to_string());
            ExitCode::FAILURE
        }
    }
}

fn generate_model(args: GenerateModelArgs) -> ExitCode {
    let job = GenerateModel {
        shape: args.shape,
        seed: args.seed,
        out: args.out,
        tokenizer_dir: args.tokenizer_dir,
        dtype: args.dtype,
    };
    let written = job.run().and_then(|()| {
        args.gguf
            .iter()
            .try_for_each(|&file_type| job.write_gguf(file_type).map(drop))
    });
    match written {
        Ok(()) => {
            println!("{}", job.out.display());
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("llama-server generate-model: {err}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: ServeArgs) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("llama-server: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    let termination_log = args.termination_log.clone();
    match runtime.block_on(llama_server::server::serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("llama-server: {err}");
            tracing::error!(error = %err, "llama-server stopped");
            fetch::write_termination_message(&termination_log, &err.to_string());
            ExitCode::FAILURE
        }
    }
}
