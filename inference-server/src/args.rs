//! Command-line arguments of the `llama-server` binary.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::bench::BenchArgs;
use crate::check_goldens::CheckGoldensArgs;
use crate::device::DeviceSpec;
use crate::generate_model::{ModelShape, WeightDtype};
use crate::gguf_export::GgufFileType;

/// Serves a Meta Llama model over the Azure AI Model Inference API.
#[derive(Debug, Parser)]
#[command(name = "llama-server", version, args_conflicts_with_subcommands = true)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Options of `serve`, accepted without the subcommand name.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// What the binary does.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve HTTP (the default).
    Serve(ServeArgs),
    /// Write a random-weight model in the Hugging Face layout, for tests and benchmarks.
    GenerateModel(GenerateModelArgs),
    /// Download model weights into a directory (the operator's `fetch-model` init container).
    Fetch(FetchArgs),
    /// Measure prefill, time to first token and decode throughput on a device.
    Bench(BenchArgs),
    /// Check the engine on a device against the transformers goldens (tests/goldens).
    CheckGoldens(CheckGoldensArgs),
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, default_value = "0.0.0.0:8080")]
    pub listen: SocketAddr,
    /// The server configuration (YAML), as the operator writes it. Without it: the demo
    /// model, keys from /var/run/llama-server/keys, default limits.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// On SIGTERM, how long in-flight requests and streams may run before the server exits.
    #[arg(long, default_value_t = 30)]
    pub drain_seconds: u64,
    /// Compute device: cpu, cuda or cuda:N. Overrides $LLAMA_SERVER_DEVICE, which overrides
    /// the configuration's `device`; the default is cpu.
    #[arg(long)]
    pub device: Option<DeviceSpec>,
    /// Where the reason the server stopped (a model that does not load, a bad configuration)
    /// is also written, when the file exists (the kubelet mounts it; the operator shows it in
    /// the deployment's `ModelLoaded` condition).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

#[derive(Debug, Clone, Args)]
pub struct GenerateModelArgs {
    /// Which architecture shape to generate.
    #[arg(long, value_enum)]
    pub shape: ModelShape,
    /// Seed of the random weights; the same seed writes the same model.
    #[arg(long)]
    pub seed: u64,
    /// Output directory (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// Directory with tokenizer.json and tokenizer_config.json, as printed by
    /// scripts/setup-tokenizer.sh.
    #[arg(long)]
    pub tokenizer_dir: PathBuf,
    /// Dtype the weights are stored in.
    #[arg(long, value_enum, default_value = "f32")]
    pub dtype: WeightDtype,
    /// Also write the model as `model-<TYPE>.gguf` in llama.cpp's layout, tokenizer embedded;
    /// repeat for several types.
    #[arg(long, value_enum)]
    pub gguf: Vec<GgufFileType>,
}

/// Options of `fetch`. Exactly one of `--url` and `--hugging-face`. `HF_TOKEN` and
/// `HF_ENDPOINT` are read from the environment.
#[derive(Debug, Clone, Args)]
#[command(group = clap::ArgGroup::new("source").required(true).args(["url", "hugging_face"]))]
pub struct FetchArgs {
    /// Directory to download into (created if missing).
    #[arg(long)]
    pub out: PathBuf,
    /// http(s) URL of a .gguf file, a .tar / .tar.gz / .tgz archive (unpacked), or any file.
    #[arg(long)]
    pub url: Option<String>,
    /// Expected SHA-256 of the `--url` download, 64 hex digits in either case.
    #[arg(long, conflicts_with = "hugging_face")]
    pub sha256: Option<String>,
    /// Hugging Face repository, ORG/NAME.
    #[arg(long)]
    pub hugging_face: Option<String>,
    /// Branch, tag or commit of the `--hugging-face` repository.
    #[arg(long, default_value = "main", conflicts_with = "url")]
    pub revision: String,
    /// From a `--hugging-face` repository of GGUF files, take the one of this type (its name
    /// has the word, e.g. `Q4_K_M` in `Llama-3.2-1B-Instruct-Q4_K_M.gguf`). Without it a
    /// repository with several `.gguf` files is refused.
    #[arg(long, conflicts_with = "url")]
    pub gguf_type: Option<String>,
    /// Where a failure's message is also written; must exist (the kubelet mounts it).
    #[arg(long, default_value = "/dev/termination-log")]
    pub termination_log: PathBuf,
}

impl Cli {
    /// The command to run, `serve` when none was named.
    pub fn into_command(self) -> Command {
        self.command.unwrap_or(Command::Serve(self.serve))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Command, clap::Error> {
        Cli::try_parse_from(std::iter::once("llama-server").chain(args.iter().copied()))
            .map(Cli::into_command)
    }

    #[test]
    fn bare_listen_means_serve() {
        let Ok(Command::Serve(serve)) = parse(&["--listen", "127.0.0.1:9000"]) else {
            panic!("expected serve");
        };
        assert_eq!(serve.listen, "127.0.0.1:9000".parse().expect("addr"));
        assert!(matches!(parse(&[]), Ok(Command::Serve(_))));
    }

    #[test]
    fn generate_model_reads_shape_seed_and_dirs() {
        let Ok(Command::GenerateModel(args)) = parse(&[
            "generate-model",
            "--shape",
            "tiny-untied",
            "--seed",
            "7",
            "--out",
            "/tmp/m",
            "--tokenizer-dir",
            "/tmp/t",
        ]) else {
            panic!("expected generate-model");
        };
        assert_eq!(args.shape, ModelShape::TinyUntied);
        assert_eq!(args.seed, 7);
        assert_eq!(args.dtype, WeightDtype::F32);
        assert!(args.gguf.is_empty());
        assert!(
            parse(&[
                "generate-model",
                "--shape",
                "llama-3.1-8b",
                "--seed",
                "1",
                "--out",
                "o",
                "--tokenizer-dir",
                "t"
            ])
            .is_ok()
        );
    }

    #[test]
    fn generate_model_takes_repeated_gguf_types() {
        let base = [
            "generate-model",
            "--shape",
            "tiny",
            "--seed",
            "1",
            "--out",
            "o",
        ];
        let with = |extra: &[&str]| parse(&[&base[..], &["--tokenizer-dir", "t"], extra].concat());
        let Ok(Command::GenerateModel(args)) = with(&["--gguf", "q4_k_m", "--gguf", "f16"]) else {
            panic!("expected generate-model");
        };
        assert_eq!(args.gguf, [GgufFileType::Q4KM, GgufFileType::F16]);
        assert!(with(&["--gguf", "q8_0"]).is_ok());
        assert!(with(&["--gguf", "q4_0"]).is_err());
    }

    #[test]
    fn fetch_takes_exactly_one_source() {
        let Ok(Command::Fetch(args)) =
            parse(&["fetch", "--out", "/models", "--url", "http://h/m.gguf"])
        else {
            panic!("expected fetch");
        };
        assert_eq!(args.url.as_deref(), Some("http://h/m.gguf"));
        assert_eq!(args.termination_log, PathBuf::from("/dev/termination-log"));
        let Ok(Command::Fetch(args)) = parse(&["fetch", "--out", "o", "--hugging-face", "org/m"])
        else {
            panic!("expected fetch");
        };
        assert_eq!(args.revision, "main");
        let hf = ["fetch", "--out", "o", "--hugging-face", "org/m"];
        for bad in [
            &["fetch", "--out", "o"][..],
            &[hf.as_slice(), &["--url", "http://h/x"]].concat(),
            &[hf.as_slice(), &["--sha256", "00"]].concat(),
            &[
                "fetch",
                "--out",
                "o",
                "--url",
                "http://h/x",
                "--revision",
                "v1",
            ],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn bad_values_are_errors_not_panics() {
        assert!(parse(&["--listen", "nope"]).is_err());
        assert!(
            parse(&[
                "generate-model",
                "--shape",
                "huge",
                "--seed",
                "1",
                "--out",
                "o",
                "--tokenizer-dir",
                "t"
            ])
            .is_err()
        );
    }
}
