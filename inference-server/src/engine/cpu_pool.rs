//! The threads the engine's own CPU kernels (Q8_0, Q4_K, Q6_K matrix products) run on.
//!
//! A decode step on the CPU is about a hundred matrix products, each a millisecond or less. On
//! rayon's pool every product ends with the helper threads going to sleep and starts with
//! waking them: on a virtual machine a wake-up of an idle vCPU costs tens of microseconds, a
//! few per cent of a 1B model's decode step, and the core it leaves idle meanwhile. Here, as in
//! llama.cpp's own thread pool, the helpers spin for a short while after each product, so the
//! next one finds them awake; when no work has come for [`SPIN`] they park on a condition
//! variable until the next product wakes them. While spinning they yield their core to any
//! other thread that wants it (rayon's workers for candle's operations, the HTTP runtime).
//!
//! One product runs at a time: a caller that finds the pool busy (another thread's product,
//! or a product started from inside a task) runs its tasks itself. A panic in a task is
//! carried to the caller, after every helper has let go of the product.

#![allow(unsafe_code)]

use std::any::Any;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Condvar, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

/// How long a helper keeps spinning after its last task before it parks.
const SPIN: Duration = Duration::from_millis(3);
/// Spin-loop hints between two yields of the core (and two looks at the clock).
const SPINS_PER_YIELD: u32 = 64;
/// Runs a thread takes of what is left, at most ([`for_each_task`]).
const RUNS_PER_THREAD: usize = 8;

/// Runs `f(0)`, …, `f(tasks - 1)`, spread over the calling thread and the pool's helpers, and
/// returns when all have run. Tasks are handed out in order, in runs, to whichever thread is
/// free: each run is an eighth of what is left per thread (at least one task), so a product of
/// thousands of tasks takes a few dozen hand-outs while its last runs are single tasks that
/// even out the threads' finishing times. A panicking task panics the caller once the others
/// are done.
pub(super) fn for_each_task<F: Fn(usize) + Sync>(tasks: usize, f: F) {
    let pool = pool();
    if tasks < 2 || pool.helpers == 0 {
        run_here(tasks, f);
        return;
    }
    let Ok(_only_product) = pool.caller.try_lock() else {
        run_here(tasks, f);
        return;
    };
    let job = Job {
        data: (&f as *const F).cast(),
        call: call::<F>,
        tasks,
        split: RUNS_PER_THREAD * (pool.helpers + 1),
        next: AtomicUsize::new(0),
        done: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
        panic: Mutex::new(None),
    };
    pool.job
        .store((&job as *const Job).cast_mut(), Ordering::SeqCst);
    pool.epoch.fetch_add(1, Ordering::SeqCst);
    if pool.sleepers.load(Ordering::SeqCst) > 0 {
        let _lock = pool.lock.lock().unwrap_or_else(PoisonError::into_inner);
        pool.wake.notify_all();
    }
    job.work();
    let mut spins = 0u32;
    while job.done.load(Ordering::Acquire) < tasks {
        spin(&mut spins);
    }
    // No helper may still hold `job` when it goes out of scope: take it down, then wait for
    // those that picked it up before (see `helper`).
    pool.job.store(std::ptr::null_mut(), Ordering::SeqCst);
    while pool.holders.load(Ordering::SeqCst) > 0 {
        spin(&mut spins);
    }
    if job.failed.load(Ordering::Acquire) {
        let payload = job
            .panic
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match payload {
            Some(payload) => panic::resume_unwind(payload),
            None => panic!("a task of the engine's CPU thread pool panicked"),
        }
    }
}

/// Runs `f(i, chunk)` for every chunk of `chunk_len` elements of `data` (the last one may be
/// shorter), chunk `i` being `data[i * chunk_len ..]`, as tasks of [`for_each_task`].
pub(super) fn for_each_chunk<T: Send, F: Fn(usize, &mut [T]) + Sync>(
    data: &mut [T],
    chunk_len: usize,
    f: F,
) {
    let chunks: Vec<Mutex<&mut [T]>> = data.chunks_mut(chunk_len.max(1)).map(Mutex::new).collect();
    for_each_task(chunks.len(), |task| {
        let mut chunk = chunks[task].lock().unwrap_or_else(PoisonError::into_inner);
        f(task, &mut chunk);
    });
}

/// Rows a task of [`for_each_row`] takes.
const ROWS_PER_TASK: usize = 8;
/// Rows from which [`for_each_row`] spreads them over the pool (a prompt's chunk, not a decode
/// step's few rows, whose hand-out would cost more than their work).
const MIN_SPREAD_ROWS: usize = 64;

/// Runs `f(row, out_row)` for every row of `k` values of `x` and the matching `out_len`
/// elements of `out`: on the pool from [`MIN_SPREAD_ROWS`] rows, else on the calling thread.
pub(super) fn for_each_row<T: Send, F: Fn(&[f32], &mut [T]) + Sync>(
    x: &[f32],
    k: usize,
    out: &mut [T],
    out_len: usize,
    f: F,
) {
    let (k, out_len) = (k.max(1), out_len.max(1));
    let rows = |x: &[f32], out: &mut [T]| {
        for (x, out) in x.chunks_exact(k).zip(out.chunks_exact_mut(out_len)) {
            f(x, out);
        }
    };
    if x.len() < MIN_SPREAD_ROWS * k {
        rows(x, out);
    } else {
        for_each_chunk(out, ROWS_PER_TASK * out_len, |task, out| {
            rows(&x[task * ROWS_PER_TASK * k..], out);
        });
    }
}

/// Runs every task on the calling thread, as the pool would: a panicking task panics the
/// caller once the others have run.
fn run_here<F: Fn(usize)>(tasks: usize, f: F) {
    let mut first_panic = None;
    for task in 0..tasks {
        if let Err(payload) = panic::catch_unwind(AssertUnwindSafe(|| f(task))) {
            first_panic.get_or_insert(payload);
        }
    }
    if let Some(payload) = first_panic {
        panic::resume_unwind(payload);
    }
}

/// One product in flight: a type-erased `&F` and its task counters. It lives on the caller's
/// stack; helpers reach it through [`Pool::job`] only while they are counted in
/// [`Pool::holders`].
struct Job {
    data: *const (),
    call: unsafe fn(*const (), usize),
    tasks: usize,
    /// A run is the tasks left divided by this (at least one).
    split: usize,
    /// The next task to hand out (may run past `tasks`: those are ignored).
    next: AtomicUsize,
    /// Tasks finished, panicked ones included: each thread adds its count once, when no task
    /// is left (counted per task, the threads' atomic additions to this one cache line, which
    /// the caller also reads while it waits, were 4 % of an 8-stream decode step's samples).
    done: AtomicUsize,
    failed: AtomicBool,
    panic: Mutex<Option<Box<dyn Any + Send>>>,
}

// SAFETY: `data` points to an `F: Sync`, only ever called through a shared reference.
unsafe impl Sync for Job {}

/// Calls the `F` behind `data`.
///
/// # Safety
/// `data` must point to a live `F`.
unsafe fn call<F: Fn(usize)>(data: *const (), task: usize) {
    // SAFETY: the caller's contract.
    let f = unsafe { &*data.cast::<F>() };
    f(task);
}

impl Job {
    /// Takes tasks until none are left.
    fn work(&self) {
        let mut finished = 0;
        loop {
            let left = self.tasks.saturating_sub(self.next.load(Ordering::Relaxed));
            let run = (left / self.split).max(1);
            let first = self.next.fetch_add(run, Ordering::Relaxed);
            if first >= self.tasks {
                break;
            }
            let last = (first + run).min(self.tasks);
            for task in first..last {
                // SAFETY: `data` is the caller's `F`, alive until every task is done and
                // every holder gone.
                let result = panic::catch_unwind(AssertUnwindSafe(|| unsafe {
                    (self.call)(self.data, task)
                }));
                if let Err(payload) = result {
                    let mut slot = self.panic.lock().unwrap_or_else(PoisonError::into_inner);
                    slot.get_or_insert(payload);
                    self.failed.store(true, Ordering::Release);
                }
            }
            finished += last - first;
        }
        if finished > 0 {
            self.done.fetch_add(finished, Ordering::Release);
        }
    }
}

/// The process's pool: its helpers run for the life of the process, as rayon's do.
struct Pool {
    /// Threads that take tasks besides the caller: one fewer than [`engine_threads`].
    helpers: usize,
    /// The product in flight, or null.
    job: AtomicPtr<Job>,
    /// Bumped for every product, so helpers see new work without touching `job`.
    epoch: AtomicU64,
    /// Helpers that may be reading `job`.
    holders: AtomicUsize,
    /// Helpers parked (or about to park) on `wake`.
    sleepers: AtomicUsize,
    lock: Mutex<()>,
    wake: Condvar,
    /// Held by the caller of the product in flight.
    caller: Mutex<()>,
}

/// Threads the engine's CPU work runs on: `RAYON_NUM_THREADS` when set to a positive number,
/// else the CPUs this process may use. That is rayon's own rule for its global pool, so one
/// setting sizes rayon's pool and this one, whichever thread asks first.
pub(super) fn engine_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, usize::from))
}

/// Runs `f` (a forward step whose matrix products all run on this pool) on the step thread:
/// the one worker of a rayon pool of its own.
///
/// candle's operations inside a step (norms, rope, residual additions, the embedding lookup)
/// run on the rayon pool of the thread that calls them. On the global pool every one of them
/// wakes rayon's other workers, which then spin for a while looking for more work, beside this
/// pool's helpers, on the same cores: on the 2-core EPYC VM the second rayon worker took 13 %
/// of an 8-stream Q4_K_M decode step's CPU time. On a pool of one thread those operations run
/// inline on the step's thread, which is also the caller of every product here, and the
/// products keep all the cores: 8-stream decode went from 63–66 to 66–86 tokens/s (three
/// interleaved pairs) and the Q8_0 file's from 45–51 to 52–57.
///
/// Models with dense (candle) matrix products keep the global pool, whose threads those
/// products need. Falls back to the calling thread if the pool cannot be built.
pub(super) fn on_step_thread<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    static STEP: OnceLock<Option<rayon::ThreadPool>> = OnceLock::new();
    // The helpers are sized from the global setting before the first step enters the pool.
    pool();
    let step = STEP.get_or_init(|| {
        let built = rayon::ThreadPoolBuilder::new()
            .num_threads(1)
            .thread_name(|_| "llama-step".to_owned())
            .build();
        match built {
            Ok(step) => Some(step),
            Err(err) => {
                tracing::warn!(error = %err, "could not start the engine's step thread");
                None
            }
        }
    });
    match step {
        Some(step) => step.install(f),
        None => f(),
    }
}

fn pool() -> &'static Pool {
    static POOL: OnceLock<&'static Pool> = OnceLock::new();
    POOL.get_or_init(|| {
        let pool: &'static Pool = Box::leak(Box::new(Pool {
            helpers: engine_threads().saturating_sub(1),
            job: AtomicPtr::new(std::ptr::null_mut()),
            epoch: AtomicU64::new(0),
            holders: AtomicUsize::new(0),
            sleepers: AtomicUsize::new(0),
            lock: Mutex::new(()),
            wake: Condvar::new(),
            caller: Mutex::new(()),
        }));
        for index in 0..pool.helpers {
            let spawned = std::thread::Builder::new()
                .name(format!("llama-cpu-{index}"))
                .spawn(move || helper(pool));
            if let Err(err) = spawned {
                // Still correct with fewer helpers: the caller takes whatever is left.
                tracing::warn!(error = %err, "could not start a CPU kernel thread");
                break;
            }
        }
        pool
    })
}

/// A helper's life: take the tasks of each new product, spin a while, park.
fn helper(pool: &'static Pool) {
    let mut seen = pool.epoch.load(Ordering::SeqCst);
    let mut idle_since = Instant::now();
    let mut spins = 0u32;
    loop {
        let epoch = pool.epoch.load(Ordering::SeqCst);
        if epoch != seen {
            seen = epoch;
            // Counted first, then the pointer read: the caller takes the pointer down before
            // it reads the count, so either it sees this helper or this helper sees null.
            pool.holders.fetch_add(1, Ordering::SeqCst);
            let job = pool.job.load(Ordering::SeqCst);
            if !job.is_null() {
                // SAFETY: non-null `job` is the live product of a caller that waits for
                // `holders` to drop to zero before its `Job` goes away.
                unsafe { (*job).work() };
            }
            pool.holders.fetch_sub(1, Ordering::SeqCst);
            idle_since = Instant::now();
            continue;
        }
        spin(&mut spins);
        if spins == 0 && idle_since.elapsed() >= SPIN {
            let lock = pool.lock.lock().unwrap_or_else(PoisonError::into_inner);
            pool.sleepers.fetch_add(1, Ordering::SeqCst);
            let lock = if pool.epoch.load(Ordering::SeqCst) == seen {
                pool.wake.wait(lock).unwrap_or_else(PoisonError::into_inner)
            } else {
                lock
            };
            pool.sleepers.fetch_sub(1, Ordering::SeqCst);
            drop(lock);
            idle_since = Instant::now();
        }
    }
}

/// One round of waiting: a spin-loop hint, and every [`SPINS_PER_YIELD`] rounds a yield of the
/// core (`spins` is then back at zero).
fn spin(spins: &mut u32) {
    *spins += 1;
    if *spins >= SPINS_PER_YIELD {
        *spins = 0;
        std::thread::yield_now();
    } else {
        std::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::{for_each_row, for_each_task, on_step_thread, run_here};

    #[test]
    fn a_step_runs_on_its_own_one_thread_pool_and_still_spreads_products() {
        let (name, threads, sum) = on_step_thread(|| {
            let name = std::thread::current().name().map(str::to_owned);
            let sum = AtomicUsize::new(0);
            for_each_task(100, |t| {
                sum.fetch_add(t, Ordering::Relaxed);
            });
            // A step inside a step (a forward pass called from a task) runs inline.
            let inner = on_step_thread(|| std::thread::current().name().map(str::to_owned));
            assert_eq!(inner, name);
            (name, rayon::current_num_threads(), sum.into_inner())
        });
        assert_eq!(name.as_deref(), Some("llama-step"));
        assert_eq!(
            threads, 1,
            "candle's operations run inline on the step thread"
        );
        assert_eq!(sum, 99 * 100 / 2);
    }

    #[test]
    fn every_row_is_mapped_once_whether_spread_or_not() {
        // 7 rows stay on the caller; 203 rows are spread in tasks of eight, with a short last
        // task.
        for rows in [0, 7, 203] {
            let k = 5;
            let x: Vec<f32> = (0..rows * k).map(|i| i as f32).collect();
            let mut out = vec![[0f32; 2]; rows * 3];
            for_each_row(&x, k, &mut out, 3, |x, out| {
                for (j, o) in out.iter_mut().enumerate() {
                    *o = [x[0], x[k - 1] + j as f32];
                }
            });
            for (i, o) in out.iter().enumerate() {
                let (row, j) = (i / 3, i % 3);
                assert_eq!(
                    *o,
                    [(row * k) as f32, (row * k + k - 1 + j) as f32],
                    "{rows} rows"
                );
            }
        }
    }

    #[test]
    fn every_task_runs_once() {
        for tasks in [0, 1, 2, 3, 17, 1000] {
            let counts: Vec<AtomicUsize> = (0..tasks).map(|_| AtomicUsize::new(0)).collect();
            for_each_task(tasks, |t| {
                counts[t].fetch_add(1, Ordering::Relaxed);
            });
            assert!(
                counts.iter().all(|c| c.load(Ordering::Relaxed) == 1),
                "{tasks} tasks"
            );
        }
    }

    #[test]
    fn products_from_several_threads_and_from_inside_a_task_all_complete() {
        let total = AtomicUsize::new(0);
        std::thread::scope(|scope| {
            for _ in 0..4 {
                scope.spawn(|| {
                    for _ in 0..50 {
                        for_each_task(8, |_| {
                            // A nested product runs on the task's own thread.
                            for_each_task(3, |_| {
                                total.fetch_add(1, Ordering::Relaxed);
                            });
                        });
                    }
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 4 * 50 * 8 * 3);
    }

    #[test]
    fn a_panicking_task_run_on_the_callers_thread_lets_the_others_run() {
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(|| {
            run_here(64, |t| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(t != 10, "task ten fails");
            });
        });
        assert!(result.is_err(), "the panic reaches the caller");
        assert_eq!(ran.load(Ordering::Relaxed), 64);
    }

    #[test]
    fn a_panicking_task_panics_the_caller_after_the_others_ran() {
        let ran = AtomicUsize::new(0);
        let result = std::panic::catch_unwind(|| {
            for_each_task(64, |t| {
                ran.fetch_add(1, Ordering::Relaxed);
                assert!(t != 10, "task ten fails");
            });
        });
        let payload = result.expect_err("the panic reaches the caller");
        let message = payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_default();
        assert!(message.contains("task ten fails"), "{message}");
        assert_eq!(ran.load(Ordering::Relaxed), 64);
        // The pool is usable afterwards.
        let after = AtomicUsize::new(0);
        for_each_task(5, |_| {
            after.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(after.load(Ordering::Relaxed), 5);
    }
}
