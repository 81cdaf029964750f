//! Build script of `sluice-worker`: with the `cuda` feature, compiles the engine's own CUDA
//! kernels (`kernels/*.cu`) to PTX with nvcc into OUT_DIR; without it, does nothing at all.
//! nvcc comes from `CUDA_ROOT`/`CUDA_PATH` or PATH; `CUDA_COMPUTE_CAP` picks the target (90).

use std::path::PathBuf;
use std::process::Command;

const KERNELS: [&str; 1] = ["paged_attention"];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return Ok(());
    }
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    println!("cargo:rerun-if-env-changed=CUDA_ROOT");
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let nvcc = ["CUDA_ROOT", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"));
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "90".into());
    for k in KERNELS {
        let src = format!("kernels/{k}.cu");
        println!("cargo:rerun-if-changed={src}");
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", "-std=c++17"])
            .arg(format!("-arch=sm_{cap}"))
            .arg("-o")
            .arg(out.join(format!("{k}.ptx")))
            .arg(&src)
            .status()
            .map_err(|e| format!("running {}: {e}", nvcc.display()))?;
        if !status.success() {
            return Err(format!("nvcc failed on {src}: {status}").into());
        }
    }
    Ok(())
}
