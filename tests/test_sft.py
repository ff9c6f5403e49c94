"""SFT: response-only labels on exact token boundaries, LoRA interop with peft/transformers, merge,
prompt tuning that touches only the soft prompt, and a tiny run of each command."""
from __future__ import annotations

import json

import pytest
import torch

from deploykit.errors import ConfigError
from deploykit.train.sft import (IGNORE, REPLAY, SftConfig, SftExample, TaskMixer, Template, attach_method, collate,
                                 embedded_examples, encode_example, load_soft_prompt, merge_adapter, replay_blocks,
                                 split_per_task)


def test_only_response_tokens_carry_labels(tokenizer):
    tpl = Template()
    for ex in embedded_examples(2, split="train") + [SftExample("t", "Say it.", "", "hello world")]:
        ids, labels = encode_example(tokenizer, tpl, ex, 256)
        prompt = tpl.prompt(ex.instruction, ex.input)
        first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
        assert all(lab == IGNORE for lab in labels[:first])  # one contiguous prompt span, then the response
        assert labels[first:] == ids[first:] and ids[-1] == tokenizer.eos_id
        # the boundary is exact: the prompt tokens decode to the prompt, the labelled ones to the output
        assert tokenizer.decode(ids[1:first]) == prompt
        assert tokenizer.decode(labels[first:-1]) == ex.output


def test_padding_carries_no_loss(tokenizer):
    rows = [encode_example(tokenizer, Template(), ex, 256) for ex in embedded_examples(1, split="train")]
    inputs, targets = collate(rows, tokenizer.pad_id)  # (B, T-1) each
    for b, (ids, labels) in enumerate(rows):
        assert targets[b, : len(labels) - 1].tolist() == labels[1:]
        assert (targets[b, len(labels) - 1:] == IGNORE).all()
        assert inputs[b, : len(ids) - 1].tolist() == ids[:-1]


def test_held_out_split_per_task():
    exs = [SftExample(t, "i", str(n), "o") for t in ("a", "b") for n in range(10)]
    train, held = split_per_task(exs, 3, seed=0)
    assert sorted(e.task for e in held) == ["a"] * 3 + ["b"] * 3
    assert not set(train) & set(held) and len(train) == 14


def test_replayed_prose_is_labelled_on_every_token_and_takes_its_share(tokenizer):
    blocks = replay_blocks(tokenizer, 50, 16, seed=0)
    assert len(blocks) == 50 and all(len(ids) == 17 and labels == ids for ids, labels in blocks)
    _, targets = collate(blocks[:4], tokenizer.pad_id)  # (4, 16): next-token targets everywhere
    assert (targets != IGNORE).all()
    tasks = {t: [encode_example(tokenizer, Template(), ex, 256)] for t, ex in (("a", SftExample("a", "i", "1", "2")),
                                                                               ("b", SftExample("b", "i", "3", "4")))}
    mixer = TaskMixer(tasks, 1.0, seed=0, replay=blocks, replay_share=0.25)
    drawn = [row for _ in range(100) for row in mixer.batch(40)]  # 4,000 draws
    replayed = sum(row in blocks for row in drawn) / len(drawn)
    assert abs(replayed - 0.25) < 0.03 and mixer.weights[mixer.tasks.index(REPLAY)] == 0.25
    assert sum(mixer.weights) == pytest.approx(1.0)
    assert TaskMixer(tasks, 1.0, seed=0).tasks == ["a", "b"]  # no replay: the tasks alone
    named = TaskMixer({"replay": tasks["a"]}, 1.0, seed=0, replay=blocks, replay_share=0.5)  # a user's task "replay"
    assert named.encoded["replay"] == tasks["a"] and named.encoded[REPLAY] == blocks


def test_groups_padded_apart_give_the_loss_of_one_batch(tokenizer, nano_checkpoint):
    """Task examples and replayed blocks are padded apart; the step's loss is still the mean over
    every labelled token, as one padded batch gives it."""
    import torch.nn.functional as F

    from deploykit.model.checkpoint import load_model
    from deploykit.train.sft import _summed_loss

    model = load_model(nano_checkpoint).eval()
    tasks = [encode_example(tokenizer, Template(), ex, 256) for ex in embedded_examples(1, split="train")]
    blocks = replay_blocks(tokenizer, 3, 24, seed=0)
    with torch.no_grad():
        parts = [_summed_loss(model, rows, tokenizer.pad_id) for rows in (tasks, blocks)]
        split = sum(t for t, _ in parts) / sum(n for _, n in parts)
        inputs, targets = collate(tasks + blocks, tokenizer.pad_id)
        logits = model(inputs)
        joint = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE)
    assert float(split) == pytest.approx(float(joint), rel=1e-5)
    mixer = TaskMixer({"t": tasks}, 1.0, seed=0, replay=blocks, replay_share=0.5)
    task_rows, replayed = mixer.batch_groups(64)
    assert task_rows and replayed and all(r in blocks for r in replayed) and all(r in tasks for r in task_rows)


def test_config_names_the_bad_field(tmp_path):
    with pytest.raises(ConfigError, match="replay"):
        SftConfig(base=tmp_path, data="embedded-tasks", out=tmp_path / "o", replay=1.0)
    with pytest.raises(ConfigError, match="method"):
        SftConfig(base=tmp_path, data="embedded-tasks", out=tmp_path / "o", method="qlora")
    with pytest.raises(ConfigError, match="steps"):
        SftConfig(base=tmp_path, data="embedded-tasks", out=tmp_path / "o", steps=0)


def _perturbed_lora(nano_checkpoint, tmp_path):
    """A LoRA model whose B matrices are non-zero (fresh LoRA is an identity), saved in PEFT's format."""
    from deploykit.model.checkpoint import load_model

    cfg = SftConfig(base=nano_checkpoint, data="embedded-tasks", out=tmp_path / "a", method="lora")
    wrapped, params = attach_method(load_model(nano_checkpoint), cfg)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    wrapped.save_pretrained(str(tmp_path / "adapter"), save_embedding_layers=False)
    return wrapped.eval(), params, tmp_path / "adapter"


def test_lora_adapter_loads_in_peft_on_transformers(nano_checkpoint, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ours, params, adapter = _perturbed_lora(nano_checkpoint, tmp_path)
    assert 0 < params["trainable_share"] < 0.2
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(nano_checkpoint), str(adapter)).eval()
    ids = torch.randint(0, 2000, (2, 12))
    with torch.no_grad():
        want = ours(ids)
        got = hf(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(nano_checkpoint)(input_ids=ids).logits
    assert (want - plain).abs().max() > 1e-3  # the adapter changes the outputs ...
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # ... identically in both


def test_merge_equals_unmerged(nano_checkpoint, tmp_path):
    from deploykit.model.checkpoint import load_model

    ours, _, adapter = _perturbed_lora(nano_checkpoint, tmp_path)
    merged = load_model(merge_adapter(nano_checkpoint, adapter, tmp_path / "merged")).eval()
    ids = torch.randint(0, 2000, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(merged(ids), ours(ids), atol=1e-4, rtol=1e-4)


def test_prompt_tuning_changes_only_the_soft_prompt(nano_checkpoint, tmp_path):
    from deploykit.model.checkpoint import load_model

    cfg = SftConfig(base=nano_checkpoint, data="embedded-tasks", out=tmp_path / "p", method="prompt", prompt_tokens=4)
    model = load_model(nano_checkpoint)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sp, params = attach_method(model, cfg)
    assert params["trainable_params"] == 4 * model.config.d_model
    soft = sp.embeddings.detach().clone()
    opt = torch.optim.SGD([p for p in sp.parameters() if p.requires_grad], lr=1.0)
    sp(torch.randint(0, 2000, (2, 8))).logsumexp(-1).mean().backward()
    opt.step()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert not torch.equal(sp.embeddings, soft)


@pytest.mark.parametrize("method", ["lora", "prompt", "full"])
def test_sft_command_end_to_end(nano_checkpoint, tmp_path, method, capsys):
    from deploykit.cli.main import main

    out = tmp_path / method
    argv = ["sft", str(nano_checkpoint), "--data", "embedded-tasks", "--method", method, "--steps", "2",
            "--batch-size", "4", "--train-per-task", "4", "--eval-per-task", "1", "--max-new-tokens", "3",
            "--replay", "0.5" if method == "full" else "0", "--out", str(out), "--json"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result["after"]) == {"add", "sub", "mul", "reverse", "sort", "recall", "overall"}
    assert json.loads((out / "sft_report.json").read_text())["replay"] == (0.5 if method == "full" else 0)
    assert [step for step, _ in result["loss_curve"]] == [1, 2]  # 2 steps: windows of one step
    assert all(loss > 0 for _, loss in result["loss_curve"])
    assert main(argv) == 2  # an existing run is not replaced without --force
    if method == "prompt":
        ids = torch.randint(0, 2000, (1, 5))
        assert load_soft_prompt(nano_checkpoint, out)(ids).shape == (1, 5, 2048)
    if method == "lora":
        assert main(["merge", str(nano_checkpoint), str(out), "--out", str(tmp_path / "merged")]) == 0
        from deploykit.model.checkpoint import load_model
        load_model(tmp_path / "merged")
    if method == "full":
        from deploykit.model.checkpoint import load_model
        load_model(out)


def test_bad_data_is_a_one_line_error(nano_checkpoint, tmp_path, capsys):
    from deploykit.cli.main import main

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    assert main(["sft", str(nano_checkpoint), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "output" in capsys.readouterr().err


def test_qa_template_is_the_corpus_task_format_and_prompts_tokenize_as_in_training(tokenizer):
    from deploykit.train.sft import TEMPLATES, encode_example, prompt_ids

    qa = TEMPLATES["qa"]
    ex = SftExample("add", "Add the two numbers.", "23+58=?", "81")
    prompt = qa.prompt(ex.instruction, ex.input)
    assert prompt == "Q: 23+58=? A: "  # no instruction shown; the space goes with the answer
    ids, labels = encode_example(tokenizer, qa, ex, 128)
    assert tokenizer.decode(ids[1:-1]) == "Q: 23+58=? A: 81" and ids[-1] == tokenizer.eos_id
    labelled = [i for i, lab in zip(ids, labels) if lab != IGNORE]
    assert tokenizer.decode(labelled[:-1]).strip() == "81"
    # what exact-match feeds is exactly the training text's prefix before the first labelled token
    fed = prompt_ids(tokenizer, prompt)
    first = next(i for i, lab in enumerate(labels) if lab != IGNORE)
    assert fed == ids[:first]


def test_template_needs_its_placeholders_unless_the_instruction_part_is_empty():
    with pytest.raises(ConfigError, match="instruction"):
        Template(instruction="### Instr:\n")
    with pytest.raises(ConfigError, match="input"):
        Template(instruction="", input="Q: A:")
    assert Template(instruction="", input="{input}").prompt("ignored", "x") == "x### Response:\n"
