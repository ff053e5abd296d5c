//! File streams that read and write on the guest's own thread.
//!
//! wasmtime-wasi 48 gives a preview-2 guest's file streams (`descriptor.read-via-stream`,
//! `write-via-stream`, `append-via-stream`) an implementation that hands every non-blocking
//! `input-stream.read` and `output-stream.write` to tokio's blocking pool, whatever
//! `WasiCtxBuilder::allow_blocking_current_thread` says: only the stream's own `blocking_read`
//! and `blocking_write_and_flush` honour it. wasi-libc's `read`/`write` use the non-blocking
//! calls and then wait on the stream's pollable, so each `read(2)` of a step became a thread
//! hand-off: ~140 us for a Python `open().read()` of a small file, against 7 us natively.
//!
//! Every step runs with `allow_blocking_current_thread` (guests block their own thread on file
//! calls, by design), so these three functions are shadowed in the component linker with streams
//! that do the `pread`/`pwrite` inline and are always ready. Everything else about the streams is
//! as wasmtime-wasi has it: the same descriptor table entries, the same permission checks, the
//! same errors (`io::Error` as the stream's last-operation error, so wasi-libc maps it to the
//! same errno), and reads past the end report the stream closed.

use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use wasmtime::component::{Linker, Resource};
use wasmtime_wasi::WasiView;
use wasmtime_wasi::filesystem::Descriptor;
use wasmtime_wasi::p2::bindings::filesystem::types::ErrorCode;
use wasmtime_wasi::p2::{
    DynInputStream, DynOutputStream, InputStream, OutputStream, Pollable, StreamError, StreamResult,
};

/// The WASI interface whose functions are replaced: the version wasmtime-wasi 48 defines (the
/// linker matches guests importing any 0.2.x to it).
const FILESYSTEM_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Largest read served in one call (wasmtime-wasi: 64 KiB). Bigger reads of big files take fewer
/// calls; a read never allocates more than the guest asked for.
const MAX_READ: usize = 1 << 20;

/// What `check-write` grants per write (wasmtime-wasi: 64 KiB).
const WRITE_CAPACITY: usize = 1 << 20;

/// Replaces the three stream constructors of `wasi:filesystem/types` in `linker`, which must
/// already hold wasmtime-wasi's preview-2 functions.
pub fn shadow_file_streams<T: WasiView + 'static>(linker: &mut Linker<T>) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    let result = define(linker);
    linker.allow_shadowing(false);
    result
}

fn define<T: WasiView + 'static>(linker: &mut Linker<T>) -> anyhow::Result<()> {
    let mut types = linker.instance(FILESYSTEM_TYPES)?;
    types.func_wrap(
        "[method]descriptor.read-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, u64)| {
            let table = store.data_mut().ctx().table;
            let file = match table.get(&fd)? {
                Descriptor::File(f) => f.file.clone(),
                Descriptor::Dir(_) => return Ok((Err(ErrorCode::IsDirectory),)),
            };
            let stream: DynInputStream = Box::new(FileReader {
                file,
                position: offset,
                closed: false,
            });
            Ok((Ok(table.push(stream)?),))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.write-via-stream",
        |mut store, (fd, offset): (Resource<Descriptor>, u64)| {
            let table = store.data_mut().ctx().table;
            let file = match writable(table.get(&fd)?) {
                Ok(file) => file,
                Err(e) => return Ok((Err(e),)),
            };
            let stream: DynOutputStream = Box::new(FileWriter::new(file, Some(offset)));
            Ok((Ok(table.push(stream)?),))
        },
    )?;
    types.func_wrap(
        "[method]descriptor.append-via-stream",
        |mut store, (fd,): (Resource<Descriptor>,)| {
            let table = store.data_mut().ctx().table;
            let file = match writable(table.get(&fd)?) {
                Ok(file) => file,
                Err(e) => return Ok((Err(e),)),
            };
            let stream: DynOutputStream = Box::new(FileWriter::new(file, None));
            Ok((Ok(table.push(stream)?),))
        },
    )?;
    Ok(())
}

/// The file behind a descriptor a stream may write to, or wasmtime-wasi's error: a directory is
/// a bad descriptor, a file opened without write permission is not permitted.
fn writable(descriptor: &Descriptor) -> Result<Arc<std::fs::File>, ErrorCode> {
    match descriptor {
        Descriptor::File(f) if f.perms.write_not_permitted() => Err(ErrorCode::NotPermitted),
        Descriptor::File(f) => Ok(f.file.clone()),
        Descriptor::Dir(_) => Err(ErrorCode::BadDescriptor),
    }
}

/// An input stream reading a file at its own position, on the calling thread.
struct FileReader {
    file: Arc<std::fs::File>,
    position: u64,
    closed: bool,
}

#[wasmtime_wasi::async_trait]
impl Pollable for FileReader {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl InputStream for FileReader {
    fn read(&mut self, size: usize) -> StreamResult<Bytes> {
        if self.closed {
            return Err(StreamError::Closed);
        }
        if size == 0 {
            return Ok(Bytes::new());
        }
        let mut buf = BytesMut::zeroed(size.min(MAX_READ));
        let n = loop {
            match self.file.read_at(&mut buf, self.position) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.closed = true;
                    return Err(StreamError::LastOperationFailed(e.into()));
                }
            }
        };
        if n == 0 {
            self.closed = true;
            return Err(StreamError::Closed);
        }
        buf.truncate(n);
        self.position += n as u64;
        Ok(buf.freeze())
    }
}

/// An output stream writing a file at its own position (or appending), on the calling thread.
struct FileWriter {
    file: Arc<std::fs::File>,
    /// `None`: append.
    position: Option<u64>,
    state: WriteState,
}

enum WriteState {
    Ready,
    /// The last write failed: reported by the next call, then the stream is closed.
    Failed(io::Error),
    Closed,
}

impl FileWriter {
    fn new(file: Arc<std::fs::File>, position: Option<u64>) -> FileWriter {
        FileWriter {
            file,
            position,
            state: WriteState::Ready,
        }
    }

    /// Reports (once) a failed write, or that the stream is closed.
    fn status(&mut self) -> StreamResult<()> {
        match std::mem::replace(&mut self.state, WriteState::Closed) {
            WriteState::Ready => {
                self.state = WriteState::Ready;
                Ok(())
            }
            WriteState::Failed(e) => Err(StreamError::LastOperationFailed(e.into())),
            WriteState::Closed => Err(StreamError::Closed),
        }
    }

    fn write_all(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            let n = match self.position {
                Some(p) => self.file.write_at(data, p),
                None => append(&self.file, data),
            };
            match n {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    if let Some(p) = &mut self.position {
                        *p += n as u64;
                    }
                    data = &data[n..];
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

/// Appends `data` at the file's end whatever the description's offset, as wasmtime-wasi does
/// (`pwritev2` with `RWF_APPEND`).
fn append(file: &std::fs::File, data: &[u8]) -> io::Result<usize> {
    let flags = rustix::io::ReadWriteFlags::APPEND;
    Ok(rustix::io::pwritev2(
        file,
        &[io::IoSlice::new(data)],
        0,
        flags,
    )?)
}

#[wasmtime_wasi::async_trait]
impl Pollable for FileWriter {
    async fn ready(&mut self) {}
}

#[wasmtime_wasi::async_trait]
impl OutputStream for FileWriter {
    fn write(&mut self, bytes: Bytes) -> StreamResult<()> {
        self.status()?;
        if bytes.len() > WRITE_CAPACITY {
            return Err(StreamError::trap(
                "write not permitted: more bytes than check_write allowed",
            ));
        }
        if let Err(e) = self.write_all(&bytes) {
            self.state = WriteState::Failed(e);
        }
        Ok(())
    }

    fn flush(&mut self) -> StreamResult<()> {
        // Nothing is buffered here: a write is done when `write` returns.
        self.status()
    }

    fn check_write(&mut self) -> StreamResult<usize> {
        self.status()?;
        Ok(WRITE_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_file(contents: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, contents).unwrap();
        (dir, path)
    }

    #[test]
    fn a_reader_reads_from_its_position_to_the_end_then_reports_closed() {
        let (_dir, path) = temp_file(b"hello, world");
        let file = Arc::new(std::fs::File::open(&path).unwrap());
        let mut r = FileReader {
            file,
            position: 7,
            closed: false,
        };
        assert_eq!(&r.read(3).unwrap()[..], b"wor");
        assert_eq!(&r.read(0).unwrap()[..], b"");
        assert_eq!(&r.read(100).unwrap()[..], b"ld");
        assert!(matches!(r.read(100), Err(StreamError::Closed)));
        assert!(matches!(r.read(100), Err(StreamError::Closed)));
    }

    #[test]
    fn a_read_error_is_the_last_operation_failed_with_its_io_error() {
        let (dir, _path) = temp_file(b"");
        // Reading a directory fails with EISDIR.
        let file = Arc::new(std::fs::File::open(dir.path()).unwrap());
        let mut r = FileReader {
            file,
            position: 0,
            closed: false,
        };
        match r.read(10) {
            Err(StreamError::LastOperationFailed(e)) => {
                let io = e.downcast_ref::<io::Error>().expect("an io::Error");
                assert_eq!(io.raw_os_error(), Some(libc::EISDIR));
            }
            other => panic!("expected a failed read, got {other:?}"),
        }
        assert!(matches!(r.read(10), Err(StreamError::Closed)));
    }

    #[test]
    fn writers_write_at_their_position_or_append_at_the_end() {
        let (_dir, path) = temp_file(b"0123456789");
        let open = || {
            Arc::new(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(&path)
                    .unwrap(),
            )
        };
        let mut at = FileWriter::new(open(), Some(2));
        assert_eq!(at.check_write().unwrap(), WRITE_CAPACITY);
        at.write(Bytes::from_static(b"ab")).unwrap();
        at.write(Bytes::from_static(b"cd")).unwrap();
        at.flush().unwrap();
        let mut end = FileWriter::new(open(), None);
        end.write(Bytes::from_static(b"XY")).unwrap();
        end.write(Bytes::from_static(b"Z")).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"01abcd6789XYZ");
    }

    #[test]
    fn a_failed_write_is_reported_once_then_the_stream_is_closed() {
        let (_dir, path) = temp_file(b"x");
        // A read-only description: the write fails with EBADF.
        let mut w = FileWriter::new(Arc::new(std::fs::File::open(&path).unwrap()), Some(0));
        w.write(Bytes::from_static(b"y")).unwrap();
        match w.flush() {
            Err(StreamError::LastOperationFailed(e)) => {
                let io = e.downcast_ref::<io::Error>().expect("an io::Error");
                assert_eq!(io.raw_os_error(), Some(libc::EBADF));
            }
            other => panic!("expected the failed write, got {other:?}"),
        }
        assert!(matches!(w.check_write(), Err(StreamError::Closed)));
        assert!(matches!(
            w.write(Bytes::from_static(b"z")),
            Err(StreamError::Closed)
        ));
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
    }

    #[test]
    fn a_write_larger_than_check_write_allowed_traps() {
        let (_dir, path) = temp_file(b"");
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut w = FileWriter::new(Arc::new(file), Some(0));
        let big = Bytes::from(vec![0u8; WRITE_CAPACITY + 1]);
        assert!(matches!(w.write(big), Err(StreamError::Trap(_))));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
    }
}
