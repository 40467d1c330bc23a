//! Q8_0 matrices multiplied by the engine's own AVX2 kernels.
//!
//! candle's CPU path for Q8_0 on AVX2 machines without AVX-512 VNNI takes one weight row and
//! one activation row at a time, through one accumulator, converting both f16 block scales
//! through a function call per 32-value block; measured on a 2-core AMD EPYC it ran prefill at
//! about a fifth of llama.cpp's speed on the same file (docs/benchmarks/engine-vs-llama-cpp.md).
//! Here the weights are regrouped once, at load time, into blocks of four rows
//! ([`QuadBlock`]): one pass over an activation block feeds four dot products with their own
//! accumulators, the four scales convert in one F16C instruction, and a tile of two activation
//! rows shares every weight block it loads (prefill, batched decode).
//!
//! The arithmetic is llama.cpp's and candle's: the activations are quantized to Q8_0 blocks
//! (scale `max|x| / 127`, kept as f16), the products of a block are summed in integers and
//! scaled by both scales in f32. Only the order of the f32 additions differs.
//!
//! Machines without AVX2, FMA and F16C keep candle's kernels ([`Q8Matrix::from_qtensor`]
//! returns `None` there).

#![allow(unsafe_code)]

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;
use rayon::prelude::*;

use super::cpu_pool::for_each_task;
use super::error::{EngineError, Result};
use super::kquants::nearest_int;
use super::matrix_shape::MatrixShape;
use super::out_columns::OutColumns;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of one Q8_0 block in a GGUF file: an f16 scale, then 32 signed bytes.
const GGUF_BLOCK_BYTES: usize = 2 + QK;
/// Weight rows grouped into one [`QuadBlock`].
const ROWS: usize = 4;
/// Bytes of quantized activations a task keeps in cache while it walks its weight rows.
const ACTIVATION_TILE_BYTES: usize = 128 * 1024;

/// One 32-value block of four consecutive weight rows.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuadBlock {
    /// The rows' scales as f16 bits.
    d: [u16; ROWS],
    /// The rows' quantized values.
    qs: [[i8; QK]; ROWS],
}

/// One 32-value block of a quantized activation row.
#[derive(Clone, Copy)]
struct ActBlock {
    /// The scale, already rounded through f16 as the weights' are.
    d: f32,
    qs: [i8; QK],
}

/// A `[rows, cols]` Q8_0 weight matrix in the four-row layout.
pub struct Q8Matrix {
    shape: MatrixShape,
    /// `[rows / 4 (rounded up)][cols / 32]`; rows past `rows` are zero.
    blocks: Vec<QuadBlock>,
}

impl std::fmt::Debug for Q8Matrix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Q8Matrix")
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

/// Whether this CPU runs the kernels (x86-64 with AVX2, FMA and F16C).
pub fn supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

impl Q8Matrix {
    /// Regroups a 2-D Q8_0 tensor on the CPU; `None` when it is another type, lives on
    /// another device, or this CPU lacks the kernels' instructions.
    pub fn from_qtensor(tensor: &QTensor) -> Result<Option<Self>> {
        if tensor.dtype() != GgmlDType::Q8_0 || !tensor.device().is_cpu() || !supported() {
            return Ok(None);
        }
        let (rows, cols) = tensor.shape().dims2()?;
        if !cols.is_multiple_of(QK) {
            return Ok(None);
        }
        let data = tensor.data()?;
        Self::from_gguf_bytes(rows, cols, &data).map(Some)
    }

    /// Builds the matrix from Q8_0 blocks as GGUF stores them, row after row.
    fn from_gguf_bytes(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let per_row = cols / QK;
        let expected = rows * per_row * GGUF_BLOCK_BYTES;
        if !cols.is_multiple_of(QK) || data.len() != expected {
            return Err(EngineError::InvalidInput(format!(
                "a [{rows}, {cols}] Q8_0 matrix needs {expected} bytes, got {}",
                data.len()
            )));
        }
        let quads = rows.div_ceil(ROWS);
        let empty = QuadBlock {
            d: [0; ROWS],
            qs: [[0; QK]; ROWS],
        };
        let mut blocks = vec![empty; quads * per_row];
        for (row, row_bytes) in data.chunks_exact(per_row * GGUF_BLOCK_BYTES).enumerate() {
            let (quad, lane) = (row / ROWS, row % ROWS);
            for (b, block) in row_bytes.chunks_exact(GGUF_BLOCK_BYTES).enumerate() {
                let target = &mut blocks[quad * per_row + b];
                target.d[lane] = u16::from_le_bytes([block[0], block[1]]);
                for (q, &byte) in target.qs[lane].iter_mut().zip(&block[2..]) {
                    *q = byte as i8;
                }
            }
        }
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

    /// Bytes the regrouped weights occupy.
    pub fn bytes(&self) -> u64 {
        (self.blocks.len() * std::mem::size_of::<QuadBlock>()) as u64
    }

    /// Rows `ids` expanded to f32, `[ids.len() * cols]` (an embedding lookup).
    pub fn rows_f32(&self, ids: &[u32]) -> Result<Vec<f32>> {
        let per_row = self.shape.cols / QK;
        self.shape.expand_rows(ids, |row, dst| {
            let (quad, lane) = (row / ROWS, row % ROWS);
            let blocks = &self.blocks[quad * per_row..(quad + 1) * per_row];
            for (block, values) in blocks.iter().zip(dst.chunks_exact_mut(QK)) {
                let d = f16::from_bits(block.d[lane]).to_f32();
                for (v, &q) in values.iter_mut().zip(&block.qs[lane]) {
                    *v = f32::from(q) * d;
                }
            }
        })
    }

    /// `x Wᵀ` for `x` holding `m` rows of `cols` values: `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.shape.check_input(x, m)?;
        let (n, k) = (self.shape.rows, self.shape.cols);
        let per_row = k / QK;
        let act = quantize_rows(x, k);
        let mut out = vec![0f32; m * n];
        let quads = n.div_ceil(ROWS);
        // Tasks own whole weight quads: one row of activations needs few rows per task to
        // spread over the threads, a tile of many rows amortises each task's weights over more.
        let quads_per_task = if m == 1 { 16 } else { 4 };
        let tile_rows =
            (ACTIVATION_TILE_BYTES / (per_row * std::mem::size_of::<ActBlock>())).clamp(2, 64) & !1;
        let dst = OutColumns::new(&mut out, m, n);
        for_each_task(quads.div_ceil(quads_per_task), |task| {
            let first = task * quads_per_task;
            let last = (first + quads_per_task).min(quads);
            for tile in (0..m).step_by(tile_rows) {
                let tile_end = (tile + tile_rows).min(m);
                for quad in first..last {
                    let weights = &self.blocks[quad * per_row..(quad + 1) * per_row];
                    let mut row = tile;
                    while row < tile_end {
                        let x0 = &act[row * per_row..(row + 1) * per_row];
                        if row + 1 < tile_end {
                            let x1 = &act[(row + 1) * per_row..(row + 2) * per_row];
                            let (d0, d1) = dot_2x4(weights, x0, x1);
                            write_quad(dst, row, quad, n, d0);
                            write_quad(dst, row + 1, quad, n, d1);
                            row += 2;
                        } else {
                            write_quad(dst, row, quad, n, dot_1x4(weights, x0));
                            row += 1;
                        }
                    }
                }
            }
        });
        Ok(out)
    }
}

/// Writes the dot products of output row `row` with weight quad `quad` (columns `4 quad ..`,
/// those below `n`).
fn write_quad(dst: OutColumns, row: usize, quad: usize, n: usize, values: [f32; ROWS]) {
    for (lane, value) in values.into_iter().enumerate() {
        let col = quad * ROWS + lane;
        if col < n {
            dst.set(row, col, value);
        }
    }
}

/// Quantizes rows of `k` values to Q8_0 blocks, as ggml's AVX2 code does (ties to even).
fn quantize_rows(x: &[f32], k: usize) -> Vec<ActBlock> {
    let per_row = k / QK;
    let empty = ActBlock {
        d: 0.0,
        qs: [0; QK],
    };
    let mut out = vec![empty; x.len() / QK];
    let quantize = |(values, blocks): (&[f32], &mut [ActBlock])| {
        for (chunk, block) in values.chunks_exact(QK).zip(blocks) {
            let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            block.d = f16::from_f32(d).to_f32();
            for (q, v) in block.qs.iter_mut().zip(chunk) {
                *q = nearest_int(v * inverse).clamp(-128, 127) as i8;
            }
        }
    };
    if x.len() >= 64 * k {
        x.par_chunks(k)
            .zip(out.par_chunks_mut(per_row))
            .for_each(quantize);
    } else {
        x.chunks(k).zip(out.chunks_mut(per_row)).for_each(quantize);
    }
    out
}

/// Whether this CPU has AVX-VNNI, which the kernels use when it is there (cached by the
/// standard library).
#[cfg(target_arch = "x86_64")]
pub(super) fn avx_vnni() -> bool {
    std::arch::is_x86_feature_detected!("avxvnni")
}

/// One activation row against one weight quad.
fn dot_1x4(w: &[QuadBlock], x: &[ActBlock]) -> [f32; ROWS] {
    #[cfg(target_arch = "x86_64")]
    {
        if avx_vnni() {
            // SAFETY: checked just now; AVX2, FMA and F16C as below.
            unsafe { vnni::dot_1x4(w, x) }
        } else {
            // SAFETY: a `Q8Matrix` exists only where `supported()` found AVX2, FMA and F16C.
            unsafe { avx2::dot_1x4(w, x) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        scalar_dot_1x4(w, x)
    }
}

/// Two activation rows against one weight quad.
fn dot_2x4(w: &[QuadBlock], x0: &[ActBlock], x1: &[ActBlock]) -> ([f32; ROWS], [f32; ROWS]) {
    #[cfg(target_arch = "x86_64")]
    {
        if avx_vnni() {
            // SAFETY: as in `dot_1x4`.
            unsafe { vnni::dot_2x4(w, x0, x1) }
        } else {
            // SAFETY: as in `dot_1x4`.
            unsafe { avx2::dot_2x4(w, x0, x1) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        (scalar_dot_1x4(w, x0), scalar_dot_1x4(w, x1))
    }
}

/// The reference the kernels are tested against (and the path off x86-64).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn scalar_dot_1x4(w: &[QuadBlock], x: &[ActBlock]) -> [f32; ROWS] {
    let mut out = [0f32; ROWS];
    for (wb, xb) in w.iter().zip(x) {
        for (lane, sum) in out.iter_mut().enumerate() {
            let dot: i32 = wb.qs[lane]
                .iter()
                .zip(&xb.qs)
                .map(|(&a, &b)| i32::from(a) * i32::from(b))
                .sum();
            *sum += dot as f32 * f16::from_bits(wb.d[lane]).to_f32() * xb.d;
        }
    }
    out
}

/// Weight blocks the kernels prefetch ahead of the one they multiply: about a kilobyte.
#[cfg(target_arch = "x86_64")]
const PREFETCH_BLOCKS: usize = 8;

/// Asks the CPU to bring block `b + PREFETCH_BLOCKS` of `w` into the cache (three probes 64
/// bytes apart cover every line of the 136-byte blocks as `b` advances). Decode reads every
/// weight once a step from memory, and the hardware prefetchers alone left the kernels
/// waiting on it (see [`super::kquants_x8`]).
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_ahead(w: &[QuadBlock], b: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let ahead = w.as_ptr().wrapping_add(b + PREFETCH_BLOCKS).cast::<i8>();
    for line in [0, 64, 128] {
        // SAFETY: a prefetch is a hint: it never faults, whatever the address.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line)) };
    }
}

/// The kernels' bodies, for one instruction set: `$features` enabled, `products` (the 32
/// products of a weight block and an activation block, summed in eight f32 lanes) from the
/// module they are expanded in.
#[cfg(target_arch = "x86_64")]
macro_rules! q8_kernels {
    ($features:literal) => {
        /// # Safety
        /// The CPU must have the instructions of `$features`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_1x4(w: &[QuadBlock], x: &[ActBlock]) -> [f32; ROWS] {
            let mut acc = [_mm256_setzero_ps(); ROWS];
            for (b, (wb, xb)) in w.iter().zip(x).enumerate() {
                super::prefetch_ahead(w, b);
                let xq = load(&xb.qs);
                let d = scales(wb, xb.d);
                for lane in 0..ROWS {
                    let p = products(load(&wb.qs[lane]), xq);
                    acc[lane] = _mm256_fmadd_ps(_mm256_set1_ps(d[lane]), p, acc[lane]);
                }
            }
            [hsum(acc[0]), hsum(acc[1]), hsum(acc[2]), hsum(acc[3])]
        }

        /// # Safety
        /// The CPU must have the instructions of `$features`.
        #[target_feature(enable = $features)]
        pub(super) unsafe fn dot_2x4(
            w: &[QuadBlock],
            x0: &[ActBlock],
            x1: &[ActBlock],
        ) -> ([f32; ROWS], [f32; ROWS]) {
            let mut acc0 = [_mm256_setzero_ps(); ROWS];
            let mut acc1 = [_mm256_setzero_ps(); ROWS];
            for (b, ((wb, xb0), xb1)) in w.iter().zip(x0).zip(x1).enumerate() {
                super::prefetch_ahead(w, b);
                let xq0 = load(&xb0.qs);
                let xq1 = load(&xb1.qs);
                let d0 = scales(wb, xb0.d);
                let d1 = scales(wb, xb1.d);
                for lane in 0..ROWS {
                    let wq = load(&wb.qs[lane]);
                    let p0 = products(wq, xq0);
                    let p1 = products(wq, xq1);
                    acc0[lane] = _mm256_fmadd_ps(_mm256_set1_ps(d0[lane]), p0, acc0[lane]);
                    acc1[lane] = _mm256_fmadd_ps(_mm256_set1_ps(d1[lane]), p1, acc1[lane]);
                }
            }
            (
                [hsum(acc0[0]), hsum(acc0[1]), hsum(acc0[2]), hsum(acc0[3])],
                [hsum(acc1[0]), hsum(acc1[1]), hsum(acc1[2]), hsum(acc1[3])],
            )
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::{ActBlock, QK, QuadBlock, ROWS};

    /// The 32 products of a weight block and an activation block, summed in eight lanes.
    /// `maddubs` multiplies unsigned by signed bytes, so the weight's sign moves to the
    /// activation: |w| ≤ 128 and |x| ≤ 127, so a pair sums to at most 32512 and never
    /// saturates its i16.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn products(w: __m256i, x: __m256i) -> __m256 {
        let pairs = _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(x, w));
        _mm256_cvtepi32_ps(_mm256_madd_epi16(pairs, _mm256_set1_epi16(1)))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)))
    }

    /// The four rows' scales times the activation's scale.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scales(w: &QuadBlock, xd: f32) -> [f32; ROWS] {
        // SAFETY: `w.d` is 4 × u16 = the 8 bytes `_mm_loadl_epi64` reads.
        let d = _mm_cvtph_ps(unsafe { _mm_loadl_epi64(w.d.as_ptr().cast()) });
        let mut out = [0f32; ROWS];
        // SAFETY: `out` holds the 4 floats stored.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), _mm_mul_ps(d, _mm_set1_ps(xd))) };
        out
    }

    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn load(qs: &[i8; QK]) -> __m256i {
        // SAFETY: `qs` is 32 bytes, the width of the unaligned load.
        unsafe { _mm256_loadu_si256(qs.as_ptr().cast()) }
    }

    q8_kernels!("avx2,fma,f16c");
}

/// The kernels with AVX-VNNI: `vpdpbusd` sums four unsigned-by-signed byte products into each
/// 32-bit lane in one instruction, where AVX2 needs `maddubs` and `madd`.
#[cfg(target_arch = "x86_64")]
mod vnni {
    use std::arch::x86_64::*;

    use super::avx2::{hsum, load, scales};
    use super::{ActBlock, QuadBlock, ROWS};

    /// As AVX2's: the weight's sign moves to the activation, |w| ≤ 128 as unsigned bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c,avxvnni")]
    fn products(w: __m256i, x: __m256i) -> __m256 {
        let sums = _mm256_dpbusd_avx_epi32(
            _mm256_setzero_si256(),
            _mm256_sign_epi8(w, w),
            _mm256_sign_epi8(x, w),
        );
        _mm256_cvtepi32_ps(sums)
    }

    q8_kernels!("avx2,fma,f16c,avxvnni");
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::QMatMul;
    use candle_core::{Device, Module, Tensor};

    use super::*;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001;
                (h as f32 - 1000.0) / 700.0
            })
            .collect()
    }

    #[test]
    fn matches_candles_q8_0_matmul_at_every_row_count() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // 10 rows: two full quads and a padded one; 96 columns: three blocks.
        let (n, k) = (10, 96);
        let weight = Tensor::from_vec(values(n * k, 1), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
        let ours = Q8Matrix::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("a Q8_0 CPU tensor is regrouped".into()))?;
        let candle = QMatMul::from_qtensor(q)?;
        for m in [1, 2, 3, 5, 70] {
            let x = values(m * k, 7 + m as u32);
            let expected: Vec<f32> = candle
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1()?;
            let got = ours.matmul(&x, m)?;
            assert_eq!(got.len(), m * n);
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "m {m}: {g} vs {e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn kernels_match_the_scalar_reference() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        let (n, k) = (8, 256);
        let weight = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
        let matrix = Q8Matrix::from_gguf_bytes(n, k, &q.data()?)?;
        let act = quantize_rows(&values(2 * k, 5), k);
        let per_row = k / QK;
        let (x0, x1) = act.split_at(per_row);
        let w = &matrix.blocks[..per_row];
        let reference = (scalar_dot_1x4(w, x0), scalar_dot_1x4(w, x1));
        let close = |a: [f32; ROWS], b: [f32; ROWS]| {
            a.iter()
                .zip(&b)
                .all(|(a, b)| (a - b).abs() <= 1e-4 * b.abs().max(1.0))
        };
        assert!(close(dot_1x4(w, x0), reference.0));
        let (d0, d1) = dot_2x4(w, x0, x1);
        assert!(close(d0, reference.0) && close(d1, reference.1));
        // Each instruction set's kernels, wherever this CPU has it.
        #[cfg(target_arch = "x86_64")]
        {
            // SAFETY: `supported()` holds (checked above).
            let (one, two) = unsafe { (avx2::dot_1x4(w, x0), avx2::dot_2x4(w, x0, x1)) };
            assert!(
                close(one, reference.0) && close(two.0, reference.0) && close(two.1, reference.1)
            );
            if avx_vnni() {
                // SAFETY: checked just now.
                let (one, two) = unsafe { (vnni::dot_1x4(w, x0), vnni::dot_2x4(w, x0, x1)) };
                assert!(
                    close(one, reference.0)
                        && close(two.0, reference.0)
                        && close(two.1, reference.1),
                    "AVX-VNNI kernels"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn rows_expand_like_candles_dequantization() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        let (n, k) = (6, 64);
        let weight = Tensor::from_vec(values(n * k, 9), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
        let expected: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        let matrix = Q8Matrix::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("regrouped".into()))?;
        assert_eq!(matrix.rows_f32(&[5, 0])?[..k], expected[5 * k..6 * k]);
        assert_eq!(matrix.rows_f32(&[5, 0])?[k..], expected[..k]);
        assert!(matrix.rows_f32(&[6]).is_err());
        assert!(Q8Matrix::from_gguf_bytes(2, 64, &[0; 10]).is_err());
        Ok(())
    }
}
