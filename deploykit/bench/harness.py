"""Orchestration of ``deploykit bench``: plan the rows, convert (or reuse), measure each in a subprocess,
derive ratios against fp32 torch, and write the reports.

Reading order: the config → planning rows → running one subprocess → one row → the whole bench.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..deploy.onnx_graph import EXPORT_CACHE_ENV
from ..errors import BackendError, ConfigError
from ..fsutil import Destination
from . import cache
from .machine import (
    ALLOCATOR_ENV,
    available_cpus,
    finish_native_probe,
    library_versions,
    machine_info,
    start_native_probe,
)
from .quiet import QuietGuard
from .schema import COLUMN_NAMES, SCHEMA_VERSION, empty_row
from .zygote import Launcher

BASELINE = ("torch", "fp32")  # the first row, always: every ratio and delta is against it


@dataclass(frozen=True)
class BenchConfig:
    """Everything a bench run depends on; validated on construction (errors name the option)."""

    model: Path
    out: Path
    backends: tuple[str, ...] | None = None  # None: every registered backend
    schemes: tuple[str, ...] | None = None  # None: every scheme; items "scheme" or "backend:scheme"
    prompt_len: int = 128
    gen_len: int = 64
    batch: int = 1
    threads: int = field(default_factory=available_cpus)
    repeat: int = 10
    warmup: int = 2
    eval_data: str | None = None
    eval_tokens: int = 2048
    n_tasks: int = 60
    cache_dir: Path = field(default_factory=cache.default_cache_dir)
    use_cache: bool = True
    timeout_s: float = 1200.0  # per subprocess (one conversion or one measurement)
    keep_work: bool = False  # keep the temporary folder with inputs, specs and worker logs
    allow_busy: bool = False  # write into benchmarks/results/ on a busy machine too (stamped; see .quiet)
    force: bool = False  # replace an earlier bench report in ``out`` (never a folder bench did not write)
    # Conversions run before any measurement, this many at a time, each with threads // convert_jobs
    # threads; measurements always run one at a time with all ``threads``. 1: each row converts then
    # measures, as one would by hand (its convert_s is then a lone conversion's).
    convert_jobs: int = 1
    zygote: bool = True  # start the workers from one pre-imported parent (deploykit.bench.zygote)

    def __post_init__(self) -> None:
        for name, low in (("prompt_len", 1), ("gen_len", 1), ("batch", 1), ("threads", 1), ("repeat", 1),
                          ("warmup", 0), ("eval_tokens", 16), ("n_tasks", 0), ("convert_jobs", 1)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"--{name.replace('_', '-')} {value!r} must be an integer >= {low}")
        if self.timeout_s <= 0:
            raise ConfigError(f"--timeout {self.timeout_s} must be > 0 seconds")
        for name in ("allow_busy", "force", "use_cache", "keep_work", "zygote"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r} must be True or False")
        if not (self.model / "config.json").is_file():
            raise ConfigError(f"{self.model}: not a checkpoint folder (no config.json)",
                              hint="pass the folder written by `deploykit train` (e.g. runs/micro)")


class Reporter(Protocol):
    """Progress callbacks; the CLI draws them with rich, tests pass nothing."""

    def start(self, total: int) -> None: ...
    def stage(self, index: int, label: str, stage: str) -> None: ...
    def done(self, index: int, row: dict[str, Any]) -> None: ...


class _Silent:
    def start(self, total: int) -> None: pass
    def stage(self, index: int, label: str, stage: str) -> None: pass
    def done(self, index: int, row: dict[str, Any]) -> None: pass


# -- planning ------------------------------------------------------------------------------------------
@dataclass
class Planned:
    backend: str
    scheme: str
    reason: str | None = None  # set: the row is unavailable


def _registered() -> dict[str, Any]:
    from ..deploy import registry as plugins

    return plugins.backends()


def plan_rows(registered: dict[str, Any], backends: tuple[str, ...] | None,
              schemes: tuple[str, ...] | None, config: Any = None) -> list[Planned]:
    """Rows in table order: fp32 torch first, then each backend's schemes in its declared order.

    With the model's ``config``, a scheme that does not apply to it (``Backend.unsupported``) becomes
    a row carrying the reason instead of a conversion that fails.
    """
    if BASELINE[0] not in registered:
        raise BackendError("the torch backend is not registered; bench needs it for the fp32 baseline row",
                           hint="reinstall deploykit (`pip install -e .`) so its built-in backends are registered")
    names = list(registered) if backends is None or backends == ("all",) else list(backends)
    unknown = [b for b in names if b not in registered]
    if unknown:
        raise BackendError(f"unknown backend(s) {', '.join(unknown)} in --backends",
                           hint=f"valid: all, {', '.join(sorted(registered))}")
    wanted: dict[str, list[str]] = {b: [] for b in names}
    if schemes is None or schemes == ("all",):
        for b in names:
            wanted[b] = [s.name for s in registered[b].schemes]
    else:
        for item in schemes:
            b, _, s = item.rpartition(":")
            targets = [b] if b else names
            if b and b not in wanted:
                raise ConfigError(f"--schemes {item!r}: backend {b!r} is not among --backends {','.join(names)}",
                                  hint=f"add it to --backends or write just {s!r}")
            offered = [t for t in targets if s in {x.name for x in registered[t].schemes}]
            if not offered:
                valid = sorted({f"{t}:{x.name}" for t in targets for x in registered[t].schemes})
                raise ConfigError(f"--schemes {item!r}: no selected backend offers scheme {s!r}",
                                  hint=f"valid: {', '.join(valid)}")
            for t in offered:
                if s not in wanted[t]:
                    wanted[t].append(s)
    # Backends in a stable order: torch first, then by name; schemes in the backend's own order.
    order = sorted(wanted, key=lambda b: (b != BASELINE[0], b))
    rows = [Planned(*BASELINE)]
    for b in order:
        declared = [x.name for x in registered[b].schemes]
        chosen = sorted(wanted[b], key=declared.index)
        try:
            missing = list(registered[b].missing_requirements())
        except Exception as e:  # a broken plugin must not take the other rows down
            missing = [f"missing_requirements() raised {type(e).__name__}: {e}"]
        if missing:
            if chosen:
                rows.append(Planned(b, ",".join(chosen), reason="; ".join(missing)))
            continue
        for s in chosen:
            if (b, s) == BASELINE:
                continue
            reason = None if config is None else registered[b].unsupported(registered[b].scheme(s), config)
            rows.append(Planned(b, s, reason=f"not applicable: {reason}" if reason else None))
    return rows


# -- subprocesses -----------------------------------------------------------------------------------------
def worker_env(threads: int, work: Path | None = None) -> dict[str, str]:
    """The environment of every worker: identical allocator settings and thread counts for every row;
    with ``work``, the run's onnx exports are shared there (every onnx and tensorrt scheme of the model
    starts from the same fp32 graph, which is most of each conversion)."""
    env = dict(os.environ)
    if work is not None:
        env[EXPORT_CACHE_ENV] = str(work / "onnx-export")
    env.update(ALLOCATOR_ENV)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    return env


def run_worker(spec: dict[str, Any], work: Path, name: str, timeout_s: float, threads: int,
               launcher: Launcher | None = None) -> dict[str, Any]:
    """Run ``deploykit.bench.worker`` on ``spec``; a crash, timeout or exception becomes {"ok": False, ...}.

    Through ``launcher``'s zygote when given (the run's workers share one pre-imported parent), else as
    a plain subprocess with :func:`worker_env`."""
    spec_path, log_path, result_path = work / f"{name}.spec.json", work / f"{name}.log", work / f"{name}.result.json"
    spec = {**spec, "result": str(result_path)}
    spec_path.write_text(json.dumps(spec, indent=1))
    result_path.unlink(missing_ok=True)
    launcher = launcher or Launcher(worker_env(threads, work), use_zygote=False)
    try:
        rc = launcher.run(spec_path, log_path, timeout_s)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout_s:.0f} s (raise --timeout if it is just slow)",
                "log": str(log_path)}
    if result_path.is_file():
        return {**json.loads(result_path.read_text()), "log": str(log_path)}
    tail = _tail(log_path)
    detail = _tail(log_path, lines=20, sep="\n")
    if rc < 0:
        what = f"worker crashed ({signal.Signals(-rc).name})"
    else:
        what = f"worker exited with code {rc} without a result"
    return {"ok": False, "error": f"{what}{': ' + tail if tail else ''}", "log": str(log_path), "traceback": detail}


def _tail(path: Path, lines: int = 1, sep: str = " | ") -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return sep.join(line.rstrip() for line in text[-lines:])


# -- one row --------------------------------------------------------------------------------------------
@dataclass
class Context:
    cfg: BenchConfig
    registered: dict[str, Any]
    source_sha: str
    model_name: str
    work: Path
    reporter: Reporter
    launcher: Launcher | None = None  # None: a plain subprocess per worker


def ensure_artifact(ctx: Context, backend: str, scheme: str, index: int = 0,
                    threads: int | None = None) -> tuple[Path, dict[str, Any]]:
    """The cached artifact for (backend, scheme), converting it in a worker when missing (with
    ``threads``, default the bench's).

    Returns the folder and {"cached": bool, "convert_s": float | None} or {"ok": False, "error": ...}.
    """
    be = ctx.registered[backend]
    versions = {**_backend_versions(be), "code": cache.code_fingerprint(type(be).__module__)}
    key = cache.artifact_key(ctx.source_sha, backend, scheme, versions)
    artifact = cache.artifact_path(ctx.cfg.cache_dir, ctx.model_name, ctx.source_sha, backend, scheme, key)
    if ctx.cfg.use_cache and cache.read_manifest(artifact) is not None:
        return artifact, {"ok": True, "cached": True, "convert_s": None}
    ctx.reporter.stage(index, f"{backend}/{scheme}", "converting")
    artifact.parent.mkdir(parents=True, exist_ok=True)
    threads = threads or ctx.cfg.threads
    spec = {"phase": "convert", "backend": backend, "scheme": scheme, "source": str(ctx.cfg.model),
            "artifact": str(artifact), "threads": threads}
    result = run_worker(spec, ctx.work, f"{index:02d}-{backend}-{scheme}-convert", ctx.cfg.timeout_s, threads,
                        ctx.launcher)
    if result["ok"] and cache.read_manifest(artifact) is None:
        result = {"ok": False, "error": f"convert reported success but wrote no manifest in {artifact}"}
    return artifact, {**result, "cached": False}


def _backend_versions(backend: Any) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in backend.versions().items()}
    except Exception as e:  # noqa: BLE001 - an unknown version just means no reuse across it
        return {"versions_error": f"{type(e).__name__}: {e}"}


def _parity_verdict(manifest: dict[str, Any]) -> bool | None:
    """The manifest's verdict against the scheme's tolerance (None: conversion was not verified)."""
    verdict = manifest.get("parity_passed")
    return verdict if isinstance(verdict, bool) else None


def bench_row(ctx: Context, planned: Planned, index: int, tokenizer: Any, tasks: list[dict[str, Any]],
              converted: tuple[Path, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Convert (or reuse; ``converted``: what :func:`convert_ahead` did for it) and measure one row;
    never raises for a failure of the backend itself."""
    from .inputs import score_tasks

    row = empty_row(planned.backend, planned.scheme)
    backend = ctx.registered[planned.backend]
    row["platform"] = getattr(backend, "platforms", None)
    if planned.reason is not None:
        row.update(status="unavailable", reason=planned.reason)
        return row
    artifact, conv = converted or ensure_artifact(ctx, planned.backend, planned.scheme, index)
    row.update(cached=conv["cached"], convert_s=conv.get("convert_s"), artifact=str(artifact))
    if not conv["ok"]:
        row.update(status="error", reason=f"convert: {conv['error']}", error_detail=conv.get("traceback"))
        return row
    manifest = cache.read_manifest(artifact) or {}
    row.update(size_bytes=cache.model_bytes(artifact), convert_parity_ok=_parity_verdict(manifest))
    row["convert_parity"] = manifest.get("parity")
    violations = (manifest.get("parity") or {}).get("violations") or []
    row["parity_violations"] = "; ".join(map(str, violations)) if row["convert_parity_ok"] is False else None

    ctx.reporter.stage(index, f"{planned.backend}/{planned.scheme}", "measuring")
    spec = {"phase": "measure", "backend": planned.backend, "scheme": planned.scheme, "artifact": str(artifact),
            "threads": ctx.cfg.threads, "repeat": ctx.cfg.repeat, "warmup": ctx.cfg.warmup,
            "inputs": str(ctx.work / "inputs.npz"), "tasks": str(ctx.work / "tasks.json")}
    result = run_worker(spec, ctx.work, f"{index:02d}-{planned.backend}-{planned.scheme}-measure",
                        ctx.cfg.timeout_s, ctx.cfg.threads, ctx.launcher)
    if not result["ok"] and result.get("unavailable"):
        # Converted and proven, but its runtime cannot run here (Core ML prediction needs macOS): the
        # row keeps size and parity, its speed columns read the reason.
        row.update(status="unavailable", reason=result["error"])
        return row
    if not result["ok"]:
        row.update(status="error", reason=f"measure: {result['error']}", error_detail=result.get("traceback"))
        return row
    completions = result.pop("task_completions", [])
    extra = result.pop("extra", {}) or {}
    metric_errors = result.pop("extra_errors", {}) or {}
    for key in ("ok", "log", "traceback"):
        result.pop(key, None)
    row.update(result)
    if tasks:
        scores = score_tasks(tasks, completions, tokenizer)
        row["task_accuracy"] = scores.pop("overall")
        row["task_accuracy_by_kind"] = scores
    # Plugin metrics join the row, but never overwrite a measured column.
    row.update({(k if k not in COLUMN_NAMES else f"plugin_{k}"): v for k, v in extra.items()})
    row["extra_columns"] = sorted(k if k not in COLUMN_NAMES else f"plugin_{k}" for k in extra)
    if metric_errors:  # a plugin's metrics failed: the row keeps its measurements, the report names the plugin
        row["plugin_metric_errors"] = metric_errors
    return row


def convert_ahead(ctx: Context, planned: list[Planned]) -> dict[int, tuple[Path, dict[str, Any]]]:
    """With ``convert_jobs`` > 1: every runnable row's artifact, converted before any measurement, that
    many at a time in :func:`conversion_order` ({row index: ensure_artifact's answer}); nothing is
    measured meanwhile. Each conversion gets ``threads // convert_jobs`` threads."""
    jobs = ctx.cfg.convert_jobs
    order = conversion_order(planned)
    if jobs <= 1 or not order:
        return {}
    threads = max(1, ctx.cfg.threads // jobs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {i: pool.submit(ensure_artifact, ctx, planned[i].backend, planned[i].scheme, i, threads)
                   for i in order}
        return {i: f.result() for i, f in futures.items()}


def conversion_order(planned: list[Planned]) -> list[int]:
    """The runnable rows' indices in the order :func:`convert_ahead` starts them.

    The first scheme of each backend goes first: later schemes of a backend reuse what it leaves
    behind (the run's shared onnx export), which they would not if both started at once. The rest go
    last-declared first: backends list their cheap schemes first and the calibrated ones (int8-static,
    tflite int8: 20 s each on the demo model) last, and a long job started last would run alone."""
    todo = [i for i, p in enumerate(planned) if p.reason is None]
    seen: set[str] = set()
    leaders = [i for i in todo if not (planned[i].backend in seen or seen.add(planned[i].backend))]
    return leaders + [i for i in reversed(todo) if i not in leaders]


# -- derived columns ----------------------------------------------------------------------------------------
def derive(rows: list[dict[str, Any]], params: int) -> None:
    """Ratios and deltas against the first row (fp32 torch), in place."""
    base = rows[0]
    ok = base.get("status") == "ok"

    def ratio(value: Any, ref: Any) -> float | None:
        return value / ref if ok and value is not None and ref else None

    for row in rows:
        if row.get("size_bytes") is not None:
            row["bits_per_weight"] = 8 * row["size_bytes"] / params
        row["size_ratio"] = ratio(row.get("size_bytes"), base.get("size_bytes"))
        row["prefill_speedup"] = ratio(row.get("prefill_tok_s"), base.get("prefill_tok_s"))
        row["decode_speedup"] = ratio(row.get("decode_tok_s"), base.get("decode_tok_s"))
        r = ratio(row.get("perplexity"), base.get("perplexity"))
        row["ppl_delta_pct"] = None if r is None else 100.0 * (r - 1.0)
        if ok and row.get("task_accuracy") is not None and base.get("task_accuracy") is not None:
            row["task_accuracy_delta"] = 100.0 * (row["task_accuracy"] - base["task_accuracy"])
    from .report import best_for

    for row, tags in zip(rows, best_for(rows)):
        row["best_for"] = tags


# -- the whole bench ------------------------------------------------------------------------------------------
def run_bench(cfg: BenchConfig, reporter: Reporter | None = None, guard: QuietGuard | None = None) -> dict[str, Any]:
    """Run the bench and write results.json, results.csv, report.md and report.png into ``cfg.out``.

    Into benchmarks/results/ only from a quiet machine (``deploykit.bench.quiet``): a busy start raises
    BusyMachineError before any work; a run that turned busy writes its reports to a temporary folder
    and then raises, naming it (``cfg.allow_busy`` overrides both and stamps the reports). ``guard``:
    one begun earlier by a caller that did work of its own first (training), so the start load is the
    one read before that work.
    """
    from .report import write_reports

    reporter = reporter or _Silent()
    started = time.time()
    registered = _registered()
    from ..model.checkpoint import load_config

    source = cfg.model.resolve()
    planned = plan_rows(registered, cfg.backends, cfg.schemes, load_config(source))
    dest, cache_dest = destinations(cfg)
    dest.check()
    cache_dest.check_writable()
    guard = guard or QuietGuard.begin(cfg.out, allow_busy=cfg.allow_busy, threads=cfg.threads)
    # The reports (and --keep-work's files) are written beside OUT and renamed onto it complete.
    with dest.write() as staged:
        work = staged / f"bench-{time.strftime('%Y%m%d-%H%M%S')}"
        work.mkdir()
        results, verdict = _measure(cfg, planned, registered, source, work, reporter, guard, started)
        if verdict.diverted:
            write_reports(results, verdict.write_to)
            if cfg.keep_work:
                shutil.move(work, verdict.write_to / work.name)
            verdict.raise_if_diverted()  # OUT stays as it was; the staged folder is removed
        if not cfg.keep_work:
            shutil.rmtree(work, ignore_errors=True)
        write_reports(results, staged, named=cfg.out)  # results.json names the files where they will be
    return results


def destinations(cfg: BenchConfig) -> tuple[Destination, Destination]:
    """The report folder and the artifact cache, each kept away from the source checkpoint."""
    source = (cfg.model,)
    report = Destination(cfg.out, what="bench report", force=cfg.force, is_own=is_bench_report, sources=source,
                         need_bytes=16 << 20)
    # The cache holds one fp32-sized artifact per row at most; one must fit now (4 bytes a weight).
    need = sum(p.stat().st_size for p in cfg.model.glob("model*.safetensors")) * 2
    return report, Destination(cfg.cache_dir, what="artifact cache", flag="--cache", sources=source, need_bytes=need)


def is_bench_report(folder: Path) -> bool:
    """A folder ``run_bench`` wrote: its results.json is a bench results document."""
    try:
        doc = json.loads((folder / "results.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(doc, dict) and "schema_version" in doc and isinstance(doc.get("rows"), list)


def _measure(cfg: BenchConfig, planned: list[Any], registered: dict[str, Any], source: Path, work: Path,
             reporter: Reporter, guard: QuietGuard, started: float) -> tuple[dict[str, Any], Any]:
    """Every row measured, and the results document (without outputs); with the guard's verdict."""
    from ..model.tokenizer import Tokenizer
    from .inputs import InputSpec, prepare_inputs

    machine = machine_info(cfg.threads)
    # The start load is the guard's: read before any work of this run (a caller's training included).
    machine["load_average_start"] = None if guard.start.averages is None else guard.start.averages[0]
    native_probe = start_native_probe()
    reporter.start(len(planned))
    reporter.stage(0, "inputs", "preparing held-out text, tasks and the fp32 reference")
    ref = prepare_inputs(source, InputSpec(cfg.prompt_len, cfg.gen_len, cfg.batch, cfg.eval_tokens,
                                           cfg.n_tasks, cfg.eval_data), work)
    tasks = json.loads((work / "tasks.json").read_text())
    tokenizer = Tokenizer.load(source)
    with Launcher(worker_env(cfg.threads, work), use_zygote=cfg.zygote) as launcher:
        ctx = Context(cfg, registered, cache.source_sha256(source), source.name, work, reporter, launcher)
        converted = convert_ahead(ctx, planned)
        rows: list[dict[str, Any]] = []
        for i, p in enumerate(planned):
            rows.append(bench_row(ctx, p, i, tokenizer, tasks, converted.get(i)))
            reporter.done(i, rows[-1])
    derive(rows, ref["params"])
    verdict = guard.finish(cfg.out)  # right after the last measurement, before writing anything
    machine["load_average_end"] = None if verdict.end.averages is None else verdict.end.averages[0]
    machine["native_cpu_features"] = finish_native_probe(native_probe)
    results = {
        "schema_version": SCHEMA_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "wall_s": time.time() - started,
        "model": {"path": str(source), "name": source.name, "sha256": ctx.source_sha, **ref},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
                     if k not in ("model", "out", "keep_work", "force")},
        "machine": machine,
        "quiet": verdict.stamp(),
        "versions": library_versions({f"backend:{b}": json.dumps(_backend_versions(be), sort_keys=True)
                                      for b, be in registered.items()}),
        "columns": list(COLUMN_NAMES),
        "rows": rows,
    }
    return results, verdict
