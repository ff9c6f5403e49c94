"""Training on torch.distributed with 2 gloo ranks on this CPU machine, launched by torchrun.

The claims: DDP on 2 ranks and FSDP2 on 2 ranks compute the same losses and weights as one process
with the same global batch; a run saved by 2 FSDP ranks resumes in one plain process (and one saved
by 2 DDP ranks under torchrun with 1 FSDP rank), continuing the loss curve; a SIGTERM that reaches
one rank stops every rank at the same step with one atomic checkpoint; pipeline stages over 2 ranks
give one process's loss and gradients. Nano model, a few steps: each torchrun launch costs a few
seconds of imports on 2 cores.
"""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from deploykit.train import TrainConfig, pretrain

ROOT = Path(__file__).resolve().parent.parent
TINY = dict(preset="nano", steps=4, batch_size=4, block_size=32, eval_interval=2, eval_iters=2,
            checkpoint_interval=0, threads=1, peak_flops=1e11, sample_tokens=4)
LOSS_RTOL = 1e-5  # all-reduce sums in another order than one process's backward: float rounding only
WEIGHT_ATOL = 1e-4  # AdamW divides by sqrt(v): rounding-level gradient differences move weights by ~lr * 1e-2


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    from deploykit.data import english_documents, task_documents
    from deploykit.model.tokenizer import Tokenizer

    root = tmp_path_factory.mktemp("corpus")
    docs = english_documents(50_000, seed=0) + task_documents(10_000, seed=0)
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    Tokenizer.train(docs, 512).save(root / "tok")
    return {"data": str(data), "tokenizer": root / "tok"}


def _flags(corpus: dict, out: Path, **kw) -> list[str]:
    args = {**TINY, **kw}
    argv = ["--data", corpus["data"], "--tokenizer", str(corpus["tokenizer"]), "--out", str(out), "--no-progress"]
    for key, value in args.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv


def _torchrun(nproc: int, argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "deploykit", "train", *argv]


def _run(cmd: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _losses(out: Path) -> list[tuple[int, float]]:
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "train"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / "model.safetensors"))


def _assert_same_run(ref: Path, got: Path) -> None:
    a, b = _losses(ref), _losses(got)
    assert [s for s, _ in a] == [s for s, _ in b]
    for (step, x), (_, y) in zip(a, b):
        assert y == pytest.approx(x, rel=LOSS_RTOL), f"step {step}: one process {x}, distributed {y}"
    wa, wb = _weights(ref), _weights(got)
    assert wa.keys() == wb.keys()
    worst = max((wa[k] - wb[k]).abs().max().item() for k in wa)
    assert worst < WEIGHT_ATOL


def test_ddp_and_fsdp_on_2_ranks_match_one_process_and_fsdp_resumes_in_one(corpus, tmp_path):
    ref = tmp_path / "one"
    pretrain(TrainConfig(out=ref, data=corpus["data"], tokenizer=corpus["tokenizer"], **TINY), progress=False,
             stream=None)

    ddp = tmp_path / "ddp"
    proc = _run(_torchrun(2, [*_flags(corpus, ddp), "--strategy", "ddp", "--json"]))
    summary = json.loads(proc.stdout.strip().splitlines()[-1])  # rank 0 alone prints the summary
    assert summary["world_size"] == 2 and summary["strategy"] == "ddp" and summary["steps"] == 4
    assert "2 ranks (ddp, gloo on cpu)" in proc.stdout + proc.stderr
    _assert_same_run(ref, ddp)

    # FSDP2 on 2 ranks stops half-way; one plain process (no process group) resumes its DCP shards.
    fsdp = tmp_path / "fsdp"
    _run(_torchrun(2, [*_flags(corpus, fsdp, stop_at=2), "--strategy", "fsdp"]))
    state = json.loads((fsdp / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["optimizer"] == {"format": "dcp", "world_size": 2, "strategy": "fsdp"}
    assert (fsdp / "trainer_state.dcp" / ".metadata").is_file()
    res = pretrain(TrainConfig(out=fsdp, data=corpus["data"], tokenizer=corpus["tokenizer"], resume=True, **TINY),
                   progress=False, stream=None)
    assert res.steps == 4 and res.world_size == 1
    _assert_same_run(ref, fsdp)


def _workers(parent: int, n: int, timeout: float = 60) -> dict[int, int]:
    """rank -> pid of torchrun's workers, once all ``n`` have started."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = {}
        for child in psutil.Process(parent).children(recursive=True):
            try:
                env = child.environ()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if "RANK" in env and "LOCAL_RANK" in env:
                found[int(env["RANK"])] = child.pid
        if len(found) == n:
            return found
        time.sleep(0.2)
    raise AssertionError("torchrun's workers did not start")


def test_sigterm_on_one_rank_stops_all_with_a_checkpoint_and_another_world_resumes(corpus, tmp_path):
    out = tmp_path / "run"
    cmd = _torchrun(2, [*_flags(corpus, out, steps=100000, eval_interval=0), "--strategy", "ddp"])
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    ranks = _workers(proc.pid, 2)
    for line in proc.stdout:  # rank 0's lines; the loop starts after "peak ..."
        if line.startswith("peak"):
            break
    time.sleep(2.0)
    os.kill(ranks[1], signal.SIGTERM)  # not rank 0, which writes the folder: the others must hear of it
    output, _ = proc.communicate(timeout=120)
    assert "[rank 1] SIGTERM: stopping after this step" in output, output[-3000:]
    assert "interrupted; saved" in output
    state = json.loads((out / "trainer_state.json").read_text())
    steps = _losses(out)
    assert state["step"] > 0 and [s for s, _ in steps] == list(range(1, state["step"] + 1))
    assert state["optimizer"]["world_size"] == 2

    # Another world size and strategy: 1 FSDP rank under torchrun continues the same curve.
    _run(_torchrun(1, ["--out", str(out), "--resume", "--no-progress", "--strategy", "fsdp",
                       "--stop-at", str(state["step"] + 2)]))
    after = _losses(out)
    assert after[: len(steps)] == steps and [s for s, _ in after] == list(range(1, state["step"] + 3))
    assert all(math.isfinite(loss) and loss < 10 for _, loss in after)  # still a language model's loss


def test_pipeline_stages_on_2_ranks_match_one_process(tmp_path):
    """Blocks split over 2 ranks by torch.distributed.pipelining (GPipe, 2 micro-batches): the loss and
    every parameter's gradient equal one process's forward/backward of the same batch."""
    import torch.nn.functional as F
    from safetensors.torch import load_file

    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM

    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          str(ROOT / "tests" / "distributed_worker.py"), str(tmp_path)])
    torch.manual_seed(0)
    model = CausalLM(preset("nano", tie_embeddings=False, vocab_size=256))
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (4, 16), generator=g)  # (B, T)
    y = torch.randint(0, 256, (4, 16), generator=g)  # (B, T)
    loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
    loss.backward()
    first, last = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert "__loss__" not in first and "model.embed_tokens.weight" in first and "lm_head.weight" in last
    assert last.pop("__loss__").item() == pytest.approx(loss.item(), rel=1e-6)
    got = {**first, **last}
    ref = {name: p.grad for name, p in model.named_parameters()}
    assert got.keys() == ref.keys()  # every parameter lives on exactly one stage
    for name, grad in ref.items():
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_pipeline_refuses_a_tied_head_and_bad_stage_counts():
    from deploykit.errors import ConfigError
    from deploykit.model.config import preset
    from deploykit.model.graph import CausalLM
    from deploykit.train.pipeline import stage_bounds, stage_module

    assert stage_bounds(4, 2) == [(0, 2), (2, 4)] and stage_bounds(5, 2) == [(0, 2), (2, 5)]
    with pytest.raises(ConfigError, match="tied"):
        stage_module(CausalLM(preset("nano", vocab_size=256)), 0, 2)
    with pytest.raises(ConfigError, match="stages"):
        stage_bounds(4, 5)


@pytest.mark.parametrize("bad, message", [(dict(batch_size=3), "--batch-size 3 is not divisible by the world size 2"),
                                          (dict(time_budget=30.0), "--time-budget is not supported under torchrun")])
def test_torchrun_refuses_a_batch_that_does_not_split_and_a_time_budget(corpus, tmp_path, monkeypatch, bad, message):
    """Refused before joining the process group: no rank is left waiting for one that gave up."""
    from deploykit.errors import ConfigError

    for key, value in dict(RANK="0", WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT="1").items():
        monkeypatch.setenv(key, value)  # what torchrun sets; port 1 would fail if anything tried to join
    with pytest.raises(ConfigError, match=message):
        pretrain(TrainConfig(out=tmp_path / "a", data=corpus["data"], tokenizer=corpus["tokenizer"],
                             **{**TINY, **bad}), progress=False, stream=None)
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_on_2_fsdp_ranks(corpus, tmp_path):
    """The other direction: AdamW's unsharded state from trainer_state.safetensors is resharded onto
    FSDP2's DTensor parameters (set_optimizer_state_dict with full_state_dict)."""
    ref = tmp_path / "one"
    pretrain(TrainConfig(out=ref, data=corpus["data"], tokenizer=corpus["tokenizer"], **TINY), progress=False,
             stream=None)
    half = tmp_path / "half"
    pretrain(TrainConfig(out=half, data=corpus["data"], tokenizer=corpus["tokenizer"], stop_at=2, **TINY),
             progress=False, stream=None)
    _run(_torchrun(2, ["--out", str(half), "--resume", "--no-progress", "--strategy", "fsdp", "--stop-at", "4"]))
    assert json.loads((half / "trainer_state.json").read_text())["optimizer"]["format"] == "dcp"
    _assert_same_run(ref, half)
