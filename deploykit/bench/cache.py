"""The artifact cache: converting every scheme takes minutes, re-benching should not.

An artifact is reused only when everything that could change it is unchanged: the source checkpoint's
bytes, the backend and scheme, the backend's library versions, deploykit's own version and the code
that converts (:func:`code_fingerprint`). Those go
into one key; the artifact lives at ``CACHE/<model>-<source sha[:12]>/<backend>-<scheme>-<key[:12]>``.
A changed checkpoint hashes differently and so can never hit an old artifact; stale entries are left
for the user to delete (``rm -r ~/.cache/deploykit/artifacts``).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any

from ..deploy.artifact import MANIFEST_NAME, model_files
from ..fsutil import sha256_file

CACHE_ENV = "DEPLOYKIT_CACHE"
KEY_VERSION = 1  # bump when the key's contents change meaning

# Files of a checkpoint folder that determine the model (weights, config, tokenizer); others such as
# loss curves, training logs or optimizer state do not invalidate artifacts.
_SOURCE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json")


def default_cache_dir() -> Path:
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "deploykit" / "artifacts"


def source_sha256(folder: Path) -> str:
    """One digest over the files that define a checkpoint: its weights, config and tokenizer."""
    names = [n for n in _SOURCE_FILES if (folder / n).is_file()]
    # model*.safetensors only: trainer_state.safetensors (optimizer moments) does not change the model.
    names += sorted(p.name for p in folder.glob("model*.safetensors"))
    if (folder / "model.safetensors.index.json").is_file():
        names.append("model.safetensors.index.json")
    h = hashlib.sha256()
    for name in sorted(names):
        h.update(f"{name}\0{sha256_file(folder / name)}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=None)
def code_fingerprint(backend_module: str) -> str:
    """sha256 over the code that makes an artifact: deploykit's model and deploy packages, the backend's
    module (or its package) and deploykit's compiled extensions. deploykit's version string does not
    change between commits, so without this a changed backend would reuse artifacts of the old one."""
    import deploykit

    root = Path(deploykit.__file__).parent
    files = [p for sub in ("model", "deploy", "native") for p in (root / sub).rglob("*") if p.suffix in (".py", ".so")]
    module = sys.modules.get(backend_module) or importlib.import_module(backend_module)
    source = Path(getattr(module, "__file__", "") or "")
    if source.name == "__init__.py":
        files += list(source.parent.rglob("*.py"))
    elif source.is_file():
        files.append(source)
    for ext in ("deploykit.native._native", "deploykit.native._native_cuda"):  # found without importing them
        with contextlib.suppress(ImportError, ValueError):
            spec = importlib.util.find_spec(ext)
            if spec is not None and spec.origin and Path(spec.origin).is_file():
                files.append(Path(spec.origin))
    h = hashlib.sha256()
    for path in sorted(set(files)):
        h.update(f"{path.name}\0{sha256_file(path)}\n".encode())
    return h.hexdigest()


def artifact_key(source_sha: str, backend: str, scheme: str, versions: dict[str, str]) -> str:
    from .. import __version__

    payload = {"key_version": KEY_VERSION, "source_sha256": source_sha, "backend": backend, "scheme": scheme,
               "backend_versions": dict(sorted(versions.items())), "deploykit": __version__}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def artifact_path(cache: Path, model_name: str, source_sha: str, backend: str, scheme: str, key: str) -> Path:
    return cache / f"{model_name}-{source_sha[:12]}" / f"{backend}-{scheme}-{key[:12]}"


def read_manifest(artifact: Path) -> dict[str, Any] | None:
    """The artifact's manifest, or None when the folder is missing or incomplete (then: rebuild)."""
    try:
        return json.loads((artifact / MANIFEST_NAME).read_text())
    except (OSError, json.JSONDecodeError):
        return None


def model_bytes(artifact: Path) -> int:
    """Bytes of the files that hold the model (weights, graphs, configs); manifest and tokenizer excluded."""
    return sum(model_files(artifact).values())
