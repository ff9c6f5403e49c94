"""Byte-level BPE tokenizer: a small typed wrapper over a Hugging Face ``tokenizers.Tokenizer``.

Why byte-level: every string is first mapped to its UTF-8 bytes, and all 256 byte symbols are
always in the vocabulary, so any Unicode text (emoji, CJK, control characters, whitespace runs)
encodes without an unknown token and ``decode(encode(s)) == s`` holds exactly.

Special tokens have fixed ids because the model config defaults rely on them:
``<|pad|>`` = 0, ``<|bos|>`` = 1, ``<|eos|>`` = 2.

The saved folder follows the Llama convention: ``transformers.AutoTokenizer`` prepends bos when
``add_special_tokens=True`` (its default), so ``hf(text).input_ids == encode(text, add_bos=True)``
and ``hf(text, add_special_tokens=False).input_ids == encode(text)``.

Like every Hugging Face tokenizer, a literal special-token string inside the text (``"<|eos|>"``)
is encoded as that special token, not as its characters.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors, trainers

from deploykit.errors import ConfigError, DataError

from .schema import read_json_object

PAD_TOKEN = "<|pad|>"
BOS_TOKEN = "<|bos|>"
EOS_TOKEN = "<|eos|>"
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
SPECIAL_TOKENS: tuple[str, ...] = (PAD_TOKEN, BOS_TOKEN, EOS_TOKEN)  # index == id

# Smallest vocabulary that can hold the special tokens plus the 256 byte symbols.
MIN_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

# Names other tokenizers use, tried in order when a tokenizer.json comes without a config that
# says which token is which (Llama 2 / Mistral, Llama 3, GPT-2 / Qwen, ChatML).
_BOS_NAMES = (BOS_TOKEN, "<s>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>")
_EOS_NAMES = (EOS_TOKEN, "</s>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>")
_PAD_NAMES = (PAD_TOKEN, "<pad>", "<|finetune_right_pad_id|>", "[PAD]")

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


class Tokenizer:
    """Typed wrapper: ``encode``/``decode`` plus the bos/eos/pad ids the model and trainer need."""

    def __init__(self, hf: tokenizers.Tokenizer, *, bos_id: int, eos_id: int, pad_id: int) -> None:
        self._hf = hf
        self._bos_id = bos_id
        self._eos_id = eos_id
        self._pad_id = pad_id

    # ---- construction -------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2) -> Tokenizer:
        """Train a byte-level BPE on ``texts``.

        The result may hold fewer than ``vocab_size`` tokens when the texts are too small to
        support that many merges; read ``.vocab_size`` for the real size.
        """
        if vocab_size < MIN_VOCAB_SIZE:
            raise ConfigError(
                f"vocab_size={vocab_size} is too small: it must be >= {MIN_VOCAB_SIZE} "
                f"(3 special tokens + 256 byte symbols)",
                hint=f"pass vocab_size >= {MIN_VOCAB_SIZE}, e.g. 2048",
            )
        if min_frequency < 1:
            raise ConfigError(
                f"min_frequency={min_frequency} must be >= 1", hint="pass min_frequency=2"
            )
        texts = texts if isinstance(texts, list) else list(texts)
        if not any(t.strip() for t in texts):
            raise DataError(
                "Tokenizer.train got no text (empty input or only whitespace)",
                hint="pass the training documents, e.g. load_texts('embedded')",
            )
        hf = tokenizers.Tokenizer(models.BPE())
        # No normalizer: any normalization (NFC, lowercasing) would break the exact round trip.
        # use_regex=True splits words/numbers/punctuation GPT-2 style, so " 81" never merges with
        # a preceding ":" and a prompt's tokens stay a prefix of prompt+answer's tokens.
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            min_frequency=min_frequency,
            # The trainer gives special tokens the first ids in list order: pad=0, bos=1, eos=2.
            special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],
            # All 256 byte symbols, even those absent from the texts, so nothing is ever unknown.
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        hf.train_from_iterator(texts, trainer=trainer, length=len(texts))
        hf.post_processor = _bos_post_processor(BOS_TOKEN, BOS_ID)
        got = [hf.token_to_id(t) for t in SPECIAL_TOKENS]
        if got != [PAD_ID, BOS_ID, EOS_ID]:  # a tokenizers release changing the order would break models
            raise DataError(
                f"trained tokenizer gave special tokens ids {got}, expected [0, 1, 2]",
                hint="pin the tokenizers version in constraints.txt and report this",
            )
        return cls(hf, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID)

    @classmethod
    def from_hf(cls, hf: tokenizers.Tokenizer) -> Tokenizer:
        """Wrap an existing ``tokenizers.Tokenizer``; bos/eos/pad are found by their usual names."""
        ids = _special_ids(hf, config={}, source="the given tokenizers.Tokenizer")
        return cls(hf, **ids)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Load a folder holding ``tokenizer.json`` (ours or one saved by transformers for a
        Llama-style model), or a ``tokenizer.json`` file directly.

        bos/eos/pad come from ``tokenizer_config.json`` / ``special_tokens_map.json`` next to it
        when present, else from the usual token names; a missing pad falls back to eos and a
        missing bos to eos (GPT-2 style).
        """
        p = Path(path)
        file = p / TOKENIZER_FILE if p.is_dir() else p
        if not file.is_file():
            what = "has no tokenizer.json" if p.is_dir() else "does not exist"
            raise DataError(
                f"tokenizer path {str(p)!r} {what}",
                hint="pass a checkpoint folder with tokenizer.json, or train one with "
                "Tokenizer.train(texts, vocab_size) and .save(folder)",
            )
        try:
            hf = tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception on bad JSON / unknown models
            raise DataError(
                f"could not read tokenizer {str(file)!r}: {err}",
                hint="the file must be a Hugging Face tokenizers JSON (tokenizer.json); "
                "sentencepiece .model files must be converted with transformers first",
            ) from err
        config: dict[str, Any] = {}
        for name in (SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE):  # config wins over the map
            side = file.parent / name
            if side.is_file():  # any malformed content (not JSON, not an object...) is a DataError naming it
                config.update(read_json_object(side, error=DataError, what=name,
                                               hint=f"fix or delete {name}; tokenizer.json alone is enough"))
        return cls(hf, **_special_ids(hf, config=config, source=str(file)))

    # ---- use ------------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included (the model's embedding needs at least this)."""
        return self._hf.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def hf(self) -> tokenizers.Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for offsets, token strings, etc.)."""
        return self._hf

    def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
        _check_text(text, 0)
        ids = self._hf.encode(text, add_special_tokens=False).ids
        return self._wrap(ids, add_bos, add_eos)

    def encode_batch(
        self, texts: Sequence[str], *, add_bos: bool = False, add_eos: bool = False
    ) -> list[list[int]]:
        """Encode many texts at once; tokenizers runs them on all cores (much faster than a loop)."""
        texts = list(texts)
        for i, t in enumerate(texts):
            _check_text(t, i)
        fast = getattr(self._hf, "encode_batch_fast", None)  # skips offsets; tokenizers >= 0.21
        encodings = (fast or self._hf.encode_batch)(texts, add_special_tokens=False)
        return [self._wrap(e.ids, add_bos, add_eos) for e in encodings]

    def decode(self, ids: Iterable[int], *, skip_special: bool = True) -> str:
        if hasattr(ids, "tolist"):  # torch / numpy arrays
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        n = self.vocab_size
        bad = [i for i in ids if not 0 <= i < n]
        if bad:
            raise DataError(
                f"decode got ids outside the vocabulary [0, {n}): {bad[:5]}",
                hint="the ids come from a model whose vocab_size is larger than this tokenizer's; "
                "decode with the tokenizer saved next to that model",
            )
        return self._hf.decode(ids, skip_special_tokens=skip_special)

    def id_to_token(self, token_id: int) -> str | None:
        return self._hf.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._hf.token_to_id(token)

    # ---- save -------------------------------------------------------------------------------------

    def save(self, folder: str | os.PathLike[str]) -> Path:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into ``folder``
        (created if missing) so ``transformers.AutoTokenizer.from_pretrained(folder)`` loads it.
        Returns the path of tokenizer.json. Atomicity of a whole checkpoint is the caller's job
        (write into a temporary folder, then rename)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(out / TOKENIZER_FILE))
        bos, eos, pad = (self._hf.id_to_token(i) for i in (self.bos_id, self.eos_id, self.pad_id))
        special_map = {"bos_token": bos, "eos_token": eos, "pad_token": pad}
        config = {
            # The generic fast class reads tokenizer.json as is. A model-specific class
            # (LlamaTokenizer) would rebuild the pipeline in transformers 5 and change ids.
            "tokenizer_class": "PreTrainedTokenizerFast",
            **special_map,
            # Default True would turn "a ." into "a." on decode and break the round trip.
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {
                str(i): {
                    "content": self._hf.id_to_token(i),
                    "special": True,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "single_word": False,
                }
                for i in sorted({self.pad_id, self.bos_id, self.eos_id})
            },
        }
        _write_json(out / TOKENIZER_CONFIG_FILE, config)
        _write_json(out / SPECIAL_TOKENS_MAP_FILE, special_map)
        return out / TOKENIZER_FILE

    def __repr__(self) -> str:
        return (
            f"Tokenizer(vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
            f"eos_id={self.eos_id}, pad_id={self.pad_id})"
        )

    def _wrap(self, ids: list[int], add_bos: bool, add_eos: bool) -> list[int]:
        if add_bos:
            ids = [self._bos_id, *ids]
        if add_eos:
            ids = [*ids, self._eos_id]
        return ids


# ---- helpers ------------------------------------------------------------------------------------


def _bos_post_processor(bos: str, bos_id: int) -> processors.TemplateProcessing:
    # Only transformers uses this (our encode passes add_special_tokens=False and adds bos/eos
    # itself): it makes AutoTokenizer prepend bos by default, like Llama's tokenizer.
    return processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)]
    )


def _check_text(text: object, index: int) -> None:
    if not isinstance(text, str):
        raise DataError(
            f"text #{index} is {type(text).__name__}, not str",
            hint="decode bytes first (bytes.decode('utf-8')) or pass str",
        )
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        # Lone surrogates ("\ud800") are not Unicode scalar values; UTF-8 cannot hold them.
        raise DataError(
            f"text #{index} is not valid Unicode at position {err.start}: {err.reason}",
            hint="the text contains lone surrogates; read files with encoding='utf-8' "
            "(not errors='surrogateescape') or clean them with .encode('utf-8', 'replace')",
        ) from err


def _token_name(value: object) -> str | None:
    # tokenizer_config.json stores a token either as a string or as an AddedToken dict.
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_ids(
    hf: tokenizers.Tokenizer, *, config: dict[str, Any], source: str
) -> dict[str, int]:
    def find(key: str, names: tuple[str, ...]) -> int | None:
        named = _token_name(config.get(key))
        if named is not None:
            tid = hf.token_to_id(named)
            if tid is None:
                raise DataError(
                    f"{source}: the config names {key}={named!r} but the vocabulary has no such token",
                    hint=f"fix {key} in tokenizer_config.json or remove it to auto-detect",
                )
            return tid
        for name in names:
            tid = hf.token_to_id(name)
            if tid is not None:
                return tid
        return None

    eos = find("eos_token", _EOS_NAMES)
    if eos is None:
        raise DataError(
            f"{source}: cannot tell which token is end-of-sequence (none of {list(_EOS_NAMES)} "
            "is in the vocabulary and no tokenizer_config.json names eos_token)",
            hint="put a tokenizer_config.json with \"eos_token\" next to tokenizer.json",
        )
    bos = find("bos_token", _BOS_NAMES)
    pad = find("pad_token", _PAD_NAMES)
    return {
        "bos_id": eos if bos is None else bos,
        "eos_id": eos,
        "pad_id": eos if pad is None else pad,
    }


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
