"""Nothing a user types destroys their work: guarded destinations, exit codes, JSON errors, leftovers.

Each case of issue 9 that concerns where deploykit writes, and what the CLI says when it cannot: the
exit code, one "error:" line naming the input plus a HINT, no traceback, nothing left behind, every
user file as it was.
"""
from __future__ import annotations

import errno
import json
import os
import pathlib
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import deploykit
from deploykit.cli.main import main
from deploykit.errors import FilesystemError, TargetExistsError
from deploykit.fsutil import Destination, atomic_folder, has_file, sweep_leftovers


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _cli(argv: list[str], capsys) -> tuple[int, str, str]:
    rc = main(argv)
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def _one_error(err: str) -> str:
    """The stderr of a failed command: "error: ..." and at most a HINT line, never a traceback."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-2 if len(lines) > 1 and lines[-1].startswith("HINT:") else -1].startswith("error:"), err
    return err


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def artifact(nano_checkpoint, tmp_path) -> Path:
    out = tmp_path / "art"
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    return out


# -- convert --out ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["same", "inside", "around"])
def test_convert_out_never_the_source(nano_checkpoint, tmp_path, capsys, where):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(nano_checkpoint, run)
    before = _snapshot(run)
    out = {"same": run, "inside": run / "artifact", "around": tmp_path}[where]
    rc, _, err = _cli(["convert", str(run), "--backend", "torch", "--quant", "int8-dynamic", "--out", str(out),
                       "--force"], capsys)
    assert rc == 2 and "source" in _one_error(err) and str(run) in err
    assert _snapshot(run) == before and sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_convert_out_current_folder_refused(nano_checkpoint, tmp_path, capsys, monkeypatch):
    (tmp_path / "notes.txt").write_text("mine")
    monkeypatch.chdir(tmp_path)
    rc, _, err = _cli(["convert", str(nano_checkpoint), "--backend", "torch", "--out", ".", "--force"], capsys)
    assert rc == 2 and "current folder" in _one_error(err)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]  # no ..tmp-* left either


def test_convert_force_onto_a_file_refused_and_nothing_left(nano_checkpoint, tmp_path, capsys):
    target = tmp_path / "model.bin"
    target.write_bytes(b"user data")
    rc, _, err = _cli(["convert", str(nano_checkpoint), "--backend", "torch", "--out", str(target), "--force"], capsys)
    assert rc == 2 and "is a file" in _one_error(err)
    assert target.read_bytes() == b"user data" and [p.name for p in tmp_path.iterdir()] == ["model.bin"]


def test_convert_into_empty_existing_folder_needs_no_force(nano_checkpoint, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    assert (out / "deploykit.json").is_file()


def test_second_writer_never_replaces_the_first(nano_checkpoint, tmp_path, monkeypatch):
    """Two converts to one --out without --force: the one finishing second refuses, the first stays."""
    out = tmp_path / "art"
    import deploykit.deploy.convert as conv

    real_seal = conv._seal
    calls = []

    def other_command_finishes_first(tmp, *args, **kwargs):
        calls.append(tmp)
        if len(calls) == 1:  # the other process, meanwhile: its own convert runs to the end
            deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
        real_seal(tmp, *args, **kwargs)

    monkeypatch.setattr(conv, "_seal", other_command_finishes_first)
    with pytest.raises(TargetExistsError, match="appeared while"):
        conv.convert(nano_checkpoint, "torch", out=out, verify=False)
    first = _snapshot(out)
    monkeypatch.setattr(conv, "_seal", real_seal)
    assert first and sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_files_are_published_with_the_umask_mode(artifact):
    mask = os.umask(0o022)
    os.umask(mask)
    for p in artifact.iterdir():
        assert p.stat().st_mode & 0o777 == 0o666 & ~mask, p.name  # safetensors alone writes 0600


# -- unwritable destinations and full disks ------------------------------------------------------------------
@pytest.fixture
def read_only(tmp_path, monkeypatch) -> Path:
    """A folder nobody can create anything in, root included (chmod alone does not stop root)."""
    ro = tmp_path / "ro"
    ro.mkdir()
    real_mkdir = pathlib.Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(os.path.abspath(self)).parent == ro or ro in Path(os.path.abspath(self)).parents:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(pathlib.Path, "mkdir", mkdir)
    return ro


def test_convert_into_read_only_folder_is_exit_5_before_work(nano_checkpoint, read_only, capsys):
    rc, _, err = _cli(["convert", str(nano_checkpoint), "--backend", "torch", "--out", str(read_only / "a")], capsys)
    assert rc == 5 and str(read_only) in _one_error(err) and "EACCES" in err and "plugin" not in err
    assert list(read_only.iterdir()) == []


def test_bench_out_and_cache_read_only_are_exit_5(nano_checkpoint, read_only, tmp_path, capsys):
    tiny = ["--schemes", "torch:fp32", "--prompt-len", "4", "--gen-len", "2", "--repeat", "1", "--warmup", "0",
            "--tasks", "0", "--eval-tokens", "16"]
    rc, _, err = _cli(["bench", str(nano_checkpoint), "--out", str(read_only / "b"), "--cache",
                       str(tmp_path / "c"), *tiny], capsys)
    assert rc == 5 and str(read_only) in _one_error(err)
    rc, _, err = _cli(["bench", str(nano_checkpoint), "--out", str(tmp_path / "b"), "--cache",
                       str(read_only / "c"), *tiny], capsys)
    assert rc == 5 and "--cache" in _one_error(err)
    assert not (tmp_path / "b").exists() and list(read_only.iterdir()) == []


def test_too_little_free_space_is_exit_5_before_work(nano_checkpoint, tmp_path, capsys, monkeypatch):
    import shutil

    import deploykit.fsutil as fsutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(fsutil.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    rc, _, err = _cli(["convert", str(nano_checkpoint), "--backend", "torch", "--out", str(tmp_path / "a")], capsys)
    assert rc == 5 and "MB free" in _one_error(err) and "ENOSPC" in err
    assert not (tmp_path / "a").exists()


def test_disk_full_inside_a_plugin_is_exit_5_not_a_plugin_bug(nano_checkpoint, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    rc, out, err = _cli(["convert", str(nano_checkpoint), "--backend", "torch", "--out", str(tmp_path / "a"),
                         "--json"], capsys)
    assert rc == 5 and "ENOSPC" in _one_error(err) and "bug" not in err
    assert json.loads(out)["exit"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_train_on_a_full_disk_is_exit_5_and_keeps_the_previous_run(tmp_path, capsys, monkeypatch, tokenizer):
    data = tmp_path / "data.txt"
    data.write_text("the cat sat on the mat. " * 400)
    tokenizer.save(tmp_path / "tok")
    argv = ["train", "--preset", "nano", "--data", str(data), "--tokenizer", str(tmp_path / "tok"), "--steps", "2",
            "--batch-size", "2", "--block-size", "16", "--eval-interval", "0", "--checkpoint-interval", "0",
            "--peak-flops", "1e11", "--sample-tokens", "2", "--out", str(tmp_path / "run"), "--no-progress"]
    assert main(argv) == 0
    before = _snapshot(tmp_path / "run")
    import safetensors.torch

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    capsys.readouterr()
    rc, _, err = _cli([*argv, "--force"], capsys)
    assert rc == 5 and "ENOSPC" in _one_error(err)
    assert _snapshot(tmp_path / "run") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.txt", "run", "tok"]


# -- leftovers -------------------------------------------------------------------------------------------------
def test_sweep_removes_only_dead_writers_leftovers(tmp_path):
    target = tmp_path / "art"
    dead, alive = _dead_pid(), os.getppid()
    names = [f".art.tmp-{dead}-0123abcd", f".art.old-{dead}-0123abce", f".art.tmp-{alive}-0123abcf",
             f".other.tmp-{dead}-0123abcd", "art-notes"]
    for n in names:
        (tmp_path / n).mkdir()
    removed = sorted(p.name for p in sweep_leftovers(target))
    assert removed == sorted(names[:2])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names[2:])


def test_sigkilled_convert_leftover_is_swept_by_the_next(nano_checkpoint, tmp_path):
    """A real convert, killed with SIGKILL once its files are written but before the rename: the next convert
    to that --out sweeps the leftover. The child kills itself at that point, so no race decides the test (polling
    for the temp folder from outside once lost to a convert that wrote and renamed within one poll)."""
    out = tmp_path / "art"
    args = ["convert", str(nano_checkpoint), "--backend", "onnx", "--quant", "int8-dynamic", "--out", str(out)]
    child = ("import os, signal, sys\n"
             "import deploykit.fsutil as fsutil\n"
             "fsutil._publishable = lambda tmp: os.kill(os.getpid(), signal.SIGKILL)\n"
             "from deploykit.cli.main import main\n"
             f"sys.exit(main({args!r}))\n")
    proc = subprocess.run([sys.executable, "-c", child], capture_output=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    leftovers = list(tmp_path.glob(".art.tmp-*"))
    assert leftovers and not out.exists()
    assert any(p.is_file() for p in leftovers[0].rglob("*")), "the kill came before anything was written"
    deploykit.convert(nano_checkpoint, "torch", out=out, verify=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_atomic_folder_failure_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "a").write_text("old")
    with pytest.raises(RuntimeError), atomic_folder(target, overwrite=True) as tmp:
        (tmp / "a").write_text("new")
        raise RuntimeError("boom")
    assert (target / "a").read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["t"]


def test_destination_validates_on_construction(tmp_path):
    with pytest.raises(deploykit.ConfigError):
        Destination("")
    d = Destination(tmp_path / "x", what="run folder", is_own=has_file("trainer_state.json"))
    d.check()  # a new folder: fine
    with pytest.raises(FilesystemError):
        Destination(tmp_path / "y", need_bytes=1 << 62).check()


# -- exit codes and blame ----------------------------------------------------------------------------------------
def test_artifact_of_an_uninstalled_plugin_is_exit_4_naming_it(artifact, capsys):
    manifest = json.loads((artifact / "deploykit.json").read_text())
    manifest.update(backend="tpu9000", plugin="deploykit-tpu9000")
    (artifact / "deploykit.json").write_text(json.dumps(manifest))
    rc, out, err = _cli(["generate", str(artifact), "--prompt", "hi", "--json"], capsys)
    assert rc == 4 and "deploykit-tpu9000" in _one_error(err) and "tpu9000" in err
    assert json.loads(out) == {**json.loads(out), "exit": 4, "type": "BackendUnavailable"}


def test_missing_runtime_on_load_is_exit_4_with_pip(artifact, capsys, monkeypatch):
    from deploykit.deploy import registry

    backend = registry.get_backend("torch")
    monkeypatch.setattr(type(backend), "missing_requirements",
                        lambda self: ["torchruntime is not installed: pip install 'deploykit[torchruntime]'"])
    rc, _, err = _cli(["generate", str(artifact), "--prompt", "hi"], capsys)
    assert rc == 4 and "pip install" in _one_error(err)


def test_pickle_only_checkpoint_gets_the_pickle_refusal(tmp_path, capsys, nano_checkpoint):
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / "config.json").write_bytes((nano_checkpoint / "config.json").read_bytes())
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    rc, _, err = _cli(["generate", str(folder), "--prompt", "hi"], capsys)
    assert rc == 2 and "pickle" in _one_error(err)


def test_threads_negative_is_bad_input_not_a_plugin_bug(nano_checkpoint, tmp_path, capsys):
    rc, _, err = _cli(["convert", str(nano_checkpoint), "--backend", "onnx", "--threads", "-3", "--out",
                       str(tmp_path / "x")], capsys)
    assert rc == 2 and "threads" in _one_error(err) and "bug" not in err


# -- --json means JSON ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("argv, code", [
    (["generate", "{missing}", "--prompt", "x"], 2),
    (["convert", "{ckpt}", "--backend", "nosuch", "--out", "{tmp}/a"], 2),
    (["train", "--preset", "nosuch", "--out", "{tmp}/r"], 2),
    (["bench", "{missing}"], 2),
    (["convert", "{ckpt}", "--backend", "torch", "--threads", "two", "--out", "{tmp}/a"], 2),
])
def test_errors_under_json_are_json_on_stdout(argv, code, nano_checkpoint, tmp_path, capsys):
    argv = [a.format(missing=tmp_path / "missing", ckpt=nano_checkpoint, tmp=tmp_path) for a in argv]
    rc, out, err = _cli([*argv, "--json"], capsys)
    doc = json.loads(out)
    assert rc == code == doc["exit"] and doc["error"] and "hint" in doc and "error:" in err
    assert list(tmp_path.iterdir()) == []


def test_convert_without_tokenizer_says_so(nano_checkpoint, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(nano_checkpoint / name, bare / name)
    rc, out, _ = _cli(["convert", str(bare), "--backend", "torch", "--out", str(tmp_path / "a"), "--no-verify"],
                      capsys)
    assert rc == 0 and "no tokenizer.json" in out
    rc, _, err = _cli(["generate", str(tmp_path / "a"), "--prompt", "hi"], capsys)
    assert rc == 2 and "tokenizer" in _one_error(err)
