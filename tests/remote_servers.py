"""Real servers on loopback for the remote-storage tests: an S3-compatible one (moto's server
mode, answering the S3 HTTP API) and an HTTP file server that honours Range requests and can
fail the first k requests for each file (a flaky store)."""

from __future__ import annotations

import contextlib
import http.server
import logging
import os
import re
import threading
from pathlib import Path
from typing import Iterator

S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
          "AWS_DEFAULT_REGION": "us-east-1"}


@contextlib.contextmanager
def s3_server() -> Iterator[dict[str, str]]:
    """A moto S3 server on 127.0.0.1 (a free port); yields the environment that points at it,
    also set in os.environ while it runs (for in-process fsspec)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {**S3_ENV, "AWS_ENDPOINT_URL": f"http://{host}:{port}"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    _clear_fsspec_cache()
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        _clear_fsspec_cache()
        server.stop()


def make_bucket(name: str) -> None:
    import fsspec

    fsspec.filesystem("s3").mkdir(name)


def _clear_fsspec_cache() -> None:
    with contextlib.suppress(ImportError):
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Files under the server's directory, with Range support and injected failures."""

    def log_message(self, *args) -> None:  # quiet test output
        pass

    def _fail(self) -> bool:
        server = self.server
        with server.lock:
            server.requests[self.path] = server.requests.get(self.path, 0) + 1
            return any(re.search(p, self.path) for p in server.fail_paths) and \
                server.requests[self.path] <= server.fail_first

    def do_HEAD(self) -> None:
        if self._fail():
            self.send_error(503, "injected failure")
            return
        super().do_HEAD()

    def do_GET(self) -> None:
        if self._fail():
            self.send_error(503, "injected failure")
            return
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", ""))
        path = Path(self.translate_path(self.path))
        if not m or not path.is_file():
            super().do_GET()
            return
        data = path.read_bytes()
        start = int(m.group(1))
        end = min(len(data), int(m.group(2)) + 1 if m.group(2) else len(data))
        self.send_response(206)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.wfile.write(data[start:end])


@contextlib.contextmanager
def http_server(directory: Path, *, fail_first: int = 0,
                fail_paths: tuple[str, ...] = (r"\.tar$",)) -> Iterator[tuple[str, dict]]:
    """Serve `directory` on 127.0.0.1; yields (base URL, per-path request counts). The first
    `fail_first` requests for each path matching `fail_paths` get a 503."""
    handler = lambda *a, **k: _Handler(*a, directory=str(directory), **k)  # noqa: E731
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    server.lock, server.requests = threading.Lock(), {}
    server.fail_first, server.fail_paths = fail_first, fail_paths
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", server.requests
    finally:
        server.shutdown()
        server.server_close()
