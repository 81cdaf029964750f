//! The process-wide TLS crypto provider. Every binary calls [`install_crypto_provider`] first
//! thing in `main`, so the kube client and object_store's HTTP client agree on one provider
//! (aws-lc-rs) even if a dependency later enables a second one in rustls.

/// Install aws-lc-rs as rustls's process-wide crypto provider. Idempotent: a provider already
/// installed (by an earlier call, or by a test harness) is kept.
pub fn install_crypto_provider() {
    // `Err` only means a provider is installed already, which is what we want.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
}

#[cfg(test)]
mod tests {
    #[test]
    fn installing_twice_is_harmless() {
        super::install_crypto_provider();
        super::install_crypto_provider();
        assert!(rustls::crypto::CryptoProvider::get_default().is_some());
    }
}
