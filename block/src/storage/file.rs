//! The file protocol (QEMU's `file`, `block/file-posix.c`): a POSIX file read and written
//! with io_uring or on the thread pool, through the page cache or around it (`O_DIRECT`).

use std::fs::{File, OpenOptions};
use std::io::{self, IoSlice, IoSliceMut};
use std::ops::Deref;
use std::os::fd::AsFd;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

use aiocoro::aio::IoEngine;
use aiocoro::coroutine::Co;

use super::file_lock::{Locking, lock_image, unlock_image};
use crate::buffer::{BUFFER_ALIGN, IoBuffer, gather_into, scatter};
use crate::driver::{Alignment, Allocation, BlockDriver, BlockStatus, write_zeroes_by_writing};
use crate::sys;

/// The most buffers one `preadv` / `pwritev` takes (Linux's `UIO_MAXIOV`); requests with
/// more go through one bounce buffer.
const IOV_MAX: usize = 1024;

/// How the file's data meets the page cache (QEMU's `cache=` modes that matter here).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum CacheMode {
    /// Through the page cache; `flush` makes it stable (`cache=writeback`).
    #[default]
    Writeback,
    /// Around the page cache with `O_DIRECT` (`cache=none`); requests must be aligned to the
    /// device's block size, buffers need not be (misaligned ones are bounced).
    None,
}

/// What carries the file's I/O (QEMU's `aio=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum AioMode {
    /// The context's io_uring (`aio=io_uring`), or the thread pool where the kernel has none.
    #[default]
    IoUring,
    /// Blocking calls on the thread pool (`aio=threads`).
    Threads,
}

/// How to open a file node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileOptions {
    /// The file.
    pub filename: PathBuf,
    /// Page cache or `O_DIRECT`.
    pub cache: CacheMode,
    /// io_uring or the thread pool.
    pub aio: AioMode,
    /// Open for reading only.
    pub read_only: bool,
    /// Whether to take and honour QEMU's image locks (see [`Locking`]).
    pub locking: Locking,
}

/// A POSIX file as a block node.
#[derive(Debug)]
pub struct FileDriver {
    /// Shared with the thread-pool jobs of `discard`, `write_zeroes` and `truncate`, which
    /// must own what they use (`run_blocking` takes `'static` jobs): a clone of the `Arc`
    /// rather than of the descriptor (`dup(2)`, then `close(2)`, per request).
    file: Arc<File>,
    engine: IoEngine,
    alignment: Alignment,
    direct: bool,
    /// The file's name, for errors.
    path: PathBuf,
    /// Why the first failed flush failed; once set, every flush fails (see `flush`).
    flush_failed: OnceLock<String>,
}

impl FileDriver {
    /// Opens the file (which must exist).
    ///
    /// # Errors
    ///
    /// If the file cannot be opened (the path is in the message), `O_DIRECT` is asked for
    /// where the file system refuses it, or another open of the file (QEMU's, say) holds an
    /// image lock that conflicts with this one (`Failed to get "write" lock`; see
    /// [`Locking`]).
    pub fn open(options: &FileOptions) -> io::Result<FileDriver> {
        let direct = options.cache == CacheMode::None;
        let mut open = OpenOptions::new();
        open.read(true).write(!options.read_only);
        if direct {
            open.custom_flags(libc::O_DIRECT);
        }
        let file = open.open(&options.filename).map_err(|error| {
            io::Error::new(
                error.kind(),
                format!("cannot open {}: {error}", options.filename.display()),
            )
        })?;
        lock_image(file.as_fd(), &options.filename, options.read_only, options.locking)?;
        let alignment = if direct { direct_alignment(&file)? } else { Alignment::BYTE };
        let engine = match options.aio {
            AioMode::IoUring => IoEngine::IoUring,
            AioMode::Threads => IoEngine::ThreadPool,
        };
        Ok(FileDriver {
            file: Arc::new(file),
            engine,
            alignment,
            direct,
            path: options.filename.clone(),
            flush_failed: OnceLock::new(),
        })
    }

    /// Whether the buffers can go to the kernel as they are: few enough for one call, and
    /// under `O_DIRECT` each at an address aligned to the memory alignment and of whole
    /// blocks of the request alignment (the kernel checks every segment; QEMU's
    /// `bdrv_qiov_is_aligned`). File systems may state a memory alignment finer than the
    /// block size (4 bytes on NVMe), so the two masks differ.
    fn direct_ready<B: Deref<Target = [u8]>>(&self, bufs: &[B]) -> bool {
        let address_mask = self.alignment.memory - 1;
        let len_mask = (self.alignment.request as usize).max(self.alignment.memory) - 1;
        let aligned =
            |buf: &B| buf.as_ptr() as usize & address_mask == 0 && buf.len() & len_mask == 0;
        bufs.len() <= IOV_MAX && (!self.direct || bufs.iter().all(aligned))
    }

    /// Reads `bufs` at `offset`, all of them: a short read is continued, and the part past
    /// the end of the file reads as zeroes.
    ///
    /// Under `O_DIRECT` a read that stopped off the request alignment hit the end of the
    /// file (direct I/O moves whole blocks elsewhere): the rest reads as zeroes, as in
    /// QEMU's `file-posix`. Continuing at that offset would be an unaligned direct read,
    /// which the kernel refuses (`EINVAL`) once the file has grown past it, as it does when
    /// another request allocates a cluster of an image whose file ends inside a compressed
    /// cluster. A short read that stopped on the alignment continues, through a bounce
    /// buffer if the rest of `bufs` no longer suits `O_DIRECT`.
    fn read_all(
        &self,
        co: &Co,
        mut offset: u64,
        mut bufs: &mut [IoSliceMut<'_>],
    ) -> io::Result<()> {
        IoSliceMut::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let read = self.engine.preadv(co, self.file.as_fd(), bufs, offset)?;
            IoSliceMut::advance_slices(&mut bufs, read);
            offset += read as u64;
            let at_end =
                read == 0 || (self.direct && !offset.is_multiple_of(self.alignment.request));
            if at_end {
                bufs.iter_mut().for_each(|buf| buf.fill(0));
                return Ok(());
            }
            if !bufs.is_empty() && !self.direct_ready(bufs) {
                return self.read_bounced(co, offset, bufs);
            }
        }
        Ok(())
    }

    /// Reads `bufs` at `offset` through one aligned bounce buffer (for buffers `O_DIRECT`
    /// cannot take as they are, or too many for one call).
    fn read_bounced(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        let len = bufs.iter().map(|buf| buf.len()).sum();
        let mut bounce = IoBuffer::new(len);
        self.read_all(co, offset, &mut [IoSliceMut::new(&mut bounce)])?;
        scatter(&bounce, bufs);
        Ok(())
    }

    /// The error of every flush after a failed one (see [`BlockDriver::flush`] on
    /// [`FileDriver`]).
    fn refuse_after_failed_flush(&self) -> io::Result<()> {
        match self.flush_failed.get() {
            None => Ok(()),
            Some(first) => Err(io::Error::other(format!(
                "{}: an earlier flush failed ({first}), so the kernel may have dropped data \
                 written before it; no later flush of this open file can prove data stable \
                 (rewrite what was written since the last successful flush on a new open and \
                 flush that)",
                self.path.display()
            ))),
        }
    }

    /// Writes all of `bufs` at `offset`, continuing short writes.
    fn write_all(&self, co: &Co, mut offset: u64, mut bufs: &mut [IoSlice<'_>]) -> io::Result<()> {
        IoSlice::advance_slices(&mut bufs, 0);
        while !bufs.is_empty() {
            let written = self.engine.pwritev(co, self.file.as_fd(), bufs, offset)?;
            if written == 0 {
                return Err(io::Error::new(io::ErrorKind::WriteZero, "the file took no bytes"));
            }
            IoSlice::advance_slices(&mut bufs, written);
            offset += written as u64;
        }
        Ok(())
    }
}

/// The `O_DIRECT` alignment of `file`: what the file system states, else what a probe read
/// finds, else 4 KiB (safe on every device).
fn direct_alignment(file: &File) -> io::Result<Alignment> {
    if let Some((memory, offset)) = sys::direct_io_alignment(file.as_fd())? {
        let memory = (memory as usize).max(1);
        return Ok(Alignment { request: u64::from(offset), memory });
    }
    let mut probe = IoBuffer::new(BUFFER_ALIGN);
    for size in [512, 1024, 2048, 4096] {
        match sys::pread(file.as_fd(), &mut probe[..size], 0) {
            // A read that returned data proves the size works; an empty file proves nothing.
            Ok(read) if read > 0 => return Ok(Alignment { request: size as u64, memory: size }),
            Ok(_) => break,
            Err(error) if error.raw_os_error() == Some(libc::EINVAL) => continue,
            Err(error) => return Err(error),
        }
    }
    Ok(Alignment { request: 4096, memory: 4096 })
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    /// What the file's storage needs (a file has no children).
    fn alignment(&self, _below: Alignment) -> Alignment {
        self.alignment
    }

    fn length(&self, _co: &Co) -> io::Result<u64> {
        let metadata = self.file.metadata()?;
        if metadata.file_type().is_block_device() {
            // A block device's inode says 0 bytes; its end says how many there are.
            return sys::seek_end(self.file.as_fd());
        }
        Ok(metadata.len())
    }

    fn read(&self, co: &Co, offset: u64, bufs: &mut [IoSliceMut<'_>]) -> io::Result<()> {
        if self.direct_ready(bufs) {
            return self.read_all(co, offset, bufs);
        }
        self.read_bounced(co, offset, bufs)
    }

    fn write(&self, co: &Co, offset: u64, bufs: &[IoSlice<'_>]) -> io::Result<()> {
        if self.direct_ready(bufs) {
            let mut owned: Vec<IoSlice<'_>>;
            let mut on_stack: [IoSlice<'_>; 4];
            let slices: &mut [IoSlice<'_>] = if bufs.len() <= 4 {
                on_stack = [IoSlice::new(&[]); 4];
                on_stack[..bufs.len()].copy_from_slice(bufs);
                &mut on_stack[..bufs.len()]
            } else {
                owned = bufs.to_vec();
                &mut owned
            };
            return self.write_all(co, offset, slices);
        }
        let mut bounce = IoBuffer::new(bufs.iter().map(|buf| buf.len()).sum());
        gather_into(bufs, &mut bounce);
        self.write_all(co, offset, &mut [IoSlice::new(&bounce)])
    }

    /// Makes every completed write stable (`fdatasync`), on the node's engine.
    ///
    /// **After a failed flush, every later flush of this node fails**, naming the first
    /// failure (QEMU's `file-posix` does the same for the page cache). Linux reports a
    /// write-back error to one `fdatasync` only, and may by then have dropped the dirty
    /// pages or marked them clean: a later `fdatasync` would succeed although data written
    /// before it never reached the disk. `O_DIRECT` nodes latch too (QEMU's do not): file
    /// systems may still buffer some direct writes (falling back to the page cache, or
    /// extending the file through its metadata journal), so a failure cannot be proven
    /// harmless there either. What a caller can still trust:
    ///
    /// - data made stable by the last successful flush and not written since is on disk;
    /// - writes since then may or may not be on disk, whichever node or descriptor reads
    ///   them back: reading the page cache can return bytes the disk does not hold;
    /// - reads and writes still work, and this node never says again that data is stable.
    ///   To make data stable again, open the file anew, write everything written since the
    ///   last successful flush again, and flush that node.
    ///
    /// A flush that succeeds while another one fails on the same node is reported as
    /// failed too, when it ends after the failure was seen.
    fn flush(&self, co: &Co) -> io::Result<()> {
        self.refuse_after_failed_flush()?;
        match self.engine.fsync(co, self.file.as_fd(), true) {
            Ok(()) => self.refuse_after_failed_flush(),
            Err(error) => {
                self.flush_failed.get_or_init(|| error.to_string());
                Err(error)
            }
        }
    }

    fn discard(&self, co: &Co, offset: u64, len: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(()); // fallocate(2) refuses an empty range.
        }
        let file = Arc::clone(&self.file);
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        match co.run_blocking(move || sys::fallocate(file.as_fd(), mode, offset, len)) {
            // Discard is advisory: a file system without holes keeps the data.
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => Ok(()),
            result => result,
        }
    }

    fn write_zeroes(&self, co: &Co, offset: u64, len: u64, may_unmap: bool) -> io::Result<()> {
        if len == 0 {
            return Ok(()); // fallocate(2) refuses an empty range.
        }
        let file = Arc::clone(&self.file);
        let mode = if may_unmap {
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE
        } else {
            libc::FALLOC_FL_ZERO_RANGE
        };
        match co.run_blocking(move || sys::fallocate(file.as_fd(), mode, offset, len)) {
            Err(error) if error.raw_os_error() == Some(libc::EOPNOTSUPP) => {
                write_zeroes_by_writing(co, offset, len, |co, offset, bufs| {
                    self.write(co, offset, bufs)
                })
            }
            result => result,
        }
    }

    /// `fallocate` zeroes without writing (a file system without it makes `write_zeroes`
    /// fall back to writing, which this cannot know in advance).
    fn can_zero_fast(&self, _offset: u64, _len: u64) -> bool {
        true
    }

    fn block_status(&self, _co: &Co, offset: u64, len: u64) -> io::Result<BlockStatus> {
        let fd = self.file.as_fd();
        let end = offset.saturating_add(len);
        let data = sys::seek_data_or_hole(fd, offset, true)?;
        let status = match data {
            Some(data) if data == offset => {
                let hole = sys::seek_data_or_hole(fd, offset, false)?.unwrap_or(end);
                BlockStatus { allocation: Allocation::Data, len: hole.min(end) - offset }
            }
            Some(data) => BlockStatus { allocation: Allocation::Zero, len: data.min(end) - offset },
            None => BlockStatus { allocation: Allocation::Zero, len },
        };
        // A file changing under us could make the answer empty; never answer 0 bytes.
        Ok(BlockStatus { len: status.len.max(1).min(len), ..status })
    }

    fn truncate(&self, co: &Co, len: u64) -> io::Result<()> {
        let file = Arc::clone(&self.file);
        co.run_blocking(move || file.set_len(len))
    }
}

impl Drop for FileDriver {
    /// Closing gives up the image locks at once (see `unlock_image`). No request is in
    /// flight (each one borrows the driver), so the file is closed right after.
    fn drop(&mut self) {
        unlock_image(self.file.as_fd());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A driver whose file system states a memory alignment finer than its request
    /// alignment (NVMe: 4-byte DMA, 512-byte sectors), as `statx` reports it.
    fn direct_driver(alignment: Alignment) -> FileDriver {
        let file = Arc::new(File::open("/dev/null").unwrap());
        FileDriver {
            file,
            engine: IoEngine::ThreadPool,
            alignment,
            direct: true,
            path: "/dev/null".into(),
            flush_failed: OnceLock::new(),
        }
    }

    #[test]
    fn o_direct_buffers_need_whole_blocks_not_just_aligned_addresses() {
        let driver = direct_driver(Alignment { request: 512, memory: 4 });
        let buffer = IoBuffer::new(512);
        // Two halves of one sector: addresses fit the memory alignment, lengths are not
        // whole blocks, which the kernel refuses (EINVAL) under O_DIRECT.
        let (head, tail) = buffer.split_at(256);
        assert!(!driver.direct_ready(&[head, tail]), "half-sector buffers must be bounced");
        assert!(driver.direct_ready(&[&buffer[..]]));
        let wider = IoBuffer::new(1024);
        let misaligned = &wider[2..514];
        assert!(!driver.direct_ready(&[misaligned]), "an address off the memory alignment");
        let mut buffered = direct_driver(Alignment::BYTE);
        buffered.direct = false;
        assert!(buffered.direct_ready(&[misaligned, head]), "the page cache takes anything");
    }

    #[test]
    fn closing_gives_up_the_image_locks_while_the_description_lives_on() {
        // The kernel may hold the open file description a moment past our close (an
        // io_uring worker after a flush); a duplicate descriptor holds it here for good.
        let path = std::env::temp_dir().join(format!("aiocoro-file-unlock-{}", std::process::id()));
        std::fs::write(&path, [0u8; 4096]).unwrap();
        let options = FileOptions {
            filename: path.clone(),
            cache: CacheMode::Writeback,
            aio: AioMode::Threads,
            read_only: false,
            locking: Locking::On,
        };
        let driver = FileDriver::open(&options).unwrap();
        let description = driver.file.try_clone().unwrap();
        let other = File::open(&path).unwrap();
        assert!(sys::ofd_byte_locked_elsewhere(other.as_fd(), 201).unwrap(), "write unshared");
        drop(driver);
        for byte in [100, 101, 103, 201, 203] {
            let held = sys::ofd_byte_locked_elsewhere(other.as_fd(), byte).unwrap();
            assert!(!held, "byte {byte} is still locked after the driver was dropped");
        }
        drop(description);
        std::fs::remove_file(&path).unwrap();
    }
}
