"""`build --download`: fetch the media URLs of rows before they become samples.

Rows pass through in order; the URLs of up to `ahead` rows are fetched at once by a thread pool
(downloads wait on the network, not the CPU). Each URL gets `timeout` seconds per attempt,
`retries` more attempts after a connection error, a timeout, HTTP 429 or 5xx (exponential
backoff: 0.5 s, 1 s, 2 s, ...), and at most `max_bytes` bytes (checked from Content-Length and
while reading). A fetched cell becomes {"bytes": ..., "path": URL}; a row with any URL that
cannot be fetched is rejected as `download_failed`, naming the URL and the cause.
"""

from __future__ import annotations

import collections
import dataclasses
import time
import urllib.error
import urllib.request
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from data_tools.sources import RawRow

USER_AGENT = "mmtrain-data-build/1 (+https://github.com/)"
RETRY_STATUS = {408, 425, 429, 500, 502, 503, 504}


@dataclasses.dataclass(frozen=True, kw_only=True)
class DownloadOptions:
    workers: int = 16  # concurrent downloads
    timeout: float = 20.0  # seconds per attempt (connect and each read)
    retries: int = 2  # further attempts after a transient failure
    max_bytes: int = 32 << 20  # larger media are refused
    backoff: float = 0.5  # seconds before the first retry; doubles each time

    def __post_init__(self) -> None:
        if self.workers < 1 or self.timeout <= 0 or self.retries < 0 or self.max_bytes < 1 \
                or self.backoff < 0:
            raise ValueError("--download-workers and --download-max-bytes must be >= 1, "
                             "--download-timeout > 0, --download-retries >= 0")


class DownloadError(Exception):
    """A URL that could not be fetched; the message says why (goes to rejected.jsonl)."""


def fetch(url: str, opts: DownloadOptions) -> bytes:
    """The body of `url` (http/https only), with retries; raises DownloadError."""
    if not url.startswith(("http://", "https://")):
        raise DownloadError(f"{url[:200]!r}: only http(s) URLs are fetched")
    for attempt in range(opts.retries + 1):
        try:
            return _fetch_once(url, opts)
        except DownloadError:
            raise
        except urllib.error.HTTPError as e:
            if e.code not in RETRY_STATUS or attempt == opts.retries:
                raise DownloadError(f"{url[:200]}: HTTP {e.code} {e.reason}"
                                    + (f" after {attempt + 1} attempts" if attempt else ""))
        except (OSError, ValueError) as e:  # URLError, timeouts, resets, bad URLs
            if attempt == opts.retries:
                reason = getattr(e, "reason", e)
                raise DownloadError(f"{url[:200]}: {type(e).__name__}: {reason} after "
                                    f"{attempt + 1} attempts") from None
        time.sleep(opts.backoff * 2 ** attempt)
    raise AssertionError("unreachable")


def _fetch_once(url: str, opts: DownloadOptions) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    with urllib.request.urlopen(request, timeout=opts.timeout) as response:
        declared = response.headers.get("Content-Length")
        if declared and declared.isdigit() and int(declared) > opts.max_bytes:
            raise DownloadError(f"{url[:200]}: {declared} bytes > --download-max-bytes="
                                f"{opts.max_bytes}")
        data = response.read(opts.max_bytes + 1)
        if len(data) > opts.max_bytes:
            raise DownloadError(f"{url[:200]}: more than --download-max-bytes={opts.max_bytes} "
                                "bytes")
        return data


# Where a row keeps its URLs: (path of keys/indices into row.fields, URL).
Locate = Callable[[dict[str, Any]], list[tuple[tuple, str]]]


def download_rows(rows: Iterable[RawRow], locate: Locate, opts: DownloadOptions,
                  ahead: int = 0) -> Iterator[RawRow]:
    """`rows` in order, with the URLs that `locate` finds replaced by their bytes.

    At most `ahead` rows (default 4 × workers) are in flight, so memory stays bounded.
    """
    ahead = ahead or 4 * opts.workers
    with ThreadPoolExecutor(opts.workers, thread_name_prefix="download") as pool:
        pending: collections.deque[tuple[RawRow, list[tuple[tuple, Future]]]] = \
            collections.deque()
        for row in rows:
            urls = locate(row.fields) if row.error is None else []
            pending.append((row, [(where, pool.submit(fetch, url, opts)) for where, url in urls]))
            if len(pending) >= ahead:
                yield _complete(*pending.popleft())
        while pending:
            yield _complete(*pending.popleft())


def _complete(row: RawRow, fetches: list[tuple[tuple, Future]]) -> RawRow:
    for where, future in fetches:
        try:
            data = future.result()
        except DownloadError as e:
            row.error = row.error or ("download_failed", str(e))  # the first failure
            continue
        container = row.fields
        for step in where[:-1]:
            container = container[step]
        url = container[where[-1]]
        container[where[-1]] = {"bytes": data, "path": url}
    return row
