//! The memory a benchmark is judged by: the process's peak resident set and the model's files.

use std::path::Path;

/// The process's peak resident set in bytes: `VmHWM` of `/proc/self/status`, which counts
/// every page the process ever held at once, anonymous and file-backed (a memory-mapped model
/// included). `None` where there is no such file (not Linux).
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

/// The `VmHWM:   1234 kB` line of a `/proc/<pid>/status` text, in bytes.
fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let mut fields = line.split_whitespace().skip(1);
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") => Some(value * 1024),
        _ => None,
    }
}

/// Bytes of a model on disk: a file's size (a `.gguf`), or the sum of a directory's
/// `.safetensors` files.
pub fn model_file_bytes(path: &Path) -> std::io::Result<u64> {
    if path.is_file() {
        return Ok(std::fs::metadata(path)?.len());
    }
    let mut total = 0;
    for entry in std::fs::read_dir(path)? {
        let entry = entry?;
        if entry.path().extension().is_some_and(|e| e == "safetensors") {
            total += entry.metadata()?.len();
        }
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_high_water_mark_in_bytes() {
        let status = "Name:\tllama-server\nVmPeak:\t  900 kB\nVmHWM:\t    2048 kB\nVmRSS:\t 1 kB\n";
        assert_eq!(parse_vm_hwm(status), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS: 1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM: 12 pages\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn counts_a_file_or_a_directory_of_safetensors() -> std::io::Result<()> {
        let dir = tempfile::tempdir()?;
        std::fs::write(dir.path().join("a.safetensors"), [0u8; 10])?;
        std::fs::write(dir.path().join("b.safetensors"), [0u8; 5])?;
        std::fs::write(dir.path().join("tokenizer.json"), [0u8; 100])?;
        std::fs::write(dir.path().join("m.gguf"), [0u8; 7])?;
        assert_eq!(model_file_bytes(dir.path())?, 15);
        assert_eq!(model_file_bytes(&dir.path().join("m.gguf"))?, 7);
        Ok(())
    }
}
