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


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """Parse and sanity-check ``deploykit.json`` (does not hash files; see :func:`verify`)."""
    folder = Path(folder)
    path = folder / MANIFEST_NAME
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: artifact folder not found", hint=HOW_TO_MAKE)
    if not path.is_file():
        raise ArtifactError(f"{folder}: not a deploykit artifact (no {MANIFEST_NAME})", hint=HOW_TO_MAKE)
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: manifest is not valid JSON ({e})",
                            hint="the artifact was damaged; convert again") from e
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{path}: manifest must be a JSON object", hint="convert again")
    version = manifest.get("format_version")
    if version != MANIFEST_FORMAT:
        raise ArtifactError(f"{path}: manifest format_version {version!r}, this deploykit reads {MANIFEST_FORMAT}",
                            hint="convert the model again with this deploykit version")
    for key in ("backend", "quant", "files"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}", hint="the artifact was damaged; convert again")
    return manifest


def verify(folder: str | Path) -> dict[str, Any]:
    """Read the manifest and check every listed file's size and sha256. Returns the manifest.

    Files present but not listed are allowed (a README beside the model); listed files must match.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    problems: list[str] = []
    for rel, entry in manifest["files"].items():
        path = folder / rel
        if not path.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = path.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{rel}: size {size} bytes, manifest says {entry.get('bytes')}")
            continue
        actual = sha256_file(path)
        if actual != entry.get("sha256"):
            problems.append(f"{rel}: sha256 mismatch: expected {entry.get('sha256')}, actual {actual}")
    if problems:
        raise ArtifactError(f"{folder}: artifact files do not match {MANIFEST_NAME}: {'; '.join(problems)}",
                            hint="the artifact was modified or damaged after conversion; convert again "
                            "(or copy it again completely)")
    return manifest
