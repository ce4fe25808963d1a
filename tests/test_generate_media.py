"""`mmtrain generate --image-out / --audio-out`: media codes sampled with the KV cache equal the
full recomputation (with and without classifier-free guidance), stay in their code range, decode
to a PNG / WAV, are seeded; wrong tokenizers and models without codes are refused; text never
emits code ids; and the CLI writes the files from a (fake, ZeRO-0 layout) run directory.

A tiny random model (dim 64, 2 layers, 1000 image + 1000 audio codes, init_std 0.2 so that greedy
decoding is not one code repeated) and untrained media tokenizers. fp32 on CPU.
"""

import copy
import io
import json

import numpy as np
import pytest
import soundfile
import torch
from PIL import Image

from mmtrain import generate as g
from mmtrain.config import RunConfig, save_config
from mmtrain.data.config import DataConfig
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.fileio import sha256_file
from mmtrain.media_tokenizers import build_tokenizer, load_tokenizer, save_tokenizer
from mmtrain.model import FusionTransformer, ModelConfig

PROMPTS = ["a red circle left of a blue square.", "", "noise"]


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, image_codes=1000, audio_codes=1000,
                init_std=0.2, max_seq_len=128)
    return ModelConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return FusionTransformer(tiny_cfg()).eval()


@pytest.fixture(scope="module")
def tok():
    return ByteTokenizer()


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("media_tokenizers")
    torch.manual_seed(1)
    for kind in ("image", "audio"):
        save_tokenizer(build_tokenizer(kind), root / kind)
    return {kind: root / kind for kind in ("image", "audio")}


@pytest.fixture(scope="module")
def media_toks(tokenizer_dirs):
    return {kind: load_tokenizer(d, kind=kind) for kind, d in tokenizer_dirs.items()}


def codes_of(model, tok, media_tok, kind, **kw):
    return g.generate_media(model, tok, media_tok, kind, PROMPTS, **kw)


@pytest.mark.parametrize("kind,shape", [("image", (4, 4)), ("audio", (25,))])
def test_codes_have_the_tokenizer_shape_and_stay_in_range(model, tok, media_toks, kind, shape):
    for kw in (dict(), dict(sampling=g.Sampling(temperature=1.0, seed=3), cfg_scale=3.0)):
        codes = codes_of(model, tok, media_toks[kind], kind, **kw)
        assert len(codes) == len(PROMPTS)
        for c in codes:
            assert c.shape == shape and c.dtype == np.int64
            assert c.min() >= 0 and c.max() < 1000
        assert len(np.unique(codes[0])) > 5  # not one code repeated


@pytest.mark.parametrize("kind,cfg_scale,n_prompts", [("image", 1.0, 1), ("audio", 1.0, 2),
                                                     ("audio", 3.0, 2)])
def test_cached_greedy_codes_equal_full_recomputation(model, tok, media_toks, kind, cfg_scale,
                                                      n_prompts):
    """Greedy, the prompts in one cached batch (with guidance: 2 rows per prompt) vs each prompt
    alone, recomputing the whole conditional (and unconditional) sequence per code. (The
    reference is slow on CPU: few prompts, mostly audio's 25 codes.)"""
    kw = dict(sampling=g.Sampling(), cfg_scale=cfg_scale)
    prompts = PROMPTS[:n_prompts]
    cached = g.generate_media(model, tok, media_toks[kind], kind, prompts, **kw)
    full = g.generate_media(model, tok, media_toks[kind], kind, prompts, kv_cache=False, **kw)
    for a, b in zip(cached, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_sampled_codes_with_guidance_equal_full_recomputation(model, tok, media_toks):
    kw = dict(sampling=g.Sampling(temperature=0.9, top_k=50, seed=4), cfg_scale=2.0)
    cached = g.generate_media(model, tok, media_toks["audio"], "audio", PROMPTS[:2], **kw)
    full = g.generate_media(model, tok, media_toks["audio"], "audio", PROMPTS[:2], kv_cache=False,
                            **kw)
    for a, b in zip(cached, full, strict=True):
        np.testing.assert_array_equal(a, b)


def test_guidance_changes_the_codes_and_scale_1_is_no_guidance(model, tok, media_toks):
    audio = media_toks["audio"]
    plain = codes_of(model, tok, audio, "audio")
    guided = codes_of(model, tok, audio, "audio", cfg_scale=3.0)
    assert any((a != b).any() for a, b in zip(plain, guided))
    # Scale 1 with the unconditional rows actually run (the reference's inner decode) gives the
    # codes of no guidance at all.
    cond = [g.media_prompt_ids(tok, "audio", t) for t in PROMPTS[:2]]
    both = g._media_full(model, tok, cond, g.media_prompt_ids(tok, "audio", ""), 1.0, 25,
                         model.cfg.code_range("audio"), g.Sampling())
    for a, b in zip(plain[:2], both, strict=True):
        np.testing.assert_array_equal(a, b)
    # Scale 0 is the unconditional prompt alone: every prompt gets the same clip, the one the
    # empty prompt gets without guidance.
    uncond = codes_of(model, tok, audio, "audio", cfg_scale=0.0)
    np.testing.assert_array_equal(uncond[0], uncond[2])
    np.testing.assert_array_equal(uncond[1], plain[1])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_the_gpu_cached_codes_equal_full_recomputation_and_decode(model, tok, tokenizer_dirs):
    """The same checks with the model and the tokenizers on the GPU (fp32)."""
    gpu = copy.deepcopy(model).cuda()
    for kind, cfg_scale in (("image", 1.0), ("audio", 3.0)):
        media_tok = load_tokenizer(tokenizer_dirs[kind], kind=kind, device="cuda")
        kw = dict(sampling=g.Sampling(), cfg_scale=cfg_scale)
        cached = g.generate_media(gpu, tok, media_tok, kind, PROMPTS[:2], **kw)
        full = g.generate_media(gpu, tok, media_tok, kind, PROMPTS[:2], kv_cache=False, **kw)
        for a, b in zip(cached, full, strict=True):
            np.testing.assert_array_equal(a, b)
        assert len(g.media_bytes(media_tok, cached)) == 2


def test_prompt_layout_is_the_training_one(tok):
    assert g.media_prompt_ids(tok, "image", "ab") == [tok.bos, 97, 98, tok.image_begin]
    assert g.media_prompt_ids(tok, "audio", "") == [tok.bos, tok.audio_begin]


def test_seeds_reproduce_and_differ(model, tok, media_toks):
    def run(seed):
        return codes_of(model, tok, media_toks["image"], "image",
                        sampling=g.Sampling(temperature=1.0, top_k=100, seed=seed), cfg_scale=2.0)

    a, b, c = run(7), run(7), run(8)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, c))
    # A prompt's codes do not depend on the other prompts of the batch.
    alone = g.generate_media(model, tok, media_toks["image"], "image", PROMPTS[2:],
                             sampling=g.Sampling(temperature=1.0, top_k=100, seed=7), cfg_scale=2.0)
    np.testing.assert_array_equal(alone[0], a[2])


def test_png_and_wav_decode(model, tok, media_toks):
    image_codes = codes_of(model, tok, media_toks["image"], "image")[:2]
    pngs = g.media_bytes(media_toks["image"], image_codes)
    assert len(pngs) == 2
    for data in pngs:
        im = Image.open(io.BytesIO(data))
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (32, 32)
    audio_codes = codes_of(model, tok, media_toks["audio"], "audio")[:1]
    (wav,) = g.media_bytes(media_toks["audio"], audio_codes)  # Griffin-Lim, 32 iterations
    wave, rate = soundfile.read(io.BytesIO(wav))
    assert rate == 16000 and wave.ndim == 1 and len(wave) == 16000


def test_models_without_codes_and_wrong_tokenizers_are_refused(tok, media_toks, tokenizer_dirs):
    no_images = FusionTransformer(tiny_cfg(image_codes=0)).eval()
    with pytest.raises(ValueError,
                       match=r"trained without image generation \(model.image_codes=0\)"):
        g.generate_media(no_images, tok, media_toks["image"], "image", ["x"])
    other_size = tiny_cfg(audio_codes=512)
    with pytest.raises(ValueError, match=r"has 1000 codes; the model was trained with "
                                         r"model.audio_codes=512"):
        g.check_media_model(other_size, "audio", media_toks["audio"])
    with pytest.raises(ValueError, match="cannot decode image codes"):
        g.check_media_model(tiny_cfg(), "image", media_toks["audio"])
    with pytest.raises(ValueError, match="--cfg"):
        g.generate_media(no_images, tok, media_toks["audio"], "audio", ["x"], cfg_scale=-1.0)

    fingerprint = media_toks["image"].fingerprint
    image_dir = str(tokenizer_dirs["image"])
    load = dict(model_cfg=tiny_cfg(), where="CKPT/loader/rank_0.json")
    mt, warning = g.load_media_tokenizer("image", image_dir, recorded={"image": fingerprint},
                                         **load)
    assert mt.fingerprint == fingerprint and warning is None
    with pytest.raises(ValueError, match=f"has fingerprint {fingerprint}, but the checkpoint was "
                                         f"trained with 0123abcd"):
        g.load_media_tokenizer("image", image_dir, recorded={"image": "0123abcd"}, **load)
    _, warning = g.load_media_tokenizer("image", image_dir, recorded=None, **load)
    assert "records no image tokenizer fingerprint" in warning
    with pytest.raises(ValueError, match="holds the audio tokenizer, not image"):
        g.load_media_tokenizer("image", str(tokenizer_dirs["audio"]), recorded=None, **load)
    with pytest.raises(ValueError, match="no such directory"):
        g.load_media_tokenizer("image", image_dir + "-missing", recorded=None, **load)


def test_text_generation_never_emits_code_ids(tok):
    """A model whose output head favours the code rows: text decoding still picks text ids."""
    torch.manual_seed(0)
    m = FusionTransformer(tiny_cfg()).eval()
    with torch.no_grad():
        m.tok_embeddings.weight[tok.vocab_size:] *= 50  # tied head: code logits dominate
    banned = g.banned_ids(tok, m.cfg.total_vocab)
    assert set(range(tok.vocab_size, m.cfg.total_vocab)) <= set(banned.tolist())
    doc = g.prompt_document("hello", None, None)
    for kw in (dict(temperature=0, seed=0), dict(temperature=2.0, seed=1)):
        out = g.generate(m, tok, doc, max_new_tokens=20, **kw)
        assert out and max(out) < 256  # bytes only (specials other than <eos> are banned too)


def test_output_paths(tmp_path):
    p = g.media_output_paths
    assert p("out/x.png", "image", 1, numbered=False) == [tmp_path.__class__("out/x.png")]
    assert [str(x) for x in p("out/img.png", "image", 3, numbered=True)] == \
        ["out/img-001.png", "out/img-002.png", "out/img-003.png"]
    assert str(p("o/y.WAV", "audio", 1000, numbered=True)[-1]) == "o/y-1000.wav"
    assert [str(x) for x in p(str(tmp_path), "image", 2, numbered=True)] == \
        [f"{tmp_path}/image-001.png", f"{tmp_path}/image-002.png"]
    assert str(p("new/", "audio", 1, numbered=False)[0]) == "new/audio.wav"
    with pytest.raises(ValueError, match="--image-out x.jpg: must name a .png file"):
        p("x.jpg", "image", 1, numbered=False)


def fake_run(root, model, tokenizer_dirs, recorded):
    """A run directory holding one committed ZeRO-0 checkpoint of `model` (what
    load_checkpoint_model reads: config.json, mp_rank_00_model_states.pt, loader/rank_0.json,
    MANIFEST.json with their sha256, COMMITTED, checkpoints/latest)."""
    cfg = RunConfig(model=model.cfg, data=DataConfig(image_tokenizer=str(tokenizer_dirs["image"]),
                                                     audio_tokenizer=str(tokenizer_dirs["audio"]),
                                                     seq_len=128))
    ckpt = root / "checkpoints" / "step_00000001"
    (ckpt / "loader").mkdir(parents=True)
    save_config(cfg, ckpt / "config.json")
    torch.save({"module": model.state_dict()}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / "loader" / "rank_0.json").write_text(json.dumps({"media_tokenizers": recorded}))
    files = {rel: sha256_file(ckpt / rel) for rel in
             ("config.json", "mp_rank_00_model_states.pt", "loader/rank_0.json")}
    (ckpt / "MANIFEST.json").write_text(json.dumps({"step": 1, "world_size": 1, "files": files}))
    (ckpt / "COMMITTED").write_text("1\n")
    (root / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    return root


def printed_paths(capsys) -> list[str]:
    """The command's output lines, without DeepSpeed's import-time log lines ("[date] …")."""
    return [line for line in capsys.readouterr().out.splitlines() if not line.startswith("[")]


def test_cli_writes_png_and_wav_files(model, media_toks, tokenizer_dirs, tmp_path, capsys):
    recorded = {kind: t.fingerprint for kind, t in media_toks.items()}
    run = fake_run(tmp_path / "run", model, tokenizer_dirs, recorded)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle left of a blue square.\na dog barking\n")
    out = tmp_path / "out"
    assert g.main([str(run), "--prompts-file", str(prompts), "--image-out", f"{out}/img.png",
                   "--cfg", "2", "--temperature", "0.8", "--seed", "1", "--device", "cpu"]) == 0
    written = printed_paths(capsys)
    assert written == [f"{out}/img-001.png", f"{out}/img-002.png"]
    assert Image.open(written[0]).size == (32, 32)
    # The same seed and prompt through the API give the same image.
    codes = g.generate_media(model, ByteTokenizer(), media_toks["image"], "image",
                             ["a dog barking"], sampling=g.Sampling(temperature=0.8, seed=1),
                             cfg_scale=2.0)
    assert (out / "img-002.png").read_bytes() == g.media_bytes(media_toks["image"], codes)[0]

    # A checkpoint that recorded another image tokenizer is refused, naming both fingerprints.
    bad = fake_run(tmp_path / "bad", model, tokenizer_dirs, {**recorded, "image": "f00d"})
    with pytest.raises(ValueError, match=f"fingerprint {recorded['image']}, but the checkpoint "
                                         "was trained with f00d"):
        g.main([str(bad), "--prompt", "x", "--image-out", str(tmp_path / "b.png")])
    # --audio-out only needs the audio tokenizer, whose fingerprint matches; a directory
    # (ending in /) gets audio.wav.
    assert g.main([str(bad), "--prompt", "x", "--audio-out", f"{tmp_path}/snd/"]) == 0
    assert printed_paths(capsys) == [f"{tmp_path}/snd/audio.wav"]
    wave, rate = soundfile.read(tmp_path / "snd" / "audio.wav")
    assert rate == 16000 and len(wave) == 16000


def test_cli_media_errors_before_loading(tmp_path):
    with pytest.raises(ValueError, match="must name a .png file"):
        g.main([str(tmp_path), "--prompt", "a", "--image-out", "x.jpg"])
    with pytest.raises(ValueError, match="cannot be combined"):
        g.main([str(tmp_path), "--prompt", "a", "--image", "a.png", "--image-out", "x.png"])
    with pytest.raises(ValueError, match="--cfg"):
        g.main([str(tmp_path), "--prompt", "a", "--image-out", "x.png", "--cfg", "nan"])
