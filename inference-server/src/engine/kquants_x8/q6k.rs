//! Q6_K blocks of eight interleaved rows and their kernel.

use half::f16;

use super::{BlockX8, ROWS};
use crate::engine::kquants::{BlockQ6K, Q8KBlock};

/// The 256-value Q6_K blocks of eight consecutive rows (1680 bytes, as the file's eight).
///
/// With `l = 4 g + t` (`g` 0..8, `t` 0..4) and `h` the half (0..2), a row's file bytes
/// `ql[64 h + l]`, `ql[64 h + 32 + l]` and `qh[32 h + l]` hold its values `128 h + 32 c + l`
/// for `c` 0..4: the low nibble of the first `ql` byte and bits 0–1 of `qh` (c = 0), the low
/// nibble of the second and bits 2–3 (c = 1), the high nibbles and bits 4–5 and 6–7 (c = 2,
/// 3). Those bytes are stored four at a time, row after row.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6Kx8 {
    /// Each row's scale of its sub-block scales (f16 bits).
    d: [u16; ROWS],
    /// `scales[j][i]`: row `i`'s signed scale of values `16 j .. 16 j + 16` (i8 bits).
    scales: [[u8; ROWS]; 16],
    /// Byte `t` of row `i` from file `ql[64 h + 32 p + 4 g + t]` at
    /// `((8 h + g) * 2 + p) * 32 + 4 i + t`.
    ql: [u8; 1024],
    /// Byte `t` of row `i` from file `qh[32 h + 4 g + t]` at `(8 h + g) * 32 + 4 i + t`.
    qh: [u8; 512],
}

impl BlockX8 for BlockQ6Kx8 {
    type File = BlockQ6K;

    fn interleave(rows: [&BlockQ6K; ROWS]) -> Self {
        let mut out = Self {
            d: [0; ROWS],
            scales: [[0; ROWS]; 16],
            ql: [0; 1024],
            qh: [0; 512],
        };
        for (i, row) in rows.iter().enumerate() {
            out.d[i] = row.d;
            for (j, &scale) in row.scales.iter().enumerate() {
                out.scales[j][i] = scale as u8;
            }
            for h in 0..2 {
                for g in 0..8 {
                    for p in 0..2 {
                        let at = ((8 * h + g) * 2 + p) * 32 + 4 * i;
                        let from = 64 * h + 32 * p + 4 * g;
                        out.ql[at..at + 4].copy_from_slice(&row.ql[from..from + 4]);
                    }
                    let at = (8 * h + g) * 32 + 4 * i;
                    let from = 32 * h + 4 * g;
                    out.qh[at..at + 4].copy_from_slice(&row.qh[from..from + 4]);
                }
            }
        }
        out
    }

    fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let d = f16::from_bits(self.d[i]).to_f32();
        for h in 0..2 {
            for g in 0..8 {
                let a = ((8 * h + g) * 2) * 32 + 4 * i;
                let b = a + 32;
                let hb = (8 * h + g) * 32 + 4 * i;
                for t in 0..4 {
                    let (qa, qb, qh) = (self.ql[a + t], self.ql[b + t], self.qh[hb + t]);
                    let q = [
                        (qa & 0xF) | ((qh & 3) << 4),
                        (qb & 0xF) | (((qh >> 2) & 3) << 4),
                        (qa >> 4) | (((qh >> 4) & 3) << 4),
                        (qb >> 4) | (((qh >> 6) & 3) << 4),
                    ];
                    for (c, &q) in q.iter().enumerate() {
                        let value = 128 * h + 32 * c + 4 * g + t;
                        let scale = f32::from(self.scales[value / 16][i] as i8);
                        out[value] = d * scale * f32::from(q as i8 - 32);
                    }
                }
            }
        }
    }

    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [[f32; ROWS]; R] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a `KMatrixX8` exists only where `supported()` found AVX2, FMA and F16C.
            // (An AVX-VNNI variant was slower here: with `vpdpbusd` the sub-block scales can
            // no longer be applied by the `madd` that sums the pairs, and the four chunks'
            // separate sums spill registers at four activation rows.)
            unsafe { avx2::dot(w, x) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            super::scalar_dot(w, x)
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::{
        broadcast4, load32, row_pairs_i8, scales_f32, store, sum_pair, two_per_row,
    };
    use super::{BlockQ6Kx8, ROWS};
    use crate::engine::kquants::Q8KBlock;

    /// The eight rows' 6-bit values `128 h + 32 c + 4 g ..` (unsigned, 0..63) from their
    /// `ql` and `qh` bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values(c: usize, qla: __m256i, qlb: __m256i, qh: __m256i) -> __m256i {
        let m4 = _mm256_set1_epi8(0x0F);
        let m30 = _mm256_set1_epi8(0x30);
        let (low, high) = match c {
            0 => (qla, _mm256_slli_epi16::<4>(qh)),
            1 => (qlb, _mm256_slli_epi16::<2>(qh)),
            2 => (_mm256_srli_epi16::<4>(qla), qh),
            _ => (_mm256_srli_epi16::<4>(qlb), _mm256_srli_epi16::<2>(qh)),
        };
        _mm256_or_si256(_mm256_and_si256(low, m4), _mm256_and_si256(high, m30))
    }

    /// Eight interleaved Q6_K rows against `R` Q8_K rows. The 6-bit values are taken
    /// unsigned: `maddubs` pairs sum to at most 2 × 63 × 128 = 16128, two groups of a 16-value
    /// sub-block to 32256 (no i16 overflow), then `madd` with the rows' signed scales sums to
    /// i32. The offset of 32 is removed through the activation's 16-value sums.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        w: &[BlockQ6Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; ROWS]; R] {
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            super::super::prefetch_next(w, b);
            let mut sumi = [_mm256_setzero_si256(); R];
            for h in 0..2 {
                for gp in 0..4 {
                    let (g0, g1) = (8 * h + 2 * gp, 8 * h + 2 * gp + 1);
                    let (qla0, qlb0) = (load32(&wb.ql, g0 * 64), load32(&wb.ql, g0 * 64 + 32));
                    let (qla1, qlb1) = (load32(&wb.ql, g1 * 64), load32(&wb.ql, g1 * 64 + 32));
                    let (qh0, qh1) = (load32(&wb.qh, g0 * 32), load32(&wb.qh, g1 * 32));
                    for c in 0..4 {
                        let w0 = values(c, qla0, qlb0, qh0);
                        let w1 = values(c, qla1, qlb1, qh1);
                        let s = row_pairs_i8(&wb.scales[8 * h + 2 * c + gp / 2]);
                        let at = 128 * h + 32 * c + 8 * gp;
                        for r in 0..R {
                            let xq = &x[r][b].qs;
                            let p = _mm256_add_epi16(
                                _mm256_maddubs_epi16(w0, broadcast4(&xq[at..])),
                                _mm256_maddubs_epi16(w1, broadcast4(&xq[at + 4..])),
                            );
                            sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p, s));
                        }
                    }
                }
            }
            // The offset of 32: 32 × Σ_j scale_ij × (sum of the activation's 16 values j).
            let mut offset = [_mm256_setzero_si256(); R];
            for pair in 0..8 {
                let scales = two_per_row(&wb.scales[2 * pair], &wb.scales[2 * pair + 1], true);
                for r in 0..R {
                    let sums = sum_pair(&x[r][b].bsums[2 * pair..]);
                    offset[r] = _mm256_add_epi32(offset[r], _mm256_madd_epi16(scales, sums));
                }
            }
            let d = scales_f32(&wb.d);
            for r in 0..R {
                let sum = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32::<5>(offset[r]));
                let xd = _mm256_set1_ps(x[r][b].d);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(sum), acc[r]);
            }
        }
        acc.map(|v| store(v))
    }
}
