"""The convert contract: checkpoint -> artifact folder, proven against the fp32 torch model.

deploykit owns everything around a backend's ``convert``: checking the backend can run here, parsing
the scheme's options, the thread count, the temporary folder and atomic rename, the tokenizer copy,
loading the result through the backend's own runner, the parity proof and its tolerance, the
manifest, and the ``deploykit_after_convert`` event.
"""
from __future__ import annotations

import copy
import datetime as _dt
import hashlib
import platform
import shutil
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ..errors import BackendError, BackendUnavailable, ConfigError, DeploykitError, ParityError, first_line
from ..fsutil import Destination, has_file, sha256_file
from ..model.checkpoint import TOKENIZER_FILE, TOKENIZER_FILES
from .artifact import MANIFEST_FORMAT, MANIFEST_NAME, PICKLE_SUFFIXES, file_entries, write_manifest
from .backend import Backend, ConvertContext, Scheme
from .parity import ParityReport, calibration_sequences, make_probes, run_parity

if TYPE_CHECKING:
    from ..model.graph import CausalLM


@dataclass(frozen=True)
class ConvertResult:
    path: Path
    backend: str
    quant: str
    manifest: dict[str, Any]
    report: ParityReport | None  # None with verify=False

    @property
    def passed(self) -> bool | None:
        return None if self.report is None else self.report.passed()


def _source_sha256(model: Any, folder: Path | None) -> str:
    if folder is not None:
        shards = sorted(folder.glob("model*.safetensors"))
        if len(shards) == 1:
            return sha256_file(shards[0])
        h = hashlib.sha256()  # sharded: hash of the shards' hashes, in name order
        for shard in shards:
            h.update(f"{shard.name}:{sha256_file(shard)}\n".encode())
        return h.hexdigest()
    # In-memory model: hash the fp32 state serialized exactly as save_model writes it, so the same
    # weights get the same id whether they come from memory or from a checkpoint folder.
    import torch
    from safetensors.torch import save

    from ..model.checkpoint import to_hf_state_dict

    tensors = {k: v.to(torch.float32).contiguous() for k, v in to_hf_state_dict(model).items()}
    return hashlib.sha256(save(tensors, metadata={"format": "pt"})).hexdigest()


def _load_source(model: Any, tokenizer: Any) -> tuple[Any, Path | None, Any]:
    import torch

    from ..model.checkpoint import load_model
    from ..model.graph import CausalLM
    from .runtime import load_tokenizer

    if isinstance(model, CausalLM):
        ref = copy.deepcopy(model).float().eval()
        return ref, None, tokenizer
    if isinstance(model, (str, Path)):
        folder = Path(model)
        ref = load_model(folder)
        return ref, folder, tokenizer if tokenizer is not None else load_tokenizer(folder)
    raise ConfigError(f"model must be a checkpoint folder or a deploykit CausalLM, got {type(model).__name__}",
                      hint="pass the folder written by `deploykit train` / save_model, or a CausalLM instance"
                      if not isinstance(model, torch.nn.Module) else "convert transformers models by saving them "
                      "with save_pretrained and passing the folder")


@dataclass(frozen=True)
class _Job:
    """Everything preflight settled: what to convert, with what, into where."""

    registry: Any  # deploykit.deploy.registry.PluginRegistry
    backend: Backend
    plugin: str
    scheme: Scheme
    dest: Destination  # checked: not the source, replaceable, writable, with room for the artifact
    reference: CausalLM  # fp32, eval mode: the model every artifact is proven against
    source: Path | None
    ctx: ConvertContext

    @property
    def out(self) -> Path:
        return self.dest.path

    @property
    def label(self) -> str:
        return f"backend {self.backend.name!r} (plugin {self.plugin!r})"


def convert(
    model: Any,
    backend: str,
    quant: str | None = None,
    out: str | Path | None = None,
    *,
    force: bool = False,
    verify: bool = True,
    allow_mismatch: bool = False,
    calibration: list[list[int]] | None = None,
    threads: int | None = None,
    options: dict[str, Any] | None = None,
    tokenizer: Any = None,
    progress: Callable[[str], None] | None = None,
) -> ConvertResult:
    """Convert ``model`` (checkpoint folder or CausalLM) with ``backend``/``quant`` into the folder ``out``.

    Four stages: preflight (everything that can be refused is refused before the slow part), write
    (the backend fills a temporary folder), prove (the artifact, loaded by the backend's own runner,
    against the fp32 model) and publish (the manifest, written last, then the atomic rename, then the
    ``deploykit_after_convert`` observers).

    Raises BackendError (unknown backend/scheme, or the backend failed), BackendUnavailable (exit 4),
    ConfigError (bad options or threads, or ``out`` is the source, inside it or around it),
    TargetExistsError (``out`` exists without ``force``, or is not an artifact: ``force`` replaces only
    artifacts), FilesystemError (exit 5: ``out`` not writable, or too little free space; checked before
    the work, and any OSError while writing), CheckpointError (bad source) and ParityError (exit 3: the artifact is past its tolerance; nothing
    is written unless ``allow_mismatch=True``, which keeps it and says so in the manifest). With
    ``verify=False`` no proof is run and the manifest says so.
    """
    say = progress or (lambda message: None)
    job = _preflight(model, backend, quant, out, force=force, calibration=calibration, threads=threads,
                     options=options, tokenizer=tokenizer, progress=say)
    with job.dest.write() as tmp:  # renamed onto `out` only when the block completes
        manifest = _write(job, tmp)
        report = _prove(job, tmp, manifest, allow_mismatch=allow_mismatch) if verify else None
        _seal(tmp, manifest, report, verify=verify, allow_mismatch=allow_mismatch)
    _announce(job, manifest)
    return ConvertResult(path=job.out, backend=job.backend.name, quant=job.scheme.name, manifest=manifest, report=report)


def _preflight(model: Any, backend: str, quant: str | None, out: str | Path | None, *, force: bool,
               calibration: list[list[int]] | None, threads: int | None, options: dict[str, Any] | None,
               tokenizer: Any, progress: Callable[[str], None]) -> _Job:
    """Refuse what can be refused cheaply, then load the source and refuse a scheme that does not fit it."""
    from .registry import registry
    from .runtime import check_threads, set_threads

    reg = registry()
    be = reg.get_backend(backend)
    scheme = be.scheme(quant)
    missing = be.missing_requirements()
    if missing:
        raise BackendUnavailable(f"backend {be.name!r} cannot run here: {'; '.join(missing)}",
                                 hint="install what is missing (the pip command is in the reason above), "
                                 "or choose another backend: `deploykit backends`")
    if out is None:
        raise ConfigError("out is required: the artifact folder to write", hint="e.g. out='artifacts/nano-torch'")
    source_folder = (Path(model),) if isinstance(model, (str, Path)) else ()
    dest = Destination(Path(out), what="artifact", force=force, is_own=has_file(MANIFEST_NAME), sources=source_folder)
    dest.check()  # fail before the slow part; free space is checked again once the model's size is known
    opts = scheme.parse_options(options, backend=be.name)
    set_threads(check_threads(threads))  # the reference, the conversion and the proof all run on these threads

    progress("loading model")
    ref, source, tok = _load_source(model, tokenizer)
    cfg = ref.config
    # An artifact is at most the fp32 weights plus graphs and tokenizer: 4 bytes a parameter, 10 % spare.
    dest = replace(dest, need_bytes=int(ref.num_params() * 4 * 1.1) + (1 << 20))
    dest.check()
    reason = be.unsupported(scheme, cfg)
    if reason:
        valid = [s.name for s in be.schemes if not be.unsupported(s, cfg)]
        raise BackendError(f"{be.name}/{scheme.name} cannot convert this model: {reason}",
                           hint=(f"use --quant {valid[0]} ({be.name}'s schemes for {cfg.variant} models: "
                                 f"{', '.join(valid)})" if valid else f"{be.name} cannot convert {cfg.variant} models"))
    calib = calibration if calibration is not None else calibration_sequences(cfg, tok)
    ctx = ConvertContext(source=source, tokenizer=tok, calibration=calib, threads=threads, options=opts,
                         progress=progress)
    return _Job(registry=reg, backend=be, plugin=reg.plugin_of(be.name), scheme=scheme, dest=dest, reference=ref,
                source=source, ctx=ctx)


def _write(job: _Job, tmp: Path) -> dict[str, Any]:
    """The tokenizer and the backend's files into ``tmp``; returns the manifest so far."""
    from .. import __version__

    if job.source is not None:
        for name in TOKENIZER_FILES:
            if (job.source / name).is_file():
                shutil.copy2(job.source / name, tmp / name)
    elif job.ctx.tokenizer is not None:
        job.ctx.tokenizer.save(tmp)
    job.ctx.progress(f"converting with {job.backend.name}/{job.scheme.name}")
    try:
        # A deep copy: a backend that quantises or prunes in place must not touch the reference.
        info = job.backend.convert(copy.deepcopy(job.reference), job.scheme, tmp, job.ctx) or {}
    except (DeploykitError, OSError):  # OSError: the disk or permissions, not the plugin (see atomic_folder)
        raise
    except Exception as e:
        raise BackendError(f"{job.label} failed while converting to {job.scheme.name}: "
                           f"{type(e).__name__}: {first_line(e)}",
                           hint="this is a bug in that plugin; rerun with --debug for the traceback and "
                           "report it to the plugin's authors") from e
    scheme, ref = job.scheme, job.reference
    return {
        "format_version": MANIFEST_FORMAT,
        "backend": job.backend.name,
        "quant": scheme.name,
        "plugin": job.plugin,
        "scheme": {"name": scheme.name, "description": scheme.description, "tolerance": asdict(scheme.tolerance)},
        "options": job.ctx.options.to_dict(),
        "created_utc": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": {"path": str(job.source) if job.source is not None else None,
                   "sha256": _source_sha256(ref, job.source), "parameters": ref.num_params()},
        "versions": {"deploykit": __version__, "python": platform.python_version(), **_safe_versions(job.backend)},
        "model_config": ref.config.to_dict(),
        "tokenizer": (tmp / TOKENIZER_FILE).is_file(),
        "backend_info": info,
    }


def _prove(job: _Job, tmp: Path, manifest: dict[str, Any], *, allow_mismatch: bool) -> ParityReport:
    """Load ``tmp`` through the backend's own runner and run the parity proof; past tolerance, refuse."""
    job.ctx.progress("verifying parity")
    try:
        runner = job.backend.load(tmp, manifest, threads=job.ctx.threads)
    except (DeploykitError, OSError):
        raise
    except Exception as e:
        raise BackendError(f"{job.label} wrote an artifact it cannot load: {type(e).__name__}: {first_line(e)}",
                           hint="rerun with --debug and report it to the plugin's authors") from e
    cfg, scheme = job.reference.config, job.scheme
    notes = tuple(n for n in (manifest["backend_info"].get("parity_note"),) if n)
    report = run_parity(job.reference, runner, make_probes(cfg, job.ctx.tokenizer), backend=job.backend.name,
                        quant=scheme.name, tolerance=scheme.tolerance, notes=notes)
    if not report.passed() and not allow_mismatch:
        raise ParityError(
            f"{job.backend.name}/{scheme.name} artifact is past its tolerance: {'; '.join(report.violations())}\n  "
            + "\n  ".join(report.per_probe_lines()),
            hint="nothing was written. Keep it anyway with --allow-mismatch (recorded in the manifest), "
            "or try another scheme") from None
    return report


def _seal(tmp: Path, manifest: dict[str, Any], report: ParityReport | None, *, verify: bool,
          allow_mismatch: bool) -> None:
    """Hash every file and write the manifest, last: a folder with a manifest is a complete artifact."""
    files = file_entries(tmp)
    manifest.update({
        "files": files,
        "total_bytes": sum(f["bytes"] for f in files.values()),
        "pickle_files": sorted(f for f in files if f.endswith(PICKLE_SUFFIXES)),
        "verified": verify,
        "allow_mismatch": allow_mismatch,
        "parity_passed": None if report is None else report.passed(),
        "parity": None if report is None else report.to_dict(),
    })
    write_manifest(tmp, manifest)


def _announce(job: _Job, manifest: dict[str, Any]) -> None:
    """Tell the ``deploykit_after_convert`` observers, each on its own: one failing (an upload, say)
    must not silence the others, and none of them can undo the artifact, which is complete and in place."""
    for name, _, error in job.registry.call_isolated("deploykit_after_convert", artifact=job.out, manifest=manifest):
        if error is not None:
            warnings.warn(f"deploykit_after_convert of plugin {name!r} failed: {type(error).__name__}: {error}",
                          stacklevel=3)


def _safe_versions(backend: Any) -> dict[str, str]:
    try:
        return {str(k): str(v) for k, v in backend.versions().items()}
    except Exception as e:  # a version probe is informational; never fail a convert for it
        return {"error": f"{type(e).__name__}: {e}"}
