"""The artifact manifest ``deploykit.json``: what was converted, how, by which versions, and the proof.

Every file of the artifact is listed with its sha256 and size, so ``deploykit.load`` can refuse a folder
that was truncated, tampered with or half-copied before a runtime ever parses it.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import ArtifactError
from ..fsutil import sha256_file
from ..model.checkpoint import GENERATION_CONFIG_NAME, TOKENIZER_FILES
from ..model.schema import JsonObject, ListOf, non_negative, read_json_object, relative_file, short_repr

MANIFEST_NAME = "deploykit.json"
MANIFEST_FORMAT = 1
# Written by pickle-based formats; deploykit artifacts never contain them unless a backend says so.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pt2", ".ckpt", ".pkl", ".pickle")

HOW_TO_MAKE = "make one with `deploykit convert CHECKPOINT --backend torch --out DIR` (see `deploykit backends`)"


# Files an artifact carries besides its model: what reports do not count in its size.
NON_MODEL_FILES = frozenset({MANIFEST_NAME, GENERATION_CONFIG_NAME, *TOKENIZER_FILES})


def model_files(folder: str | Path) -> dict[str, int]:
    """{relative posix path: bytes} of the files under ``folder`` that hold the model (weights, graphs,
    configs, package folders such as an .mlpackage): everything but the manifest, the tokenizer and
    the generation config at its top. Their sum is the artifact's size in reports and RunnerInfo."""
    folder = Path(folder)
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel not in NON_MODEL_FILES:
            out[rel] = path.stat().st_size
    return out


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """{relative posix path: {"sha256", "bytes"}} for every file under ``folder`` except the manifest."""
    out: dict[str, dict[str, Any]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if rel == MANIFEST_NAME:
            continue
        out[rel] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
    return out


def write_manifest(folder: Path, manifest: dict[str, Any]) -> Path:
    path = Path(folder) / MANIFEST_NAME
    path.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return path


def is_artifact(folder: str | Path) -> bool:
    return (Path(folder) / MANIFEST_NAME).is_file()


MANIFEST_HINT = "the artifact was damaged or edited after conversion; convert again"


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and check ``deploykit.json`` (does not hash files; see :func:`verify`).

    The fields deploykit and the backends use are type-checked here, so a damaged manifest is one
    ArtifactError naming the key, not a TypeError in whoever reads it next. Every listed file must be
    a path inside the folder: :func:`verify` hashes exactly those.
    """
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found", hint=HOW_TO_MAKE)
    if not path.is_file():
        raise ArtifactError(f"{folder}: not a deploykit artifact (no {MANIFEST_NAME})", hint=HOW_TO_MAKE)
    doc = read_json_object(path, error=ArtifactError, what="manifest", hint=MANIFEST_HINT)
    version = doc.get("format_version")
    if type(version) is not int or version != MANIFEST_FORMAT:  # neither true nor 1.0
        raise ArtifactError(f"{path}: manifest format_version {short_repr(version)}, this deploykit reads {MANIFEST_FORMAT}",
                            hint="convert the model again with this deploykit version")
    doc.field("backend", str, check=_non_empty)
    doc.field("quant", str, check=_non_empty)
    files = doc.object("files")
    if not files:
        doc.fail("files", "is empty: nothing could be verified")
    for rel in files:
        files.value(rel, rel, str, check=relative_file)
        entry = files.object(rel)
        entry.field("sha256", str, check=_sha256_hex)
        entry.field("bytes", int, check=non_negative)
    for key, kind in _OPTIONAL.items():
        doc.field(key, kind, default=None)
    return doc


def _non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def _sha256_hex(value: str) -> str | None:
    return None if len(value) == 64 and all(c in "0123456789abcdef" for c in value) else "must be 64 lowercase hex digits"


# Fields convert writes that readers (the CLI summary, bench, plugins) use: their types, when present.
_OPTIONAL: dict[str, Any] = {
    "plugin": (str, None), "scheme": dict, "options": dict, "created_utc": str, "source": dict, "versions": dict,
    "model_config": dict, "tokenizer": bool, "backend_info": dict, "total_bytes": int, "pickle_files": ListOf(str),
    "verified": bool, "allow_mismatch": bool, "parity_passed": (bool, None), "parity": (dict, None),
}


def verify(folder: str | Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256. Returns the manifest.

    Files present but not listed are allowed (a README beside the model); listed files must match.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    for rel, entry in manifest["files"].items():  # checked by read_manifest: relative paths, typed entries
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry["bytes"]:
            problems.append(f"{rel}: size {size} bytes, manifest says {entry['bytes']}")
            continue
        actual = sha256_file(path)
        if actual != entry["sha256"]:
            problems.append(f"{rel}: sha256 mismatch: expected {entry['sha256']}, actual {actual}")
    if problems:
        raise ArtifactError(f"{folder}: artifact files do not match {MANIFEST_NAME}: {'; '.join(problems)}",
                            hint="the artifact was modified or damaged after conversion; convert again "
                            "(or copy it again completely)")
    return manifest


def read_layout(folder: Path, layout_file: str, layout_format: int) -> JsonObject:
    """The layout JSON, refused with a hint when it is unreadable or another format version.

    The result is a dict whose typed accessors (``layout.mapping("modules", str)``) raise an
    ArtifactError naming the file and the key: each backend checks the fields it reads with them.
    """
    path = Path(folder) / layout_file
    layout = read_json_object(path, error=ArtifactError, what="layout", hint="convert again")
    found = layout.get("format")
    if type(found) is not int or found != layout_format:  # neither true nor 1.0
        raise ArtifactError(f"{path}: format {short_repr(found)}, this deploykit reads {layout_format}",
                            hint="convert again with this version of deploykit")
    return layout


def load_arrays(folder: Path, weights: str, *, framework: str = "np") -> dict[str, Any]:
    """Every tensor of the artifact's safetensors file, refused with a hint when the file is missing,
    truncated or corrupt: read-only numpy views of one memory map of the file (``framework="np"``, no
    torch, no copy: pages are read on first touch and shared with the page cache, as llama.cpp maps a
    GGUF) or torch tensors (``"pt"``)."""
    from safetensors import SafetensorError

    path = Path(folder) / weights
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {weights}", hint="convert again")
    try:
        if framework == "pt":
            from safetensors.torch import load_file

            return load_file(str(path))
        return _mapped_arrays(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{path}: corrupt or truncated safetensors file ({e})", hint="convert again") from e


# safetensors dtype names -> numpy (little-endian, as the format stores them); BF16 has no numpy type.
_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
              "U8": "u1", "U16": "<u2", "U32": "<u4", "U64": "<u8", "BOOL": "?"}


def _mapped_arrays(path: Path) -> dict[str, Any]:
    """safetensors' own reader validates the file (header, offsets, length); the arrays are then views
    at the offsets its header gives (8-byte little-endian header size, the JSON header, the data)."""
    import mmap

    import numpy as np
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        names = list(f.keys())
    if not names:
        return {}
    with open(path, "rb") as fh:
        mapped = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    size = int.from_bytes(mapped[:8], "little")
    header, base = json.loads(mapped[8:8 + size]), 8 + size
    out = {}
    for name in names:
        info = header[name]
        if info["dtype"] not in _NP_DTYPES:
            raise ValueError(f"tensor {name!r} has dtype {info['dtype']}, which numpy cannot hold")
        dtype = np.dtype(_NP_DTYPES[info["dtype"]])
        start, end = info["data_offsets"]
        out[name] = np.frombuffer(mapped, dtype=dtype, count=(end - start) // dtype.itemsize,
                                  offset=base + start).reshape(info["shape"])
    return out
