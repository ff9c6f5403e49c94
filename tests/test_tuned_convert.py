"""Fine-tuned and aligned models are ordinary checkpoints: a merged LoRA SFT model and a PPO policy
convert through every built-in backend that runs here, each passing its own parity proof."""
from __future__ import annotations

import pytest

# (backend, scheme): each backend's default or lossless scheme (native: int8, its only family). The
# slower-to-import edge and GPU backends take the PPO policy only: one tuned model proves the point.
CPU = [("torch", "fp32"), ("onnx", "fp32"), ("gguf", "f32"), ("native", "int8")]
EDGE = [("tflite", "fp32"), ("coreml", "fp16"), ("tensorrt", "fp16")]
CASES = [(k, b, s) for k in ("sft-lora-merged", "rlhf") for b, s in CPU] + [("rlhf", b, s) for b, s in EDGE]


@pytest.fixture(scope="module")
def tuned(nano_checkpoint, tmp_path_factory):
    """{"sft-lora-merged": folder, "rlhf": folder}, each from a few steps on the nano fixture."""
    from deploykit.train.preference import PreferenceConfig, train_reward
    from deploykit.train.rlhf import RlhfConfig, rlhf
    from deploykit.train.sft import SftConfig, merge_adapter, sft

    root = tmp_path_factory.mktemp("tuned")
    lora = sft(SftConfig(base=nano_checkpoint, data="embedded-tasks", out=root / "lora", method="lora", steps=3,
                         batch_size=4, train_per_task=4, eval_per_task=1, max_new_tokens=2))
    merged = merge_adapter(nano_checkpoint, lora.out, root / "merged")
    train_reward(PreferenceConfig(base=merged, data="embedded-tasks", out=root / "rm", steps=2, batch_size=2,
                                  pairs_per_task=2, eval_per_task=1))
    rlhf(RlhfConfig(policy=merged, reward=root / "rm", out=root / "ppo", steps=2, batch_size=2, minibatch_size=2,
                    max_new_tokens=3, eval_per_task=1, lr=1e-3))
    return {"sft-lora-merged": merged, "rlhf": root / "ppo"}


@pytest.mark.parametrize(("kind", "backend", "scheme"), CASES)
def test_tuned_model_converts_with_parity(tuned, kind, backend, scheme, tmp_path):
    import deploykit
    from deploykit.deploy.registry import get_backend

    missing = get_backend(backend).missing_requirements()
    if missing:
        pytest.skip(f"{backend} cannot run here: {'; '.join(missing)}")
    result = deploykit.convert(tuned[kind], backend, scheme, tmp_path / f"{kind}-{backend}")
    assert result.passed is True  # convert raises past tolerance; this checks a proof was run and held
    if backend == "coreml":
        return  # serving a Core ML package needs macOS; its proof above ran what Linux can (spec, weights, MIL)
    runner = deploykit.load(tmp_path / f"{kind}-{backend}")
    assert runner.forward([[1, 2, 3, 4]]).shape[:2] == (1, 4)
