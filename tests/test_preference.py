"""Reward model and DPO: BT loss falls on separable pairs, DPO's loss and gradient point the right
way, pairs from rankings, and a tiny run of each command."""
from __future__ import annotations

import json

import pytest
import torch

from deploykit.train.preference import (PreferencePair, RewardModel, bradley_terry_loss, dpo_loss, embedded_pairs,
                                        pair_batch, read_pairs, response_logps)


def test_embedded_pairs_are_right_vs_wrong():
    pairs = embedded_pairs(5, split="train")
    assert {p.task for p in pairs} == {"add", "sub", "mul", "reverse", "sort", "recall"}
    assert all(p.chosen != p.rejected and p.prompt.endswith("### Response:\n") for p in pairs)


def test_rankings_give_all_ordered_pairs(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"prompt": "p", "responses": ["a", "b", "c"]}) + "\n")
    assert [(p.chosen, p.rejected) for p in read_pairs(f)] == [("a", "b"), ("a", "c"), ("b", "c")]


def test_dpo_loss_and_gradient_sign():
    pc = torch.tensor([0.0], requires_grad=True)
    pr = torch.tensor([0.0], requires_grad=True)
    zero = torch.zeros(1)
    loss = dpo_loss(pc, pr, zero, zero, beta=0.1)
    assert loss.item() == pytest.approx(torch.log(torch.tensor(2.0)).item())  # no preference yet: log 2
    loss.backward()
    assert pc.grad.item() < 0 < pr.grad.item()  # descent raises the chosen log-prob, lowers the rejected
    assert dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), zero, zero, 0.1) < loss


def test_response_logps_ignore_the_prompt(nano_checkpoint, tokenizer):
    from deploykit.model.checkpoint import load_model

    model = load_model(nano_checkpoint).eval()
    a = PreferencePair("t", "### Response:\n", "12", "13")
    b = PreferencePair("t", "### Instruction:\nsomething else\n\n### Response:\n", "12", "13")
    with torch.no_grad():
        la = response_logps(model, *pair_batch(tokenizer, [a], 64))
        lb = response_logps(model, *pair_batch(tokenizer, [b], 64))
    assert la.shape == (2,) and (la < 0).all()
    assert not torch.allclose(la, lb)  # conditioned on the prompt, but ...
    inputs, targets = pair_batch(tokenizer, [a], 64)
    assert (targets != -100).sum(-1).tolist() == [len(tokenizer.encode("12")) + 1] * 2  # ... only response + eos scored


def test_bt_loss_decreases_on_separable_pairs(nano_checkpoint, tokenizer):
    from deploykit.model.checkpoint import load_model

    torch.manual_seed(0)
    rm = RewardModel(load_model(nano_checkpoint))
    pairs = [PreferencePair("t", f"### Input:\n{i}\n### Response:\n", "good good", "bad") for i in range(8)]
    inputs, targets = pair_batch(tokenizer, pairs, 64)
    opt = torch.optim.AdamW(rm.parameters(), lr=1e-3)
    losses = []
    for _ in range(15):
        r = rm(inputs, targets)
        loss = bradley_terry_loss(r[:8], r[8:])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)  # zero-initialised head: no preference
    assert losses[-1] < 0.3


@pytest.mark.parametrize("command", ["reward", "dpo"])
def test_command_end_to_end(nano_checkpoint, tmp_path, command, capsys):
    from deploykit.cli.main import main

    out = tmp_path / command
    argv = [command, str(nano_checkpoint), "--data", "embedded-tasks", "--steps", "2", "--batch-size", "2",
            "--pairs-per-task", "2", "--eval-per-task", "1", "--out", str(out), "--json"]
    argv += ["--max-new-tokens", "3"] if command == "dpo" else []
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == command
    assert main(argv) == 2  # not replaced without --force
    from deploykit.model.checkpoint import load_model
    load_model(out)


def test_bad_pairs_are_a_one_line_error(nano_checkpoint, tmp_path, capsys):
    from deploykit.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    assert main(["reward", str(nano_checkpoint), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "chosen" in capsys.readouterr().err
