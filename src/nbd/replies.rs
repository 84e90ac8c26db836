//! The reply writer of one connection: a queue of encoded replies and the
//! socket half they go out on.
//!
//! Request tasks queue their reply ([`Replies::push`]) and then write the
//! queue ([`Replies::flush`]), unless another task is writing at that
//! moment, which then writes their reply too. Small replies are copied
//! into one staging buffer, large READ data goes out as its own iovec
//! without a copy, and replies that complete together share one `writev`
//! (`write_segments` resumes after partial writes). A reply's byte budget
//! is released once it is on the wire. Which reply to send, and its bytes,
//! are left to `nbd::transmission` and `nbd::wire`; this module never reads
//! from the socket.

use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::pin::Pin;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::sync::OwnedSemaphorePermit;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::wire::MAX_REPLY_HEAD_LEN;

/// Replies smaller than this are copied into the writer's staging buffer
/// (coalescing many small replies into one write); larger payloads are
/// passed to the kernel as their own iovec.
const COPY_THRESHOLD: usize = 8 * 1024;

/// Most iovecs handed to one `writev`: far below the kernel's `IOV_MAX`
/// (1024), and with bodies of at least [`COPY_THRESHOLD`] bytes each, more
/// than a socket buffer takes in one call anyway.
const MAX_IOVECS: usize = 64;

/// Initial capacity of the staging buffer small replies are copied into:
/// room for thousands of header-only replies before it must grow.
const STAGING_CAPACITY: usize = 64 * 1024;

/// One encoded reply, queued in `Replies`.
pub(super) struct Frame {
    head: [u8; MAX_REPLY_HEAD_LEN],
    head_len: u8,
    body: Bytes,
    /// Byte budget of the request; released once the reply is written.
    _permit: Option<OwnedSemaphorePermit>,
}

impl Frame {
    /// A reply of `head` (at most [`MAX_REPLY_HEAD_LEN`] bytes, copied
    /// inline) followed by `body` (sent without a copy), holding `permit`
    /// until it is written.
    pub(super) fn new(head: &[u8], body: Bytes, permit: Option<OwnedSemaphorePermit>) -> Self {
        let mut h = [0u8; MAX_REPLY_HEAD_LEN];
        h[..head.len()].copy_from_slice(head);
        Self {
            head: h,
            head_len: head.len() as u8,
            body,
            _permit: permit,
        }
    }
}

/// Replies waiting to go out, and the socket half they go to.
///
/// Whoever queues a reply also writes, unless another task is writing at
/// that moment, in which case that task picks the reply up before it lets
/// go of the socket (it re-checks the queue after unlocking). So replies
/// need no hand-off to a dedicated writer task, and replies that complete
/// together share one `writev`. The connection's reader never writes
/// (see `nbd::transmission`).
pub(super) struct Replies {
    queue: std::sync::Mutex<Vec<Frame>>,
    writer: tokio::sync::Mutex<WriterState>,
    /// Cancelled when a write fails: the reader stops, queued replies are
    /// dropped.
    dead: CancellationToken,
}

/// The socket half and the buffers used to write to it.
struct WriterState {
    w: Pin<Box<dyn AsyncWrite + Send>>,
    staging: BytesMut,
    segs: VecDeque<Bytes>,
    /// Frames being written; their budget is released once they are sent.
    batch: Vec<Frame>,
}

impl Replies {
    /// A writer for the socket half `w`.
    pub(super) fn new(w: Pin<Box<dyn AsyncWrite + Send>>) -> Self {
        Self {
            queue: std::sync::Mutex::new(Vec::new()),
            writer: tokio::sync::Mutex::new(WriterState {
                w,
                staging: BytesMut::with_capacity(STAGING_CAPACITY),
                segs: VecDeque::new(),
                batch: Vec::new(),
            }),
            dead: CancellationToken::new(),
        }
    }

    /// Fired when a write failed: the client can no longer be answered.
    pub(super) fn dead(&self) -> &CancellationToken {
        &self.dead
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, Vec<Frame>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply; follow with [`Replies::flush`] (or spawn it).
    pub(super) fn push(&self, f: Frame) {
        self.queue().push(f);
    }

    /// Writes every queued reply, unless another task is writing (it will
    /// write ours too).
    pub(super) async fn flush(&self) {
        loop {
            let Ok(mut st) = self.writer.try_lock() else {
                return;
            };
            self.write_queued(&mut st).await;
            drop(st);
            if self.dead.is_cancelled() || self.queue().is_empty() {
                return;
            }
        }
    }

    async fn write_queued(&self, st: &mut WriterState) {
        loop {
            std::mem::swap(&mut *self.queue(), &mut st.batch);
            if st.batch.is_empty() {
                return;
            }
            if self.dead.is_cancelled() {
                st.batch.clear();
                continue;
            }
            let WriterState {
                w,
                staging,
                segs,
                batch,
            } = st;
            for f in batch.iter_mut() {
                staging.extend_from_slice(&f.head[..f.head_len as usize]);
                let body = std::mem::take(&mut f.body);
                if body.len() < COPY_THRESHOLD {
                    staging.extend_from_slice(&body);
                } else {
                    segs.push_back(staging.split().freeze());
                    segs.push_back(body);
                }
            }
            if !staging.is_empty() {
                segs.push_back(staging.split().freeze());
            }
            let res = write_segments(w, segs).await;
            // Replies are on the wire (or lost): release their budget.
            batch.clear();
            if let Err(e) = res {
                debug!(error = %e, "writing replies failed");
                segs.clear();
                self.dead.cancel();
            }
        }
    }

    /// Writes what is left and shuts down our sending side.
    pub(super) async fn close(&self) {
        let mut st = self.writer.lock().await;
        self.write_queued(&mut st).await;
        let _ = st.w.shutdown().await;
    }
}

/// Writes every segment with `writev`, resuming after partial writes.
async fn write_segments<W: AsyncWrite + Unpin>(
    w: &mut W,
    segs: &mut VecDeque<Bytes>,
) -> io::Result<()> {
    while !segs.is_empty() {
        let n = {
            let iov: Vec<IoSlice<'_>> = segs
                .iter()
                .filter(|s| !s.is_empty())
                .take(MAX_IOVECS)
                .map(|s| IoSlice::new(s))
                .collect();
            if iov.is_empty() {
                segs.clear();
                break;
            }
            w.write_vectored(&iov).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 {
            let front = segs.front_mut().expect("wrote more than was queued");
            if front.len() <= left {
                left -= front.len();
                segs.pop_front();
            } else {
                bytes::Buf::advance(front, left);
                left = 0;
            }
        }
        while segs.front().is_some_and(|s| s.is_empty()) {
            segs.pop_front();
        }
    }
    w.flush().await
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};
    use std::task::{Context, Poll};

    use tokio::sync::Semaphore;

    use super::*;

    /// A socket half that takes at most `max` bytes per call, across iovecs.
    struct Trickle {
        out: Arc<Mutex<Vec<u8>>>,
        max: usize,
    }

    impl AsyncWrite for Trickle {
        fn poll_write(
            self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.poll_write_vectored(cx, &[IoSlice::new(b)])
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut out = self.out.lock().unwrap();
            let mut n = 0;
            for b in bufs {
                let take = b.len().min(self.max - n);
                out.extend_from_slice(&b[..take]);
                n += take;
            }
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    #[tokio::test]
    async fn queued_replies_go_out_whole_and_in_order_despite_short_writes() {
        let out = Arc::new(Mutex::new(Vec::new()));
        let replies = Replies::new(Box::pin(Trickle {
            out: Arc::clone(&out),
            max: 7,
        }));
        let budget = Arc::new(Semaphore::new(3));
        let big = Bytes::from(vec![0xab; COPY_THRESHOLD + 5]);
        let mut want = Vec::new();
        for (head, body) in [
            (&b"first"[..], Bytes::from_static(b"-small")),
            (&b"second"[..], big.clone()),
            (&b"third"[..], Bytes::new()),
        ] {
            want.extend_from_slice(head);
            want.extend_from_slice(&body);
            let permit = budget.clone().try_acquire_owned().unwrap();
            replies.push(Frame::new(head, body, Some(permit)));
        }
        assert_eq!(budget.available_permits(), 0);
        replies.flush().await;
        assert_eq!(*out.lock().unwrap(), want);
        assert_eq!(
            budget.available_permits(),
            3,
            "budget released once written"
        );
        assert!(!replies.dead().is_cancelled());
        replies.close().await;
    }
}
