//! TLS for the registry from PEM files: a certificate chain (leaf first, as every CA and
//! `openssl req -x509` write it) and its private key (PKCS#8, PKCS#1 RSA or SEC1 EC, not
//! encrypted).
//!
//! The acceptor offers ALPN `h2` and `http/1.1`, so clients that speak HTTP/2 (containerd,
//! Go's net/http) get it and the others fall back to HTTP/1.1. TLS 1.2 and 1.3 with rustls'
//! safe defaults and the ring provider; no client certificates.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls::ServerConfig;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why the TLS files could not be used; every message names the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// the certificate file could not be read or parsed
    #[error("TLS certificate {}: {reason}", path.display())]
    Certificate {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// the key file could not be read or parsed
    #[error("TLS private key {}: {reason}", path.display())]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },
    /// rustls refused the pair (e.g. the key is not the certificate's)
    #[error("TLS certificate {} with key {}: {reason}", cert.display(), key.display())]
    Pair {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// What rustls said.
        reason: String,
    },
}

/// A TLS acceptor for the PEM certificate chain and private key.
pub fn acceptor(cert: &Path, key: &Path) -> anyhow::Result<TlsAcceptor> {
    Ok(TlsAcceptor::from(Arc::new(server_config(cert, key)?)))
}

/// The rustls configuration behind [`acceptor`].
fn server_config(cert: &Path, key: &Path) -> Result<ServerConfig, TlsError> {
    let chain = load_chain(cert)?;
    let private_key = load_key(key)?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let pair_error = |reason: String| TlsError::Pair {
        cert: cert.to_owned(),
        key: key.to_owned(),
        reason,
    };
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| pair_error(e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private_key)
        .map_err(|e| pair_error(format!("{e} (is the key the certificate's?)")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

fn load_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let fail = |reason: String| TlsError::Certificate {
        path: path.to_owned(),
        reason,
    };
    let chain = CertificateDer::pem_file_iter(path)
        .map_err(|e| fail(pem_reason(e)))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| fail(pem_reason(e)))?;
    if chain.is_empty() {
        return Err(fail(
            "no `BEGIN CERTIFICATE` section found (a PEM certificate chain is expected)".into(),
        ));
    }
    Ok(chain)
}

fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Key {
        path: path.to_owned(),
        reason: match e {
            tokio_rustls::rustls::pki_types::pem::Error::NoItemsFound => {
                "no unencrypted private key found (expected a PEM `PRIVATE KEY`, \
                 `RSA PRIVATE KEY` or `EC PRIVATE KEY` section; decrypt an encrypted key with \
                 `openssl pkey`)"
                    .into()
            }
            other => pem_reason(other),
        },
    })
}

fn pem_reason(error: tokio_rustls::rustls::pki_types::pem::Error) -> String {
    match error {
        tokio_rustls::rustls::pki_types::pem::Error::Io(e) => e.to_string(),
        other => format!("not valid PEM: {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Makes a self-signed certificate and key with openssl; None (and a note) without it.
    fn openssl_pair(dir: &Path, algorithm: &[&str]) -> Option<(PathBuf, PathBuf)> {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        let mut args = vec!["req", "-x509"];
        args.extend_from_slice(algorithm);
        args.extend_from_slice(&["-nodes", "-days", "2", "-subj", "/CN=localhost", "-keyout"]);
        let status = Command::new("openssl")
            .args(&args)
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output();
        match status {
            Ok(out) if out.status.success() => Some((cert, key)),
            Ok(out) => panic!("openssl failed: {}", String::from_utf8_lossy(&out.stderr)),
            Err(_) => {
                eprintln!("skipping: openssl is not installed");
                None
            }
        }
    }

    const EC: &[&str] = &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

    #[test]
    fn an_ec_certificate_and_pkcs8_key_load_with_h2_and_http11_alpn() {
        let dir = tempfile::tempdir().unwrap();
        let Some((cert, key)) = openssl_pair(dir.path(), EC) else {
            return;
        };
        let acceptor = acceptor(&cert, &key).unwrap();
        assert_eq!(
            acceptor.config().alpn_protocols,
            vec![b"h2".to_vec(), b"http/1.1".to_vec()]
        );
    }

    #[test]
    fn an_rsa_certificate_loads_with_its_key_in_pkcs1_form() {
        let dir = tempfile::tempdir().unwrap();
        let Some((cert, key)) = openssl_pair(dir.path(), &["-newkey", "rsa:2048"]) else {
            return;
        };
        let pkcs1 = dir.path().join("rsa.pem");
        let out = Command::new("openssl")
            .args(["rsa", "-traditional", "-in"])
            .arg(&key)
            .arg("-out")
            .arg(&pkcs1)
            .output()
            .unwrap();
        assert!(out.status.success());
        assert!(
            std::fs::read_to_string(&pkcs1)
                .unwrap()
                .contains("BEGIN RSA PRIVATE KEY")
        );
        assert!(acceptor(&cert, &key).is_ok());
        assert!(acceptor(&cert, &pkcs1).is_ok());
    }

    #[test]
    fn a_missing_file_is_named_in_the_error() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.pem");
        let message = acceptor(&missing, &missing).err().unwrap().to_string();
        assert!(message.contains("TLS certificate"), "{message}");
        assert!(message.contains("nope.pem"), "{message}");
    }

    #[test]
    fn files_without_the_expected_sections_are_refused_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let Some((cert, key)) = openssl_pair(dir.path(), EC) else {
            return;
        };
        // The certificate given as the key, and the key as the certificate.
        let message = acceptor(&cert, &cert).err().unwrap().to_string();
        assert!(message.contains("TLS private key"), "{message}");
        assert!(message.contains("cert.pem"), "{message}");
        let message = acceptor(&key, &key).err().unwrap().to_string();
        assert!(message.contains("TLS certificate"), "{message}");
        assert!(message.contains("key.pem"), "{message}");
        let garbage = dir.path().join("garbage.pem");
        std::fs::write(&garbage, "-----BEGIN CERTIFICATE-----\n!!!\n").unwrap();
        let message = acceptor(&garbage, &key).err().unwrap().to_string();
        assert!(message.contains("garbage.pem"), "{message}");
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused() {
        let first = tempfile::tempdir().unwrap();
        let second = tempfile::tempdir().unwrap();
        let (Some((cert, _)), Some((_, other_key))) = (
            openssl_pair(first.path(), EC),
            openssl_pair(second.path(), EC),
        ) else {
            return;
        };
        let message = acceptor(&cert, &other_key).err().unwrap().to_string();
        assert!(message.contains("cert.pem"), "{message}");
        assert!(message.contains("key.pem"), "{message}");
    }
}
