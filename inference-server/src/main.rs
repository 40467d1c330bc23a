//! The `llama-server` binary.

use std::process::ExitCode;

use clap::Parser;
use llama_server::args::{Cli, Command, GenerateModelArgs, ServeArgs};
use llama_server::generate_model::GenerateModel;
use tracing_subscriber::EnvFilter;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .init();
    match Cli::parse().into_command() {
        Command::Serve(args) => serve(args),
        Command::GenerateModel(args) => generate_model(args),
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
    match job.run() {
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
    runtime.block_on(async move {
        let listen = args.listen;
        let listener = match tokio::net::TcpListener::bind(listen).await {
            Ok(listener) => listener,
            Err(err) => {
                eprintln!("llama-server: cannot listen on {listen}: {err}");
                return ExitCode::FAILURE;
            }
        };
        tracing::info!(%listen, "llama-server listening");
        let shutdown = async {
            let _ = tokio::signal::ctrl_c().await;
        };
        match axum::serve(listener, llama_server::app())
            .with_graceful_shutdown(shutdown)
            .await
        {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                eprintln!("llama-server: {err}");
                ExitCode::FAILURE
            }
        }
    })
}
