//! Two adjacent groups of eight rows multiplied in one pass with AVX-512 VNNI: sixteen weight
//! rows a 512-bit register, four bytes of each, against eight activation rows.
//!
//! The one-group AVX-512 kernels ([`super::q4k::avx512`], [`super::q6k::avx512`]) hold two
//! four-byte groups of each of eight rows in a register, so each row's sum is split over two
//! 32-bit lanes. A sub-block's scale is then applied to sixteen lanes that hold eight rows,
//! and Q6_K's 6-bit values, whose 4-product sums do not leave room in an i16 for a second
//! `vpdpbusd`, took a `vpmaddubsw` and a `vpdpwssd` for every 64 products. Here a register
//! holds the same four bytes of sixteen rows (the first group's eight, then the second's):
//! one 32-bit lane a row, one broadcast activation word for all of them, and the whole
//! sub-block summed by `vpdpbusd` alone before one `vpmulld` scales it.
//!
//! At eight activation rows these kernels are bound by the vector multiplier (on the 2-core
//! Zen 4 class EPYC, 2026-12-08, each vCPU runs a 512-bit `vpdpbusd`, `vpmulld` or
//! `vpdpwssd` a cycle at about 3.6 GHz, and two processes each keep that rate: the vCPUs do
//! not share one multiplier). For 64 products of Q6_K they issue 1¼ multiplier instructions where the
//! one-group kernel issues 2⅛, and Q6_K's offset of 32 costs none: each sub-block's sum
//! starts from −32 × the activation's sum. For Q4_K, 1⅛ where it issues 1¼.
//!
//! Only x86-64 with AVX-512 F, VL, BW and VNNI runs them ([`super::BlockX8::pairs`]).

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::ROWS;

/// Rows of the two groups together.
pub(super) const PAIR_ROWS: usize = 2 * ROWS;

/// Thirty-two bytes of each group at `at`: the first group's in the low half, the second's in
/// the high one.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
fn load_both(a: &[u8], b: &[u8], at: usize) -> __m512i {
    let (a, b) = (&a[at..at + 32], &b[at..at + 32]);
    // SAFETY: 32 bytes each, the width of the loads.
    unsafe {
        let low = _mm512_castsi256_si512(_mm256_loadu_si256(a.as_ptr().cast()));
        _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(b.as_ptr().cast()))
    }
}

/// Eight bytes, one per row, in the low half.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
fn bytes8(a: &[u8; ROWS]) -> __m128i {
    // SAFETY: eight bytes, the width of the load.
    unsafe { _mm_loadl_epi64(a.as_ptr().cast()) }
}

/// Sixteen bytes, one per row: the first group's eight, then the second's.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
fn bytes_both(a: &[u8; ROWS], b: &[u8; ROWS]) -> __m128i {
    // SAFETY: eight bytes each, the width of the loads.
    unsafe {
        _mm_unpacklo_epi64(
            _mm_loadl_epi64(a.as_ptr().cast()),
            _mm_loadl_epi64(b.as_ptr().cast()),
        )
    }
}

/// Four activation bytes `values[at .. at + 4]` broadcast to every 32-bit lane.
///
/// # Safety
/// `at + 4 <= 256`.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
unsafe fn broadcast4(values: &[i8; 256], at: usize) -> __m512i {
    debug_assert!(at + 4 <= values.len());
    // SAFETY: the caller keeps the four bytes inside the block.
    _mm512_set1_epi32(unsafe { values.as_ptr().add(at).cast::<i32>().read_unaligned() })
}

/// The sixteen rows' f16 scales as f32.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
fn scales_f32(a: &[u16; ROWS], b: &[u16; ROWS]) -> __m512 {
    // SAFETY: eight f16 each, the width of the loads.
    let both = unsafe {
        let low = _mm256_castsi128_si256(_mm_loadu_si128(a.as_ptr().cast()));
        _mm256_inserti128_si256::<1>(low, _mm_loadu_si128(b.as_ptr().cast()))
    };
    _mm512_cvtph_ps(both)
}

/// Each activation row's sixteen f32 results.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
fn store<const R: usize>(acc: [__m512; R]) -> [[f32; PAIR_ROWS]; R] {
    let mut out = [[0f32; PAIR_ROWS]; R];
    for (out, acc) in out.iter_mut().zip(acc) {
        // SAFETY: sixteen f32, the width of the store.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
    }
    out
}

/// Q4_K, two groups at a time.
pub(super) mod q4k {
    use std::arch::x86_64::*;

    use super::super::{BlockQ4Kx8, PREFETCH_BYTES};
    use super::{PAIR_ROWS, broadcast4, bytes_both, bytes8, load_both, scales_f32, store};
    use crate::engine::cpu_prefetch::{ahead, steps_for};
    use crate::engine::kquants::Q8KBlock;

    /// Steps of the pair the prefetch runs ahead: [`PREFETCH_BYTES`] of the two streams.
    const STEPS: usize = steps_for::<BlockQ4Kx8>(PREFETCH_BYTES, 2);

    /// Groups `wa` and `wb` (the same number of blocks) against `R` Q8_K rows: row `r`'s
    /// sixteen results, `wa`'s eight rows then `wb`'s.
    ///
    /// A sub-block's 32 products of a row sum to at most 32 × 15 × 128 = 61440 in magnitude
    /// and, scaled by at most 63 and summed over eight sub-blocks, stay far inside an i32. The
    /// minimums are weighed by `vpdpwssd` against the activation's 32-value sums (at most
    /// 32 × 128 = 4096, an i16), two sub-blocks a lane.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        wa: &[BlockQ4Kx8],
        wb: &[BlockQ4Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; PAIR_ROWS]; R] {
        let m4 = _mm512_set1_epi8(0x0F);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, (ba, bb)) in wa.iter().zip(wb).enumerate() {
            ahead([wa, wb], b, STEPS);
            let mut sumi = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let mut p_lo = [_mm512_setzero_si512(); R];
                let mut p_hi = [_mm512_setzero_si512(); R];
                for g in 0..8 {
                    let q = load_both(&ba.qs, &bb.qs, (8 * c + g) * 32);
                    let lo = _mm512_and_si512(q, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                    for r in 0..R {
                        let xq = &x[r][b].qs;
                        // SAFETY: `64 c + 32 + 4 g + 4 <= 256`.
                        let (a_lo, a_hi) = unsafe {
                            (
                                broadcast4(xq, 64 * c + 4 * g),
                                broadcast4(xq, 64 * c + 32 + 4 * g),
                            )
                        };
                        p_lo[r] = _mm512_dpbusd_epi32(p_lo[r], lo, a_lo);
                        p_hi[r] = _mm512_dpbusd_epi32(p_hi[r], hi, a_hi);
                    }
                }
                let s_lo = _mm512_cvtepu8_epi32(bytes_both(&ba.scales[2 * c], &bb.scales[2 * c]));
                let s_hi =
                    _mm512_cvtepu8_epi32(bytes_both(&ba.scales[2 * c + 1], &bb.scales[2 * c + 1]));
                for r in 0..R {
                    let scaled = _mm512_add_epi32(
                        _mm512_mullo_epi32(p_lo[r], s_lo),
                        _mm512_mullo_epi32(p_hi[r], s_hi),
                    );
                    sumi[r] = _mm512_add_epi32(sumi[r], scaled);
                }
            }
            // 32-bit lane i of `mins[q]`: row i's minimums of sub-blocks 2 q and 2 q + 1.
            let mins: [__m512i; 4] = std::array::from_fn(|q| {
                let a = _mm_unpacklo_epi8(bytes8(&ba.mins[2 * q]), bytes8(&ba.mins[2 * q + 1]));
                let b = _mm_unpacklo_epi8(bytes8(&bb.mins[2 * q]), bytes8(&bb.mins[2 * q + 1]));
                _mm512_cvtepu8_epi16(_mm256_set_m128i(b, a))
            });
            let (d, dmin) = (scales_f32(&ba.d, &bb.d), scales_f32(&ba.dmin, &bb.dmin));
            for r in 0..R {
                let xb = &x[r][b];
                // SAFETY: sixteen i16, the width of the load.
                let sums = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr().cast()) };
                // The eight 32-value sums, as i16 pairs: 32-bit lane 0, 1, 4, 5 = sub-blocks
                // (0, 1), (2, 3), (4, 5), (6, 7).
                let sums = _mm256_madd_epi16(sums, ones);
                let pairs = _mm512_castsi256_si512(_mm256_packs_epi32(sums, sums));
                let mut summ = _mm512_setzero_si512();
                for (q, lane) in [0, 1, 4, 5].into_iter().enumerate() {
                    let pair = _mm512_permutexvar_epi32(_mm512_set1_epi32(lane), pairs);
                    summ = _mm512_dpwssd_epi32(summ, mins[q], pair);
                }
                // The one-group kernels' float operations, in their order: a row's result
                // has the same bits whichever kernel multiplies it.
                let xd = _mm512_set1_ps(xb.d);
                let sumi = _mm512_cvtepi32_ps(sumi[r]);
                acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(d, xd), sumi, acc[r]);
                let summ = _mm512_cvtepi32_ps(summ);
                acc[r] = _mm512_fnmadd_ps(_mm512_mul_ps(dmin, xd), summ, acc[r]);
            }
        }
        store(acc)
    }
}

/// Q6_K, two groups at a time.
pub(super) mod q6k {
    use std::arch::x86_64::*;

    use super::super::q6k::{qh_at, ql_at};
    use super::super::{BlockQ6Kx8, PREFETCH_BYTES};
    use super::{PAIR_ROWS, broadcast4, bytes_both, load_both, scales_f32, store};
    use crate::engine::cpu_prefetch::{ahead_at, part, steps_for};
    use crate::engine::kquants::Q8KBlock;

    /// Steps of the pair the prefetch runs ahead: [`PREFETCH_BYTES`] of the two streams.
    const STEPS: usize = steps_for::<BlockQ6Kx8>(PREFETCH_BYTES, 2);

    /// Chunks `P` and `P + 2` of half `h`, which share their bytes: `ql`'s low nibbles are
    /// chunk `P`'s low bits and its high nibbles chunk `P + 2`'s, and one `qh` byte holds the
    /// high bits of both. Sub-blocks `8 h + 2 C` (groups 0..4) and `8 h + 2 C + 1` (groups
    /// 4..8) of each chunk `C` are summed from −32 × the activation's sum of their 16 values,
    /// scaled and added to `sumi`.
    ///
    /// Taking the two chunks together loads each byte once and keeps the values' lifetimes
    /// short: with the chunks one at a time, the compiler kept the loads shared by chunk `P`
    /// and `P + 2` alive across the chunks between them and spilled them to the stack.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn chunks<const P: usize, const R: usize>(
        a: &BlockQ6Kx8,
        b: &BlockQ6Kx8,
        ahead: [*const i8; 2],
        h: usize,
        x: &[&Q8KBlock; R],
        offsets: &[[i32; 16]; R],
        sumi: &mut [__m512i; R],
    ) {
        let (m4, m30) = (_mm512_set1_epi8(0x0F), _mm512_set1_epi8(0x30));
        part::<BlockQ6Kx8, 2>(ahead, 2 * h + P, 4);
        for half in 0..2 {
            let (sub_lo, sub_hi) = (8 * h + 2 * P + half, 8 * h + 2 * (P + 2) + half);
            let mut p_lo: [__m512i; R] =
                std::array::from_fn(|r| _mm512_set1_epi32(offsets[r][sub_lo]));
            let mut p_hi: [__m512i; R] =
                std::array::from_fn(|r| _mm512_set1_epi32(offsets[r][sub_hi]));
            for g in 4 * half..4 * half + 4 {
                let group = 8 * h + g;
                let ql = load_both(&a.bits, &b.bits, ql_at(group) + 32 * P);
                let qh = load_both(&a.bits, &b.bits, qh_at(group));
                // Chunk C's two high bits are bits 2 C, 2 C + 1 of `qh`, moved to bits 4, 5.
                let (high_lo, high_hi) = if P == 0 {
                    (_mm512_slli_epi16::<4>(qh), qh)
                } else {
                    (_mm512_slli_epi16::<2>(qh), _mm512_srli_epi16::<2>(qh))
                };
                let w_lo =
                    _mm512_or_si512(_mm512_and_si512(ql, m4), _mm512_and_si512(high_lo, m30));
                let w_hi = _mm512_or_si512(
                    _mm512_and_si512(_mm512_srli_epi16::<4>(ql), m4),
                    _mm512_and_si512(high_hi, m30),
                );
                let at = 128 * h + 32 * P + 4 * g;
                for r in 0..R {
                    // SAFETY: `at + 64 + 4 <= 128 + 32 + 28 + 68 = 256`.
                    let (x_lo, x_hi) =
                        unsafe { (broadcast4(&x[r].qs, at), broadcast4(&x[r].qs, at + 64)) };
                    p_lo[r] = _mm512_dpbusd_epi32(p_lo[r], w_lo, x_lo);
                    p_hi[r] = _mm512_dpbusd_epi32(p_hi[r], w_hi, x_hi);
                }
            }
            let s_lo = _mm512_cvtepi8_epi32(bytes_both(&a.scales[sub_lo], &b.scales[sub_lo]));
            let s_hi = _mm512_cvtepi8_epi32(bytes_both(&a.scales[sub_hi], &b.scales[sub_hi]));
            for r in 0..R {
                let scaled = _mm512_add_epi32(
                    _mm512_mullo_epi32(p_lo[r], s_lo),
                    _mm512_mullo_epi32(p_hi[r], s_hi),
                );
                sumi[r] = _mm512_add_epi32(sumi[r], scaled);
            }
        }
    }

    /// Groups `wa` and `wb` (the same number of blocks) against `R` Q8_K rows: row `r`'s
    /// sixteen results, `wa`'s eight rows then `wb`'s.
    ///
    /// A sub-block's sum, Σ (q − 32) × x over 16 values, is at most 16 × 32 × 128 = 65536 in
    /// magnitude; scaled by at most 128 and summed over sixteen sub-blocks, 2²⁷.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        wa: &[BlockQ6Kx8],
        wb: &[BlockQ6Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; PAIR_ROWS]; R] {
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, (ba, bb)) in wa.iter().zip(wb).enumerate() {
            let ahead = ahead_at([wa, wb], b, STEPS);
            let xb: [&Q8KBlock; R] = std::array::from_fn(|r| &x[r][b]);
            // −32 × each 16-value sum, the start of its sub-block's sum.
            let mut offsets = [[0i32; 16]; R];
            for (offsets, xb) in offsets.iter_mut().zip(&xb) {
                // SAFETY: sixteen i16, the width of the load.
                let sums = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr().cast()) };
                let wide = _mm512_slli_epi32::<5>(_mm512_cvtepi16_epi32(sums));
                let negated = _mm512_sub_epi32(_mm512_setzero_si512(), wide);
                // SAFETY: sixteen i32, the width of the store.
                unsafe { _mm512_storeu_si512(offsets.as_mut_ptr().cast(), negated) };
            }
            let mut sumi = [_mm512_setzero_si512(); R];
            for h in 0..2 {
                chunks::<0, R>(ba, bb, ahead, h, &xb, &offsets, &mut sumi);
                chunks::<1, R>(ba, bb, ahead, h, &xb, &offsets, &mut sumi);
            }
            let d = scales_f32(&ba.d, &bb.d);
            for r in 0..R {
                let scale = _mm512_mul_ps(d, _mm512_set1_ps(xb[r].d));
                acc[r] = _mm512_fmadd_ps(scale, _mm512_cvtepi32_ps(sumi[r]), acc[r]);
            }
        }
        store(acc)
    }
}
