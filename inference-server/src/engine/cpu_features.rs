//! Running a portable loop compiled for the CPU's vector extensions, and the extensions the
//! kernels look for.

#![allow(unsafe_code)]

/// Runs `f` compiled for AVX2 where the CPU has it (the crate is built for baseline x86-64):
/// `f`'s body is inlined into a function with the feature, so its loops vectorize 256 bits
/// wide. Elsewhere `f` runs as built.
#[inline(always)]
pub(super) fn with_avx2<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just now.
        return unsafe { avx2(f) };
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
fn avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Whether this CPU has AVX-VNNI (the VEX-encoded `vpdpbusd`), which the Q8_0 and Q4_K kernels
/// use when it is there (cached by the standard library).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
}

/// Whether this CPU has AVX-512 F, VL, BW and VNNI, which the Q8_0, Q4_K and Q6_K kernels use
/// when it is there (cached by the standard library).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx512_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512vl")
        && std::arch::is_x86_feature_detected!("avx512bw")
        && std::arch::is_x86_feature_detected!("avx512vnni")
}
