//! PEM files of certificate authorities and client identities (TLS to the broker, to partners'
//! look-up services and HTTP endpoints), read and checked when the configuration loads, so that
//! `ponte check` names a wrong file rather than a connection failing later.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The file's bytes, once it holds at least one certificate.
pub fn certificates(path: &Path) -> Result<Vec<u8>, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let found = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if found.is_empty() {
        return Err(format!("{} holds no PEM certificate", path.display()));
    }
    Ok(pem)
}

/// The file's bytes, once it holds a certificate chain and a private key.
pub fn identity(path: &Path) -> Result<Vec<u8>, String> {
    let pem = certificates(path)?;
    PrivateKeyDer::from_pem_slice(&pem)
        .map_err(|e| format!("{} holds no private key in PEM: {e}", path.display()))?;
    Ok(pem)
}

/// A section's two TLS files, as read: its authorities and its client identity.
pub struct Section {
    pub authorities: Option<Vec<u8>>,
    pub identity: Option<Vec<u8>>,
}

/// A section's two TLS files — its authorities and its client identity — each checked as
/// above: their bytes, or every problem naming `section.ca_file` or
/// `section.client_identity_file` and the file.
pub fn section(
    section: &str,
    ca_file: Option<&Path>,
    client_identity_file: Option<&Path>,
) -> Result<Section, Vec<String>> {
    let mut errors = Vec::new();
    let mut read = |key: &str, file: Option<&Path>, check: fn(&Path) -> Result<Vec<u8>, String>| {
        check(file?)
            .map_err(|e| errors.push(format!("{section}.{key}: {e}")))
            .ok()
    };
    let authorities = read("ca_file", ca_file, certificates);
    let identity = read("client_identity_file", client_identity_file, identity);
    if errors.is_empty() {
        Ok(Section {
            authorities,
            identity,
        })
    } else {
        Err(errors)
    }
}
