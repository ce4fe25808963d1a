"""`build --download` against a local HTTP server: concurrency, timeouts, retries, size cap."""

from __future__ import annotations

import collections
import http.server
import json
import threading
import time

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from data_tools.shards import read_dataset_index


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):  # a client that gave up: expected here
        pass


@pytest.fixture
def media_server(fx):
    """http://127.0.0.1:PORT serving /img/N.png, /missing (404), /slow (5 s), /big (with and
    without Content-Length), /flaky (503 once, then the image); counts requests per path."""
    images = {f"/img/{i}.png": fx.image_bytes(i) for i in range(8)}
    hits: collections.Counter = collections.Counter()
    state = {"active": 0, "max_active": 0}
    lock = threading.Lock()

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest's output clean
            pass

        def do_GET(self):
            with lock:
                hits[self.path] += 1
                state["active"] += 1
                state["max_active"] = max(state["max_active"], state["active"])
            try:
                self.respond()
            finally:
                with lock:
                    state["active"] -= 1

        def respond(self):
            time.sleep(0.1)  # downloads overlap only if they run concurrently
            if self.path in images:
                return self.send(200, images[self.path])
            if self.path == "/slow":
                time.sleep(5)
                return self.send(200, images["/img/0.png"])
            if self.path == "/big":
                return self.send(200, b"\x89PNG" + bytes(100_000))
            if self.path == "/big-no-length":
                self.send_response(200)
                self.end_headers()
                self.wfile.write(b"\x89PNG" + bytes(100_000))
                return None
            if self.path == "/flaky" and hits[self.path] == 1:
                return self.send(503, b"busy")
            if self.path == "/flaky":
                return self.send(200, images["/img/1.png"])
            return self.send(404, b"no")

        def send(self, status, body):
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = _Server(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    yield base, images, hits, state
    server.shutdown()
    server.server_close()


def samples(out) -> list[dict]:
    urls = [str(out / s["name"]) for s in read_dataset_index(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


FAST = ("--download", "--download-timeout", "1", "--download-retries", "1",
        "--download-max-bytes", "20K", "--download-workers", "8")


def test_raw_cc3m_tsv_builds_with_download(tmp_path, media_server, fx, capsys):
    base, images, hits, state = media_server
    lines = [f"picture {i}\t{base}/img/{i}.png" for i in range(6)] + [
        f"gone\t{base}/missing", f"too slow\t{base}/slow", f"too big\t{base}/big",
        f"also too big\t{base}/big-no-length", f"busy once\t{base}/flaky",
        'quoted "caption"\tftp://example.com/x.png']
    (tmp_path / "Train_GCC-training.tsv").write_text("\n".join(lines) + "\n")  # no header line
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "Train_GCC-training.tsv",
                        "-o", tmp_path / "out", "--header", "caption,url", *FAST)
    assert rc == 0, out
    built = samples(tmp_path / "out")
    assert [s["txt"].decode() for s in built] == [f"picture {i}" for i in range(6)] + ["busy once"]
    assert built[2]["png"] == images["/img/2.png"]
    assert json.loads(built[2]["json"]) == {"url": f"{base}/img/2.png"}  # as img2dataset keeps it
    assert hits["/flaky"] == 2 and hits["/missing"] == 1  # retried a 503, not a 404
    assert state["max_active"] > 1  # concurrent downloads

    rejected = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    assert [r["code"] for r in rejected] == ["download_failed"] * 4 + ["unsupported_format"]
    reasons = [r["reason"] for r in rejected]
    assert "HTTP 404" in reasons[0]
    assert "timed out" in reasons[1] and "after 2 attempts" in reasons[1]
    assert "--download-max-bytes" in reasons[2] and "--download-max-bytes" in reasons[3]
    assert "only http(s) URLs are fetched" in reasons[4]


def test_a_headerless_tsv_without_header_says_what_to_pass(tmp_path, fx, capsys):
    (tmp_path / "cc3m.tsv").write_text("a caption\thttp://127.0.0.1:9/x.jpg\n")
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "cc3m.tsv", "-o",
                        tmp_path / "out", "--download")
    assert rc == 0 and "bad_source 1" in out
    [rej] = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    assert "--header" in rej["reason"] and "cc3m.tsv" in rej["reason"]


def test_obelics_style_image_urls_and_mmc4_raw_urls(tmp_path, media_server, fx, capsys):
    base, images, _, _ = media_server
    fx.write_parquet(tmp_path / "obelics.parquet", [
        {"texts": ["Intro.", None, "After."], "images": [None, f"{base}/img/3.png", None]},
        {"texts": [None, "Broken."], "images": [f"{base}/missing", None]}])
    rc, out, _ = fx.run(capsys, "build", "interleaved", tmp_path / "obelics.parquet",
                        "-o", tmp_path / "ob", *FAST)
    assert rc == 0 and "1 samples" in out, out
    [doc] = samples(tmp_path / "ob")
    assert doc["0.png"] == images["/img/3.png"]
    assert fx.read_jsonl(tmp_path / "ob/rejected.jsonl")[0]["code"] == "download_failed"

    fx.write_jsonl(tmp_path / "mmc4.jsonl", [{
        "text_list": ["One.", "Two."],
        "image_info": [{"image_name": "x.jpg", "raw_url": f"{base}/img/4.png",
                        "matched_text_index": 1}]}])
    rc, out, _ = fx.run(capsys, "build", "mmc4", tmp_path / "mmc4.jsonl", "-o", tmp_path / "m",
                        *FAST)
    assert rc == 0 and "1 samples" in out, out
    [doc] = samples(tmp_path / "m")
    assert [s["type"] for s in json.loads(doc["json"])["segments"]] == ["text", "image", "text"]
    assert doc["0.png"] == images["/img/4.png"]


def test_urls_are_refused_without_download(tmp_path, media_server, fx, capsys):
    base, _, hits, _ = media_server
    fx.write_jsonl(tmp_path / "t.jsonl", [{"url": f"{base}/img/0.png", "caption": "c"}])
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "t.jsonl", "-o", tmp_path / "o")
    assert rc == 0 and "0 samples" in out and not hits
    [rej] = fx.read_jsonl(tmp_path / "o/rejected.jsonl")
    assert rej["code"] == "unsupported_format" and "--download" in rej["reason"]
    manifest = pq.read_table(tmp_path / "o/manifest.parquet")
    assert manifest.num_rows == 0
