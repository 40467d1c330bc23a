//! Prints the CRDs as one YAML stream, or with `--out DIR` writes one file per CRD.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let out_dir = match args.as_slice() {
        [] => None,
        [flag, dir] if flag == "--out" => Some(std::path::PathBuf::from(dir)),
        _ => {
            eprintln!("usage: crdgen [--out DIR]");
            return ExitCode::from(2);
        }
    };
    for (file, crd) in llama_operator::crdgen::all() {
        let text = match llama_operator::crdgen::render(&crd) {
            Ok(text) => text,
            Err(err) => {
                eprintln!("crdgen: cannot render {file}: {err}");
                return ExitCode::FAILURE;
            }
        };
        match &out_dir {
            None => print!("---\n{text}"),
            Some(dir) => {
                let path = dir.join(file);
                if let Err(err) = std::fs::write(&path, text) {
                    eprintln!("crdgen: cannot write {}: {err}", path.display());
                    return ExitCode::FAILURE;
                }
            }
        }
    }
    ExitCode::SUCCESS
}
