"""Shared fixtures: small models briefly TRAINED on the embedded corpus, so parity numbers mean something.

Random weights give flat, atypical logit distributions (every quantiser looks fine or every one looks
broken); a few dozen AdamW steps give peaked distributions like a real model's, in seconds.
The loop is inline on purpose: these fixtures must not depend on deploykit.train.
"""
from __future__ import annotations

import functools
import os
from pathlib import Path

import pytest
import torch

# Two cores are shared by the tests; torch's default thread count would oversubscribe them.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TRAIN_STEPS = 60
SEQ_LEN = 64
BATCH = 8


@functools.lru_cache(maxsize=1)
def _texts() -> list[str]:
    """A few hundred short documents from the embedded corpus generator (prose + task lines)."""
    from deploykit.data.corpus import english_documents
    from deploykit.data.tasks import task_documents

    return english_documents(30_000, seed=0) + task_documents(8_000, seed=0)


def make_tokenizer():
    from deploykit.model.tokenizer import Tokenizer

    return Tokenizer.train(_texts(), 2048)


def train_tiny(preset_name: str, folder: Path, tokenizer, *, steps: int = TRAIN_STEPS, seed: int = 0) -> Path:
    """Train ``preset_name`` for ``steps`` AdamW steps on packed corpus windows and save it to ``folder``."""
    from deploykit import CausalLM, preset, save_model

    torch.manual_seed(seed)
    cfg = preset(preset_name, vocab_size=2048)
    model = CausalLM(cfg)
    ids: list[int] = []
    for doc in _texts():
        ids += tokenizer.encode(doc, add_bos=True) + [tokenizer.eos_id]
    data = torch.tensor(ids[: (len(ids) // (SEQ_LEN + 1)) * (SEQ_LEN + 1)]).view(-1, SEQ_LEN + 1)  # (N, T+1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for step in range(steps):
        batch = data[torch.randint(0, len(data), (BATCH,), generator=gen)]
        logits = model(batch[:, :-1])  # (B, T, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, cfg.vocab_size), batch[:, 1:].reshape(-1))
        aux = model.aux_loss()
        if aux is not None:
            loss = loss + cfg.router_aux_coef * aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    save_model(model, folder, tokenizer)
    return folder


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def nano_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return train_tiny("nano", tmp_path_factory.mktemp("ckpt") / "nano", tokenizer)


@pytest.fixture(scope="session")
def nano_moe_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return train_tiny("nano-moe", tmp_path_factory.mktemp("ckpt") / "nano-moe", tokenizer)


# ---------------------------------------------------------------------------------------------
# plugin helpers
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fresh_plugins():
    """A registry rebuilt from entry points for this test, and forgotten afterwards."""
    from deploykit.deploy import registry as plugins

    plugins.reset()
    yield plugins
    plugins.reset()


def install_fake_dist(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str] | None = None) -> Path:
    """Make ``site`` hold a distribution ``dist`` with deploykit.backends entry points (no pip needed).

    importlib.metadata discovers ``*.dist-info`` folders on sys.path, so adding ``site`` to sys.path
    exercises the same discovery an installed package gets.
    """
    info = site / f"{dist.replace('-', '_')}-0.0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.0.0\n")
    lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    (info / "entry_points.txt").write_text(f"[deploykit.backends]\n{lines}")
    for name, source in (modules or {}).items():
        (site / f"{name}.py").write_text(source)
    return site
