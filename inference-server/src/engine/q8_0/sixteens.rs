//! Four adjacent weight quads (sixteen rows) against eight activation rows with AVX-512 VNNI,
//! one 32-bit lane a row.
//!
//! The quad layout keeps eight bytes of a row together (a run): its kernels multiply a run by
//! one 64-bit broadcast of the activation's eight bytes, and each row's sum is split over two
//! lanes. The two-quad kernel ([`super::octets`]) thus issued a `vpbroadcastq` for every
//! `vpdpbusd` (`vpdpbusd` broadcasts only 32-bit words from memory) and folded the lanes
//! with permutes before its float scaling; at eight activation rows the vector multiplier was
//! busy for well under half of its time. Here the runs of four quads are rearranged once per
//! block, two permutes a run: one register holds the first four bytes of the run of all
//! sixteen rows, another the last four. Both serve the eight activation rows, each
//! `vpdpbusd` takes the activation's word as an embedded broadcast (`{1to16}`), and a row's
//! sum ends in one lane: one conversion, multiplication and FMA scale sixteen rows.

#![cfg(target_arch = "x86_64")]

use std::arch::x86_64::*;

use super::{ActBlock, QuadBlock, ROWS, RUN};
use crate::engine::cpu_prefetch::{ahead, steps_for};

/// Quads a pass takes.
pub(super) const QUADS: usize = 4;
/// Rows of the four quads.
pub(super) const SIXTEEN: usize = QUADS * ROWS;

/// Steps the prefetch runs ahead: about 12 KiB of the four quads' blocks, into L2.
const STEPS: usize = steps_for::<QuadBlock>(12 * 1024, QUADS);

/// Run `g` (0..4) of quads `a` and `b`: `a`'s four rows' eight bytes in the low half, `b`'s in
/// the high one (32-bit lanes 2 i and 2 i + 1: row i's two halves).
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn run_of(a: &QuadBlock, b: &QuadBlock, g: usize) -> __m512i {
    let at = g * ROWS * RUN;
    let (a, b) = (&a.qs[at..at + ROWS * RUN], &b.qs[at..at + ROWS * RUN]);
    // SAFETY: 32 bytes each, the width of the loads.
    unsafe {
        let low = _mm512_castsi256_si512(_mm256_loadu_si256(a.as_ptr().cast()));
        _mm512_inserti64x4::<1>(low, _mm256_loadu_si256(b.as_ptr().cast()))
    }
}

/// The four quads' sixteen f16 scales as f32, in row order.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn scales(w: [&QuadBlock; QUADS]) -> __m512 {
    // SAFETY: four f16 each, the width of the loads.
    let d = w.map(|q| unsafe { _mm_loadl_epi64(q.d.as_ptr().cast()) });
    let low = _mm256_castsi128_si256(_mm_unpacklo_epi64(d[0], d[1]));
    _mm512_cvtph_ps(_mm256_inserti128_si256::<1>(
        low,
        _mm_unpacklo_epi64(d[2], d[3]),
    ))
}

/// Four activation bytes `qs[at .. at + 4]` broadcast to every 32-bit lane.
#[inline]
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
fn word(qs: &[i8; 32], at: usize) -> __m512i {
    let bytes = &qs[at..at + 4];
    // SAFETY: four bytes, the width of the read.
    _mm512_set1_epi32(unsafe { bytes.as_ptr().cast::<i32>().read_unaligned() })
}

/// Quads `w` (four with the same number of blocks, adjacent in memory as a matrix stores
/// them) against eight activation rows: row `r`'s sixteen results, quad by quad.
///
/// A row's sum in a lane is the same integer the quad kernels reach in two lanes, and it is
/// scaled by the same float operations: the results have their bits.
///
/// # Safety
/// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL and VNNI.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512vnni")]
pub(super) unsafe fn dot(w: [&[QuadBlock]; QUADS], x: [&[ActBlock]; 8]) -> [[f32; SIXTEEN]; 8] {
    let blocks = w[0].len();
    let w = w.map(|quad| &quad[..blocks]);
    let x = x.map(|row| &row[..blocks]);
    // Lane i of `first` (`second`): row i's first (last) four bytes of a run; rows 0..8 from
    // the register of quads 0 and 1, 8..16 from that of quads 2 and 3.
    let first = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let second = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let mut acc = [_mm512_setzero_ps(); 8];
    for b in 0..blocks {
        ahead(w, b, STEPS);
        let wb = w.map(|quad| &quad[b]);
        let halves: [[__m512i; 2]; 4] = std::array::from_fn(|g| {
            let (low, high) = (run_of(wb[0], wb[1], g), run_of(wb[2], wb[3], g));
            [
                _mm512_permutex2var_epi32(low, first, high),
                _mm512_permutex2var_epi32(low, second, high),
            ]
        });
        let d = scales(wb);
        for (acc, row) in acc.iter_mut().zip(&x) {
            let xb = &row[b];
            let mut sum = _mm512_set1_epi32(xb.offset[0] + xb.offset[1]);
            for (g, [low, high]) in halves.iter().enumerate() {
                sum = _mm512_dpbusd_epi32(sum, *low, word(&xb.qs, g * RUN));
                sum = _mm512_dpbusd_epi32(sum, *high, word(&xb.qs, g * RUN + 4));
            }
            let xd = _mm512_set1_ps(xb.d);
            *acc = _mm512_fmadd_ps(_mm512_mul_ps(d, xd), _mm512_cvtepi32_ps(sum), *acc);
        }
    }
    let mut out = [[0f32; SIXTEEN]; 8];
    for (out, acc) in out.iter_mut().zip(acc) {
        // SAFETY: sixteen f32, the width of the store.
        unsafe { _mm512_storeu_ps(out.as_mut_ptr(), acc) };
    }
    out
}
