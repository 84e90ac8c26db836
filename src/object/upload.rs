//! An archive streamed into one S3 multipart upload ([`ObjectUpload`]):
//! the bytes are cut into parts of one size, several parts upload at
//! once, and the object appears only when [`ObjectUpload::complete`]
//! completes the upload: our `.partial` → rename rule for object stores.
//! Dropped before that (a failed job, a signal, a lost connection, a
//! rejected part), the upload is aborted, so neither an object nor its
//! parts remain (S3 keeps the parts of an unfinished upload, and bills
//! them, until it is aborted).
//!
//! Memory is bounded by (parts in flight + 1) × part size: a part being
//! filled, the others uploading; a full part waits for the oldest to
//! finish (back-pressure to the archive writer). When a large archive
//! needs larger parts, fewer upload at once ([`parts_in_flight_for`]), so
//! the bound stays what the settings ask for, or two parts.
//!
//! An existing key is never overwritten: it is looked up (HEAD) before
//! the upload starts and again just before it completes. S3's
//! `CompleteMultipartUpload` takes `If-None-Match: *`, but object_store
//! does not let a caller send it, so a writer racing us between that last
//! HEAD and the completion can still lose its object to ours. Single
//! objects (the index beside a plain archive) are put with
//! `If-None-Match: *`.

use std::io::{self, Write};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use object_store::aws::AmazonS3;
use object_store::multipart::{MultipartStore, PartId};
use object_store::{MultipartId, ObjectStore, PutMode, PutOptions, PutPayload};

use super::{ObjectError, ObjectUrl, Settings, block_on, check_absent, check_bucket, spawn, store};

/// S3's smallest part (but the last): 5 MiB.
pub const MIN_PART_SIZE: u64 = 5 << 20;

/// S3's largest part: 5 GiB.
pub const MAX_PART_SIZE: u64 = 5 << 30;

/// S3's limit of parts in one upload.
pub const MAX_PARTS: usize = 10_000;

/// Parts we plan an archive's size bound for, below [`MAX_PARTS`] so a
/// bound that is a little off still fits.
const PLANNED_PARTS: u64 = 9_000;

/// Part size when the archive is small enough: 16 MiB parts keep a
/// request's overhead small against its payload on a LAN, and 4 of them
/// in flight stay within a backup's memory budget (64 MiB).
pub const DEFAULT_PART_SIZE: u64 = 16 << 20;

/// Parts uploading at once by default: enough to keep a link busy while
/// one part waits on its response.
pub const DEFAULT_PARTS_IN_FLIGHT: usize = 4;

/// Tries to abort an upload: a store that went away may come back, and an
/// upload left behind keeps its parts; the waits double from
/// [`ABORT_FIRST_WAIT`] (about 30 s in all).
const ABORT_TRIES: u32 = 8;

/// First wait between two tries to abort.
const ABORT_FIRST_WAIT: Duration = Duration::from_millis(250);

/// An upper bound on the bytes of an archive of `drive_bytes` of drives:
/// extent headers (at most 1/128 with one cluster per extent), zstd's
/// worst-case growth (under 1/256), the index (1/4096) and the header
/// with its configs (under 64 MiB).
pub fn archive_bound(drive_bytes: u64) -> u64 {
    drive_bytes
        .saturating_add(drive_bytes / 32)
        .saturating_add(64 << 20)
}

/// The part size for an archive of at most `bound` bytes: the configured
/// size (or [`DEFAULT_PART_SIZE`]), raised to a whole MiB so that the
/// archive fits in [`PLANNED_PARTS`].
pub fn part_size_for(bound: Option<u64>, configured: Option<u64>) -> u64 {
    let base = configured.unwrap_or(DEFAULT_PART_SIZE).max(MIN_PART_SIZE);
    let need = bound.map_or(0, |b| b.div_ceil(PLANNED_PARTS).next_multiple_of(1 << 20));
    base.max(need).min(MAX_PART_SIZE)
}

/// Parts uploading at once for parts of `part_size`: what `settings` ask
/// for, fewer when the part size was raised for a large archive, so that
/// the parts held stay within what the settings' own part size would take
/// (([`Settings::parts_in_flight`] + 1) × the configured or default part
/// size); at least one. A raised part size cannot be avoided (S3's
/// [`MAX_PARTS`]), but it need not be multiplied.
pub fn parts_in_flight_for(part_size: u64, settings: &Settings) -> usize {
    let asked = settings
        .part_size
        .unwrap_or(DEFAULT_PART_SIZE)
        .max(MIN_PART_SIZE);
    let held = (settings.parts_in_flight as u64 + 1).saturating_mul(asked);
    let fit = (held / part_size.max(1)).saturating_sub(1);
    settings
        .parts_in_flight
        .min(usize::try_from(fit).unwrap_or(usize::MAX))
        .max(1)
}

/// An upload that has started and not completed: what a signal aborts
/// ([`abort_in_progress`]).
struct Started {
    token: u64,
    store: Arc<AmazonS3>,
    url: ObjectUrl,
    id: MultipartId,
    /// Its parts being uploaded.
    in_flight: Arc<AtomicUsize>,
}

/// How long a signal waits for parts in flight before it aborts their
/// upload: a part that lands after the abort would stay in the bucket.
const SIGNAL_PART_WAIT: Duration = Duration::from_secs(10);

static IN_PROGRESS: Mutex<(u64, Vec<Started>)> = Mutex::new((0, Vec::new()));

fn in_progress() -> std::sync::MutexGuard<'static, (u64, Vec<Started>)> {
    IN_PROGRESS.lock().unwrap_or_else(|e| e.into_inner())
}

fn forget(token: u64) {
    in_progress().1.retain(|s| s.token != token);
}

/// Aborts every upload of this process that has not completed (for a
/// signal that ends the process); returns the names of those it aborted
/// (one it could not abort is logged with its upload id instead).
pub fn abort_in_progress() -> Vec<String> {
    let started = std::mem::take(&mut in_progress().1);
    let deadline = std::time::Instant::now() + SIGNAL_PART_WAIT;
    started
        .into_iter()
        .filter_map(|s| {
            while s.in_flight.load(Ordering::SeqCst) > 0 && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            abort_upload(&s.store, &s.url, &s.id).then(|| s.url.to_string())
        })
        .collect()
}

/// Aborts upload `id` of `url`, trying again while the store is
/// unreachable; says so when it cannot. True when the upload is gone
/// (aborted now, or unknown to the store: nothing is left of it to abort).
fn abort_upload(store: &Arc<AmazonS3>, url: &ObjectUrl, id: &MultipartId) -> bool {
    let mut wait = ABORT_FIRST_WAIT;
    for attempt in 1..=ABORT_TRIES {
        let (s, path, i) = (store.clone(), url.path(), id.clone());
        match block_on(async move { s.abort_multipart(&path, &i).await }) {
            Ok(()) => {
                tracing::info!(%url, "multipart upload aborted");
                return true;
            }
            // A permanent answer: retrying cannot change it.
            Err(object_store::Error::NotFound { .. }) => {
                tracing::warn!(%url, upload_id = %id, "the store knows no such upload to abort");
                return true;
            }
            Err(e) if attempt == ABORT_TRIES => {
                tracing::error!(
                    %url,
                    upload_id = %id,
                    "cannot abort the multipart upload: {e}; its parts stay in the bucket until \
                     a lifecycle rule (AbortIncompleteMultipartUpload) or \
                     `aws s3api abort-multipart-upload` removes them"
                );
            }
            Err(e) => {
                tracing::warn!(%url, attempt, "cannot abort the multipart upload yet: {e}");
                std::thread::sleep(wait);
                wait *= 2;
            }
        }
    }
    false
}

type PartDone = (usize, object_store::Result<PartId>);

/// An archive being uploaded; see the module docs.
pub struct ObjectUpload {
    url: ObjectUrl,
    store: Arc<AmazonS3>,
    id: MultipartId,
    token: u64,
    part_size: usize,
    max_in_flight: usize,
    /// The part being filled.
    buf: Vec<u8>,
    /// Each part's id once uploaded, by part number - 1.
    parts: Vec<Option<PartId>>,
    in_flight: usize,
    /// Parts uploading, as the spawned tasks count them (for a signal).
    uploading: Arc<AtomicUsize>,
    done_tx: Sender<PartDone>,
    done_rx: Receiver<PartDone>,
    /// The first failure: every later write fails with it.
    failed: Option<(io::ErrorKind, String)>,
    /// Completed, or aborted already.
    ended: bool,
}

impl std::fmt::Debug for ObjectUpload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectUpload")
            .field("url", &self.url)
            .field("parts", &self.parts.len())
            .finish()
    }
}

impl ObjectUpload {
    /// Starts uploading `url`, after checking that neither it nor any of
    /// `siblings` (e.g. `KEY.index`) exists; parts of
    /// [`part_size_for`]`(bound, settings)`.
    pub fn create(
        url: &ObjectUrl,
        siblings: &[ObjectUrl],
        bound: Option<u64>,
        settings: &Settings,
    ) -> Result<ObjectUpload, ObjectError> {
        let store = store(&url.bucket)?;
        check_bucket(&store, url)?;
        check_absent(&store, url)?;
        for s in siblings {
            check_absent(&store, s).map_err(|e| match e {
                ObjectError::Exists { url } => ObjectError::Request {
                    url: url.clone(),
                    op: "start the upload",
                    source: Box::new(object_store::Error::AlreadyExists {
                        path: url.key.clone(),
                        source: "it exists without its archive; refusing to overwrite it".into(),
                    }),
                },
                e => e,
            })?;
        }
        let part_size = part_size_for(bound, settings.part_size);
        let (s, path) = (store.clone(), url.path());
        let id = block_on(async move { s.create_multipart(&path).await })
            .map_err(|e| ObjectError::of(url, "start a multipart upload", e))?;
        let uploading = Arc::new(AtomicUsize::new(0));
        let token = {
            let mut g = in_progress();
            g.0 += 1;
            let token = g.0;
            g.1.push(Started {
                token,
                store: store.clone(),
                url: url.clone(),
                id: id.clone(),
                in_flight: uploading.clone(),
            });
            token
        };
        tracing::debug!(%url, part_size, "multipart upload started");
        let (done_tx, done_rx) = channel();
        let part_size = usize::try_from(part_size).expect("at most 5 GiB");
        Ok(ObjectUpload {
            url: url.clone(),
            store,
            id,
            token,
            part_size,
            max_in_flight: parts_in_flight_for(part_size as u64, settings),
            buf: Vec::with_capacity(part_size),
            parts: Vec::new(),
            in_flight: 0,
            uploading,
            done_tx,
            done_rx,
            failed: None,
            ended: false,
        })
    }

    /// The object's name.
    pub fn url(&self) -> &ObjectUrl {
        &self.url
    }

    /// Bytes per part.
    pub fn part_size(&self) -> usize {
        self.part_size
    }

    fn check(&self) -> io::Result<()> {
        match &self.failed {
            Some((kind, msg)) => Err(io::Error::new(*kind, msg.clone())),
            None => Ok(()),
        }
    }

    fn fail(&mut self, e: io::Error) -> io::Error {
        if self.failed.is_none() {
            self.failed = Some((e.kind(), e.to_string()));
        }
        e
    }

    /// Waits for one part in flight; records its id or the failure.
    fn wait_one(&mut self) -> io::Result<()> {
        let (i, res) = self
            .done_rx
            .recv()
            .expect("a sender is held by the upload itself");
        self.in_flight -= 1;
        match res {
            Ok(id) => {
                self.parts[i] = Some(id);
                Ok(())
            }
            Err(e) => {
                let e = io::Error::from(ObjectError::of(&self.url, "upload a part", e));
                Err(self.fail(e))
            }
        }
    }

    /// Sends the part being filled (waiting for room first).
    fn send_part(&mut self) -> io::Result<()> {
        while self.in_flight >= self.max_in_flight {
            self.wait_one()?;
        }
        if self.parts.len() == MAX_PARTS {
            let e = io::Error::other(format!(
                "{}: the archive needs more than {MAX_PARTS} parts of {} bytes; give a larger \
                 --s3-part-size",
                self.url, self.part_size
            ));
            return Err(self.fail(e));
        }
        let data = std::mem::replace(&mut self.buf, Vec::with_capacity(self.part_size));
        let payload = PutPayload::from(Bytes::from(data));
        let i = self.parts.len();
        self.parts.push(None);
        self.in_flight += 1;
        let (store, path, id, tx, uploading) = (
            self.store.clone(),
            self.url.path(),
            self.id.clone(),
            self.done_tx.clone(),
            self.uploading.clone(),
        );
        uploading.fetch_add(1, Ordering::SeqCst);
        spawn(async move {
            let res = store.put_part(&path, &id, i, payload).await;
            uploading.fetch_sub(1, Ordering::SeqCst);
            let _ = tx.send((i, res));
        });
        Ok(())
    }

    /// Uploads what is left and waits for every part: after this, only
    /// [`complete`](Self::complete) is missing for the object to exist.
    pub fn finish_parts(&mut self) -> io::Result<()> {
        self.check()?;
        if !self.buf.is_empty() {
            self.send_part()?;
        }
        while self.in_flight > 0 {
            self.wait_one()?;
        }
        Ok(())
    }

    /// Completes the upload, after [`finish_parts`](Self::finish_parts):
    /// the object appears, whole, now. Fails (and aborts) when the key
    /// appeared meanwhile.
    pub fn complete(mut self) -> io::Result<()> {
        self.finish_parts()?;
        check_absent(&self.store, &self.url)?;
        let parts: Vec<PartId> = self
            .parts
            .iter()
            .map(|p| p.clone().expect("every part was waited for"))
            .collect();
        let (s, path, id) = (self.store.clone(), self.url.path(), self.id.clone());
        block_on(async move { s.complete_multipart(&path, &id, parts).await })
            .map_err(|e| ObjectError::of(&self.url, "complete the multipart upload", e))?;
        self.ended = true;
        forget(self.token);
        tracing::debug!(url = %self.url, parts = self.parts.len(), "object written");
        Ok(())
    }

    /// Aborts the upload (parts in flight are waited for first, since a
    /// part that lands after the abort would stay).
    pub fn abort(&mut self) {
        if std::mem::replace(&mut self.ended, true) {
            return;
        }
        while self.in_flight > 0 {
            let _ = self.done_rx.recv();
            self.in_flight -= 1;
        }
        forget(self.token);
        // Logged either way; a drop has no one to tell.
        let _ = abort_upload(&self.store, &self.url, &self.id);
    }
}

impl Write for ObjectUpload {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.check()?;
        let room = self.part_size - self.buf.len();
        let n = room.min(data.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() == self.part_size {
            self.send_part()?;
        }
        Ok(n)
    }

    /// Nothing to do: a part goes when it is full, and nothing is durable
    /// before the upload completes.
    fn flush(&mut self) -> io::Result<()> {
        self.check()
    }
}

impl Drop for ObjectUpload {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Puts `data` as the single object `url`, unless it exists
/// (`If-None-Match: *`, after a HEAD for stores that ignore it).
pub fn put_new(url: &ObjectUrl, data: Vec<u8>) -> Result<(), ObjectError> {
    let store = store(&url.bucket)?;
    check_absent(&store, url)?;
    let path = url.path();
    let opts = PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    block_on(async move { store.put_opts(&path, data.into(), opts).await })
        .map(drop)
        .map_err(|e| ObjectError::of(url, "write it", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_archive_fits_in_the_part_limit() {
        assert_eq!(part_size_for(None, None), DEFAULT_PART_SIZE);
        assert_eq!(part_size_for(None, Some(1)), MIN_PART_SIZE);
        assert_eq!(part_size_for(Some(1 << 30), Some(8 << 20)), 8 << 20);
        for tib in [1u64, 4, 16, 40] {
            let bound = archive_bound(tib << 40);
            let size = part_size_for(Some(bound), None);
            assert!(bound.div_ceil(size) <= PLANNED_PARTS, "{tib} TiB");
            assert_eq!(size % (1 << 20), 0);
        }
        // A raised part size lowers the parts in flight, so the parts held
        // stay within (4 + 1) x 16 MiB, or two parts.
        let defaults = Settings::default();
        assert_eq!(parts_in_flight_for(DEFAULT_PART_SIZE, &defaults), 4);
        assert_eq!(parts_in_flight_for(32 << 20, &defaults), 1);
        assert_eq!(parts_in_flight_for(480 << 20, &defaults), 1);
        let asked = Settings {
            part_size: Some(64 << 20),
            parts_in_flight: 3,
            ..Settings::default()
        };
        assert_eq!(parts_in_flight_for(64 << 20, &asked), 3, "as configured");
        assert_eq!(parts_in_flight_for(128 << 20, &asked), 1);
        // Past 5 GiB parts an archive cannot be uploaded whole (S3 objects
        // end at 5 TiB anyway).
        assert_eq!(part_size_for(Some(u64::MAX), None), MAX_PART_SIZE);
    }
}
