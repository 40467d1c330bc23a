//! Q4_K and Q6_K matrices (the K-quants of a Q4_K_M file) multiplied by the engine's own AVX2
//! kernels, in the file's own block layout: one copy of the weights.
//!
//! candle keeps a K-quant tensor's blocks and, at its first multiplication on an x86 CPU, adds
//! a repacked copy for its kernels (1.33× the blocks for Q4_K, 1.52× for Q6_K), so a Q4_K_M
//! model was held about 2.4 times; its barrier pool also spin-waits at the end of every matrix
//! product (docs/benchmarks/engine-vs-llama-cpp.md). Here the blocks are kept exactly as the
//! GGUF file stores them, and the products run on rayon's pool like the Q8_0 kernels.
//!
//! The arithmetic is ggml's and candle's: the activations are quantized to Q8_K blocks (256
//! values, an f32 scale `max / -127` and the sums of every 16 values); a block's products are
//! summed in integers with the weight's 6- or 8-bit sub-block scales, then scaled in f32. Q4_K's
//! minimums are subtracted through the activation's 16-value sums. Only the order of the f32
//! additions differs.
//!
//! Matrices whose rows are a multiple of eight (every matrix of a Llama model) are regrouped
//! into interleaved blocks of eight rows instead ([`super::kquants_x8`]), with faster kernels;
//! this module keeps the file's layout for the others, and provides the activation blocks and
//! the file's block types both use. Machines without AVX2, FMA and F16C keep candle's kernels
//! ([`KMatrix::from_qtensor`] returns `None` there).

#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::cpu_features::with_avx2;
use super::cpu_pool::for_each_row;
use super::error::{EngineError, Result};
use super::grouped_matmul::{self, GroupKernel};
use super::matrix_shape::MatrixShape;
use super::out_columns::OutColumns;
use super::q8_0::supported;

/// Values per K-quant super-block.
pub(super) const QK_K: usize = 256;

/// One 256-value Q4_K block, as GGUF stores it (144 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ4K {
    /// Scale of the sub-block scales (f16 bits).
    pub(super) d: u16,
    /// Scale of the sub-block minimums (f16 bits).
    pub(super) dmin: u16,
    /// Eight 6-bit scales and eight 6-bit minimums, packed.
    pub(super) scales: [u8; 12],
    /// 4-bit values: bytes `32 j ..` hold values `64 j ..` (low nibbles) and `64 j + 32 ..`
    /// (high nibbles).
    pub(super) qs: [u8; 128],
}

/// One 256-value Q6_K block, as GGUF stores it (210 bytes).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BlockQ6K {
    /// Low 4 bits of the values.
    pub(super) ql: [u8; 128],
    /// High 2 bits of the values.
    pub(super) qh: [u8; 64],
    /// One signed scale per 16 values.
    pub(super) scales: [i8; 16],
    /// Scale of the scales (f16 bits).
    pub(super) d: u16,
}

/// One 256-value block of a quantized activation row (opaque outside this module).
#[derive(Clone, Copy)]
pub struct Q8KBlock {
    /// The scale: value `i` is `d × qs[i]`.
    pub(super) d: f32,
    pub(super) qs: [i8; QK_K],
    /// Sums of every 16 values of `qs`.
    pub(super) bsums: [i16; QK_K / 16],
}

impl Q8KBlock {
    /// The dot product of the block's values with `values` (256 of them), in f32: the
    /// kernels' reference.
    #[cfg_attr(target_arch = "x86_64", allow(dead_code))]
    pub(super) fn dot_f32(&self, values: &[f32]) -> f32 {
        let dot: f32 = values
            .iter()
            .zip(&self.qs)
            .map(|(&v, &q)| v * f32::from(q))
            .sum();
        dot * self.d
    }
}

/// A K-quant block type the kernels multiply.
pub trait KBlock: Copy + Send + Sync + 'static {
    /// The GGUF type.
    const DTYPE: GgmlDType;
    /// Bytes of one block in a GGUF file.
    const BYTES: usize;
    /// Reads one block from its GGUF bytes (`BYTES` of them).
    fn parse(bytes: &[u8]) -> Self;
    /// The block's 256 values.
    fn dequantize(&self, out: &mut [f32]);
    /// One weight row against `R` activation rows.
    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [f32; R];
}

fn f16_bits(bytes: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([bytes[at], bytes[at + 1]])
}

/// The 6-bit scale and minimum of Q4_K sub-block `j` (ggml's `get_scale_min_k4`).
pub(super) fn q4k_scale_min(j: usize, q: &[u8; 12]) -> (u8, u8) {
    if j < 4 {
        (q[j] & 63, q[j + 4] & 63)
    } else {
        (
            (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4),
        )
    }
}

/// All eight 6-bit scales (bytes 0..8) and minimums (bytes 8..16) of a Q4_K block at once,
/// by ggml's word shuffle: the same values as [`q4k_scale_min`].
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
fn q4k_scales_and_mins(q: &[u8; 12]) -> [u32; 4] {
    const KMASK1: u32 = 0x3f3f_3f3f;
    const KMASK2: u32 = 0x0f0f_0f0f;
    const KMASK3: u32 = 0x0303_0303;
    let word = |i: usize| u32::from_le_bytes([q[4 * i], q[4 * i + 1], q[4 * i + 2], q[4 * i + 3]]);
    let (u0, u1, u2) = (word(0), word(1), word(2));
    [
        u0 & KMASK1,
        (u2 & KMASK2) | (((u0 >> 6) & KMASK3) << 4),
        u1 & KMASK1,
        ((u2 >> 4) & KMASK2) | (((u1 >> 6) & KMASK3) << 4),
    ]
}

impl KBlock for BlockQ4K {
    const DTYPE: GgmlDType = GgmlDType::Q4K;
    const BYTES: usize = 144;

    fn parse(b: &[u8]) -> Self {
        let mut block = Self {
            d: f16_bits(b, 0),
            dmin: f16_bits(b, 2),
            scales: [0; 12],
            qs: [0; 128],
        };
        block.scales.copy_from_slice(&b[4..16]);
        block.qs.copy_from_slice(&b[16..144]);
        block
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = f16::from_bits(self.d).to_f32();
        let dmin = f16::from_bits(self.dmin).to_f32();
        for j in 0..4 {
            let (s1, m1) = q4k_scale_min(2 * j, &self.scales);
            let (s2, m2) = q4k_scale_min(2 * j + 1, &self.scales);
            let (d1, m1) = (d * f32::from(s1), dmin * f32::from(m1));
            let (d2, m2) = (d * f32::from(s2), dmin * f32::from(m2));
            for l in 0..32 {
                let q = self.qs[32 * j + l];
                out[64 * j + l] = d1 * f32::from(q & 0xF) - m1;
                out[64 * j + 32 + l] = d2 * f32::from(q >> 4) - m2;
            }
        }
    }

    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: a `KMatrix` exists only where `supported()` found AVX2, FMA and F16C.
            unsafe { avx2::q4k_dot(w, x) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            scalar_dot(w, x)
        }
    }
}

impl KBlock for BlockQ6K {
    const DTYPE: GgmlDType = GgmlDType::Q6K;
    const BYTES: usize = 210;

    fn parse(b: &[u8]) -> Self {
        let mut block = Self {
            ql: [0; 128],
            qh: [0; 64],
            scales: [0; 16],
            d: f16_bits(b, 208),
        };
        block.ql.copy_from_slice(&b[..128]);
        block.qh.copy_from_slice(&b[128..192]);
        for (s, &byte) in block.scales.iter_mut().zip(&b[192..208]) {
            *s = byte as i8;
        }
        block
    }

    fn dequantize(&self, out: &mut [f32]) {
        let d = f16::from_bits(self.d).to_f32();
        for half in 0..2 {
            let (ql, qh) = (&self.ql[64 * half..], &self.qh[32 * half..]);
            let sc = &self.scales[8 * half..];
            let y = &mut out[128 * half..];
            for l in 0..32 {
                let is = l / 16;
                let q1 = ((ql[l] & 0xF) | ((qh[l] & 3) << 4)) as i8 - 32;
                let q2 = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) as i8 - 32;
                let q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) as i8 - 32;
                let q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) as i8 - 32;
                y[l] = d * f32::from(sc[is]) * f32::from(q1);
                y[l + 32] = d * f32::from(sc[is + 2]) * f32::from(q2);
                y[l + 64] = d * f32::from(sc[is + 4]) * f32::from(q3);
                y[l + 96] = d * f32::from(sc[is + 6]) * f32::from(q4);
            }
        }
    }

    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [f32; R] {
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: as for Q4_K.
            unsafe { avx2::q6k_dot(w, x) }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            scalar_dot(w, x)
        }
    }
}

/// The reference the kernels are tested against (and the path off x86-64): the weight row
/// expanded to f32 and multiplied by the expanded activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn scalar_dot<B: KBlock, const R: usize>(w: &[B], x: [&[Q8KBlock]; R]) -> [f32; R] {
    let mut out = [0f32; R];
    let mut values = [0f32; QK_K];
    for (b, block) in w.iter().enumerate() {
        block.dequantize(&mut values);
        for (r, sum) in out.iter_mut().enumerate() {
            *sum += x[r][b].dot_f32(&values);
        }
    }
    out
}

/// A `[rows, cols]` K-quant weight matrix: the file's blocks, row after row.
pub struct KMatrix<B: KBlock> {
    shape: MatrixShape,
    blocks: Vec<B>,
}

impl<B: KBlock> std::fmt::Debug for KMatrix<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KMatrix")
            .field("type", &B::DTYPE)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<B: KBlock> KMatrix<B> {
    /// Copies a 2-D tensor of this block type on the CPU; `None` when it is another type,
    /// lives on another device, or this CPU lacks the kernels' instructions.
    pub fn from_qtensor(tensor: &QTensor) -> Result<Option<Self>> {
        if tensor.dtype() != B::DTYPE || !tensor.device().is_cpu() || !supported() {
            return Ok(None);
        }
        let (rows, cols) = tensor.shape().dims2()?;
        if !cols.is_multiple_of(QK_K) {
            return Ok(None);
        }
        let data = tensor.data()?;
        Self::from_gguf_bytes(rows, cols, &data).map(Some)
    }

    /// Builds the matrix from blocks as GGUF stores them, row after row.
    fn from_gguf_bytes(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let expected = rows * (cols / QK_K) * B::BYTES;
        if !cols.is_multiple_of(QK_K) || data.len() != expected {
            return Err(EngineError::InvalidInput(format!(
                "a [{rows}, {cols}] {:?} matrix needs {expected} bytes, got {}",
                B::DTYPE,
                data.len()
            )));
        }
        let blocks = data.chunks_exact(B::BYTES).map(B::parse).collect();
        let shape = MatrixShape { rows, cols };
        Ok(Self { shape, blocks })
    }

    /// Output features (rows of the weight).
    pub fn rows(&self) -> usize {
        self.shape.rows
    }

    /// Input features (columns of the weight).
    pub fn cols(&self) -> usize {
        self.shape.cols
    }

    /// Bytes the weights occupy.
    pub fn bytes(&self) -> u64 {
        (self.blocks.len() * std::mem::size_of::<B>()) as u64
    }

    /// Rows `ids` expanded to f32, `[ids.len() * cols]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let per_row = self.shape.cols / QK_K;
        self.shape.expand_rows(ids, |row, dst| {
            let blocks = &self.blocks[row * per_row..(row + 1) * per_row];
            for (block, values) in blocks.iter().zip(dst.chunks_exact_mut(QK_K)) {
                block.dequantize(values);
            }
        })
    }

    /// `x Wᵀ` for `x` holding `m` rows of `cols` values: `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        grouped_matmul::matmul(self, x, m)
    }
}

/// One weight row a group, each against four activation rows at a time.
impl<B: KBlock> GroupKernel for KMatrix<B> {
    const GROUP: usize = 1;

    fn shape(&self) -> MatrixShape {
        self.shape
    }

    fn run<const R: usize>(&self, row: usize, first: usize, x: [&[Q8KBlock]; R], dst: OutColumns) {
        let per_row = self.shape.cols / QK_K;
        let w = &self.blocks[row * per_row..(row + 1) * per_row];
        write_rows::<R>(dst, first, row, B::dot(w, x));
    }
}

/// Writes column `col` of output rows `row ..= row + R - 1`.
fn write_rows<const R: usize>(dst: OutColumns, row: usize, col: usize, values: [f32; R]) {
    for (i, value) in values.into_iter().enumerate() {
        dst.set(row + i, col, value);
    }
}

/// `v` rounded to the nearest integer, ties to even, for |v| < 2²²: ggml's `nearest_int`.
/// Adding 1.5 × 2²³ leaves the rounded value in the low mantissa bits. It is a few plain
/// instructions (the loops that call it vectorize), where `f32::round` is a call into libm per
/// value: 1.6 % of a 512-token prefill's samples went to `roundf`.
#[inline]
pub(super) fn nearest_int(v: f32) -> i32 {
    let shifted = v + 12_582_912.0;
    (shifted.to_bits() & 0x007F_FFFF) as i32 - 0x0040_0000
}

/// Quantizes rows of `k` values to Q8_K blocks, as ggml and candle do.
pub(super) fn quantize_rows(x: &[f32], k: usize) -> Vec<Q8KBlock> {
    let per_row = k / QK_K;
    let empty = Q8KBlock {
        d: 0.0,
        qs: [0; QK_K],
        bsums: [0; QK_K / 16],
    };
    let mut out = vec![empty; x.len() / QK_K];
    for_each_row(x, k, &mut out, per_row, quantize_row);
    out
}

/// Quantizes one row's blocks, compiled for AVX2 where the CPU has it: in the 2-core Xeon's
/// 8-stream decode step the portable build of this loop (SSE2, and a search for the largest
/// magnitude that did not vectorize) was 2.4 % of the samples, all of it on the thread that
/// the matrix products wait for.
fn quantize_row(values: &[f32], blocks: &mut [Q8KBlock]) {
    with_avx2(
        #[inline(always)]
        || quantize_row_portable(values, blocks),
    );
}

#[inline(always)]
fn quantize_row_portable(values: &[f32], blocks: &mut [Q8KBlock]) {
    const LANES: usize = 16;
    for (chunk, block) in values.chunks_exact(QK_K).zip(blocks) {
        let (mut amax, mut high, mut low) = ([0f32; LANES], [0f32; LANES], [0f32; LANES]);
        for lane in chunk.chunks_exact(LANES) {
            for i in 0..LANES {
                amax[i] = amax[i].max(lane[i].abs());
                high[i] = high[i].max(lane[i]);
                low[i] = low[i].min(lane[i]);
            }
        }
        let amax = amax.into_iter().fold(0f32, f32::max);
        if amax == 0.0 {
            *block = Q8KBlock {
                d: 0.0,
                qs: [0; QK_K],
                bsums: [0; QK_K / 16],
            };
            continue;
        }
        // ggml scales by the first value of largest magnitude, sign included: when both
        // signs reach it, which comes first decides.
        let has_high = high.into_iter().fold(0f32, f32::max) == amax;
        let has_low = low.into_iter().fold(0f32, f32::min) == -amax;
        let max = match (has_high, has_low) {
            (true, false) => amax,
            (false, true) => -amax,
            _ => chunk
                .iter()
                .copied()
                .find(|v| v.abs() == amax)
                .unwrap_or(amax),
        };
        let iscale = -127.0 / max;
        for (q, v) in block.qs.iter_mut().zip(chunk) {
            *q = nearest_int(iscale * v).clamp(-128, 127) as i8;
        }
        for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            let mut total = 0i16;
            for &q in group {
                total += i16::from(q);
            }
            *sum = total;
        }
        block.d = 1.0 / iscale;
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::f16;

    use super::{BlockQ4K, BlockQ6K, Q8KBlock, q4k_scales_and_mins};
    use crate::engine::cpu_lanes::lane_sum;

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load(bytes: &[u8]) -> __m256i {
        assert!(bytes.len() >= 32);
        // SAFETY: at least 32 bytes, the width of the unaligned load.
        unsafe { _mm256_loadu_si256(bytes.as_ptr().cast()) }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn load_i8(values: &[i8]) -> __m256i {
        assert!(values.len() >= 32);
        // SAFETY: as in `load`.
        unsafe { _mm256_loadu_si256(values.as_ptr().cast()) }
    }

    /// One Q4_K row against `R` Q8_K rows. Per 32 values: `maddubs` multiplies the unsigned
    /// nibbles by the signed activations (a pair sums to at most 2 × 15 × 128, no i16
    /// saturation), `madd` with the sub-block scale (≤ 63) sums to i32.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q4k_dot<const R: usize>(w: &[BlockQ4K], x: [&[Q8KBlock]; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let mut acc = [_mm256_setzero_ps(); R];
        let mut acc_min = [_mm_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            let packed = q4k_scales_and_mins(&wb.scales);
            // SAFETY: `packed` is 16 bytes, the width of the load.
            let bytes = unsafe { _mm_loadu_si128(packed.as_ptr().cast()) };
            // Scales in the low 8 lanes, minimums in the high 8, as i16.
            let scales_mins = _mm256_cvtepu8_epi16(bytes);
            let scales = _mm256_broadcastsi128_si256(_mm256_castsi256_si128(scales_mins));
            let mins = _mm256_extracti128_si256::<1>(scales_mins);
            let mut sumi = [_mm256_setzero_si256(); R];
            for j in 0..4 {
                let q = load(&wb.qs[32 * j..]);
                let lo = _mm256_and_si256(q, m4);
                let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(q), m4);
                // Scale 2j (and 2j + 1) in every i16 lane: a byte shuffle picking its two bytes.
                let pick = |k: usize| _mm256_set1_epi16((((2 * k + 1) << 8) | (2 * k)) as i16);
                let s_lo = _mm256_shuffle_epi8(scales, pick(2 * j));
                let s_hi = _mm256_shuffle_epi8(scales, pick(2 * j + 1));
                for r in 0..R {
                    let xq = &x[r][b].qs;
                    let p_lo = _mm256_maddubs_epi16(lo, load_i8(&xq[64 * j..]));
                    let p_hi = _mm256_maddubs_epi16(hi, load_i8(&xq[64 * j + 32..]));
                    let p = _mm256_add_epi32(
                        _mm256_madd_epi16(p_lo, s_lo),
                        _mm256_madd_epi16(p_hi, s_hi),
                    );
                    sumi[r] = _mm256_add_epi32(sumi[r], p);
                }
            }
            let d = f16::from_bits(wb.d).to_f32();
            let dmin = f16::from_bits(wb.dmin).to_f32();
            for r in 0..R {
                let xb = &x[r][b];
                acc[r] = _mm256_fmadd_ps(
                    _mm256_set1_ps(d * xb.d),
                    _mm256_cvtepi32_ps(sumi[r]),
                    acc[r],
                );
                // Sub-block j's activation sum is bsums[2j] + bsums[2j + 1].
                // SAFETY: `bsums` is 16 i16, the width of the load.
                let bsums = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr().cast()) };
                let pairs = _mm_hadd_epi16(
                    _mm256_castsi256_si128(bsums),
                    _mm256_extracti128_si256::<1>(bsums),
                );
                let prod = _mm_madd_epi16(mins, pairs);
                acc_min[r] =
                    _mm_fmadd_ps(_mm_set1_ps(dmin * xb.d), _mm_cvtepi32_ps(prod), acc_min[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            let m = acc_min[r];
            let m = _mm_add_ps(m, _mm_movehl_ps(m, m));
            let m = _mm_cvtss_f32(_mm_add_ss(m, _mm_movehdup_ps(m)));
            out[r] = lane_sum(acc[r]) - m;
        }
        out
    }

    /// One Q6_K row against `R` Q8_K rows. The 6-bit values are taken unsigned (0..63;
    /// `maddubs` pairs sum to at most 2 × 63 × 128, no saturation) and the offset of 32 is
    /// removed through the activation's 16-value sums.
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn q6k_dot<const R: usize>(w: &[BlockQ6K], x: [&[Q8KBlock]; R]) -> [f32; R] {
        let m4 = _mm256_set1_epi8(0x0F);
        let m2 = _mm256_set1_epi8(0x03);
        let mut acc = [_mm256_setzero_ps(); R];
        for (b, wb) in w.iter().enumerate() {
            let mut sumi = [_mm256_setzero_si256(); R];
            for half in 0..2 {
                let ql0 = load(&wb.ql[64 * half..]);
                let ql1 = load(&wb.ql[64 * half + 32..]);
                let qh = load(&wb.qh[32 * half..]);
                let h0 = _mm256_slli_epi16::<4>(_mm256_and_si256(qh, m2));
                let h1 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<2>(qh), m2));
                let h2 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<4>(qh), m2));
                let h3 = _mm256_slli_epi16::<4>(_mm256_and_si256(_mm256_srli_epi16::<6>(qh), m2));
                let q = [
                    _mm256_or_si256(_mm256_and_si256(ql0, m4), h0),
                    _mm256_or_si256(_mm256_and_si256(ql1, m4), h1),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql0), m4), h2),
                    _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16::<4>(ql1), m4), h3),
                ];
                for (c, &qc) in q.iter().enumerate() {
                    let g = 8 * half + 2 * c;
                    let (s0, s1) = (i16::from(wb.scales[g]), i16::from(wb.scales[g + 1]));
                    let s = _mm256_set_m128i(_mm_set1_epi16(s1), _mm_set1_epi16(s0));
                    for r in 0..R {
                        let xq = load_i8(&x[r][b].qs[128 * half + 32 * c..]);
                        let p = _mm256_madd_epi16(_mm256_maddubs_epi16(qc, xq), s);
                        sumi[r] = _mm256_add_epi32(sumi[r], p);
                    }
                }
            }
            let d = f16::from_bits(wb.d).to_f32();
            // SAFETY: `scales` is 16 bytes, the width of the load.
            let scales =
                _mm256_cvtepi8_epi16(unsafe { _mm_loadu_si128(wb.scales.as_ptr().cast()) });
            for r in 0..R {
                let xb = &x[r][b];
                // The offset of 32: 32 × Σ scale × (sum of the activation's 16 values).
                // SAFETY: `bsums` is 16 i16, the width of the load.
                let bsums = unsafe { _mm256_loadu_si256(xb.bsums.as_ptr().cast()) };
                let offset = _mm256_slli_epi32::<5>(_mm256_madd_epi16(scales, bsums));
                let sum = _mm256_sub_epi32(sumi[r], offset);
                acc[r] = _mm256_fmadd_ps(_mm256_set1_ps(d * xb.d), _mm256_cvtepi32_ps(sum), acc[r]);
            }
        }
        let mut out = [0f32; R];
        for r in 0..R {
            out[r] = lane_sum(acc[r]);
        }
        out
    }
}

/// A Q4_K matrix.
pub type Q4KMatrix = KMatrix<BlockQ4K>;
/// A Q6_K matrix.
pub type Q6KMatrix = KMatrix<BlockQ6K>;

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    use super::*;

    #[test]
    fn nearest_int_rounds_ties_to_even_like_round_ties_even() {
        for (v, expected) in [
            (-2.5, -2),
            (-1.5, -2),
            (0.5, 0),
            (1.5, 2),
            (2.5, 2),
            (-0.2, 0),
        ] {
            assert_eq!(nearest_int(v), expected, "{v}");
        }
        // The whole range the quantizers feed it, in steps that hit ties and near-ties.
        for i in -520..=520 {
            for v in [
                i as f32 * 0.25,
                i as f32 * 0.25 + 0.01,
                i as f32 * 0.25 - 0.01,
            ] {
                assert_eq!(nearest_int(v), v.round_ties_even() as i32, "{v}");
            }
        }
    }

    /// ggml's quantization of one Q8_K block, value by value.
    fn reference_block(chunk: &[f32]) -> Q8KBlock {
        let mut block = Q8KBlock {
            d: 0.0,
            qs: [0; QK_K],
            bsums: [0; QK_K / 16],
        };
        let (mut max, mut amax) = (0f32, 0f32);
        for &v in chunk {
            if amax < v.abs() {
                amax = v.abs();
                max = v;
            }
        }
        if amax == 0.0 {
            return block;
        }
        let iscale = -127.0 / max;
        for (q, v) in block.qs.iter_mut().zip(chunk) {
            *q = (iscale * v).round_ties_even().clamp(-128.0, 127.0) as i8;
        }
        for (sum, group) in block.bsums.iter_mut().zip(block.qs.chunks_exact(16)) {
            *sum = group.iter().map(|&q| i16::from(q)).sum();
        }
        block.d = 1.0 / iscale;
        block
    }

    #[test]
    fn quantized_rows_match_ggml_value_by_value() {
        let k = 2 * QK_K;
        let mut rows = Vec::new();
        // Ordinary values, and one row per corner case: all zeros; both signs reaching the
        // largest magnitude (the first decides the scale's sign), in either order; a NaN and
        // an infinity among ordinary values; values that round to ties.
        rows.push(values(k, 3));
        rows.push(vec![0.0; k]);
        let mut both = values(k, 5);
        both[7] = -9.0;
        both[300] = 9.0;
        both[40] = 9.0;
        both[260] = -9.0;
        rows.push(both);
        let mut odd = values(k, 9);
        odd[3] = f32::NAN;
        odd[256 + 5] = f32::INFINITY;
        rows.push(odd);
        rows.push((0..k).map(|i| (i % 255) as f32 - 127.0).collect());
        rows.push((0..k).map(|i| -((i % 7) as f32) * 0.5).collect());
        let x: Vec<f32> = rows.concat();
        let got = quantize_rows(&x, k);
        assert_eq!(got.len(), x.len() / QK_K);
        for (b, (block, chunk)) in got.iter().zip(x.chunks_exact(QK_K)).enumerate() {
            let want = reference_block(chunk);
            assert_eq!(block.qs, want.qs, "block {b}");
            assert_eq!(block.bsums, want.bsums, "block {b}");
            assert_eq!(block.d.to_bits(), want.d.to_bits(), "block {b}");
        }
    }

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001;
                (h as f32 - 1000.0) / 700.0
            })
            .collect()
    }

    fn matches_candle<B: KBlock>() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // 9 rows, 512 columns: two blocks a row.
        let (n, k) = (9, 512);
        let weight = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, B::DTYPE)?;
        let ours = KMatrix::<B>::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("a K-quant CPU tensor is taken".into()))?;
        let expected_rows: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        assert_eq!(ours.rows_f32(&[8, 0])?[..k], expected_rows[8 * k..9 * k]);
        assert_eq!(ours.rows_f32(&[8, 0])?[k..], expected_rows[..k]);
        assert!(ours.rows_f32(&[9]).is_err());
        let candle = QMatMul::from_qtensor(q)?;
        for m in [1, 2, 3, 4, 5, 7, 70] {
            let x = values(m * k, 7 + m as u32);
            let expected: Vec<f32> = candle
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1()?;
            let got = ours.matmul(&x, m)?;
            assert_eq!(got.len(), m * n);
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{:?} m {m}: {g} vs {e}",
                    B::DTYPE
                );
            }
        }
        // The kernels against the scalar reference.
        let act = quantize_rows(&values(3 * k, 11), k);
        let per_row = k / QK_K;
        let w = &ours.blocks[per_row..2 * per_row];
        let rows = [
            &act[..per_row],
            &act[per_row..2 * per_row],
            &act[2 * per_row..],
        ];
        let reference = scalar_dot(w, rows);
        for (g, e) in B::dot(w, rows).iter().zip(&reference) {
            assert!((g - e).abs() <= 1e-3 * e.abs().max(1.0), "{g} vs {e}");
        }
        Ok(())
    }

    #[test]
    fn q4k_matches_candles_kernels_and_dequantization() -> Result<()> {
        matches_candle::<BlockQ4K>()
    }

    #[test]
    fn q6k_matches_candles_kernels_and_dequantization() -> Result<()> {
        matches_candle::<BlockQ6K>()
    }

    #[test]
    fn packed_scales_and_mins_match_the_one_at_a_time_reading() {
        let q: [u8; 12] = [
            0xC1, 0x7F, 0x3A, 0xFE, 0x05, 0x99, 0x42, 0xE0, 0x1B, 0xA7, 0x6C, 0xF3,
        ];
        let packed = q4k_scales_and_mins(&q);
        let bytes: Vec<u8> = packed.iter().flat_map(|w| w.to_le_bytes()).collect();
        for j in 0..8 {
            assert_eq!(
                (bytes[j], bytes[8 + j]),
                q4k_scale_min(j, &q),
                "sub-block {j}"
            );
        }
    }

    #[test]
    fn wrong_sizes_are_errors() {
        assert!(Q4KMatrix::from_gguf_bytes(2, 256, &[0; 10]).is_err());
        assert!(Q6KMatrix::from_gguf_bytes(1, 256, &[0; 210]).is_ok());
        assert!(Q6KMatrix::from_gguf_bytes(1, 100, &[0; 210]).is_err());
    }
}
