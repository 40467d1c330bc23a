//! Q8_0 matrices multiplied by the engine's own AVX2 kernels.
//!
//! candle's CPU path for Q8_0 on AVX2 machines without AVX-512 VNNI takes one weight row and
//! one activation row at a time, through one accumulator, converting both f16 block scales
//! through a function call per 32-value block; measured on a 2-core AMD EPYC it ran prefill at
//! about a fifth of llama.cpp's speed on the same file (docs/benchmarks/engine-vs-llama-cpp.md).
//! Here the weights are regrouped once, at load time, into blocks of four rows
//! ([`QuadBlock`]) whose values are interleaved eight bytes a row: one 32-byte load holds
//! eight values of each of the four rows, and one broadcast of eight activation values
//! multiplies all four in one instruction. The four rows' sums stay in the lanes of one
//! register (two lanes a row), so a block costs one conversion and one FMA for all four rows,
//! and a call takes up to eight activation rows, each loaded weight register serving them
//! all (prefill, batched decode).
//!
//! The weights are stored offset by 128, as unsigned bytes: AVX-VNNI's `vpdpbusd` multiplies
//! unsigned by signed bytes, so it takes them as they are, and the offset's share of the sum,
//! 128 times the sum of the activation values of a lane, is subtracted by starting each sum
//! from it (computed once per activation block when the activations are quantized). Without
//! VNNI the kernel restores the signed weights once per block for all its rows.
//!
//! With AVX-512 VNNI and eight activation rows, a task's quads go four at a time to
//! [`sixteens`] (one 32-bit lane a weight row, the runs rearranged once per block), or two at a
//! time to [`octets`] where fewer are left.
//!
//! The arithmetic is llama.cpp's and candle's: the activations are quantized to Q8_0 blocks
//! (scale `max|x| / 127`, kept as f16), the products of a block are summed exactly in
//! integers and scaled by both scales in f32. Only the order of the f32 additions differs.
//!
//! Machines without AVX2, FMA and F16C keep candle's kernels ([`Q8Matrix::from_qtensor`]
//! returns `None` there).

#![allow(unsafe_code)]

use std::marker::PhantomData;

use candle_core::quantized::{GgmlDType, QTensor};
use half::f16;

use super::cpu_features::with_avx2;
#[cfg(target_arch = "x86_64")]
use super::cpu_features::{avx_vnni, avx512_vnni};
use super::cpu_pool::for_each_row;
use super::error::{EngineError, Result};
use super::grouped_matmul::{Tasks, run};
use super::kquants::nearest_int;
use super::matrix_shape::MatrixShape;
use super::out_columns::OutColumns;
use super::weight_buffer::WeightBuffer;

/// Values per Q8_0 block.
const QK: usize = 32;
/// Bytes of one Q8_0 block in a GGUF file: an f16 scale, then 32 signed bytes.
const GGUF_BLOCK_BYTES: usize = 2 + QK;
/// Weight rows grouped into one [`QuadBlock`].
const ROWS: usize = 4;
/// Values of a row that sit together in a [`QuadBlock`] (one 64-bit broadcast of activations).
const RUN: usize = 8;
/// Bytes of quantized activations a task keeps in cache while it walks its weight rows: at
/// most one kernel call's rows for a 2048-value row (eight rows of 64 blocks, 20 KiB), so they
/// stay in a 32 KiB L1 beside the weight blocks. With 128 KiB a 16-stream decode step walked
/// all sixteen rows (41 KiB) against each weight quad, from L2: on the 2-core AMD EPYC (Zen 3)
/// 16 streams then ran slower than 8 (50.8–51.9 against 16 KiB's 59.9–61.4 tokens/s,
/// interleaved runs); 512-token prefill and 8 streams did not change.
const ACTIVATION_TILE_BYTES: usize = 16 * 1024;
/// Activation rows one kernel call takes at most.
const MAX_CALL_ROWS: usize = 8;
/// Activation rows the AVX2 kernel (without VNNI) takes in one pass over a quad's blocks. At
/// eight, its four rows of signed weights, their four magnitudes and eight accumulators do
/// not fit the sixteen registers: on the 2-core AMD EPYC (single thread, weights in L3) eight
/// rows took 56-58 ns per 2048 products and row against 52 ns for two passes of four.
#[cfg(target_arch = "x86_64")]
const AVX2_ROWS: usize = 4;

/// One 32-value block of four consecutive weight rows.
#[repr(C)]
#[derive(Clone, Copy)]
struct QuadBlock {
    /// The rows' scales as f16 bits.
    d: [u16; ROWS],
    /// The rows' values plus 128, as unsigned bytes, in runs of [`RUN`]: byte
    /// `32 g + 8 row + j` holds value `8 g + j` of row `row`.
    qs: [u8; ROWS * QK],
}

impl QuadBlock {
    /// Value `i` (0 ..32) of row `lane`, signed.
    fn value(&self, lane: usize, i: usize) -> i8 {
        (self.qs[(i / RUN) * ROWS * RUN + lane * RUN + i % RUN] ^ 0x80) as i8
    }
}

/// One 32-value block of a quantized activation row.
#[repr(C)]
#[derive(Clone, Copy)]
pub(super) struct ActBlock {
    /// The scale, already rounded through f16 as the weights' are.
    d: f32,
    /// −128 times the sum of the values `v` with `v % 8 < 4` (`offset[0]`) and with
    /// `v % 8 >= 4` (`offset[1]`): what the weights' offset adds to the two lanes of a row.
    offset: [i32; 2],
    qs: [i8; QK],
}

/// A `[rows, cols]` Q8_0 weight matrix in the four-row layout.
pub struct Q8Matrix {
    shape: MatrixShape,
    /// `[rows / 4 (rounded up)][cols / 32]`; rows past `rows` are zero.
    blocks: WeightBuffer<QuadBlock>,
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
        // Padding rows are zeros: 128 once offset.
        let empty = QuadBlock {
            d: [0; ROWS],
            qs: [0x80; ROWS * QK],
        };
        let mut blocks = WeightBuffer::from_fn(quads * per_row, |_| empty);
        for (row, row_bytes) in data.chunks_exact(per_row * GGUF_BLOCK_BYTES).enumerate() {
            let (quad, lane) = (row / ROWS, row % ROWS);
            for (b, block) in row_bytes.chunks_exact(GGUF_BLOCK_BYTES).enumerate() {
                let target = &mut blocks[quad * per_row + b];
                target.d[lane] = u16::from_le_bytes([block[0], block[1]]);
                for (i, &byte) in block[2..].iter().enumerate() {
                    target.qs[(i / RUN) * ROWS * RUN + lane * RUN + i % RUN] = byte ^ 0x80;
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
                for (i, v) in values.iter_mut().enumerate() {
                    *v = f32::from(block.value(lane, i)) * d;
                }
            }
        })
    }

    /// `x Wᵀ` for `x` holding `m` rows of `cols` values: `m` rows of `rows` values.
    pub fn matmul(&self, x: &[f32], m: usize) -> Result<Vec<f32>> {
        self.shape.check_input(x, m)?;
        let act = quantize_rows(x, self.shape.cols);
        let mut out = vec![0f32; m * self.shape.rows];
        let product = Q8Product::new(self, &act, m, &mut out)?;
        run(&[&product]);
        Ok(out)
    }
}

/// One product `x Wᵀ` of Q8_0 activations, cut into tasks that own whole weight quads.
pub(super) struct Q8Product<'a> {
    matrix: &'a Q8Matrix,
    act: &'a [ActBlock],
    /// Activation rows.
    m: usize,
    /// Blocks an activation row.
    per_row: usize,
    quads_per_task: usize,
    /// Activation rows a task walks at a time.
    tile_rows: usize,
    octets: bool,
    dst: OutColumns,
    _out: PhantomData<&'a mut [f32]>,
}

impl<'a> Q8Product<'a> {
    /// The product of `matrix` and `m` rows of activations `act`, written to `out` (`m` rows
    /// of the matrix's `rows` values).
    pub(super) fn new(
        matrix: &'a Q8Matrix,
        act: &'a [ActBlock],
        m: usize,
        out: &'a mut [f32],
    ) -> Result<Self> {
        let MatrixShape { rows: n, cols: k } = matrix.shape;
        let per_row = k / QK;
        if act.len() != m * per_row || out.len() != m * n {
            return Err(EngineError::InvalidInput(format!(
                "a [{n}, {k}] Q8_0 product of {m} rows got {} activation blocks (wants {}) and \
                 an output of {} values (wants {})",
                act.len(),
                m * per_row,
                out.len(),
                m * n
            )));
        }
        Ok(Self {
            matrix,
            act,
            m,
            per_row,
            // One row of activations needs few rows per task to spread over the threads, a
            // tile of many rows amortises each task's weights over more.
            quads_per_task: if m == 1 { 16 } else { 4 },
            tile_rows: (ACTIVATION_TILE_BYTES / (per_row * std::mem::size_of::<ActBlock>()))
                .clamp(MAX_CALL_ROWS, 64)
                & !(MAX_CALL_ROWS - 1),
            octets: octets(),
            dst: OutColumns::new(out, m, n),
            _out: PhantomData,
        })
    }

    /// Activation row `r`'s blocks.
    fn x(&self, r: usize) -> &'a [ActBlock] {
        &self.act[r * self.per_row..(r + 1) * self.per_row]
    }

    /// Quad `quad`'s blocks.
    fn quad(&self, quad: usize) -> &'a [QuadBlock] {
        &self.matrix.blocks[quad * self.per_row..(quad + 1) * self.per_row]
    }

    /// The rows `from..to` of one tile against one quad, eight, four, two or one at a time.
    fn rows(&self, quad: usize, from: usize, to: usize) {
        let (w, dst, n) = (self.quad(quad), self.dst, self.matrix.shape.rows);
        let x = |r: usize| self.x(r);
        let col = quad * ROWS;
        let mut r = from;
        while r < to {
            r += match to - r {
                8.. => write_rows(dst, r, col, n, dot(w, rows_at::<8>(&x, r))),
                4..=7 => write_rows(dst, r, col, n, dot(w, rows_at::<4>(&x, r))),
                2 | 3 => write_rows(dst, r, col, n, dot(w, rows_at::<2>(&x, r))),
                _ => write_rows(dst, r, col, n, dot(w, [x(r)])),
            };
        }
    }
}

impl Tasks for Q8Product<'_> {
    fn tasks(&self) -> usize {
        self.matrix
            .shape
            .rows
            .div_ceil(ROWS)
            .div_ceil(self.quads_per_task)
    }

    fn run(&self, task: usize) {
        let quads = self.matrix.shape.rows.div_ceil(ROWS);
        let n = self.matrix.shape.rows;
        let x = |r: usize| self.x(r);
        let first = task * self.quads_per_task;
        let last = (first + self.quads_per_task).min(quads);
        for tile in (0..self.m).step_by(self.tile_rows) {
            let tile_end = (tile + self.tile_rows).min(self.m);
            let mut quad = first;
            while quad < last {
                if !self.octets || quad + 1 == last || tile_end - tile < 8 {
                    self.rows(quad, tile, tile_end);
                    quad += 1;
                    continue;
                }
                // Four quads a pass where the task has them, else two.
                let width = if last - quad >= 4 { 4 } else { 2 };
                let w: [&[QuadBlock]; 4] = std::array::from_fn(|i| self.quad(quad + i % width));
                let mut r = tile;
                while tile_end - r >= 8 {
                    let rows = rows_at(&x, r);
                    if width == 4 {
                        write_rows(self.dst, r, quad * ROWS, n, dot_sixteen(w, rows));
                    } else {
                        write_rows(self.dst, r, quad * ROWS, n, dot_octet(w[0], w[1], rows));
                    }
                    r += 8;
                }
                for q in quad..quad + width {
                    self.rows(q, r, tile_end);
                }
                quad += width;
            }
        }
    }
}

/// `N` activation rows from `first` on.
fn rows_at<'a, const N: usize>(
    x: &impl Fn(usize) -> &'a [ActBlock],
    first: usize,
) -> [&'a [ActBlock]; N] {
    std::array::from_fn(|i| x(first + i))
}

/// Writes the dot products of output rows `first ..` with the weight rows of columns
/// `col .. col + W` (those below `n`); returns how many rows it wrote.
fn write_rows<const R: usize, const W: usize>(
    dst: OutColumns,
    first: usize,
    col: usize,
    n: usize,
    values: [[f32; W]; R],
) -> usize {
    let width = W.min(n - col);
    for (i, row) in values.iter().enumerate() {
        dst.set_run(first + i, col, &row[..width]);
    }
    R
}

/// Quantizes rows of `k` values to Q8_0 blocks, as ggml's AVX2 code does (ties to even).
pub(super) fn quantize_rows(x: &[f32], k: usize) -> Vec<ActBlock> {
    let per_row = k / QK;
    let empty = ActBlock {
        d: 0.0,
        offset: [0; 2],
        qs: [0; QK],
    };
    let mut out = vec![empty; x.len() / QK];
    for_each_row(x, k, &mut out, per_row, quantize_row);
    out
}

/// Quantizes one row's blocks, compiled for AVX2 where the CPU has it (the portable build's
/// search for the largest magnitude ran a value at a time).
fn quantize_row(values: &[f32], blocks: &mut [ActBlock]) {
    with_avx2(
        #[inline(always)]
        || quantize_row_portable(values, blocks),
    );
}

#[inline(always)]
fn quantize_row_portable(values: &[f32], blocks: &mut [ActBlock]) {
    for (chunk, block) in values.chunks_exact(QK).zip(blocks) {
        let mut lanes = [0f32; RUN];
        for run in chunk.chunks_exact(RUN) {
            for i in 0..RUN {
                lanes[i] = lanes[i].max(run[i].abs());
            }
        }
        let amax = lanes.into_iter().fold(0f32, f32::max);
        let d = amax / 127.0;
        let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
        block.d = f16::from_f32(d).to_f32();
        for (q, v) in block.qs.iter_mut().zip(chunk) {
            *q = nearest_int(v * inverse).clamp(-128, 127) as i8;
        }
        let mut sums = [0i32; 2];
        for (i, &q) in block.qs.iter().enumerate() {
            sums[(i % RUN) / 4] += i32::from(q);
        }
        block.offset = sums.map(|s| -128 * s);
    }
}

/// `R` activation rows against one weight quad: row `r`'s four dot products.
fn dot<const R: usize>(w: &[QuadBlock], x: [&[ActBlock]; R]) -> [[f32; ROWS]; R] {
    #[cfg(target_arch = "x86_64")]
    {
        if avx_vnni() {
            // SAFETY: checked just now; AVX2, FMA and F16C as below.
            unsafe { vnni::dot(w, x) }
        } else if avx512_vnni() {
            // SAFETY: checked just now; AVX2, FMA and F16C as below.
            unsafe { avx512::dot(w, x) }
        } else if R > AVX2_ROWS {
            // More rows than the AVX2 kernel keeps in registers: it runs over them four at a
            // time (a quad's weights are read from L1 or L2 again, and restored again).
            let mut out = [[0f32; ROWS]; R];
            for first in (0..R).step_by(AVX2_ROWS) {
                // A short last run repeats its last row; those results are not kept.
                let rows: [&[ActBlock]; AVX2_ROWS] =
                    std::array::from_fn(|i| x[(first + i).min(R - 1)]);
                // SAFETY: as below.
                let sums = unsafe { avx2::dot(w, rows) };
                for (o, s) in out[first..].iter_mut().zip(sums) {
                    *o = s;
                }
            }
            out
        } else {
            // SAFETY: a `Q8Matrix` exists only where `supported()` found AVX2, FMA and F16C.
            unsafe { avx2::dot(w, x) }
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        x.map(|x| scalar_dot(w, x))
    }
}

/// Whether this CPU multiplies two quads at eight activation rows in one pass
/// ([`octets`]): the product driver then takes a task's quads two by two.
fn octets() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        avx512_vnni()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Eight activation rows against quads `wa` and `wb`: row `r`'s eight dot products, `wa`'s
/// four then `wb`'s.
fn dot_octet(wa: &[QuadBlock], wb: &[QuadBlock], x: [&[ActBlock]; 8]) -> [[f32; 2 * ROWS]; 8] {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: checked just now; AVX2, FMA and F16C wherever a `Q8Matrix` exists.
        return unsafe { octets::dot(wa, wb, x) };
    }
    let (first, second) = (dot(wa, x), dot(wb, x));
    std::array::from_fn(|r| std::array::from_fn(|i| [first[r], second[r]][i / ROWS][i % ROWS]))
}

/// Eight activation rows against the four quads `w`: row `r`'s sixteen dot products, quad by
/// quad ([`sixteens`] with AVX-512 VNNI, else two passes of [`dot_octet`]).
fn dot_sixteen(w: [&[QuadBlock]; 4], x: [&[ActBlock]; 8]) -> [[f32; 4 * ROWS]; 8] {
    #[cfg(target_arch = "x86_64")]
    if avx512_vnni() {
        // SAFETY: checked just now; AVX2, FMA and F16C wherever a `Q8Matrix` exists.
        return unsafe { sixteens::dot(w, x) };
    }
    let (first, second) = (dot_octet(w[0], w[1], x), dot_octet(w[2], w[3], x));
    std::array::from_fn(|r| {
        std::array::from_fn(|i| [first[r], second[r]][i / (2 * ROWS)][i % (2 * ROWS)])
    })
}

/// The reference the kernels are tested against (and the path off x86-64).
#[cfg_attr(target_arch = "x86_64", allow(dead_code))]
fn scalar_dot(w: &[QuadBlock], x: &[ActBlock]) -> [f32; ROWS] {
    let mut out = [0f32; ROWS];
    for (wb, xb) in w.iter().zip(x) {
        for (lane, sum) in out.iter_mut().enumerate() {
            let dot: i32 = (0..QK)
                .map(|i| i32::from(wb.value(lane, i)) * i32::from(xb.qs[i]))
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

mod octets;
mod sixteens;

/// What both instruction sets' kernels share: loads, scales and the final sums.
#[cfg(target_arch = "x86_64")]
mod common {
    use std::arch::x86_64::*;

    use super::{ActBlock, QuadBlock, ROWS, RUN};

    /// The weights' 32-byte run `g` (0..4): eight values of each of the four rows.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn weights(w: &QuadBlock, g: usize) -> __m256i {
        let run = &w.qs[g * ROWS * RUN..(g + 1) * ROWS * RUN];
        // SAFETY: `run` is 32 bytes, the width of the unaligned load.
        unsafe { _mm256_loadu_si256(run.as_ptr().cast()) }
    }

    /// Activation values `8 g .. 8 g + 8`, in each of the four 64-bit lanes.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn activations(x: &ActBlock, g: usize) -> __m256i {
        let run = &x.qs[g * RUN..(g + 1) * RUN];
        // SAFETY: `run` is the 8 bytes read.
        _mm256_set1_epi64x(unsafe { run.as_ptr().cast::<i64>().read_unaligned() })
    }

    /// The four rows' scales, each in the two lanes of its row: `[d0, d0, d1, d1, …]`.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn scales(w: &QuadBlock) -> __m256 {
        // SAFETY: `w.d` is 4 × u16 = the 8 bytes `_mm_loadl_epi64` reads.
        let d = unsafe { _mm_loadl_epi64(w.d.as_ptr().cast()) };
        _mm256_cvtph_ps(_mm_unpacklo_epi32(d, d))
    }

    /// Adds the block's integer sums, scaled, to the row's accumulator. Each row's two lanes
    /// are added as integers first (`[r0, r1, r0, r1 | r2, r3, r2, r3]`, [`scales`]' order),
    /// so a row's result is Σ over blocks of (its scale × the activation's) × its block sum,
    /// in block order: the same float operations, bit for bit, as the two-quad kernel
    /// ([`super::octets`]) does at eight activation rows, whichever of them multiplies a
    /// prompt's rows (a prompt's answer must not depend on how the steps split it).
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn accumulate(acc: __m256, sums: __m256i, scales: __m256, x: &ActBlock) -> __m256 {
        let scale = _mm256_mul_ps(scales, _mm256_set1_ps(x.d));
        _mm256_fmadd_ps(
            scale,
            _mm256_cvtepi32_ps(_mm256_hadd_epi32(sums, sums)),
            acc,
        )
    }

    /// The four rows' dot products: lanes 0, 1, 4 and 5 of the accumulator.
    #[inline]
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) fn finish(acc: __m256) -> [f32; ROWS] {
        let rows = _mm_movelh_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps::<1>(acc));
        let mut out = [0f32; ROWS];
        // SAFETY: `out` holds the 4 floats stored.
        unsafe { _mm_storeu_ps(out.as_mut_ptr(), rows) };
        out
    }
}

/// The kernel with `vpdpbusd`, which multiplies the offset weights (unsigned) by the
/// activations (signed) and sums four products into each 32-bit lane, on top of the lane's
/// offset correction: `$name` is built for the CPU features `$features` and runs `$dpbusd`,
/// the instruction's form there.
#[cfg(target_arch = "x86_64")]
macro_rules! vnni_kernel {
    ($(#[$doc:meta])* $name:ident, $features:literal, $dpbusd:ident) => {
        $(#[$doc])*
        mod $name {
            use std::arch::x86_64::*;

            use super::common::{accumulate, activations, finish, scales, weights};
            use super::{ActBlock, QuadBlock, ROWS};

            /// # Safety
            #[doc = concat!("The CPU must have ", $features, ".")]
            #[target_feature(enable = $features)]
            pub(super) unsafe fn dot<const R: usize>(
                w: &[QuadBlock],
                x: [&[ActBlock]; R],
            ) -> [[f32; ROWS]; R] {
                let x = x.map(|row| &row[..w.len()]);
                let mut acc = [_mm256_setzero_ps(); R];
                for (b, wb) in w.iter().enumerate() {
                    super::prefetch_ahead(w, b);
                    let wq = [0, 1, 2, 3].map(|g| weights(wb, g));
                    let d = scales(wb);
                    for (acc, row) in acc.iter_mut().zip(&x) {
                        let xb = &row[b];
                        // SAFETY: `offset` is the 8 bytes read.
                        let offset = unsafe { xb.offset.as_ptr().cast::<i64>().read_unaligned() };
                        let mut sums = _mm256_set1_epi64x(offset);
                        for (g, &wg) in wq.iter().enumerate() {
                            sums = $dpbusd(sums, wg, activations(xb, g));
                        }
                        *acc = accumulate(*acc, sums, d, xb);
                    }
                }
                acc.map(|a| finish(a))
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
vnni_kernel!(
    /// The kernel with AVX-VNNI (the VEX-encoded `vpdpbusd` of Intel's Alder Lake and later
    /// and AMD's Zen 5).
    vnni,
    "avx2,fma,f16c,avxvnni",
    _mm256_dpbusd_avx_epi32
);

#[cfg(target_arch = "x86_64")]
vnni_kernel!(
    /// The kernel with AVX-512 VNNI on 256-bit registers (the EVEX-encoded `vpdpbusd` of
    /// Ice Lake and later Xeons and AMD's Zen 4, which lack AVX-VNNI). Its 32 vector
    /// registers hold eight activation rows' sums in one pass, where the AVX2 kernel makes
    /// two passes of four: on the 2-core Zen 4 class EPYC (2026-12-07) Q8_0 decode at eight
    /// streams went from 60.7–60.9 to 89.4–90.6 tokens/s (`llama-server bench`, interleaved
    /// runs), one stream unchanged within the VM's spread.
    avx512,
    "avx2,fma,f16c,avx512f,avx512vl,avx512vnni",
    _mm256_dpbusd_epi32
);

/// The kernel with AVX2 alone: the signed weights are restored once per block, and
/// `maddubs` multiplies their magnitudes by the activations carrying their signs (|w| ≤ 128
/// and |x| ≤ 127, so a pair sums to at most 32512 and never saturates its i16).
#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use super::common::{accumulate, activations, finish, scales, weights};
    use super::{ActBlock, QuadBlock, ROWS};

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn dot<const R: usize>(
        w: &[QuadBlock],
        x: [&[ActBlock]; R],
    ) -> [[f32; ROWS]; R] {
        let x = x.map(|row| &row[..w.len()]);
        let mut acc = [_mm256_setzero_ps(); R];
        let (bias, ones) = (_mm256_set1_epi8(-128), _mm256_set1_epi16(1));
        for (b, wb) in w.iter().enumerate() {
            super::prefetch_ahead(w, b);
            let signed = [0, 1, 2, 3].map(|g| _mm256_xor_si256(weights(wb, g), bias));
            let magnitude = signed.map(|wg| _mm256_sign_epi8(wg, wg));
            let d = scales(wb);
            for (acc, row) in acc.iter_mut().zip(&x) {
                let xb = &row[b];
                let mut sums = _mm256_setzero_si256();
                for g in 0..4 {
                    let xs = _mm256_sign_epi8(activations(xb, g), signed[g]);
                    let pairs = _mm256_maddubs_epi16(magnitude[g], xs);
                    sums = _mm256_add_epi32(sums, _mm256_madd_epi16(pairs, ones));
                }
                *acc = accumulate(*acc, sums, d, xb);
            }
        }
        acc.map(|a| finish(a))
    }
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
    fn quantized_rows_match_ggml_value_by_value() {
        let k = 4 * QK;
        let mut x = values(k, 3);
        x.extend(std::iter::repeat_n(0.0, QK));
        x.extend((0..QK).map(|i| (i as f32 - 15.5) * 8.0));
        let mut odd = values(QK, 4);
        odd[2] = f32::NAN;
        x.extend(odd);
        x.extend((0..2 * QK).map(|i| -((i % 5) as f32) * 0.5));
        let k = x.len();
        let got = quantize_rows(&x, k);
        for (b, (block, chunk)) in got.iter().zip(x.chunks_exact(QK)).enumerate() {
            let amax = chunk.iter().fold(0f32, |a, v| a.max(v.abs()));
            let d = amax / 127.0;
            let inverse = if d != 0.0 { 1.0 / d } else { 0.0 };
            let qs: Vec<i8> = chunk
                .iter()
                .map(|v| (v * inverse).round_ties_even().clamp(-128.0, 127.0) as i8)
                .collect();
            let sum = |lo: usize| -> i32 {
                (0..QK)
                    .filter(|i| (i % RUN) / 4 == lo)
                    .map(|i| i32::from(qs[i]))
                    .sum::<i32>()
                    * -128
            };
            assert_eq!(
                block.d.to_bits(),
                f16::from_f32(d).to_f32().to_bits(),
                "block {b}"
            );
            assert_eq!(block.qs.as_slice(), qs.as_slice(), "block {b}");
            assert_eq!(block.offset, [sum(0), sum(1)], "block {b}");
        }
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
        for m in [1, 2, 3, 5, 8, 9, 12, 16, 70] {
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

    /// A `[n, k]` matrix of [`values`] quantized by candle and regrouped from its bytes.
    /// Eight activation rows of `k` values, quantized, each with one extreme value: `peak` in
    /// the even rows, `-peak` in the odd ones, at a different column in each.
    fn extreme_rows(k: usize, seed: u32, peak: f32) -> Vec<ActBlock> {
        let mut x = values(8 * k, seed);
        for r in 0..8 {
            x[r * k + 31 * r] = if r % 2 == 0 { peak } else { -peak };
        }
        quantize_rows(&x, k)
    }

    fn test_matrix(n: usize, k: usize, seed: u32) -> Result<Q8Matrix> {
        let weight = Tensor::from_vec(values(n * k, seed), (n, k), &Device::Cpu)?;
        let q = QTensor::quantize(&weight, GgmlDType::Q8_0)?;
        Q8Matrix::from_gguf_bytes(n, k, &q.data()?)
    }

    #[test]
    fn kernels_match_the_scalar_reference() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        let (n, k) = (8, 256);
        let matrix = test_matrix(n, k, 3)?;
        let per_row = k / QK;
        let act = quantize_rows(&values(8 * k, 5), k);
        let rows: Vec<&[ActBlock]> = act.chunks_exact(per_row).collect();
        let w = &matrix.blocks[per_row..2 * per_row];
        let reference: Vec<[f32; ROWS]> = rows.iter().map(|x| scalar_dot(w, x)).collect();
        let close = |got: &[[f32; ROWS]], what: &str| {
            for (r, (g, e)) in got.iter().zip(&reference).enumerate() {
                for (g, e) in g.iter().zip(e) {
                    assert!(
                        (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                        "{what}, row {r}: {g} vs {e}"
                    );
                }
            }
        };
        close(&dot(w, [rows[0]]), "dispatched, 1 row");
        close(&dot(w, [rows[0], rows[1]]), "dispatched, 2 rows");
        close(
            &dot(w, [rows[0], rows[1], rows[2], rows[3]]),
            "dispatched, 4 rows",
        );
        close(
            &dot(w, std::array::from_fn::<_, 8, _>(|i| rows[i])),
            "dispatched, 8 rows",
        );
        // Each instruction set's kernel, wherever this CPU has it.
        #[cfg(target_arch = "x86_64")]
        {
            let eight: [&[ActBlock]; 8] = std::array::from_fn(|i| rows[i]);
            // SAFETY: `supported()` holds (checked above).
            unsafe {
                close(&avx2::dot(w, [rows[0]]), "AVX2, 1 row");
                close(&avx2::dot(w, eight), "AVX2, 8 rows");
            }
            if avx_vnni() {
                // SAFETY: checked just now.
                unsafe {
                    close(&vnni::dot(w, [rows[0]]), "AVX-VNNI, 1 row");
                    close(&vnni::dot(w, eight), "AVX-VNNI, 8 rows");
                }
            }
            if avx512_vnni() {
                // SAFETY: checked just now.
                unsafe {
                    close(&avx512::dot(w, [rows[0]]), "AVX-512 VNNI, 1 row");
                    close(&avx512::dot(w, eight), "AVX-512 VNNI, 8 rows");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn four_quads_at_once_give_the_one_quad_kernels_bits() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // Five quads; the four are quads 1..5.
        let (n, k) = (20, 256);
        let matrix = test_matrix(n, k, 29)?;
        let per_row = k / QK;
        let act = extreme_rows(k, 31, -95.0);
        let rows: [&[ActBlock]; 8] = std::array::from_fn(|r| &act[r * per_row..(r + 1) * per_row]);
        let w: [&[QuadBlock]; 4] =
            std::array::from_fn(|q| &matrix.blocks[(q + 1) * per_row..(q + 2) * per_row]);
        let got = dot_sixteen(w, rows);
        // The fallback: two passes of the two-quad kernel.
        let (first, second) = (dot_octet(w[0], w[1], rows), dot_octet(w[2], w[3], rows));
        for (r, row) in rows.iter().enumerate() {
            let one: Vec<f32> = w.iter().flat_map(|quad| dot(quad, [*row])[0]).collect();
            let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
            assert_eq!(
                bits(&got[r]),
                bits(&one),
                "activation row {r}: {:?} vs {one:?}",
                got[r]
            );
            let two = [first[r], second[r]].concat();
            assert_eq!(bits(&two), bits(&one), "two passes, activation row {r}");
            let expected: Vec<f32> = w.iter().flat_map(|quad| scalar_dot(quad, row)).collect();
            for (i, (g, e)) in got[r].iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "activation row {r}, weight row {i}: {g} vs {e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn two_quads_at_once_match_the_scalar_reference() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // Three quads; the pair is quads 1 and 2.
        let (n, k) = (12, 256);
        let matrix = test_matrix(n, k, 13)?;
        let per_row = k / QK;
        let act = extreme_rows(k, 21, 90.0);
        let rows: [&[ActBlock]; 8] = std::array::from_fn(|r| &act[r * per_row..(r + 1) * per_row]);
        let (wa, wb) = (
            &matrix.blocks[per_row..2 * per_row],
            &matrix.blocks[2 * per_row..3 * per_row],
        );
        let got = dot_octet(wa, wb, rows);
        // The same bits as the one-quad kernel at one activation row: a prompt's rows give
        // the same results whether a step holds eight of them or one.
        for (r, row) in rows.iter().enumerate() {
            let one = [dot(wa, [*row])[0], dot(wb, [*row])[0]].concat();
            assert_eq!(
                got[r].map(f32::to_bits).to_vec(),
                one.iter().map(|v| v.to_bits()).collect::<Vec<_>>(),
                "activation row {r}: {:?} vs {one:?}",
                got[r]
            );
        }
        for (r, row) in rows.iter().enumerate() {
            let expected = [scalar_dot(wa, row), scalar_dot(wb, row)].concat();
            for (i, (g, e)) in got[r].iter().zip(&expected).enumerate() {
                assert!(
                    (g - e).abs() <= 1e-4 * e.abs().max(1.0),
                    "activation row {r}, weight row {i}: {g} vs {e}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn extreme_values_sum_exactly() -> Result<()> {
        if !supported() {
            return Ok(());
        }
        // Weights of -128 and 127 against activations of ±127: the largest products, where
        // an i16 pair sum or the offset correction would overflow if they could.
        let (n, k) = (4, 64);
        let mut data = Vec::new();
        for row in 0..n {
            for block in 0..k / QK {
                data.extend_from_slice(&f16::from_f32(1.0).to_bits().to_le_bytes());
                for i in 0..QK {
                    let v: i8 = if (row + block + i) % 3 == 0 {
                        -128
                    } else {
                        127
                    };
                    data.push(v as u8);
                }
            }
        }
        let matrix = Q8Matrix::from_gguf_bytes(n, k, &data)?;
        let x: Vec<f32> = (0..k)
            .map(|i| if i % 2 == 0 { 1.0 } else { -1.0 })
            .collect();
        let got = matrix.matmul(&x, 1)?;
        let weights = matrix.rows_f32(&[0, 1, 2, 3])?;
        for (row, g) in got.iter().enumerate() {
            let expected: f32 = weights[row * k..(row + 1) * k]
                .iter()
                .zip(&x)
                .map(|(w, x)| w * x * 127.0)
                .sum::<f32>()
                * f16::from_f32(1.0 / 127.0).to_f32();
            assert!(
                (g - expected).abs() <= 1e-3 * expected.abs().max(1.0),
                "row {row}: {g} vs {expected}"
            );
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
