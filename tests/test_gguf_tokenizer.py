"""Tokenizers rebuilt from GGUF vocabularies: 'gpt2' byte-level BPE and 'llama' SentencePiece."""

from __future__ import annotations

import pytest

from gguf_files import gpt2_tokens, write_tiny
from models.gguf import convert_gguf

TEXTS = ["the cat in a hat", "Hello, world! 1234", "  two  spaces and\nnew lines\n\n", "héllo wörld 🙂", "x"]


def test_gpt2_round_trip_and_chat_template(tmp_path):
    from mlx_lm.utils import load
    from transformers import AutoTokenizer

    write_tiny(tmp_path / "t.gguf")
    out = convert_gguf(tmp_path / "t.gguf", tmp_path / "mlx")
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.bos_token == "<|im_start|>" and tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text
    tokens, _ = gpt2_tokens()
    assert tokens.index("Ġthe") in tok.encode(" the")  # merges apply
    assert [tok.convert_ids_to_tokens(i) for i in tok.encode(" 12")] == ["Ġ", "1", "2"]  # smollm digits
    messages = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"  # the file's own template
    chat = tok.encode(text)
    assert chat[0] == 1 and chat.count(2) == 1  # specials are single tokens
    _, wrapper = load(str(out))
    assert 2 in wrapper.eos_token_ids


def _sentencepiece_model(tmp_path, add_dummy_prefix: bool):
    import sentencepiece as spm

    corpus = ("the quick brown fox jumps over the lazy dog. " * 3 + "a cat sat on the mat and then the hat. "
              "Hello there, world of tokens: 12 34 5678. " * 2).split(". ")
    prefix = tmp_path / f"sp{int(add_dummy_prefix)}"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus * 20), model_prefix=str(prefix), model_type="bpe", vocab_size=400,
        byte_fallback=True, add_dummy_prefix=add_dummy_prefix, character_coverage=1.0,
        bos_id=1, eos_id=2, unk_id=0, pad_id=-1, minloglevel=2,
        normalization_rule_name="identity", remove_extra_whitespaces=False,  # as Llama and Gemma were trained
    )
    return spm.SentencePieceProcessor(model_file=f"{prefix}.model")


@pytest.mark.parametrize("add_dummy_prefix", [True, False], ids=["llama-style", "gemma-style"])
def test_sentencepiece_vocabulary_tokenizes_as_sentencepiece(tmp_path, add_dummy_prefix):
    from transformers import AutoTokenizer

    sp = _sentencepiece_model(tmp_path, add_dummy_prefix)
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(n)]
    # llama.cpp's token types: 1 normal, 2 unknown, 3 control, 6 byte
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    scores = [sp.get_score(i) for i in range(n)]
    extra = {"tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
             "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": add_dummy_prefix}
    write_tiny(tmp_path / "s.gguf", "llama", vocab=(tokens, types, scores), tokenizer_model="llama", extra=extra)
    tok = AutoTokenizer.from_pretrained(str(convert_gguf(tmp_path / "s.gguf", tmp_path / "mlx")))
    for text in TEXTS + ["the lazy fox sat", "Zebra! quick"]:
        want = [1] + sp.encode(text)
        assert tok.encode(text) == want, text
        assert tok.decode(want, skip_special_tokens=True) == sp.decode(want[1:])
    assert any(types[i] == 6 for i in tok.encode("🙂"))  # characters outside the vocabulary fall back to bytes
