//! Which device each part of a model lives on when its weights are split over several GPUs
//! (llama.cpp's `--split-mode layer`).
//!
//! The decoder layers are cut into consecutive runs, one run a device, so that every device
//! holds about the same memory: its layers' weights and their keys and values at the
//! key/value budget. The token embedding, the final norm and the output projection stay on the
//! first device, whose run of layers is shorter by their size. A forward step runs the runs one after
//! another, handing the hidden state (`[tokens, hidden]`, a few kilobytes a token) from one
//! device to the next, and back to the first for the output projection. This multiplies the
//! memory a model can use, not its speed: one device works at a time.

use candle_core::{DType, Device, Tensor};

use super::config::LlamaConfig;
use super::error::{EngineError, Result};

/// The bytes a model's memory is made of, for balancing it over devices.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Footprint {
    /// Bytes a weight parameter takes on the device: the compute dtype's size for weights
    /// converted to it, the file's average for quantized GGUF weights.
    pub bytes_per_parameter: f64,
    /// Bytes one token's keys and values take in one layer.
    pub kv_bytes_per_token_layer: u64,
}

impl Footprint {
    /// Weights at `bytes_per_parameter`, with keys and values of `kv_dtype` for `config`.
    pub fn new(config: &LlamaConfig, bytes_per_parameter: f64, kv_dtype: DType) -> Self {
        Self {
            bytes_per_parameter,
            kv_bytes_per_token_layer: (2
                * config.kv_heads()
                * config.head_dim()
                * kv_dtype.size_in_bytes()) as u64,
        }
    }
}

/// The devices of a model and, per decoder layer, the one it lives on.
#[derive(Debug, Clone)]
pub struct Placement {
    devices: Vec<Device>,
    /// Per decoder layer, its device's index in `devices`.
    layers: Vec<usize>,
}

impl Placement {
    /// The layers of a model of `config` over `devices`, in consecutive runs balanced by
    /// memory (see the module docs): weights at `footprint`'s bytes a parameter, and
    /// `kv_tokens` tokens of keys and values a layer. One device places every layer there.
    pub fn split(
        devices: &[Device],
        config: &LlamaConfig,
        footprint: Footprint,
        kv_tokens: usize,
    ) -> Result<Self> {
        let weight = footprint.bytes_per_parameter.max(0.0);
        let layers = split_layers(
            config.num_hidden_layers,
            layer_parameters(config) as f64 * weight
                + kv_tokens as f64 * footprint.kv_bytes_per_token_layer as f64,
            first_device_parameters(config) as f64 * weight,
            devices.len(),
        );
        Self::new(devices.to_vec(), layers)
    }

    /// Layer `i` on `devices[layers[i]]`: a placement chosen by hand (tests, experiments).
    pub fn new(devices: Vec<Device>, layers: Vec<usize>) -> Result<Self> {
        if devices.is_empty() {
            return Err(EngineError::InvalidInput(
                "no device to place the model on".into(),
            ));
        }
        if let Some((layer, &device)) = layers
            .iter()
            .enumerate()
            .find(|(_, d)| **d >= devices.len())
        {
            return Err(EngineError::InvalidInput(format!(
                "layer {layer} is placed on device {device} of {}",
                devices.len()
            )));
        }
        Ok(Self { devices, layers })
    }

    /// This placement for a model of `config`: an error unless it places exactly its layers.
    pub fn for_model(self, config: &LlamaConfig) -> Result<Self> {
        if self.layers.len() != config.num_hidden_layers {
            return Err(EngineError::InvalidInput(format!(
                "a placement of {} layers for a model of {}",
                self.layers.len(),
                config.num_hidden_layers
            )));
        }
        Ok(self)
    }

    /// The device of the embedding, the final norm and the output projection.
    pub fn first(&self) -> &Device {
        &self.devices[0]
    }

    /// Every device, the first one first.
    pub fn devices(&self) -> &[Device] {
        &self.devices
    }

    /// The index in [`Self::devices`] of layer `layer`'s device (the first device for a
    /// layer past the model's).
    pub fn device_index(&self, layer: usize) -> usize {
        self.layers.get(layer).copied().unwrap_or(0)
    }

    /// The device of layer `layer`.
    pub fn layer_device(&self, layer: usize) -> &Device {
        &self.devices[self.device_index(layer)]
    }

    /// Per layer, its device.
    pub fn layer_devices(&self) -> Vec<Device> {
        (0..self.layers.len())
            .map(|layer| self.layer_device(layer).clone())
            .collect()
    }

    /// Per device, how many layers it holds.
    pub fn layer_counts(&self) -> Vec<usize> {
        let mut counts = vec![0; self.devices.len()];
        for &device in &self.layers {
            counts[device] += 1;
        }
        counts
    }
}

/// `x` on `device`: itself where it is there already, else a copy. The engines' GPUs each run
/// one stream with no cross-stream event tracking (see `device.rs`), so the source device is
/// drained before the copy (its kernels that write `x` are done) and the destination after it
/// (the copy is done before `x`'s memory can be reused by the source's next kernels).
pub(super) fn hand_over(x: Tensor, device: &Device) -> Result<Tensor> {
    if x.device().same_device(device) {
        return Ok(x);
    }
    x.device().synchronize()?;
    let moved = x.to_device(device)?;
    device.synchronize()?;
    Ok(moved)
}

/// Parameters of one decoder layer: the four attention projections, the three MLP matrices
/// and the two norms.
fn layer_parameters(config: &LlamaConfig) -> u64 {
    let hidden = config.hidden_size as u64;
    let q = (config.num_attention_heads * config.head_dim()) as u64;
    let kv = (config.kv_heads() * config.head_dim()) as u64;
    let inter = config.intermediate_size as u64;
    2 * hidden * q + 2 * hidden * kv + 3 * hidden * inter + 2 * hidden
}

/// Parameters the first device holds besides its layers: the embedding table, the final norm
/// and, unless tied to the embedding, the output projection.
fn first_device_parameters(config: &LlamaConfig) -> u64 {
    let table = (config.vocab_size * config.hidden_size) as u64;
    let head = if config.tie_word_embeddings { 0 } else { table };
    table + head + config.hidden_size as u64
}

/// Per layer, its device among `devices`: layer `i` goes to the device whose equal share of
/// all the memory holds the layer's middle, counting `first_extra` bytes at the start (on the
/// first device). Consecutive runs, never decreasing.
fn split_layers(layers: usize, per_layer: f64, first_extra: f64, devices: usize) -> Vec<usize> {
    if devices <= 1 {
        return vec![0; layers];
    }
    let per_layer = per_layer.max(1.0);
    let first_extra = first_extra.max(0.0);
    let total = first_extra + layers as f64 * per_layer;
    let share = total / devices as f64;
    (0..layers)
        .map(|i| {
            let middle = first_extra + (i as f64 + 0.5) * per_layer;
            ((middle / share) as usize).min(devices - 1)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(json: &str) -> LlamaConfig {
        serde_json::from_str(json).expect("config")
    }

    /// Llama 3.1 70B's shape.
    fn llama_70b() -> LlamaConfig {
        config(
            r#"{"vocab_size": 128256, "hidden_size": 8192, "intermediate_size": 28672,
                "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                "tie_word_embeddings": false}"#,
        )
    }

    fn counts(layers: &[usize], devices: usize) -> Vec<usize> {
        let mut counts = vec![0; devices];
        for &d in layers {
            counts[d] += 1;
        }
        counts
    }

    #[test]
    fn seventy_b_over_four_gpus_gives_the_first_fewer_layers_for_the_embeddings() {
        let c = llama_70b();
        let (per_layer, extra) = (layer_parameters(&c), first_device_parameters(&c));
        let layers = split_layers(80, per_layer as f64, extra as f64, 4);
        assert_eq!(counts(&layers, 4), vec![18, 21, 20, 21]);
        assert!(layers.windows(2).all(|w| w[0] <= w[1]), "consecutive runs");
        // Parameters a device: within one layer (856 M) of a quarter of the total.
        assert_eq!(per_layer, 855_654_400);
        assert_eq!(extra, 2_101_354_496);
        let quarter = (80 * per_layer + extra) / 4;
        for (device, n) in counts(&layers, 4).into_iter().enumerate() {
            let held = n as u64 * per_layer + if device == 0 { extra } else { 0 };
            assert!(
                held.abs_diff(quarter) <= per_layer,
                "device {device}: {held}"
            );
        }
    }

    #[test]
    fn one_device_or_none_extra_splits_evenly() {
        assert_eq!(split_layers(5, 10.0, 0.0, 1), vec![0; 5]);
        assert_eq!(split_layers(8, 10.0, 0.0, 2), vec![0, 0, 0, 0, 1, 1, 1, 1]);
        assert_eq!(split_layers(6, 10.0, 0.0, 3), vec![0, 0, 1, 1, 2, 2]);
        assert_eq!(split_layers(0, 10.0, 5.0, 2), Vec::<usize>::new());
        // More devices than layers: some hold none, none is out of range.
        assert_eq!(split_layers(2, 10.0, 0.0, 4), vec![1, 3]);
    }

    #[test]
    fn an_embedding_larger_than_a_share_leaves_the_first_device_no_layer() {
        assert_eq!(split_layers(4, 10.0, 100.0, 2), vec![1, 1, 1, 1]);
    }

    #[test]
    fn the_key_value_budget_moves_layers_to_the_first_device() {
        // 70B in bf16 over four GPUs with 480,000 tokens of keys and values (320 KiB a token,
        // 157 GB): a layer is 1.71 GB of weights and 1.97 GB of cache, so the embedding and
        // output (4.2 GB) weigh less beside it and the first GPU takes one layer
        // more than by weights alone. Every GPU holds within one layer of a quarter.
        let c = llama_70b();
        let bf16 = Footprint::new(&c, 2.0, DType::BF16);
        assert_eq!(bf16.kv_bytes_per_token_layer, 4096);
        let tokens = 480_000;
        let devices = vec![Device::Cpu; 4];
        let placement = Placement::split(&devices, &c, bf16, tokens).expect("placement");
        assert_eq!(placement.layer_counts(), vec![19, 20, 21, 20]);
        let layer = layer_parameters(&c) as f64 * 2.0 + tokens as f64 * 4096.0;
        let first = first_device_parameters(&c) as f64 * 2.0;
        let quarter = (80.0 * layer + first) / 4.0;
        for (device, n) in placement.layer_counts().into_iter().enumerate() {
            let held = n as f64 * layer + if device == 0 { first } else { 0.0 };
            assert!((held - quarter).abs() <= layer, "device {device}: {held}");
        }
        // Without a budget: by weights alone.
        let weights = Placement::split(&devices, &c, bf16, 0).expect("placement");
        assert_eq!(weights.layer_counts(), vec![18, 21, 20, 21]);
    }

    #[test]
    fn placement_reports_devices_and_counts() {
        let c = llama_70b();
        let devices = vec![Device::Cpu; 2];
        let f = Footprint::new(&c, 2.0, DType::BF16);
        let placement = Placement::split(&devices, &c, f, 0).expect("placement");
        assert_eq!(placement.layer_counts().iter().sum::<usize>(), 80);
        assert_eq!(placement.layer_counts(), vec![39, 41]);
        assert_eq!(placement.device_index(0), 0);
        assert_eq!(placement.device_index(79), 1);
        assert_eq!(placement.layer_devices().len(), 80);
        assert!(Placement::split(&[], &c, f, 0).is_err());
        let cpu = || vec![Device::Cpu; 2];
        assert!(Placement::new(cpu(), vec![0, 2]).is_err(), "no device 2");
        assert!(Placement::new(vec![], vec![]).is_err());
        let given = Placement::new(cpu(), vec![1; 80]).expect("by hand");
        assert_eq!(
            given
                .clone()
                .for_model(&c)
                .expect("80 layers")
                .layer_counts(),
            vec![0, 80]
        );
        let err = Placement::new(cpu(), vec![1; 3])
            .expect("by hand")
            .for_model(&c);
        assert!(err.is_err_and(|e| e.to_string().contains("3 layers for a model of 80")));
    }
}
