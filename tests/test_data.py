"""Data: generated corpus, verifiable tasks, file loading, packing, resumable batching."""
from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
import torch

from deploykit.data import (
    CHARACTERS,
    DEFAULT_N_CHARS,
    TASK_KINDS,
    BlockLoader,
    TaskExample,
    build_blocks,
    embedded_corpus,
    english_documents,
    eval_batches,
    extract_answer,
    load_texts,
    pack_documents,
    score_exact_match,
    split_of,
    task_documents,
    task_examples,
    train_val_split,
)
from deploykit.errors import ConfigError, DataError
from deploykit.model.tokenizer import Tokenizer

# ---- corpus ----------------------------------------------------------------------------------------


def test_corpus_is_deterministic_and_sized() -> None:
    a = embedded_corpus(300_000, seed=0)
    assert a == embedded_corpus(300_000, seed=0)
    assert a != embedded_corpus(300_000, seed=1)
    total = sum(map(len, a))
    assert 300_000 <= total < 301_000
    assert english_documents(0) == []


def test_corpus_is_fast() -> None:
    # CPU time, not wall time: other jobs on a shared 2-core box must not make this flaky.
    start = time.process_time()
    docs = embedded_corpus(2_000_000)
    elapsed = time.process_time() - start
    assert sum(map(len, docs)) >= 2_000_000
    assert elapsed < 2.0, f"2 MB took {elapsed:.2f}s"


def test_corpus_is_varied_with_recurring_characters() -> None:
    docs = embedded_corpus(400_000, seed=2)
    text = "\n".join(docs)
    words = {w.strip('.,!?:;"\'').lower() for w in text.split()}
    words = {w for w in words if w.isalpha()}
    assert len(words) >= 300  # a few hundred distinct words
    assert len(set(docs)) > 0.5 * len(docs)  # mostly distinct documents
    for c in CHARACTERS:
        assert text.count(c.name) >= 20, c.name  # every character recurs
    for marker in ("Once upon a time", "Question:", "About ", ": Hello, ", "Q: ", "Let us count"):
        assert marker in text, marker  # every document kind shows up


def test_character_facts_never_contradict() -> None:
    # Facts are learnable only if they are consistent across the whole corpus.
    text = "\n".join(english_documents(400_000, seed=4))
    by_name = {c.name: c for c in CHARACTERS}
    names = "|".join(by_name)
    lives = re.findall(rf"\b({names})(?: lives| who lived) in ([A-Z][a-z]+(?: Hill)?)", text)
    assert len(lives) > 200
    assert all(by_name[n].town == town for n, town in lives)
    pets = re.findall(rf"\b({names}) had a (\w+) named (\w+)", text)
    assert len(pets) > 100
    assert all((by_name[n].pet_kind, by_name[n].pet_name) == (k, p) for n, k, p in pets)


def test_corpus_mixes_in_task_documents() -> None:
    docs = embedded_corpus(500_000, seed=0, task_fraction=0.2)
    task_chars = sum(len(d) for d in docs if d.startswith("Q: "))
    assert 0.18 < task_chars / sum(map(len, docs)) < 0.22
    # Interleaved, not appended: the first tenth already contains tasks.
    assert any(d.startswith("Q: ") for d in docs[: len(docs) // 10])
    assert not any(d.startswith("Q: ") for d in embedded_corpus(50_000, task_fraction=0.0))


# ---- tasks -----------------------------------------------------------------------------------------


def _solve(ex: TaskExample) -> str:
    """An independent solver: parses the prompt and computes the answer."""
    body = ex.prompt.removeprefix("Q: ").removesuffix(" A:")
    if ex.kind in ("add", "sub", "mul"):
        a, op, b = re.fullmatch(r"(\d+)([+*-])(\d+)=\?", body).groups()
        return str({"+": int(a) + int(b), "-": int(a) - int(b), "*": int(a) * int(b)}[op])
    if ex.kind == "reverse":
        return " ".join(body.removeprefix("reverse ").split()[::-1])
    if ex.kind == "sort":
        return " ".join(map(str, sorted(map(int, body.removeprefix("sort ").split()))))
    if ex.kind == "recall":
        pairs, query = body.split(" ; ")
        table = dict(p.split("=") for p in pairs.split())
        return table[query.removesuffix("=?")]
    raise AssertionError(ex.kind)


def test_task_answers_are_correct_and_balanced() -> None:
    examples = task_examples(600, seed=0)
    assert [e.kind for e in examples[:6]] == list(TASK_KINDS)
    assert all(sum(e.kind == k for e in examples) == 100 for k in TASK_KINDS)
    for ex in examples + task_examples(300, seed=1, split="train"):
        assert ex.prompt.startswith("Q: ") and ex.prompt.endswith(" A:")
        assert _solve(ex) == ex.answer, ex
        assert ex.text == f"{ex.prompt} {ex.answer}"
    assert int(next(e for e in examples if e.kind == "sub").answer) >= 0


def test_task_examples_deterministic_and_filtered() -> None:
    assert task_examples(50, seed=3) == task_examples(50, seed=3)
    assert task_examples(50, seed=3) != task_examples(50, seed=4)
    only = task_examples(20, seed=0, kinds=["sort", "recall"])
    assert {e.kind for e in only} == {"sort", "recall"}
    with pytest.raises(ConfigError, match="choose from"):
        task_examples(5, seed=0, kinds=["division"])


def test_train_and_eval_never_overlap() -> None:
    train_lines = {
        line.rsplit(" A: ", 1)[0] + " A:"
        for doc in task_documents(400_000, seed=0)
        for line in doc.split("\n")
    }
    train_lines |= {e.prompt for e in task_examples(3000, seed=1, split="train")}
    assert all(split_of(p) == "train" for p in train_lines)
    for seed in (0, 1, 2, 12345):  # the same seed as training included
        eval_prompts = {e.prompt for e in task_examples(600, seed=seed)}
        assert all(split_of(p) == "eval" for p in eval_prompts)
        assert not eval_prompts & train_lines
    # The corpus's task documents come from the train split only.
    corpus_tasks = [d for d in embedded_corpus(200_000) if d.startswith("Q: ")]
    assert all(split_of(line.rsplit(" A: ", 1)[0] + " A:") == "train" for d in corpus_tasks for line in d.split("\n"))


def test_score_exact_match() -> None:
    ex = [
        TaskExample("add", "Q: 1+2=? A:", "3"),
        TaskExample("add", "Q: 2+2=? A:", "4"),
        TaskExample("sort", "Q: sort 3 1 A:", "1 3"),
    ]
    scores = score_exact_match(ex, [" 3\nQ: 5+5=? A: 10", " 5", " 1 3"])
    assert scores == {"overall": pytest.approx(2 / 3), "add": 0.5, "sort": 1.0}
    assert extract_answer(" 81\nmore") == "81"
    assert score_exact_match(ex[:1], [" 33"])["overall"] == 0.0  # a prefix match is not a match
    with pytest.raises(DataError, match="3 examples but 2 completions"):
        score_exact_match(ex, ["3", "4"])


# ---- loading ---------------------------------------------------------------------------------------


def test_load_embedded() -> None:
    docs = load_texts()  # "embedded" is the default spec
    assert sum(map(len, docs)) >= DEFAULT_N_CHARS
    assert any(d.startswith("Q: ") for d in docs)  # the task mix is in
    # The prose stream depends only on the seed, so the corpus starts like seed 0's prose.
    assert docs[0] == english_documents(1, seed=0)[0]


def test_load_files_dirs_globs_jsonl_lists(tmp_path: Path) -> None:
    (tmp_path / "b.txt").write_text("second file\n", encoding="utf-8")
    (tmp_path / "a.txt").write_text("\ufefffirst file ünïcödé 😀\n", encoding="utf-8")  # with BOM
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "c.jsonl").write_text(
        json.dumps({"text": "json one", "id": 1}) + "\n\n" + json.dumps({"text": "json two"}) + "\n"
    )
    (tmp_path / "image.png").write_bytes(b"\x89PNG\x00\x00")  # ignored in a folder
    assert load_texts(tmp_path / "a.txt") == ["first file ünïcödé 😀\n"]
    assert load_texts(str(tmp_path)) == ["first file ünïcödé 😀\n", "second file\n", "json one", "json two"]
    assert load_texts(str(tmp_path / "*.txt")) == ["first file ünïcödé 😀\n", "second file\n"]
    assert load_texts(str(tmp_path / "**" / "*.jsonl")) == ["json one", "json two"]
    assert load_texts([tmp_path / "b.txt", str(sub / "c.jsonl")]) == ["second file\n", "json one", "json two"]


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{oops}\n', r"line 2 is not JSON"),
        ("notext.jsonl", b'{"text": "ok"}\n{"body": "x"}\n', r'line 2 has no "text" field'),
        ("list.jsonl", b'["text"]\n', r"line 1 is a JSON list"),
        ("binary.txt", b"abc\x00\x01\x02", r"looks binary"),
        ("latin1.txt", "café".encode("latin-1"), r"not UTF-8 \(bad byte 0xe9 at offset 3\)"),
        ("empty.txt", b"  \n\n", r"holds no text"),
    ],
)
def test_load_errors_name_the_input(tmp_path: Path, name: str, content: bytes, match: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError, match=match) as err:
        load_texts(path)
    assert name in str(err.value) and "HINT" in str(err.value)


def test_load_missing_inputs(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_texts(tmp_path / "missing.txt")
    with pytest.raises(DataError, match="matched no files"):
        load_texts(str(tmp_path / "*.txt"))
    with pytest.raises(DataError, match="has no"):
        load_texts(tmp_path)
    with pytest.raises(DataError, match="empty list"):
        load_texts([])


# ---- packing and batching ------------------------------------------------------------------------


def test_pack_documents_layout_and_single_shift() -> None:
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33], [40]]
    blocks = pack_documents(docs, block_size=4, eos_id=2)
    stream = [10, 11, 12, 2, 20, 21, 2, 30, 31, 32, 33, 2, 40, 2]
    assert blocks.dtype == torch.long and blocks.shape == (3, 5)
    # Stride block_size: each block starts where the previous one's last target was.
    assert blocks.tolist() == [stream[0:5], stream[4:9], stream[8:13]]
    inputs, targets = blocks[:, :-1], blocks[:, 1:]
    # Every stream token after the first is a target exactly once, right after its input.
    assert targets.flatten().tolist() == stream[1:13]
    assert inputs.flatten().tolist() == stream[0:12]
    with pytest.raises(DataError, match="fewer than one block"):
        pack_documents([[1, 2]], block_size=8, eos_id=2)


def test_train_val_split_deterministic_and_disjoint() -> None:
    blocks = torch.arange(100 * 9).view(100, 9)
    train, val = train_val_split(blocks, 0.1, seed=0)
    assert train.shape == (90, 9) and val.shape == (10, 9)
    t2, v2 = train_val_split(blocks, 0.1, seed=0)
    assert torch.equal(train, t2) and torch.equal(val, v2)
    _, v3 = train_val_split(blocks, 0.1, seed=1)
    assert not torch.equal(val, v3)
    rows = {tuple(r) for r in train.tolist()} | {tuple(r) for r in val.tolist()}
    assert len(rows) == 100  # a partition: nothing lost, nothing duplicated
    assert train_val_split(blocks, 0.0)[1].shape == (0, 9)
    assert train_val_split(blocks[:3], 0.01)[1].shape[0] == 1  # at least one val block
    with pytest.raises(ConfigError, match="val_fraction=1.5"):
        train_val_split(blocks, 1.5)
    with pytest.raises(DataError, match="too few"):
        train_val_split(blocks[:1], 0.5)


def _batches(loader: BlockLoader, n: int) -> list[torch.Tensor]:
    return [torch.cat([x, y[:, -1:]], dim=1) for x, y in (next(loader) for _ in range(n))]


def test_block_loader_epochs_are_permutations() -> None:
    blocks = torch.arange(10 * 5).view(10, 5)
    loader = BlockLoader(blocks, batch_size=3, seed=0)
    assert loader.batches_per_epoch == 3  # the 10th block waits for a later epoch
    x, y = next(loader)
    assert x.shape == y.shape == (3, 4)
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are inputs shifted by exactly one
    loader = BlockLoader(blocks, batch_size=2, seed=0)
    for _ in range(3):
        seen = torch.cat(_batches(loader, loader.batches_per_epoch))
        assert sorted(r[0] for r in seen.tolist()) == list(range(0, 50, 5))  # each block once
    first = _batches(BlockLoader(blocks, 2, seed=0), 5)
    assert not all(torch.equal(a, b) for a, b in zip(first, _batches(BlockLoader(blocks, 2, seed=1), 5)))
    ordered = _batches(BlockLoader(blocks, 2, shuffle=False), 5)
    assert torch.equal(torch.cat(ordered), blocks)


def test_block_loader_resume_is_bit_for_bit() -> None:
    blocks = torch.randint(0, 1000, (23, 17), generator=torch.Generator().manual_seed(0))
    straight = _batches(BlockLoader(blocks, batch_size=4, seed=7), 20)  # crosses 3 epochs
    for cut in (0, 3, 5, 11):
        first = BlockLoader(blocks, batch_size=4, seed=7)
        head = _batches(first, cut)
        state = json.loads(json.dumps(first.state_dict()))  # survives a JSON round trip
        resumed = BlockLoader(blocks, batch_size=4, seed=7)
        resumed.load_state_dict(state)
        assert resumed.step == cut
        tail = _batches(resumed, 20 - cut)
        assert all(torch.equal(a, b) for a, b in zip(head + tail, straight, strict=True))
    with pytest.raises(DataError, match="batch_size: saved 4, now 5"):
        BlockLoader(blocks, batch_size=5, seed=7).load_state_dict(state)
    with pytest.raises(DataError, match="seed"):
        BlockLoader(blocks, batch_size=4, seed=8).load_state_dict(state)


def test_block_loader_and_eval_batches_validate() -> None:
    blocks = torch.zeros(3, 9, dtype=torch.long)
    with pytest.raises(DataError, match="only 3 training blocks for batch_size=4"):
        BlockLoader(blocks, batch_size=4)
    with pytest.raises(DataError, match="shape"):
        BlockLoader(torch.zeros(9, dtype=torch.long), batch_size=1)
    sizes = [x.shape[0] for x, _ in eval_batches(torch.zeros(7, 9, dtype=torch.long), 3)]
    assert sizes == [3, 3, 1]


def test_build_blocks_from_embedded_corpus_is_quick() -> None:
    docs = embedded_corpus(300_000, seed=0)
    tok = Tokenizer.train(docs, vocab_size=1024)
    start = time.process_time()  # CPU time summed over tokenizer threads
    train, val = build_blocks(docs, tok, block_size=64, val_fraction=0.05, seed=0)
    elapsed = time.process_time() - start
    assert elapsed < 5.0
    assert train.shape[1] == val.shape[1] == 65
    assert 0.04 < val.shape[0] / (train.shape[0] + val.shape[0]) < 0.06
    flat = torch.cat([train, val]).flatten()
    assert (flat == tok.bos_id).sum() > 0.8 * len(docs) * 0.9  # nearly every document starts with bos
    assert int(flat.max()) < tok.vocab_size
    # Decoding a packed block gives back corpus text.
    text = tok.decode(train[0])
    assert text and text[:20] in "\n".join(docs)
