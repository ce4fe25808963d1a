"""Media codes in the sequence (issue 15): which items are generated, how they are laid out,
where their codes come from, the weighted loss, resume checks and the generation-gain sets."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
import torch

from mmtrain.data.batch import collate_rows
from mmtrain.data.config import DataConfig
from mmtrain.data.loader import ShardLoader, generation_eval_batches
from mmtrain.data.media_codes import GENERATE, GENERATE_UNCONDITIONAL, INPUT, MediaCodes
from mmtrain.data.packing import Packer, tokenize_document
from mmtrain.data.schema import CODES_SUFFIX, Document, Segment, parse_sample
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.media_tokenizers import build_tokenizer, codes_to_npy, save_tokenizer
from mmtrain.model import FusionTransformer, ModelConfig

MODEL = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, image_codes=1000, audio_codes=1000)
SPEC = MODEL.media()
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """Untrained (seeded) image and audio tokenizers saved as files: the layout does not care
    what the codes mean."""
    root = tmp_path_factory.mktemp("media_tok")
    for kind in ("image", "audio"):
        torch.manual_seed(0)
        save_tokenizer(build_tokenizer(kind), root / kind)
    return root


def data_cfg(corpus, tokenizers, **kw) -> DataConfig:
    values = dict(train=str(corpus / "train"), val=str(corpus / "val"), seq_len=256,
                  micro_batch_size=2, num_streams=4, num_workers=0,
                  image_tokenizer=str(tokenizers / "image"), audio_tokenizer=str(tokenizers / "audio"))
    return DataConfig(**{**values, **kw})


def png(colour=(200, 30, 30)) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), colour).save(buf, format="PNG")
    return buf.getvalue()


def pair(text="a red square.") -> Document:
    return Document(key="k", segments=[Segment(type="image", data=png(), member="png"),
                                       Segment(type="text", text=text)])


def test_a_generated_item_follows_its_caption_as_begin_codes_end(demo_corpus, tokenizers):
    codes = MediaCodes(data_cfg(demo_corpus, tokenizers), SPEC)
    first, stop = MODEL.code_range("image")
    as_input = tokenize_document(pair(), TOK, SPEC, max_image_pixels=10**6, codes=codes,
                                 decisions=[INPUT, INPUT])
    generated = tokenize_document(pair(), TOK, SPEC, max_image_pixels=10**6, codes=codes,
                                  decisions=[GENERATE, INPUT])
    caption = TOK.encode("a red square.")
    assert as_input.tokens[1] == TOK.image_begin and as_input.media  # continuous input, unchanged
    ids = generated.tokens.tolist()
    assert ids[:1 + len(caption)] == [TOK.bos] + caption
    span = ids[1 + len(caption):]
    assert span[0] == TOK.image_begin and span[17] == TOK.image_end and span[18:] == [TOK.eos]
    assert all(first <= i < stop for i in span[1:17]) and not generated.media
    assert not generated.caption.any()  # a caption before its item is no media-gain caption
    assert generated.code_spans == [(1 + len(caption), 1 + len(caption) + 17)]
    unconditional = tokenize_document(pair(), TOK, SPEC, max_image_pixels=10**6, codes=codes,
                                      decisions=[GENERATE_UNCONDITIONAL, INPUT])
    assert unconditional.tokens.tolist() == [TOK.bos] + span  # caption dropped, same codes


def test_choices_are_a_pure_function_of_seed_key_and_index_at_the_configured_rates(demo_corpus,
                                                                                   tokenizers):
    cfg = data_cfg(demo_corpus, tokenizers, generation_fraction=0.5, caption_dropout=0.2)
    codes = MediaCodes(cfg, SPEC)
    picks = [codes.decisions(f"key-{i}", ["image", "text", "audio"]) for i in range(4000)]
    assert picks == [MediaCodes(cfg, SPEC).decisions(f"key-{i}", ["image", "text", "audio"])
                     for i in range(4000)]
    assert all(p[1] == INPUT for p in picks)  # text is never generated
    media = [d for p in picks for d in (p[0], p[2])]
    generated = sum(d != INPUT for d in media) / len(media)
    dropped = sum(d == GENERATE_UNCONDITIONAL for d in media) / max(1, sum(d != INPUT for d in media))
    assert abs(generated - 0.5) < 0.03 and abs(dropped - 0.2) < 0.03
    other_seed = MediaCodes(dataclasses.replace(cfg, seed=1), SPEC)
    assert [other_seed.decisions(f"key-{i}", ["image"]) for i in range(200)] != \
        [[p[0]] for p in picks[:200]]
    only_audio = MediaCodes(dataclasses.replace(cfg, image_tokenizer=""), SPEC)
    assert all(only_audio.decisions(f"key-{i}", ["image"]) == [INPUT] for i in range(200))


def test_packing_never_cuts_a_code_span(demo_corpus, tokenizers):
    codes = MediaCodes(data_cfg(demo_corpus, tokenizers), SPEC)
    doc = tokenize_document(pair("x" * 40), TOK, SPEC, max_image_pixels=10**6, codes=codes,
                            decisions=[GENERATE, INPUT])
    assert len(doc) == 1 + 40 + 18 + 1
    packer = Packer(50, pad_id=TOK.pad, placeholder_ids=(TOK.image, TOK.audio))
    packer.add(doc)
    packer.flush()
    first, second = packer.rows()  # the cut moved back to the span's <image_begin>
    assert first.real_tokens == 41 and TOK.image_begin not in first.tokens
    assert second.tokens[0] == TOK.image_begin and second.tokens[17] == TOK.image_end


def test_mismatched_codebook_and_missing_stored_codes_are_refused(demo_corpus, tokenizers):
    small = dataclasses.replace(MODEL, image_codes=512).media()
    with pytest.raises(ValueError, match="model.image_codes=512"):
        MediaCodes(data_cfg(demo_corpus, tokenizers), small)
    stored = MediaCodes(data_cfg(demo_corpus, tokenizers, codes="stored"), SPEC)
    with pytest.raises(ValueError, match="data.codes=stored"):
        stored.stored_kinds({})


def test_stored_codes_are_used_when_the_fingerprint_matches_and_equal_on_the_fly(demo_corpus,
                                                                                 tokenizers):
    codes = MediaCodes(data_cfg(demo_corpus, tokenizers), SPEC)
    on_the_fly = codes.encode("image", png())
    members = {"png": png(), "txt": b"a red square.",
               "png" + CODES_SUFFIX: codes_to_npy(on_the_fly.reshape(4, 4))}
    doc = parse_sample("k", members)
    recorded = {"media_codes": {"image": {"fingerprint": codes.fingerprints["image"]}}}
    assert codes.stored_kinds(recorded) == {"image"}
    assert codes.stored_kinds({"media_codes": {"image": {"fingerprint": "other"}}}) == frozenset()
    a = tokenize_document(doc, TOK, SPEC, max_image_pixels=10**6, codes=codes,
                          decisions=[GENERATE, INPUT], use_stored=frozenset({"image"}))
    b = tokenize_document(doc, TOK, SPEC, max_image_pixels=10**6, codes=codes,
                          decisions=[GENERATE, INPUT])
    assert a.tokens.tolist() == b.tokens.tolist()
    # A stored member that is not what the tokenizer makes is a bad sample, not a crash.
    members["png" + CODES_SUFFIX] = codes_to_npy(np.full(10, 3))
    from mmtrain.data.schema import SampleError

    with pytest.raises(SampleError, match="image codes member"):
        tokenize_document(parse_sample("k", members), TOK, SPEC, max_image_pixels=10**6,
                          codes=codes, decisions=[GENERATE, INPUT], use_stored=frozenset({"image"}))
    # data.codes=stored: an item without its codes member is a bad sample, never encoded quietly.
    del members["png" + CODES_SUFFIX]
    strict = MediaCodes(data_cfg(demo_corpus, tokenizers, codes="stored"), SPEC)
    with pytest.raises(SampleError, match="no codes member"):
        tokenize_document(parse_sample("k", members), TOK, SPEC, max_image_pixels=10**6,
                          codes=strict, decisions=[GENERATE, INPUT], use_stored=frozenset({"image"}))


def test_an_items_codes_do_not_depend_on_the_batch_it_is_encoded_in(demo_corpus, tokenizers):
    """tokenize-media encodes in batches, the loader one item at a time: same codes."""
    from data_tools.synth import make_audio, make_image
    import random

    from mmtrain.media_tokenizers import load_tokenizer

    for kind, make in (("image", make_image), ("audio", make_audio)):
        tok = load_tokenizer(tokenizers / kind, kind=kind)
        x = torch.from_numpy(np.stack([tok.input_from_bytes(make(random.Random(i))[0])
                                       for i in range(48)]))
        alone = torch.cat([tok.encode(x[i:i + 1]) for i in range(len(x))])
        assert torch.equal(alone, tok.encode(x)) and torch.equal(alone, torch.cat(
            [tok.encode(x[i:i + 5]) for i in range(0, len(x), 5)]))


def test_code_targets_weigh_code_loss_weight_in_the_loss(demo_corpus, tokenizers):
    codes = MediaCodes(data_cfg(demo_corpus, tokenizers), SPEC)
    docs = [tokenize_document(pair(t), TOK, SPEC, max_image_pixels=10**6, codes=codes,
                              decisions=[d, INPUT])
            for t, d in (("a red square.", GENERATE), ("a blue circle.", INPUT))]
    packer = Packer(256, pad_id=TOK.pad, placeholder_ids=(TOK.image, TOK.audio))
    for doc in docs:
        packer.add(doc)
    packer.flush()
    batch = collate_rows(list(packer.rows()), SPEC, image_token=TOK.image, audio_token=TOK.audio)
    assert batch.counts["code_targets"] == 16  # the 4x4 codes (<image_end> is a text id)
    torch.manual_seed(0)
    model = FusionTransformer(dataclasses.replace(MODEL, code_loss_weight=3.0))
    per_token = model.token_losses(batch).reshape(-1)
    targets = batch.targets.reshape(-1)
    weights = torch.where(targets >= MODEL.vocab_size, 3.0, 1.0) * (targets != -100)
    expected = (per_token * weights).sum() / weights.sum()
    torch.testing.assert_close(model(batch), expected, rtol=1e-5, atol=1e-6)


def test_the_loader_state_records_the_tokenizers_and_refuses_other_ones(demo_corpus, tokenizers,
                                                                        tmp_path):
    cfg = data_cfg(demo_corpus, tokenizers)
    loader = ShardLoader(cfg, spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
    batch = loader.next_batch()
    assert batch.counts["code_targets"] > 0
    state = loader.state_dict()
    loader.close()
    assert set(state["media_tokenizers"]) == {"image", "audio"}
    torch.manual_seed(1)
    save_tokenizer(build_tokenizer("image"), tmp_path / "image")
    other = ShardLoader(dataclasses.replace(cfg, image_tokenizer=str(tmp_path / "image")),
                        spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
    with pytest.raises(ValueError, match="media tokenizers changed"):
        other.load_state_dict([state])


def test_generation_gain_sets_hold_the_same_codes_with_other_captions(demo_corpus, tokenizers):
    cfg = data_cfg(demo_corpus, tokenizers)
    sets = generation_eval_batches(cfg.val, cfg, spec=SPEC, tokenizer=TOK, rank=0, world_size=1,
                                   items_per_kind=6, codes=MediaCodes(cfg, SPEC))
    assert set(sets) == {"image", "audio"}
    for kind, (true, shuffled) in sets.items():
        first, stop = MODEL.code_range(kind)

        def code_targets(batches):
            return [t for b in batches for t in b.targets[(b.targets >= first) & (b.targets < stop)]
                    .tolist()]

        assert len(code_targets(true)) == 6 * (16 if kind == "image" else 25)
        assert code_targets(true) == code_targets(shuffled)
        texts = [TOK.decode(b.tokens[r].tolist()) for b in true for r in range(b.num_rows)]
        shuffled_texts = [TOK.decode(b.tokens[r].tolist()) for b in shuffled
                          for r in range(b.num_rows)]
        assert texts != shuffled_texts


def test_stored_codes_from_tokenize_media_give_the_batches_of_on_the_fly_codes(demo_corpus,
                                                                               tokenizers, tmp_path):
    from data_tools.media_tokenizer import tokenize_media

    coded = tmp_path / "coded"
    tokenize_media(str(demo_corpus / "train"), [str(tokenizers / "image"), str(tokenizers / "audio")],
                   str(coded))
    stored = data_cfg(demo_corpus, tokenizers, train=str(coded), codes="stored",
                      generation_fraction=1.0)
    on_the_fly = dataclasses.replace(stored, codes="encode")
    loaders = [ShardLoader(c, spec=SPEC, tokenizer=TOK, rank=0, world_size=1)
               for c in (stored, on_the_fly)]
    assert loaders[0].plan.stored_codes == [frozenset({"image", "audio"})]
    assert loaders[1].plan.stored_codes == [frozenset()]
    for _ in range(3):
        a, b = (loader.next_batch() for loader in loaders)
        assert a.counts["code_targets"] > 0
        assert torch.equal(a.tokens, b.tokens) and torch.equal(a.targets, b.targets)
    for loader in loaders:
        loader.close()


def test_a_missing_or_misfit_tokenizer_stops_mmtrain_train_before_any_rank_starts(demo_corpus,
                                                                                    tokenizers,
                                                                                    tmp_path):
    import subprocess
    import sys

    from tests.conftest import cli_env, tiny_train_cmd

    for settings, message in (
            ({"data.image_tokenizer": tmp_path / "nowhere", "model.image_codes": 1000,
              "data.synth_if_missing": "false"},  # the demo would train it: not here
             "config.json is missing"),
            ({"data.image_tokenizer": tokenizers / "image", "model.image_codes": 512},
             "set model.image_codes=1000")):
        cmd = tiny_train_cmd(demo_corpus, tmp_path / "runs", "bad", settings)
        proc = subprocess.run(cmd, env=cli_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
        assert not (tmp_path / "runs" / "bad" / "logs").exists()  # no rank started
