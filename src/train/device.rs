//! Where training runs: burn's Flex backend on the CPU (the default), or, in a build with the
//! `wgpu` feature, a GPU through burn's wgpu backend pinned to Vulkan. Chosen by the
//! environment, so every command and job that trains follows one setting.

use anyhow::{bail, Result};
use burn::tensor::Device;

/// `cpu` (the default) or `vulkan`.
pub const TRAIN_DEVICE_ENV: &str = "PICIE_TRAIN_DEVICE";

/// The device training runs on, without autodiff (the trainers add it).
pub fn training_device() -> Result<Device> {
    device_named(std::env::var(TRAIN_DEVICE_ENV).ok().as_deref().unwrap_or("cpu"))
}

fn device_named(name: &str) -> Result<Device> {
    match name {
        "" | "cpu" => Ok(Device::flex()),
        #[cfg(feature = "wgpu")]
        "vulkan" => Ok(Device::vulkan(burn::tensor::DeviceKind::DefaultDevice)),
        #[cfg(not(feature = "wgpu"))]
        "vulkan" => bail!("{TRAIN_DEVICE_ENV}=vulkan needs a build with `--features wgpu`"),
        other => bail!("{TRAIN_DEVICE_ENV}={other}: expected cpu or vulkan"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_is_the_cpu_and_unknown_names_are_refused() {
        assert!(crate::model::on_flex(&device_named("cpu").unwrap()));
        assert!(crate::model::on_flex(&device_named("").unwrap()));
        assert!(device_named("tpu").unwrap_err().to_string().contains("expected cpu or vulkan"));
        #[cfg(not(feature = "wgpu"))]
        assert!(device_named("vulkan").unwrap_err().to_string().contains("--features wgpu"));
    }
}
