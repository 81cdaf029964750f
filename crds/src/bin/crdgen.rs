//! Prints the BatchInferenceJob CustomResourceDefinition as YAML (`crds/batchinferencejob.yaml`).

fn main() -> std::process::ExitCode {
    match sluice_api::validate::crd_yaml() {
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
