import numpy as np
import torch

from mmtrain.data.config import DataConfig
from mmtrain.data.loader import ShardLoader
from mmtrain.data.packing import IGNORE, Packer, TokenizedDoc
from mmtrain.data.tokenizer import ByteTokenizer
from mmtrain.model import ModelConfig

TOK = ByteTokenizer()


def doc(n_text: int, image_at: int | None = None, n_patches: int = 4) -> TokenizedDoc:
    tokens = list(range(1, n_text + 1))
    media = []
    if image_at is not None:
        span = [TOK.image_begin] + [TOK.image] * n_patches + [TOK.image_end]
        tokens = tokens[:image_at] + span + tokens[image_at:]
        media.append(("image", image_at + 1, np.zeros((n_patches, 3), np.float32)))
    return TokenizedDoc(np.asarray(tokens, np.int64), np.zeros(len(tokens), bool), media)


def packer(seq_len: int, policy: str = "split") -> Packer:
    return Packer(seq_len, pad_id=TOK.pad, placeholder_ids=(TOK.image, TOK.audio), policy=policy)


def dense_mask(cu_seqlens: list[int]) -> np.ndarray:
    """The causal document mask the attention kernel derives from cu_seqlens."""
    n = cu_seqlens[-1]
    doc_of = np.zeros(n, int)
    for d, (a, b) in enumerate(zip(cu_seqlens[:-1], cu_seqlens[1:])):
        doc_of[a:b] = d
    i, j = np.arange(n)[:, None], np.arange(n)[None]
    return (doc_of[:, None] == doc_of[None]) & (j <= i)


def test_rows_have_document_boundaries_positions_and_masked_targets():
    p = packer(20)
    for d in (doc(5), doc(4, image_at=2), doc(3)):
        p.add(d)
    p.flush()
    rows = list(p.rows())
    assert len(rows) == 1
    row = rows[0]
    assert row.doc_lens == [5, 10, 3, 2] and row.real_tokens == 18  # 5 + (4 text + 6 image) + 3
    assert row.positions.tolist() == [0, 1, 2, 3, 4] + list(range(10)) + [0, 1, 2] + [0, 1]
    # No target crosses a document boundary; the last token of each document has none.
    assert row.targets[4] == IGNORE and row.targets[14] == IGNORE
    # Positions filled by media (and the tokens before them) never predict a placeholder.
    media_positions = np.where(row.tokens == TOK.image)[0]
    assert len(media_positions) == 4
    assert (row.targets[media_positions - 1] == IGNORE).all()
    assert (row.targets[np.isin(row.targets, [TOK.image, TOK.audio])].size == 0)
    assert row.media[0][1] == 5 + 3  # image patches start after doc 1 + 2 text tokens + begin
    cu = np.cumsum([0] + row.doc_lens).tolist()
    mask = dense_mask(cu)
    assert not mask[5:15, :5].any() and not mask[:5, 5:].any()  # no attention across documents
    assert not mask[15:18, :15].any() and mask[17, 15] and not mask[15, 16]  # causal inside


def test_split_policy_fills_rows_and_never_cuts_a_media_span():
    p = packer(10)
    p.add(doc(6))
    p.add(doc(6, image_at=1, n_patches=4))  # 12 tokens: would be cut inside its image span
    p.flush()
    rows = list(p.rows())
    first = rows[0]
    assert first.doc_lens[0] == 6
    # The second document's first part stops before its image span begins.
    assert first.doc_lens[1] == 1 and first.tokens[7] == TOK.pad and TOK.image_begin not in first.tokens
    assert any(kind == "image" for kind, _, _ in rows[1].media)
    assert p.split_docs == 1


def test_drop_policy_never_splits_and_drops_too_long_documents():
    p = packer(8, policy="drop")
    p.add(doc(5))
    p.add(doc(5))
    p.add(doc(20))
    p.flush()
    rows = list(p.rows())
    assert [r.doc_lens for r in rows] == [[5, 3], [5, 3]]
    assert p.dropped_docs == 1


def test_packing_efficiency_on_demo_corpus_is_at_least_95_percent(demo_corpus):
    cfg = DataConfig(train=str(demo_corpus / "train"), num_workers=0, num_streams=2)
    loader = ShardLoader(cfg, spec=ModelConfig().media(), tokenizer=TOK, rank=0, world_size=1)
    real = slots = 0
    for _ in range(10):
        b = loader.next_batch()
        real += b.counts["real_tokens"]
        slots += b.tokens.numel()
        # The batch contract: cu_seqlens covers every token; media indices point at placeholders.
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.tokens.numel()
        assert b.cu_seqlens.dtype == torch.int32
        flat = b.tokens.reshape(-1)
        assert (flat[b.image_index] == TOK.image).all() and (flat[b.audio_index] == TOK.audio).all()
        assert (b.targets[b.caption_mask] != IGNORE).all()
    assert real / slots >= 0.95, real / slots
