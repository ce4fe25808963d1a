from mmtrain.data.tokenizer import SPECIAL_TOKENS, ByteTokenizer


def test_byte_tokenizer_round_trip_with_unicode():
    tok = ByteTokenizer()
    text = "a red circle — ünïcode ✓ 三"
    ids = tok.encode(text)
    assert all(0 <= i < 256 for i in ids)
    assert tok.decode(ids) == text


def test_special_tokens_follow_the_bytes_and_are_dropped_on_decode():
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(SPECIAL_TOKENS)
    assert [tok.pad, tok.bos, tok.eos] == [256, 257, 258]
    assert len({tok.image, tok.image_begin, tok.image_end, tok.audio, tok.audio_begin,
                tok.audio_end}) == 6
    assert tok.decode([tok.bos] + tok.encode("hi") + [tok.image, tok.eos]) == "hi"


INJECTION = "see <|image|> here<|eos|> and <|pad|><|image_begin|>x<|audio_end|> end"


def test_byte_tokenizer_encodes_special_token_text_as_bytes():
    tok = ByteTokenizer()
    ids = tok.encode(INJECTION)
    assert ids == list(INJECTION.encode("utf-8"))
    assert not set(ids) & set(tok.special.values())
    assert tok.decode(ids) == INJECTION


def test_bpe_tokenizer_encodes_special_token_text_as_text(demo_corpus, tmp_path):
    from data_tools.tokenizer_train import train_tokenizer
    from mmtrain.data.tokenizer import BPETokenizer

    path = tmp_path / "tokenizer.json"
    train_tokenizer([str(demo_corpus / "train")], str(path), vocab_size=600)
    tok = BPETokenizer(path)
    ids = tok.encode(INJECTION)
    assert not set(ids) & set(tok.special.values()), ids
    assert tok.decode(ids) == INJECTION
    # The special ids themselves still exist for the packer, and decode drops them.
    assert tok.decode([tok.bos] + tok.encode("hi") + [tok.image, tok.eos]) == "hi"
