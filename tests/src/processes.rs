//! Child processes that can never outlive the test binary.
//!
//! Every child is spawned from one dedicated thread that lives as long as the process, with
//! `PR_SET_PDEATHSIG = SIGKILL` (the kernel ties that signal to the spawning *thread*, so spawning
//! from a short-lived test thread would kill the child when that test ends). A process-exit hook
//! stops the children gracefully (SIGTERM, then SIGKILL) when the test binary exits normally —
//! whether its tests passed or panicked — and the death signal covers a killed test binary.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::mpsc;
use std::sync::{Mutex, Once, OnceLock};
use std::time::{Duration, Instant};

type SpawnRequest = (Command, mpsc::Sender<std::io::Result<Child>>);

static SPAWNER: OnceLock<Mutex<mpsc::Sender<SpawnRequest>>> = OnceLock::new();
static CHILDREN: Mutex<Vec<(String, Child)>> = Mutex::new(Vec::new());
static CLEANUP_PATHS: Mutex<Vec<std::path::PathBuf>> = Mutex::new(Vec::new());
static EXIT_HOOK: Once = Once::new();

/// Spawns `command` as a supervised child named `name` (used in diagnostics).
pub fn spawn(name: &str, mut command: Command) -> std::io::Result<u32> {
    install_exit_hook();
    set_parent_death_signal(&mut command);
    let sender = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("testenv-spawner".into())
            .spawn(move || {
                for (mut command, reply) in rx {
                    let _ = reply.send(command.spawn());
                }
                // The channel never closes (the sender is in a static); park to keep this thread,
                // the parent of every child, alive until the process exits.
                loop {
                    std::thread::park();
                }
            })
            .map(|_| ())
            .unwrap_or_else(|err| eprintln!("testenv: cannot start spawner thread: {err}"));
        Mutex::new(tx)
    });
    let (reply_tx, reply_rx) = mpsc::channel();
    sender
        .lock()
        .map_err(|_| std::io::Error::other("spawner lock poisoned"))?
        .send((command, reply_tx))
        .map_err(|_| std::io::Error::other("spawner thread is gone"))?;
    let child = reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("spawner thread is gone"))??;
    let pid = child.id();
    CHILDREN
        .lock()
        .map_err(|_| std::io::Error::other("children lock poisoned"))?
        .push((name.to_owned(), child));
    Ok(pid)
}

/// Whether the supervised child `pid` has exited; returns its exit status text if so.
pub fn exited(pid: u32) -> Option<String> {
    let mut children = CHILDREN.lock().ok()?;
    let (_, child) = children.iter_mut().find(|(_, c)| c.id() == pid)?;
    match child.try_wait() {
        Ok(Some(status)) => Some(status.to_string()),
        Ok(None) => None,
        Err(err) => Some(format!("unknown ({err})")),
    }
}

/// The exit status of the supervised child `pid`, once it has exited.
pub fn exit_status(pid: u32) -> Option<std::process::ExitStatus> {
    let mut children = CHILDREN.lock().ok()?;
    let (_, child) = children.iter_mut().find(|(_, c)| c.id() == pid)?;
    child.try_wait().ok().flatten()
}

/// Sends `signal` (e.g. `libc::SIGSTOP`) to the supervised child `pid`, if it is still one.
pub fn signal(pid: u32, signal: libc::c_int) -> std::io::Result<()> {
    let children = CHILDREN
        .lock()
        .map_err(|_| std::io::Error::other("children lock poisoned"))?;
    if !children.iter().any(|(_, c)| c.id() == pid) {
        return Err(std::io::Error::other(format!(
            "process {pid} is not a supervised child"
        )));
    }
    // Sent while the lock is held, so the child cannot be reaped (and its pid reused) meanwhile.
    send_signal(pid, signal);
    Ok(())
}

/// Stops one supervised child: SIGTERM, then SIGKILL after `grace`.
pub fn stop(pid: u32, grace: Duration) {
    let taken = CHILDREN.lock().ok().and_then(|mut children| {
        let index = children.iter().position(|(_, c)| c.id() == pid)?;
        Some(children.remove(index))
    });
    if let Some((_, mut child)) = taken {
        terminate(&mut child, grace);
    }
}

/// Removes `path` (a directory) when the process exits, after the children are stopped.
pub fn remove_at_exit(path: std::path::PathBuf) {
    install_exit_hook();
    if let Ok(mut paths) = CLEANUP_PATHS.lock() {
        paths.push(path);
    }
}

fn terminate(child: &mut Child, grace: Duration) {
    if let Ok(Some(_)) = child.try_wait() {
        return;
    }
    if grace.is_zero() {
        let _ = child.kill();
        let _ = child.wait();
        return;
    }
    send_signal(child.id(), libc::SIGTERM);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

extern "C" fn on_exit() {
    let children: Vec<(String, Child)> = match CHILDREN.lock() {
        Ok(mut children) => children.drain(..).collect(),
        Err(_) => return,
    };
    // Stop in reverse start order (kwok and controllers before the API server, etcd last).
    for (_, mut child) in children.into_iter().rev() {
        terminate(&mut child, Duration::from_secs(5));
    }
    if std::env::var_os("LLAMA_TESTENV_KEEP").is_none()
        && let Ok(paths) = CLEANUP_PATHS.lock()
    {
        for path in paths.iter() {
            let _ = std::fs::remove_dir_all(path);
        }
    }
}

#[allow(unsafe_code)]
fn install_exit_hook() {
    EXIT_HOOK.call_once(|| {
        // SAFETY: `on_exit` is a plain `extern "C" fn()` that only touches statics.
        let rc = unsafe { libc::atexit(on_exit) };
        if rc != 0 {
            eprintln!("testenv: atexit failed; children rely on the parent-death signal alone");
        }
    });
}

#[allow(unsafe_code)]
fn set_parent_death_signal(command: &mut Command) {
    // SAFETY: prctl is async-signal-safe, as pre_exec requires.
    unsafe {
        command.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

#[allow(unsafe_code)]
fn send_signal(pid: u32, signal: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(pid) {
        // SAFETY: kill(2) on a pid we spawned and have not yet reaped.
        unsafe {
            libc::kill(pid, signal);
        }
    }
}
