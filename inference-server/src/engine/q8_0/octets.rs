//! Two adjacent weight quads (eight rows) against eight activation rows with AVX-512 VNNI,
//! the rows' two lanes folded before the float scaling.
//!
//! The quad kernels ([`super::vnni_kernel`]) end every 32-value block of every activation row
//! with a conversion, a multiplication and an FMA on eight lanes that hold four rows' sums in
//! two lanes each. At eight activation rows those float instructions took a third of the
//! vector multiplier's issue slots beside the `vpdpbusd`s, and the multiplier was the limit.
//! Here one 512-bit register holds the two quads' eight rows (two lanes each), and two
//! activation rows' sums are folded, lanes pairwise added by two permutes, into one
//! register of sixteen sums (eight rows × two activation rows) before they are converted and
//! scaled: half the float instructions.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{ActBlock, QuadBlock, ROWS, RUN};
use crate::engine::cpu_prefetch::{ahead, steps_for};

/// Steps the prefetch runs ahead: about 12 KiB of the two quads' blocks, into L2 (as the
/// K-quant kernels' prefetch; the quad kernels' 8 blocks into L1 are 80 ns ahead of eight
/// activation rows, less than memory takes).
const STEPS: usize = steps_for::<QuadBlock>(12 * 1024, 2);

/// Rows of the two quads.
pub(super) const OCTET: usize = 2 * ROWS;

/// Run `g` (0..4) of both quads: the first quad's four rows' eight bytes in the low half, the
/// second's in the high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn weights(a: &QuadBlock, b: &QuadBlock, g: usize) -> __m512i {
    let (a, b) = (
        &a.qs[g * ROWS * RUN..(g + 1) * ROWS * RUN],
        &b.qs[g * ROWS * RUN..(g + 1) * ROWS * RUN],
    );
    // SAFETY: 32 bytes each, the width of the loads.
    unsafe {
        let low = _mm512_castsi256_si512(_mm256_loadu_si256(a.as_ptr().cast()));
        _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(b.as_ptr().cast()))
    }
}

/// The eight rows' scales, twice: lanes `i` and `8 + i` hold row `i`'s.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn scales(a: &QuadBlock, b: &QuadBlock) -> __m512 {
    // SAFETY: four f16 each, the width of the loads.
    let (a, b) = unsafe {
        (
            _mm_loadl_epi64(a.d.as_ptr().cast()),
            _mm_loadl_epi64(b.d.as_ptr().cast()),
        )
    };
    let eight = _mm256_cvtph_ps(_mm_unpacklo_epi64(a, b));
    halves(eight, eight)
}

/// `low` in lanes 0..8, `high` in lanes 8..16 (AVX-512 F alone: no DQ's `vinsertf32x8`).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn halves(low: __m256, high: __m256) -> __m512 {
    let low = _mm512_castpd256_pd512(_mm256_castps_pd(low));
    _mm512_castpd_ps(_mm512_insertf64x4::<1>(low, _mm256_castps_pd(high)))
}

/// Quads `wa` and `wb` (the same number of blocks) against eight activation rows: row `r`'s
/// eight results, `wa`'s four rows then `wb`'s.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn dot(
    wa: &[QuadBlock],
    wb: &[QuadBlock],
    x: [&[ActBlock]; 8],
) -> [[f32; OCTET]; 8] {
    let x = x.map(|row| &row[..wa.len()]);
    // Lane 2 i of a row's sums and lane 2 i + 1: row i's two halves; the folded register's
    // lane i (8 + i) takes row i's of the first (second) activation row.
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mut acc = [_mm512_setzero_ps(); 4];
    for (b, (ba, bb)) in wa.iter().zip(wb).enumerate() {
        ahead([wa, wb], b, STEPS);
        let wq = [0, 1, 2, 3].map(|g| weights(ba, bb, g));
        let d = scales(ba, bb);
        let mut sums = [_mm512_setzero_si512(); 8];
        for (sums, row) in sums.iter_mut().zip(&x) {
            let xb = &row[b];
            // SAFETY: `offset` is the 8 bytes read.
            let offset = unsafe { xb.offset.as_ptr().cast::<i64>().read_unaligned() };
            *sums = _mm512_set1_epi64(offset);
            for (g, &wg) in wq.iter().enumerate() {
                let run = &xb.qs[g * RUN..(g + 1) * RUN];
                // SAFETY: `run` is the 8 bytes read.
                let xq = _mm512_set1_epi64(unsafe { run.as_ptr().cast::<i64>().read_unaligned() });
                *sums = _mm512_dpbusd_epi32(*sums, wg, xq);
            }
        }
        for (p, acc) in acc.iter_mut().enumerate() {
            let (s0, s1) = (sums[2 * p], sums[2 * p + 1]);
            let folded = _mm512_add_epi32(
                _mm512_permutex2var_epi32(s0, even, s1),
                _mm512_permutex2var_epi32(s0, odd, s1),
            );
            let (x0, x1) = (x[2 * p][b].d, x[2 * p + 1][b].d);
            let xd = halves(_mm256_set1_ps(x0), _mm256_set1_ps(x1));
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(folded), *acc);
        }
    }
    let mut out = [[0f32; OCTET]; 8];
    for (p, acc) in acc.iter().enumerate() {
        let mut both = [0f32; 2 * OCTET];
        // SAFETY: sixteen f32, the width of the store.
        unsafe { _mm512_storeu_ps(both.as_mut_ptr(), *acc) };
        out[2 * p].copy_from_slice(&both[..OCTET]);
        out[2 * p + 1].copy_from_slice(&both[OCTET..]);
    }
    out
}
