"""Where datasets live: local paths, and `s3://`, `gs://`, `http(s)://` URLs through fsspec.

Every data path of mmtrain (data.train, data.mix keys, data.val, the inputs and `-o` of every
`mmtrain data` command) goes through this module, so a URL is never taken for a local folder.

* Object stores need their fsspec backend, an optional extra: `pip install -e '.[s3]'` (s3fs)
  or `'.[gcs]'` (gcsfs). A missing one is a ValueError that names the install command.
* Credentials and endpoints come from the standard environment, read by the backends themselves:
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_PROFILE`,
  `AWS_DEFAULT_REGION`, `AWS_ENDPOINT_URL` (an S3-compatible store: MinIO, Ceph, moto, ...);
  `GOOGLE_APPLICATION_CREDENTIALS`.
* Writes are atomic: a local file is written under a temporary name and renamed; an object is
  uploaded in one PUT (or one multipart upload), which the store makes visible only when complete.
  A reader therefore never sees a half-written file under its final name.
* http(s) is read-only.
"""

from __future__ import annotations

import errno
import os
import posixpath
import random
import time
import urllib.parse
from pathlib import Path
from typing import IO, Any, Callable, TypeVar

from mmtrain.fileio import atomic_copy_file, atomic_write_bytes

# scheme → (fsspec protocol, the extra that provides it)
SCHEMES = {"s3": ("s3", "s3"), "gs": ("gcs", "gcs"), "gcs": ("gcs", "gcs"),
           "http": ("http", "http"), "https": ("https", "http")}
WRITABLE = {"s3", "gs", "gcs"}
INSTALL = {"s3": "pip install -e '.[s3]'  (s3fs)", "gcs": "pip install -e '.[gcs]'  (gcsfs)",
           "http": "pip install aiohttp  (fsspec's HTTP client)"}
T = TypeVar("T")


def is_url(path: str | os.PathLike) -> bool:
    """A remote URL (`file://` and plain paths are local)."""
    return _scheme(str(path)) not in ("", "file")


def _scheme(path: str) -> str:
    if "://" not in path:
        return ""
    scheme = path.split("://", 1)[0].lower()
    if scheme != "file" and scheme not in SCHEMES:
        raise ValueError(f"{path}: unsupported URL scheme {scheme!r}; use a local path, s3://, "
                         "gs://, http:// or https://")
    return scheme


def local(path: str | os.PathLike) -> Path:
    """The local path of a plain path or a file:// URL."""
    path = str(path)
    return Path(path[len("file://"):] if path.startswith("file://") else path)


def join(base: str | os.PathLike, *names: str) -> str:
    """`base/name/...` for a local path or a URL (query strings and fragments stay at the end)."""
    base = str(base)
    if not is_url(base):
        return str(local(base).joinpath(*names))
    parts = urllib.parse.urlsplit(base)
    path = posixpath.join(parts.path.rstrip("/") or "/", *names)
    return urllib.parse.urlunsplit(parts._replace(path=path))


def parent(path: str | os.PathLike) -> str:
    path = str(path)
    if not is_url(path):
        return str(local(path).parent)
    parts = urllib.parse.urlsplit(path)
    return urllib.parse.urlunsplit(parts._replace(path=posixpath.dirname(parts.path.rstrip("/"))))


def name(path: str | os.PathLike) -> str:
    """The last path component (a dataset's short name)."""
    path = str(path)
    if is_url(path):
        path = urllib.parse.urlsplit(path).path
    return posixpath.basename(path.rstrip("/")) or path


def filesystem(url: str) -> tuple[Any, str]:
    """(fsspec filesystem, path inside it) for a URL; a missing backend names its install."""
    scheme = _scheme(url)
    protocol, extra = SCHEMES[scheme]
    try:
        import fsspec

        # No listings cache: other processes (the ranks, a build being resumed) change the store.
        fs = fsspec.filesystem(protocol, use_listings_cache=False)
    except ImportError as e:
        raise ValueError(f"{url}: reading {scheme}:// needs an optional dependency that is not "
                         f"installed ({e}); run: {INSTALL[extra]}") from None
    return fs, (url if protocol.startswith("http") else fs._strip_protocol(url))


def check_writable(url: str) -> None:
    if is_url(url) and _scheme(url) not in WRITABLE:
        raise ValueError(f"{url}: http(s) is read-only; write to a local path, s3:// or gs:// "
                         "and serve that")


# ----------------------------------------------------------------------------------- reading

def exists(path: str | os.PathLike) -> bool:
    if not is_url(path):
        return local(path).exists()
    fs, p = filesystem(str(path))
    return fs.exists(p)


def size(path: str | os.PathLike) -> int:
    """Size in bytes; FileNotFoundError if absent."""
    if not is_url(path):
        return local(path).stat().st_size
    fs, p = filesystem(str(path))
    info = fs.info(p)
    if info.get("size") is None:
        raise OSError(f"{path}: the server does not report a size")
    return int(info["size"])


def read_bytes(path: str | os.PathLike) -> bytes:
    if not is_url(path):
        return local(path).read_bytes()
    fs, p = filesystem(str(path))
    return fs.cat_file(p)


def read_range(path: str | os.PathLike, start: int, end: int) -> bytes:
    """Bytes [start, end) of a file: one range request for a URL."""
    if not is_url(path):
        with open(local(path), "rb") as f:
            f.seek(start)
            return f.read(end - start)
    fs, p = filesystem(str(path))
    return fs.cat_file(p, start=start, end=end)


def open_read(path: str | os.PathLike) -> IO[bytes]:
    """A binary file object for reading (range requests for a URL, seekable)."""
    if not is_url(path):
        return open(local(path), "rb")
    fs, p = filesystem(str(path))
    return fs.open(p, "rb", block_size=8 << 20, cache_type="readahead")


def listdir(path: str | os.PathLike) -> list[str]:
    """Names of the files directly under a folder or prefix ([] if it does not exist)."""
    if not is_url(path):
        folder = local(path)
        return sorted(p.name for p in folder.iterdir() if p.is_file()) if folder.is_dir() else []
    if _scheme(str(path)).startswith("http"):
        raise ValueError(f"{path}: an http(s) folder cannot be listed; name the files")
    fs, p = filesystem(str(path))
    try:
        entries = fs.ls(p.rstrip("/"), detail=True, refresh=True)
    except FileNotFoundError:
        return []
    return sorted(posixpath.basename(e["name"].rstrip("/")) for e in entries
                  if e.get("type") == "file")


def glob(pattern: str) -> list[str]:
    """Files matching a glob pattern under a URL, as full URLs."""
    fs, p = filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    return sorted(f"{scheme}://{m}" for m in fs.glob(p) if fs.isfile(m))


# ----------------------------------------------------------------------------------- writing

def put_file(src: Path, dest: str | os.PathLike) -> None:
    """Copy a complete local file to `dest` so that `dest` is either absent/old or whole."""
    if not is_url(dest):
        local(dest).parent.mkdir(parents=True, exist_ok=True)
        atomic_copy_file(src, local(dest))
        return
    check_writable(str(dest))
    fs, p = filesystem(str(dest))
    fs.put_file(str(src), p)  # one PUT / one multipart upload: visible only once complete


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    """Write a whole file atomically (see put_file)."""
    if not is_url(dest):
        local(dest).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(local(dest), data)
        return
    check_writable(str(dest))
    fs, p = filesystem(str(dest))
    fs.pipe_file(p, data)


def remove(path: str | os.PathLike) -> None:
    """Delete a file if it exists."""
    if not is_url(path):
        local(path).unlink(missing_ok=True)
        return
    check_writable(str(path))
    fs, p = filesystem(str(path))
    try:
        fs.rm_file(p)
    except FileNotFoundError:
        pass


def makedirs(path: str | os.PathLike) -> None:
    """Create a local folder; object stores have no folders (a bucket must exist)."""
    if not is_url(path):
        local(path).mkdir(parents=True, exist_ok=True)
    else:
        check_writable(str(path))


# ------------------------------------------------------------------------------------ errors

def io_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean "the storage did not answer", as opposed to bad bytes."""
    errors: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        import aiohttp

        errors.append(aiohttp.ClientError)
    except ImportError:
        pass
    try:
        import botocore.exceptions

        errors += [botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError]
    except ImportError:
        pass
    return tuple(errors)


def fd_exhaustion(e: BaseException) -> bool:
    """True when `e` (or its cause) is "too many open files" (EMFILE / ENFILE)."""
    seen = 0
    while e is not None and seen < 8:
        if getattr(e, "errno", None) in (errno.EMFILE, errno.ENFILE) or \
                "too many open files" in str(e).lower():
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def fd_exhaustion_message(what: str, e: BaseException) -> str:
    try:
        import resource

        limit = f"the limit is {resource.getrlimit(resource.RLIMIT_NOFILE)[0]} (ulimit -n)"
    except (ImportError, OSError):
        limit = "see ulimit -n"
    return (f"{what}: out of file descriptors (too many open files: {e}); {limit}. Raise the "
            "limit, or lower data.max_open_shards or data.num_workers")


def with_retries(fn: Callable[[], T], *, what: str, retries: int, backoff: float,
                 on_retry: Callable[[int, BaseException], None] | None = None,
                 give_up: tuple[type[BaseException], ...] = ()) -> T:
    """fn() retried `retries` times on I/O errors, waiting backoff·2^k (±25% jitter, at most 60
    s) between tries. Running out of file descriptors is not retried: it names its cause.
    Errors of the `give_up` types are raised at once."""
    errors = io_errors()
    for attempt in range(retries + 1):
        try:
            return fn()
        except errors as e:
            if fd_exhaustion(e):
                raise RuntimeError(fd_exhaustion_message(what, e)) from e
            if attempt == retries or isinstance(e, give_up):
                raise
            if on_retry is not None:
                on_retry(attempt + 1, e)
            time.sleep(min(60.0, backoff * 2 ** attempt) * random.uniform(0.75, 1.25))
    raise AssertionError("unreachable")
