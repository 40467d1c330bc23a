//! The output buffer of a CPU matrix product whose rayon tasks each own a set of output
//! columns (whole weight rows): [`OutColumns`] lets them write it in place, without locks.

#![allow(unsafe_code)]

/// A `[m, n]` f32 buffer shared by tasks that each write only their own columns.
#[derive(Clone, Copy)]
pub(super) struct OutColumns {
    ptr: *mut f32,
    m: usize,
    n: usize,
}

// SAFETY: tasks write through the pointer only to the columns of their own weight rows, which
// no other task writes (the callers' contract, see `OutColumns::new`), while the caller keeps
// the buffer alive and untouched until every task has finished.
unsafe impl Send for OutColumns {}
unsafe impl Sync for OutColumns {}

impl OutColumns {
    /// Wraps `out` (`m * n` values). Every column must be written by one task only.
    pub(super) fn new(out: &mut [f32], m: usize, n: usize) -> Self {
        assert_eq!(out.len(), m * n, "an output buffer of m × n values");
        Self {
            ptr: out.as_mut_ptr(),
            m,
            n,
        }
    }

    /// Sets element (`row`, `col`); out-of-range indices are a bug and panic.
    pub(super) fn set(self, row: usize, col: usize, value: f32) {
        assert!(
            row < self.m && col < self.n,
            "({row}, {col}) outside the output"
        );
        // SAFETY: in range (checked above), and column `col` belongs to the calling task alone
        // (see the `Send` impl).
        unsafe { *self.ptr.add(row * self.n + col) = value };
    }

    /// Sets elements (`row`, `col ..`) to `values`; out-of-range indices are a bug and panic.
    pub(super) fn set_run(self, row: usize, col: usize, values: &[f32]) {
        assert!(
            row < self.m && col + values.len() <= self.n,
            "({row}, {col}..{}) outside the output",
            col + values.len()
        );
        // SAFETY: in range (checked above), and the columns belong to the calling task alone.
        unsafe {
            std::ptr::copy_nonoverlapping(
                values.as_ptr(),
                self.ptr.add(row * self.n + col),
                values.len(),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OutColumns;

    #[test]
    fn writes_land_at_row_times_n_plus_col() {
        let mut out = vec![0f32; 6];
        let w = OutColumns::new(&mut out, 2, 3);
        w.set(1, 2, 5.0);
        w.set(0, 1, 7.0);
        assert_eq!(out, [0.0, 7.0, 0.0, 0.0, 0.0, 5.0]);
    }

    #[test]
    fn a_run_lands_in_one_row() {
        let mut out = vec![0f32; 6];
        OutColumns::new(&mut out, 2, 3).set_run(1, 1, &[4.0, 5.0]);
        assert_eq!(out, [0.0, 0.0, 0.0, 0.0, 4.0, 5.0]);
    }

    #[test]
    #[should_panic(expected = "outside the output")]
    fn a_run_past_the_row_panics() {
        let mut out = vec![0f32; 6];
        OutColumns::new(&mut out, 2, 3).set_run(0, 2, &[4.0, 5.0]);
    }

    #[test]
    #[should_panic(expected = "outside the output")]
    fn an_index_outside_panics() {
        let mut out = vec![0f32; 4];
        OutColumns::new(&mut out, 2, 2).set(2, 0, 1.0);
    }
}
