//! TLS for the NBD server: what a listener offers (`NBD_OPT_STARTTLS`,
//! optional or required) and the rustls configuration behind it.
//!
//! [`Tls`] is built once at startup, from PEM files ([`TlsFiles`]) or from
//! a ready `rustls::ServerConfig`; every error names the file it is about.
//! The upgrade itself (when STARTTLS is answered, what state is dropped)
//! is `nbd::handshake`'s and `nbd::server`'s. rustls with the *ring*
//! provider: TLS 1.2 and 1.3, X.509 certificates only (rustls has no
//! TLS-PSK, so nbdkit's and QEMU's PSK mode is not available).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::RootCertStore;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

/// TLS on a listener: the acceptor, and whether plain-text clients are
/// refused.
#[derive(Clone)]
pub struct Tls {
    acceptor: TlsAcceptor,
    required: bool,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("required", &self.required)
            .finish_non_exhaustive()
    }
}

/// The PEM files a [`Tls`] is made of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsFiles {
    /// The server's certificate chain (leaf first).
    pub cert: PathBuf,
    /// The server's private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// CA certificates that client certificates must chain to; when given,
    /// every client must present such a certificate.
    pub client_ca: Option<PathBuf>,
}

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read or parsed.
    #[error("{what} {}: {source}", path.display())]
    Pem {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: rustls_pki_types::pem::Error,
    },
    /// A certificate file held no certificate.
    #[error("{what} {}: no CERTIFICATE in the file", path.display())]
    NoCertificate {
        /// What the file should hold.
        what: &'static str,
        /// The file.
        path: PathBuf,
    },
    /// A CA certificate was refused as a trust anchor.
    #[error("client CA {}: {source}", path.display())]
    BadCa {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
    /// The client certificate verifier could not be built.
    #[error("client CA {}: {source}", path.display())]
    Verifier {
        /// The file.
        path: PathBuf,
        /// rustls's reason.
        source: rustls::server::VerifierBuilderError,
    },
    /// The certificate and key do not make a server configuration (e.g.
    /// the key does not match the certificate).
    #[error("certificate {} with key {}: {source}", cert.display(), key.display())]
    Config {
        /// The certificate file.
        cert: PathBuf,
        /// The key file.
        key: PathBuf,
        /// rustls's reason.
        source: rustls::Error,
    },
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = |source| TlsError::Pem {
        what,
        path: path.to_owned(),
        source,
    };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(pem)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(pem)?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

impl Tls {
    /// TLS with a ready rustls configuration.
    pub fn new(config: Arc<rustls::ServerConfig>, required: bool) -> Tls {
        Tls {
            acceptor: TlsAcceptor::from(config),
            required,
        }
    }

    /// Loads `files` into a rustls configuration (ring provider, TLS 1.2
    /// and 1.3). With `files.client_ca`, clients without a certificate
    /// that chains to it fail in the TLS handshake.
    pub fn from_files(files: &TlsFiles, required: bool) -> Result<Tls, TlsError> {
        let certs = read_certs("certificate", &files.cert)?;
        let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|source| TlsError::Pem {
            what: "private key",
            path: files.key.clone(),
            source,
        })?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config_err = |source| TlsError::Config {
            cert: files.cert.clone(),
            key: files.key.clone(),
            source,
        };
        let builder = rustls::ServerConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(config_err)?;
        let builder = match &files.client_ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for c in read_certs("client CA", ca)? {
                    roots.add(c).map_err(|source| TlsError::BadCa {
                        path: ca.clone(),
                        source,
                    })?;
                }
                let verifier =
                    WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                        .build()
                        .map_err(|source| TlsError::Verifier {
                            path: ca.clone(),
                            source,
                        })?;
                builder.with_client_cert_verifier(verifier)
            }
            None => builder.with_no_client_auth(),
        };
        let config = builder.with_single_cert(certs, key).map_err(config_err)?;
        Ok(Tls::new(Arc::new(config), required))
    }

    /// Plain-text clients are refused (`NBD_REP_ERR_TLS_REQD`).
    pub fn required(&self) -> bool {
        self.required
    }

    pub(super) fn acceptor(&self) -> &TlsAcceptor {
        &self.acceptor
    }
}
