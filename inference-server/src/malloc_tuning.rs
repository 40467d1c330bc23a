//! How the process's allocator hands large buffers back.
//!
//! A forward step allocates and frees multi-megabyte activation buffers (a 512-token chunk's
//! MLP activations are 16 MB) whose sizes change with the batch. glibc's malloc serves blocks
//! of 128 KiB and more with their own mappings, but by default it raises that threshold to
//! the size of each such block freed (up to 32 MiB), so later buffers of those sizes come
//! from its heaps instead, where the holes between differently sized buffers stay resident.
//! Measured with `llama-server bench` on the Llama-3.2-1B-shaped Q4_K_M file (prefill 512,
//! decode at 1 and 8 streams, 2026-12-03): peak RSS 1,188 MB with glibc's dynamic threshold,
//! 1,044 MB with it fixed at 128 KiB, 1,102 MB fixed at 4 MiB and 1,279 MB at 32 MiB. The
//! price is page faults: every large buffer is a fresh mapping (7.2 million minor faults and
//! 17 s of system time for that run, against 3.7 million and 9 s at 32 MiB). In that run
//! prefill was no slower (65 tokens/s, against 62–63 at the larger thresholds), but in
//! prefill-only runs the buffer-keeping tunables below were 10–20 % faster (65–68 against
//! 53–60 tokens/s). The server favours the memory bound, which a deployment's limits rest
//! on, and fixes the threshold at start (first at 128 KiB; at 2 MiB since faster kernels
//! made the faults of batched decode stand out, see [`MMAP_THRESHOLD_BYTES`]), and the trim
//! threshold at 64 MiB ([`TRIM_THRESHOLD_BYTES`]), unless the operator chose them through
//! `GLIBC_TUNABLES` (`glibc.malloc.mmap_threshold`, `glibc.malloc.trim_threshold`); a
//! prefill-heavy deployment with memory to spare can set
//! `GLIBC_TUNABLES=glibc.malloc.mmap_threshold=268435456:glibc.malloc.trim_threshold=134217728`.

/// The threshold the server fixes: 2 MiB. Batched decode's activation buffers (a few hundred
/// kilobytes a matrix at 8 to 16 streams) then come from the heap, without a fresh mapping
/// and its page faults per buffer each step; prefill's multi-megabyte buffers still get their
/// own. On the 2-core Xeon (2026-12-03, later kernels, `llama-server bench` with the
/// benchmark script's arguments): Q4_K_M peak RSS 1,141 MB against 1,120 at glibc's starting
/// value of 128 KiB (target 1,209: file + 201 MB key/value cache + 200 MB), Q8_0 1,643
/// against 1,619 (target 1,722); decode at 16 streams 79–86 against 71–72 tokens/s (Q4_K_M)
/// and 50.2 against 43.1 (Q8_0), at 8 streams 71.5–74.5 against 68.7–70.7 (Q4_K_M), system
/// time 13.5–14.0 against 18.8–21.3 s.
pub const MMAP_THRESHOLD_BYTES: usize = 2 * 1024 * 1024;

/// The trim threshold the server fixes: 64 MiB of free memory at the top of a malloc heap
/// stays with the process instead of going back to the kernel.
///
/// Fixing the mmap threshold also fixes glibc's trim threshold at its starting value of
/// 128 KiB (the two move together only while the threshold is dynamic). A decode step's
/// buffers, freed at the step's end, then leave the heap's top free beyond that, glibc hands
/// the pages back, and the next step faults them in again and the kernel zeroes them: on the
/// 2-core EPYC VM (2026-12-06, 8-stream Q4_K_M decode) 6,600 page faults a step, against 370
/// with this threshold, and the faults' kernel time was about 4 % of the step's samples. Peak
/// resident memory is what the process used at its peak either way (1,170 against 1,171 MB
/// over the benchmark script's arguments); memory freed later stays resident up to this much.
/// `GLIBC_TUNABLES` (`glibc.malloc.trim_threshold`) overrides it.
pub const TRIM_THRESHOLD_BYTES: usize = 64 * 1024 * 1024;

/// What [`fix_mmap_threshold`] or [`fix_trim_threshold`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Threshold {
    /// Fixed at [`MMAP_THRESHOLD_BYTES`] (or [`TRIM_THRESHOLD_BYTES`]).
    Fixed,
    /// Left alone: `GLIBC_TUNABLES` sets it.
    SetByTunables,
    /// Left alone: not glibc, or glibc refused the value.
    Unchanged,
}

/// Fixes glibc malloc's mmap threshold (which also turns off its dynamic adjustment), unless
/// `tunables` (the `GLIBC_TUNABLES` value) sets it.
pub fn fix_mmap_threshold(tunables: Option<&str>) -> Threshold {
    fix(
        tunables,
        "glibc.malloc.mmap_threshold",
        Param::Mmap,
        MMAP_THRESHOLD_BYTES,
    )
}

/// Fixes glibc malloc's trim threshold, unless `tunables` sets it.
pub fn fix_trim_threshold(tunables: Option<&str>) -> Threshold {
    fix(
        tunables,
        "glibc.malloc.trim_threshold",
        Param::Trim,
        TRIM_THRESHOLD_BYTES,
    )
}

/// The `mallopt` parameters set here.
#[derive(Debug, Clone, Copy)]
enum Param {
    Mmap,
    Trim,
}

fn fix(tunables: Option<&str>, tunable: &str, param: Param, bytes: usize) -> Threshold {
    if tunables_set(tunables, tunable) {
        return Threshold::SetByTunables;
    }
    if set(param, bytes) {
        Threshold::Fixed
    } else {
        Threshold::Unchanged
    }
}

/// Whether a `GLIBC_TUNABLES` value (`name=value` pairs joined by `:`) sets `tunable`.
fn tunables_set(tunables: Option<&str>, tunable: &str) -> bool {
    tunables.is_some_and(|t| {
        t.split(':')
            .any(|pair| pair.split('=').next() == Some(tunable))
    })
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn set(param: Param, bytes: usize) -> bool {
    let Ok(bytes) = libc::c_int::try_from(bytes) else {
        return false;
    };
    let param = match param {
        Param::Mmap => libc::M_MMAP_THRESHOLD,
        Param::Trim => libc::M_TRIM_THRESHOLD,
    };
    // SAFETY: mallopt only changes allocator parameters; glibc serialises it with allocation.
    #[allow(unsafe_code)]
    let done = unsafe { libc::mallopt(param, bytes) };
    done == 1
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn set(_param: Param, _bytes: usize) -> bool {
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    const MMAP: &str = "glibc.malloc.mmap_threshold";
    const TRIM: &str = "glibc.malloc.trim_threshold";

    #[test]
    fn an_operators_tunable_wins() {
        let both = Some("glibc.malloc.trim_threshold=1:glibc.malloc.mmap_threshold=268435456");
        assert!(tunables_set(both, MMAP));
        assert!(tunables_set(both, TRIM));
        assert!(!tunables_set(
            Some("glibc.malloc.trim_threshold=134217728"),
            MMAP
        ));
        assert!(!tunables_set(Some("glibc.malloc.mmap_threshold=1"), TRIM));
        assert!(!tunables_set(Some("glibc.malloc.mmap_threshold_x=1"), MMAP));
        assert!(!tunables_set(None, MMAP));
        assert_eq!(
            fix_mmap_threshold(Some("glibc.malloc.mmap_threshold=1048576")),
            Threshold::SetByTunables
        );
        assert_eq!(
            fix_trim_threshold(Some("glibc.malloc.trim_threshold=1048576")),
            Threshold::SetByTunables
        );
    }

    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    #[test]
    fn glibc_takes_the_thresholds() {
        assert_eq!(fix_mmap_threshold(None), Threshold::Fixed);
        assert_eq!(fix_trim_threshold(None), Threshold::Fixed);
    }
}
