//! TLS test material: [`Pki`] makes a CA, a server certificate for
//! localhost/127.0.0.1, a client certificate signed by the CA and one
//! signed by a foreign CA, with the `openssl` CLI; [`Pki::serve_args`]
//! gives `serve` its TLS flags; client directories are laid out as GnuTLS
//! clients (QEMU's `tls-creds-x509`, libnbd's `tls-certificates`) expect
//! them. [`tls_client`] is a rustls client over any socket, for raw
//! protocol tests after STARTTLS.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

use super::run_ok;

/// Certificates and keys in one directory; see the module docs.
pub struct Pki {
    pub dir: PathBuf,
}

/// Extensions of the server certificate: valid for the names clients use.
const SERVER_EXT: &str = "subjectAltName=DNS:localhost,IP:127.0.0.1\n\
    basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=serverAuth\n";

/// Extensions of client certificates (QEMU insists on keyEncipherment).
const CLIENT_EXT: &str = "basicConstraints=critical,CA:FALSE\n\
    keyUsage=critical,digitalSignature,keyEncipherment\n\
    extendedKeyUsage=clientAuth\n";

impl Pki {
    /// Makes everything in `dir` (created): `ca`, `foreign-ca`, `server`,
    /// `client` (signed by `ca`) and `foreign` (signed by `foreign-ca`), each
    /// as `NAME-cert.pem` and `NAME-key.pem`; and the client directories
    /// `good/`, `foreign/` and `nocert/` (CA only).
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
        };
        pki.ca("ca");
        pki.ca("foreign-ca");
        pki.leaf("server", "ca", SERVER_EXT);
        pki.leaf("client", "ca", CLIENT_EXT);
        pki.leaf("foreign", "foreign-ca", CLIENT_EXT);
        pki.client_dir("good", Some("client"));
        pki.client_dir("foreign", Some("foreign"));
        pki.client_dir("nocert", None);
        pki
    }

    /// `dir/NAME-cert.pem`.
    pub fn cert(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-cert.pem"))
    }

    /// `dir/NAME-key.pem`.
    pub fn key(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}-key.pem"))
    }

    /// A GnuTLS client directory (`good`, `foreign`, `nocert`).
    pub fn client(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn openssl(&self, args: &[&str]) {
        run_ok(Command::new("openssl").current_dir(&self.dir).args(args));
    }

    fn ca(&self, name: &str) {
        let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
        let subj = format!("/CN=vma-writer test {name}");
        self.openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subj,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ]);
    }

    fn leaf(&self, name: &str, ca: &str, ext: &str) {
        let (key, cert) = (format!("{name}-key.pem"), format!("{name}-cert.pem"));
        let (csr, extfile) = (format!("{name}.csr"), format!("{name}.ext"));
        std::fs::write(self.dir.join(&extfile), ext).unwrap();
        let subj = format!("/CN={name}");
        self.openssl(&[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            &subj,
        ]);
        let (ca_cert, ca_key) = (format!("{ca}-cert.pem"), format!("{ca}-key.pem"));
        let serial = format!("0x{:016x}", rand_serial());
        self.openssl(&[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_cert,
            "-CAkey",
            &ca_key,
            "-set_serial",
            &serial,
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &extfile,
        ]);
    }

    fn client_dir(&self, dir: &str, client: Option<&str>) {
        let d = self.dir.join(dir);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::copy(self.cert("ca"), d.join("ca-cert.pem")).unwrap();
        if let Some(c) = client {
            std::fs::copy(self.cert(c), d.join("client-cert.pem")).unwrap();
            std::fs::copy(self.key(c), d.join("client-key.pem")).unwrap();
        }
    }

    /// `serve`'s flags for `--tls MODE` with the server certificate, and
    /// the CA with `--tls-verify-client` when `verify_client`.
    pub fn serve_args(&self, mode: &str, verify_client: bool) -> Vec<String> {
        let mut v = vec![
            "--tls".to_owned(),
            mode.to_owned(),
            "--tls-cert".to_owned(),
            self.cert("server").display().to_string(),
            "--tls-key".to_owned(),
            self.key("server").display().to_string(),
        ];
        if verify_client {
            v.push("--tls-ca".to_owned());
            v.push(self.cert("ca").display().to_string());
            v.push("--tls-verify-client".to_owned());
        }
        v
    }

    /// A rustls client configuration trusting our CA, presenting the
    /// certificate `client` (e.g. "client", "foreign") when given.
    pub fn rustls_client(&self, client: Option<&str>) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        for c in CertificateDer::pem_file_iter(self.cert("ca")).unwrap() {
            roots.add(c.unwrap()).unwrap();
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let b = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let cfg = match client {
            None => b.with_no_client_auth(),
            Some(c) => {
                let chain = CertificateDer::pem_file_iter(self.cert(c))
                    .unwrap()
                    .map(|c| c.unwrap())
                    .collect();
                let key = PrivateKeyDer::from_pem_file(self.key(c)).unwrap();
                b.with_client_auth_cert(chain, key).unwrap()
            }
        };
        Arc::new(cfg)
    }
}

fn rand_serial() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    (t.as_nanos() as u64 ^ u64::from(std::process::id()).rotate_left(32)) & (u64::MAX >> 1)
}

/// A TLS client session over `sock` for server name `localhost`; the TLS
/// handshake runs on first use.
pub fn tls_client<S: Read + Write>(
    cfg: Arc<rustls::ClientConfig>,
    sock: S,
) -> rustls::StreamOwned<rustls::ClientConnection, S> {
    let name = ServerName::try_from("localhost").unwrap();
    let conn = rustls::ClientConnection::new(cfg, name).unwrap();
    rustls::StreamOwned::new(conn, sock)
}

/// Sends one option on any stream.
pub fn send_option_on(s: &mut impl Write, code: u32, payload: &[u8]) {
    s.write_all(&super::option_bytes(code, payload)).unwrap();
    s.flush().unwrap();
}

/// Reads option replies on any stream up to and including the final one
/// (ACK or an error): (option, reply type, payload) each.
pub fn read_option_replies_on(s: &mut impl Read) -> Vec<(u32, u32, Vec<u8>)> {
    let mut v = Vec::new();
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).expect("option reply header");
        assert_eq!(
            &h[0..8],
            &vma_writer::nbd::wire::NBD_REP_MAGIC.to_be_bytes()
        );
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let kind = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).expect("option reply payload");
        let last = kind == vma_writer::nbd::wire::NBD_REP_ACK.0 || kind & 0x8000_0000 != 0;
        v.push((opt, kind, p));
        if last {
            return v;
        }
    }
}
