"""deploykit.load: artifacts and checkpoints behind one Runner API, verified, thread-safe."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch

import deploykit
from deploykit.deploy.runtime import CheckpointRunner
from deploykit.errors import ArtifactError, ConfigError


@pytest.fixture(scope="module")
def fp32_artifact(nano_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "fp32"
    deploykit.convert(nano_checkpoint, "torch", "fp32", out)
    return out


def test_checkpoint_folder_loads_as_checkpoint_runner(nano_checkpoint):
    runner = deploykit.load(nano_checkpoint)
    assert isinstance(runner, CheckpointRunner) and runner.info.backend == "checkpoint"
    assert runner.tokenizer is not None and runner.info.kv_cache is True


def test_forward_accepts_lists_arrays_tensors(nano_checkpoint):
    runner = deploykit.load(nano_checkpoint)
    ids = [[1, 40, 41, 42]]
    a = runner.forward(ids)
    assert a.shape == (1, 4, 2048) and a.dtype == np.float32
    # Exact: every input form becomes the same (1, 4) ids, so the same runner computes the same thing.
    np.testing.assert_array_equal(a, runner.forward(np.array(ids)))
    np.testing.assert_array_equal(a, runner.forward(torch.tensor(ids)))
    np.testing.assert_array_equal(a, runner.forward(ids[0]))
    with pytest.raises(ConfigError):
        runner.forward([[]])
    with pytest.raises(ConfigError, match=r"input_ids must be token ids in \[0, 2048\)"):
        runner.forward([[1, 99999]])


def test_kv_cache_session_matches_full_forward(fp32_artifact):
    runner = deploykit.load(fp32_artifact)
    ids = [1, 30, 31, 32, 33, 34]
    full = runner.forward([ids])[0]  # (T, V)
    session = runner.new_session()
    first = session.feed(ids[:3])
    rest = [session.feed([t]) for t in ids[3:]]
    np.testing.assert_allclose(first, full[2], atol=1e-4)
    np.testing.assert_allclose(np.stack(rest), full[3:], atol=1e-4)


def test_artifact_and_checkpoint_generate_the_same(fp32_artifact, nano_checkpoint):
    a, c = deploykit.load(fp32_artifact), deploykit.load(nano_checkpoint)
    assert a.info.backend == "torch" and a.info.quant == "fp32"
    # Exact: the fp32 artifact is the checkpoint's weights in the same graph, so the same kernels
    # on the same shapes; any difference is a conversion bug, not float reordering.
    assert a.generate("Once upon a time", 12) == c.generate("Once upon a time", 12)
    assert isinstance(a.generate([1, 5, 6], 4), list)


def test_missing_manifest(fp32_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_artifact, copy)
    (copy / "deploykit.json").unlink()
    with pytest.raises(ArtifactError) as e:
        deploykit.load(copy)
    assert "not a deploykit artifact" in str(e.value) and "deploykit convert" in e.value.hint
    with pytest.raises(ArtifactError, match="no such folder"):
        deploykit.load(tmp_path / "nowhere")


def test_tampered_file_reports_sha256(fp32_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_artifact, copy)
    weights = copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF  # same size, different content
    weights.write_bytes(bytes(data))
    expected = json.loads((copy / "deploykit.json").read_text())["files"]["model.safetensors"]["sha256"]
    with pytest.raises(ArtifactError) as e:
        deploykit.load(copy)
    msg = str(e.value)
    assert "model.safetensors: sha256 mismatch" in msg and expected in msg
    (copy / "config.json").write_text("{}")
    with pytest.raises(ArtifactError, match="config.json: size"):
        deploykit.load(copy)


def test_bad_manifest_json(fp32_artifact, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_artifact, copy)
    (copy / "deploykit.json").write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        deploykit.load(copy)


@pytest.mark.parametrize("quant", ["fp32", "int8-dynamic"])
def test_runner_is_thread_safe(nano_checkpoint, tmp_path, quant):
    """8 threads × 50 calls (forward and decode sessions mixed) give exactly the serial results."""
    deploykit.convert(nano_checkpoint, "torch", quant, tmp_path / quant, verify=False)
    runner = deploykit.load(tmp_path / quant)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(3, 2000, size=(1, 1 + i % 7)) for i in range(50)]

    def call(i: int) -> np.ndarray:
        if i % 5 == 0:  # decode session: its own KV cache per call
            s = runner.new_session()
            s.feed(inputs[i][0, :-1].tolist() or [1])
            return s.feed(inputs[i][0, -1:].tolist())
        return runner.forward(inputs[i])

    serial = [call(i) for i in range(50)]
    results: dict[int, list[np.ndarray]] = {}
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        results[t] = [call(i) for i in range(50)]

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    # Exact: each call runs the same kernels on the same shapes with the same intra-op thread count
    # (torch's is process-wide), whichever Python thread makes it; a race shows as a difference.
    for t in range(8):
        for i in range(50):
            np.testing.assert_array_equal(results[t][i], serial[i])
