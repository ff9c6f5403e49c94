"""Reading training text, packing it into fixed-length blocks, and batching it resumably.

Shapes: a *block* is ``block_size + 1`` token ids. ``inputs = blk[:, :-1]`` and
``targets = blk[:, 1:]``: labels are shifted here, exactly once, so the model's loss must compare
``logits`` with ``targets`` position by position and never shift again.
"""
from __future__ import annotations

import glob as globlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from deploykit.errors import ConfigError, DataError

if TYPE_CHECKING:
    from deploykit.model.tokenizer import Tokenizer

EMBEDDED = "embedded"
# What a directory spec picks up; other files (images, checkpoints) are ignored, not errors.
TEXT_SUFFIXES = (".txt", ".text", ".md", ".jsonl")
_GLOB_CHARS = set("*?[")
_SNIFF_BYTES = 8192

Spec = str | os.PathLike[str] | Sequence[str | os.PathLike[str]]


# ---- reading ---------------------------------------------------------------------------------------


def load_texts(spec: Spec = EMBEDDED) -> list[str]:
    """Documents from ``spec``:

    - ``"embedded"``: the generated default corpus with its task mix (``embedded_corpus()``);
    - a text file (one document per file; UTF-8);
    - a ``.jsonl`` file: one JSON object per line with a string ``"text"`` field (one document each);
    - a directory: every ``*.txt``, ``*.text``, ``*.md``, ``*.jsonl`` under it, in sorted order;
    - a glob such as ``"data/*.txt"`` (``**`` recurses);
    - a list of any of the above, concatenated in order.

    Empty documents are dropped; an empty result raises ``DataError``.
    """
    docs = _load(spec)
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(
            f"data {_show(spec)} holds no text (every document is empty or whitespace)",
            hint="point --data at files with text in them, or use --data embedded",
        )
    return docs


def _show(spec: Spec) -> str:
    return repr(os.fspath(spec)) if isinstance(spec, (str, os.PathLike)) else repr(list(map(str, spec)))


def _load(spec: Spec) -> list[str]:
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise DataError("data spec is an empty list", hint="pass at least one file, folder or glob")
        out: list[str] = []
        for item in spec:
            out.extend(_load(item))
        return out
    if not isinstance(spec, (str, os.PathLike)):
        raise DataError(
            f"data spec {spec!r} is a {type(spec).__name__}",
            hint="pass 'embedded', a path, a glob, or a list of those",
        )
    text = os.fspath(spec)
    if isinstance(spec, str) and text == EMBEDDED:
        from deploykit.data.corpus import embedded_corpus

        return embedded_corpus()
    path = Path(text)
    if path.is_file():
        return _read_file(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        if not files:
            raise DataError(
                f"data folder {text!r} has no {'/'.join(TEXT_SUFFIXES)} files",
                hint="put UTF-8 text or JSONL files in it, or pass a glob such as 'data/*.csv'",
            )
        return [doc for f in files for doc in _read_file(f)]
    if _GLOB_CHARS & set(text):
        matches = sorted(Path(m) for m in globlib.glob(text, recursive=True))
        files = [m for m in matches if m.is_file()]
        if not files:
            raise DataError(
                f"data glob {text!r} matched no files",
                hint="check the pattern relative to the current folder "
                f"({os.getcwd()}); quote it so the shell does not expand it",
            )
        return [doc for f in files for doc in _read_file(f)]
    raise DataError(
        f"data path {text!r} does not exist",
        hint="pass an existing text/JSONL file, a folder, a glob like 'data/*.txt', or 'embedded'",
    )


def _read_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    if b"\x00" in raw[:_SNIFF_BYTES]:  # NUL never appears in UTF-8 text; it does in binaries
        raise DataError(
            f"data file {str(path)!r} looks binary (it contains NUL bytes)",
            hint="pass UTF-8 text or JSONL files; exclude it from the glob/folder",
        )
    try:
        text = raw.decode("utf-8-sig")  # -sig drops a leading byte-order mark
    except UnicodeDecodeError as err:
        raise DataError(
            f"data file {str(path)!r} is not UTF-8 (bad byte 0x{raw[err.start]:02x} at offset {err.start})",
            hint="convert it, e.g. `iconv -f latin1 -t utf-8 in.txt > out.txt`",
        ) from err
    if path.suffix.lower() == ".jsonl":
        return _parse_jsonl(text, path)
    return [text]


def _parse_jsonl(text: str, path: Path) -> list[str]:
    docs = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj: Any = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"data file {str(path)!r} line {lineno} is not JSON: {err.msg}",
                hint='each line must be one JSON object like {"text": "..."}',
            ) from err
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            what = "has no \"text\" field" if isinstance(obj, dict) and "text" not in obj else (
                "has a non-string \"text\"" if isinstance(obj, dict) else f"is a JSON {type(obj).__name__}"
            )
            raise DataError(
                f"data file {str(path)!r} line {lineno} {what}",
                hint='each line must be one JSON object with a string "text" field, e.g. {"text": "..."}',
            )
        docs.append(obj["text"])
    return docs


# ---- packing -----------------------------------------------------------------------------------------


def jsonl_records(path: Path, *, missing_hint: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed JSON) for every non-blank line of a JSONL file, as DataErrors naming the
    file and line: a missing file, bytes that are not UTF-8, a line that is not JSON."""
    if not path.is_file():
        raise DataError(f"--data {path}: no such file", hint=missing_hint)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"--data {path}: not UTF-8 text (byte {e.start})", hint="save the file as UTF-8") from None
    except OSError as e:
        raise DataError(f"--data {path}: cannot read it ({e.strerror})", hint="check the path and its permissions") from None
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not JSON ({e.msg})", hint="one JSON object per line") from None


def pack_documents(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int) -> torch.Tensor:
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into blocks.

    Returns a LongTensor of shape ``(N, block_size + 1)``. Consecutive blocks overlap by one
    token (stride ``block_size``), so every token of the stream after the first is a target
    exactly once and none is lost at block edges. The tail shorter than a block is dropped.
    """
    if block_size < 1:
        raise ConfigError(f"block_size={block_size} must be >= 1", hint="pass e.g. block_size=256")
    stream: list[int] = []
    for ids in token_lists:
        stream.extend(ids)
        stream.append(eos_id)
    if len(stream) < block_size + 1:
        raise DataError(
            f"the data has {len(stream)} tokens, fewer than one block of {block_size + 1}",
            hint="add more text or lower block_size",
        )
    flat = torch.tensor(stream, dtype=torch.long)  # (L,)
    blocks = flat.unfold(0, block_size + 1, block_size)  # (N, block_size+1), a strided view
    return blocks.contiguous()


def train_val_split(
    blocks: torch.Tensor, val_fraction: float, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Randomly assign whole blocks to train/val, deterministic in ``seed``.

    At least one block goes to each side when ``val_fraction > 0``; ``val_fraction == 0`` gives
    an empty (0, T+1) validation tensor.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction={val_fraction} must be in [0, 1)", hint="pass e.g. val_fraction=0.05"
        )
    n = blocks.shape[0]
    n_val = 0 if val_fraction == 0 else max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(
            f"only {n} block(s): too few to hold out {val_fraction:.0%} for validation",
            hint="add more text, lower block_size, or pass val_fraction=0",
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    # Sorting each side keeps the blocks in stream order, which makes debugging easier.
    val_idx, _ = perm[:n_val].sort()
    train_idx, _ = perm[n_val:].sort()
    return blocks[train_idx], blocks[val_idx]


SPLIT_MIN_DOCUMENTS = 20  # fewer distinct documents than this (one book, a few files): they are cut into pieces first
PIECE_CHARS = 2000  # ...of about this many characters, at a line end (else a space), so the split still has units


def split_documents(
    texts: Sequence[str], val_fraction: float, seed: int = 0
) -> tuple[list[str], list[str]]:
    """Hold out whole documents for validation, before tokenizing or packing: ``(train, val)``.

    Splitting packed blocks instead would cut documents across the boundary (the start of a story in
    train, its end in val) and let the tokenizer learn merges from validation text. A seeded share of
    the distinct documents (at least one when ``val_fraction > 0``) goes to validation, and copies of a
    document follow it: a text repeated in the corpus (short generated facts, boilerplate) would otherwise
    land on both sides and be "held out" while trained on. Each side keeps the original order.

    With fewer than ``SPLIT_MIN_DOCUMENTS`` distinct documents (a single text file is one document) the
    unit is a piece of about ``PIECE_CHARS`` characters instead; consecutive pieces of one document that
    land on the same side are joined again, so only the cuts between the sides break a document.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(
            f"val_fraction={val_fraction} must be in [0, 1)", hint="pass e.g. val_fraction=0.05"
        )
    if val_fraction == 0:
        return list(texts), []
    distinct = list(dict.fromkeys(texts))
    if len(distinct) < SPLIT_MIN_DOCUMENTS:
        return _split_pieces(texts, val_fraction, seed)
    held_out = {distinct[i] for i in _held_out(len(distinct), val_fraction, seed, "distinct document(s)")}
    return [t for t in texts if t not in held_out], [t for t in texts if t in held_out]


def _held_out(n: int, val_fraction: float, seed: int, what: str) -> list[int]:
    n_val = max(1, round(n * val_fraction))
    if n - n_val < 1:
        raise DataError(
            f"only {n} {what}: too few to hold out {val_fraction:.0%} of them for validation "
            "(the split is made per document, so no validation text reaches the tokenizer or the model)",
            hint="add text, split it into several documents (files, or lines of a JSONL file), or pass "
                 "--val-fraction 0",
        )
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:n_val].tolist()


def _pieces(text: str) -> list[str]:
    """``text`` cut into pieces of about PIECE_CHARS at a line end (else a space); ``"".join`` gives it back."""
    out, start = [], 0
    while len(text) - start > PIECE_CHARS:
        end = start + PIECE_CHARS
        cut = text.rfind("\n", start + 1, end)
        cut = cut if cut != -1 else text.rfind(" ", start + 1, end)
        cut = end if cut == -1 else cut + 1
        out.append(text[start:cut])
        start = cut
    out.append(text[start:])
    return out


def _split_pieces(texts: Sequence[str], val_fraction: float, seed: int) -> tuple[list[str], list[str]]:
    units = [(doc, piece) for doc, text in enumerate(texts) for piece in _pieces(text)]
    held_out = set(_held_out(len(units), val_fraction, seed, "piece(s) of text (too short)"))
    sides: tuple[list[str], list[str]] = ([], [])
    last: list[tuple[int, int] | None] = [None, None]  # (document, unit index) each side ended with
    for i, (doc, piece) in enumerate(units):
        side = int(i in held_out)
        if last[side] == (doc, i - 1):  # the next piece of the same document: join it back
            sides[side][-1] += piece
        else:
            sides[side].append(piece)
        last[side] = (doc, i)
    return sides


def encode_and_pack(texts: Sequence[str], tokenizer: Tokenizer, block_size: int, *, what: str = "data") -> torch.Tensor:
    """Tokenize (``<bos> doc``, eos added by packing) and pack: ``(N, block_size + 1)``; empty texts give
    ``(0, block_size + 1)``."""
    if not texts:
        return torch.empty(0, block_size + 1, dtype=torch.long)
    # bos starts every document because AutoTokenizer adds it to prompts too (Llama convention).
    token_lists = tokenizer.encode_batch(list(texts), add_bos=True)
    try:
        return pack_documents(token_lists, block_size, tokenizer.eos_id)
    except DataError as e:
        raise DataError(f"the {what} ({len(texts)} document(s)): {e.args[0]}",
                        hint="add more text, lower --block-size, or raise --val-fraction") from e


def build_blocks(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    block_size: int,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split per document (``split_documents``), then tokenize and pack each side: ``(train, val)`` blocks."""
    train, val = split_documents(texts, val_fraction, seed)
    return (encode_and_pack(train, tokenizer, block_size, what="training documents"),
            encode_and_pack(val, tokenizer, block_size, what="validation documents"))


# ---- batching ----------------------------------------------------------------------------------------


class BlockLoader:
    """Endless shuffled batches ``(inputs, targets)``, each ``(batch_size, block_size)``.

    The order is a pure function of ``(seed, epoch)``: epoch ``e`` visits the blocks in
    ``randperm(N, seed=f(seed, e))`` and drops the last incomplete batch. The loader's whole state
    is therefore ``(epoch, position)``, so ``load_state_dict(state_dict())`` resumes the exact
    batch sequence of an uninterrupted run.
    """

    def __init__(self, blocks: torch.Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True) -> None:
        if blocks.dim() != 2 or blocks.shape[1] < 2:
            raise DataError(
                f"BlockLoader needs blocks of shape (N, block_size+1), got {tuple(blocks.shape)}",
                hint="build them with pack_documents()",
            )
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1", hint="pass e.g. batch_size=16")
        if blocks.shape[0] < batch_size:
            raise DataError(
                f"only {blocks.shape[0]} training blocks for batch_size={batch_size}",
                hint="lower batch_size or block_size, or add more text",
            )
        self.blocks = blocks
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.position = 0  # batches already taken from this epoch
        self._order_epoch = -1
        self._order = torch.empty(0, dtype=torch.long)

    @property
    def batches_per_epoch(self) -> int:
        return self.blocks.shape[0] // self.batch_size

    @property
    def step(self) -> int:
        """Batches yielded so far in total."""
        return self.epoch * self.batches_per_epoch + self.position

    def _order_for(self, epoch: int) -> torch.Tensor:
        if self._order_epoch != epoch:
            n = self.blocks.shape[0]
            if self.shuffle:
                # A distinct, reproducible stream per (seed, epoch); no generator state to save.
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) % (1 << 63))
                self._order = torch.randperm(n, generator=g)
            else:
                self._order = torch.arange(n)
            self._order_epoch = epoch
        return self._order

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position >= self.batches_per_epoch:
            self.epoch += 1
            self.position = 0
        start = self.position * self.batch_size
        idx = self._order_for(self.epoch)[start : start + self.batch_size]
        self.position += 1
        blk = self.blocks[idx]  # (B, T+1)
        return blk[:, :-1].contiguous(), blk[:, 1:].contiguous()  # (B, T), (B, T)

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_blocks": int(self.blocks.shape[0]),
            "batch_size": self.batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        # Resuming against different data or settings would silently change the batch sequence.
        expected = {
            "seed": self.seed,
            "shuffle": int(self.shuffle),
            "num_blocks": int(self.blocks.shape[0]),
            "batch_size": self.batch_size,
        }
        diff = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in diff.items())
            raise DataError(
                f"cannot resume the data loader: {detail}",
                hint="resume with the same --data, block size, batch size and seed as the saved run",
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


def eval_batches(blocks: torch.Tensor, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Every block once, in order, the last batch possibly smaller: for validation loss."""
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1", hint="pass e.g. batch_size=16")
    for start in range(0, blocks.shape[0], batch_size):
        blk = blocks[start : start + batch_size]  # (b, T+1)
        yield blk[:, :-1].contiguous(), blk[:, 1:].contiguous()
