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
///
/// The kernels take the groups two at a time (`g` = `8 h + 2 u'` and the next), and the
/// `ql` and `qh` bytes of such a pair lie together in one 192-byte run ([`ql_at`], [`qh_at`]):
/// a block is then read front to back, one stream. With `ql` and `qh` in two arrays the kernel
/// read two interleaved streams from each block, which the hardware prefetchers of the 2-core
/// Zen 4 class EPYC did not follow: one thread streamed Q6_K at 7 GB/s from memory without
/// software prefetches (huge pages, one activation row), against 20 GB/s for Q4_K.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6Kx8 {
    /// Each row's scale of its sub-block scales (f16 bits).
    pub(super) d: [u16; ROWS],
    /// `scales[j][i]`: row `i`'s signed scale of values `16 j .. 16 j + 16` (i8 bits).
    pub(super) scales: [[u8; ROWS]; 16],
    /// The packed bits: byte `t` of row `i` from file `ql[64 h + 32 p + 4 g + t]` at
    /// `ql_at(8 h + g) + 32 p + 4 i + t`, and from file `qh[32 h + 4 g + t]` at
    /// `qh_at(8 h + g) + 4 i + t`.
    pub(super) bits: [u8; 1536],
}

/// Where the 64 `ql` bytes of group `g` (0..16; `8 h + g` of the file's half `h`) begin in
/// [`BlockQ6Kx8::bits`]: the two parts `p` of 32 bytes, each four bytes of every row.
pub(super) const fn ql_at(g: usize) -> usize {
    (g / 2) * 192 + (g % 2) * 64
}

/// Where the 32 `qh` bytes of group `g` begin in [`BlockQ6Kx8::bits`], just after the `ql`
/// bytes of its pair.
pub(super) const fn qh_at(g: usize) -> usize {
    (g / 2) * 192 + 128 + (g % 2) * 32
}

impl BlockX8 for BlockQ6Kx8 {
    type File = BlockQ6K;

    fn interleave(rows: [&BlockQ6K; ROWS]) -> Self {
        let mut out = Self {
            d: [0; ROWS],
            scales: [[0; ROWS]; 16],
            bits: [0; 1536],
        };
        for (i, row) in rows.iter().enumerate() {
            out.d[i] = row.d;
            for (j, &scale) in row.scales.iter().enumerate() {
                out.scales[j][i] = scale as u8;
            }
            for h in 0..2 {
                for g in 0..8 {
                    for p in 0..2 {
                        let at = ql_at(8 * h + g) + 32 * p + 4 * i;
                        let from = 64 * h + 32 * p + 4 * g;
                        out.bits[at..at + 4].copy_from_slice(&row.ql[from..from + 4]);
                    }
                    let at = qh_at(8 * h + g) + 4 * i;
                    let from = 32 * h + 4 * g;
                    out.bits[at..at + 4].copy_from_slice(&row.qh[from..from + 4]);
                }
            }
        }
        out
    }

    fn dequantize_row(&self, i: usize, out: &mut [f32]) {
        let d = f16::from_bits(self.d[i]).to_f32();
        for h in 0..2 {
            for g in 0..8 {
                let a = ql_at(8 * h + g) + 4 * i;
                let b = a + 32;
                let hb = qh_at(8 * h + g) + 4 * i;
                for t in 0..4 {
                    let (qa, qb, qh) = (self.bits[a + t], self.bits[b + t], self.bits[hb + t]);
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
            // (An AVX-VNNI variant was slower here: with `vpdpbusd` the sub-block scales can
            // no longer be applied by the `madd` that sums the pairs, and the four chunks'
            // separate sums spill registers at four activation rows.)
            if super::avx512_vnni() {
                // SAFETY: checked just now; AVX2, FMA and F16C as below.
                unsafe { avx512::dot(w, x) }
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
        unsafe { super::pairs::q6k::dot(a, b, x) }
    }
}

#[cfg(target_arch = "x86_64")]
pub(super) mod avx2 {
    use std::arch::x86_64::*;

    use super::super::avx2::{
        broadcast4, broadcast4_at, load32, row_pairs_i8, scales_f32, store, sum_pair, two_per_row,
    };
    use super::{BlockQ6Kx8, ROWS, qh_at, ql_at};
    use crate::engine::kquants::Q8KBlock;

    /// The eight rows' 6-bit values `128 h + 32 c + 4 g ..` (unsigned, 0..63) from their
    /// `ql` and `qh` bytes, already in registers (at up to four activation rows).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values_held(c: usize, qla: __m256i, qlb: __m256i, qh: __m256i) -> __m256i {
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

    /// [`values_held`] for chunk `C` of group `8 h + g` of block `wb`, its `ql` and `qh` bytes
    /// read for the call (at more than four activation rows, where L1 loads are cheaper than
    /// the registers that holding them would take from the row sums).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn values<const C: usize>(wb: &BlockQ6Kx8, group: usize) -> __m256i {
        // `values_held` reads `ql` at `ql_at(group)` for chunks 0 and 2, `+ 32` for 1 and 3.
        let ql = load32(&wb.bits, ql_at(group) + 32 * (C % 2));
        values_held(C, ql, ql, load32(&wb.bits, qh_at(group)))
    }

    /// Chunk `C` of groups `8 h + 2 gp` and `8 h + 2 gp + 1` against each activation row:
    /// values `128 h + 32 C + 8 gp ..` (eight of each row), all in one 16-value sub-block.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn chunk<const C: usize, const R: usize>(
        wb: &BlockQ6Kx8,
        h: usize,
        gp: usize,
        x: &[&[i8; 256]; R],
        sumi: &mut [__m256i; R],
    ) {
        let g0 = 8 * h + 2 * gp;
        let (w0, w1) = (values::<C>(wb, g0), values::<C>(wb, g0 + 1));
        let s = row_pairs_i8(&wb.scales[8 * h + 2 * C + gp / 2]);
        let at = 128 * h + 32 * C + 8 * gp;
        for (sum, xq) in sumi.iter_mut().zip(x) {
            // SAFETY: `at + 8 <= 128 + 96 + 24 + 8 = 256`.
            let (x0, x1) = unsafe { (broadcast4_at(xq, at), broadcast4_at(xq, at + 4)) };
            let p = _mm256_add_epi16(_mm256_maddubs_epi16(w0, x0), _mm256_maddubs_epi16(w1, x1));
            *sum = _mm256_add_epi32(*sum, _mm256_madd_epi16(p, s));
        }
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
            super::super::prefetch_ahead(w, b);
            let mut sumi = [_mm256_setzero_si256(); R];
            if R > 4 {
                // Eight rows' sums take eight registers: the packed bytes are read again for
                // each chunk instead of held (held, the compiler spilled them and dispatched
                // on the chunk at run time: 33.7-35.6 against 29.0-30.4 ns a block and row).
                let xq: [&[i8; 256]; R] = std::array::from_fn(|r| &x[r][b].qs);
                for h in 0..2 {
                    for gp in 0..4 {
                        chunk::<0, R>(wb, h, gp, &xq, &mut sumi);
                        chunk::<1, R>(wb, h, gp, &xq, &mut sumi);
                        chunk::<2, R>(wb, h, gp, &xq, &mut sumi);
                        chunk::<3, R>(wb, h, gp, &xq, &mut sumi);
                    }
                }
            } else {
                // Up to four rows the packed bytes of two groups stay in registers.
                for h in 0..2 {
                    for gp in 0..4 {
                        let (g0, g1) = (8 * h + 2 * gp, 8 * h + 2 * gp + 1);
                        let (a0, a1) = (ql_at(g0), ql_at(g1));
                        let (qla0, qlb0) = (load32(&wb.bits, a0), load32(&wb.bits, a0 + 32));
                        let (qla1, qlb1) = (load32(&wb.bits, a1), load32(&wb.bits, a1 + 32));
                        let (qh0, qh1) = (load32(&wb.bits, qh_at(g0)), load32(&wb.bits, qh_at(g1)));
                        for c in 0..4 {
                            let w0 = values_held(c, qla0, qlb0, qh0);
                            let w1 = values_held(c, qla1, qlb1, qh1);
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
            }
            finish_block(wb, x, b, sumi, &mut acc);
        }
        acc.map(|v| store(v))
    }

    /// Adds block `b`'s share to each row's result: the integer sums `sumi` less the offset
    /// of 32 (32 × Σ_j scale_ij × the sum of the activation's 16 values j), times the row's
    /// and the activation's scales (the AVX2 kernel's; [`super::avx512`] has its own).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn finish_block<const R: usize>(
        wb: &BlockQ6Kx8,
        x: [&[Q8KBlock]; R],
        b: usize,
        sumi: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
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
}

/// The kernel with AVX-512 (BW for the byte and word operations): two four-byte groups of
/// each row in one 512-bit register, as in [`super::q4k::avx512`].
///
/// The groups `g` and `g + 1` of a half are permuted once per block, so that 64-bit lane `i`
/// holds row `i`'s four bytes of each; one 8-byte broadcast of the activation matches both,
/// and one `maddubs` and one `madd` do the work of two `maddubs`, an addition and a `madd`
/// in [`avx2`]. Both groups lie in the same 16-value sub-block, so a row's four i16 lanes
/// take the same scale. The i32 sums are [`avx2`]'s, split over two lanes a row, added once
/// per block.
#[cfg(target_arch = "x86_64")]
pub(super) mod avx512 {
    use std::arch::x86_64::*;

    use super::super::avx2::{scales_f32, store};
    use super::{BlockQ6Kx8, ROWS, qh_at, ql_at};
    use crate::engine::kquants::Q8KBlock;

    /// `vpermw` indices that turn the sign-extended scales of four sub-blocks `4 q ..
    /// 4 q + 4` (16-bit word `8 j + i`: row `i`'s scale of sub-block `4 q + j`) into 32-bit
    /// lane `8 p + i` = row `i`'s scales of sub-blocks `4 q + 2 p` and `4 q + 2 p + 1`.
    const SCALE_PAIRS: [i16; 32] = {
        let mut idx = [0i16; 32];
        let mut k = 0;
        while k < 32 {
            let (lane, half) = (k / 2, k % 2);
            let (p, i) = (lane / 8, lane % 8);
            idx[k] = ((2 * p + half) * 8 + i) as i16;
            k += 1;
        }
        idx
    };

    /// Adds block `b`'s share to each row's result, as [`super::avx2::finish_block`] does,
    /// with the offset of 32 formed in 512-bit registers: per activation row four `vpdpwssd`
    /// of four sub-blocks' scales (all eight rows) against the activation's matching sums,
    /// where the AVX2 form takes eight `madd`s and eight additions.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn finish_block<const R: usize>(
        wb: &BlockQ6Kx8,
        x: [&[Q8KBlock]; R],
        b: usize,
        sumi: [__m256i; R],
        acc: &mut [__m256; R],
    ) {
        // SAFETY: 32 i16, the width of the load.
        let pairs = unsafe { _mm512_loadu_si512(SCALE_PAIRS.as_ptr().cast()) };
        let scales: [__m512i; 4] = std::array::from_fn(|q| {
            // SAFETY: `scales[4 q .. 4 q + 4]` are 32 contiguous bytes of the block.
            let bytes = unsafe { _mm256_loadu_si256(wb.scales[4 * q].as_ptr().cast()) };
            _mm512_permutexvar_epi16(pairs, _mm512_cvtepi8_epi16(bytes))
        });
        let d = scales_f32(&wb.d);
        for r in 0..R {
            // SAFETY: sixteen i16, the width of the load.
            let sums = unsafe { _mm256_loadu_si256(x[r][b].bsums.as_ptr().cast()) };
            let sums = _mm512_castsi256_si512(sums);
            let mut offset = _mm512_setzero_si512();
            for (q, scales) in scales.iter().enumerate() {
                // 32-bit lane 8 p + i: the activation's sums of sub-blocks 4 q + 2 p, + 1.
                let lane = _mm512_add_epi32(
                    _mm512_set1_epi32(2 * q as i32),
                    _mm512_srli_epi32::<3>(_mm512_setr_epi32(
                        0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                    )),
                );
                let matching = _mm512_permutexvar_epi32(lane, sums);
                offset = _mm512_dpwssd_epi32(offset, *scales, matching);
            }
            let offset = _mm256_add_epi32(
                _mm512_castsi512_si256(offset),
                _mm512_extracti64x4_epi64::<1>(offset),
            );
            let sum = _mm256_sub_epi32(sumi[r], _mm256_slli_epi32::<5>(offset));
            let xd = _mm256_set1_ps(x[r][b].d);
            acc[r] = _mm256_fmadd_ps(_mm256_mul_ps(d, xd), _mm256_cvtepi32_ps(sum), acc[r]);
        }
    }

    /// The eight rows' 6-bit values (unsigned, 0..63) of chunk `c`, as [`super::avx2`]'s.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn values(c: usize, qla: __m512i, qlb: __m512i, qh: __m512i) -> __m512i {
        let m4 = _mm512_set1_epi8(0x0F);
        let m30 = _mm512_set1_epi8(0x30);
        let (low, high) = match c {
            0 => (qla, _mm512_slli_epi16::<4>(qh)),
            1 => (qlb, _mm512_slli_epi16::<2>(qh)),
            2 => (_mm512_srli_epi16::<4>(qla), qh),
            _ => (_mm512_srli_epi16::<4>(qlb), _mm512_srli_epi16::<2>(qh)),
        };
        _mm512_or_si512(_mm512_and_si512(low, m4), _mm512_and_si512(high, m30))
    }

    /// 64 bytes from `bytes[at ..]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn load64(bytes: &[u8], at: usize) -> __m512i {
        let chunk = &bytes[at..at + 64];
        // SAFETY: 64 bytes, the width of the load.
        unsafe { _mm512_loadu_si512(chunk.as_ptr().cast()) }
    }

    /// Eight signed scales, one per row, each in the row's four i16 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn row_quads_i8(bytes: &[u8; ROWS]) -> __m512i {
        // SAFETY: eight bytes, the width of the load.
        let v = _mm_cvtepi8_epi16(unsafe { _mm_loadl_epi64(bytes.as_ptr().cast()) });
        let order = _mm512_set_epi16(
            7, 7, 7, 7, 6, 6, 6, 6, 5, 5, 5, 5, 4, 4, 4, 4, 3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0,
            0, 0, 0,
        );
        _mm512_permutexvar_epi16(order, _mm512_castsi128_si512(v))
    }

    /// Eight activation bytes broadcast to every 64-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn broadcast8(values: &[i8]) -> __m512i {
        assert!(values.len() >= 8);
        // SAFETY: at least eight bytes, read unaligned.
        _mm512_set1_epi64(unsafe { values.as_ptr().cast::<i64>().read_unaligned() })
    }

    /// Each row's two lanes added, as the rows' eight i32 lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    fn fold_pairs(v: __m512i) -> __m256i {
        _mm512_cvtepi64_epi32(_mm512_add_epi32(v, _mm512_srli_epi64::<32>(v)))
    }

    /// Eight interleaved Q6_K rows against `R` Q8_K rows, as [`super::avx2::dot`] computes
    /// them (the same bounds: a row's lane pair sums what one lane sums there).
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI.
    #[target_feature(enable = "avx2,fma,f16c,avx512f,avx512vl,avx512bw,avx512vnni")]
    pub(in crate::engine::kquants_x8) unsafe fn dot<const R: usize>(
        w: &[BlockQ6Kx8],
        x: [&[Q8KBlock]; R],
    ) -> [[f32; ROWS]; R] {
        // Lane 2 i: row i's dword of the first source; lane 2 i + 1: of the second.
        let first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        let second =
            _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        let pair = _mm512_setr_epi32(0, 8, 1, 9, 2, 10, 3, 11, 4, 12, 5, 13, 6, 14, 7, 15);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            super::super::prefetch_ahead(w, b);
            let mut sumi = [_mm512_setzero_si512(); R];
            for h in 0..2 {
                for gp in 0..4 {
                    let (g0, g1) = (8 * h + 2 * gp, 8 * h + 2 * gp + 1);
                    // [g0 p0, g0 p1] and [g1 p0, g1 p1], 32 bytes each.
                    let (z0, z1) = (load64(&wb.bits, ql_at(g0)), load64(&wb.bits, ql_at(g1)));
                    let qla = _mm512_permutex2var_epi32(z0, first, z1);
                    let qlb = _mm512_permutex2var_epi32(z0, second, z1);
                    // The qh bytes of g0 and g1, 32 each, side by side.
                    let qh = _mm512_permutexvar_epi32(pair, load64(&wb.bits, qh_at(g0)));
                    for c in 0..4 {
                        let wv = values(c, qla, qlb, qh);
                        let s = row_quads_i8(&wb.scales[8 * h + 2 * c + gp / 2]);
                        let at = 128 * h + 32 * c + 8 * gp;
                        for r in 0..R {
                            let a = broadcast8(&x[r][b].qs[at..]);
                            let p = _mm512_maddubs_epi16(wv, a);
                            sumi[r] = _mm512_dpwssd_epi32(sumi[r], p, s);
                        }
                    }
                }
            }
            // A loop, not `array::map`: the map was not inlined into the kernel and moved
            // the sums through memory (about 2 % of an 8-stream decode step).
            let mut folded = [_mm256_setzero_si256(); R];
            for r in 0..R {
                folded[r] = fold_pairs(sumi[r]);
            }
            finish_block(wb, x, b, folded, &mut acc);
        }
        acc.map(|v| store(v))
    }
}
