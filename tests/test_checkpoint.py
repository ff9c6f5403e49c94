"""Checkpoint folders: transformers loads ours, we load theirs, with the same logits; safe I/O."""
from __future__ import annotations

import json
import os

import pytest
import torch
from tolerances import assert_same_greedy

from deploykit.errors import CheckpointError, TargetExistsError
from deploykit.model.checkpoint import load_config, load_model, save_model
from deploykit.model.config import preset
from deploykit.model.graph import CausalLM

transformers = pytest.importorskip("transformers")

ATOL = 1e-4


def tiny(name: str):
    return preset(name, vocab_size=320, max_seq_len=64)


def logits_close(ours: CausalLM, hf, vocab: int) -> float:
    ids = torch.randint(0, vocab, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return (ours(ids) - hf(ids).logits).abs().max().item()


@pytest.mark.parametrize("name, hf_class", [
    ("nano", "LlamaForCausalLM"), ("nano-moe", "MixtralForCausalLM"), ("nano-legacy", "GPT2LMHeadModel"),
])
@pytest.mark.parametrize("tied", [True, False])
def test_transformers_loads_our_checkpoint(tmp_path, name, hf_class, tied):
    torch.manual_seed(0)
    cfg = tiny(name).replace(tie_embeddings=tied)
    model = CausalLM(cfg).eval()
    save_model(model, tmp_path / "ck")
    assert {"config.json", "model.safetensors", "generation_config.json"} <= set(os.listdir(tmp_path / "ck"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ck").eval()
    assert type(hf).__name__ == hf_class
    assert logits_close(model, hf, cfg.vocab_size) < ATOL


def _hf_configs():
    common = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return {
        "llama": lambda: transformers.LlamaConfig(**common, rope_theta=500000.0),
        "mistral": lambda: transformers.MistralConfig(**common, sliding_window=None),
        "qwen2": lambda: transformers.Qwen2Config(**common, tie_word_embeddings=True),
        "mixtral": lambda: transformers.MixtralConfig(**common, num_local_experts=4, num_experts_per_tok=2),
        "gpt2": lambda: transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                                activation_function="gelu", bos_token_id=1, eos_token_id=2),
    }


@pytest.mark.parametrize("family", list(_hf_configs()))
def test_we_load_transformers_checkpoints(tmp_path, family):
    torch.manual_seed(0)
    hf_cfg = _hf_configs()[family]()
    hf = transformers.AutoModelForCausalLM.from_config(hf_cfg).eval()
    with torch.no_grad():  # transformers zero-inits biases; give them values so the mapping is tested
        for n, p in hf.named_parameters():
            if n.endswith("bias"):
                p.normal_(0, 0.02)
    hf.save_pretrained(tmp_path / family)
    ours = load_model(tmp_path / family)
    assert "deploykit" not in json.loads((tmp_path / family / "config.json").read_text())
    assert logits_close(ours, hf, 320) < ATOL
    # and generation through our KV cache agrees with transformers' greedy decode (token for token,
    # unless two logits are within float reordering of each other: other kernels, other sums)
    from deploykit.model.generation import generate
    prompt = [5, 17, 33, 2 + 40]
    new = generate(ours, prompt, 8, eos_token_id=-1)
    want = hf.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False, eos_token_id=None,
                       pad_token_id=0)[0, len(prompt):].tolist()

    @torch.no_grad()
    def hf_logits(ids: list[int]) -> torch.Tensor:
        return hf(torch.tensor([ids])).logits[0, -1]  # (V,)
    assert_same_greedy(new, want, hf_logits, prompt)


def test_unsupported_transformers_features_are_named(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                   num_attention_heads=2, hidden_act="gelu")
    transformers.AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="hidden_act='gelu'"):
        load_model(tmp_path / "m")


def test_pickle_checkpoints_are_refused_with_a_conversion_hint(tmp_path):
    folder = tmp_path / "pickled"
    folder.mkdir()
    save_model(CausalLM(tiny("nano")), tmp_path / "ok")
    (folder / "config.json").write_text((tmp_path / "ok" / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, folder / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as err:
        load_model(folder)
    text = str(err.value)
    assert "pytorch_model.bin" in text and "pickle" in text and "save_pretrained" in text


def test_truncated_safetensors_is_reported(tmp_path):
    save_model(CausalLM(tiny("nano")), tmp_path / "ck")
    weights = tmp_path / "ck" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(tmp_path / "ck")


def test_config_that_does_not_match_weights(tmp_path):
    save_model(CausalLM(tiny("nano")), tmp_path / "ck")
    cfg_path = tmp_path / "ck" / "config.json"
    data = json.loads(cfg_path.read_text())
    data["deploykit"]["model_config"]["ffn_dim"] = 512
    cfg_path.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match=r"does not match the weights.*mlp\.gate_proj\.weight"):
        load_model(tmp_path / "ck")


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_config(tmp_path / "empty")


def test_save_is_atomic_when_interrupted(tmp_path, monkeypatch):
    target = tmp_path / "ck"
    first = CausalLM(tiny("nano"))
    save_model(first, target)
    before = (target / "model.safetensors").read_bytes()

    import safetensors.torch

    def exploding_save(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half a file")
        raise KeyboardInterrupt  # as if Ctrl-C arrived mid-write

    monkeypatch.setattr(safetensors.torch, "save_file", exploding_save)
    with pytest.raises(KeyboardInterrupt):
        save_model(CausalLM(tiny("nano")), target, overwrite=True)
    with pytest.raises(KeyboardInterrupt):
        save_model(CausalLM(tiny("nano")), tmp_path / "fresh")
    assert (target / "model.safetensors").read_bytes() == before  # the old checkpoint is intact
    assert not (tmp_path / "fresh").exists()  # no half checkpoint under the new name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no temp folders left behind


def test_existing_target_needs_overwrite(tmp_path):
    save_model(CausalLM(tiny("nano")), tmp_path / "ck")
    with pytest.raises(TargetExistsError, match="already exists"):
        save_model(CausalLM(tiny("nano")), tmp_path / "ck")


def test_save_load_round_trip_is_exact(tmp_path):
    torch.manual_seed(3)
    model = CausalLM(tiny("nano-moe")).eval()
    save_model(model, tmp_path / "ck")
    loaded = load_model(tmp_path / "ck")
    assert loaded.config == model.config
    ids = torch.randint(0, 320, (1, 12))
    with torch.no_grad():
        # Exact: fp32 weights round-trip bit for bit, and the same graph runs the same kernels on them.
        assert torch.equal(model(ids), loaded(ids))


def test_loading_draws_no_init_and_imports_no_compiler(nano_checkpoint):
    # load_model builds the graph on the meta device; any init draw or arange there goes through
    # torch._refs, whose first use imports torch._dynamo (~1.5 s of a fresh process's first load).
    import subprocess
    import sys

    code = ("import sys; from deploykit.model.checkpoint import load_model; "
            f"m = load_model({str(nano_checkpoint)!r}); "
            "print('torch._dynamo' in sys.modules, float(m.inv_freq[1]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "False"
    from deploykit.model.checkpoint import load_config
    from deploykit.model.graph import rope_inv_freq

    assert float(out[1]) == float(rope_inv_freq(load_config(nano_checkpoint))[1])  # the real buffer came back
