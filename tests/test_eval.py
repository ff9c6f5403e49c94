"""``deploykit eval``: window accounting, metrics, the multiple-choice set, and checkpoints and
artifacts measured alike through the Runner API."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from deploykit.eval.choice import embedded_choices, option_logprob
from deploykit.eval.metrics import corpus_bleu, exact_match, rouge_l, token_f1
from deploykit.eval.perplexity import sliding_perplexity, windows


@pytest.mark.parametrize(("n", "window", "stride"), [(10, 4, 4), (10, 4, 1), (10, 4, 3), (5, 8, 2), (257, 64, 48)])
def test_windows_score_every_target_once(n, window, stride):
    spans = windows(n, window, stride)
    scored = [t for _, end, first in spans for t in range(first, end)]
    assert scored == list(range(1, n))
    assert all(end - begin <= window and begin < first for begin, end, first in spans)


def test_stride_gives_each_target_the_promised_context():
    # with stride s every target after the first window sees at least window - s tokens of context
    for begin, end, first in windows(100, 16, 4)[1:]:
        assert first - begin >= 16 - 4


@pytest.fixture(scope="module")
def nano(nano_checkpoint):
    import deploykit
    from deploykit.model.tokenizer import Tokenizer

    return deploykit.load(nano_checkpoint), Tokenizer.load(nano_checkpoint)


def test_one_window_equals_full_sequence_cross_entropy(nano, nano_checkpoint):
    from deploykit.model.checkpoint import load_model

    runner, tok = nano
    stream = tok.encode("Once upon a time there was a small model. " * 6, add_bos=True)[:60]
    got = sliding_perplexity(runner.forward, stream, window=128, stride=64)
    model = load_model(nano_checkpoint).eval()
    with torch.no_grad():
        logits = model(torch.tensor([stream]))[0, :-1]
    ce = torch.nn.functional.cross_entropy(logits.double(), torch.tensor(stream[1:]))
    assert got.tokens == len(stream) - 1 and got.windows == 1
    assert got.nll == pytest.approx(float(ce), rel=1e-5)
    # overlapping windows see more context than disjoint blocks: never worse on this text
    blocks = sliding_perplexity(runner.forward, stream, window=16, stride=16)
    overlap = sliding_perplexity(runner.forward, stream, window=16, stride=4)
    assert blocks.tokens == overlap.tokens == len(stream) - 1 and overlap.windows > blocks.windows


def test_generation_metrics():
    assert exact_match(" 81\nQ: next", "81") == 1.0 and exact_match("8", "81") == 0.0
    assert token_f1("1 2 4", "1 2 3") == pytest.approx(2 / 3)
    assert token_f1("", "1") == 0.0
    assert corpus_bleu(["a b c d e"], ["a b c d e"]) == pytest.approx(100.0)
    assert corpus_bleu(["x y"], ["a b c d e"]) < 1.0
    assert rouge_l(["a b c"], ["a b c"]) == pytest.approx(1.0) and rouge_l(["a c"], ["a b c"]) == pytest.approx(0.8)


def test_embedded_choices_have_four_distinct_options_and_the_right_one():
    from deploykit.data.tasks import split_of

    choices = embedded_choices(60)
    assert len(choices) == 60 and {c.kind for c in choices} == {"add", "sub", "mul", "reverse", "sort", "recall"}
    for c in choices:
        assert len(set(c.options)) == 4 and split_of(c.prompt) == "eval"
    assert len({c.answer for c in choices}) > 1  # the right option is not always in the same place


def test_option_logprob_scores_only_the_option_tokens(nano, nano_checkpoint):
    from deploykit.model.checkpoint import load_model

    runner, tok = nano
    prompt, option = "Q: 2+3=? A:", "5"
    score, n = option_logprob(runner.forward, tok, prompt, option)
    full = tok.encode(prompt + " " + option, add_bos=True)
    model = load_model(nano_checkpoint).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([full]))[0].double(), -1)
    want = sum(float(logp[i - 1, full[i]]) for i in range(len(full) - n, len(full)))
    assert n >= 1 and score == pytest.approx(want, rel=1e-5)


def test_checkpoint_and_artifact_measure_alike(nano_checkpoint, tmp_path):
    import deploykit
    from deploykit.eval import EvalConfig, evaluate

    artifact = deploykit.convert(nano_checkpoint, "torch", "fp32", tmp_path / "art")
    cfg = EvalConfig(ppl_tokens=300, window=128, stride=64, n_tasks=6, n_choices=6, max_new_tokens=4)
    a, b = evaluate(nano_checkpoint, cfg), evaluate(artifact.path if hasattr(artifact, "path") else artifact, cfg)
    assert a["backend"] == "checkpoint" and b["backend"] == "torch"
    assert a["perplexity"]["ppl"] == pytest.approx(b["perplexity"]["ppl"], rel=1e-4)
    assert a["generation"]["overall"]["exact_match"] == b["generation"]["overall"]["exact_match"]
    assert a["choice"]["accuracy"] == b["choice"]["accuracy"]
    assert math.isfinite(a["perplexity"]["ppl"]) and a["perplexity"]["tokens"] == 299


def test_cli_json_and_a_bad_task_file(nano_checkpoint, tmp_path, capsys):
    from deploykit.cli.main import main

    argv = ["eval", str(nano_checkpoint), "--ppl-tokens", "200", "--n-tasks", "6", "--n-choices", "6",
            "--max-new-tokens", "3", "--json"]
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"perplexity", "generation", "choice"} and out["choice"]["chance"] == 0.25
    bad = tmp_path / "tasks.jsonl"
    bad.write_text('{"prompt": "Q: 1+1=? A:"}\n')
    assert main(["eval", str(nano_checkpoint), "--tasks", str(bad), "--suites", "generation"]) == 2
    assert "answer" in capsys.readouterr().err
    assert main(["eval", str(nano_checkpoint), "--suites", "vibes"]) == 2
    assert np.isfinite(out["perplexity"]["nll"])
