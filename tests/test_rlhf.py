"""The PPO loop of ``deploykit rlhf``: token alignment, the KL controller, KV-cache sampling, the
direction of one update, and the command end to end on the nano fixture."""
from __future__ import annotations

import json
import math

import pytest
import torch

from deploykit.train.ppo import AdaptiveKL, masked_entropy, token_logps
from deploykit.train.sft import IGNORE


def test_token_logps_score_the_next_token_and_skip_ignored():
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]]]))  # (1, 3, 3)
    targets = torch.tensor([[IGNORE, 1, 2]])
    got = token_logps(logits, targets)
    torch.testing.assert_close(got, torch.tensor([[0.0, math.log(0.8), math.log(0.6)]]))


def test_entropy_of_a_uniform_distribution_is_log_v():
    logits = torch.zeros(2, 3, 5)
    mask = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    assert float(masked_entropy(logits, mask)) == pytest.approx(math.log(5))


def test_adaptive_kl_moves_towards_its_target_and_clips():
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(1.5, 10) == pytest.approx(0.1 * (1 + 0.2 * 0.1))  # error 0.5 clipped to 0.2
    ctl = AdaptiveKL(0.1, target=1.0, horizon=100)
    assert ctl.update(0.9, 10) == pytest.approx(0.1 * (1 - 0.1 * 0.1))
    fixed = AdaptiveKL(0.1, target=None)
    assert fixed.update(50.0, 10) == 0.1


@pytest.fixture(scope="module")
def nano(nano_checkpoint):
    from deploykit.model.checkpoint import load_model
    from deploykit.model.tokenizer import Tokenizer

    return load_model(nano_checkpoint).eval(), Tokenizer.load(nano_checkpoint)


def test_kv_cache_sampling_equals_full_recompute(nano):
    from deploykit.train.rlhf import sample_response

    model, tok = nano
    prompt = [tok.bos_id, *tok.encode("### Response:\n")]
    got = sample_response(model, prompt, max_new_tokens=6, temperature=1.0, eos_id=tok.eos_id,
                          generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(3)
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            probs = torch.softmax(model(torch.tensor([ids]))[0, -1].float(), dim=-1)
            nxt = int(torch.multinomial(probs, 1, generator=gen))
            want.append(nxt)
            ids.append(nxt)
            if nxt == tok.eos_id:
                break
    assert got == want


class _FixedScore(torch.nn.Module):
    """A stand-in reward model for the layout test: the contract is ``(inputs, targets) -> (B,)``."""

    def __init__(self, backbone, scores):
        super().__init__()
        self.backbone, self.scores = backbone, scores

    def forward(self, inputs, targets):
        return self.scores[: len(inputs)]


def _cfg(tmp_path, **kw):
    from deploykit.train.rlhf import RlhfConfig

    return RlhfConfig(policy=tmp_path / "p", reward=tmp_path / "r", out=tmp_path / "o", **kw)


def test_rollout_targets_are_the_sampled_ids_on_response_positions(nano, tmp_path):
    from deploykit.train.rlhf import PolicyWithValue, Prompt, rollout

    model, tok = nano
    prompts = [Prompt("t", "### Instruction:\nAdd.\n\n### Response:\n", "3"), Prompt("t", "### Response:\n", None)]
    pv = PolicyWithValue(model)
    ro = rollout(pv, _FixedScore(model, torch.tensor([1.0, -1.0])), tok, prompts, _cfg(tmp_path, max_new_tokens=5),
                 torch.Generator().manual_seed(0))
    for b, p in enumerate(prompts):
        n_prompt = 1 + len(tok.encode(p.text))
        response = ro.targets[b][ro.mask[b].bool()].tolist()
        assert 1 <= len(response) <= 5
        # the first response token is predicted from the last prompt position, and inputs hold the
        # prompt then the response but its last token
        assert ro.targets[b, : n_prompt - 1].eq(IGNORE).all()
        assert ro.targets[b, n_prompt - 1] == response[0]
        assert ro.inputs[b, n_prompt: n_prompt + len(response) - 1].tolist() == response[:-1]
        no_eos = response[-1] != tok.eos_id
        assert float(ro.scores[b]) == pytest.approx([1.0, -1.0][b] - 1.0 * no_eos)
    assert ro.correct[1] is None and isinstance(ro.correct[0], bool)


def test_one_ppo_iteration_moves_towards_the_rewarded_response(nano_checkpoint, nano, tmp_path):
    from deploykit.model.checkpoint import load_model
    from deploykit.train.ppo import AdaptiveKL
    from deploykit.train.rlhf import PolicyWithValue, Prompt, ppo_iteration, rollout

    _, tok = nano
    torch.manual_seed(0)
    policy, ref = load_model(nano_checkpoint), load_model(nano_checkpoint).eval()
    pv = PolicyWithValue(policy)
    cfg = _cfg(tmp_path, batch_size=2, minibatch_size=2, ppo_epochs=4, lr=3e-4, max_new_tokens=4, kl_coef=0.0)
    prompts = [Prompt("t", "### Response:\n", None)] * 2
    ro = rollout(pv, _FixedScore(policy, torch.tensor([2.0, -2.0])), tok, prompts, cfg, torch.Generator().manual_seed(1))

    def seq_logp(model):
        with torch.no_grad():
            return token_logps(model(ro.inputs), ro.targets).sum(-1)  # (2,)

    before = seq_logp(policy)
    opt = torch.optim.AdamW(pv.parameters(), lr=cfg.lr)
    stats = ppo_iteration(pv, ref, opt, ro, AdaptiveKL(0.0), cfg, torch.Generator().manual_seed(2))
    after = seq_logp(policy)
    assert after[0] > before[0] and after[1] < before[1]  # towards the +2 response, away from the -2 one
    assert stats["kl"] == pytest.approx(0.0, abs=1e-5)  # KL is measured on the rollout, before the update
    assert 0.0 <= stats["clip_fraction"] <= 1.0 and stats["entropy"] > 0


def test_rlhf_command_end_to_end(nano_checkpoint, tmp_path, capsys):
    from deploykit.cli.main import main

    rm = tmp_path / "rm"
    assert main(["reward", str(nano_checkpoint), "--data", "embedded-tasks", "--steps", "2", "--batch-size", "2",
                 "--pairs-per-task", "2", "--eval-per-task", "1", "--out", str(rm), "--json"]) == 0
    capsys.readouterr()
    out = tmp_path / "ppo"
    argv = ["rlhf", str(nano_checkpoint), "--reward", str(rm), "--steps", "2", "--batch-size", "2",
            "--minibatch-size", "1", "--max-new-tokens", "3", "--eval-per-task", "1", "--out", str(out), "--json"]
    assert main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["kind"] == "rlhf" and set(report["exact_match_before"]) >= {"add", "overall"}
    for key in ("reward", "kl", "kl_coef", "entropy", "clip_fraction", "value_loss", "sample_accuracy"):
        assert math.isfinite(report["last"][key]), key
    log = [json.loads(line) for line in (out / "rlhf_log.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in log] == [1, 2]
    assert (out / "rlhf.png").stat().st_size > 1000
    import deploykit

    runner = deploykit.load(out)  # the tuned policy is an ordinary checkpoint
    assert runner.forward([[1, 2, 3]]).shape[-1] > 0
    assert main(argv) == 2  # not replaced without --force
    assert "--force" in capsys.readouterr().err


def test_rlhf_refuses_a_checkpoint_that_is_not_a_reward_model(nano_checkpoint, tmp_path, capsys):
    from deploykit.cli.main import main

    code = main(["rlhf", str(nano_checkpoint), "--reward", str(nano_checkpoint), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and "not a reward model" in err and "deploykit reward" in err
    assert not (tmp_path / "o").exists()


def test_rlhf_config_is_validated(tmp_path):
    from deploykit.errors import ConfigError

    with pytest.raises(ConfigError, match="minibatch_size"):
        _cfg(tmp_path, batch_size=2, minibatch_size=4)
    with pytest.raises(ConfigError, match="target_kl"):
        _cfg(tmp_path, target_kl=0.0)



class _Captured(Exception):
    """Raised by a stubbed stage with the config the CLI built for it."""


def _capture(cfg, *args, **kwargs):
    raise _Captured(cfg)


@pytest.mark.parametrize("template", ["seed", "qa"])
def test_template_lays_out_reward_dpo_and_rlhf_prompts_as_sft_did(template, monkeypatch):
    # A model tuned in one layout must be scored, preferred and rolled out in that layout: --template
    # reaches every stage's embedded prompts, and they are the very prompts sft trains on.
    from deploykit.cli.main import build_parser
    from deploykit.train import preference, rlhf
    from deploykit.train.sft import TEMPLATES, embedded_examples

    tpl = TEMPLATES[template]
    for name in ("train_reward", "train_dpo"):
        monkeypatch.setattr(preference, name, _capture)
    monkeypatch.setattr(rlhf, "rlhf", _capture)
    parser = build_parser()
    configs = {}
    for argv in (["reward", "b", "--data", "embedded-tasks", "--out", "o"],
                 ["dpo", "b", "--data", "embedded-tasks", "--out", "o"],
                 ["rlhf", "b", "--reward", "r", "--out", "o"]):
        args = parser.parse_args(argv + ["--template", template])
        with pytest.raises(_Captured) as got:
            args.func(args)
        configs[argv[0]] = got.value.args[0]
    assert {k: cfg.template for k, cfg in configs.items()} == {"reward": tpl, "dpo": tpl, "rlhf": tpl}

    sft_prompts = [tpl.prompt(e.instruction, e.input) for e in embedded_examples(2, split="train", seed=0)]
    pairs, _ = preference.load_pairs(configs["reward"])
    prompts, _ = rlhf.load_prompts(configs["rlhf"], configs["rlhf"].template)
    assert [p.prompt for p in pairs[:len(sft_prompts)]] == sft_prompts
    assert [p.text for p in prompts[:len(sft_prompts)]] == sft_prompts
    if template == "qa":
        assert sft_prompts[0].startswith("Q: ") and sft_prompts[0].endswith(" A: ")
