//! K-quant matrices (Q4_K, Q6_K) regrouped at load time into blocks of eight interleaved rows,
//! multiplied by the engine's own AVX2 kernels: one copy of the weights, in place of the
//! file's blocks.
//!
//! In the file's layout ([`super::kquants`]) every row is a run of blocks: a kernel multiplies
//! one row at a time, sums each product horizontally and applies that row's scales on its own.
//! Here the 256-value blocks of eight consecutive rows are stored together, their packed values
//! interleaved four bytes a row. One 32-byte load then holds four bytes of each of the eight
//! rows, and one broadcast activation word multiplies all eight in one instruction. Products
//! are summed in 16-bit lanes and scaled once per sub-block, the eight rows' results stay in
//! the eight lanes of one register, and the rows' block scales are applied by one F16C
//! conversion and one FMA: llama.cpp's answer for its repacked `q4_K_8x8` matrices, written
//! here for this engine.
//!
//! The arithmetic is ggml's, as in [`super::kquants`]: the activations are quantized to Q8_K
//! blocks, integer sums are scaled in f32; only the order of f32 additions differs. Matrices
//! whose rows are not a multiple of eight keep the file's layout.

#![allow(unsafe_code)]

mod pairs;
mod q4k;
mod q6k;

use candle_core::quantized::QTensor;

pub use q4k::BlockQ4Kx8;
pub use q6k::BlockQ6Kx8;

#[cfg(target_arch = "x86_64")]
use super::cpu_features::{avx_vnni, avx512_vnni};
use super::error::{EngineError, Result};
use super::grouped_matmul::{self, GroupKernel};
use super::kquants::{KBlock, Q8KBlock, QK_K};
use super::matrix_shape::MatrixShape;
use super::out_columns::OutColumns;
use super::q8_0::supported;
use super::weight_buffer::WeightBuffer;

/// Rows interleaved in one block.
const ROWS: usize = 8;

/// The same 256-value block of eight rows, interleaved.
pub trait BlockX8: Copy + Send + Sync + 'static {
    /// The file's block type.
    type File: KBlock;
    /// Interleaves the same block of eight rows.
    fn interleave(rows: [&Self::File; ROWS]) -> Self;
    /// Row `i`'s 256 values.
    fn dequantize_row(&self, i: usize, out: &mut [f32]);
    /// Eight weight rows (one group's blocks) against `R` activation rows.
    fn dot<const R: usize>(w: &[Self], x: [&[Q8KBlock]; R]) -> [[f32; ROWS]; R];
    /// Whether this CPU runs [`BlockX8::dot_pair`] in one pass ([`pairs`], with AVX-512
    /// VNNI); where it does not, the product driver does not ask for it.
    fn pairs() -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            avx512_vnni()
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    }
    /// Two groups' blocks (sixteen weight rows) against eight activation rows: each
    /// activation row's sixteen results, `a`'s eight then `b`'s.
    fn dot_pair(a: &[Self], b: &[Self], x: [&[Q8KBlock]; 8]) -> [[f32; 2 * ROWS]; 8] {
        #[cfg(target_arch = "x86_64")]
        if avx512_vnni() {
            // SAFETY: checked just now (AVX2, FMA and F16C wherever a `KMatrixX8` exists).
            return unsafe { Self::dot_pair_avx512(a, b, x) };
        }
        two_dots(a, b, x)
    }
    /// [`BlockX8::dot_pair`] in one pass, the block type's kernel in [`pairs`].
    ///
    /// # Safety
    /// The CPU must have AVX2, FMA, F16C and AVX-512 F, VL, BW and VNNI.
    #[cfg(target_arch = "x86_64")]
    unsafe fn dot_pair_avx512(a: &[Self], b: &[Self], x: [&[Q8KBlock]; 8]) -> [[f32; 2 * ROWS]; 8];
}

/// Two groups' products through [`BlockX8::dot`], one group after the other, as
/// [`BlockX8::dot_pair`] returns them.
fn two_dots<B: BlockX8>(a: &[B], b: &[B], x: [&[Q8KBlock]; 8]) -> [[f32; 2 * ROWS]; 8] {
    let (first, second) = (B::dot(a, x), B::dot(b, x));
    std::array::from_fn(|r| std::array::from_fn(|i| [first[r], second[r]][i / ROWS][i % ROWS]))
}

/// A `[rows, cols]` K-quant matrix whose rows are a multiple of eight, in blocks of eight rows.
pub struct KMatrixX8<B: BlockX8> {
    shape: MatrixShape,
    /// Row group after row group, each `cols / 256` blocks.
    blocks: WeightBuffer<B>,
}

/// A Q4_K matrix in blocks of eight rows.
pub type Q4KX8Matrix = KMatrixX8<BlockQ4Kx8>;
/// A Q6_K matrix in blocks of eight rows.
pub type Q6KX8Matrix = KMatrixX8<BlockQ6Kx8>;

impl<B: BlockX8> std::fmt::Debug for KMatrixX8<B> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KMatrixX8")
            .field("type", &B::File::DTYPE)
            .field("shape", &self.shape)
            .finish_non_exhaustive()
    }
}

impl<B: BlockX8> KMatrixX8<B> {
    /// Regroups a 2-D tensor of this block type on the CPU; `None` when it is another type,
    /// lives on another device, has rows that are not a multiple of eight, or this CPU lacks
    /// the kernels' instructions.
    pub fn from_qtensor(tensor: &QTensor) -> Result<Option<Self>> {
        if tensor.dtype() != B::File::DTYPE || !tensor.device().is_cpu() || !supported() {
            return Ok(None);
        }
        let (rows, cols) = tensor.shape().dims2()?;
        if !cols.is_multiple_of(QK_K) || !rows.is_multiple_of(ROWS) {
            return Ok(None);
        }
        let data = tensor.data()?;
        Self::from_gguf_bytes(rows, cols, &data).map(Some)
    }

    /// Builds the matrix from blocks as GGUF stores them, row after row.
    fn from_gguf_bytes(rows: usize, cols: usize, data: &[u8]) -> Result<Self> {
        let per_row = cols / QK_K;
        let bytes = B::File::BYTES;
        let expected = rows * per_row * bytes;
        if !cols.is_multiple_of(QK_K) || !rows.is_multiple_of(ROWS) || data.len() != expected {
            return Err(EngineError::InvalidInput(format!(
                "a [{rows}, {cols}] {:?} matrix in groups of {ROWS} rows needs {expected} bytes \
                 and a multiple of {ROWS} rows, got {} bytes",
                B::File::DTYPE,
                data.len()
            )));
        }
        let row_bytes = per_row * bytes;
        let blocks = WeightBuffer::from_fn(rows / ROWS * per_row, |n| {
            let (group, b) = (n / per_row, n % per_row);
            let parsed: [B::File; ROWS] = std::array::from_fn(|i| {
                let at = (group * ROWS + i) * row_bytes + b * bytes;
                B::File::parse(&data[at..at + bytes])
            });
            B::interleave(std::array::from_fn(|i| &parsed[i]))
        });
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
        self.shape.expand_rows(ids, |row, dst| {
            for (block, values) in self
                .group(row / ROWS)
                .iter()
                .zip(dst.chunks_exact_mut(QK_K))
            {
                block.dequantize_row(row % ROWS, values);
            }
        })
    }

    /// `x Wᵀ` for `x` holding `m` rows of `cols` values: `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        grouped_matmul::matmul(self, x, m)
    }

    /// The blocks of row group `group`.
    fn group(&self, group: usize) -> &[B] {
        let per_row = self.shape.cols / QK_K;
        &self.blocks[group * per_row..(group + 1) * per_row]
    }
}

/// Eight interleaved weight rows a group, each against four activation rows at a time.
impl<B: BlockX8> GroupKernel for KMatrixX8<B> {
    const GROUP: usize = ROWS;
    const EIGHT_ROWS: bool = true;

    fn shape(&self) -> MatrixShape {
        self.shape
    }

    fn run<const R: usize>(
        &self,
        group: usize,
        first: usize,
        x: [&[Q8KBlock]; R],
        dst: OutColumns,
    ) {
        write(dst, first, group * ROWS, B::dot(self.group(group), x));
    }

    fn pairs(&self) -> bool {
        B::pairs()
    }

    fn run_pair(&self, group: usize, first: usize, x: [&[Q8KBlock]; 8], dst: OutColumns) {
        let values = B::dot_pair(self.group(group), self.group(group + 1), x);
        write(dst, first, group * ROWS, values);
    }
}

/// Writes columns `col .. col + N` of output rows `row ..= row + R - 1`.
fn write<const R: usize, const N: usize>(
    dst: OutColumns,
    row: usize,
    col: usize,
    values: [[f32; N]; R],
) {
    for (r, row_values) in values.iter().enumerate() {
        dst.set_run(row + r, col, row_values);
    }
}

/// The reference the kernels are tested against (and the path off x86-64): each row expanded
/// to f32 and multiplied by the expanded activations.
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn scalar_dot<B: BlockX8, const R: usize>(w: &[B], x: [&[Q8KBlock]; R]) -> [[f32; ROWS]; R] {
    let mut out = [[0f32; ROWS]; R];
    let mut values = [0f32; QK_K];
    for (b, block) in w.iter().enumerate() {
        for i in 0..ROWS {
            block.dequantize_row(i, &mut values);
            for (r, sums) in out.iter_mut().enumerate() {
                sums[i] += x[r][b].dot_f32(&values);
            }
        }
    }
    out
}

/// How far ahead of the block being multiplied the kernels ask for weights: about 12 KiB,
/// into the L2 cache.
///
/// Decode reads every weight once a step from memory. On the 2-core Xeon (2026-12-03, 4 KiB
/// pages), prefetching the next block into L1 raised Q4_K_M decode from 15.6–16.2 to
/// 17.4–18.4 tokens/s at one stream. On the 2-core Zen 4 class EPYC (2026-12-07, weights in
/// huge pages since [`super::weight_buffer`]), one activation row multiplies a block in
/// 25–50 ns from the cache, less than memory takes to deliver it, and the next block was
/// asked for too late: Q4_K_M single-stream decode ran at 30–31 tokens/s with it, 17–19
/// without any prefetch, and 33–37 with 12 KiB ahead into L2 (`_MM_HINT_T1`; `llama-server
/// bench`, interleaved runs, Q6_K already read as one stream). Into L1 at the same distance
/// it was 25–26: the lines crowd the L1 and its miss buffers. 8 to 16 KiB ahead measured
/// alike within the VM's spread; eight activation rows were not slower (100–123 against
/// 99–112 tokens/s).
#[cfg(target_arch = "x86_64")]
const PREFETCH_BYTES: usize = 12 * 1024;

/// Asks the CPU to bring the block [`PREFETCH_BYTES`] past block `b` of `w` (past the end:
/// what follows in memory, the next group's blocks) into the L2 cache while the kernel
/// multiplies block `b`: one block's lines a call, so the stream ahead keeps its distance.
#[cfg(target_arch = "x86_64")]
#[inline]
fn prefetch_ahead<B>(w: &[B], b: usize) {
    let ahead = w
        .as_ptr()
        .wrapping_add(b)
        .cast::<i8>()
        .wrapping_add(PREFETCH_BYTES);
    super::cpu_prefetch::lines(ahead, std::mem::size_of::<B>());
}

/// Helpers of the AVX2 kernels.
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::ROWS;

    /// Eight bytes, one per row, each widened into the two adjacent i16 lanes that `maddubs`
    /// fills for that row (unsigned).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn row_pairs_u8(bytes: &[u8; ROWS]) -> __m256i {
        _mm256_cvtepu8_epi16(doubled(bytes))
    }

    /// As [`row_pairs_u8`], for the bits of signed bytes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn row_pairs_i8(bytes: &[u8; ROWS]) -> __m256i {
        _mm256_cvtepi8_epi16(doubled(bytes))
    }

    /// Each of eight bytes twice.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    fn doubled(bytes: &[u8; ROWS]) -> __m128i {
        // SAFETY: eight bytes, the width of the load.
        let v = unsafe { _mm_loadl_epi64(bytes.as_ptr().cast()) };
        _mm_unpacklo_epi8(v, v)
    }

    /// Row `i`'s bytes of two sub-blocks side by side (`a[i]`, `b[i]`) as i16: a `madd` with
    /// two broadcast activation sums weighs both at once.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn two_per_row(a: &[u8; ROWS], b: &[u8; ROWS], signed: bool) -> __m256i {
        // SAFETY: eight bytes each, the width of the loads.
        let (a, b) = unsafe {
            (
                _mm_loadl_epi64(a.as_ptr().cast()),
                _mm_loadl_epi64(b.as_ptr().cast()),
            )
        };
        let pairs = _mm_unpacklo_epi8(a, b);
        if signed {
            _mm256_cvtepi8_epi16(pairs)
        } else {
            _mm256_cvtepu8_epi16(pairs)
        }
    }

    /// Two adjacent i16 activation sums, `sums[0]` in the low and `sums[1]` in the high half
    /// of every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn sum_pair(sums: &[i16]) -> __m256i {
        assert!(sums.len() >= 2);
        // SAFETY: at least two i16, read unaligned.
        _mm256_set1_epi32(unsafe { sums.as_ptr().cast::<i32>().read_unaligned() })
    }

    /// Four activation bytes broadcast to every 32-bit lane.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn broadcast4(values: &[i8]) -> __m256i {
        assert!(values.len() >= 4);
        // SAFETY: at least four bytes, read unaligned.
        _mm256_set1_epi32(unsafe { values.as_ptr().cast::<i32>().read_unaligned() })
    }

    /// Four activation bytes `values[at .. at + 4]` broadcast to every 32-bit lane, read
    /// without a bounds check (the kernels' inner loops).
    ///
    /// # Safety
    /// `at + 4 <= 256`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn broadcast4_at(values: &[i8; 256], at: usize) -> __m256i {
        debug_assert!(at + 4 <= values.len());
        // SAFETY: the caller keeps the four bytes inside the block.
        _mm256_set1_epi32(unsafe { values.as_ptr().add(at).cast::<i32>().read_unaligned() })
    }

    /// Thirty-two weight bytes (four of each row) from `bytes[at ..]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn load32(bytes: &[u8], at: usize) -> __m256i {
        let chunk = &bytes[at..at + 32];
        // SAFETY: 32 bytes, the width of the load.
        unsafe { _mm256_loadu_si256(chunk.as_ptr().cast()) }
    }

    /// Eight f16 scales as f32.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scales_f32(bits: &[u16; ROWS]) -> __m256 {
        // SAFETY: eight f16, the width of the load.
        _mm256_cvtph_ps(unsafe { _mm_loadu_si128(bits.as_ptr().cast()) })
    }

    /// Eight f32 results.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn store(v: __m256) -> [f32; ROWS] {
        let mut out = [0f32; ROWS];
        // SAFETY: eight f32, the width of the store.
        unsafe { _mm256_storeu_ps(out.as_mut_ptr(), v) };
        out
    }
}

#[cfg(test)]
mod tests {
    use candle_core::quantized::{GgmlDType, QMatMul};
    use candle_core::{Device, Module, Tensor};

    use super::*;
    use crate::engine::kquants::quantize_rows;

    fn values(len: usize, seed: u32) -> Vec<f32> {
        (0..len as u32)
            .map(|i| {
                let h = (i.wrapping_mul(2_654_435_761) ^ seed.wrapping_mul(40_503)) % 2001;
                (h as f32 - 1000.0) / 700.0
            })
            .collect()
    }

    fn matches_candle_and_the_reference<B: BlockX8>() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // 24 rows (three groups), 512 columns (two blocks a row).
        let (n, k) = (24, 512);
        let weight = Tensor::from_vec(values(n * k, 3), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, B::File::DTYPE)?;
        let ours = KMatrixX8::<B>::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("a K-quant CPU tensor is taken".into()))?;
        assert_eq!((ours.rows(), ours.cols()), (n, k));
        assert_eq!(ours.bytes(), (3 * 2 * std::mem::size_of::<B>()) as u64);
        let expected_rows: Vec<f32> = q.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1()?;
        for row in [0, 5, 8, 15, 23] {
            assert_eq!(
                ours.rows_f32(&[row as u32])?,
                expected_rows[row * k..(row + 1) * k],
                "row {row}"
            );
        }
        assert!(ours.rows_f32(&[24]).is_err());
        let candle = QMatMul::from_qtensor(q)?;
        for m in [1, 2, 3, 4, 5, 7, 8, 9, 16, 70] {
            let x = values(m * k, 7 + m as u32);
            let expected: Vec<f32> = candle
                .forward(&Tensor::from_vec(x.clone(), (m, k), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1()?;
            let got = ours.matmul(&x, m)?;
            assert_eq!(got.len(), m * n);
            for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{:?} m {m}, output {i}: {g} vs {e}",
                    B::File::DTYPE
                );
            }
        }
        // The kernels against the scalar reference, with activations at the i8 extremes (a
        // block's largest value quantizes to -127, and the i16 sums are at their widest).
        let mut extreme = values(3 * k, 11);
        extreme[0] = 40.0;
        extreme[k + 1] = -40.0;
        let act = quantize_rows(&extreme, k);
        let per_row = k / QK_K;
        let w = &ours.blocks[per_row..2 * per_row];
        let rows = [
            &act[..per_row],
            &act[per_row..2 * per_row],
            &act[2 * per_row..],
        ];
        let reference = scalar_dot(w, rows);
        for (g, e) in B::dot(w, rows)
            .iter()
            .flatten()
            .zip(reference.iter().flatten())
        {
            assert!((g - e).abs() <= 1e-3 * e.abs().max(1.0), "{g} vs {e}");
        }
        Ok(())
    }

    /// A kernel under test at one, three and eight activation rows.
    type KernelAt<B, const R: usize> = fn(&[B], [&[Q8KBlock]; R]) -> [[f32; ROWS]; R];
    /// Its name, whether this CPU can run it, and the kernel at one, three and eight rows.
    type Kernel<'a, B> = (
        &'a str,
        bool,
        KernelAt<B, 1>,
        KernelAt<B, 3>,
        KernelAt<B, 8>,
    );

    /// Every kernel this CPU can run (AVX2; AVX-VNNI and AVX-512 VNNI where present) against
    /// the scalar reference, on one group of rows with activations at the i8 extremes, one and
    /// three activation rows at a time.
    fn every_kernel_matches_the_reference<B: BlockX8>(kernels: &[Kernel<B>]) -> Result<()> {
        if !supported() {
            return Ok(());
        }
        let (n, k) = (16, 768);
        let weight = Tensor::from_vec(values(n * k, 5), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, B::File::DTYPE)?;
        let ours = KMatrixX8::<B>::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("a K-quant CPU tensor is taken".into()))?;
        let mut extreme = values(3 * k, 13);
        extreme[3] = 50.0;
        extreme[k + 300] = -50.0;
        extreme[2 * k + 700] = 45.0;
        let act = quantize_rows(&extreme, k);
        let per_row = k / QK_K;
        let w = &ours.blocks[per_row..2 * per_row];
        let rows = [
            &act[..per_row],
            &act[per_row..2 * per_row],
            &act[2 * per_row..],
        ];
        let reference = scalar_dot(w, rows);
        let mut ran = 0;
        for (name, available, one, three, eight) in kernels {
            if !available {
                continue;
            }
            ran += 1;
            let close = |g: f32, e: f32| (g - e).abs() <= 1e-3 * e.abs().max(1.0);
            for (g, e) in three(w, rows)
                .iter()
                .flatten()
                .zip(reference.iter().flatten())
            {
                assert!(close(*g, *e), "{name}, three rows: {g} vs {e}");
            }
            for (g, e) in one(w, [rows[1]])[0].iter().zip(&reference[1]) {
                assert!(close(*g, *e), "{name}, one row: {g} vs {e}");
            }
            let got = eight(w, std::array::from_fn(|r| rows[r % 3]));
            for (r, got) in got.iter().enumerate() {
                for (g, e) in got.iter().zip(&reference[r % 3]) {
                    assert!(close(*g, *e), "{name}, eight rows, row {r}: {g} vs {e}");
                }
            }
        }
        assert!(
            ran >= 1,
            "the AVX2 kernel runs wherever `supported()` holds"
        );
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q4k_kernels_match_the_reference() -> Result<()> {
        // SAFETY (the calls below): each kernel runs only where its instructions are present.
        every_kernel_matches_the_reference::<BlockQ4Kx8>(&[
            (
                "avx2",
                supported(),
                |w, x| unsafe { q4k::avx2::dot(w, x) },
                |w, x| unsafe { q4k::avx2::dot(w, x) },
                |w, x| unsafe { q4k::avx2::dot(w, x) },
            ),
            (
                "avx-vnni",
                supported() && avx_vnni(),
                |w, x| unsafe { q4k::vnni::dot(w, x) },
                |w, x| unsafe { q4k::vnni::dot(w, x) },
                |w, x| unsafe { q4k::vnni::dot(w, x) },
            ),
            (
                "avx-512 vnni",
                supported() && avx512_vnni(),
                |w, x| unsafe { q4k::avx512::dot(w, x) },
                |w, x| unsafe { q4k::avx512::dot(w, x) },
                |w, x| unsafe { q4k::avx512::dot(w, x) },
            ),
        ])
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn q6k_kernels_match_the_reference() -> Result<()> {
        // SAFETY (the calls below): each kernel runs only where its instructions are present.
        every_kernel_matches_the_reference::<BlockQ6Kx8>(&[
            (
                "avx2",
                supported(),
                |w, x| unsafe { q6k::avx2::dot(w, x) },
                |w, x| unsafe { q6k::avx2::dot(w, x) },
                |w, x| unsafe { q6k::avx2::dot(w, x) },
            ),
            (
                "avx-512",
                supported() && avx512_vnni(),
                |w, x| unsafe { q6k::avx512::dot(w, x) },
                |w, x| unsafe { q6k::avx512::dot(w, x) },
                |w, x| unsafe { q6k::avx512::dot(w, x) },
            ),
        ])
    }

    /// Two groups in one pass ([`BlockX8::dot_pair`]: on this CPU the AVX-512 pair kernel
    /// where it has AVX-512 VNNI, else the one-group kernel twice) against the scalar
    /// reference of each group, eight activation rows with values at the i8 extremes.
    fn pair_kernel_matches_the_reference<B: BlockX8>() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        let (n, k) = (24, 768);
        let weight = Tensor::from_vec(values(n * k, 9), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, B::File::DTYPE)?;
        let ours = KMatrixX8::<B>::from_qtensor(&q)?
            .ok_or_else(|| EngineError::InvalidInput("a K-quant CPU tensor is taken".into()))?;
        let mut extreme = values(8 * k, 17);
        for (r, at) in [5, 300, 700, 1, 256, 511, 767, 128].into_iter().enumerate() {
            extreme[r * k + at] = if r % 2 == 0 { 60.0 } else { -60.0 };
        }
        let act = quantize_rows(&extreme, k);
        let per_row = k / QK_K;
        let x: [&[Q8KBlock]; 8] = std::array::from_fn(|r| &act[r * per_row..(r + 1) * per_row]);
        // Groups 1 and 2: the pair need not start at the matrix's first group.
        let (a, b) = (ours.group(1), ours.group(2));
        let (first, second) = (scalar_dot(a, x), scalar_dot(b, x));
        // The same bits as the one-group kernel at one activation row: a prompt's rows give
        // the same results whether a step holds eight of them or one.
        let paired = B::dot_pair(a, b, x);
        for (r, row) in x.iter().enumerate() {
            let one = [B::dot(a, [*row])[0], B::dot(b, [*row])[0]].concat();
            assert_eq!(
                paired[r].map(f32::to_bits).to_vec(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "{:?}, activation row {r}: {:?} vs {one:?}",
                B::File::DTYPE,
                paired[r]
            );
        }
        // The dispatched path (this CPU's) and the fallback of two one-group passes.
        let paths = [
            ("dispatched", B::dot_pair(a, b, x)),
            ("two passes", two_dots(a, b, x)),
        ];
        for (path, got) in paths {
            for r in 0..8 {
                for i in 0..2 * ROWS {
                    let e = if i < ROWS {
                        first[r][i]
                    } else {
                        second[r][i - ROWS]
                    };
                    let g = got[r][i];
                    assert!(
                        (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                        "{:?}, {path}: activation row {r}, weight row {i}: {g} vs {e}",
                        B::File::DTYPE
                    );
                }
            }
        }
        Ok(())
    }

    #[test]
    fn q4k_pair_kernel_matches_the_reference() -> Result<()> {
        pair_kernel_matches_the_reference::<BlockQ4Kx8>()
    }

    #[test]
    fn q6k_pair_kernel_matches_the_reference() -> Result<()> {
        pair_kernel_matches_the_reference::<BlockQ6Kx8>()
    }

    #[test]
    fn interleaved_q4k_matches_candle_and_the_reference() -> Result<()> {
        matches_candle_and_the_reference::<BlockQ4Kx8>()
    }

    #[test]
    fn interleaved_q6k_matches_candle_and_the_reference() -> Result<()> {
        matches_candle_and_the_reference::<BlockQ6Kx8>()
    }

    #[test]
    fn all_extreme_weights_do_not_overflow_the_i16_sums() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // Weights at one sign and activations at the other: every nibble/6-bit value at its
        // largest against -127/-128, the worst case for the 16-bit lanes.
        let k = 256;
        for dtype in [GgmlDType::Q4K, GgmlDType::Q6K] {
            // One zero per 32 values gives each sub-block a range (a constant one quantizes
            // to zeros); the other values take the largest quantized value.
            let ones: Vec<f32> = (0..8 * k)
                .map(|i| if i % 32 == 0 { 0.0 } else { 1.0 })
                .collect();
            let weight = Tensor::from_vec(ones, (8, k), &Device::Cpu)?;
            let q = QTensor::quantize(&weight, dtype)?;
            // Eight activation rows: the kernels' widest call, with the most live sums.
            let x = vec![-1.0f32; 8 * k];
            let got = match dtype {
                GgmlDType::Q4K => Q4KX8Matrix::from_qtensor(&q)?.map(|m| m.matmul(&x, 8)),
                _ => Q6KX8Matrix::from_qtensor(&q)?.map(|m| m.matmul(&x, 8)),
            }
            .ok_or_else(|| EngineError::InvalidInput("taken".into()))??;
            let expected: Vec<f32> = QMatMul::from_qtensor(q)?
                .forward(&Tensor::from_vec(x, (8, k), &Device::Cpu)?)?
                .flatten_all()?
                .to_vec1()?;
            for (g, e) in got.iter().zip(&expected) {
                assert!(
                    (g - e).abs() <= 1e-3 * e.abs().max(1.0),
                    "{dtype:?}: {g} vs {e}"
                );
            }
            assert!((got[0] + 248.0).abs() < 3.0, "{dtype:?}: {}", got[0]);
        }
        Ok(())
    }

    #[test]
    fn rows_not_in_groups_of_eight_keep_the_file_layout() -> Result<()> {
        let weight = Tensor::from_vec(values(12 * 256, 5), (12, 256), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, GgmlDType::Q4K)?;
        assert!(Q4KX8Matrix::from_qtensor(&q)?.is_none());
        assert!(Q4KX8Matrix::from_gguf_bytes(12, 256, &[0; 12 * 144]).is_err());
        assert!(Q4KX8Matrix::from_gguf_bytes(8, 256, &[0; 8 * 144 - 1]).is_err());
        assert!(Q4KX8Matrix::from_gguf_bytes(8, 256, &[0; 8 * 144]).is_ok());
        assert!(Q6KX8Matrix::from_gguf_bytes(8, 256, &[0; 8 * 210]).is_ok());
        assert!(Q6KX8Matrix::from_gguf_bytes(8, 256, &[0; 8 * 144]).is_err());
        Ok(())
    }
}
