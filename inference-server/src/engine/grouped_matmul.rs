//! The product driver the K-quant layouts share: tasks on the engine's CPU pool
//! ([`super::cpu_pool`]) own whole groups of weight rows
//! and walk the quantized activations a cache-sized tile at a time, four (or, where the kernel
//! takes them, eight) activation rows per kernel call: each unpacked weight serves them all.

use std::marker::PhantomData;

use super::cpu_pool::for_each_task;
use super::error::{EngineError, Result};
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
    let act = quantize_rows(x, shape.cols);
    let mut out = vec![0f32; m * shape.rows];
    let product = Product::new(kernel, &act, m, &mut out)?;
    run(&[&product]);
    Ok(out)
}

/// A share of the pool's tasks: one product's, or those of several.
pub(super) trait Tasks: Sync {
    /// Tasks it has.
    fn tasks(&self) -> usize;
    /// Runs task `task` (`< tasks()`).
    fn run(&self, task: usize);
}

/// Runs the tasks of `products` as one hand-out on the pool: several products of the same
/// activations (a layer's query, key and value projections; its gate and up projections)
/// then cost one wait for the pool's threads, not one each, and the threads even out their
/// finishing times over all of them.
pub(super) fn run(products: &[&dyn Tasks]) {
    let counts: Vec<usize> = products.iter().map(|p| p.tasks()).collect();
    for_each_task(counts.iter().sum(), |mut task| {
        for (product, &count) in products.iter().zip(&counts) {
            if task < count {
                product.run(task);
                return;
            }
            task -= count;
        }
    });
}

/// One product `x Wᵀ` of quantized activations, cut into tasks that own whole groups of
/// weight rows.
pub(super) struct Product<'a, K> {
    kernel: &'a K,
    act: &'a [Q8KBlock],
    /// Activation rows.
    m: usize,
    /// Q8_K blocks an activation row.
    per_row: usize,
    /// Activation rows a task walks at a time.
    tile_rows: usize,
    groups_per_task: usize,
    groups: usize,
    dst: OutColumns,
    _out: PhantomData<&'a mut [f32]>,
}

impl<'a, K: GroupKernel> Product<'a, K> {
    /// The product of `kernel`'s matrix and `m` rows of activations `act`, written to `out`
    /// (`m` rows of the matrix's `rows` values).
    pub(super) fn new(
        kernel: &'a K,
        act: &'a [Q8KBlock],
        m: usize,
        out: &'a mut [f32],
    ) -> Result<Self> {
        let MatrixShape { rows: n, cols: k } = kernel.shape();
        let per_row = k / QK_K;
        if act.len() != m * per_row || out.len() != m * n {
            return Err(EngineError::InvalidInput(format!(
                "a [{n}, {k}] product of {m} rows got {} activation blocks (wants {}) and an \
                 output of {} values (wants {})",
                act.len(),
                m * per_row,
                out.len(),
                m * n
            )));
        }
        let tile_rows =
            (ACTIVATION_TILE_BYTES / (per_row * std::mem::size_of::<Q8KBlock>())).clamp(8, 64) & !7;
        Ok(Self {
            kernel,
            act,
            m,
            per_row,
            tile_rows,
            groups_per_task: ROWS_PER_TASK.div_ceil(K::GROUP),
            groups: n / K::GROUP,
            dst: OutColumns::new(out, m, n),
            _out: PhantomData,
        })
    }

    /// Activation row `r`'s blocks.
    fn x(&self, r: usize) -> &[Q8KBlock] {
        &self.act[r * self.per_row..(r + 1) * self.per_row]
    }

    /// The rows `from..to` of one tile against one group, in calls of eight (where the
    /// kernel takes them) or up to four activation rows.
    fn rows(&self, group: usize, from: usize, to: usize) {
        let (kernel, dst) = (self.kernel, self.dst);
        let mut r = from;
        while r < to {
            if K::EIGHT_ROWS && to - r >= 8 {
                let rows: [&[Q8KBlock]; 8] = std::array::from_fn(|i| self.x(r + i));
                kernel.run(group, r, rows, dst);
                r += 8;
                continue;
            }
            let run = (to - r).min(4);
            let x = |i: usize| self.x(r + i);
            match run {
                1 => kernel.run(group, r, [x(0)], dst),
                2 => kernel.run(group, r, [x(0), x(1)], dst),
                3 => kernel.run(group, r, [x(0), x(1), x(2)], dst),
                _ => kernel.run(group, r, [x(0), x(1), x(2), x(3)], dst),
            }
            r += run;
        }
    }
}

impl<K: GroupKernel> Tasks for Product<'_, K> {
    fn tasks(&self) -> usize {
        self.groups.div_ceil(self.groups_per_task)
    }

    fn run(&self, task: usize) {
        let first_group = task * self.groups_per_task;
        let last_group = (first_group + self.groups_per_task).min(self.groups);
        let pairs = self.kernel.pairs();
        for tile in (0..self.m).step_by(self.tile_rows) {
            let tile_end = (tile + self.tile_rows).min(self.m);
            let mut group = first_group;
            while group < last_group {
                if !pairs || group + 1 == last_group || tile_end - tile < 8 {
                    self.rows(group, tile, tile_end);
                    group += 1;
                    continue;
                }
                let mut r = tile;
                while tile_end - r >= 8 {
                    let rows: [&[Q8KBlock]; 8] = std::array::from_fn(|i| self.x(r + i));
                    self.kernel.run_pair(group, r, rows, self.dst);
                    r += 8;
                }
                self.rows(group, r, tile_end);
                self.rows(group + 1, r, tile_end);
                group += 2;
            }
        }
    }
}
