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


# ---------------------------------------------------------------------------------------------
# the machine: CPU and ISA in the header, the native ISA variants exercised in the summary
# ---------------------------------------------------------------------------------------------
# Float results move in their last bits between CPUs (other BLAS blockings on AVX2, AVX-512, AMX),
# so a failure report must say which machine it came from.
MICROARCH = {  # (vendor, family, model or None) -> name, where the brand string is vague (VMs: "AMD EPYC")
    ("AuthenticAMD", 23, None): "Zen/Zen 2", ("AuthenticAMD", 25, None): "Zen 3/Zen 4",
    ("AuthenticAMD", 26, None): "Zen 5", ("GenuineIntel", 6, 85): "Skylake-SP/Cascade Lake",
    ("GenuineIntel", 6, 106): "Ice Lake-SP", ("GenuineIntel", 6, 143): "Sapphire Rapids",
    ("GenuineIntel", 6, 207): "Emerald Rapids", ("GenuineIntel", 6, 173): "Granite Rapids",
}
# cpuinfo flags that change which kernels oneDNN/MKL run (cpu_features() reports the ones ours use)
BLAS_FLAGS = ("avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8")


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo; {} where there is none (not Linux)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return {}
    fields: dict[str, str] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def _cpu_model(info: dict[str, str], brand: str) -> str:
    """The brand string (cpuid's, else cpuinfo's), with family/model/stepping and the microarchitecture."""
    name = " ".join((brand or info.get("model name", "") or "unknown CPU").split())
    vendor = info.get("vendor_id", "")
    try:
        family, model = int(info.get("cpu family", "")), int(info.get("model", ""))
    except ValueError:
        return name
    arch = MICROARCH.get((vendor, family, model)) or MICROARCH.get((vendor, family, None))
    detail = f"{vendor} family {family} model {model} stepping {info.get('stepping', '?')}"
    return f"{name} ({detail}{': ' + arch if arch else ''})"


def _machine() -> dict[str, str]:
    """What the header and the summary say about this machine: cpu, isa, native."""
    from deploykit import native

    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    guest = ", VM guest" if "hypervisor" in flags else ""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    blas = [f for f in BLAS_FLAGS if f in flags]
    if native.available():
        f = native.cpu_features()
        ours = [k for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni") if f.get(k)]
        forced = f" (forced by DEPLOYKIT_NATIVE_ISA={f['forced_isa']})" if f.get("forced_isa") else ""
        native_line = (f"selected {f['selected_isa']}{forced}; this CPU/OS runs {', '.join(f['supported_isas'])}")
        selected = f["selected_isa"]
        brand = f.get("brand", "")
    else:
        ours = [k for k in ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni") if k in flags]
        native_line = f"not built: {native.unavailable_reason()}"
        selected, brand = "none (not built)", ""
    return {
        "cpu": f"{_cpu_model(info, brand)}, {cores} core(s) for this process{guest}",
        "isa": (f"{' '.join(ours + blas) or 'no AVX2'}{'' if any(x.startswith('amx') for x in blas) else ' (no AMX)'}; "
                f"torch kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} thread(s)"),
        "native": native_line,
        "selected": selected,
        "cpu_short": _cpu_model(info, brand),
    }


def pytest_report_header(config: pytest.Config) -> list[str]:
    m = _machine()
    return [f"cpu: {m['cpu']}", f"cpu isa: {m['isa']}", f"native kernels: {m['native']}"]


class IsaTally:
    """Counts the outcome of every test parametrized by ``isa`` (tests/native, via
    native_helpers.isa_params) per variant, and prints one line at the end, so ``make test`` says
    which kernel variants it really ran on this machine and which it skipped."""

    def __init__(self) -> None:
        self.isa_of: dict[str, str] = {}  # nodeid -> its isa parameter
        self.outcome: dict[str, str] = {}  # nodeid -> passed / skipped / failed

    def pytest_collection_modifyitems(self, items: list[pytest.Item]) -> None:
        for item in items:  # deselected ones (-m, -k) too: only tests that report an outcome are counted
            callspec = getattr(item, "callspec", None)
            if callspec is not None and "isa" in callspec.params:
                self.isa_of[item.nodeid] = str(callspec.params["isa"])

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.nodeid not in self.isa_of or self.outcome.get(report.nodeid) == "failed":
            return
        if report.failed:
            self.outcome[report.nodeid] = "failed"  # in any phase, teardown included
        elif report.skipped:
            self.outcome[report.nodeid] = "skipped"  # skipif marks are evaluated at setup
        elif report.when == "call":
            self.outcome[report.nodeid] = "passed"

    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not self.outcome:
            return
        per_isa: dict[str, dict[str, int]] = {}
        for nodeid, isa in self.isa_of.items():  # collection order: the order of isa_params
            if nodeid in self.outcome:
                counts = per_isa.setdefault(isa, {"passed": 0, "skipped": 0, "failed": 0})
                counts[self.outcome[nodeid]] += 1
        parts = []
        for isa, counts in per_isa.items():
            others = [f"{counts[kind]} {kind}" for kind in ("skipped", "failed") if counts[kind]]
            parts.append(f"{isa} {counts['passed']} passed" + (f" ({', '.join(others)})" if others else ""))
        m = _machine()
        terminalreporter.write_line(f"native ISA variants: {', '.join(parts)} "
                                    f"(CPU: {m['cpu_short']}, selected {m['selected']})")


def pytest_configure(config: pytest.Config) -> None:
    config.pluginmanager.register(IsaTally(), "deploykit-isa-tally")
