//! Directory listings for preview-1 guests (the `python-data` runtime, wasm modules) in one pass.
//!
//! wasmtime-wasi 48's `fd_readdir` reads the whole directory and asks for every entry's inode
//! (`metadata_hash_at`: a path resolution and a `statx` each) on **every** call, then skips
//! `cookie` entries and returns the ones that fit the guest's buffer. wasi-libc's `readdir` asks
//! with a 4 KiB buffer (about 100 entries), so listing a directory of n entries costs about
//! n²/100 `statx`: `os.listdir` of 4000 entries took 215 ms against 1.1 ms natively.
//!
//! This shadows `fd_readdir` (and `fd_close` / `fd_renumber`, which end an fd's listing) in a
//! core linker. A call with cookie 0 (wasi-libc's `opendir`, `rewinddir`) asks wasmtime-wasi's own
//! `fd_readdir` once for the whole listing, written into host memory with a buffer big enough for
//! it; the guest's calls are then served from that listing, each cookie giving the same bytes
//! wasmtime-wasi would have written (its entries are numbered `d_next = 1, 2, ...` and cookie c
//! starts at entry c). So errors, permissions, entry order, `.`/`..` and inode numbers are
//! wasmtime-wasi's, from one read instead of one per call. As POSIX allows, entries added or
//! removed after the listing was taken show up at the next `rewinddir`.
//!
//! Bounds: a listing is kept for at most [`MAX_LISTINGS`] fds of a store and [`MAX_LISTING_BYTES`]
//! bytes each (host memory, so bounded: 8 MiB a store); a bigger directory is served as before,
//! call by call.

use std::collections::VecDeque;

use wasmtime::{Caller, Extern, Linker};
use wasmtime_wasi::p1::WasiP1Ctx;
use wasmtime_wasi::p1::types;
use wasmtime_wasi::p1::wasi_snapshot_preview1::WasiSnapshotPreview1;
use wiggle::{GuestMemory, GuestPtr};

const MODULE: &str = "wasi_snapshot_preview1";

/// The most fds whose listing a store keeps (the oldest goes first).
pub const MAX_LISTINGS: usize = 8;

/// The largest listing kept (entries are 24 bytes plus the name: ~20k entries of typical
/// names). Host memory, outside the guest's memory limit: a store holds at most
/// [`MAX_LISTINGS`] of these (8 MiB).
pub const MAX_LISTING_BYTES: usize = 1 << 20;

/// The first buffer a listing is read into (~1500 entries); a bigger listing is read again into
/// [`MAX_LISTING_BYTES`].
const FIRST_BUFFER: usize = 64 << 10;

/// A directory listing as wasmtime-wasi writes it: `dirent` (24 bytes) then the name, per entry.
#[derive(Debug)]
struct Listing {
    fd: u32,
    bytes: Vec<u8>,
    /// Where each entry starts in `bytes`; entry i is what cookie i starts at.
    starts: Vec<usize>,
    /// The directory was too big to keep: its calls go to wasmtime-wasi (until the next cookie
    /// 0), rather than each trying to take the listing again.
    too_big: bool,
}

/// The listings of one store's fds.
#[derive(Debug)]
pub struct DirListings {
    listings: VecDeque<Listing>,
    /// The largest listing kept ([`MAX_LISTING_BYTES`]).
    max_bytes: usize,
}

impl Default for DirListings {
    fn default() -> Self {
        DirListings {
            listings: VecDeque::new(),
            max_bytes: MAX_LISTING_BYTES,
        }
    }
}

impl DirListings {
    fn get(&self, fd: u32) -> Option<&Listing> {
        self.listings.iter().find(|l| l.fd == fd)
    }

    fn forget(&mut self, fd: u32) {
        self.listings.retain(|l| l.fd != fd);
    }

    fn keep(&mut self, listing: Listing) {
        self.forget(listing.fd);
        if self.listings.len() >= MAX_LISTINGS {
            self.listings.pop_front();
        }
        self.listings.push_back(listing);
    }
}

/// What a shadowed call needs from the store's data.
pub type Project<T> = fn(&mut T) -> (&mut WasiP1Ctx, &mut DirListings);

/// Replaces `fd_readdir`, `fd_close` and `fd_renumber` of `linker` (which must already have
/// wasmtime-wasi's preview 1) with the versions above.
pub fn shadow_fd_readdir<T: Send + 'static>(
    linker: &mut Linker<T>,
    project: Project<T>,
) -> anyhow::Result<()> {
    linker.allow_shadowing(true);
    linker.func_wrap_async(
        MODULE,
        "fd_readdir",
        move |mut caller: Caller<'_, T>,
              (fd, buf, buf_len, cookie, bufused): (i32, i32, i32, i64, i32)| {
            Box::new(async move {
                let memory = guest_memory(&mut caller)?;
                let (data, store) = memory.data_and_store_mut(&mut caller);
                let (ctx, listings) = project(store);
                let call = Call {
                    fd: fd as u32,
                    buf: buf as u32,
                    buf_len: buf_len as u32,
                    cookie: cookie as u64,
                };
                match fd_readdir(ctx, listings, data, call).await {
                    Ok(used) => {
                        put_u32(data, bufused as u32, used)?;
                        Ok(0)
                    }
                    Err(e) => errno(Err(e)),
                }
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "fd_close",
        move |mut caller: Caller<'_, T>, (fd,): (i32,)| {
            Box::new(async move {
                let (ctx, listings) = project(caller.data_mut());
                listings.forget(fd as u32);
                let mut none = GuestMemory::Unshared(&mut []);
                errno(ctx.fd_close(&mut none, types::Fd::from(fd as u32)).await)
            })
        },
    )?;
    linker.func_wrap_async(
        MODULE,
        "fd_renumber",
        move |mut caller: Caller<'_, T>, (from, to): (i32, i32)| {
            Box::new(async move {
                let (ctx, listings) = project(caller.data_mut());
                listings.forget(from as u32);
                listings.forget(to as u32);
                let mut none = GuestMemory::Unshared(&mut []);
                errno(
                    ctx.fd_renumber(
                        &mut none,
                        types::Fd::from(from as u32),
                        types::Fd::from(to as u32),
                    )
                    .await,
                )
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// The guest's exported memory (`memory`), as wasmtime-wasi's own glue finds it.
fn guest_memory<T>(caller: &mut Caller<'_, T>) -> wasmtime::Result<wasmtime::Memory> {
    match caller.get_export("memory") {
        Some(Extern::Memory(m)) => Ok(m),
        _ => wasmtime::bail!("missing required memory export"),
    }
}

/// An errno for the guest (0 for success), or the trap wasmtime-wasi would have raised.
fn errno(result: Result<(), types::Error>) -> wasmtime::Result<i32> {
    match result {
        Ok(()) => Ok(0),
        Err(e) => match e.downcast() {
            Ok(errno) => Ok(errno as i32),
            Err(trap) => Err(trap),
        },
    }
}

/// A guest memory access outside the memory or misaligned: a trap, as in wasmtime-wasi (WASI:
/// such a pointer "shall trap").
fn bad_pointer(what: &str) -> types::Error {
    types::Error::trap(wasmtime::format_err!("fd_readdir: {what} out of bounds"))
}

/// Writes `bytes` (or as much as fits) at `buf` in guest memory.
fn write_guest(
    memory: &mut [u8],
    buf: u32,
    buf_len: u32,
    bytes: &[u8],
) -> Result<u32, types::Error> {
    let n = bytes.len().min(buf_len as usize);
    let start = buf as usize;
    let dest = start
        .checked_add(n)
        .and_then(|end| memory.get_mut(start..end))
        .ok_or_else(|| bad_pointer("buffer"))?;
    dest.copy_from_slice(&bytes[..n]);
    Ok(n as u32)
}

/// Stores the `size` result where the guest asked for it (4-byte aligned, as wiggle checks).
fn put_u32(memory: &mut [u8], at: u32, value: u32) -> wasmtime::Result<()> {
    let start = at as usize;
    let dest = start
        .is_multiple_of(4)
        .then(|| memory.get_mut(start..start + 4))
        .flatten()
        .ok_or_else(|| {
            wasmtime::format_err!("fd_readdir: result pointer out of bounds or misaligned")
        })?;
    dest.copy_from_slice(&value.to_le_bytes());
    Ok(())
}

/// The guest's `fd_readdir` arguments.
#[derive(Clone, Copy, Debug)]
struct Call {
    fd: u32,
    buf: u32,
    buf_len: u32,
    cookie: u64,
}

/// Serves one `fd_readdir` call: the bytes written at `buf`.
async fn fd_readdir(
    ctx: &mut WasiP1Ctx,
    listings: &mut DirListings,
    memory: &mut [u8],
    call: Call,
) -> Result<u32, types::Error> {
    let Call {
        fd,
        buf,
        buf_len,
        cookie,
    } = call;
    if cookie == 0 || listings.get(fd).is_none() {
        listings.forget(fd);
        let listing = list(ctx, fd, listings.max_bytes).await?.unwrap_or(Listing {
            fd,
            bytes: Vec::new(),
            starts: Vec::new(),
            too_big: true,
        });
        listings.keep(listing);
    }
    let listing = listings.get(fd).expect("kept above");
    if listing.too_big {
        // Served call by call, as without this module.
        let mut guest = GuestMemory::Unshared(memory);
        return ctx
            .fd_readdir(
                &mut guest,
                types::Fd::from(fd),
                GuestPtr::new(buf),
                buf_len,
                cookie,
            )
            .await;
    }
    let from = usize::try_from(cookie)
        .ok()
        .and_then(|c| listing.starts.get(c).copied())
        .unwrap_or(listing.bytes.len());
    write_guest(memory, buf, buf_len, &listing.bytes[from..])
}

/// The whole listing of `fd` from wasmtime-wasi's `fd_readdir`, or `None` when it is bigger than
/// `max_bytes`. Each try reads (and stats) the whole directory, so there are at most two: a
/// buffer that fits most directories, then the largest.
async fn list(
    ctx: &mut WasiP1Ctx,
    fd: u32,
    max_bytes: usize,
) -> Result<Option<Listing>, types::Error> {
    let mut size = FIRST_BUFFER.min(max_bytes);
    loop {
        let mut bytes = vec![0u8; size];
        let used = {
            let mut host = GuestMemory::Unshared(&mut bytes);
            ctx.fd_readdir(
                &mut host,
                types::Fd::from(fd),
                GuestPtr::new(0),
                size as u32,
                0,
            )
            .await? as usize
        };
        // A full buffer may have cut the listing short: read it again with more room.
        if used < size {
            bytes.truncate(used);
            let starts = entry_starts(&bytes);
            return Ok(Some(Listing {
                fd,
                bytes,
                starts,
                too_big: false,
            }));
        }
        if size >= max_bytes {
            return Ok(None);
        }
        size = max_bytes;
    }
}

/// Where each entry of a complete listing starts: 24 bytes of `dirent`, whose bytes 16..20 are
/// the name's length, then the name.
fn entry_starts(bytes: &[u8]) -> Vec<usize> {
    const DIRENT: usize = 24;
    let mut starts = Vec::new();
    let mut at = 0;
    while at + DIRENT <= bytes.len() {
        starts.push(at);
        let namlen = u32::from_le_bytes(bytes[at + 16..at + 20].try_into().expect("4 bytes"));
        at += DIRENT + namlen as usize;
    }
    starts
}

#[cfg(test)]
mod tests {
    use super::*;
    use wasmtime_wasi::{FsPerms, WasiCtxBuilder};

    /// A directory of 80 files with names of many lengths, and a subdirectory, as the guest's
    /// first preopen (fd 3).
    fn context() -> (tempfile::TempDir, WasiP1Ctx) {
        let dir = tempfile::tempdir().unwrap();
        for i in 1..=FILES {
            let name = format!("{i}-{}", "n".repeat(i % 60));
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        std::fs::create_dir(dir.path().join("sub")).unwrap();
        let ctx = WasiCtxBuilder::new()
            .preopened_dir(dir.path(), "/d", FsPerms::ReadWrite)
            .unwrap()
            .allow_blocking_current_thread(true)
            .build_p1();
        (dir, ctx)
    }

    /// What wasmtime-wasi's own `fd_readdir` writes for one call (bytes, or its errno).
    async fn theirs(
        ctx: &mut WasiP1Ctx,
        fd: u32,
        buf_len: u32,
        cookie: u64,
    ) -> Result<Vec<u8>, Errno> {
        let mut mem = vec![0u8; buf_len as usize];
        let mut guest = GuestMemory::Unshared(&mut mem);
        match ctx
            .fd_readdir(
                &mut guest,
                types::Fd::from(fd),
                GuestPtr::new(0),
                buf_len,
                cookie,
            )
            .await
        {
            Ok(used) => {
                mem.truncate(used as usize);
                Ok(mem)
            }
            Err(e) => Err(e.downcast().unwrap()),
        }
    }

    async fn ours(
        ctx: &mut WasiP1Ctx,
        listings: &mut DirListings,
        fd: u32,
        buf_len: u32,
        cookie: u64,
    ) -> Result<Vec<u8>, Errno> {
        let mut mem = vec![0u8; buf_len as usize];
        let call = Call {
            fd,
            buf: 0,
            buf_len,
            cookie,
        };
        match fd_readdir(ctx, listings, &mut mem, call).await {
            Ok(used) => {
                mem.truncate(used as usize);
                Ok(mem)
            }
            Err(e) => Err(e.downcast().unwrap()),
        }
    }

    use types::Errno;

    const FILES: usize = 80;

    #[tokio::test]
    async fn every_call_writes_the_bytes_wasmtime_wasi_writes() {
        let (_dir, mut ctx) = context();
        let entries = FILES as u64 + 1 + 2;
        for max_bytes in [MAX_LISTING_BYTES, 1024] {
            // 1024: too small to keep this listing, so every call is passed through.
            let mut listings = DirListings {
                max_bytes,
                ..DirListings::default()
            };
            for buf_len in [1, 23, 24, 25, 100, 4096] {
                // A listing starts at cookie 0, as `opendir` does; then every cookie, and past the end.
                for cookie in 0..entries + 3 {
                    let a = theirs(&mut ctx, 3, buf_len, cookie).await;
                    let b = ours(&mut ctx, &mut listings, 3, buf_len, cookie).await;
                    assert_eq!(a, b, "buf_len {buf_len}, cookie {cookie}, max {max_bytes}");
                }
            }
            assert_eq!(listings.get(3).unwrap().too_big, max_bytes == 1024);
        }
        // A listing holds every entry once: `.`, `..`, the files and the subdirectory.
        let mut listings = DirListings::default();
        let all = ours(&mut ctx, &mut listings, 3, 1 << 20, 0).await.unwrap();
        assert_eq!(entry_starts(&all).len() as u64, entries);
    }

    #[tokio::test]
    async fn errors_are_wasmtime_wasis() {
        let (_dir, mut ctx) = context();
        let mut listings = DirListings::default();
        for fd in [0, 1, 2, 99] {
            let a = theirs(&mut ctx, fd, 4096, 0).await;
            let b = ours(&mut ctx, &mut listings, fd, 4096, 0).await;
            assert!(a.is_err(), "fd {fd}: {a:?}");
            assert_eq!(a, b, "fd {fd}");
        }
        assert!(listings.listings.is_empty());
    }

    #[tokio::test]
    async fn a_listing_is_taken_again_at_cookie_zero_and_kept_for_few_fds() {
        let (dir, mut ctx) = context();
        let mut listings = DirListings::default();
        let before = ours(&mut ctx, &mut listings, 3, 1 << 20, 0).await.unwrap();
        std::fs::write(dir.path().join("late"), b"").unwrap();
        // Mid-listing, the listing taken at its start (POSIX leaves later changes unspecified).
        let rest = ours(&mut ctx, &mut listings, 3, 1 << 20, 2).await.unwrap();
        assert_eq!(rest, before[entry_starts(&before)[2]..]);
        // `rewinddir`: a new listing, with the new entry.
        let after = ours(&mut ctx, &mut listings, 3, 1 << 20, 0).await.unwrap();
        assert_eq!(entry_starts(&after).len(), entry_starts(&before).len() + 1);
        assert_eq!(Ok(after), theirs(&mut ctx, 3, 1 << 20, 0).await);

        for fd in 100..100 + MAX_LISTINGS as u32 + 2 {
            listings.keep(Listing {
                fd,
                bytes: Vec::new(),
                starts: Vec::new(),
                too_big: false,
            });
        }
        assert_eq!(listings.listings.len(), MAX_LISTINGS);
        assert!(listings.get(3).is_none() && listings.get(100).is_none());
        listings.forget(101 + MAX_LISTINGS as u32);
        assert_eq!(listings.listings.len(), MAX_LISTINGS - 1);
    }
}
