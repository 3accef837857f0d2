//! TLS for client connections: the acceptor built from the configured PEM files (rustls with
//! the `ring` provider), and a self-signed certificate for `tidemark dev`.

use std::path::Path;
#[cfg(feature = "dev")]
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The acceptor for `cfg`, or `None` when no certificate is configured.
pub fn acceptor(cfg: &TlsConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        return Ok(None);
    };
    let certs = load_certs(cert)?;
    let key = load_key(key)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls: the certificate and key do not fit together: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

fn load_certs(path: &Path) -> anyhow::Result<Vec<pki_types::CertificateDer<'static>>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("tls.cert_file: cannot read {}", path.display()))?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .with_context(|| format!("tls.cert_file: {} is not valid PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("tls.cert_file: no certificate in {}", path.display());
    }
    Ok(certs)
}

fn load_key(path: &Path) -> anyhow::Result<pki_types::PrivateKeyDer<'static>> {
    let pem = std::fs::read(path)
        .with_context(|| format!("tls.key_file: cannot read {}", path.display()))?;
    rustls_pemfile::private_key(&mut pem.as_slice())
        .with_context(|| format!("tls.key_file: {} is not valid PEM", path.display()))?
        .ok_or_else(|| anyhow::anyhow!("tls.key_file: no private key in {}", path.display()))
}

/// Writes a self-signed certificate for `localhost`/`127.0.0.1` and its key into `dir`;
/// returns (cert path, key path). For `tidemark dev` and tests only.
#[cfg(feature = "dev")]
pub fn self_signed(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .context("generating a self-signed certificate")?;
    let cert = dir.join("tidemark-dev.crt");
    let key = dir.join("tidemark-dev.key");
    std::fs::write(&cert, ck.cert.pem()).context("writing the certificate")?;
    std::fs::write(&key, ck.key_pair.serialize_pem()).context("writing the key")?;
    Ok((cert, key))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(feature = "dev")]
    fn acceptor_from_files_and_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        assert!(acceptor(&TlsConfig::default()).unwrap().is_none());
        let (cert, key) = self_signed(dir.path()).unwrap();
        let cfg = TlsConfig {
            cert_file: Some(cert.clone()),
            key_file: Some(key.clone()),
            ..Default::default()
        };
        assert!(acceptor(&cfg).unwrap().is_some());
        // Swapped files, a missing file, and garbage each name the problem.
        let swapped = TlsConfig {
            cert_file: Some(key.clone()),
            key_file: Some(cert.clone()),
            ..Default::default()
        };
        let e = acceptor(&swapped).err().unwrap().to_string();
        assert!(e.contains("no certificate"), "{e}");
        let missing = TlsConfig {
            cert_file: Some(dir.path().join("nope.crt")),
            key_file: Some(key.clone()),
            ..Default::default()
        };
        let e = acceptor(&missing).err().unwrap().to_string();
        assert!(e.contains("cannot read"), "{e}");
        let junk = dir.path().join("junk.key");
        std::fs::write(&junk, "not a key").unwrap();
        let bad_key = TlsConfig {
            cert_file: Some(cert),
            key_file: Some(junk),
            ..Default::default()
        };
        let e = acceptor(&bad_key).err().unwrap().to_string();
        assert!(e.contains("no private key"), "{e}");
    }
}
