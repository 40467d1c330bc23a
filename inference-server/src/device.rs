//! Which compute device the engine runs on: `cpu`, or `cuda` / `cuda:N` for an NVIDIA GPU.
//!
//! `serve` takes it from `--device`, else `$LLAMA_SERVER_DEVICE`, else the configuration's
//! `device`, else the CPU. GPU ordinals count the GPUs the driver shows the process, so
//! `CUDA_VISIBLE_DEVICES` (and a container runtime's GPU assignment) applies as usual.

use std::fmt;
use std::str::FromStr;

use candle_core::{DType, Device};

/// The environment variable that selects the device when `--device` is not given.
pub const DEVICE_ENV: &str = "LLAMA_SERVER_DEVICE";

/// A compute device, as named on the command line or in the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeviceSpec {
    /// The CPU (the default).
    #[default]
    Cpu,
    /// The NVIDIA GPU of this ordinal among the visible ones (`cuda` means `cuda:0`).
    Cuda(usize),
}

/// Why a device cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The name is not `cpu`, `cuda` or `cuda:N`.
    #[error("unknown device '{0}': expected cpu, cuda or cuda:N")]
    Invalid(String),
    /// A GPU was asked for, but this binary has no CUDA backend.
    #[error(
        "device {0}: this llama-server was built without CUDA; use the CUDA image \
         (llama-server-cuda, built with `--features cuda`) or --device cpu"
    )]
    CudaNotBuilt(DeviceSpec),
    /// The CUDA backend is there, but no driver or no such GPU answered.
    #[error(
        "device {spec}: no CUDA driver or GPU found ({reason}); check that the NVIDIA driver \
         is installed, that the GPU is visible to this process (nvidia-smi, \
         CUDA_VISIBLE_DEVICES, the container's GPU request) and that the ordinal exists"
    )]
    NoGpu { spec: DeviceSpec, reason: String },
}

impl DeviceError {
    /// A short stable label, for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "invalid_device",
            Self::CudaNotBuilt(_) => "cuda_not_built",
            Self::NoGpu { .. } => "no_gpu",
        }
    }
}

impl FromStr for DeviceSpec {
    type Err = DeviceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        let name = text.trim().to_ascii_lowercase();
        match name.as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            _ => name
                .strip_prefix("cuda:")
                .and_then(|ordinal| ordinal.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| DeviceError::Invalid(text.to_owned())),
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(ordinal) => write!(f, "cuda:{ordinal}"),
        }
    }
}

/// Whether this binary was built with the `cuda` feature.
pub const fn cuda_built() -> bool {
    cfg!(feature = "cuda")
}

impl DeviceSpec {
    /// The device named by the first of `flag`, `env` and `config` that is set (the CPU when
    /// none is). Empty strings count as unset.
    pub fn choose(
        flag: Option<DeviceSpec>,
        env: Option<&str>,
        config: Option<&str>,
    ) -> Result<Self, DeviceError> {
        if let Some(spec) = flag {
            return Ok(spec);
        }
        match [env, config]
            .into_iter()
            .flatten()
            .find(|s| !s.trim().is_empty())
        {
            Some(text) => text.parse(),
            None => Ok(Self::Cpu),
        }
    }

    /// The dtype the engine runs in on this device: f32 on the CPU (exact, and candle's CPU
    /// kernels are fastest in it), bf16 on a GPU (half the memory traffic per decoded token).
    pub fn default_dtype(self) -> DType {
        match self {
            Self::Cpu => DType::F32,
            Self::Cuda(_) => DType::BF16,
        }
    }

    /// Opens the device: for a GPU this initialises the driver and creates the context, so a
    /// missing driver or GPU is reported here, before any weights are read.
    pub fn open(self) -> Result<Device, DeviceError> {
        match self {
            Self::Cpu => Ok(Device::Cpu),
            Self::Cuda(_) if !cuda_built() => Err(DeviceError::CudaNotBuilt(self)),
            Self::Cuda(ordinal) => open_cuda(ordinal).map_err(|err| DeviceError::NoGpu {
                spec: self,
                reason: without_backtrace(err),
            }),
        }
    }
}

impl DeviceSpec {
    /// Opens the devices a model split over `count` GPUs runs on: this GPU and the next
    /// `count - 1` ordinals, each reported by name when it cannot be opened. The CPU is one
    /// device whatever the count.
    pub fn open_several(self, count: usize) -> Result<Vec<Device>, DeviceError> {
        match self {
            Self::Cpu => Ok(vec![self.open()?]),
            Self::Cuda(first) => (first..first + count.max(1))
                .map(|ordinal| Self::Cuda(ordinal).open())
                .collect(),
        }
    }
}

/// Opens GPU `ordinal` with one stream of its own that every thread's work goes to (candle's
/// default is the calling thread's per-thread stream, which the loading thread and the engine
/// thread would not share). With everything on one stream, the order of the stream is the only
/// synchronisation needed, so cudarc's per-tensor event tracking (an event recorded and waited
/// on for every operand of every kernel: most of the cost of a small kernel launch) is off.
#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    let device = Device::new_cuda_with_stream(ordinal)?;
    if let Device::Cuda(cuda) = &device {
        // SAFETY: cudarc requires, once tracking is off, that no tensor is used on another
        // stream than the one it was made on. This device has a single stream, which every
        // tensor created through it (weights, caches, activations) is made and used on.
        #[allow(unsafe_code)]
        unsafe {
            cuda.disable_event_tracking();
        }
    }
    Ok(device)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> candle_core::Result<Device> {
    Device::new_cuda(ordinal)
}

/// The message of a candle error, without the backtrace candle attaches when `RUST_BACKTRACE`
/// is set (a startup error should be one readable line).
fn without_backtrace(err: candle_core::Error) -> String {
    match err {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other.to_string(),
    }
}

/// Reads a dtype name as the command line spells it: `f32`, `bf16` or `f16`.
pub fn parse_dtype(text: &str) -> Result<DType, String> {
    match text.trim().to_ascii_lowercase().as_str() {
        "f32" | "float32" => Ok(DType::F32),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        "f16" | "float16" => Ok(DType::F16),
        other => Err(format!(
            "unknown dtype '{other}': expected f32, bf16 or f16"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!("cpu".parse(), Ok(DeviceSpec::Cpu));
        assert_eq!("CUDA".parse(), Ok(DeviceSpec::Cuda(0)));
        assert_eq!("cuda:3".parse(), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(" gpu ".parse(), Ok(DeviceSpec::Cuda(0)));
        for bad in ["", "cuda:", "cuda:x", "cuda:-1", "metal", "cpu:0"] {
            assert_eq!(
                bad.parse::<DeviceSpec>(),
                Err(DeviceError::Invalid(bad.to_owned())),
                "{bad}"
            );
        }
        assert_eq!(DeviceSpec::Cuda(1).to_string(), "cuda:1");
        assert_eq!(DeviceSpec::Cpu.to_string(), "cpu");
    }

    #[test]
    fn several_devices_are_the_one_cpu_or_consecutive_gpus() {
        let cpu = DeviceSpec::Cpu.open_several(4).expect("the CPU");
        assert_eq!(cpu.len(), 1);
        assert!(cpu[0].is_cpu());
        if !cuda_built() {
            // The first GPU that cannot be opened is named.
            assert_eq!(
                DeviceSpec::Cuda(2).open_several(2).map(|d| d.len()),
                Err(DeviceError::CudaNotBuilt(DeviceSpec::Cuda(2)))
            );
        }
    }

    #[test]
    fn flag_beats_environment_beats_configuration() {
        let choose = DeviceSpec::choose;
        assert_eq!(choose(None, None, None), Ok(DeviceSpec::Cpu));
        assert_eq!(choose(None, None, Some("cuda:1")), Ok(DeviceSpec::Cuda(1)));
        assert_eq!(
            choose(None, Some("cuda"), Some("cpu")),
            Ok(DeviceSpec::Cuda(0))
        );
        assert_eq!(
            choose(None, Some(""), Some("cuda:2")),
            Ok(DeviceSpec::Cuda(2))
        );
        assert_eq!(
            choose(Some(DeviceSpec::Cpu), Some("cuda"), Some("cuda")),
            Ok(DeviceSpec::Cpu)
        );
        assert!(matches!(
            choose(None, Some("tpu"), None),
            Err(DeviceError::Invalid(_))
        ));
    }

    #[test]
    fn the_cpu_always_opens_and_gpus_fail_with_a_clear_error_without_one() {
        assert!(matches!(DeviceSpec::Cpu.open(), Ok(Device::Cpu)));
        assert_eq!(DeviceSpec::Cpu.default_dtype(), DType::F32);
        assert_eq!(DeviceSpec::Cuda(0).default_dtype(), DType::BF16);
        if cuda_built() {
            // A CUDA build on a machine with a GPU opens it; the message otherwise is checked
            // by scripts/test.sh against the CUDA binary.
            return;
        }
        let err = DeviceSpec::Cuda(0)
            .open()
            .expect_err("no CUDA in this build");
        assert_eq!(err, DeviceError::CudaNotBuilt(DeviceSpec::Cuda(0)));
        assert!(
            err.to_string()
                .contains("this llama-server was built without CUDA; use the CUDA image"),
            "{err}"
        );
        assert_eq!(err.label(), "cuda_not_built");
    }

    #[test]
    fn startup_errors_leave_candles_backtrace_out() {
        let err = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("no driver".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        };
        assert_eq!(without_backtrace(err), "no driver");
    }

    #[test]
    fn dtypes_parse() {
        assert_eq!(parse_dtype("bf16"), Ok(DType::BF16));
        assert_eq!(parse_dtype("F32"), Ok(DType::F32));
        assert!(parse_dtype("int8").is_err());
    }
}
