"""Documents → token sequences with media spans → fixed-length packed rows.

A document becomes `<bos> … <eos>`: text segments as tokens, each image as
`<image_begin> <image>×P <image_end>`, each audio clip as `<audio_begin> <audio>×A <audio_end>`.
The `<image>` / `<audio>` placeholder positions are filled by the model with the encoded media.
A media item the model learns to generate (media_codes.py) is instead `<caption> <image_begin>
code ids <image_end>` (the same for audio): its codes are targets like text.

Rows are packed greedily. Policy "split" fills every row and cuts a document at the row end (never
inside a media span); the rest continues in the next row as a new document (positions restart).
Policy "drop" never cuts: a document that does not fit starts a new row, one longer than a row is
dropped. Packing is a pure function of the document sequence, so the position of the next
unconsumed token (document, token offset) is all the state needed to resume exactly.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator

import numpy as np

from mmtrain.data.config import MediaSpec
from mmtrain.data.decode import decode_audio, decode_image
from mmtrain.data.media_codes import GENERATE, INPUT, MediaCodes
from mmtrain.data.schema import Document
from mmtrain.data.tokenizer import Tokenizer

IGNORE = -100


@dataclasses.dataclass
class TokenizedDoc:
    tokens: np.ndarray  # [L] int64
    caption: np.ndarray  # [L] bool: token belongs to a text segment that follows a media input
    media: list[tuple[str, int, np.ndarray]]  # (kind, start of the placeholder run, [n, dim])
    pos: tuple = ()  # where the document sits in its stream (opaque here; used for resume)
    key: str = ""  # the sample key
    code_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # [begin, end]
    #   marker positions of each generated media item (never cut by packing)

    def __len__(self) -> int:
        return len(self.tokens)


def tokenize_document(doc: Document, tok: Tokenizer, spec: MediaSpec, *,
                      max_image_pixels: int, codes: MediaCodes | None = None,
                      use_stored: frozenset[str] = frozenset(),
                      decisions: list[str] | None = None) -> TokenizedDoc:
    """Decode the media and tokenize the text of one document (raises SampleError when bad).

    With `codes` (a run that generates media), each media item is an input or a generation
    target as `decisions` (default: `codes.decisions`) says. A target's caption, the text segment
    right after it, moves in front of it (or is dropped: GENERATE_UNCONDITIONAL) and the item
    becomes `<begin> code ids <end>`, predicted like text. `use_stored`: kinds whose stored codes
    members may be used (MediaCodes.stored_kinds).
    """
    segments = doc.segments
    if decisions is None:
        decisions = codes.decisions(doc.key, [s.type for s in segments]) if codes is not None \
            else [INPUT] * len(segments)
    tokens: list[int] = [tok.bos]
    caption: list[bool] = [False]
    media: list[tuple[str, int, np.ndarray]] = []
    code_spans: list[tuple[int, int]] = []
    previous = None

    def add_text(text: str, is_caption: bool) -> None:
        ids = tok.encode(text if previous != "text" else " " + text)
        tokens.extend(ids)
        caption.extend([is_caption] * len(ids))

    i = 0
    while i < len(segments):
        seg, decision = segments[i], decisions[i]
        if seg.type == "text":
            add_text(seg.text, previous in ("image", "audio"))
            previous = "text"
        elif decision == INPUT:
            if seg.type == "image":
                values = decode_image(seg.data, spec, max_image_pixels)
                begin, mark, end = tok.image_begin, tok.image, tok.image_end
            else:
                values = decode_audio(seg.data, spec)
                begin, mark, end = tok.audio_begin, tok.audio, tok.audio_end
            tokens.append(begin)
            media.append((seg.type, len(tokens), values))
            tokens += [mark] * len(values) + [end]
            caption += [False] * (len(values) + 2)
            previous = seg.type
        else:
            if codes is None:
                raise ValueError(f"decision {decision!r} needs MediaCodes")
            ids = codes.token_ids(seg.type, seg.data, seg.codes, seg.type in use_stored)
            has_caption = i + 1 < len(segments) and segments[i + 1].type == "text"
            if has_caption:
                if decision == GENERATE:
                    add_text(segments[i + 1].text, False)
                    previous = "text"
                i += 1
            begin, end = (tok.image_begin, tok.image_end) if seg.type == "image" else \
                (tok.audio_begin, tok.audio_end)
            code_spans.append((len(tokens), len(tokens) + len(ids) + 1))
            tokens += [begin, *ids.tolist(), end]
            caption += [False] * (len(ids) + 2)
            previous = "generated"
        i += 1
    tokens.append(tok.eos)
    caption.append(False)
    return TokenizedDoc(np.asarray(tokens, np.int64), np.asarray(caption, bool), media,
                        code_spans=code_spans)


@dataclasses.dataclass
class Row:
    """One packed row of `seq_len` tokens (the unit the loader moves around)."""

    tokens: np.ndarray  # [T] int64
    targets: np.ndarray  # [T] int64, IGNORE where no loss is taken
    positions: np.ndarray  # [T] int64, restart at 0 for every document
    doc_lens: list[int]  # lengths of the documents in the row; trailing padding is one more
    caption: np.ndarray  # [T] bool: the target is a caption token (for media-gain evaluation)
    media: list[tuple[str, int, np.ndarray]]  # (kind, start index in the row, [n, dim])
    real_tokens: int  # tokens that are not padding
    # The last document part in the row: (doc.pos, tokens of that document consumed, finished?).
    # The next row starts right after it, so this is the exact resume point.
    end: tuple = ()
    keys: list[str] = dataclasses.field(default_factory=list)  # documents that start in this row


class Packer:
    """Greedy packing of tokenized documents into rows of `seq_len`.

    `add(doc, offset)` feeds a document (starting at token `offset`, for resuming mid-document);
    completed rows come out of `rows()`. `pending_offset` is how many tokens of the last document
    fed have already been emitted in complete rows.
    """

    def __init__(self, seq_len: int, *, pad_id: int, placeholder_ids: tuple[int, ...],
                 policy: str = "split") -> None:
        self.seq_len, self.pad_id, self.policy = seq_len, pad_id, policy
        self.placeholders = np.asarray(placeholder_ids, np.int64)
        self._parts: list[tuple[TokenizedDoc, int, int]] = []  # (doc, start, stop) in current row
        self._fill = 0
        self._done: list[Row] = []
        self.dropped_docs = 0
        self.split_docs = 0

    def add(self, doc: TokenizedDoc, offset: int = 0) -> None:
        length = len(doc)
        if self.policy == "drop":
            if length > self.seq_len:
                self.dropped_docs += 1
                return
            if self._fill + length > self.seq_len:
                self._close_row()
            self._append(doc, 0, length)
            return
        start, was_split = offset, False
        while start < length:
            room = self.seq_len - self._fill
            stop = min(length, start + room)
            if stop < length:
                stop = _cut_outside_media(doc, start, stop)
                if stop == start and self._fill == 0:  # a media span longer than a row
                    self.dropped_docs += 1
                    return
                was_split = True
            if stop > start:
                self._append(doc, start, stop)
            if stop < length or self._fill == self.seq_len:
                self._close_row()
            start = stop
        self.split_docs += was_split

    def _append(self, doc: TokenizedDoc, start: int, stop: int) -> None:
        self._parts.append((doc, start, stop))
        self._fill += stop - start
        if self._fill == self.seq_len and self.policy == "drop":
            self._close_row()

    def rows(self) -> Iterator[Row]:
        while self._done:
            yield self._done.pop(0)

    def _close_row(self) -> None:
        if not self._parts:
            return
        T = self.seq_len
        tokens = np.full(T, self.pad_id, np.int64)
        targets = np.full(T, IGNORE, np.int64)
        positions = np.zeros(T, np.int64)
        caption = np.zeros(T, bool)
        media: list[tuple[str, int, np.ndarray]] = []
        doc_lens: list[int] = []
        at = 0
        for doc, start, stop in self._parts:
            n = stop - start
            tokens[at:at + n] = doc.tokens[start:stop]
            # Next-token targets within the part; none across a document or row boundary, and
            # none for predicting a media placeholder (those positions are filled by media).
            nxt = doc.tokens[start + 1:stop]
            targets[at:at + n - 1] = np.where(np.isin(nxt, self.placeholders), IGNORE, nxt)
            caption[at:at + n - 1] = doc.caption[start + 1:stop]
            positions[at:at + n] = np.arange(n)
            for kind, mstart, values in doc.media:
                if start <= mstart and mstart + len(values) <= stop:
                    media.append((kind, at + mstart - start, values))
            doc_lens.append(n)
            at += n
        if at < T:
            doc_lens.append(T - at)
            positions[at:] = np.arange(T - at)
        caption &= targets != IGNORE
        last_doc, _, last_stop = self._parts[-1]
        end = (last_doc.pos, last_stop, last_stop == len(last_doc))
        keys = [doc.key for doc, start, _ in self._parts if start == 0]
        self._done.append(Row(tokens, targets, positions, doc_lens, caption, media, at, end, keys))
        self._parts, self._fill = [], 0

    def flush(self) -> None:
        """Close the current partial row (end of an evaluation pass)."""
        self._close_row()


def _cut_outside_media(doc: TokenizedDoc, start: int, stop: int) -> int:
    """Move a cut point back so that no media span (begin marker … end marker, of an input or
    of generated codes) is cut."""
    spans = [(mstart - 1, mstart + len(values)) for _, mstart, values in doc.media] + doc.code_spans
    for span_begin, span_last in spans:
        if span_begin < stop <= span_last:
            return max(start, span_begin)
    return stop
