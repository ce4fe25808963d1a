"""Ingest keeps what the sources hold: exact CSV/TSV text, every tar member, MMC4, limits."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import soundfile
import webdataset as wds

from data_tools.shards import read_dataset_index


def wds_samples(out) -> list[dict]:
    urls = [str(out / s["name"]) for s in read_dataset_index(out)["shards"]]
    return list(wds.WebDataset(urls, shardshuffle=False))


def encoded_audio(fmt: str, subtype: str, rate: int = 16000, seconds: float = 0.5) -> bytes:
    wave = (0.1 * np.random.default_rng(0).standard_normal(int(rate * seconds))).astype(np.float32)
    buf = io.BytesIO()
    soundfile.write(buf, wave, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


# ----------------------------------------------------------------------------------- CSV / TSV

def test_csv_rfc4180_and_tsv_text_round_trip_exactly(tmp_path, fx, capsys):
    (tmp_path / "a.png").write_bytes(fx.image_bytes(0))
    captions = ['"Hello," she said.', 'a, b and "c"', "two\nlines", "  spaces kept  "]
    # CSV by RFC 4180: quoted fields hold commas, newlines and doubled quotes
    fx.write_csv(tmp_path / "c.csv", [{"image": "a.png", "caption": c} for c in captions])
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "c.csv", "-o", tmp_path / "c")
    assert rc == 0 and "rejected 0 rows" in out, out
    assert [s["txt"].decode() for s in wds_samples(tmp_path / "c")] == captions

    # TSV (Common Voice, CC3M): no quoting at all, a quote is text
    tsv = "path\tsentence\n" + "".join(f"a.png\t{c}\n" for c in captions[:2])
    (tmp_path / "t.tsv").write_text(tsv)
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "t.tsv", "-o", tmp_path / "t",
                        "--text-column", "sentence")
    assert rc == 0 and "rejected 0 rows" in out, out
    assert [s["txt"].decode() for s in wds_samples(tmp_path / "t")] == captions[:2]

    # a file without a header line: --header names its columns (raw CC3M: caption, url)
    (tmp_path / "raw.tsv").write_text('"Hi," he said.\ta.png\nplain\ta.png\n')
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "raw.tsv", "-o",
                        tmp_path / "raw", "--header", "caption,path")
    assert rc == 0 and "2 samples" in out, out
    assert [s["txt"] for s in wds_samples(tmp_path / "raw")] == [b'"Hi," he said.', b"plain"]


def test_common_voice_tsv_with_mp3_clips(tmp_path, fx, capsys):
    (tmp_path / "clips").mkdir()
    (tmp_path / "clips/cv_1.mp3").write_bytes(encoded_audio("MP3", "MPEG_LAYER_III", 48000))
    (tmp_path / "train.tsv").write_text(
        "client_id\tpath\tsentence\tup_votes\n"
        'abc\tcv_1.mp3\t"Hello," she said.\t2\n')
    rc, out, _ = fx.run(capsys, "build", "audio-text", tmp_path / "train.tsv", "-o",
                        tmp_path / "out", "--media-root", tmp_path / "clips", "--audio-mono",
                        "--audio-sample-rate", "16000")
    assert rc == 0 and "1 samples" in out, out
    [clip] = wds_samples(tmp_path / "out")
    assert clip["txt"] == b'"Hello," she said.'
    assert soundfile.info(io.BytesIO(clip["flac"])).samplerate == 16000  # resampled: lossless
    assert json.loads(clip["json"]) == {"client_id": "abc", "up_votes": "2"}


def test_unclosed_csv_quote_is_reported_not_swallowed(tmp_path, fx, capsys):
    (tmp_path / "a.png").write_bytes(fx.image_bytes(0))
    (tmp_path / "bad.csv").write_text('image,caption\na.png,first\na.png,"never closed\n'
                                      'a.png,third\na.png,fourth\n')
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "bad.csv", "-o", tmp_path / "o")
    assert rc == 0 and "1 samples" in out and "rejected 1 rows (bad_source 1)" in out, out
    [rej] = fx.read_jsonl(tmp_path / "o/rejected.jsonl")
    assert rej["source_row"] == f"{tmp_path / 'bad.csv'}:1"
    assert "line 3" in rej["reason"] and "bad.csv" in rej["reason"]

    # a quote that closes rows later merges them: the field count says so, naming the lines
    (tmp_path / "merged.csv").write_text('image,caption\na.png,"opens\na.png,x\na.png,",z\n'
                                         'a.png,last\n')
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "merged.csv", "-o",
                        tmp_path / "m")
    assert rc == 0 and "1 samples" in out
    [rej] = fx.read_jsonl(tmp_path / "m/rejected.jsonl")
    assert rej["code"] == "bad_row" and "lines 2-4" in rej["reason"]


# ----------------------------------------------------------------------------------- wds tars

def test_wds_uses_every_member_whatever_the_case_format_or_folder(tmp_path, fx, capsys):
    png, jpg = fx.image_bytes(0), fx.image_bytes(1, fmt="JPEG")
    fx.write_tar(tmp_path / "a.tar", [
        ("README", b"no suffix: webdataset skips it"),
        ("001.JPG", jpg), ("001.TXT", b"upper case"),
        ("002.gif", fx.image_bytes(2, fmt="GIF")), ("002.txt", b"a gif"),
        ("003.mp3", encoded_audio("MP3", "MPEG_LAYER_III")), ("003.txt", b"mp3"),
        ("004.ogg", encoded_audio("OGG", "VORBIS")), ("004.txt", b"vorbis"),
        ("005.opus", encoded_audio("OGG", "OPUS", rate=48000)), ("005.txt", b"opus"),
        ("dir/sub/006.png", png), ("dir/sub/006.txt", b"in a folder"),
        ("007.mp4", b"\x00\x00\x00\x18ftypmp42"), ("007.txt", b"a video"),
        ("008.png", png), ("008.Png", png), ("008.txt", b"ambiguous"),  # a repeated suffix
    ])
    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "a.tar", "-o", tmp_path / "out")
    assert rc == 0, out
    samples = {s["__key__"]: s for s in wds_samples(tmp_path / "out")}
    assert list(samples) == ["001", "002", "003", "004", "005", "dir/sub/006"]
    assert samples["001"]["jpg"] == jpg and samples["001"]["txt"] == b"upper case"
    assert "png" in samples["002"]  # GIF: first frame as PNG
    assert samples["003"]["mp3"] and samples["004"]["ogg"] and samples["005"]["opus"]
    assert samples["dir/sub/006"]["png"] == png  # webdataset's key: folder included
    video, repeated = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    assert video["code"] == "unsupported_format" and "007.mp4" in video["reason"]
    # webdataset (and so the loader) refuses a repeated suffix; the rest of that tar is not read
    assert repeated["code"] == "bad_source" and "008.Png: duplicate" in repeated["reason"]
    # the audio pairs as LAION tools read them
    audio = list(wds.WebDataset([str(tmp_path / "out/shard-000000.tar")], shardshuffle=False)
                 .select(lambda s: any(k in s for k in ("mp3", "ogg", "opus")))
                 .to_tuple("mp3;ogg;opus", "txt"))
    assert [t for _, t in audio] == [b"mp3", b"vorbis", b"opus"]


def test_text_field_reads_text_inside_the_json_member(tmp_path, fx, capsys):
    flac = fx.audio_bytes(0, fmt="FLAC")
    fx.write_tar(tmp_path / "a.tar", [
        ("k1.flac", flac), ("k1.json", json.dumps({"text": ["a dog barks"], "tag": 1}).encode()),
        ("k2.flac", flac), ("k2.json", json.dumps({"text": "rain"}).encode()),
        ("k3.flac", flac), ("k3.json", json.dumps({"other": "x"}).encode())])
    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "a.tar", "-o", tmp_path / "no")
    assert rc == 0 and "0 samples" in out
    reasons = [r["reason"] for r in fx.read_jsonl(tmp_path / "no/rejected.jsonl")]
    assert "pass --text-field text" in reasons[0]

    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "a.tar", "-o", tmp_path / "out",
                        "--text-field", "text")
    assert rc == 0 and "2 samples" in out
    k1, k2 = wds_samples(tmp_path / "out")
    assert k1["txt"] == b"a dog barks" and k1["flac"] == flac
    assert json.loads(k1["json"]) == {"text": ["a dog barks"], "tag": 1}  # metadata kept
    assert k2["txt"] == b"rain"
    [rej] = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    assert rej["code"] == "empty_text" and "'text'" in rej["reason"]

    fx.write_tar(tmp_path / "b.tar", [("n.jpg", fx.image_bytes(0, fmt="JPEG")),
                                      ("n.json", json.dumps({"caption": {"en": "hi"}}).encode())])
    rc, out, _ = fx.run(capsys, "build", "wds", tmp_path / "b.tar", "-o", tmp_path / "nested",
                        "--text-field", "caption.en")
    assert rc == 0 and wds_samples(tmp_path / "nested")[0]["txt"] == b"hi"


# ---------------------------------------------------------------------------------- MMC4

def mmc4_row(names: list[str], field: str = "image_name") -> dict:
    return {"url": "http://page", "text_list": ["First.", "Second.", "Third."],
            "image_info": [{field: names[0], "matched_text_index": 2, "matched_sim": 0.3},
                           {field: names[1], "matched_text_index": 0, "matched_sim": 0.2}],
            "similarity_matrix": [[0.1, 0.2, 0.3]]}


def test_mmc4_images_go_before_their_matched_sentence(tmp_path, fx, capsys):
    (tmp_path / "img").mkdir()
    (tmp_path / "img/a.jpg").write_bytes(fx.image_bytes(0, fmt="JPEG"))
    (tmp_path / "img/b.png").write_bytes(fx.image_bytes(1))
    fx.write_jsonl(tmp_path / "docs.jsonl", [mmc4_row(["a.jpg", "b.png"]),
                                             mmc4_row(["a.jpg", "missing.jpg"])])
    rc, out, _ = fx.run(capsys, "build", "mmc4", tmp_path / "docs.jsonl", "-o", tmp_path / "out",
                        "--media-root", tmp_path / "img")
    assert rc == 0 and "1 samples" in out, out
    [doc] = wds_samples(tmp_path / "out")
    meta = json.loads(doc["json"])
    assert meta["segments"] == [
        {"type": "image", "member": "0.png"}, {"type": "text", "text": "First. "},
        {"type": "text", "text": "Second. "}, {"type": "image", "member": "1.jpg"},
        {"type": "text", "text": "Third."}]
    assert doc["1.jpg"] == (tmp_path / "img/a.jpg").read_bytes()
    assert meta["meta"]["url"] == "http://page"
    assert fx.read_jsonl(tmp_path / "out/rejected.jsonl")[0]["code"] == "missing_media"


# ---------------------------------------------------------------------------------- limits

def test_text_longer_than_the_limit_is_rejected(tmp_path, fx, capsys):
    fx.write_jsonl(tmp_path / "t.jsonl", [{"text": "x" * 5000}, {"text": "short"}])
    rc, out, _ = fx.run(capsys, "build", "text", tmp_path / "t.jsonl", "-o", tmp_path / "out",
                        "--max-text-chars", "1000")
    assert rc == 0 and "1 samples" in out and "text_too_long 1" in out
    [rej] = fx.read_jsonl(tmp_path / "out/rejected.jsonl")
    assert "5000 text characters > --max-text-chars=1000" in rej["reason"]


def test_text_limit_is_checked_before_media_are_decoded(tmp_path, fx, capsys):
    (tmp_path / "noise.png").write_bytes(b"\x89PNG not an image")
    fx.write_jsonl(tmp_path / "t.jsonl", [{"image": "noise.png", "caption": "y" * 50}])
    rc, out, _ = fx.run(capsys, "build", "image-text", tmp_path / "t.jsonl", "-o",
                        tmp_path / "out", "--max-text-chars", "10")
    assert rc == 0 and "text_too_long 1" in out


def test_audio_format_libsndfile_cannot_decode_is_rejected_with_a_reason(monkeypatch):
    from data_tools import media
    from data_tools.errors import Rejected

    mp3 = encoded_audio("MP3", "MPEG_LAYER_III")
    monkeypatch.setattr(soundfile, "available_formats", lambda: {"WAV": "", "FLAC": ""})

    def old_libsndfile(*args, **kwargs):
        raise soundfile.LibsndfileError(1, "Format not recognised.")

    monkeypatch.setattr(soundfile, "info", old_libsndfile)
    with pytest.raises(Rejected, match=r"MP3, which this libsndfile .* cannot decode") as e:
        media.prepare_audio(mp3, media.MediaOptions())
    assert e.value.code == "unsupported_format"


def test_audio_is_cropped_before_it_is_resampled(tmp_path, fx, monkeypatch):
    from data_tools import media
    from mmtrain.data import decode
    from mmtrain.data.config import MediaSpec

    long = fx.audio_bytes(0, seconds=20.0, rate=44100, fmt="FLAC")
    reads: list[int] = []
    real_read = soundfile.SoundFile.read

    def spy(self, frames=-1, **kw):
        out = real_read(self, frames, **kw)
        reads.append(len(out))
        return out

    monkeypatch.setattr(soundfile.SoundFile, "read", spy)
    opts = media.MediaOptions(audio_max_seconds=1.0, audio_sample_rate=16000)
    data, ext = media.prepare_audio(long, opts)
    assert reads == [44100] and ext == "flac"  # 1 s of 20 s decoded
    assert soundfile.info(io.BytesIO(data)).frames == 16000

    spec = MediaSpec(image_size=32, patch_size=8, audio_seconds=1.0, n_mels=16,
                     audio_frames_per_token=4)
    reads.clear()
    tokens = decode.decode_audio(long, spec)
    assert len(reads) == 1 and reads[0] < 1.1 * 44100  # only what the clip needs
    monkeypatch.setattr(decode, "_source_frames", lambda need, rate, target: -1)
    assert np.array_equal(tokens, decode.decode_audio(long, spec))  # same as decoding it all


def test_manifest_counts_pairs_in_the_standard_layout(tmp_path, fx, capsys):
    rows = fx.image_table(tmp_path, 2)
    fx.write_parquet(tmp_path / "p.parquet", rows)
    rc, _, _ = fx.run(capsys, "build", "image-text", tmp_path / "p.parquet", "-o", tmp_path / "o")
    assert rc == 0
    manifest = pq.read_table(tmp_path / "o/manifest.parquet").to_pylist()
    assert [(r["n_images"], r["modalities"]) for r in manifest] == [(1, ["image", "text"])] * 2
    rc, out, _ = fx.run(capsys, "verify", tmp_path / "o")
    assert rc == 0 and "0 problems" in out


@pytest.mark.parametrize("members, problem", [
    ({"png": b"x", "jpg": b"y", "txt": b"t"}, "without a KEY.json segment list"),
    ({"0.png": b"x", "txt": b"t"}, "without a KEY.json segment list"),
    ({"png": b"x", "PNG": b"y"}, "differ only in case"),
    ({"json": b'{"schema": 1, "segments": [{"type": "text", "text": "a"}]}', "0.png": b"x"},
     r"\['0.png'\] are not in KEY.json's segments"),
    ({"json": b'{"schema": 1, "segments": [{"type": "text", "text": "a"}]}', "txt": b"b"},
     "a KEY.txt next to a KEY.json segment list"),
])
def test_parser_refuses_media_it_would_not_use(members, problem):
    from mmtrain.data.schema import SampleError, parse_sample

    with pytest.raises(SampleError, match=problem):
        parse_sample("k", members)


def test_parser_reads_both_layouts_case_insensitively():
    from mmtrain.data.schema import Segment, encode_sample, parse_sample

    pair = encode_sample([Segment("image", data=b"img", member="PNG"), Segment("text", "cap")],
                         source="x", meta={"url": "u"})
    assert sorted(pair) == ["json", "png", "txt"]
    doc = parse_sample("k", {k.upper(): v for k, v in pair.items()})
    assert [(s.type, s.data or s.text) for s in doc.segments] == [("image", b"img"),
                                                                   ("text", "cap")]
    text_first = encode_sample([Segment("text", "see:"), Segment("image", data=b"i", member="jpg")],
                               source="x")
    assert sorted(text_first) == ["0.jpg", "json"]
    assert [s.type for s in parse_sample("k", text_first).segments] == ["text", "image"]
