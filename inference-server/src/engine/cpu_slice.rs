//! Borrowing a CPU tensor's f32 elements in place, for the engine's own CPU kernels, and the
//! key/value pool's rows, f32 or f16, for the attention kernels.

#![allow(unsafe_code)]

use std::ops::Range;

use candle_core::{CpuStorage, Storage, Tensor};
use half::f16;
use half::slice::HalfFloatSliceExt;

use super::error::{EngineError, Result};

/// Runs `f` on the f32 elements of a contiguous CPU tensor. `kernel` names the caller in
/// the error a tensor on another device or with a strided layout gets.
pub(super) fn with_f32<R>(
    t: &Tensor,
    kernel: &str,
    f: impl FnOnce(&[f32]) -> Result<R>,
) -> Result<R> {
    with_cpu_storage(t, kernel, |cpu, elements| {
        f(&cpu.as_slice::<f32>()?[elements])
    })
}

/// Runs `f` on the CPU storage of a contiguous tensor and the range of its elements there.
fn with_cpu_storage<R>(
    t: &Tensor,
    kernel: &str,
    f: impl FnOnce(&CpuStorage, Range<usize>) -> Result<R>,
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
    f(cpu, start..end)
}

/// Keys or values of the key/value pool, as the attention kernels read them: f32 in place,
/// or f16 converted to f32 a block at a time (so a block is read from memory at half the
/// bytes and converted in L1).
#[derive(Debug, Clone, Copy)]
pub(super) enum KvRows<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
}

impl<'a> KvRows<'a> {
    /// Elements held.
    pub(super) fn len(&self) -> usize {
        match self {
            Self::F32(v) => v.len(),
            Self::F16(v) => v.len(),
        }
    }

    /// Whether no element is held.
    pub(super) fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Elements `range`, still in the pool's type.
    pub(super) fn slice(&self, range: Range<usize>) -> KvRows<'a> {
        match self {
            Self::F32(v) => Self::F32(&v[range]),
            Self::F16(v) => Self::F16(&v[range]),
        }
    }

    /// Elements `range` as f32: in place for f32 rows, converted into `buffer` (whose
    /// allocation the caller keeps between blocks) for f16 rows.
    pub(super) fn f32_run<'b>(&self, range: Range<usize>, buffer: &'b mut Vec<f32>) -> &'b [f32]
    where
        'a: 'b,
    {
        match self {
            Self::F32(v) => &v[range],
            Self::F16(v) => {
                let run = &v[range];
                // Every element is overwritten: only a longer run than the last one fills
                // (and a shorter one truncates) before the conversion.
                buffer.resize(run.len(), 0.0);
                f16_to_f32(run, buffer);
                buffer
            }
        }
    }
}

/// Converts `src` into `dst` (of the same length): eight values an instruction with F16C.
/// half's slice conversion also uses F16C, but through a call per eight values that made an
/// f16 cache slower to read than an f32 one in decode attention.
fn f16_to_f32(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: AVX and F16C were detected just now.
        unsafe { f16c::to_f32(src, dst) };
        return;
    }
    src.convert_to_f32_slice(dst);
}

#[cfg(target_arch = "x86_64")]
mod f16c {
    use std::arch::x86_64::*;

    use half::f16;
    use half::slice::HalfFloatSliceExt;

    /// [`super::f16_to_f32`] for a CPU with AVX and F16C.
    #[target_feature(enable = "avx,f16c")]
    pub(super) fn to_f32(src: &[f16], dst: &mut [f32]) {
        let (runs, tail) = src.as_chunks::<8>();
        let (out_runs, out_tail) = dst.as_chunks_mut::<8>();
        for (run, out) in runs.iter().zip(out_runs) {
            // SAFETY: `run` is eight f16 values (16 bytes) and `out` eight floats, the
            // widths of the unaligned load and store.
            unsafe {
                let halves = _mm_loadu_si128(run.as_ptr().cast());
                _mm256_storeu_ps(out.as_mut_ptr(), _mm256_cvtph_ps(halves));
            }
        }
        tail.convert_to_f32_slice(out_tail);
    }
}

/// Runs `f` on the elements of a contiguous CPU tensor of f32 or f16 (a layer of the
/// key/value pool). `kernel` names the caller in the error any other tensor gets.
pub(super) fn with_kv<R>(
    t: &Tensor,
    kernel: &str,
    f: impl FnOnce(KvRows<'_>) -> Result<R>,
) -> Result<R> {
    with_cpu_storage(t, kernel, |cpu, elements| match t.dtype() {
        candle_core::DType::F16 => f(KvRows::F16(&cpu.as_slice::<f16>()?[elements])),
        _ => f(KvRows::F32(&cpu.as_slice::<f32>()?[elements])),
    })
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

    #[test]
    fn kv_rows_read_f32_in_place_and_f16_converted() -> Result<()> {
        let t = Tensor::arange(0f32, 12.0, &Device::Cpu)?.reshape((3, 4))?;
        let mut buffer = Vec::new();
        for dtype in [DType::F32, DType::F16] {
            let view = t.to_dtype(dtype)?.narrow(0, 1, 2)?;
            let got = with_kv(&view, "test", |rows| {
                assert_eq!(rows.len(), 8);
                let tail = rows.slice(2..8);
                Ok(tail.f32_run(1..4, &mut buffer).to_vec())
            })?;
            assert_eq!(got, [7.0, 8.0, 9.0], "{dtype:?}");
        }
        assert!(with_kv(&t.t()?, "test", |_| Ok(())).is_err());
        // Runs of eight (F16C where the CPU has it) and a tail, against half's own conversion;
        // subnormals, infinities and a NaN included.
        let halves: Vec<f16> = (0..37)
            .map(|i| f16::from_f32((i as f32 - 18.0) * 0.37))
            .chain([
                f16::MIN_POSITIVE_SUBNORMAL,
                f16::INFINITY,
                f16::NEG_INFINITY,
            ])
            .collect();
        let mut got = vec![0f32; halves.len()];
        f16_to_f32(&halves, &mut got);
        for (h, g) in halves.iter().zip(&got) {
            assert_eq!(h.to_f32().to_bits(), g.to_bits());
        }
        let mut nan = [0f32; 9];
        f16_to_f32(&[f16::NAN; 9], &mut nan);
        assert!(nan.iter().all(|x| x.is_nan()));
        assert!(with_kv(&t.to_dtype(DType::BF16)?, "test", |_| Ok(())).is_err());
        Ok(())
    }
}
