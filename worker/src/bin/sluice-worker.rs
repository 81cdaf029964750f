//! `sluice-worker`: the program each worker pod (or local-mode process) runs; see
//! `docs/worker.md`. Exits 0 committed, 1 retryable, 2 usage, 3 permanent, 143 stopped.

use std::process::ExitCode;

use clap::Parser;
use sluice_worker::app;
use sluice_worker::cli::Args;

fn main() -> ExitCode {
    sluice_api::tls::install_crypto_provider();
    let code = app::main_with(Args::parse());
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}
