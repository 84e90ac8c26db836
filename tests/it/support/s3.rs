//! A real S3 server for the object-storage tests: s3s-fs (an S3 server
//! over a directory: a bucket is a folder, an object a file) run in this
//! process on 127.0.0.1, reached through a TCP relay that counts the
//! bytes the server sends (what a ranged reader fetched) and can cut the
//! store off ([`S3Server::set_down`]: open connections are dropped, new
//! ones are read for their request line and closed) and bring it back.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// The one access key the server accepts.
pub const S3_ACCESS_KEY: &str = "vmatest";
/// Its secret.
pub const S3_SECRET_KEY: &str = "vmatest-secret-key";

/// A running server; see the module docs. Stops when dropped.
pub struct S3Server {
    /// The directory served: `root/BUCKET/KEY`.
    pub root: tempfile::TempDir,
    /// `http://127.0.0.1:PORT`, the relay.
    pub endpoint: String,
    /// Its own runtime (the tests may be sync or async), shut down in
    /// the background when dropped.
    rt: Option<tokio::runtime::Runtime>,
    relay: Arc<Relay>,
}

struct Relay {
    /// Bytes from the server to clients.
    sent: AtomicU64,
    /// Bytes from clients to the server.
    received: AtomicU64,
    /// Client bytes past this many are held back (not forwarded) until
    /// the connection is dropped.
    stall_at: AtomicU64,
    down: AtomicBool,
    /// Request lines that arrived while down.
    refused: Mutex<Vec<String>>,
    conns: Mutex<JoinSet<()>>,
}

impl S3Server {
    /// Starts a server over a new empty directory.
    pub fn start() -> S3Server {
        let root = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let fs = s3s_fs::FileSystem::new(root.path()).unwrap();
        let mut b = s3s::service::S3ServiceBuilder::new(fs);
        b.set_auth(s3s::auth::SimpleAuth::from_single(
            S3_ACCESS_KEY,
            S3_SECRET_KEY,
        ));
        let service = b.build();
        let relay = Arc::new(Relay {
            sent: AtomicU64::new(0),
            received: AtomicU64::new(0),
            stall_at: AtomicU64::new(u64::MAX),
            down: AtomicBool::new(false),
            refused: Mutex::new(Vec::new()),
            conns: Mutex::new(JoinSet::new()),
        });
        // On a thread of its own: an async test's thread cannot block on
        // another runtime.
        let setup = async {
            let server = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server_addr = server.local_addr().unwrap();
            tokio::spawn(async move {
                loop {
                    let Ok((sock, _)) = server.accept().await else {
                        return;
                    };
                    let service = service.clone();
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(sock);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
            let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let front_addr = front.local_addr().unwrap();
            let r = relay.clone();
            tokio::spawn(async move {
                loop {
                    let Ok((sock, _)) = front.accept().await else {
                        return;
                    };
                    let r2 = r.clone();
                    if r.down.load(Ordering::SeqCst) {
                        tokio::spawn(refuse(sock, r2));
                        continue;
                    }
                    let mut conns = r.conns.lock().unwrap();
                    conns.spawn(relay_conn(sock, server_addr, r2));
                    while conns.try_join_next().is_some() {}
                }
            });
            format!("http://{front_addr}")
        };
        let endpoint = std::thread::scope(|sc| sc.spawn(|| rt.block_on(setup)).join().unwrap());
        S3Server {
            root,
            endpoint,
            rt: Some(rt),
            relay,
        }
    }

    /// Makes bucket `name`.
    pub fn bucket(&self, name: &str) -> &Self {
        std::fs::create_dir_all(self.root.path().join(name)).unwrap();
        self
    }

    /// `cmd` with this server's credentials, region and endpoint in its
    /// environment (and no profile of the user's).
    pub fn env<'a>(&self, cmd: &'a mut Command) -> &'a mut Command {
        self.env_with_secret(cmd, S3_SECRET_KEY)
    }

    /// [`env`](Self::env) with another secret key.
    pub fn env_with_secret<'a>(&self, cmd: &'a mut Command, secret: &str) -> &'a mut Command {
        cmd.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
    }

    /// [`env`](Self::env) for a tokio command.
    pub fn env_async<'a>(
        &self,
        cmd: &'a mut tokio::process::Command,
    ) -> &'a mut tokio::process::Command {
        cmd.env("AWS_ACCESS_KEY_ID", S3_ACCESS_KEY)
            .env("AWS_SECRET_ACCESS_KEY", S3_SECRET_KEY)
            .env("AWS_REGION", "us-east-1")
            .env("AWS_ENDPOINT_URL", &self.endpoint)
            .env("AWS_CONFIG_FILE", "/nonexistent")
            .env("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
            .env_remove("AWS_PROFILE")
            .env_remove("AWS_SESSION_TOKEN")
    }

    /// The keys of the objects in `bucket` (under folders too), sorted.
    pub fn keys(&self, bucket: &str) -> Vec<String> {
        let base = self.root.path().join(bucket);
        let mut out: Vec<String> = super::tree(&base)
            .into_iter()
            .filter(|p| base.join(p).is_file())
            .map(|p| p.to_string_lossy().into_owned())
            .collect();
        out.sort();
        out
    }

    /// Where object `key` of `bucket` lies.
    pub fn object_path(&self, bucket: &str, key: &str) -> PathBuf {
        self.root.path().join(bucket).join(key)
    }

    /// Bytes the server has sent so far.
    pub fn sent(&self) -> u64 {
        self.relay.sent.load(Ordering::SeqCst)
    }

    /// Bytes the server has received so far.
    pub fn received(&self) -> u64 {
        self.relay.received.load(Ordering::SeqCst)
    }

    /// Holds back what clients send past `bytes` in all (a transfer that
    /// stalls), until [`set_down`](Self::set_down) drops it.
    pub fn stall_after(&self, bytes: u64) {
        self.relay.stall_at.store(bytes, Ordering::SeqCst);
    }

    /// Cuts the store off (`true`) or brings it back.
    pub fn set_down(&self, down: bool) {
        self.relay.down.store(down, Ordering::SeqCst);
        if down {
            self.relay.stall_at.store(u64::MAX, Ordering::SeqCst);
            self.relay.conns.lock().unwrap().abort_all();
        }
    }

    /// The request lines refused while down.
    pub fn refused(&self) -> Vec<String> {
        self.relay.refused.lock().unwrap().clone()
    }

    /// What is left of multipart uploads in the store (s3s-fs keeps an
    /// upload's parts and state as `.upload*` files in its root).
    pub fn upload_leftovers(&self) -> Vec<String> {
        std::fs::read_dir(self.root.path())
            .unwrap()
            .filter_map(|e| e.unwrap().file_name().into_string().ok())
            .filter(|n| n.starts_with(".upload"))
            .collect()
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Reads a request's first line and closes the connection.
async fn refuse(mut sock: TcpStream, relay: Arc<Relay>) {
    let mut buf = vec![0u8; 256];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), sock.read(&mut buf))
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or(0);
    let text = String::from_utf8_lossy(&buf[..n]);
    let line = text.lines().next().unwrap_or("").to_string();
    relay.refused.lock().unwrap().push(line);
}

/// Copies both ways between a client and the server, counting.
async fn relay_conn(client: TcpStream, server: std::net::SocketAddr, relay: Arc<Relay>) {
    use tokio::io::AsyncWriteExt;
    let Ok(upstream) = TcpStream::connect(server).await else {
        return;
    };
    let (mut cr, mut cw) = client.into_split();
    let (mut sr, mut sw) = upstream.into_split();
    let r1 = relay.clone();
    let up = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match cr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let before = r1.received.fetch_add(n as u64, Ordering::SeqCst);
            if before + n as u64 > r1.stall_at.load(Ordering::SeqCst) {
                std::future::pending::<()>().await;
            }
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = sw.shutdown().await;
    };
    let down = async move {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            let n = match sr.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            relay.sent.fetch_add(n as u64, Ordering::SeqCst);
            if cw.write_all(&buf[..n]).await.is_err() {
                break;
            }
        }
        let _ = cw.shutdown().await;
    };
    tokio::join!(up, down);
}
