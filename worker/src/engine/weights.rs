//! Weight sources for the model: safetensors files from a hub model directory (one file or
//! shards with `model.safetensors.index.json`), or random tensors for benchmarks.
//! Every error names the file and the tensor; shapes are checked against the config here.
//! FP8 checkpoints (E4M3 weights with a `<name>_scale` per tensor or per output channel) are
//! dequantized with their scales on load; `dtype: fp8` quantizes them again per channel.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde_json::Value;

use super::error::EngineError;

/// Where the model's tensors come from.
pub enum Weights {
    /// Tensors read from safetensors files, by name, with the file each came from.
    Files { dir: PathBuf, tensors: HashMap<String, (PathBuf, Tensor)>, dtype: DType },
    /// Normal(0, std) random tensors, norms at one: benchmark models with no checkpoint.
    Random { std: f64, dtype: DType, device: Device },
}

fn io_err(path: &Path, e: &std::io::Error) -> EngineError {
    let msg = if e.kind() == std::io::ErrorKind::NotFound { "file not found".to_string() } else { format!("cannot read: {e}") };
    EngineError::ModelFile { path: path.to_path_buf(), msg }
}

fn st_dtype(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    match d {
        S::F32 => Some(DType::F32),
        S::F16 => Some(DType::F16),
        S::BF16 => Some(DType::BF16),
        S::F64 => Some(DType::F64),
        _ => None,
    }
}

/// Lists the safetensors files of a model directory, with the index when sharded.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, EngineError> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let text = std::fs::read_to_string(&index).map_err(|e| io_err(&index, &e))?;
        let v: Value =
            serde_json::from_str(&text).map_err(|e| EngineError::ModelFile { path: index.clone(), msg: format!("invalid JSON: {e}") })?;
        let map = v
            .get("weight_map")
            .and_then(Value::as_object)
            .ok_or_else(|| EngineError::ModelFile { path: index.clone(), msg: "no `weight_map` object".into() })?;
        let mut files: Vec<PathBuf> = Vec::new();
        for f in map.values() {
            let name = f
                .as_str()
                .ok_or_else(|| EngineError::ModelFile { path: index.clone(), msg: "`weight_map` values must be file names".into() })?;
            let p = dir.join(name);
            if !files.contains(&p) {
                files.push(p);
            }
        }
        files.sort();
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    Err(EngineError::ModelFile { path: single, msg: "file not found (nor model.safetensors.index.json)".into() })
}

/// `q * scale` in f32 for an E4M3 tensor `q: [out, ...]` and a scale per tensor (`[]`, `[1]`)
/// or per output channel (`[out]`, `[out, 1]`).
fn dequantize_fp8(q: &Tensor, scale: &Tensor) -> Result<Tensor, String> {
    let q32 = q.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    let s = scale.to_dtype(DType::F32).map_err(|e| e.to_string())?;
    let out = q.dims().first().copied().unwrap_or(1);
    let per_channel = match s.dims() {
        [] | [1] | [1, 1] => false,
        [n] | [n, 1] if *n == out => true,
        other => return Err(format!("scale of shape {other:?} is neither per tensor nor per output channel ({out})")),
    };
    let r = if per_channel {
        let mut shape = vec![out];
        shape.resize(q.rank(), 1);
        q32.broadcast_mul(&s.reshape(shape).map_err(|e| e.to_string())?)
    } else {
        q32.broadcast_mul(&s.flatten_all().and_then(|s| s.get(0)).map_err(|e| e.to_string())?)
    };
    r.map_err(|e| e.to_string())
}

impl Weights {
    /// Reads every safetensors file of `dir` onto `device`, converting floats to `dtype`.
    pub fn load(dir: &Path, device: &Device, dtype: DType) -> Result<Self, EngineError> {
        let mut tensors = HashMap::new();
        for path in weight_files(dir)? {
            let bytes = std::fs::read(&path).map_err(|e| io_err(&path, &e))?;
            let st = safetensors::SafeTensors::deserialize(&bytes)
                .map_err(|e| EngineError::CorruptSafetensors { path: path.clone(), msg: e.to_string() })?;
            let corrupt = |name: &str, e: candle_core::Error| EngineError::CorruptSafetensors {
                path: path.clone(),
                msg: format!("tensor `{name}`: {e}"),
            };
            for (name, view) in st.tensors() {
                if name.ends_with("weight_scale_inv") {
                    return Err(EngineError::ModelFile {
                        path: path.clone(),
                        msg: format!(
                            "tensor `{name}`: block-wise FP8 scales are not supported (use a per-tensor or per-channel FP8 checkpoint, or bf16)"
                        ),
                    });
                }
                let t = if view.dtype() == safetensors::Dtype::F8_E4M3 {
                    let scale_name = format!("{name}_scale");
                    let scale = st.tensor(&scale_name).map_err(|_| EngineError::ModelFile {
                        path: path.clone(),
                        msg: format!("FP8 tensor `{name}` has no `{scale_name}` in the same file"),
                    })?;
                    let q = view.load(&Device::Cpu).map_err(|e| corrupt(&name, e))?;
                    let s = scale.load(&Device::Cpu).map_err(|e| corrupt(&scale_name, e))?;
                    dequantize_fp8(&q, &s)
                        .map_err(|e| EngineError::ModelFile { path: path.clone(), msg: format!("FP8 tensor `{name}`: {e}") })?
                        .to_device(device)
                        .and_then(|t| t.to_dtype(dtype))
                        .map_err(|e| corrupt(&name, e))?
                } else if st_dtype(view.dtype()).is_some() {
                    view.load(device).and_then(|t| t.to_dtype(dtype)).map_err(|e| corrupt(&name, e))?
                } else {
                    return Err(EngineError::ModelFile {
                        path: path.clone(),
                        msg: format!("tensor `{name}` has unsupported dtype {:?}", view.dtype()),
                    });
                };
                tensors.insert(name, (path.clone(), t));
            }
        }
        Ok(Self::Files { dir: dir.to_path_buf(), tensors, dtype })
    }

    /// True when the checkpoint holds `name` (always true for random weights).
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Self::Files { tensors, .. } => tensors.contains_key(name),
            Self::Random { .. } => true,
        }
    }

    /// The tensor `name`, checked to have `shape`.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor, EngineError> {
        match self {
            Self::Files { dir, tensors, .. } => {
                let (path, t) =
                    tensors.get(name).ok_or_else(|| EngineError::MissingTensor { path: dir.clone(), name: name.to_string() })?;
                if t.dims() != shape {
                    return Err(EngineError::ShapeMismatch {
                        path: path.clone(),
                        name: name.to_string(),
                        expected: shape.to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                Ok(t.clone())
            }
            Self::Random { std, dtype, device } => {
                let t = if name.ends_with("norm.weight") {
                    Tensor::ones(shape, DType::F32, device)?
                } else {
                    Tensor::randn(0f32, *std as f32, shape, device)?
                };
                Ok(t.to_dtype(*dtype)?)
            }
        }
    }

    /// The dtype tensors are converted to.
    pub fn dtype(&self) -> DType {
        match self {
            Self::Files { dtype, .. } | Self::Random { dtype, .. } => *dtype,
        }
    }
}
