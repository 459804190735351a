//! Devices by name: `flex` (burn's CPU backend, always built) and `wgpu` (burn's CubeCL backend on the first wgpu
//! adapter, built with the crate feature `wgpu`).
//!
//! burn's `Device::default()` prefers every GPU backend compiled in, so a build that merely enables `wgpu` would
//! move a program onto it unasked. Programs here name their device instead: [`DeviceName::from_env`] reads
//! `BURN_DEVICE` as burn does (case-insensitive), and [`DeviceName::device`] brings the device up, returning an
//! error — not a panic — when the build lacks the backend or the machine has no adapter.
//!
//! Which code runs where: flex takes the fast paths (the fused attention and expert backwards, lanes, the fused
//! AdamW of `farskip-train`); every other device runs their generic fallbacks, composed of burn tensor ops.

use std::fmt;
use std::str::FromStr;

use burn::prelude::*;

use crate::{ModelError, Result};

/// A device an example or test can ask for by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceName {
    /// burn's flex CPU backend (`Device::flex()`).
    Flex,
    /// burn's CubeCL backend through wgpu on the default adapter (Vulkan, Metal, DX12 or GL; Mesa's llvmpipe on a
    /// machine without a GPU).
    Wgpu,
}

impl DeviceName {
    /// Every name, in the order a user sees them.
    pub const ALL: [DeviceName; 2] = [DeviceName::Flex, DeviceName::Wgpu];

    /// Whether this build has the backend (flex always; wgpu with the feature `wgpu`).
    pub fn is_compiled(self) -> bool {
        match self {
            DeviceName::Flex => true,
            DeviceName::Wgpu => cfg!(feature = "wgpu"),
        }
    }

    /// The device named by `BURN_DEVICE`, or `None` when it is unset. A value that names no device here (or one
    /// this build lacks, see [`DeviceName::device`]) is an error.
    pub fn from_env() -> Result<Option<DeviceName>> {
        match std::env::var("BURN_DEVICE") {
            Ok(v) => v.parse().map(Some),
            Err(std::env::VarError::NotPresent) => Ok(None),
            Err(std::env::VarError::NotUnicode(v)) => Err(ModelError::Device {
                name: v.to_string_lossy().into_owned(),
                message: "BURN_DEVICE is not valid UTF-8".into(),
            }),
        }
    }

    /// `explicit` if given, else `BURN_DEVICE`, else flex.
    pub fn resolve(explicit: Option<DeviceName>) -> Result<DeviceName> {
        match explicit {
            Some(d) => Ok(d),
            None => Ok(Self::from_env()?.unwrap_or(DeviceName::Flex)),
        }
    }

    /// The device, brought up. wgpu is initialised once per process (later calls return the same device); a
    /// build without the feature, or a machine without a wgpu adapter, gives [`ModelError::Device`].
    pub fn device(self) -> Result<Device> {
        match self {
            DeviceName::Flex => Ok(Device::flex()),
            DeviceName::Wgpu => wgpu(),
        }
    }
}

impl fmt::Display for DeviceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DeviceName::Flex => "flex",
            DeviceName::Wgpu => "wgpu",
        })
    }
}

impl FromStr for DeviceName {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "flex" => Ok(DeviceName::Flex),
            "wgpu" => Ok(DeviceName::Wgpu),
            _ => Err(ModelError::Device {
                name: s.into(),
                message: "unknown device; expected flex or wgpu".into(),
            }),
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu() -> Result<Device> {
    use std::sync::OnceLock;
    static WGPU: OnceLock<std::result::Result<Device, String>> = OnceLock::new();
    WGPU.get_or_init(|| {
        Device::wgpu_options()
            .init()
            .map_err(|e| format!("no usable wgpu adapter: {e}"))
    })
    .clone()
    .map_err(|message| ModelError::Device {
        name: "wgpu".into(),
        message,
    })
}

#[cfg(not(feature = "wgpu"))]
fn wgpu() -> Result<Device> {
    Err(ModelError::Device {
        name: "wgpu".into(),
        message: "this build has no wgpu backend; rebuild with the cargo feature `wgpu` \
                  (e.g. `cargo build --release -p farskip-examples --features wgpu --examples`)"
            .into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_case_insensitively_and_unknown_ones_are_errors() {
        assert_eq!("flex".parse::<DeviceName>().unwrap(), DeviceName::Flex);
        assert_eq!("WGPU".parse::<DeviceName>().unwrap(), DeviceName::Wgpu);
        let e = "cuda".parse::<DeviceName>().unwrap_err().to_string();
        assert!(e.contains("cuda") && e.contains("flex or wgpu"), "{e}");
        for d in DeviceName::ALL {
            assert_eq!(d.to_string().parse::<DeviceName>().unwrap(), d);
        }
    }

    #[test]
    fn explicit_names_win_over_the_environment() {
        assert_eq!(
            DeviceName::resolve(Some(DeviceName::Wgpu)).unwrap(),
            DeviceName::Wgpu
        );
        assert_eq!(DeviceName::Flex.device().unwrap(), Device::flex());
    }

    #[cfg(not(feature = "wgpu"))]
    #[test]
    fn wgpu_without_the_feature_is_an_error_naming_the_feature() {
        let e = DeviceName::Wgpu.device().unwrap_err().to_string();
        assert!(e.contains("wgpu") && e.contains("feature"), "{e}");
        assert!(!DeviceName::Wgpu.is_compiled());
    }
}
