//! TLS for client connections: the acceptor built from the configured PEM files (rustls with
//! the `ring` provider), PEM loading shared with the server side ([`crate::server_tls`]), and
//! throwaway certificates for `tidemark dev`.

use std::path::Path;
#[cfg(feature = "dev")]
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use rustls_pki_types::pem::PemObject;
use tokio_rustls::rustls::{self, pki_types};
use tokio_rustls::TlsAcceptor;

use crate::config::TlsConfig;

/// The acceptor for `cfg`, or `None` when no certificate is configured.
pub fn acceptor(cfg: &TlsConfig) -> anyhow::Result<Option<TlsAcceptor>> {
    let (Some(cert), Some(key)) = (&cfg.cert_file, &cfg.key_file) else {
        return Ok(None);
    };
    let certs = load_certs(cert, "tls.cert_file")?;
    let key = load_key(key, "tls.key_file")?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let server = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("tls: protocol versions")?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| anyhow::anyhow!("tls: the certificate and key do not fit together: {e}"))?;
    Ok(Some(TlsAcceptor::from(Arc::new(server))))
}

/// Every certificate in the PEM file `path`; errors name the config `field`.
pub fn load_certs(
    path: &Path,
    field: &str,
) -> anyhow::Result<Vec<pki_types::CertificateDer<'static>>> {
    let certs = pki_types::CertificateDer::pem_file_iter(path)
        .map_err(|e| pem_error(field, path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(field, path, e))?;
    if certs.is_empty() {
        anyhow::bail!("{field}: no certificate in {}", path.display());
    }
    Ok(certs)
}

/// The first private key (PKCS#8, PKCS#1 or SEC1) in the PEM file `path`.
pub fn load_key(path: &Path, field: &str) -> anyhow::Result<pki_types::PrivateKeyDer<'static>> {
    pki_types::PrivateKeyDer::from_pem_file(path).map_err(|e| match e {
        pki_types::pem::Error::NoItemsFound => {
            anyhow::anyhow!("{field}: no private key in {}", path.display())
        }
        e => pem_error(field, path, e),
    })
}

fn pem_error(field: &str, path: &Path, e: pki_types::pem::Error) -> anyhow::Error {
    match e {
        pki_types::pem::Error::Io(e) => {
            anyhow::anyhow!("{field}: cannot read {}: {e}", path.display())
        }
        e => anyhow::anyhow!("{field}: {} is not valid PEM: {e}", path.display()),
    }
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

/// Files of a throwaway certificate authority and a server certificate it signed.
#[cfg(feature = "dev")]
#[derive(Clone, Debug)]
pub struct DevCerts {
    /// The authority's certificate (what `sslrootcert` points at).
    pub ca_cert: PathBuf,
    /// The server's certificate and key (PostgreSQL's `server.crt` / `server.key`).
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Writes a new certificate authority and a server certificate for `names` (DNS names or IP
/// addresses) signed by it into `dir` (the key with mode 0600). For `tidemark dev
/// --server-tls` and tests only.
#[cfg(feature = "dev")]
pub fn dev_ca_and_server_cert(dir: &Path, names: &[&str]) -> anyhow::Result<DevCerts> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate().context("generating a CA key")?;
    let mut ca = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "tidemark dev CA");
    let ca_cert = ca.self_signed(&ca_key).context("signing the CA")?;
    let key = KeyPair::generate().context("generating a server key")?;
    let mut params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
            .context("server certificate parameters")?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("localhost"),
    );
    let cert = params
        .signed_by(&key, &ca_cert, &ca_key)
        .context("signing the server certificate")?;
    let out = DevCerts {
        ca_cert: dir.join("tidemark-dev-ca.crt"),
        cert: dir.join("tidemark-dev-server.crt"),
        key: dir.join("tidemark-dev-server.key"),
    };
    std::fs::write(&out.ca_cert, ca_cert.pem()).context("writing the CA certificate")?;
    std::fs::write(&out.cert, cert.pem()).context("writing the server certificate")?;
    write_private(&out.key, key.serialize_pem().as_bytes()).context("writing the server key")?;
    Ok(out)
}

#[cfg(feature = "dev")]
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)
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
