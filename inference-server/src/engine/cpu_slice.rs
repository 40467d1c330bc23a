//! Borrowing a CPU tensor's f32 elements in place, for the engine's own CPU kernels.

use candle_core::{Storage, Tensor};

use super::error::{EngineError, Result};

/// Runs `f` on the f32 elements of a contiguous CPU tensor. `kernel` names the caller in
/// the error a tensor on another device or with a strided layout gets.
pub(super) fn with_f32<R>(
    t: &Tensor,
    kernel: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    let (storage, layout) = t.storage_and_layout();
    let Storage::Cpu(cpu) = &*storage else {
        return Err(EngineError::InvalidInput(format!(
            "{kernel} runs on the CPU only"
        )));
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        return Err(EngineError::InvalidInput(format!(
            "{kernel} needs contiguous tensors"
        )));
    };
    f(&cpu.as_slice::<f32>()?[start..end])
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn borrows_contiguous_f32_and_rejects_strided_or_other_dtypes() -> Result<()> {
        let t = Tensor::arange(0f32, 6.0, &Device::Cpu)?.reshape((2, 3))?;
        let sum = with_f32(&t.narrow(0, 1, 1)?, "test", |v| Ok(v.iter().sum::<f32>()))?;
        assert_eq!(sum, 3.0 + 4.0 + 5.0);
        let strided = with_f32(&t.t()?, "test kernel", |_| Ok(()));
        assert!(
            matches!(&strided, Err(EngineError::InvalidInput(m)) if m.contains("test kernel needs contiguous")),
            "{strided:?}"
        );
        assert!(with_f32(&t.to_dtype(DType::F16)?, "test", |_| Ok(())).is_err());
        Ok(())
    }
}
