//! Prints a CustomResourceDefinition as YAML: the BatchInferenceJob's
//! (`crds/batchinferencejob.yaml`), or with `gpubudget` the GpuBudget's (`crds/gpubudget.yaml`).

fn main() -> std::process::ExitCode {
    let which = std::env::args().nth(1);
    let yaml = match which.as_deref() {
        None | Some("batchinferencejob") => sluice_api::validate::crd_yaml(),
        Some("gpubudget") => sluice_api::validate::gpubudget_crd_yaml(),
        Some(other) => Err(format!("unknown CRD {other:?}: expected batchinferencejob or gpubudget")),
    };
    match yaml {
        Ok(yaml) => {
            print!("{yaml}");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("crdgen: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
