//! An ONNX Runtime session on the exported embedder, with the execution provider chosen once.

use std::path::Path;
use std::str::FromStr;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context, Result};
use ndarray::Array4;
use ort::ep::ExecutionProvider;
use ort::session::Session;
use ort::value::TensorRef;
use serde::Serialize;

use crate::model::export::{INPUT_NAME, OUTPUT_NAME};

/// Which hardware to run on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    /// CUDA when ONNX Runtime offers it and it registers, CPU otherwise (with a warning).
    Auto,
    Cpu,
    /// CUDA on this GPU; a registration failure is an error.
    Cuda(i32),
}

impl FromStr for DeviceChoice {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(Self::Auto),
            "cpu" => Ok(Self::Cpu),
            "cuda" => Ok(Self::Cuda(0)),
            _ => s
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(Self::Cuda)
                .ok_or_else(|| format!("unknown device `{s}` (expected auto, cpu, cuda or cuda:N)")),
        }
    }
}

/// As `--device` takes it: `auto`, `cpu` or `cuda:N`.
impl std::fmt::Display for DeviceChoice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeviceChoice::Auto => f.write_str("auto"),
            DeviceChoice::Cpu => f.write_str("cpu"),
            DeviceChoice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// The execution provider a session actually runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Provider {
    Cpu,
    Cuda,
}

impl Provider {
    pub fn as_str(self) -> &'static str {
        match self {
            Provider::Cpu => "cpu",
            Provider::Cuda => "cuda",
        }
    }
}

pub struct EmbedSession {
    session: Mutex<Session>,
    provider: Provider,
}

fn builder(threads: Option<usize>) -> Result<ort::session::builder::SessionBuilder> {
    let env = super::runtime::environment()?;
    let mut b = Session::builder(env).map_err(|e| anyhow!("creating an ONNX Runtime session: {e}"))?;
    if let Some(n) = threads {
        b = b.with_intra_threads(n).map_err(|e| anyhow!("setting threads: {e}"))?;
    }
    // Input sizes vary from request to request: a memory pattern planned for one shape is kept
    // per shape and only grows the process.
    b = b.with_memory_pattern(false).map_err(|e| anyhow!("disabling the memory pattern: {e}"))?;
    Ok(b)
}

/// Where a session's graph comes from: a file (the embedder) or bytes built in memory (the
/// refinement graphs).
pub enum GraphSource<'a> {
    File(&'a Path),
    Bytes(&'a [u8]),
}

/// A session on `source` on the hardware `device` asks for, and the provider it got.
pub fn open_session(source: GraphSource<'_>, device: DeviceChoice, threads: Option<usize>, what: &str) -> Result<(Session, Provider)> {
    // Loads the ONNX Runtime library; every ort call below needs it.
    super::runtime::environment()?;
    let cuda = |id: i32| ort::ep::CUDA::default().with_device_id(id).build().error_on_failure();
    let (mut builder, provider) = match device {
        DeviceChoice::Cpu => (builder(threads)?, Provider::Cpu),
        DeviceChoice::Cuda(id) => {
            let b = builder(threads)?
                .with_execution_providers([cuda(id)])
                .map_err(|e| anyhow!("CUDA execution provider (device {id}) failed to register: {e}"))?;
            (b, Provider::Cuda)
        }
        DeviceChoice::Auto => {
            let available = ort::ep::CUDA::is_available().unwrap_or(false);
            if !available {
                tracing::warn!("CUDA execution provider not available in this ONNX Runtime; using CPU");
                (builder(threads)?, Provider::Cpu)
            } else {
                match builder(threads)?.with_execution_providers([cuda(0)]) {
                    Ok(b) => (b, Provider::Cuda),
                    Err(e) => {
                        tracing::warn!(error = %e, "CUDA execution provider failed to register; falling back to CPU");
                        (builder(threads)?, Provider::Cpu)
                    }
                }
            }
        }
    };
    let session = match source {
        GraphSource::File(path) => {
            builder.commit_from_file(path).map_err(|e| anyhow!("{}: ONNX Runtime cannot load the {what}: {e}", path.display()))?
        }
        GraphSource::Bytes(bytes) => builder.commit_from_memory(bytes).map_err(|e| anyhow!("ONNX Runtime cannot load the {what}: {e}"))?,
    };
    Ok((session, provider))
}

impl EmbedSession {
    pub fn load(onnx: &Path, device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let (session, provider) = open_session(GraphSource::File(onnx), device, threads, "embedder")?;
        tracing::info!(provider = provider.as_str(), model = %onnx.display(), "embedder session ready");
        Ok(Self { session: Mutex::new(session), provider })
    }

    /// A session on an embedder graph made in memory (training's passes run the current weights).
    pub fn from_bytes(onnx: &[u8], device: DeviceChoice, threads: Option<usize>) -> Result<Self> {
        let (session, provider) = open_session(GraphSource::Bytes(onnx), device, threads, "embedder")?;
        Ok(Self { session: Mutex::new(session), provider })
    }

    pub fn provider(&self) -> Provider {
        self.provider
    }

    /// Runs the embedder on an N x 3 x H x W batch; returns (shape, features) of N x dim x H/4 x W/4.
    pub fn run(&self, input: &Array4<f32>) -> Result<([usize; 4], Vec<f32>)> {
        let (_, _, h, w) = input.dim();
        if h % 32 != 0 || w % 32 != 0 {
            bail!("input {w}x{h} is not a multiple of 32");
        }
        let tensor = TensorRef::from_array_view(input).map_err(|e| anyhow!("input tensor: {e}"))?;
        let mut session = self.session.lock().map_err(|_| anyhow!("inference session poisoned"))?;
        let outputs = session.run(ort::inputs![INPUT_NAME => tensor]).map_err(|e| anyhow!("ONNX Runtime run failed: {e}"))?;
        let view = outputs[OUTPUT_NAME].try_extract_array::<f32>().context("reading the features output")?;
        let shape: [usize; 4] = view.shape().try_into().map_err(|_| anyhow!("features output is not 4-D"))?;
        Ok((shape, view.iter().copied().collect()))
    }
}
