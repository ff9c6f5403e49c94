"""Tokenizer: fixed special ids, exact Unicode round trip, save/load, transformers parity."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, trainers

from deploykit.data.corpus import embedded_corpus
from deploykit.data.tasks import TASK_KINDS, task_examples
from deploykit.errors import ConfigError, DataError
from deploykit.model.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer

NAMED_CASES = [
    "",
    " ",
    "hello world",
    "  leading spaces",
    "trailing spaces   ",
    "\t\ttabs\tand\nnewlines\n\n\n",
    "\r\n windows \r\n line ends",
    "emoji 😀🎉👍🏽 and a family 👨‍👩‍👧‍👦",
    "日本語のテキストと中文文本 한국어",
    "combining: e\u0301 a\u0308 n\u0303 \u0301 alone",
    "control \x00\x01\x07\x1b[31m\x7f\x85 chars",
    "zero width \u200b\u200d\ufeff joiners",
    "math 𝔸𝕓𝕔 ∑∫√ and plane 16 \U0010fffd",
    "punctuation ... !?;: -- «quotes» “curly”",
    "a . b , c ! spaces before punctuation",
    "Q: 23+58=? A: 81",
    "   \n \t ",
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train(embedded_corpus(150_000, seed=3), vocab_size=1024)


def random_strings(n: int, seed: int) -> list[str]:
    """Strings of random Unicode scalar values: all planes, whitespace runs, controls, ASCII."""
    rng = random.Random(seed)
    pools = [
        lambda: chr(rng.randint(0, 0x7F)),  # ASCII incl. controls
        lambda: rng.choice(" \t\n\r\x0b\x0c"),  # whitespace runs
        lambda: chr(rng.randint(0x80, 0x7FF)),  # 2-byte UTF-8
        lambda: chr(rng.choice([rng.randint(0x800, 0xD7FF), rng.randint(0xE000, 0xFFFF)])),  # BMP
        lambda: chr(rng.randint(0x10000, 0x10FFFF)),  # astral planes
        lambda: rng.choice(["the ", "cat ", "Mia ", "😀", "\u0301", "  "]),  # in-vocab pieces
    ]
    out = []
    for _ in range(n):
        length = rng.randint(0, 40)
        out.append("".join(rng.choice(pools)() for _ in range(length)))
    return out


def test_special_tokens_have_fixed_ids(tok: Tokenizer) -> None:
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (PAD_ID, BOS_ID, EOS_ID) == (0, 1, 2)
    assert [tok.id_to_token(i) for i in range(3)] == ["<|pad|>", "<|bos|>", "<|eos|>"]


def test_all_256_byte_symbols_in_vocab(tok: Tokenizer) -> None:
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    assert len(alphabet) == 256
    assert all(tok.token_to_id(sym) is not None for sym in alphabet)
    assert 259 < tok.vocab_size <= 1024  # merges were learned on top of bytes + specials


@pytest.mark.parametrize("text", NAMED_CASES)
def test_round_trip_named_cases(tok: Tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert all(i >= 3 for i in ids)  # ordinary text never yields special tokens
    assert tok.decode(ids) == text


def test_round_trip_random_unicode(tok: Tokenizer) -> None:
    texts = random_strings(600, seed=0)
    batch = tok.encode_batch(texts)
    for text, ids in zip(texts, batch):
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text, repr(text)


def test_merges_compress_corpus_text(tok: Tokenizer) -> None:
    text = "Once upon a time, there was a kind teacher named Mia."
    assert len(tok.encode(text)) < len(text.encode("utf-8")) / 2


def test_bos_eos_and_skip_special(tok: Tokenizer) -> None:
    ids = tok.encode("hi there", add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert ids[1:-1] == tok.encode("hi there")
    assert tok.decode(ids) == "hi there"
    assert tok.decode(ids, skip_special=False) == "<|bos|>hi there<|eos|>"
    assert tok.encode_batch(["a", "b"], add_eos=True) == [tok.encode("a") + [2], tok.encode("b") + [2]]


def test_literal_special_token_text_is_the_special_token(tok: Tokenizer) -> None:
    # Hugging Face convention (and AutoTokenizer does the same): documented, not an accident.
    assert tok.encode("a<|eos|>b") == tok.encode("a") + [tok.eos_id] + tok.encode("b")


def test_task_prompt_tokens_are_a_prefix_of_the_full_line(tok: Tokenizer) -> None:
    # Exact-match eval feeds encode(prompt) and expects the model to continue with the answer;
    # this only works if the prompt's tokens are exactly the start of the training line's.
    for ex in task_examples(120, seed=5, kinds=TASK_KINDS):
        p = tok.encode(ex.prompt)
        assert tok.encode(ex.text)[: len(p)] == p, ex


def test_decode_accepts_tensors_and_rejects_out_of_range(tok: Tokenizer) -> None:
    torch = pytest.importorskip("torch")
    ids = tok.encode("tensor ids")
    assert tok.decode(torch.tensor(ids)) == "tensor ids"
    with pytest.raises(DataError, match="outside the vocabulary"):
        tok.decode([5, tok.vocab_size + 7])


def test_save_load_round_trip(tok: Tokenizer, tmp_path: Path) -> None:
    path = tok.save(tmp_path / "ckpt")
    assert path == tmp_path / "ckpt" / "tokenizer.json"
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "ckpt" / name).is_file()
    texts = random_strings(50, seed=1) + NAMED_CASES
    for loaded in (Tokenizer.load(tmp_path / "ckpt"), Tokenizer.load(path)):
        assert (loaded.bos_id, loaded.eos_id, loaded.pad_id, loaded.vocab_size) == (
            tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size,
        )
        assert loaded.encode_batch(texts) == tok.encode_batch(texts)


def test_from_hf_wraps_existing_tokenizer(tok: Tokenizer) -> None:
    again = Tokenizer.from_hf(tokenizers.Tokenizer.from_str(tok.hf.to_str()))
    assert (again.bos_id, again.eos_id, again.pad_id) == (1, 2, 0)
    assert again.encode("same ids") == tok.encode("same ids")


def test_auto_tokenizer_matches(tok: Tokenizer, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    tok.save(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert isinstance(hf, transformers.PreTrainedTokenizerFast)
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    assert (hf.pad_token, hf.bos_token, hf.eos_token) == ("<|pad|>", "<|bos|>", "<|eos|>")
    assert len(hf) == tok.vocab_size
    for text in random_strings(150, seed=2) + NAMED_CASES:
        ours = tok.encode(text)
        # Llama convention: bos by default, the bare ids with add_special_tokens=False.
        assert hf(text)["input_ids"] == tok.encode(text, add_bos=True)
        assert hf(text, add_special_tokens=False)["input_ids"] == ours
        assert hf.decode(ours) == text
        assert hf.decode([tok.bos_id, *ours, tok.eos_id], skip_special_tokens=True) == text


def _llama2_style(tmp_path: Path) -> Path:
    # A sentencepiece-converted layout: Metaspace + byte fallback, <unk>=0 <s>=1 </s>=2,
    # written with a tokenizer_config.json that names the specials (what transformers saves).
    hf = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    hf.pre_tokenizer = pre_tokenizers.Metaspace()
    hf.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    hf.train_from_iterator(embedded_corpus(30_000, seed=9), trainer)
    folder = tmp_path / "llama2"
    folder.mkdir()
    hf.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": {"content": "<s>", "special": True},
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def test_load_llama2_style_folder(tmp_path: Path) -> None:
    loaded = Tokenizer.load(_llama2_style(tmp_path))
    assert (loaded.bos_id, loaded.eos_id) == (1, 2)
    assert loaded.pad_id == loaded.eos_id  # no pad token: falls back to eos
    ids = loaded.encode("The cat sat.")
    assert loaded.decode(ids).strip() == "The cat sat."


def test_load_folder_saved_by_transformers_llama3_style(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    # Llama 3 layout: byte-level BPE whose specials come after the merges, at high ids.
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    hf.train_from_iterator(embedded_corpus(30_000, seed=8), trainer)
    hf.add_special_tokens([AddedToken("<|begin_of_text|>", special=True), AddedToken("<|end_of_text|>", special=True)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=hf, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    fast.save_pretrained(tmp_path / "llama3")
    loaded = Tokenizer.load(tmp_path / "llama3")
    assert loaded.bos_id == fast.bos_token_id == hf.token_to_id("<|begin_of_text|>")
    assert loaded.eos_id == fast.eos_token_id == hf.token_to_id("<|end_of_text|>")
    assert loaded.bos_id > 255
    for text in NAMED_CASES:
        assert loaded.encode(text) == fast(text, add_special_tokens=False)["input_ids"]
        assert loaded.decode(loaded.encode(text)) == text


def test_errors_name_input_and_fix(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="vocab_size=100"):
        Tokenizer.train(["some text"], vocab_size=100)
    with pytest.raises(DataError, match="no text"):
        Tokenizer.train(["", "  "], vocab_size=512)
    with pytest.raises(DataError, match="has no tokenizer.json") as err:
        Tokenizer.load(tmp_path)
    assert "HINT" in str(err.value)
    with pytest.raises(DataError, match="does not exist"):
        Tokenizer.load(tmp_path / "nope" / "tokenizer.json")
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    with pytest.raises(DataError, match="could not read tokenizer"):
        Tokenizer.load(bad)


def test_foreign_tokenizer_without_eos_is_refused() -> None:
    hf = tokenizers.Tokenizer(models.WordLevel({"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    with pytest.raises(DataError, match="end-of-sequence"):
        Tokenizer.from_hf(hf)


def test_lone_surrogate_and_non_str_rejected(tok: Tokenizer) -> None:
    with pytest.raises(DataError, match="not valid Unicode"):
        tok.encode("bad \ud800 text")
    with pytest.raises(DataError, match="not str"):
        tok.encode_batch(["ok", b"bytes"])  # type: ignore[list-item]
