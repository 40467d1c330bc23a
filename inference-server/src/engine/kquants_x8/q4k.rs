//! Q4_K blocks of eight interleaved rows and their kernel.

use half::f16;

use super::{BlockX8, ROWS};
use crate::engine::kquants::{BlockQ4K, Q8KBlock, q4k_scale_min};

/// The 256-value Q4_K blocks of eight consecutive rows (1184 bytes; the file's eight blocks take
/// 1152: the sub-block scales and minimums are stored unpacked, a byte each).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4Kx8 {
    /// Each row's scale of its sub-block scales (f16 bits).
    pub(super) d: [u16; ROWS],
    /// Each row's scale of its sub-block minimums (f16 bits).
    pub(super) dmin: [u16; ROWS],
    /// `scales[j][i]`: row `i`'s 6-bit scale of sub-block `j` (values `32 j .. 32 j + 32`).
    pub(super) scales: [[u8; ROWS]; 8],
    /// `mins[j][i]`: row `i`'s 6-bit minimum of sub-block `j`.
    pub(super) mins: [[u8; ROWS]; 8],
    /// The rows' `qs` bytes four at a time: byte `t` of group `g` of chunk `c` of row `i` (file
    /// byte `32 c + 4 g + t`, holding values `64 c + 4 g + t` in its low nibble and
    /// `64 c + 32 + 4 g + t` in its high one) is at `((8 c + g) * 8 + i) * 4 + t`.
    pub(super) qs: [u8; 1024],
}

impl BlockX8 for BlockQ4Kx8 {
    type File = BlockQ4K;

    fn interleave(rows: [&BlockQ4K; ROWS]) -> Self {
        let mut out = Self {
            d: [0; ROWS],
            dmin: [0; ROWS],
            scales: [[0; ROWS]; 8],
            mins: [[0; ROWS]; 8],
            qs: [0; 1024],
        };
        for (i, row) in rows.iter().enumerate() {
            out.d[i] = row.d;
            out.dmin[i] = row.dmin;
            for j in 0..8 {
                let (scale, min) = q4k_scale_min(j, &row.scales);
                out.scales[j][i] = scale;
                out.mins[j][i] = min;
            }
            for c in 0..4 {
                for g in 0..8 {
                    let at = ((8 * c + g) * ROWS + i) * 4;
                    let from = 32 * c + 4 * g;
                    out.qs[at..at + 4].copy_from_slice(&row.qs[from..from + 4]);
                }
            }
        }
        out
    }

    fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let d = f16::from_bits(self.d[i]).to_f32();
        let dmin = f16::from_bits(self.dmin[i]).to_f32();
        for c in 0..4 {
            let (lo, hi) = (2 * c, 2 * c + 1);
            let (d1, m1) = (
                d * f32::from(self.scales[lo][i]),
                dmin * f32::from(self.mins[lo][i]),
            );
            let (d2, m2) = (
                d * f32::from(self.scales[hi][i]),
                dmin * f32::from(self.mins[hi][i]),
            );
            for g in 0..8 {
                let at = ((8 * c + g) * ROWS + i) * 4;
                for t in 0..4 {
                    let q = self.qs[at + t];
                    out[64 * c + 4 * g + t] = d1 * f32::from(q & 0xF) - m1;
                    out[64 * c + 32 + 4 * g + t] = d2 * f32::from(q >> 4) - m2;
                }
            }
        }
    }

    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [[f32; ROWS]; R] {
        #[cfg(target_arch = "x86_64")]
        {
            if super::avx512_vnni() {
                // SAFETY: checked just now; AVX2, FMA and F16C as below.
                unsafe { avx512::dot(w, x) }
            } else if super::avx_vnni() {
                // SAFETY: checked just now; AVX2, FMA and F16C as below.
                unsafe { vnni::dot(w, x) }
            } else {
                // SAFETY: a `KMatrixX8` exists only where `supported()` found AVX2, FMA and
                // F16C.
                unsafe { avx2::dot(w, x) }
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            super::scalar_dot(w, x)
        }
    }

    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_pair_avx512(a: &[Self], b: &[Self], x: [&[Q8KBlock]; 8]) -> [[f32; 2 * ROWS]; 8] {
        // SAFETY: the caller's contract, the kernel's.
        unsafe { super::pairs::q4k::dot(a, b, x) }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::{
        broadcast4, broadcast4_at, load32, row_pairs_u8, scales_f32, store, two_per_row,
    };
    use super::{BlockQ4Kx8, ROWS};
    use crate::engine::kquants::Q8KBlock;

    /// Eight interleaved Q4_K rows against `R` Q8_K rows.
    ///
    /// Per four-byte group, `maddubs` multiplies the eight rows' unsigned nibbles by the
    /// broadcast activations (a pair sums to at most 2 × 15 × 128); the eight groups of a
    /// sub-block are summed in i16 (at most 8 × 3840 = 30720, no overflow), then `madd` with
    /// the rows' sub-block scales sums to one i32 per row.
    ///
    /// Up to four activation rows take both nibbles of a chunk at once (one weight load for
    /// two sub-blocks). More rows take one sub-block at a time: only their `R` i16 sums, one
    /// unpacked weight register and one broadcast then live in the inner loop, so eight rows
    /// fit the sixteen AVX2 registers, and the activations are read through references
    /// checked once per block. Both nibbles at once with eight rows kept sixteen sums live,
    /// spilled them to the stack and left bounds checks in the inner loop: on the 2-core AMD
    /// EPYC (Zen 3, no AVX-512) this form takes 22 ns per block and activation row against
    /// 26–28 ns (one thread, L3-resident weights, best of 60 interleaved runs).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        w: &[BlockQ4Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; ROWS]; R] {
        let x = x.map(|row| &row[..w.len()]);
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            super::super::prefetch_ahead(w, b);
            let xq: [&[i8; 256]; R] = std::array::from_fn(|r| &x[r][b].qs);
            let mut sumi = [_mm256_setzero_si256(); R];
            if R <= 4 {
                // Both nibbles of a chunk at once: each weight load serves two sub-blocks.
                for c in 0..4 {
                    let chunk = &wb.qs[c * 256..(c + 1) * 256];
                    let mut p_lo = [_mm256_setzero_si256(); R];
                    let mut p_hi = [_mm256_setzero_si256(); R];
                    for g in 0..8 {
                        let q = load32(chunk, 32 * g);
                        let lo = _mm256_and_si256(q, m4);
                        let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                        for r in 0..R {
                            let a_lo = broadcast4(&xq[r][64 * c + 4 * g..]);
                            let a_hi = broadcast4(&xq[r][64 * c + 32 + 4 * g..]);
                            p_lo[r] = _mm256_add_epi16(p_lo[r], _mm256_maddubs_epi16(lo, a_lo));
                            p_hi[r] = _mm256_add_epi16(p_hi[r], _mm256_maddubs_epi16(hi, a_hi));
                        }
                    }
                    let s_lo = row_pairs_u8(&wb.scales[2 * c]);
                    let s_hi = row_pairs_u8(&wb.scales[2 * c + 1]);
                    for r in 0..R {
                        let p = _mm256_add_epi32(
                            _mm256_madd_epi16(p_lo[r], s_lo),
                            _mm256_madd_epi16(p_hi[r], s_hi),
                        );
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            } else {
                // One sub-block at a time: only `R` i16 sums live in the inner loop.
                for j in 0..8 {
                    // Sub-block j: chunk j / 2, its low nibbles when j is even, else its high
                    // ones.
                    let chunk = &wb.qs[(j / 2) * 256..(j / 2 + 1) * 256];
                    let mut p = [_mm256_setzero_si256(); R];
                    for g in 0..8 {
                        let q = load32(chunk, 32 * g);
                        let v = if j % 2 == 0 {
                            _mm256_and_si256(q, m4)
                        } else {
                            _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4)
                        };
                        for r in 0..R {
                            // SAFETY: 32 j + 4 g + 4 <= 256, inside the activation block.
                            let a = unsafe { broadcast4_at(xq[r], 32 * j + 4 * g) };
                            p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(v, a));
                        }
                    }
                    let s = row_pairs_u8(&wb.scales[j]);
                    for r in 0..R {
                        sumi[r] = _mm256_add_epi32(sumi[r], _mm256_madd_epi16(p[r], s));
                    }
                }
            }
            finish_block(wb, x, b, sumi, &mut acc);
        }
        acc.map(|v| store(v))
    }

    /// An activation block's eight 32-value sums (`bsums` added in pairs: at most 32 × 128
    /// in magnitude, so they fit i16), packed so that i32 lanes 0, 1, 4 and 5 hold
    /// sub-blocks 0–1, 2–3, 4–5 and 6–7 as i16 pairs: the operands of the minimums' `madd`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn sub_block_sums(bsums: &[i16; 16]) -> __m256i {
        // SAFETY: sixteen i16, the width of the load.
        let v = unsafe { _mm256_loadu_si256(bsums.as_ptr().cast()) };
        let sums = _mm256_madd_epi16(v, _mm256_set1_epi16(1));
        _mm256_packs_epi32(sums, sums)
    }

    /// Adds block `b`'s share to each row's result: the integer sums `sumi` times the rows'
    /// and the activation's scales, less the minimums (row i subtracts dmin_i × Σ_j min_ij ×
    /// the sum of the activation's sub-block j, two sub-blocks per `madd`). Shared by the AVX2
    /// and AVX-VNNI kernels, which differ only in how they form `sumi`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn finish_block<const R: usize>(
        wb: &BlockQ4Kx8,
        x: [&[Q8KBlock]; R],
        b: usize,
        sumi: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
        // SAFETY: this function has the features the body needs.
        unsafe { finish_block_inlined(wb, x, b, sumi, acc) }
    }

    /// [`finish_block`], always inlined: the AVX-512 kernel calls it with eight rows, where
    /// LLVM's cost model sometimes kept `finish_block` a call of its own, with the rows'
    /// sums passed through memory (7 % of an 8-stream Q4_K_M decode step in one build).
    ///
    /// # Safety
    /// The caller must be compiled with AVX2, FMA and F16C.
    #[inline(always)]
    pub(super) unsafe fn finish_block_inlined<const R: usize>(
        wb: &BlockQ4Kx8,
        x: [&[Q8KBlock]; R],
        b: usize,
        sumi: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
        // SAFETY: the caller's contract; every call below needs at most those features.
        unsafe {
            let mut sums = [_mm256_setzero_si256(); R];
            for r in 0..R {
                sums[r] = sub_block_sums(&x[r][b].bsums);
            }
            let mut summ = [_mm256_setzero_si256(); R];
            for (pair, lane) in [0, 1, 4, 5].into_iter().enumerate() {
                let mins = two_per_row(&wb.mins[2 * pair], &wb.mins[2 * pair + 1], false);
                let lane = _mm256_set1_epi32(lane);
                for r in 0..R {
                    let sums = _mm256_permutevar8x32_epi32(sums[r], lane);
                    summ[r] = _mm256_add_epi32(summ[r], _mm256_madd_epi16(mins, sums));
                }
            }
            let (d, dmin) = (scales_f32(&wb.d), scales_f32(&wb.dmin));
            for r in 0..R {
                let xd = _mm256_set1_ps(x[r][b].d);
                let sumi = _mm256_cvtepi32_ps(sumi[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd), sumi, acc[r]);
                let summ = _mm256_cvtepi32_ps(summ[r]);
                acc[r] = _mm256_fnmadd_ps(_mm256_mul_ps(dmin, xd), summ, acc[r]);
            }
        }
    }
}

/// The kernel with AVX-VNNI: `vpdpbusd` multiplies four unsigned nibbles of each row by four
/// signed activation bytes and adds them to the row's 32-bit sum in one instruction, where
/// AVX2 needs `maddubs`, an i16 addition and a `madd`.
#[cfg(target_arch = "x86_64")]
pub(super) mod vnni {
    use std::arch::x86_64::*;

    use super::super::avx2::{broadcast4, load32, store};
    use super::{BlockQ4Kx8, ROWS};
    use crate::engine::kquants::Q8KBlock;

    /// Eight bytes, one per row, as the rows' i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    fn row_lanes_u8(bytes: &[u8; ROWS]) -> __m256i {
        // SAFETY: eight bytes, the width of the load.
        _mm256_cvtepu8_epi32(unsafe { _mm_loadl_epi64(bytes.as_ptr().cast()) })
    }

    /// Eight interleaved Q4_K rows against `R` Q8_K rows, as [`super::avx2::dot`] computes
    /// them: a sub-block's 32 products sum to at most 32 × 15 × 128 = 61440 in each row's i32
    /// lane, times its scale (≤ 63) and eight sub-blocks stay far inside i32.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        w: &[BlockQ4Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; ROWS]; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            super::super::prefetch_ahead(w, b);
            let mut sumi = [_mm256_setzero_si256(); R];
            for c in 0..4 {
                let mut p_lo = [_mm256_setzero_si256(); R];
                let mut p_hi = [_mm256_setzero_si256(); R];
                for g in 0..8 {
                    let q = load32(&wb.qs, (8 * c + g) * 32);
                    let lo = _mm256_and_si256(q, m4);
                    let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                    for r in 0..R {
                        let xq = &x[r][b].qs;
                        let a_lo = broadcast4(&xq[64 * c + 4 * g..]);
                        let a_hi = broadcast4(&xq[64 * c + 32 + 4 * g..]);
                        p_lo[r] = _mm256_dpbusd_avx_epi32(p_lo[r], lo, a_lo);
                        p_hi[r] = _mm256_dpbusd_avx_epi32(p_hi[r], hi, a_hi);
                    }
                }
                let s_lo = row_lanes_u8(&wb.scales[2 * c]);
                let s_hi = row_lanes_u8(&wb.scales[2 * c + 1]);
                for r in 0..R {
                    let p = _mm256_add_epi32(
                        _mm256_mullo_epi32(p_lo[r], s_lo),
                        _mm256_mullo_epi32(p_hi[r], s_hi),
                    );
                    sumi[r] = _mm256_add_epi32(sumi[r], p);
                }
            }
            super::avx2::finish_block(wb, x, b, sumi, &mut acc);
        }
        acc.map(|v| store(v))
    }
}

/// The kernel with AVX-512 VNNI: two four-byte groups of each row in one 512-bit register.
///
/// The 64 bytes of groups `g` and `g + 1` are permuted once, so that lane `2 i` holds row
/// `i`'s bytes of group `g` and lane `2 i + 1` those of group `g + 1`; one 8-byte broadcast
/// of the activation then matches both lanes, and one `vpdpbusd` does the work of two in
/// [`vnni`]. The permutation is shared by all activation rows; the two lanes of a row are
/// added once per block. The sums are the same integers as [`vnni`]'s.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::avx2::store;
    use super::{BlockQ4Kx8, ROWS};
    use crate::engine::kquants::Q8KBlock;

    /// Eight bytes, one per row, each in the row's two i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn row_pair_lanes_u8(bytes: &[u8; ROWS]) -> __m512i {
        // SAFETY: eight bytes, the width of the load.
        let v = unsafe { _mm_loadl_epi64(bytes.as_ptr().cast()) };
        _mm512_cvtepu8_epi32(_mm_unpacklo_epi8(v, v))
    }

    /// Eight activation bytes broadcast to every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn broadcast8(values: &[i8]) -> __m512i {
        assert!(values.len() >= 8);
        // SAFETY: at least eight bytes, read unaligned.
        _mm512_set1_epi64(unsafe { values.as_ptr().cast::<i64>().read_unaligned() })
    }

    /// Sixty-four weight bytes (groups `g` and `g + 1`) from `bytes[at ..]`, each row's two
    /// groups side by side.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn load_pair(bytes: &[u8], at: usize) -> __m512i {
        let chunk = &bytes[at..at + 64];
        let order = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        // SAFETY: 64 bytes, the width of the load.
        _mm512_permutexvar_epi32(order, unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) })
    }

    /// Each row's two lanes added, as the rows' eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn fold_pairs(v: __m512i) -> __m256i {
        _mm512_cvtepi64_epi32(_mm512_add_epi32(v, _mm512_srli_epi64::<32>(v)))
    }

    /// Eight interleaved Q4_K rows against `R` Q8_K rows, as [`super::vnni::dot`] computes
    /// them (the same bounds: a row's lane pair sums what one lane sums there).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        w: &[BlockQ4Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; ROWS]; R] {
        let m4 = _mm512_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            super::super::prefetch_ahead(w, b);
            let mut sumi = [_mm512_setzero_si512(); R];
            for c in 0..4 {
                let mut p_lo = [_mm512_setzero_si512(); R];
                let mut p_hi = [_mm512_setzero_si512(); R];
                for g in (0..8).step_by(2) {
                    let q = load_pair(&wb.qs, (8 * c + g) * 32);
                    let lo = _mm512_and_si512(q, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(q), m4);
                    for r in 0..R {
                        let xq = &x[r][b].qs;
                        let a_lo = broadcast8(&xq[64 * c + 4 * g..]);
                        let a_hi = broadcast8(&xq[64 * c + 32 + 4 * g..]);
                        p_lo[r] = _mm512_dpbusd_epi32(p_lo[r], lo, a_lo);
                        p_hi[r] = _mm512_dpbusd_epi32(p_hi[r], hi, a_hi);
                    }
                }
                let s_lo = row_pair_lanes_u8(&wb.scales[2 * c]);
                let s_hi = row_pair_lanes_u8(&wb.scales[2 * c + 1]);
                // Each lane summed four `vpdpbusd`s of four products: at most 4 × 4 × 15 ×
                // 128 = 30720 in magnitude, an i16 in the lane's low half, the high half its
                // sign. A word multiply-add with the scale in the low half (the high one
                // zero) is then the exact product, added in the same instruction: where
                // `vpmulld` and an addition took 18 % of this kernel's samples at eight rows.
                for r in 0..R {
                    sumi[r] = _mm512_dpwssd_epi32(sumi[r], p_lo[r], s_lo);
                    sumi[r] = _mm512_dpwssd_epi32(sumi[r], p_hi[r], s_hi);
                }
            }
            // A loop, not `array::map`: the map was not inlined into the kernel and moved
            // the sums through memory (about 2 % of an 8-stream decode step).
            let mut folded = [_mm256_setzero_si256(); R];
            for r in 0..R {
                folded[r] = fold_pairs(sumi[r]);
            }
            // SAFETY: this kernel has AVX2, FMA and F16C.
            unsafe { super::avx2::finish_block_inlined(wb, x, b, folded, &mut acc) };
        }
        acc.map(|v| store(v))
    }
}
