"""Reading shard bytes robustly: bounded handles, read-ahead, retries with backoff, seeks.

One `ShardIO` per consumer (a rank's decode worker, or the rank itself): every shard it reads goes
through it, so what it holds is bounded whatever the number of logical streams it serves.

* A shard is read in blocks (`block_size`) at explicit byte positions: os.pread on a local file,
  one range request (`fsspec cat_file(start, end)`) for a URL. Nothing else is kept between
  blocks, so a failed read is retried from the same position and the tar reader above never
  notices, and a resume in the middle of a shard starts at the sample's byte offset (a seek).
* Handles: local files stay open in an LRU of at most `max_open` descriptors, shared by all the
  shards this consumer reads; an evicted one is reopened at the next block. Remote reads run on a
  pool of `max_open` threads: at most that many connections per consumer.
* Read-ahead: a remote shard keeps up to `read_ahead` following blocks in flight while the
  consumer decodes, which hides the request latency (local files rely on the page cache).
* Retries: opening and every block read are retried `retries` times with exponential backoff
  (storage.with_retries). What still fails raises `ShardUnreadable` (the storage did not answer);
  tar errors above are bad bytes, a different thing (see LogicalStream._read_tar).
* Running out of file descriptors is not retried: it raises a RuntimeError naming the cause.
"""

from __future__ import annotations

import collections
import concurrent.futures
import io
import logging
import os
import threading
from concurrent.futures import Future
from typing import Any

from mmtrain import storage

log = logging.getLogger("mmtrain.data")


class ShardUnreadable(OSError):
    """A shard could not be opened or read after all retries (an I/O failure, not bad bytes)."""


class ShardIO:
    fetched_total = 0  # bytes fetched by every ShardIO of this process (benchmarks report it)

    def __init__(self, *, max_open: int = 4, read_ahead: int = 2, retries: int = 5,
                 backoff: float = 0.5, block_size: int = 8 << 20) -> None:
        if max_open < 1 or read_ahead < 0 or retries < 0 or backoff < 0 or block_size < 512:
            raise ValueError("ShardIO: max_open >= 1, read_ahead/retries/backoff >= 0, "
                             "block_size >= 512")
        self.max_open, self.read_ahead = max_open, read_ahead
        self.retries, self.backoff, self.block_size = retries, backoff, block_size
        self._fds: collections.OrderedDict[str, int] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.retried = 0  # I/O errors that a retry got past (for reporting)

    # ---- public
    def open(self, url: str, *, offset: int = 0) -> "ShardStream":
        """A read-only stream over the shard from byte `offset` (a sample boundary)."""
        size = self._retry(lambda: self._size(url), url, "open")
        if offset > size:
            raise ShardUnreadable(f"{url}: offset {offset} is past its end ({size} bytes)")
        return ShardStream(self, url, size, offset)

    def size(self, url: str) -> int:
        """A shard's size in bytes (with retries)."""
        return self._retry(lambda: self._size(url), url, "size")

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    def __del__(self) -> None:  # a consumer's generator dropped without close(): no fd leak
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to release
            pass

    def open_handles(self) -> int:
        return len(self._fds)

    # ---- blocks
    def fetch(self, url: str, start: int, end: int) -> bytes:
        """Bytes [start, end) of a shard, with retries."""
        data = self._retry(lambda: self._read(url, start, end), url, f"read at byte {start}")
        with self._lock:
            ShardIO.fetched_total += len(data)
        return data

    def prefetch(self, url: str, start: int, end: int) -> Future | None:
        """Fetch a remote block in the background (None: read it in the foreground later)."""
        if not storage.is_url(url) or self.read_ahead == 0:
            return None
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                self.max_open, thread_name_prefix="mmtrain-shard-io")
        return self._pool.submit(self.fetch, url, start, end)

    def _retry(self, fn: Any, url: str, what: str) -> Any:
        def on_retry(attempt: int, e: BaseException) -> None:
            self.retried += 1
            self._drop(url)  # a fresh descriptor / request on the next try
            log.warning("%s: %s failed (%s: %s); retry %d of %d", url, what, type(e).__name__,
                        e, attempt, self.retries)

        # A local file that does not exist will not appear; a store's "not found" can be a
        # transient error (fsspec's HTTP client reports a failed HEAD as FileNotFoundError).
        give_up = () if storage.is_url(url) else (FileNotFoundError, IsADirectoryError,
                                                  PermissionError)
        try:
            return storage.with_retries(fn, what=f"shard {url}", retries=self.retries,
                                        backoff=self.backoff, on_retry=on_retry, give_up=give_up)
        except storage.io_errors() as e:
            raise ShardUnreadable(f"{url}: {what} failed after {self.retries + 1} tries: "
                                  f"{type(e).__name__}: {e}") from e

    def _size(self, url: str) -> int:
        if storage.is_url(url):
            return storage.size(url)
        return os.fstat(self._fd(url)).st_size

    def _read(self, url: str, start: int, end: int) -> bytes:
        if storage.is_url(url):
            fs, path = storage.filesystem(url)
            data = fs.cat_file(path, start=start, end=end)
            if len(data) > end - start:  # a server that ignores Range sent the whole file
                data = data[start:end]
            return data
        with self._lock:  # the descriptor must not be evicted while in use
            return os.pread(self._fd_locked(url), end - start, start)

    def _fd(self, url: str) -> int:
        with self._lock:
            return self._fd_locked(url)

    def _fd_locked(self, url: str) -> int:
        if url in self._fds:
            self._fds.move_to_end(url)
            return self._fds[url]
        while len(self._fds) >= self.max_open:  # least recently used first
            os.close(self._fds.popitem(last=False)[1])
        fd = os.open(storage.local(url), os.O_RDONLY)
        self._fds[url] = fd
        return fd

    def _drop(self, url: str) -> None:
        with self._lock:
            fd = self._fds.pop(url, None)
            if fd is not None:
                os.close(fd)


class ShardStream(io.RawIOBase):
    """Sequential reads over one shard through its ShardIO (what the tar reader consumes)."""

    def __init__(self, shard_io: ShardIO, url: str, size: int, offset: int) -> None:
        self.io, self.url, self.size, self.pos = shard_io, url, size, offset
        self.buf, self.buf_pos = b"", 0
        self.ahead: collections.deque[tuple[int, int, Future | None]] = collections.deque()
        self.next_block = offset  # first byte not yet requested

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.pos

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            n = self.size - self.pos
        out = []
        while n > 0 and self.pos < self.size:
            if self.buf_pos >= len(self.buf):
                self._next_block()
            chunk = self.buf[self.buf_pos:self.buf_pos + n]
            self.buf_pos += len(chunk)
            self.pos += len(chunk)
            n -= len(chunk)
            out.append(chunk)
        return b"".join(out)

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def _next_block(self) -> None:
        while len(self.ahead) < 1 + self.io.read_ahead and self.next_block < self.size:
            start, end = self.next_block, min(self.size, self.next_block + self.io.block_size)
            self.ahead.append((start, end, self.io.prefetch(self.url, start, end)))
            self.next_block = end
        start, end, future = self.ahead.popleft()
        data = future.result() if future is not None else self.io.fetch(self.url, start, end)
        if len(data) != end - start:  # the file shrank since it was opened
            raise ShardUnreadable(f"{self.url}: read {len(data)} bytes at {start}, expected "
                                  f"{end - start}: the shard changed while being read")
        self.buf, self.buf_pos = data, 0

    def close(self) -> None:
        for _, _, future in self.ahead:
            if future is not None:
                future.cancel()
        self.ahead.clear()
        self.buf = b""
        super().close()
