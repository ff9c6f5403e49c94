"""A pre-imported launcher for bench workers (:func:`serve`, started by :class:`Launcher`).

Every bench row converts and measures in processes of their own (see :mod:`deploykit.bench.worker`),
and each of those used to spend ~1.4 s of a 2-core machine importing torch and deploykit before doing
anything: 56 workers, 80 s of a demo's bench. The zygote imports them once, in the workers' own
environment (thread counts and allocator settings are read when the libraries load), and forks one
child per job. A child is what a cold start gives, minus the imports: its own process and session
(a timeout kills it and whatever it started), its own log on stdout/stderr, its own peak RSS (VmHWM
starts from the pre-imported image, as a cold worker's does once it has imported the same modules).
Nothing heavy runs in the zygote: no torch op, so no OpenMP pool exists to be forked half-alive.

Protocol, one JSON object per line. Requests on stdin: ``{"id": K, "spec": PATH, "log": PATH}``.
Replies on stdout: ``{"id": K, "pid": N}`` once forked, then ``{"id": K, "rc": R}`` when the child
ends (R negative: killed by that signal, as :mod:`subprocess` reports it). EOF on stdin ends the zygote.

:class:`Launcher` is the parent's side: it starts the zygote, runs jobs from any thread and falls
back to a plain subprocess per job off Linux or where the zygote died.
"""
from __future__ import annotations

import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO, Any

_ENTRY = "import sys; from deploykit.bench.zygote import serve; sys.exit(serve())"
PRELOAD = ("torch", "deploykit.bench.worker", "deploykit.deploy.runtime", "deploykit.deploy.registry",
           "deploykit.model.checkpoint")


# -- the zygote ------------------------------------------------------------------------------------------
def _child(spec: str, log: str, close: tuple[int, ...]) -> None:
    """In the forked child: a session of its own, the log as stdout/stderr, the worker; never returns."""
    rc = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        for fd in close:  # the zygote's wake-up pipe
            os.close(fd)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)  # the protocol pipe is the zygote's, not the worker's
        os.close(null)
        from deploykit.bench import worker

        rc = worker.main([spec])
    except BaseException:  # noqa: BLE001 - the log gets the traceback, the parent the exit code
        import traceback

        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)


def _reply(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _reap(children: dict[int, Any]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        job = children.pop(pid, None)
        if job is not None:
            _reply({"id": job, "rc": os.waitstatus_to_exitcode(status)})


def serve() -> int:
    """The zygote's loop: preload, then fork a child per request and report its pid and exit code."""
    import importlib

    for name in PRELOAD:
        importlib.import_module(name)
    # SIGCHLD wakes the select below through a pipe: no polling, so an idle zygote takes no CPU from
    # the row being timed.
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.set_wakeup_fd(wake_w)
    children: dict[int, Any] = {}
    stdin = sys.stdin.buffer
    buffered = b""
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
            _reap(children)
        if stdin in ready:
            chunk = os.read(stdin.fileno(), 65536)
            if not chunk:
                break
            buffered += chunk
            while b"\n" in buffered:
                line, buffered = buffered.split(b"\n", 1)
                job = json.loads(line)
                sys.stdout.flush()
                pid = os.fork()
                if pid == 0:
                    _child(job["spec"], job["log"], (wake_r, wake_w))
                children[pid] = job["id"]
                _reply({"id": job["id"], "pid": pid})
        _reap(children)  # a SIGCHLD that came between two selects
    for pid in list(children):  # the parent went away: wait for the running jobs, do not orphan them
        os.waitpid(pid, 0)
    return 0


# -- the parent's side ---------------------------------------------------------------------------------------
class Launcher:
    """Runs ``deploykit.bench.worker`` jobs through one zygote started with ``env``; thread-safe.

    ``run`` returns the job's exit code (negative for a signal), or raises ``subprocess.TimeoutExpired``
    after killing the job's whole session. Off Linux, or once the zygote has died, each job is a plain
    ``python -m deploykit.bench.worker`` subprocess with the same environment.
    """

    def __init__(self, env: dict[str, str], *, use_zygote: bool = True) -> None:
        self.env = env
        self._lock = threading.Lock()
        self._queues: dict[int, queue.Queue[dict[str, Any]]] = {}
        self._next = 0
        self._dead = False
        self._proc: subprocess.Popen[bytes] | None = None
        # Linux only: on macOS, Apple's frameworks (which torch and coremltools load) are not fork-safe,
        # the reason Python's multiprocessing defaults to spawn there.
        if use_zygote and sys.platform.startswith("linux"):
            # -c, not -m: deploykit.bench imports this module, and runpy warns about running one imported.
            self._proc = subprocess.Popen([sys.executable, "-c", _ENTRY], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, env=env)
            threading.Thread(target=self._read, args=(self._proc.stdout,), daemon=True).start()

    @property
    def zygote_pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    @property
    def zygote_alive(self) -> bool:
        return self._proc is not None and not self._dead and self._proc.poll() is None

    def _read(self, stream: IO[bytes]) -> None:
        for line in stream:
            msg = json.loads(line)
            with self._lock:
                q = self._queues.get(msg["id"])
            if q is not None:
                q.put(msg)
        with self._lock:  # EOF: the zygote died; every waiting job learns it, later ones do not use it
            self._dead = True
            for q in self._queues.values():
                q.put({"dead": True})

    def run(self, spec: Path, log: Path, timeout_s: float) -> int:
        job = self._submit(spec, log) if self.zygote_alive else None
        if job is None:
            return self._run_plain(spec, log, timeout_s)
        q = self._queues[job]
        try:
            try:
                started = q.get(timeout=timeout_s)  # the first job also waits for the preload
            except queue.Empty:
                raise subprocess.TimeoutExpired(str(spec), timeout_s) from None
            if "pid" not in started:  # the zygote died before forking it
                return self._run_plain(spec, log, timeout_s)
            try:
                ended = q.get(timeout=timeout_s)
            except queue.Empty:
                _kill_session(started["pid"])
                q.get()  # the zygote reaps it and reports
                raise subprocess.TimeoutExpired(str(spec), timeout_s) from None
            if "rc" not in ended:
                return -signal.SIGKILL  # the zygote died under it: reported as a crash
            return int(ended["rc"])
        finally:
            with self._lock:
                self._queues.pop(job, None)

    def _submit(self, spec: Path, log: Path) -> int | None:
        """Send the job to the zygote; its id, or None when the zygote is gone."""
        with self._lock:
            if self._dead:
                return None
            job, self._next = self._next, self._next + 1
            self._queues[job] = queue.Queue()
            assert self._proc is not None and self._proc.stdin is not None
            try:
                self._proc.stdin.write((json.dumps({"id": job, "spec": str(spec), "log": str(log)}) + "\n").encode())
                self._proc.stdin.flush()
            except OSError:  # a broken pipe: it died
                del self._queues[job]
                self._dead = True
                return None
            return job

    def _run_plain(self, spec: Path, log: Path, timeout_s: float) -> int:
        with open(log, "wb") as out:
            # A session of its own, so a timeout can end the worker and anything it started, and nothing else.
            proc = subprocess.Popen([sys.executable, "-m", "deploykit.bench.worker", str(spec)], stdout=out,
                                    stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
            try:
                return proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                _kill_session(proc.pid)
                proc.wait()
                raise

    def close(self) -> None:
        if self._proc is not None:
            if self._proc.stdin is not None:
                self._proc.stdin.close()
            try:
                self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()

    def __enter__(self) -> Launcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _kill_session(pid: int) -> None:
    """SIGKILL the job's session (it and whatever it started); just the job if it has not made one yet."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

