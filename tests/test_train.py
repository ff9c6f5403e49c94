"""Pretraining: loss falls, resume is bit-exact, saves are atomic, MoE aux loss, CLI errors, AdamW
groups, lr schedule, log and plot.

Every run uses `nano` on a small JSONL file with a tokenizer trained once per module, tiny blocks and
one thread (shared 2-core machines: one thread is both faster and deterministic there).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from deploykit.errors import ConfigError
from deploykit.train import TrainConfig, pretrain
from deploykit.train.optim import lr_at, param_groups

TINY = dict(preset="nano", steps=6, batch_size=4, block_size=32, eval_interval=3, eval_iters=2,
            checkpoint_interval=0, threads=1, peak_flops=1e11, sample_tokens=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A JSONL file of ~60k characters of the embedded corpus and a 512-token BPE trained on it."""
    from deploykit.data import english_documents, task_documents
    from deploykit.model.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = english_documents(50_000, seed=0) + task_documents(10_000, seed=0)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Tokenizer.train(docs, 512).save(root / "tok")
    return {"data": str(data), "tokenizer": root / "tok"}


def _cfg(corpus: dict, out: Path, **kw) -> TrainConfig:
    return TrainConfig(out=out, data=corpus["data"], tokenizer=corpus["tokenizer"], **{**TINY, **kw})


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]


def _train_losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _log(out) if r["kind"] == "train"]


# ---------------------------------------------------------------------------------------------
# training runs
# ---------------------------------------------------------------------------------------------
def test_loss_falls_and_outputs_are_written(corpus, tmp_path):
    out = tmp_path / "smoke"
    res = pretrain(_cfg(corpus, out, steps=30, lr=3e-3, eval_interval=10), progress=False, stream=None)
    losses = [loss for _, loss in _train_losses(out)]
    assert len(losses) == 30
    # From ln(512)≈6.2 at init; 30 steps on repetitive text must get well below.
    assert sum(losses[-5:]) / 5 < losses[0] - 1.0, losses
    assert res.steps == 30 and res.stopped == "done"
    assert res.val_ppl == pytest.approx(math.exp(res.val_loss))
    assert res.tokens == 30 * 4 * 32 and res.tokens_per_second > 0 and res.mfu > 0
    evals = [r for r in _log(out) if r["kind"] == "eval"]
    assert [r["step"] for r in evals] == [10, 20, 30]
    assert all(r["val_ppl"] == pytest.approx(math.exp(r["val_loss"])) for r in evals)
    png = (out / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    # OUT is a normal model folder: deploykit (and transformers, see test_checkpoint) load it.
    from deploykit.model.checkpoint import load_model

    model = load_model(out)
    assert model.config.vocab_size % 64 == 0 and model.config.vocab_size >= 512
    for name in ("config.json", "model.safetensors", "tokenizer.json", "trainer_state.json",
                 "trainer_state.safetensors"):
        assert (out / name).is_file(), name
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))  # nothing pickled
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, 512, (1, 12))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, model(ids), atol=1e-4)


def test_generate_command_reads_a_run_folder(corpus, tmp_path, capsys):
    out = tmp_path / "gen"
    pretrain(_cfg(corpus, out, steps=2), progress=False, stream=None)
    from deploykit.cli.main import main

    rc = main(["generate", str(out), "--prompt", "Mia has", "--max-new-tokens", "3", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["prompt"] == "Mia has"


def test_resume_is_bit_exact(corpus, tmp_path):
    kw = dict(grad_accum=2, eval_interval=2)
    full = tmp_path / "full"
    pretrain(_cfg(corpus, full, checkpoint_interval=3, **kw), progress=False, stream=None)
    split = tmp_path / "split"
    first = pretrain(_cfg(corpus, split, stop_at=3, **kw), progress=False, stream=None)
    assert first.stopped == "stop_at" and first.steps == 3
    assert json.loads((split / "trainer_state.json").read_text())["step"] == 3
    second = pretrain(_cfg(corpus, split, resume=True, **kw), progress=False, stream=None)
    assert second.steps == 6
    a, b = _train_losses(full), _train_losses(split)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5, 6]
    assert a == b  # exact float equality at every step, before and after the resume
    # The weights end identical too.
    from safetensors.torch import load_file

    wa, wb = load_file(str(full / "model.safetensors")), load_file(str(split / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_failed_save_leaves_previous_checkpoint_intact(corpus, tmp_path, monkeypatch):
    import importlib

    # The module, not the function `deploykit.train.pretrain` that the package exports under that name.
    pt = importlib.import_module("deploykit.train.pretrain")

    out = tmp_path / "atomic"
    pretrain(_cfg(corpus, out, steps=2), progress=False, stream=None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):  # called after model, tokenizer and state were written to the temp folder
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(pt, "plot_loss", boom)
    with pytest.raises(OSError, match="simulated"):
        pretrain(_cfg(corpus, out, steps=2, force=True, seed=1), progress=False, stream=None)
    after = {p.name: p.read_bytes() for p in out.iterdir()}
    assert after == before  # same files, same bytes
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "atomic"]
    assert leftovers == []  # no temporary folder left beside the target


def test_moe_trains_with_aux_loss(corpus, tmp_path):
    out = tmp_path / "moe"
    res = pretrain(_cfg(corpus, out, preset="nano-moe", steps=4), progress=False, stream=None)
    train = [r for r in _log(out) if r["kind"] == "train"]
    assert len(train) == 4
    for r in train:
        assert r["aux_loss"] >= 0.99  # Switch loss is >= 1 up to float error; exactly 1 when balanced
        assert len(r["expert_share"]) == 4 and sum(r["expert_share"]) == pytest.approx(1.0, abs=1e-3)
    assert res.active_params < res.params  # top-2 of 4 experts


# ---------------------------------------------------------------------------------------------
# command line errors
# ---------------------------------------------------------------------------------------------
def _cli(argv: list[str], capsys) -> tuple[int, str]:
    from deploykit.cli.main import main

    rc = main(["train", *argv])
    captured = capsys.readouterr()
    return rc, captured.err + captured.out


def test_cli_unknown_preset_lists_valid(tmp_path, capsys):
    rc, msg = _cli(["--preset", "huge", "--out", str(tmp_path / "x")], capsys)
    assert rc != 0 and "huge" in msg and "micro-moe" in msg and "nano" in msg


def test_cli_missing_data_path(tmp_path, capsys):
    missing = tmp_path / "no-such.txt"
    rc, msg = _cli(["--preset", "nano", "--data", str(missing), "--out", str(tmp_path / "x"), "--threads", "1"], capsys)
    assert rc != 0 and str(missing) in msg and not (tmp_path / "x").exists()


def test_cli_refuses_existing_out_without_force(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, msg = _cli(["--preset", "nano", "--out", str(out)], capsys)
    assert rc != 0 and str(out) in msg and "--force" in msg and "--resume" in msg
    assert (out / "keep.txt").read_text() == "mine"


def test_cli_resume_without_checkpoint(tmp_path, capsys):
    rc, msg = _cli(["--out", str(tmp_path / "nothing"), "--resume"], capsys)
    assert rc != 0 and "nothing" in msg


def test_cli_trains_and_prints_json(corpus, tmp_path, capsys):
    out = tmp_path / "cli"
    rc, _ = _cli(["--preset", "nano", "--data", corpus["data"], "--tokenizer", str(corpus["tokenizer"]),
                  "--steps", "3", "--batch-size", "2", "--block-size", "16", "--eval-iters", "1", "--threads", "1",
                  "--peak-flops", "1e11", "--sample-tokens", "2", "--no-progress", "--json", "--out", str(out)], capsys)
    assert rc == 0
    from deploykit.cli.main import main

    rc = main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress", "--json"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert rc == 0 and summary["steps"] == 4 and summary["out"] == str(out)
    for key in ("train_loss", "val_loss", "val_ppl", "tokens_per_second", "mfu", "params", "seconds"):
        assert key in summary


# ---------------------------------------------------------------------------------------------
# pieces
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["nano", "nano-moe", "nano-legacy", "micro"])
def test_weight_decay_groups(name):
    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM

    model = CausalLM(preset(name))
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    assert all(p.dim() >= 2 and id(p) not in embeddings for p in decay["params"])
    assert all(p.dim() == 1 or id(p) in embeddings for p in no_decay["params"])
    # Every parameter exactly once (a tied head is the embedding, listed once).
    ids = [id(p) for g in (decay, no_decay) for p in g["params"]]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    assert "model.embed_tokens.weight" in no_decay["names"]
    assert any(n.endswith("norm.weight") for n in no_decay["names"])
    assert "model.layers.0.self_attn.q_proj.weight" in decay["names"]


def test_lr_schedule_shape():
    kw = dict(lr=1.0, min_lr=0.1, warmup=10, total=110)
    lrs = [lr_at(s, **kw) for s in range(1, 121)]
    assert lrs[:10] == pytest.approx([s / 10 for s in range(1, 11)])  # linear warmup to the peak
    assert lrs[9] == 1.0
    decay = lrs[9:110]
    assert all(a >= b for a, b in zip(decay, decay[1:]))  # monotone cosine decay
    assert lr_at(60, **kw) == pytest.approx(0.55)  # halfway: (lr + min_lr) / 2
    assert lr_at(110, **kw) == 0.1 and lr_at(120, **kw) == 0.1  # min_lr at the end and after
    with pytest.raises(ConfigError):
        lr_at(0, **kw)


def test_train_config_validation(tmp_path):
    with pytest.raises(ConfigError, match="huge"):
        TrainConfig(out=tmp_path, preset="huge")
    with pytest.raises(ConfigError, match="block_size"):
        TrainConfig(out=tmp_path, preset="nano", block_size=4096)
    with pytest.raises(ConfigError, match="min_lr"):
        TrainConfig(out=tmp_path, lr=1e-3, min_lr=1e-2)
    with pytest.raises(ConfigError, match="force"):
        TrainConfig(out=tmp_path, resume=True, force=True)
    cfg = TrainConfig(out=tmp_path, preset="nano", lr=1e-3)
    assert cfg.min_lr == pytest.approx(1e-4) and cfg.warmup_steps(1000) == 50
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
