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
