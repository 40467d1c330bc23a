//! The shape of a weight matrix held in one of the engine's own quantized layouts, with the
//! input check and the row expansion (embedding lookups) every layout shares.

use super::error::{EngineError, Result};

/// `rows` output features by `cols` input features.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct MatrixShape {
    pub(super) rows: usize,
    pub(super) cols: usize,
}

impl MatrixShape {
    /// Checks that `x` holds `m` rows of `cols` values (the input of a product).
    pub(super) fn check_input(self, x: &[f32], m: usize) -> Result<()> {
        if x.len() == m * self.cols {
            Ok(())
        } else {
            Err(EngineError::InvalidInput(format!(
                "{} input values are not {m} rows of {}",
                x.len(),
                self.cols
            )))
        }
    }

    /// Rows `ids` expanded to f32, `[ids.len() * cols]`: `expand(row, out)` writes the `cols`
    /// values of `row`, which is inside the matrix (others are an error).
    pub(super) fn expand_rows(
        self,
        ids: &[u32],
        expand: impl Fn(usize, &mut [f32]),
    ) -> Result<Vec<f32>> {
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, dst) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let row = id as usize;
            if row >= self.rows {
                return Err(EngineError::InvalidInput(format!(
                    "row {row} of a matrix with {} rows",
                    self.rows
                )));
            }
            expand(row, dst);
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::MatrixShape;

    #[test]
    fn rows_are_expanded_in_order_and_outside_rows_are_errors() {
        let shape = MatrixShape { rows: 3, cols: 2 };
        let out = shape
            .expand_rows(&[2, 0], |row, dst| dst.fill(row as f32))
            .expect("rows inside");
        assert_eq!(out, [2.0, 2.0, 0.0, 0.0]);
        assert!(shape.expand_rows(&[3], |_, _| {}).is_err());
        assert!(shape.check_input(&[0.0; 4], 2).is_ok());
        assert!(shape.check_input(&[0.0; 5], 2).is_err());
    }
}
