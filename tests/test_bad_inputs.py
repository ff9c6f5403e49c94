"""Bad inputs found around the parsers: each a deploykit error with one line, never a TypeError."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import deploykit
from deploykit.errors import ArtifactError, BackendError, ConfigError, DataError, first_line
from deploykit.train.config import TrainConfig


@pytest.mark.parametrize("content", ["[1]", '"x"', "{", "\xff"])
def test_malformed_tokenizer_config_is_a_data_error_naming_it(nano_checkpoint, tmp_path, content):
    import shutil

    folder = tmp_path / "ck"
    shutil.copytree(nano_checkpoint, folder)
    (folder / "special_tokens_map.json").unlink(missing_ok=True)
    (folder / "tokenizer_config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(DataError, match="tokenizer_config.json"):
        deploykit.load(folder)


@pytest.mark.parametrize("field, value", [("betas", ("a", 0.9)), ("lr", "x"), ("lr", float("nan")),
                                          ("weight_decay", None), ("bf16", 1), ("preset", 3)])
def test_train_config_types_fail_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=f"TrainConfig.{field}"):
        TrainConfig(out=Path("/tmp/never-written"), **{field: value})


def test_train_config_ints_become_floats():
    cfg = TrainConfig(out=Path("/tmp/never-written"), betas=(0, 0.95), lr=1)
    assert cfg.betas == (0.0, 0.95) and isinstance(cfg.betas[0], float) and isinstance(cfg.lr, float)


def test_a_file_the_backend_reads_must_be_listed_in_the_manifest(nano_checkpoint, tmp_path):
    out = tmp_path / "art"
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    original = (out / "deploykit.json").read_text()
    manifest = json.loads(original)
    del manifest["files"]["model.safetensors"]  # deleting the entry must not skip the file's sha256 check
    (out / "deploykit.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="model.safetensors is not listed"):
        deploykit.load(out)
    (out / "deploykit.json").write_text(original)
    (out / "README.md").write_text("notes beside the model are fine: the backend never reads them")
    assert deploykit.load(out).info.backend == "torch"


def test_runtime_errors_are_cut_to_their_first_line():
    assert first_line(RuntimeError("bad shape\n  at c10::Foo\n  at bar")) == "bad shape"
    assert first_line(RuntimeError("")) == "RuntimeError"


def test_a_plugin_crash_on_load_is_one_line(nano_checkpoint, tmp_path, monkeypatch):
    from deploykit.deploy import registry

    out = tmp_path / "art"
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    backend = registry.get_backend("torch")

    def crash(self, *args, **kwargs):
        raise RuntimeError("shape mismatch\nException raised from foo at /pytorch/c10/bar.cpp:42\nframe #0")

    monkeypatch.setattr(type(backend), "load", crash)
    with pytest.raises(BackendError) as e:
        deploykit.load(out)
    assert "shape mismatch" in str(e.value) and "frame #0" not in str(e.value) and "bug in that plugin" in str(e.value)


@pytest.mark.parametrize("content, message", [(b"\xff\xfe not utf-8\n", "not UTF-8"), (b'\n{oops\n', ":2: not JSON")])
def test_jsonl_data_of_sft_and_preferences_is_a_data_error_naming_the_line(tmp_path, content, message):
    from deploykit.train.preference import read_pairs
    from deploykit.train.sft import read_jsonl

    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    for reader in (read_jsonl, read_pairs):
        with pytest.raises(DataError, match=message):
            reader(path)
    with pytest.raises(DataError, match="no such file"):
        read_jsonl(tmp_path / "missing.jsonl")
