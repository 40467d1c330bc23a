//! Weight matrices that are either dense tensors (safetensors, float GGUF) or quantized blocks
//! (GGUF Q8_0, Q4_K, …) multiplied without being expanded.

use std::sync::Arc;

use candle_core::quantized::{GgmlDType, QMatMul, QTensor};
use candle_core::{DType, Device, Module, Tensor};

use super::cpu_slice::with_f32;
use super::error::{EngineError, Result};
use super::grouped_matmul::{Product, Tasks, run};
use super::kquants;
use super::kquants::{Q4KMatrix, Q6KMatrix};
use super::kquants_x8::{Q4KX8Matrix, Q6KX8Matrix};
use super::q8_0::{self, Q8Matrix, Q8Product};

/// A bias-free linear layer `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub enum Linear {
    /// A dense weight in the compute dtype.
    Dense(candle_nn::Linear),
    /// Quantized blocks; the input is quantized on the fly by candle's kernels, like llama.cpp.
    Quantized(QMatMul),
    /// Q8_0 blocks on an AVX2 CPU, multiplied by the engine's own kernels ([`Q8Matrix`]).
    Q8_0(Arc<Q8Matrix>),
    /// Q4_K blocks on an AVX2 CPU, multiplied by the engine's own kernels.
    Q4K(Arc<Q4KMatrix>),
    /// Q4_K blocks of eight interleaved rows on an AVX2 CPU (rows a multiple of eight).
    Q4KX8(Arc<Q4KX8Matrix>),
    /// Q6_K blocks on an AVX2 CPU, multiplied by the engine's own kernels.
    Q6K(Arc<Q6KMatrix>),
    /// Q6_K blocks of eight interleaved rows on an AVX2 CPU (rows a multiple of eight).
    Q6KX8(Arc<Q6KX8Matrix>),
}

impl Linear {
    /// A dense layer over `weight` of shape `[out, in]`.
    pub fn dense(weight: Tensor) -> Self {
        Self::Dense(candle_nn::Linear::new(weight, None))
    }

    /// A layer over a GGUF tensor: float types are expanded to dense `dtype` weights (candle's
    /// quantized kernels gain nothing on them), block-quantized types stay quantized (Q8_0 on
    /// an AVX2 CPU in the engine's own layout).
    pub fn from_qtensor(weight: Arc<QTensor>, dtype: DType) -> Result<Self> {
        if is_float(weight.dtype()) {
            Ok(Self::dense(
                weight.dequantize(&weight.device())?.to_dtype(dtype)?,
            ))
        } else if let Some(matrix) = Q8Matrix::from_qtensor(&weight)? {
            Ok(Self::Q8_0(Arc::new(matrix)))
        } else if let Some(matrix) = Q4KX8Matrix::from_qtensor(&weight)? {
            Ok(Self::Q4KX8(Arc::new(matrix)))
        } else if let Some(matrix) = Q4KMatrix::from_qtensor(&weight)? {
            Ok(Self::Q4K(Arc::new(matrix)))
        } else if let Some(matrix) = Q6KX8Matrix::from_qtensor(&weight)? {
            Ok(Self::Q6KX8(Arc::new(matrix)))
        } else if let Some(matrix) = Q6KMatrix::from_qtensor(&weight)? {
            Ok(Self::Q6K(Arc::new(matrix)))
        } else {
            Ok(Self::Quantized(QMatMul::QTensor(weight)))
        }
    }

    /// Whether the engine's own CPU kernels multiply this weight (on the engine's CPU pool,
    /// not candle's operations on rayon's).
    pub fn on_engine_kernels(&self) -> bool {
        match self {
            Self::Dense(_) | Self::Quantized(_) => false,
            Self::Q8_0(_) | Self::Q4K(_) | Self::Q4KX8(_) | Self::Q6K(_) | Self::Q6KX8(_) => true,
        }
    }

    /// Bytes the weight occupies in memory (quantized blocks at their packed size).
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Dense(linear) => dense_bytes(linear.weight()),
            Self::Quantized(QMatMul::QTensor(q)) => q.storage_size_in_bytes() as u64,
            Self::Quantized(QMatMul::Tensor(t) | QMatMul::TensorF16(t)) => dense_bytes(t),
            Self::Q8_0(matrix) => matrix.bytes(),
            Self::Q4K(matrix) => matrix.bytes(),
            Self::Q4KX8(matrix) => matrix.bytes(),
            Self::Q6K(matrix) => matrix.bytes(),
            Self::Q6KX8(matrix) => matrix.bytes(),
        }
    }

    /// `x Wᵀ` for `x` of shape `[rows, in]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Dense(linear) => Ok(linear.forward(x)?),
            // The quantized CPU kernel reads its input as one contiguous slice.
            Self::Quantized(matmul) => Ok(matmul.forward(&x.contiguous()?)?),
            Self::Q8_0(m) => cpu_forward(m.rows(), m.cols(), x, |v, n| m.matmul(v, n)),
            Self::Q4K(m) => cpu_forward(m.rows(), m.cols(), x, |v, n| m.matmul(v, n)),
            Self::Q4KX8(m) => cpu_forward(m.rows(), m.cols(), x, |v, n| m.matmul(v, n)),
            Self::Q6K(m) => cpu_forward(m.rows(), m.cols(), x, |v, n| m.matmul(v, n)),
            Self::Q6KX8(m) => cpu_forward(m.rows(), m.cols(), x, |v, n| m.matmul(v, n)),
        }
    }

    /// `x Wᵀ` of each of `layers`, which share the input `x` (a layer's query, key and value
    /// projections; its gate and up projections): as [`Linear::forward`] on each, to the bit.
    ///
    /// Where the layers are all Q8_0, or all K-quant matrices in groups of eight rows (Q4_K_M's
    /// Q4_K and Q6_K), on the engine's CPU kernels, `x` is quantized once for all of them and
    /// their tasks share one hand-out on the engine's CPU pool. One at a time, the input was
    /// quantized for each on the stepping thread while the pool's helper waited, and each
    /// product ended with a wait for the slower thread.
    pub fn forward_each<const N: usize>(layers: [&Self; N], x: &Tensor) -> Result<[Tensor; N]> {
        let outputs = match Shared::of(&layers) {
            Some(shared) if x.device().is_cpu() => shared.forward(x)?,
            _ => layers
                .iter()
                .map(|layer| layer.forward(x))
                .collect::<Result<Vec<_>>>()?,
        };
        outputs.try_into().map_err(|outputs: Vec<Tensor>| {
            EngineError::InvalidInput(format!("{} outputs for {N} layers", outputs.len()))
        })
    }
}

/// Layers whose products can share one quantization of their input.
enum Shared<'a> {
    /// Q4_K and Q6_K matrices in groups of eight rows: Q8_K activations.
    KQuant(Vec<KQuantX8<'a>>),
    /// Q8_0 matrices: Q8_0 activations.
    Q8(Vec<&'a Q8Matrix>),
}

/// A K-quant matrix in groups of eight rows.
enum KQuantX8<'a> {
    Q4K(&'a Q4KX8Matrix),
    Q6K(&'a Q6KX8Matrix),
}

impl<'a> Shared<'a> {
    /// The layers' matrices, where they are all of one family on the engine's kernels.
    fn of(layers: &[&'a Linear]) -> Option<Self> {
        let k_quants = layers.iter().map(|layer| match layer {
            Linear::Q4KX8(m) => Some(KQuantX8::Q4K(m)),
            Linear::Q6KX8(m) => Some(KQuantX8::Q6K(m)),
            _ => None,
        });
        if let Some(matrices) = k_quants.collect::<Option<Vec<_>>>() {
            return Some(Self::KQuant(matrices));
        }
        let q8 = layers.iter().map(|layer| match layer {
            Linear::Q8_0(m) => Some(&**m),
            _ => None,
        });
        q8.collect::<Option<Vec<_>>>().map(Self::Q8)
    }

    /// Each matrix's (rows, cols).
    fn shapes(&self) -> Vec<(usize, usize)> {
        match self {
            Self::KQuant(matrices) => matrices
                .iter()
                .map(|matrix| match matrix {
                    KQuantX8::Q4K(m) => (m.rows(), m.cols()),
                    KQuantX8::Q6K(m) => (m.rows(), m.cols()),
                })
                .collect(),
            Self::Q8(matrices) => matrices.iter().map(|m| (m.rows(), m.cols())).collect(),
        }
    }

    /// [`Linear::forward_each`]: the input quantized once, the products' tasks handed out
    /// together.
    fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let dims = x.dims();
        let Some((&k, leading)) = dims.split_last() else {
            return Err(EngineError::InvalidInput(
                "a linear layer's input needs a dimension".into(),
            ));
        };
        let shapes = self.shapes();
        if let Some((_, cols)) = shapes.iter().find(|(_, cols)| *cols != k) {
            return Err(EngineError::InvalidInput(format!(
                "input of {k} features for a layer of {cols}"
            )));
        }
        let m = leading.iter().product::<usize>();
        let input = x.to_dtype(DType::F32)?.contiguous()?;
        let mut outs: Vec<Vec<f32>> = shapes
            .iter()
            .map(|(rows, _)| vec![0f32; m * rows])
            .collect();
        with_f32(&input, "the engine's quantized kernels", |values| {
            if values.len() != m * k {
                return Err(EngineError::InvalidInput(format!(
                    "{} input values are not {m} rows of {k}",
                    values.len()
                )));
            }
            match self {
                Self::KQuant(matrices) => {
                    let act = kquants::quantize_rows(values, k);
                    let products = matrices
                        .iter()
                        .zip(outs.iter_mut())
                        .map(|(matrix, out)| -> Result<Box<dyn Tasks + '_>> {
                            Ok(match matrix {
                                KQuantX8::Q4K(m4) => Box::new(Product::new(*m4, &act, m, out)?),
                                KQuantX8::Q6K(m6) => Box::new(Product::new(*m6, &act, m, out)?),
                            })
                        })
                        .collect::<Result<Vec<_>>>()?;
                    run(&products.iter().map(|p| p.as_ref()).collect::<Vec<_>>());
                }
                Self::Q8(matrices) => {
                    let act = q8_0::quantize_rows(values, k);
                    let products = matrices
                        .iter()
                        .zip(outs.iter_mut())
                        .map(|(matrix, out)| Q8Product::new(matrix, &act, m, out))
                        .collect::<Result<Vec<_>>>()?;
                    run(&products.iter().map(|p| p as &dyn Tasks).collect::<Vec<_>>());
                }
            }
            Ok(())
        })?;
        shapes
            .iter()
            .zip(outs)
            .map(|(&(rows, _), out)| {
                let mut shape = leading.to_vec();
                shape.push(rows);
                Ok(Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
            })
            .collect()
    }
}

/// The token embedding table, dense or quantized.
#[derive(Debug, Clone)]
pub enum Embedding {
    /// A dense `[vocab, hidden]` table in the compute dtype.
    Dense(Tensor),
    /// Quantized rows, expanded to f32 one looked-up row at a time.
    Quantized(Arc<QTensor>),
    /// Q8_0 rows in the engine's own layout (shared with a tied output projection).
    Q8_0(Arc<Q8Matrix>),
    /// Q4_K rows (shared with a tied output projection).
    Q4K(Arc<Q4KMatrix>),
    /// Q4_K rows in blocks of eight (shared with a tied output projection).
    Q4KX8(Arc<Q4KX8Matrix>),
    /// Q6_K rows (shared with a tied output projection).
    Q6K(Arc<Q6KMatrix>),
    /// Q6_K rows in blocks of eight (shared with a tied output projection).
    Q6KX8(Arc<Q6KX8Matrix>),
}

impl Embedding {
    /// A table over a GGUF tensor: float types are expanded to dense `dtype`, block-quantized
    /// types stay quantized.
    pub fn from_qtensor(table: Arc<QTensor>, dtype: DType) -> Result<Self> {
        if is_float(table.dtype()) {
            Ok(Self::Dense(
                table.dequantize(&table.device())?.to_dtype(dtype)?,
            ))
        } else if let Some(matrix) = Q8Matrix::from_qtensor(&table)? {
            Ok(Self::Q8_0(Arc::new(matrix)))
        } else if let Some(matrix) = Q4KX8Matrix::from_qtensor(&table)? {
            Ok(Self::Q4KX8(Arc::new(matrix)))
        } else if let Some(matrix) = Q4KMatrix::from_qtensor(&table)? {
            Ok(Self::Q4K(Arc::new(matrix)))
        } else if let Some(matrix) = Q6KX8Matrix::from_qtensor(&table)? {
            Ok(Self::Q6KX8(Arc::new(matrix)))
        } else if let Some(matrix) = Q6KMatrix::from_qtensor(&table)? {
            Ok(Self::Q6K(Arc::new(matrix)))
        } else {
            Ok(Self::Quantized(table))
        }
    }

    /// The rows of `ids` (a 1-D u32 tensor), as `[ids, hidden]` in `dtype`.
    pub fn lookup(&self, ids: &Tensor, dtype: DType) -> Result<Tensor> {
        match self {
            Self::Dense(table) => Ok(table.index_select(ids, 0)?),
            Self::Quantized(table) => Ok(table.embedding(ids)?.to_dtype(dtype)?),
            Self::Q8_0(table) => cpu_rows(table.cols(), ids, dtype, |i| table.rows_f32(i)),
            Self::Q4K(table) => cpu_rows(table.cols(), ids, dtype, |i| table.rows_f32(i)),
            Self::Q4KX8(table) => cpu_rows(table.cols(), ids, dtype, |i| table.rows_f32(i)),
            Self::Q6K(table) => cpu_rows(table.cols(), ids, dtype, |i| table.rows_f32(i)),
            Self::Q6KX8(table) => cpu_rows(table.cols(), ids, dtype, |i| table.rows_f32(i)),
        }
    }

    /// Bytes the table occupies in memory (quantized blocks at their packed size).
    pub fn bytes(&self) -> u64 {
        match self {
            Self::Dense(table) => dense_bytes(table),
            Self::Quantized(table) => table.storage_size_in_bytes() as u64,
            Self::Q8_0(table) => table.bytes(),
            Self::Q4K(table) => table.bytes(),
            Self::Q4KX8(table) => table.bytes(),
            Self::Q6K(table) => table.bytes(),
            Self::Q6KX8(table) => table.bytes(),
        }
    }

    /// The output projection that reuses this table (tied embeddings); shares its memory.
    pub fn tied_output(&self) -> Linear {
        match self {
            Self::Dense(table) => Linear::dense(table.clone()),
            Self::Quantized(table) => Linear::Quantized(QMatMul::QTensor(Arc::clone(table))),
            Self::Q8_0(table) => Linear::Q8_0(Arc::clone(table)),
            Self::Q4K(table) => Linear::Q4K(Arc::clone(table)),
            Self::Q4KX8(table) => Linear::Q4KX8(Arc::clone(table)),
            Self::Q6K(table) => Linear::Q6K(Arc::clone(table)),
            Self::Q6KX8(table) => Linear::Q6KX8(Arc::clone(table)),
        }
    }
}

/// Rows `ids` of a table in the engine's own layout, expanded by `expand`, as `[ids, cols]`.
fn cpu_rows(
    cols: usize,
    ids: &Tensor,
    dtype: DType,
    expand: impl Fn(&[u32]) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let ids = ids.to_vec1::<u32>()?;
    let rows = expand(&ids)?;
    Ok(Tensor::from_vec(rows, (ids.len(), cols), &Device::Cpu)?.to_dtype(dtype)?)
}

/// `x Wᵀ` through the engine's own CPU kernels (`matmul(values, m)` for a `[rows, cols]`
/// weight): `x` (`[…, in]`, any float dtype) is read as f32, the result has `x`'s leading
/// dimensions and dtype.
fn cpu_forward(
    rows: usize,
    cols: usize,
    x: &Tensor,
    matmul: impl Fn(&[f32], usize) -> Result<Vec<f32>>,
) -> Result<Tensor> {
    let dims = x.dims();
    let Some((&k, leading)) = dims.split_last() else {
        return Err(EngineError::InvalidInput(
            "a linear layer's input needs a dimension".into(),
        ));
    };
    if k != cols {
        return Err(EngineError::InvalidInput(format!(
            "input of {k} features for a layer of {cols}"
        )));
    }
    let m = leading.iter().product::<usize>();
    let input = x.to_dtype(DType::F32)?.contiguous()?;
    let out = with_f32(&input, "the engine's quantized kernels", |values| {
        matmul(values, m)
    })?;
    let mut shape = leading.to_vec();
    shape.push(rows);
    Ok(Tensor::from_vec(out, shape, &Device::Cpu)?.to_dtype(x.dtype())?)
}

/// Bytes of a dense tensor's elements.
fn dense_bytes(tensor: &Tensor) -> u64 {
    (tensor.elem_count() * tensor.dtype().size_in_bytes()) as u64
}

/// Whether a GGUF tensor type is a plain float type rather than quantized blocks.
pub fn is_float(dtype: GgmlDType) -> bool {
    matches!(dtype, GgmlDType::F32 | GgmlDType::F16 | GgmlDType::BF16)
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn ramp(rows: usize, cols: usize) -> Result<Tensor> {
        let values: Vec<f32> = (0..rows * cols)
            .map(|i| ((i * 37 % 101) as f32 - 50.0) / 500.0)
            .collect();
        Ok(Tensor::from_vec(values, (rows, cols), &Device::Cpu)?)
    }

    #[test]
    fn quantized_linear_and_embedding_follow_the_dense_ones() -> Result<()> {
        let weight = ramp(8, 64)?;
        let x = ramp(3, 64)?;
        let q = Arc::new(QTensor::quantize(&weight, GgmlDType::Q8_0)?);
        let dense = Linear::dense(weight.clone()).forward(&x)?;
        let quantized = Linear::from_qtensor(Arc::clone(&q), DType::F32)?;
        assert!(matches!(quantized, Linear::Quantized(_) | Linear::Q8_0(_)));
        let diff = (dense - quantized.forward(&x)?)?.abs()?.max_all()?;
        assert!(diff.to_scalar::<f32>()? < 1e-2, "{diff}");

        let ids = Tensor::new(&[5u32, 0, 5], &Device::Cpu)?;
        let rows = Embedding::from_qtensor(q, DType::F32)?.lookup(&ids, DType::F32)?;
        let expected = weight.index_select(&ids, 0)?;
        let diff = (rows - expected)?.abs()?.max_all()?.to_scalar::<f32>()?;
        // Q8_0 keeps each value within half a step of its block's scale (max |w| / 127).
        assert!(diff <= 0.1 / 127.0, "{diff}");
        Ok(())
    }

    #[test]
    fn float_gguf_tensors_become_dense() -> Result<()> {
        let q = Arc::new(QTensor::quantize(&ramp(4, 32)?, GgmlDType::F16)?);
        assert!(matches!(
            Linear::from_qtensor(Arc::clone(&q), DType::F32)?,
            Linear::Dense(_)
        ));
        assert!(matches!(
            Embedding::from_qtensor(q, DType::F32)?,
            Embedding::Dense(_)
        ));
        Ok(())
    }

    #[test]
    fn layers_sharing_an_input_give_each_layers_own_bits() -> Result<()> {
        // Q4_K and Q6_K layers of different heights (rows in whole groups of eight, some in
        // pairs, one odd group), Q8_0 layers (quads in pairs and an odd one), and a dense
        // one, which takes the one-at-a-time path, as does a mix of families.
        let hidden = 512;
        let quantized = |rows: usize, scale: f64, dtype: GgmlDType| -> Result<Linear> {
            let weight = (ramp(rows, hidden)? * scale)?;
            Linear::from_qtensor(Arc::new(QTensor::quantize(&weight, dtype)?), DType::F32)
        };
        let q4 = quantized(48, 1.0, GgmlDType::Q4K)?;
        let q6 = quantized(24, 3.0, GgmlDType::Q6K)?;
        let q8_tall = quantized(40, 2.0, GgmlDType::Q8_0)?;
        let q8_short = quantized(12, 0.5, GgmlDType::Q8_0)?;
        let dense = Linear::dense(ramp(16, hidden)?);
        // Where the CPU runs the engine's kernels, those groups take the shared path.
        let supported = crate::engine::q8_0::supported();
        assert_eq!(Shared::of(&[&q4, &q6]).is_some(), supported);
        assert_eq!(Shared::of(&[&q8_tall, &q8_short]).is_some(), supported);
        assert!(Shared::of(&[&q4, &q8_tall]).is_none());
        assert!(Shared::of(&[&q6, &dense]).is_none());
        let bits = |t: &Tensor| -> Result<Vec<u32>> {
            Ok(t.flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .map(|f| f.to_bits())
                .collect())
        };
        for m in [1, 3, 8, 11] {
            let x = (ramp(m, hidden)? * 7.0)?;
            let [a, b] = Linear::forward_each([&q4, &q6], &x)?;
            let [c, d, e] = Linear::forward_each([&q8_short, &q8_tall, &q8_short], &x)?;
            let [f, g, h] = Linear::forward_each([&q6, &dense, &q8_tall], &x)?;
            let pairs = [
                (a, &q4),
                (b, &q6),
                (c, &q8_short),
                (d, &q8_tall),
                (e, &q8_short),
                (f, &q6),
                (g, &dense),
                (h, &q8_tall),
            ];
            for (i, (got, layer)) in pairs.into_iter().enumerate() {
                let want = layer.forward(&x)?;
                assert_eq!(got.dims(), want.dims());
                assert_eq!(bits(&got)?, bits(&want)?, "{m} rows, output {i}");
            }
        }
        // A layer of another width is refused, whichever path it takes.
        let narrow = Linear::from_qtensor(
            Arc::new(QTensor::quantize(&ramp(8, 256)?, GgmlDType::Q4K)?),
            DType::F32,
        )?;
        let x = ramp(2, hidden)?;
        let err = Linear::forward_each([&q4, &narrow], &x)
            .err()
            .map(|e| e.to_string());
        assert!(
            err.as_deref()
                .is_some_and(|e| e.contains("512 features for a layer of 256")),
            "{err:?}"
        );
        Ok(())
    }
}
