//! S3-compatible object storage as a place for archives: what an
//! `s3://BUCKET/KEY` name means, how the client is built (endpoint,
//! region and credentials from the `AWS_*` variables and profile files,
//! `--s3-endpoint`, path-style addressing, retries with backoff), and the
//! one place where our synchronous readers and writers meet the async
//! client ([`block_on`], on a runtime of its own).
//!
//! - [`upload`]: an archive streamed into a multipart upload that becomes
//!   an object only when it completes, and is aborted otherwise.
//! - [`remote`]: an object read by ranged GETs (a small block cache for
//!   header-sized reads) or as one streamed GET.
//! - [`profile`]: the `~/.aws/credentials` and `~/.aws/config` files.
//!
//! The client is `object_store` (Apache Arrow): async, multipart, ranged
//! GET, custom endpoints, retries; built with its AWS backend only,
//! signing with ring, TLS by rustls. Leaves the archive format, the sink's
//! commit rule and the readers' checks to [`crate::sink`] and
//! [`crate::archive`].

mod profile;
pub mod remote;
pub mod upload;

use std::fmt;
use std::future::Future;
use std::io;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path as ObjectPath;
use object_store::{BackoffConfig, RetryConfig};

pub use remote::RemoteObject;
pub use upload::ObjectUpload;

/// The scheme of an object name.
pub const SCHEME: &str = "s3://";

/// Threads of the runtime that drives every S3 request: requests are I/O
/// bound, and two keep several parts uploading while a third thread (the
/// archive writer) fills the next part.
const RUNTIME_THREADS: usize = 2;

/// Default request retries on a transient error (5xx, timeouts, dropped
/// connections), with exponential backoff from [`RETRY_INIT_BACKOFF`];
/// `--s3-retries` sets it.
pub const DEFAULT_RETRIES: usize = 10;

/// First backoff between retries; doubled each time up to
/// [`RETRY_MAX_BACKOFF`].
const RETRY_INIT_BACKOFF: Duration = Duration::from_millis(100);

/// Longest backoff between two retries.
const RETRY_MAX_BACKOFF: Duration = Duration::from_secs(15);

/// No retry starts later than this after a request's first try: a part
/// must be re-sent before its signature expires (object_store advises
/// under 5 minutes).
const RETRY_TIMEOUT: Duration = Duration::from_secs(180);

/// S3 error codes that mean our credentials are wrong or not allowed.
const DENIED_CODES: &[&str] = &[
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
];

/// The EC2 instance metadata service, where the client looks for
/// credentials when neither the environment nor a profile has any.
const IMDS_ADDR: &str = "169.254.169.254";

/// An object's name: `s3://BUCKET/KEY`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectUrl {
    /// The bucket.
    pub bucket: String,
    /// The key inside it (no leading `/`).
    pub key: String,
}

impl fmt::Display for ObjectUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}", self.bucket, self.key)
    }
}

/// True for a name that means an object (`s3://...`), not a file.
pub fn is_object_name(name: &str) -> bool {
    name.starts_with(SCHEME)
}

impl ObjectUrl {
    /// Parses `s3://BUCKET/KEY`. The key must not be empty nor end in `/`
    /// (that is a prefix, for `--output-dir`).
    pub fn parse(name: &str) -> Result<ObjectUrl, ObjectError> {
        let bad = |why: &str| ObjectError::BadName {
            name: name.to_string(),
            why: why.to_string(),
        };
        let rest = name
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("it does not start with s3://"))?;
        let (bucket, key) = rest
            .split_once('/')
            .ok_or_else(|| bad("it names a bucket but no key: use s3://BUCKET/KEY"))?;
        if bucket.is_empty() {
            return Err(bad("the bucket name is empty"));
        }
        if key.is_empty() || key.ends_with('/') {
            return Err(bad("the key is empty or ends in '/'"));
        }
        if key
            .split('/')
            .any(|c| c.is_empty() || c == "." || c == "..")
        {
            return Err(bad("the key has an empty, '.' or '..' component"));
        }
        Ok(ObjectUrl {
            bucket: bucket.to_string(),
            key: key.to_string(),
        })
    }

    /// The same bucket, this key with `suffix` added (`KEY.index`).
    pub fn with_suffix(&self, suffix: &str) -> ObjectUrl {
        ObjectUrl {
            bucket: self.bucket.clone(),
            key: format!("{}{suffix}", self.key),
        }
    }

    /// The key as the client's path.
    pub(crate) fn path(&self) -> ObjectPath {
        ObjectPath::from(self.key.as_str())
    }
}

/// Why an object cannot be used. Messages name the object.
#[derive(Debug, thiserror::Error)]
pub enum ObjectError {
    /// Not a usable `s3://BUCKET/KEY`.
    #[error("{name}: not an object name: {why}")]
    BadName {
        /// As typed.
        name: String,
        /// What is wrong.
        why: String,
    },
    /// The client cannot be built (bad endpoint, region...).
    #[error("cannot set up the S3 client for bucket {bucket}: {source}")]
    Client {
        /// The bucket.
        bucket: String,
        /// The client's reason.
        source: Box<object_store::Error>,
    },
    /// The bucket does not exist.
    #[error("{url}: no such bucket {bucket}")]
    NoSuchBucket {
        /// The object asked for.
        url: ObjectUrl,
        /// Its bucket.
        bucket: String,
    },
    /// The key does not exist in the bucket.
    #[error("{url}: no such object")]
    NoSuchKey {
        /// The object asked for.
        url: ObjectUrl,
    },
    /// The store refused our credentials or their permissions.
    #[error(
        "{url}: access denied while trying to {op} (check AWS_ACCESS_KEY_ID, \
         AWS_SECRET_ACCESS_KEY or AWS_PROFILE): {detail}"
    )]
    Denied {
        /// The object.
        url: ObjectUrl,
        /// What we tried.
        op: &'static str,
        /// The store's words.
        detail: String,
    },
    /// The key exists: an archive is never overwritten.
    #[error("{url} already exists; refusing to overwrite it")]
    Exists {
        /// The object.
        url: ObjectUrl,
    },
    /// Any other failure of a request (after its retries).
    #[error("{url}: cannot {op}: {source}")]
    Request {
        /// The object.
        url: ObjectUrl,
        /// What we tried.
        op: &'static str,
        /// The client's reason.
        source: Box<object_store::Error>,
    },
}

impl ObjectError {
    /// Classifies a failed request on `url`.
    pub(crate) fn of(url: &ObjectUrl, op: &'static str, e: object_store::Error) -> ObjectError {
        // S3 names a missing bucket only in the error's body, and the
        // client reports some refusals (a LIST's) as generic errors.
        let text = format!("{e}");
        if text.contains("<Code>NoSuchBucket</Code>") {
            return ObjectError::NoSuchBucket {
                url: url.clone(),
                bucket: url.bucket.clone(),
            };
        }
        if text.contains(IMDS_ADDR) {
            return ObjectError::Denied {
                url: url.clone(),
                op,
                detail: "no credentials were found, and the EC2 instance metadata service \
                         (the last place the client looks) did not answer"
                    .into(),
            };
        }
        if DENIED_CODES
            .iter()
            .any(|c| text.contains(&format!("<Code>{c}</Code>")))
        {
            return ObjectError::Denied {
                url: url.clone(),
                op,
                detail: text,
            };
        }
        match e {
            object_store::Error::NotFound { .. } => ObjectError::NoSuchKey { url: url.clone() },
            object_store::Error::AlreadyExists { .. }
            | object_store::Error::Precondition { .. } => ObjectError::Exists { url: url.clone() },
            object_store::Error::PermissionDenied { source, .. }
            | object_store::Error::Unauthenticated { source, .. } => ObjectError::Denied {
                url: url.clone(),
                op,
                detail: source.to_string(),
            },
            source => ObjectError::Request {
                url: url.clone(),
                op,
                source: Box::new(source),
            },
        }
    }

    /// The io kind that says the same.
    fn kind(&self) -> io::ErrorKind {
        match self {
            ObjectError::BadName { .. } => io::ErrorKind::InvalidInput,
            ObjectError::NoSuchBucket { .. } | ObjectError::NoSuchKey { .. } => {
                io::ErrorKind::NotFound
            }
            ObjectError::Denied { .. } => io::ErrorKind::PermissionDenied,
            ObjectError::Exists { .. } => io::ErrorKind::AlreadyExists,
            ObjectError::Client { .. } | ObjectError::Request { .. } => io::ErrorKind::Other,
        }
    }
}

impl From<ObjectError> for io::Error {
    fn from(e: ObjectError) -> io::Error {
        io::Error::new(e.kind(), e.to_string())
    }
}

/// How objects are reached and written, from the command line: one set
/// per process ([`configure`]).
#[derive(Debug, Clone)]
pub struct Settings {
    /// `--s3-endpoint`: the store's URL (`http://` allowed); else
    /// `AWS_ENDPOINT_URL`, the profile's `endpoint_url`, or AWS.
    pub endpoint: Option<String>,
    /// `--s3-part-size`: bytes per part, at least [`upload::MIN_PART_SIZE`];
    /// `None`: chosen from the archive's size bound.
    pub part_size: Option<u64>,
    /// `--s3-parts-in-flight`: parts uploading at once.
    pub parts_in_flight: usize,
    /// `--s3-retries`: retries of a request on a transient error.
    pub retries: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            endpoint: None,
            part_size: None,
            parts_in_flight: upload::DEFAULT_PARTS_IN_FLIGHT,
            retries: DEFAULT_RETRIES,
        }
    }
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Sets this process's [`Settings`]; the first call wins (the CLI makes
/// it once, before any object is opened).
pub fn configure(settings: Settings) {
    let _ = SETTINGS.set(settings);
}

/// This process's settings (the defaults when never configured).
pub fn settings() -> Settings {
    SETTINGS.get().cloned().unwrap_or_default()
}

/// The runtime every request runs on: its own, so callers on plain
/// threads and on other runtimes' threads alike can wait for a request.
fn runtime() -> &'static tokio::runtime::Runtime {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(RUNTIME_THREADS)
            .thread_name("s3")
            .enable_all()
            .build()
            .expect("cannot start the S3 runtime")
    })
}

/// Runs `fut` on the S3 runtime and waits for it on this thread. Never
/// called from the S3 runtime's own threads.
pub(crate) fn block_on<F>(fut: F) -> F::Output
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("the S3 runtime runs every task to its end")
}

/// Starts `fut` on the S3 runtime without waiting for it.
pub(crate) fn spawn<F>(fut: F)
where
    F: Future<Output = ()> + Send + 'static,
{
    runtime().spawn(fut);
}

/// The client for `bucket`, with [`settings`].
pub(crate) fn store(bucket: &str) -> Result<Arc<AmazonS3>, ObjectError> {
    store_with(bucket, &settings())
}

fn store_with(bucket: &str, settings: &Settings) -> Result<Arc<AmazonS3>, ObjectError> {
    // reqwest's rustls has no provider of its own: ours, as for NBD TLS.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut b = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_virtual_hosted_style_request(false)
        .with_retry(RetryConfig {
            backoff: BackoffConfig {
                init_backoff: RETRY_INIT_BACKOFF,
                max_backoff: RETRY_MAX_BACKOFF,
                base: 2.0,
            },
            max_retries: settings.retries,
            retry_timeout: RETRY_TIMEOUT,
        });
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let prof = profile::Profile::load();
    if env("AWS_ACCESS_KEY_ID").is_none()
        && let Some(p) = &prof
        && let (Some(id), Some(secret)) = (&p.access_key_id, &p.secret_access_key)
    {
        b = b.with_access_key_id(id).with_secret_access_key(secret);
        if let Some(t) = &p.session_token {
            b = b.with_token(t);
        }
    }
    if env("AWS_REGION").is_none()
        && env("AWS_DEFAULT_REGION").is_none()
        && let Some(r) = prof.as_ref().and_then(|p| p.region.clone())
    {
        b = b.with_region(r);
    }
    let endpoint = settings
        .endpoint
        .clone()
        .or_else(|| env("AWS_ENDPOINT_URL"))
        .or_else(|| env("AWS_ENDPOINT"))
        .or_else(|| prof.as_ref().and_then(|p| p.endpoint_url.clone()));
    if let Some(e) = endpoint {
        let http = e.starts_with("http://");
        b = b.with_endpoint(e).with_allow_http(http);
    }
    b.build()
        .map(Arc::new)
        .map_err(|source| ObjectError::Client {
            bucket: bucket.to_string(),
            source: Box::new(source),
        })
}

/// Fails with [`ObjectError::NoSuchBucket`] when `url`'s bucket does not
/// exist (a HEAD's 404 does not say whether the bucket or the key is
/// missing; a LIST's does, and some stores accept an upload into a
/// missing bucket).
pub(crate) fn check_bucket(store: &Arc<AmazonS3>, url: &ObjectUrl) -> Result<(), ObjectError> {
    let s = store.clone();
    let path = url.path();
    block_on(async move { object_store::ObjectStore::list_with_delimiter(&*s, Some(&path)).await })
        .map(drop)
        .map_err(|e| ObjectError::of(url, "list its bucket", e))
}

/// Fails with [`ObjectError::Exists`] when `url` exists.
pub(crate) fn check_absent(store: &Arc<AmazonS3>, url: &ObjectUrl) -> Result<(), ObjectError> {
    use object_store::ObjectStoreExt;
    let s = store.clone();
    let path = url.path();
    match block_on(async move { s.head(&path).await }) {
        Ok(_) => Err(ObjectError::Exists { url: url.clone() }),
        Err(e) => match ObjectError::of(url, "look it up", e) {
            ObjectError::NoSuchKey { .. } => Ok(()),
            other => Err(other),
        },
    }
}

/// The names of the objects right under the prefix `dir`
/// (`s3://BUCKET/PREFIX/`, or `s3://BUCKET` for the top), without the
/// prefix: a directory listing, for `backup --incremental`.
pub fn list_dir(dir: &str) -> Result<Vec<String>, ObjectError> {
    let rest = dir.strip_prefix(SCHEME).unwrap_or(dir);
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let url = ObjectUrl {
        bucket: bucket.to_string(),
        key: prefix.to_string(),
    };
    let store = store(bucket)?;
    let prefix = prefix.trim_end_matches('/').to_string();
    let listed = block_on(async move {
        let p = (!prefix.is_empty()).then(|| ObjectPath::from(prefix.as_str()));
        object_store::ObjectStore::list_with_delimiter(&*store, p.as_ref()).await
    })
    .map_err(|e| ObjectError::of(&url, "list it", e))?;
    Ok(listed
        .objects
        .into_iter()
        .filter_map(|m| m.location.filename().map(str::to_string))
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let u = ObjectUrl::parse("s3://b/dir/vzdump.vma.zst").unwrap();
        assert_eq!(
            (u.bucket.as_str(), u.key.as_str()),
            ("b", "dir/vzdump.vma.zst")
        );
        assert_eq!(u.to_string(), "s3://b/dir/vzdump.vma.zst");
        assert_eq!(u.with_suffix(".index").key, "dir/vzdump.vma.zst.index");
        for bad in [
            "s3://",
            "s3://b",
            "s3://b/",
            "s3:///k",
            "s3://b/d/",
            "s3://b/a//c",
            "x",
        ] {
            let e = ObjectUrl::parse(bad).unwrap_err();
            assert!(matches!(e, ObjectError::BadName { .. }), "{bad}: {e}");
        }
        assert!(is_object_name("s3://b/k") && !is_object_name("/tmp/s3://b"));
    }
}
