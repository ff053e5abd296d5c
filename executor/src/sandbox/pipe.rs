//! Capped in-memory stdout/stderr that records overflow and can stream chunks as they arrive.
//!
//! wasmtime-wasi's `MemoryOutputPipe` fails the guest's write at capacity without saying so to the
//! host; this pipe keeps exactly `cap` bytes, sets an overflow flag, and traps the guest so the run
//! ends at once as `OUTPUT_EXCEEDED` instead of as whatever the guest makes of a failed write.

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use tokio::io::AsyncWrite;
use tokio::sync::mpsc::UnboundedSender;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Which stream a chunk came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StreamKind {
    /// The step's stdout.
    Stdout,
    /// The step's stderr.
    Stderr,
}

/// One piece of output, sent to a listener as the step writes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputChunk {
    /// Which stream.
    pub stream: StreamKind,
    /// The bytes (never beyond the stream's cap).
    pub data: Bytes,
}

#[derive(Debug)]
struct Inner {
    buf: BytesMut,
    overflowed: bool,
}

/// A capped output pipe; clones share the same buffer.
#[derive(Clone, Debug)]
pub struct LimitedPipe {
    kind: StreamKind,
    cap: usize,
    inner: Arc<Mutex<Inner>>,
    listener: Option<UnboundedSender<OutputChunk>>,
}

/// The largest write permit handed to the guest at once; keeps one write from buffering a lot.
const MAX_PERMIT: usize = 64 * 1024;

impl LimitedPipe {
    /// A pipe keeping at most `cap` bytes, optionally streaming each accepted chunk to `listener`.
    pub fn new(
        kind: StreamKind,
        cap: u64,
        listener: Option<UnboundedSender<OutputChunk>>,
    ) -> LimitedPipe {
        LimitedPipe {
            kind,
            cap: usize::try_from(cap).unwrap_or(usize::MAX),
            inner: Arc::new(Mutex::new(Inner {
                buf: BytesMut::new(),
                overflowed: false,
            })),
            listener,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A poisoned lock only means another writer panicked mid-append; the bytes are still valid.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends what fits; returns how many bytes were kept and whether the cap was passed.
    fn append(&self, data: &[u8]) -> (usize, bool) {
        let mut inner = self.lock();
        let room = self.cap - inner.buf.len();
        let kept = data.len().min(room);
        inner.buf.extend_from_slice(&data[..kept]);
        if kept < data.len() {
            inner.overflowed = true;
        }
        if kept > 0
            && let Some(tx) = &self.listener
        {
            // A listener that went away (client disconnected) must not disturb the run.
            let _ = tx.send(OutputChunk {
                stream: self.kind,
                data: Bytes::copy_from_slice(&data[..kept]),
            });
        }
        (kept, inner.overflowed)
    }

    /// Whether the step tried to write past the cap.
    pub fn overflowed(&self) -> bool {
        self.lock().overflowed
    }

    /// The bytes kept so far.
    pub fn contents(&self) -> Bytes {
        self.lock().buf.clone().freeze()
    }

    fn overflow_error(&self) -> StreamError {
        StreamError::Trap(wasmtime::format_err!(
            "{} exceeded its limit of {} bytes",
            match self.kind {
                StreamKind::Stdout => "stdout",
                StreamKind::Stderr => "stderr",
            },
            self.cap
        ))
    }
}

impl IsTerminal for LimitedPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LimitedPipe {
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
}

#[wasmtime_wasi::async_trait]
impl OutputStream for LimitedPipe {
    fn write(&mut self, bytes: Bytes) -> Result<(), StreamError> {
        match self.append(&bytes) {
            (_, true) => Err(self.overflow_error()),
            _ => Ok(()),
        }
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        if self.overflowed() {
            return Err(self.overflow_error());
        }
        // Permit one byte more than the room left, so a guest that writes past the cap is seen
        // doing it (and stopped) rather than blocked forever waiting for room.
        let room = self.cap - self.lock().buf.len();
        Ok(room.saturating_add(1).min(MAX_PERMIT))
    }
}

#[wasmtime_wasi::async_trait]
impl Pollable for LimitedPipe {
    async fn ready(&mut self) {}
}

impl AsyncWrite for LimitedPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.append(buf) {
            (_, true) => Poll::Ready(Err(std::io::Error::other(
                self.overflow_error().to_string(),
            ))),
            (kept, false) => Poll::Ready(Ok(kept)),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_exactly_the_cap_and_records_overflow() {
        let mut p = LimitedPipe::new(StreamKind::Stdout, 5, None);
        assert_eq!(p.check_write().unwrap(), 6);
        p.write(Bytes::from_static(b"abc")).unwrap();
        assert!(!p.overflowed());
        let err = p.write(Bytes::from_static(b"defg")).unwrap_err();
        assert!(matches!(err, StreamError::Trap(_)));
        assert!(p.overflowed());
        assert_eq!(&p.contents()[..], b"abcde");
        assert!(p.check_write().is_err());
    }

    #[test]
    fn a_write_that_exactly_fills_the_cap_is_not_an_overflow() {
        let mut p = LimitedPipe::new(StreamKind::Stderr, 3, None);
        p.write(Bytes::from_static(b"abc")).unwrap();
        assert!(!p.overflowed());
        assert_eq!(p.check_write().unwrap(), 1);
    }

    #[test]
    fn listener_sees_accepted_chunks_only() {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut p = LimitedPipe::new(StreamKind::Stdout, 4, Some(tx));
        p.write(Bytes::from_static(b"ab")).unwrap();
        let _ = p.write(Bytes::from_static(b"cdef"));
        assert_eq!(rx.try_recv().unwrap().data, Bytes::from_static(b"ab"));
        assert_eq!(rx.try_recv().unwrap().data, Bytes::from_static(b"cd"));
        assert!(rx.try_recv().is_err());
    }
}
