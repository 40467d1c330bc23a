//! The key/value memory of one model: per layer, one key and one value tensor of shape
//! `[kv_heads, rows, head_dim]` that every sequence's cache ([`super::KvCache`]) takes a
//! contiguous run of rows (an extent) from.
//!
//! One tensor per layer lets a forward step write the new keys and values of every sequence
//! in the batch with one scatter per layer, and gather the histories of all decoding sequences
//! with one index-select per layer; on a GPU that turns per-sequence kernel launches into
//! per-batch ones. A sequence's extent is contiguous, so a single sequence still reads its
//! history in place (a narrowed view, no copy).
//!
//! Rows are handed out first-fit from a free list that merges neighbours; when no free run is
//! long enough the tensors grow (at least doubling, with the old rows copied to the same
//! positions), so extents keep their offsets across growth. A pool may have a row cap (the
//! KV-cache budget): growth then stops at the cap where that is enough, and a *capped*
//! request that only growth past the cap could serve is refused, so that its owner can free
//! rows first (the scheduler evicts prefix-cache entries) before growing past it.

use std::sync::{Mutex, MutexGuard};

use candle_core::{DType, Device, Tensor};
use half::vec::HalfBitsVecExt;

use super::error::{EngineError, Result};

/// Fewest rows the pool allocates when it first grows.
const MIN_ROWS: usize = 256;

/// A run of rows `[start, start + len)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Extent {
    pub(crate) start: usize,
    pub(crate) len: usize,
}

/// The shared key/value tensors of a model and their free rows.
#[derive(Debug)]
pub struct KvPool {
    /// Per layer, the device its keys and values live on (the layer's, see
    /// [`super::Placement`]).
    devices: Vec<Device>,
    kv_heads: usize,
    head_dim: usize,
    dtype: DType,
    state: Mutex<PoolState>,
}

#[derive(Debug, Default)]
struct PoolState {
    /// Per layer `(keys, values)`, each `[kv_heads, rows, head_dim]`; empty until first use.
    tensors: Vec<(Tensor, Tensor)>,
    rows: usize,
    /// Free runs, sorted by start, never adjacent to each other.
    free: Vec<Extent>,
    /// One past the highest row ever handed out: the rows above it were never written, so
    /// growth does not copy them (and on the CPU their pages are never touched).
    high_water: usize,
    /// The most rows the pool grows to where that suffices (see the module docs).
    cap: Option<usize>,
}

impl KvPool {
    /// An empty pool for a model's layer count, key/value heads and head size; nothing is
    /// allocated until a cache reserves rows.
    pub fn new(
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Self {
        Self::placed(vec![device.clone(); layers], kv_heads, head_dim, dtype)
    }

    /// An empty pool whose layer `i` lives on `devices[i]` (a model split over several
    /// devices).
    pub fn placed(devices: Vec<Device>, kv_heads: usize, head_dim: usize, dtype: DType) -> Self {
        Self {
            devices,
            kv_heads,
            head_dim,
            dtype,
            state: Mutex::new(PoolState::default()),
        }
    }

    /// The element type of the keys and values.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Layers the pool holds keys and values for.
    pub fn num_layers(&self) -> usize {
        self.devices.len()
    }

    /// Rows currently allocated (free or taken): the pool's memory is
    /// `rows × layers × 2 × kv_heads × head_dim` elements.
    pub fn rows(&self) -> usize {
        self.lock().rows
    }

    /// Caps the pool's growth at `rows` (the KV-cache budget, in tokens).
    pub fn set_row_cap(&self, rows: usize) {
        self.lock().cap = Some(rows);
    }

    /// Rows currently free.
    pub fn free_rows(&self) -> usize {
        self.lock().free.iter().map(|e| e.len).sum()
    }

    /// The key and value tensors of `layer` (`[kv_heads, rows, head_dim]`), sharing the pool's
    /// storage: writes through them are the pool's.
    pub(crate) fn layer(&self, layer: usize) -> Result<(Tensor, Tensor)> {
        self.lock().tensors.get(layer).cloned().ok_or_else(|| {
            EngineError::InvalidInput(format!(
                "layer {layer} is outside a key/value pool of {} layers (or it is empty)",
                self.devices.len()
            ))
        })
    }

    /// Takes a free run of `len` rows, growing the pool when none is long enough. `None` when
    /// `capped` and only growing past the cap would make room.
    pub(crate) fn allocate(&self, len: usize, capped: bool) -> Result<Option<Extent>> {
        let mut state = self.lock();
        if let Some(extent) = state.take(len) {
            return Ok(Some(extent));
        }
        if !self.grow(&mut state, len, capped)? {
            return Ok(None);
        }
        state.take(len).map(Some).ok_or_else(|| {
            EngineError::InvalidInput(format!("the key/value pool could not grow to {len} rows"))
        })
    }

    /// Lengthens `extent` in place to `len` rows where the rows right after it are free,
    /// growing the pool first when the extent ends at the pool's last used row. `None` where
    /// another run is in the way, or when `capped` and only growing past the cap would make
    /// room: the caller then moves to a new run. Growing in place copies nothing and leaves no
    /// hole behind, so caches that grow a step at a time (a prompt fed in chunks) do not
    /// scatter freed runs over the pool.
    pub(crate) fn extend(
        &self,
        extent: Extent,
        len: usize,
        capped: bool,
    ) -> Result<Option<Extent>> {
        let Some(more) = len.checked_sub(extent.len).filter(|&m| m > 0) else {
            return Ok(Some(extent));
        };
        let end = extent.start + extent.len;
        let mut state = self.lock();
        let after = state.free.iter().position(|e| e.start == end);
        let room = after.map_or(0, |i| state.free[i].len);
        if room < more {
            let at_top = after.map_or(end == state.rows, |i| {
                state.free[i].start + state.free[i].len == state.rows
            });
            if !at_top || !self.grow(&mut state, more, capped)? {
                return Ok(None);
            }
        }
        let Some(index) = state
            .free
            .iter()
            .position(|e| e.start == end && e.len >= more)
        else {
            return Ok(None);
        };
        state.take_from(index, more);
        Ok(Some(Extent {
            start: extent.start,
            len,
        }))
    }

    /// Gives a run back.
    pub(crate) fn release(&self, extent: Extent) {
        if extent.len > 0 {
            self.lock().put(extent);
        }
    }

    /// Copies the first `len` rows of `from` to the start of `to`, in every layer.
    pub(crate) fn copy_rows(&self, from: Extent, to: Extent, len: usize) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let tensors = self.lock().tensors.clone();
        for (k, v) in &tensors {
            let keys = k.narrow(1, from.start, len)?.contiguous()?;
            let values = v.narrow(1, from.start, len)?.contiguous()?;
            k.slice_set(&keys, 1, to.start)?;
            v.slice_set(&values, 1, to.start)?;
        }
        Ok(())
    }

    /// Grows the tensors so that a free run of `len` rows exists at the end: to at least
    /// twice the rows, but no further than the cap where the cap is enough. Past the cap only
    /// when not `capped`; otherwise returns false and grows nothing.
    fn grow(&self, state: &mut PoolState, len: usize, capped: bool) -> Result<bool> {
        let trailing = state
            .free
            .last()
            .filter(|e| e.start + e.len == state.rows)
            .map_or(0, |e| e.len);
        let needed = state.rows + len.saturating_sub(trailing);
        let mut rows = (state.rows * 2).max(needed).max(MIN_ROWS);
        if let Some(cap) = state.cap {
            if needed <= cap {
                rows = rows.min(cap).max(needed);
            } else if capped {
                return Ok(false);
            }
        }
        if rows <= state.rows {
            return Ok(true);
        }
        let shape = (self.kv_heads, rows, self.head_dim);
        let written = state.high_water;
        // Layer by layer, each old tensor dropped as soon as it is copied: growing holds one
        // layer twice at most, not the whole cache (the peak memory of a growth). Only the
        // rows below the high-water mark are copied: the others were never written.
        let grown = |old: Option<&Tensor>, device: &Device| -> Result<Tensor> {
            let new = zeros(shape, self.dtype, device)?;
            if let Some(old) = old
                && written > 0
            {
                new.slice_set(&old.narrow(1, 0, written)?.contiguous()?, 1, 0)?;
            }
            Ok(new)
        };
        for (layer, device) in self.devices.iter().enumerate() {
            let (k, v) = match state.tensors.get(layer) {
                Some((old_k, old_v)) => (grown(Some(old_k), device)?, grown(Some(old_v), device)?),
                None => (grown(None, device)?, grown(None, device)?),
            };
            match state.tensors.get_mut(layer) {
                Some(slot) => *slot = (k, v),
                None => state.tensors.push((k, v)),
            }
        }
        let added = Extent {
            start: state.rows,
            len: rows - state.rows,
        };
        state.rows = rows;
        state.put(added);
        Ok(true)
    }

    fn lock(&self) -> MutexGuard<'_, PoolState> {
        // A panic elsewhere while holding the lock leaves the free list consistent (every
        // update is a single push/remove), so the state is still usable.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// A zeroed pool tensor. On the CPU every dtype's zeros come from the allocator's zeroed
/// memory (a fresh mapping), whose pages become resident only when a row is written: candle
/// fills 16-bit zeros element by element, which would make a grown pool resident at once.
fn zeros(shape: (usize, usize, usize), dtype: DType, device: &Device) -> Result<Tensor> {
    let count = shape.0 * shape.1 * shape.2;
    match dtype {
        DType::F16 if device.is_cpu() => {
            let values: Vec<half::f16> = vec![0u16; count].reinterpret_into();
            Ok(Tensor::from_vec(values, shape, device)?)
        }
        DType::BF16 if device.is_cpu() => {
            let values: Vec<half::bf16> = vec![0u16; count].reinterpret_into();
            Ok(Tensor::from_vec(values, shape, device)?)
        }
        _ => Ok(Tensor::zeros(shape, dtype, device)?),
    }
}

impl PoolState {
    /// First fit: the lowest free run of at least `len` rows, split if longer.
    fn take(&mut self, len: usize) -> Option<Extent> {
        let index = self.free.iter().position(|e| e.len >= len)?;
        Some(self.take_from(index, len))
    }

    /// The first `len` rows of free run `index` (at least that long), split off it.
    fn take_from(&mut self, index: usize, len: usize) -> Extent {
        let run = self.free[index];
        self.high_water = self.high_water.max(run.start + len);
        if run.len == len {
            self.free.remove(index);
        } else {
            self.free[index] = Extent {
                start: run.start + len,
                len: run.len - len,
            };
        }
        Extent {
            start: run.start,
            len,
        }
    }

    /// Returns a run to the free list, merging it with free neighbours.
    fn put(&mut self, extent: Extent) {
        let index = self.free.partition_point(|e| e.start < extent.start);
        self.free.insert(index, extent);
        if index + 1 < self.free.len() {
            let (here, next) = (self.free[index], self.free[index + 1]);
            if here.start + here.len == next.start {
                self.free[index].len += next.len;
                self.free.remove(index + 1);
            }
        }
        if index > 0 {
            let (prev, here) = (self.free[index - 1], self.free[index]);
            if prev.start + prev.len == here.start {
                self.free[index - 1].len += here.len;
                self.free.remove(index);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool() -> KvPool {
        KvPool::new(2, 2, 3, DType::F32, &Device::Cpu)
    }

    #[test]
    fn first_fit_splits_and_freed_neighbours_merge() -> Result<()> {
        let pool = pool();
        let a = pool.allocate(10, false)?.expect("uncapped");
        let b = pool.allocate(20, false)?.expect("uncapped");
        let c = pool.allocate(5, false)?.expect("uncapped");
        assert_eq!((a.start, b.start, c.start), (0, 10, 30));
        assert_eq!(pool.rows(), MIN_ROWS);
        pool.release(a);
        pool.release(c);
        // The freed first run is reused by a request that fits it.
        assert_eq!(pool.allocate(4, false)?.expect("uncapped").start, 0);
        pool.release(Extent { start: 0, len: 4 });
        pool.release(b);
        // Everything is free again, as one run.
        assert_eq!(pool.free_rows(), MIN_ROWS);
        assert_eq!(
            pool.lock().free,
            vec![Extent {
                start: 0,
                len: MIN_ROWS
            }]
        );
        Ok(())
    }

    #[test]
    fn runs_lengthen_in_place_over_free_rows_and_at_the_top() -> Result<()> {
        let pool = pool();
        let a = pool.allocate(10, false)?.expect("uncapped");
        let a = pool
            .extend(a, 20, false)?
            .expect("the rows after it are free");
        assert_eq!(a, Extent { start: 0, len: 20 });
        let b = pool.allocate(5, false)?.expect("uncapped");
        assert_eq!(b.start, 20);
        assert_eq!(pool.extend(a, 30, false)?, None, "b is in the way");
        assert_eq!(pool.free_rows(), MIN_ROWS - 25);
        pool.release(b);
        let a = pool.extend(a, 30, false)?.expect("b left");
        assert_eq!(pool.free_rows(), MIN_ROWS - 30);
        // At the top: the pool grows under the run instead of moving it.
        let a = pool
            .extend(a, MIN_ROWS + 40, false)?
            .expect("the pool grows");
        assert_eq!(
            a,
            Extent {
                start: 0,
                len: MIN_ROWS + 40
            }
        );
        assert_eq!(pool.rows(), 2 * MIN_ROWS);
        assert_eq!(pool.free_rows(), MIN_ROWS - 40);
        // Shorter or equal lengths change nothing.
        assert_eq!(pool.extend(a, 5, false)?, Some(a));
        pool.release(a);
        assert_eq!(pool.free_rows(), pool.rows());
        Ok(())
    }

    #[test]
    fn growth_stops_at_the_cap_and_only_uncapped_requests_pass_it() -> Result<()> {
        let pool = pool();
        pool.set_row_cap(300);
        let a = pool.allocate(200, true)?.expect("within the cap");
        assert_eq!(pool.rows(), MIN_ROWS);
        // Doubling would give 512 rows; the cap is enough, so the pool stops at 300.
        let b = pool.allocate(100, true)?.expect("within the cap");
        assert_eq!((b.start, pool.rows()), (200, 300));
        // No room left below the cap: a capped request is refused and nothing grows ...
        assert_eq!(pool.allocate(50, true)?, None);
        assert_eq!(pool.extend(b, 150, true)?, None);
        assert_eq!(pool.rows(), 300);
        // ... until rows are freed, or an uncapped request grows the pool past the cap.
        pool.release(a);
        assert_eq!(pool.allocate(50, true)?.map(|e| e.start), Some(0));
        let c = pool.allocate(300, false)?.expect("uncapped");
        assert_eq!((c.start, pool.rows()), (300, 600));
        let b = pool.extend(b, 150, false)?;
        assert_eq!(b, None, "c follows b");
        Ok(())
    }

    #[test]
    fn a_16_bit_pool_starts_zeroed_and_keeps_rows_through_growth() -> Result<()> {
        for dtype in [DType::F16, DType::BF16] {
            let pool = KvPool::new(1, 2, 3, dtype, &Device::Cpu);
            let a = pool.allocate(4, false)?.expect("uncapped");
            let (k, v) = pool.layer(0)?;
            assert_eq!((k.dtype(), v.dtype()), (dtype, dtype));
            assert!(
                k.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|&x| x == 0.0)
            );
            let data = Tensor::arange(1f32, 25.0, &Device::Cpu)?
                .reshape((2, 4, 3))?
                .to_dtype(dtype)?;
            k.slice_set(&data, 1, a.start)?;
            let _big = pool.allocate(2 * MIN_ROWS, false)?.expect("uncapped");
            let (k, _) = pool.layer(0)?;
            let kept = k.narrow(1, a.start, 4)?.to_dtype(DType::F32)?;
            assert_eq!(
                kept.flatten_all()?.to_vec1::<f32>()?,
                data.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
                "{dtype:?}"
            );
            let above = k.narrow(1, 4, k.dim(1)? - 4)?.to_dtype(DType::F32)?;
            assert!(
                above
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .all(|&x| x == 0.0)
            );
        }
        Ok(())
    }

    #[test]
    fn growth_keeps_rows_in_place() -> Result<()> {
        let pool = pool();
        let a = pool.allocate(3, false)?.expect("uncapped");
        let (k, _) = pool.layer(1)?;
        let data = Tensor::arange(0f32, 18.0, &Device::Cpu)?.reshape((2, 3, 3))?;
        k.slice_set(&data, 1, a.start)?;
        // Larger than what is free: the pool grows past doubling.
        let big = pool.allocate(2 * MIN_ROWS, false)?.expect("uncapped");
        assert_eq!(big.start, 3);
        assert_eq!(pool.rows(), 3 + 2 * MIN_ROWS);
        let (k, _) = pool.layer(1)?;
        assert_eq!(
            k.narrow(1, a.start, 3)?
                .contiguous()?
                .flatten_all()?
                .to_vec1::<f32>()?,
            data.flatten_all()?.to_vec1::<f32>()?
        );
        Ok(())
    }
}
