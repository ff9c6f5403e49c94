"""The convert/backends/generate commands as users and scripts meet them."""
from __future__ import annotations

import json

from deploykit.cli.main import main


def test_backends_json_lists_torch_schemes(capsys):
    assert main(["backends", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    torch_row = {b["name"]: b for b in data["backends"]}["torch"]
    assert torch_row["default_scheme"] == "fp32" and torch_row["available"] is True
    names = [s["name"] for s in torch_row["schemes"]]
    assert names == ["fp32", "bf16", "int8-dynamic", "int8-static", "int8-qat", "prune-l1", "prune-structured"]
    assert torch_row["schemes"][0]["tolerance"]["min_top1"] == 1.0


def test_backends_table(capsys):
    assert main(["backends"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "int8-dynamic" in out and "tolerance" in out


def test_help_teaches_with_examples(capsys):
    for cmd in ("convert", "backends"):
        try:
            main([cmd, "--help"])
        except SystemExit as e:
            assert e.code == 0
        out = capsys.readouterr().out
        assert "examples:" in out and f"deploykit {cmd}" in out


def test_convert_table_then_generate_artifact_and_checkpoint(nano_checkpoint, tmp_path, capsys):
    out = tmp_path / "art"
    assert main(["convert", str(nano_checkpoint), "--backend", "torch", "--quant", "bf16", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "PASS" in printed and "max |Δlogit|" in printed and "wrote" in printed
    for path in (out, nano_checkpoint):
        assert main(["generate", str(path), "--prompt", "Once upon a time", "--max-new-tokens", "5", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["backend"] == ("torch" if path == out else "checkpoint") and isinstance(data["completion"], str)


def test_convert_json_and_options(nano_checkpoint, tmp_path, capsys):
    out = tmp_path / "p"
    args = ["convert", str(nano_checkpoint), "--backend", "torch", "--quant", "prune-l1", "--option", "sparsity=0.5",
            "--out", str(out), "--json", "--threads", "2"]
    assert main(args) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["quant"] == "prune-l1" and data["parity_passed"] is True
    assert data["backend_info"]["sparsity"] == 0.5 and "model.safetensors" in data["files"]
    assert main(args) == 2  # exists now
    assert main(args[:-3] + ["--option", "nonsense", "--force"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err


def test_backends_table_keeps_brackets_of_plugin_text(capsys, monkeypatch):
    # a reason such as "pip install 'deploykit[tensorrt]'" is data, not rich markup
    import deploykit.cli.backends as cli_backends

    real = cli_backends.describe

    def with_brackets():
        data = real()
        row = data["backends"][0]
        row["available"], row["missing"] = False, ["pip install 'deploykit[extra]' [bold]"]
        return data

    monkeypatch.setattr(cli_backends, "describe", with_brackets)
    monkeypatch.setenv("COLUMNS", "300")
    assert main(["backends"]) == 0
    assert "deploykit[extra]' [bold]" in capsys.readouterr().out
