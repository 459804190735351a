//! Clusters: per-device compute and memory figures with achievable-efficiency factors, and the links inside and
//! across nodes. Presets carry the published peaks of `examples/data/configs/HARDWARE.md` (sources there); the
//! efficiency factors and latencies are this planner's assumptions, stated on each preset.

use serde::{Deserialize, Serialize};

use super::PlanError;

/// A cluster of identical devices.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Name (reports and plots).
    pub name: String,
    /// Peak dense BF16 FLOP/s of one device.
    pub flops: f64,
    /// Peak memory bandwidth of one device, bytes/s.
    pub mem_bw: f64,
    /// Achievable share of `flops` in large matmuls.
    #[serde(default = "default_flop_eff")]
    pub flop_efficiency: f64,
    /// Achievable share of `mem_bw`.
    #[serde(default = "default_mem_eff")]
    pub mem_efficiency: f64,
    /// Devices per node.
    pub devices_per_node: usize,
    /// Scale-up bandwidth per device, one direction, bytes/s (NVLink through NVSwitch, or all Infinity Fabric
    /// links together).
    pub intra_bw: f64,
    /// Bandwidth of the one link between two peers of a fully connected mesh, one direction, bytes/s (`None`:
    /// a switch, any peer gets `intra_bw`).
    #[serde(default)]
    pub intra_peer_bw: Option<f64>,
    /// Latency of one intra-node transfer, µs.
    #[serde(default = "default_intra_lat")]
    pub intra_latency_us: f64,
    /// Scale-out (NIC) bandwidth per device, one direction, bytes/s.
    pub inter_bw: f64,
    /// Latency of one inter-node transfer, µs.
    #[serde(default = "default_inter_lat")]
    pub inter_latency_us: f64,
    /// Achievable share of the link bandwidths.
    #[serde(default = "default_link_eff")]
    pub link_efficiency: f64,
    /// Fixed cost of launching one op, µs.
    #[serde(default = "default_overhead")]
    pub op_overhead_us: f64,
    /// Bytes per activation/weight element (2: BF16).
    #[serde(default = "default_bpe")]
    pub bytes_per_element: f64,
}

fn default_flop_eff() -> f64 {
    0.6
}
fn default_mem_eff() -> f64 {
    0.8
}
fn default_intra_lat() -> f64 {
    3.0
}
fn default_inter_lat() -> f64 {
    6.0
}
fn default_link_eff() -> f64 {
    0.8
}
fn default_overhead() -> f64 {
    8.0
}
fn default_bpe() -> f64 {
    2.0
}

const GB: f64 = 1e9;
const TB: f64 = 1e12;

impl Cluster {
    fn preset(name: &str, tflops: f64, hbm_tb: f64, intra: f64, peer: Option<f64>) -> Self {
        Self {
            name: name.to_string(),
            flops: tflops * TB,
            mem_bw: hbm_tb * TB,
            flop_efficiency: default_flop_eff(),
            mem_efficiency: default_mem_eff(),
            devices_per_node: 8,
            intra_bw: intra * GB,
            intra_peer_bw: peer.map(|p| p * GB),
            intra_latency_us: default_intra_lat(),
            // 400 Gb/s per device, one NIC per GPU.
            inter_bw: 50.0 * GB,
            inter_latency_us: default_inter_lat(),
            link_efficiency: default_link_eff(),
            op_overhead_us: default_overhead(),
            bytes_per_element: default_bpe(),
        }
    }

    /// NVIDIA H100 SXM5 node: 989 TFLOP/s dense BF16, 3.35 TB/s HBM3, NVLink 4 450 GB/s per direction
    /// through NVSwitch, 8 per node, one 400 Gb/s NIC per GPU.
    pub fn h100() -> Self {
        Self::preset("h100", 989.0, 3.35, 450.0, None)
    }
    /// NVIDIA H200 SXM node: as H100 with 4.8 TB/s HBM3e.
    pub fn h200() -> Self {
        Self::preset("h200", 989.0, 4.8, 450.0, None)
    }
    /// AMD MI300X node: 1307.4 TFLOP/s dense BF16, 5.3 TB/s HBM3, a fully connected 8-GPU Infinity Fabric
    /// mesh (64 GB/s per direction per peer link, 448 GB/s aggregate), 400 Gb/s NIC per GPU.
    pub fn mi300x() -> Self {
        Self::preset("mi300x", 1307.4, 5.3, 448.0, Some(64.0))
    }
    /// AMD MI325X node: as MI300X with 6.0 TB/s HBM3E.
    pub fn mi325x() -> Self {
        Self::preset("mi325x", 1307.4, 6.0, 448.0, Some(64.0))
    }

    /// A preset by name (`h100`, `h200`, `mi300x`, `mi325x`).
    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "h100" => Some(Self::h100()),
            "h200" => Some(Self::h200()),
            "mi300x" => Some(Self::mi300x()),
            "mi325x" => Some(Self::mi325x()),
            _ => None,
        }
    }

    /// Parses a cluster from TOML (the fields of [`Cluster`]; efficiencies, latencies and overhead optional).
    pub fn from_toml(text: &str) -> Result<Self, PlanError> {
        let c: Self = toml::from_str(text).map_err(|e| PlanError::Cluster(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// The same cluster with every inter-node link at `bytes_per_s` per device.
    pub fn with_inter_bw(mut self, bytes_per_s: f64) -> Self {
        self.inter_bw = bytes_per_s;
        self
    }

    /// Rejects figures that are not positive numbers (and efficiencies above 1).
    pub fn validate(&self) -> Result<(), PlanError> {
        let positive = [
            ("flops", self.flops),
            ("mem_bw", self.mem_bw),
            ("intra_bw", self.intra_bw),
            ("inter_bw", self.inter_bw),
            ("bytes_per_element", self.bytes_per_element),
        ];
        for (name, v) in positive
            .into_iter()
            .chain(self.intra_peer_bw.map(|p| ("intra_peer_bw", p)))
        {
            if !(v.is_finite() && v > 0.0) {
                return Err(PlanError::Cluster(format!("{name} = {v} must be > 0")));
            }
        }
        for (name, v) in [
            ("flop_efficiency", self.flop_efficiency),
            ("mem_efficiency", self.mem_efficiency),
            ("link_efficiency", self.link_efficiency),
        ] {
            if !(v > 0.0 && v <= 1.0) {
                return Err(PlanError::Cluster(format!(
                    "{name} = {v} must be in (0, 1]"
                )));
            }
        }
        for (name, v) in [
            ("intra_latency_us", self.intra_latency_us),
            ("inter_latency_us", self.inter_latency_us),
            ("op_overhead_us", self.op_overhead_us),
        ] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(PlanError::Cluster(format!("{name} = {v} must be >= 0")));
            }
        }
        if self.devices_per_node == 0 {
            return Err(PlanError::Cluster("devices_per_node must be > 0".into()));
        }
        Ok(())
    }
}
