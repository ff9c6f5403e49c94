"""One runtime API for serving code: ``deploykit.load(path) -> Runner``, whatever made the folder.

- An artifact folder (has ``deploykit.json``): the manifest is verified (every file's sha256), then the
  ``deploykit_load_artifact`` hook opens it; deploykit's built-in implementation, tried last, asks the
  backend named in the manifest.
- A checkpoint folder (``config.json`` + safetensors, deploykit's or transformers'): a
  :class:`CheckpointRunner` over the fp32 CausalLM with its KV cache.

:class:`ModelRunner` (a Runner over any CausalLM-shaped torch module) is public so that torch-based
backends reuse it instead of writing their own forward/session/thread-safety code.
"""
from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import ArtifactError, BackendError, ConfigError, DeploykitError
from ..fsutil import os_errors
from ..model.checkpoint import CHECKPOINT_FILES, CONFIG_NAME, PICKLE_SUFFIXES, TOKENIZER_FILE
from ..model.generation import TorchSession
from .artifact import HOW_TO_MAKE, MANIFEST_NAME, model_files, read_manifest, verify
from .backend import Runner, RunnerInfo

if TYPE_CHECKING:  # torch comes with the runners that need it; loading a native, onnx or gguf artifact needs none
    import torch

_THREADS_LOCK = threading.Lock()


def check_threads(threads: object) -> int | None:
    """``threads`` as given to load/convert: None (the runtime's default) or an integer >= 1."""
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"threads={threads!r} must be a positive integer (or None for the runtime's default)",
                          hint="e.g. threads=2, or --threads 2")
    return threads


def set_threads(threads: int | None) -> None:
    """torch's intra-op thread count is process-wide: setting it for one runner sets it for all.

    A process that has not imported torch is left so (a torch runner made later sets its own threads).
    """
    if check_threads(threads) is None or "torch" not in sys.modules:
        return
    import torch

    with _THREADS_LOCK:
        torch.set_num_threads(threads)


def load_tokenizer(folder: Path) -> Any:
    """The folder's tokenizer, or None when it has no tokenizer.json."""
    if not (Path(folder) / TOKENIZER_FILE).is_file():
        return None
    from ..model.tokenizer import Tokenizer

    return Tokenizer.load(folder)


class ModelRunner(Runner):
    """A Runner over a torch module with the CausalLM interface (``model(ids, kv_cache=)``, ``new_cache``).

    Thread safety: the module's weights are only read; each call builds its own tensors and each decode
    session owns its KV cache, so concurrent calls need no lock. (MoE layers record routing statistics
    of their last forward; those are last-writer-wins and never feed the outputs.)
    """

    def __init__(self, model: torch.nn.Module, *, backend: str, quant: str, tokenizer: Any = None,
                 threads: int | None = None, files: dict[str, int] | None = None,
                 details: dict[str, Any] | None = None) -> None:
        import torch

        set_threads(threads)
        self.model = model.eval()
        cfg = model.config
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_id if tokenizer is not None else cfg.eos_token_id
        self.max_length = cfg.max_seq_len
        self.config = cfg
        files = dict(files or {})
        self.info = RunnerInfo(backend=backend, quant=quant, kv_cache=True, size_bytes=sum(files.values()), files=files,
                               threads=torch.get_num_threads(), parameters=cfg.num_params(),
                               vocab_size=cfg.vocab_size, max_length=cfg.max_seq_len, details=dict(details or {}))

    def forward(self, input_ids: np.ndarray) -> np.ndarray:
        # Runner checked input_ids against info (vocab_size, max_length): int64 (B, T), see Runner.
        import torch

        with torch.inference_mode():
            logits = self.model(torch.from_numpy(input_ids))  # (B, T, V)
        return logits.float().numpy()

    def new_session(self) -> TorchSession:
        return TorchSession(self.model)


class CheckpointRunner(ModelRunner):
    """A checkpoint folder run directly by deploykit's fp32 graph (the reference every artifact meets)."""

    @classmethod
    def from_folder(cls, folder: str | Path, *, threads: int | None = None) -> CheckpointRunner:
        from ..model.checkpoint import load_model

        folder = Path(folder)
        check_threads(threads)
        model = load_model(folder)
        return cls(model, backend="checkpoint", quant="fp32", tokenizer=load_tokenizer(folder), threads=threads,
                   files=model_files(folder), details={"path": str(folder)})


def load(path: str | Path, *, threads: int | None = None, verify_files: bool = True, **options: Any) -> Runner:
    """Open an artifact or checkpoint folder as a Runner.

    ``threads``: the runtime's thread count (None: its default). ``verify_files=False`` skips hashing
    the artifact's files (the manifest is still read). Other ``options`` are for plugins that take
    over loading (``deploykit_load_artifact``); deploykit's own loader accepts none.
    """
    from .registry import plugin_manager

    check_threads(threads)
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(f"{path}: no such folder", hint="pass an artifact folder (deploykit convert --out) "
                            "or a checkpoint folder (config.json + model.safetensors)")
    if (path / MANIFEST_NAME).is_file():
        manifest = verify(path) if verify_files else read_manifest(path)
        try:
            runner = plugin_manager().hook.deploykit_load_artifact(path=path, manifest=manifest,
                                                                   options={"threads": threads, **options})
        except (DeploykitError, OSError):
            raise
        except Exception as e:  # raised by a third-party deploykit_load_artifact (the built-in one wraps its own)
            raise BackendError(f"{path}: a plugin's deploykit_load_artifact hook failed: {type(e).__name__}: {e}",
                               hint="this is a bug in a plugin: rerun with --debug for the traceback") from e
        if runner is None:
            raise ArtifactError(f"{path}: no plugin could load a {manifest.get('backend')!r} artifact",
                                hint="install the plugin that provides this backend (see `deploykit backends`)")
        return runner
    with os_errors(path, "read"):
        present = {p.name for p in path.iterdir()}
    # Shards of a sharded checkpoint (model-00001-of-00002.safetensors...) are checkpoint files too.
    foreign = sorted(n for n in present - CHECKPOINT_FILES
                     if not n.startswith(".") and not (n.startswith("model") and n.endswith(".safetensors")))
    pickled = [n for n in foreign if n.endswith(PICKLE_SUFFIXES)]
    if CONFIG_NAME in present and (not foreign or foreign == pickled):
        # Pickle-only weights go to load_model too: its refusal says why and how to convert them.
        if options:
            raise ConfigError(f"unknown option(s) for a checkpoint folder: {', '.join(sorted(options))}",
                              hint="checkpoint folders accept: threads")
        return CheckpointRunner.from_folder(path, threads=threads)
    what = f"it holds {', '.join(foreign[:5])}" if foreign else "it is empty" if not present else "it has no config.json"
    raise ArtifactError(f"{path}: not a deploykit artifact (no {MANIFEST_NAME}) and not a checkpoint folder ({what})",
                        hint=f"{HOW_TO_MAKE}; a manifest cannot be recreated by hand — convert again")
