//! The product driver the K-quant layouts share: tasks on the engine's CPU pool
//! ([`super::cpu_pool`]) own whole groups of weight rows
//! and walk the quantized activations a cache-sized tile at a time, four (or, where the kernel
//! takes them, eight) activation rows per kernel call: each unpacked weight serves them all.

use super::cpu_pool::for_each_task;
use super::error::Result;
use super::kquants::{Q8KBlock, QK_K, quantize_rows};
use super::matrix_shape::MatrixShape;
use super::out_columns::OutColumns;

/// Bytes of quantized activations a task keeps in cache while it walks its weight rows. On
/// the 2-core development machine, 16 to 128 KiB tiles and 4 to 64 weight rows a task gave
/// the same 512-token prefill rate within 5 %.
const ACTIVATION_TILE_BYTES: usize = 32 * 1024;
/// Weight rows a task owns (whole groups).
const ROWS_PER_TASK: usize = 16;

/// A weight matrix in groups of `GROUP` rows and its kernel.
pub(super) trait GroupKernel: Sync {
    /// Weight rows a group holds.
    const GROUP: usize;
    /// Whether the kernel takes eight activation rows in one call: each weight block is then
    /// read from memory while eight rows' arithmetic runs on it, not four rows' and then four
    /// more from the cache (Q4_K_M decode at eight streams, 2-core Xeon: 62 against 66–68
    /// tokens/s).
    const EIGHT_ROWS: bool = false;
    /// The matrix's shape.
    fn shape(&self) -> MatrixShape;
    /// Group `group` against activation rows `first .. first + R`; writes their outputs (the
    /// group's columns of those rows) through `dst`.
    fn run<const R: usize>(&self, group: usize, first: usize, x: [&[Q8KBlock]; R], dst: OutColumns);
    /// Whether [`GroupKernel::run_pair`] multiplies two adjacent groups in one pass on this
    /// CPU: the driver then hands it eight activation rows at a time, the groups of a task
    /// two by two.
    fn pairs(&self) -> bool {
        false
    }
    /// Groups `group` and `group + 1` against eight activation rows.
    fn run_pair(&self, group: usize, first: usize, x: [&[Q8KBlock]; 8], dst: OutColumns) {
        self.run(group, first, x, dst);
        self.run(group + 1, first, x, dst);
    }
}

/// `x Wᵀ` for `x` holding `m` rows of the matrix's `cols` values: `m` rows of `rows` values.
pub(super) fn matmul<K: GroupKernel>(kernel: &K, x: &[f32], m: usize) -> Result<Vec<f32>> {
    let shape = kernel.shape();
    shape.check_input(x, m)?;
    let (n, k) = (shape.rows, shape.cols);
    let per_row = k / QK_K;
    let act = quantize_rows(x, k);
    let mut out = vec![0f32; m * n];
    let tile_rows =
        (ACTIVATION_TILE_BYTES / (per_row * std::mem::size_of::<Q8KBlock>())).clamp(8, 64) & !7;
    let groups_per_task = ROWS_PER_TASK.div_ceil(K::GROUP);
    let groups = n / K::GROUP;
    let dst = OutColumns::new(&mut out, m, n);
    let x = |r: usize| &act[r * per_row..(r + 1) * per_row];
    // The rows of one tile against one group, in calls of eight (where the kernel takes
    // them) or up to four activation rows.
    let rows = |group: usize, from: usize, to: usize| {
        let mut r = from;
        while r < to {
            if K::EIGHT_ROWS && to - r >= 8 {
                let rows: [&[Q8KBlock]; 8] = std::array::from_fn(|i| x(r + i));
                kernel.run(group, r, rows, dst);
                r += 8;
                continue;
            }
            let run = (to - r).min(4);
            match run {
                1 => kernel.run(group, r, [x(r)], dst),
                2 => kernel.run(group, r, [x(r), x(r + 1)], dst),
                3 => kernel.run(group, r, [x(r), x(r + 1), x(r + 2)], dst),
                _ => kernel.run(group, r, [x(r), x(r + 1), x(r + 2), x(r + 3)], dst),
            }
            r += run;
        }
    };
    let pairs = kernel.pairs();
    for_each_task(groups.div_ceil(groups_per_task), |task| {
        let first_group = task * groups_per_task;
        let last_group = (first_group + groups_per_task).min(groups);
        for tile in (0..m).step_by(tile_rows) {
            let tile_end = (tile + tile_rows).min(m);
            let mut group = first_group;
            while group < last_group {
                if !pairs || group + 1 == last_group || tile_end - tile < 8 {
                    rows(group, tile, tile_end);
                    group += 1;
                    continue;
                }
                let mut r = tile;
                while tile_end - r >= 8 {
                    let rows: [&[Q8KBlock]; 8] = std::array::from_fn(|i| x(r + i));
                    kernel.run_pair(group, r, rows, dst);
                    r += 8;
                }
                rows(group, r, tile_end);
                rows(group + 1, r, tile_end);
                group += 2;
            }
        }
    });
    Ok(out)
}
