"""The export cache a `deploykit bench` run shares between its conversion workers
(``$DEPLOYKIT_ONNX_EXPORT_CACHE``): a second export of the same model is a copy of the first, a model
with other weights is exported again, and with the variable unset nothing is kept."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("onnxscript")
pytest.importorskip("onnx")

from deploykit import preset  # noqa: E402
from deploykit.deploy import onnx_graph  # noqa: E402
from deploykit.model.graph import CausalLM  # noqa: E402


def _model(seed: int) -> CausalLM:
    torch.manual_seed(seed)
    return CausalLM(preset("nano", vocab_size=128, max_seq_len=16)).eval()


def _count_exports(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = torch.onnx.export

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", counting)
    return calls


def test_a_second_export_of_the_same_model_is_a_copy(tmp_path, monkeypatch):
    monkeypatch.setenv(onnx_graph.EXPORT_CACHE_ENV, str(tmp_path / "cache"))
    calls = _count_exports(monkeypatch)
    model = _model(0)
    first = onnx_graph.export_onnx(model, tmp_path / "a" / "model.onnx")
    second = onnx_graph.export_onnx(model, tmp_path / "b" / "model.onnx")
    assert len(calls) == 1
    assert second == first
    assert (tmp_path / "a" / "model.onnx").read_bytes() == (tmp_path / "b" / "model.onnx").read_bytes()
    assert len(list((tmp_path / "cache").iterdir())) == 1  # no temporary folder left behind

    with torch.no_grad():  # other weights, same config: a new export, a second entry
        other = _model(1)
        other.lm_head.weight.mul_(2)
    onnx_graph.export_onnx(other, tmp_path / "c" / "model.onnx")
    assert len(calls) == 2 and len(list((tmp_path / "cache").iterdir())) == 2


def test_nothing_is_kept_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(onnx_graph.EXPORT_CACHE_ENV, raising=False)
    calls = _count_exports(monkeypatch)
    model = _model(0)
    onnx_graph.export_onnx(model, tmp_path / "a.onnx")
    onnx_graph.export_onnx(model, tmp_path / "b.onnx")
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx"]


def test_bench_workers_share_the_runs_cache(tmp_path):
    from deploykit.bench.harness import worker_env

    assert worker_env(1, tmp_path)[onnx_graph.EXPORT_CACHE_ENV] == str(tmp_path / "onnx-export")
