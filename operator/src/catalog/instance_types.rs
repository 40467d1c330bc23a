//! The instance-type catalog: the Azure GPU VM sizes used for Llama managed compute.

use serde::{Deserialize, Serialize};

/// One VM size: what an instance of it has and costs.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InstanceType {
    /// The VM size name, e.g. Standard_NC24ads_A100_v4.
    pub name: String,
    /// The quota family its cores count against, e.g. StandardNCADSA100v4Family.
    pub family: String,
    /// vCPU cores (what quota and core-hours count).
    pub cores: u32,
    /// Host memory in GiB.
    pub memory_gib: u32,
    /// GPU model, e.g. A100-80GB.
    pub gpu_type: String,
    /// GPUs per instance.
    pub gpu_count: u32,
    /// Memory of each GPU in GiB.
    pub gpu_memory_gib: u32,
    /// Price per instance-hour, in `currency`.
    pub hourly_price: f64,
    /// Currency of `hourlyPrice`.
    pub currency: String,
}

impl InstanceType {
    /// Total GPU memory of one instance.
    pub fn total_gpu_memory_gib(&self) -> u32 {
        self.gpu_count * self.gpu_memory_gib
    }

    /// A lower-case form usable in Kubernetes object names and label values.
    pub fn slug(&self) -> String {
        self.name.to_ascii_lowercase().replace(['_', '.'], "-")
    }
}

/// The built-in catalog. Core, memory and GPU counts are Azure's published sizes; prices are
/// approximate pay-as-you-go list prices (USD per hour, East US) — set your own in the operator
/// configuration.
pub fn default_instance_types() -> Vec<InstanceType> {
    let t = |name: &str, family: &str, cores, memory_gib, gpu: &str, gpus, gpu_gib, price| {
        InstanceType {
            name: name.into(),
            family: family.into(),
            cores,
            memory_gib,
            gpu_type: gpu.into(),
            gpu_count: gpus,
            gpu_memory_gib: gpu_gib,
            hourly_price: price,
            currency: "USD".into(),
        }
    };
    vec![
        t(
            "Standard_NC24ads_A100_v4",
            "StandardNCADSA100v4Family",
            24,
            220,
            "A100-80GB",
            1,
            80,
            3.673,
        ),
        t(
            "Standard_NC48ads_A100_v4",
            "StandardNCADSA100v4Family",
            48,
            440,
            "A100-80GB",
            2,
            80,
            7.346,
        ),
        t(
            "Standard_NC96ads_A100_v4",
            "StandardNCADSA100v4Family",
            96,
            880,
            "A100-80GB",
            4,
            80,
            14.692,
        ),
        t(
            "Standard_ND96asr_v4",
            "StandardNDASv4_A100Family",
            96,
            900,
            "A100-40GB",
            8,
            40,
            27.197,
        ),
        t(
            "Standard_ND96amsr_A100_v4",
            "StandardNDAMSv4_A100Family",
            96,
            1900,
            "A100-80GB",
            8,
            80,
            32.770,
        ),
        t(
            "Standard_NC40ads_H100_v5",
            "StandardNCadsH100v5Family",
            40,
            320,
            "H100-NVL-94GB",
            1,
            94,
            6.980,
        ),
        t(
            "Standard_NC80adis_H100_v5",
            "StandardNCadsH100v5Family",
            80,
            640,
            "H100-NVL-94GB",
            2,
            94,
            13.960,
        ),
        t(
            "Standard_ND96isr_H100_v5",
            "StandardNDSH100v5Family",
            96,
            1900,
            "H100-80GB",
            8,
            80,
            98.320,
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn published_sizes() {
        let all = default_instance_types();
        assert_eq!(all.len(), 8);
        let get = |n: &str| all.iter().find(|t| t.name == n).cloned();
        let nc24 = get("Standard_NC24ads_A100_v4").expect("NC24ads");
        assert_eq!(
            (nc24.cores, nc24.gpu_count, nc24.total_gpu_memory_gib()),
            (24, 1, 80)
        );
        let nd = get("Standard_ND96isr_H100_v5").expect("ND96isr");
        assert_eq!(
            (nd.cores, nd.gpu_count, nd.total_gpu_memory_gib()),
            (96, 8, 640)
        );
        assert_eq!(nc24.slug(), "standard-nc24ads-a100-v4");
    }
}
