//! The control plane never outlives its test binary: not when a test panics, not when the
//! binary is killed.
//!
//! The outer tests re-run this very binary with one `#[ignore]`d inner test selected; the inner
//! test starts the control plane and then panics, or waits to be killed.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Processes whose command line mentions the given control plane directory.
fn processes_using(dir_marker: &str) -> Vec<u32> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in entries.filter_map(Result::ok) {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        if String::from_utf8_lossy(&cmdline).contains(dir_marker) {
            found.push(pid);
        }
    }
    found
}

fn inner(test: &str) -> Command {
    let mut cmd = Command::new(std::env::current_exe().expect("own path"));
    cmd.args(["--ignored", "--exact", "--nocapture", test]);
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    cmd
}

fn wait_gone(marker: &str, timeout: Duration) -> Vec<u32> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = processes_using(marker);
        if left.is_empty() || Instant::now() > deadline {
            return left;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_panicking_test_leaves_no_processes_or_files() {
    let child = inner("inner_start_then_panic")
        .spawn()
        .expect("spawn inner test");
    let marker = format!("llama-testenv-{}", child.id());
    let out = child.wait_with_output().expect("inner test ran");
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!out.status.success(), "the inner test must fail");
    assert!(
        output.contains("control plane at"),
        "inner test never started it: {output}"
    );
    assert!(output.contains("deliberate panic"), "{output}");
    assert_eq!(
        wait_gone(&marker, Duration::from_secs(10)),
        Vec::<u32>::new(),
        "stray processes"
    );
    assert!(
        !std::env::temp_dir().join(&marker).exists(),
        "{marker} was not removed"
    );
}

#[test]
fn a_killed_test_binary_takes_its_control_plane_with_it() {
    let mut child = inner("inner_start_then_wait")
        .spawn()
        .expect("spawn inner test");
    let marker = format!("llama-testenv-{}", child.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    while processes_using(&marker).len() < 5 {
        assert!(
            Instant::now() < deadline,
            "inner control plane did not start"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    child.kill().expect("SIGKILL the inner test binary");
    let _ = child.wait();
    assert_eq!(
        wait_gone(&marker, Duration::from_secs(10)),
        Vec::<u32>::new(),
        "stray processes"
    );
    let _ = std::fs::remove_dir_all(std::env::temp_dir().join(&marker));
}

#[tokio::test]
#[ignore = "run by a_panicking_test_leaves_no_processes_or_files"]
async fn inner_start_then_panic() {
    let env = testenv::TestEnv::new("inner").await.expect("control plane");
    assert!(
        env.run_kubectl(&["get", "ns"], None)
            .expect("kubectl")
            .success
    );
    panic!("deliberate panic");
}

#[tokio::test]
#[ignore = "run by a_killed_test_binary_takes_its_control_plane_with_it"]
async fn inner_start_then_wait() {
    let _env = testenv::TestEnv::new("inner").await.expect("control plane");
    tokio::time::sleep(Duration::from_secs(600)).await;
}
