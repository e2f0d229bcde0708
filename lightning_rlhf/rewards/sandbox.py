"""Run one untrusted Python program in its own subprocess, with limits, and return what it printed.

Threat model: these limits stop accidents and a misbehaving policy (an infinite loop, a fork bomb, a memory
bomb, a flood of output, a stray file write), not a determined attacker. For untrusted code at scale, run
the workers in a container as well. :func:`isolation` says what is enforced on this machine.

How each limit is enforced:

- wall clock: the parent waits ``timeout_s`` and then kills; CPU time: ``RLIMIT_CPU``;
- memory: ``RLIMIT_AS`` (address space); file size: ``RLIMIT_FSIZE``; no core dumps;
- output: the parent reads stdout/stderr with a cap and kills the program once it is passed;
- processes: when Linux namespaces are permitted (root, or a kernel allowing them), ``unshare --pid
  --fork --kill-child --net --mount`` gives the program its own PID namespace (everything in it dies with
  it), no network, and a private mount table in which ``/tmp``, ``/var/tmp`` and ``/dev/shm`` are fresh
  empty tmpfs; inside, a bootstrap drops to an unprivileged uid (one per pool slot) whose ``RLIMIT_NPROC``
  bounds the process count (root ignores ``RLIMIT_NPROC``, so the uid drop is what makes it bite);
- files: a fresh working directory (inside a root-only 0700 directory, so ``..`` is not writable), removed
  afterwards; environment: only ``PATH``, ``LANG``, ``LC_ALL`` and ``PYTHONIOENCODING``;
- cleanup: the program's process group is killed with SIGKILL at the end (``start_new_session=True``).

The expected outputs never reach the child: the parent compares them after the program has exited.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass

# Executed by the sandbox's own interpreter inside the namespaces, as root, before the untrusted program:
# private tmp dirs, limits, then drop to the slot's uid and exec the program with a fresh interpreter.
_BOOTSTRAP = r"""
import os, resource, sys
work, uid, mem, cpu, fsize, nproc, mount, python = sys.argv[1:9]
if mount == "1":
    # The program's directory is a fresh one on the private /tmp tmpfs: it vanishes with the namespace.
    with open(os.path.join(work, "prog.py"), "rb") as f:
        src = f.read()
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, dst, fstype, flags, data):
        if libc.mount(src, dst, fstype, flags, data) != 0:
            raise OSError(ctypes.get_errno(), "mount " + dst.decode())
    mount(b"none", b"/", None, 0x4000 | 0x40000, None)  # MS_REC | MS_PRIVATE: nothing leaks to the host
    for d in (b"/tmp", b"/var/tmp", b"/dev/shm"):
        if os.path.isdir(d):
            mount(b"tmpfs", d, b"tmpfs", 0x2 | 0x4, b"size=16m,mode=1777")  # MS_NOSUID | MS_NODEV
    work = "/tmp/work"
    os.mkdir(work, 0o700)
    with open(os.path.join(work, "prog.py"), "wb") as f:
        f.write(src)
    if uid != "-1":
        for p in (work, os.path.join(work, "prog.py")):
            os.chown(p, int(uid), int(uid))
os.chdir(work)
lim = resource.setrlimit
lim(resource.RLIMIT_CORE, (0, 0))
lim(resource.RLIMIT_FSIZE, (int(fsize), int(fsize)))
lim(resource.RLIMIT_CPU, (int(cpu), int(cpu) + 1))
if uid != "-1":
    lim(resource.RLIMIT_NPROC, (int(nproc), int(nproc)))
    os.setgroups([])
    os.setgid(int(uid))
    os.setuid(int(uid))
lim(resource.RLIMIT_AS, (int(mem), int(mem)))
os.execv(python, [python, "-I", "-S", "-B", "prog.py"])
"""

# A uid range nobody uses: slot i runs as _UID_BASE + i, so concurrent programs do not share a process count.
_UID_BASE = 61000


@dataclass(frozen=True)
class Isolation:
    """What :func:`run_program` enforces on this machine (found once, at first use)."""

    namespaces: bool
    enforced: str
    python: str  # the interpreter generated programs run under (stdlib only: -I -S)


@dataclass(frozen=True)
class ProgramResult:
    """One run: raw bytes printed (capped), how it ended, and the wall-clock time it took."""

    stdout: bytes
    stderr: bytes
    returncode: int | None
    timed_out: bool
    output_exceeded: bool
    elapsed_s: float

    @property
    def memory_exceeded(self) -> bool:
        return b"MemoryError" in self.stderr[-2000:]


_isolation: Isolation | None = None
_isolation_lock = threading.Lock()


def _world_runnable(path: str) -> bool:
    """Every directory above ``path`` is searchable by others and the file is executable by others."""
    path = os.path.realpath(path)
    parts = [path] + [os.path.dirname(path)]
    while parts[-1] != os.path.dirname(parts[-1]):
        parts.append(os.path.dirname(parts[-1]))
    try:
        return all(os.stat(p).st_mode & 0o001 for p in parts)
    except OSError:
        return False


def _program_python() -> str:
    """The interpreter the unprivileged uid runs: ours when others may run it (pyenv under /root is not)."""
    for candidate in (sys.executable, shutil.which("python3") or "", "/usr/bin/python3"):
        if candidate and _world_runnable(candidate):
            return os.path.realpath(candidate)
    return os.path.realpath(sys.executable)


def _namespaces_work(python: str) -> bool:
    if not sys.platform.startswith("linux") or shutil.which("unshare") is None or os.geteuid() != 0:
        return False
    global _isolation
    _isolation = Isolation(True, "probe", python)  # run_program reads it; replaced by the caller
    try:
        probe = run_program("print(6 * 7)", timeout_s=10, _probe=True)
    except Exception:  # any failure of the probe means: do not rely on namespaces
        return False
    return probe.stdout.strip() == b"42"


def isolation() -> Isolation:
    """Detect (once) whether namespaces are permitted; warn once if not, and describe what is enforced."""
    global _isolation
    with _isolation_lock:
        if _isolation is None:
            common = "wall-clock timeout, RLIMIT_CPU, RLIMIT_AS, RLIMIT_FSIZE, output cap, fresh temp dir, "
            common += "scrubbed env, process group SIGKILL"
            python = _program_python()
            if _namespaces_work(python):
                _isolation = Isolation(
                    True,
                    common + "; PID namespace (all processes die with the run), no network (net namespace), "
                    "private /tmp /var/tmp /dev/shm (mount namespace), unprivileged uid with RLIMIT_NPROC",
                    python,
                )
            else:
                missing = "; NOT enforced: process count, network, private /tmp"
                _isolation = Isolation(False, common + missing, sys.executable)
                warnings.warn(
                    "lightning_rlhf sandbox: Linux namespaces are not permitted here (need root and "
                    "`unshare`), so generated programs run without a process-count bound, with network "
                    "access and the shared /tmp. Run the workers in a container for untrusted code.",
                    RuntimeWarning,
                    stacklevel=2,
                )
        return _isolation


def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc; the kernel lists them per thread)."""
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(c) for c in f.read().split()]
    except OSError:
        return []


def _read_capped(stream, cap: int, sink: list[bytes], over: threading.Event, kill) -> None:
    total = 0
    while True:
        chunk = stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536)
        if not chunk:
            return
        if total + len(chunk) > cap:
            sink.append(chunk[: cap - total])
            over.set()
            kill()
            return
        sink.append(chunk)
        total += len(chunk)


def _feed(stream, data: bytes) -> None:
    try:
        stream.write(data)
    except (BrokenPipeError, OSError):
        pass  # the program exited or closed stdin without reading it all; not our error
    finally:
        try:
            stream.close()
        except OSError:
            pass


def run_program(
    source: str,
    stdin: str = "",
    *,
    timeout_s: float = 4.0,
    memory_mb: int = 512,
    max_output_bytes: int = 1 << 20,
    max_processes: int = 8,
    slot: int = 0,
    _probe: bool = False,
) -> ProgramResult:
    """Run ``source`` as ``python prog.py`` with ``stdin`` fed in; see the module docstring for the limits."""
    iso = _isolation if _probe else isolation()
    outer = tempfile.mkdtemp(prefix="lrlhf-sandbox-")  # 0700 root: the program cannot write to ``..``
    work = os.path.join(outer, "work")
    os.mkdir(work, 0o700)
    uid = _UID_BASE + slot if iso.namespaces else -1
    with open(os.path.join(work, "prog.py"), "w", encoding="utf-8", errors="surrogatepass") as f:
        f.write(source)
    if uid >= 0:
        os.chown(work, uid, uid)
        os.chown(os.path.join(work, "prog.py"), uid, uid)
    args = [work, str(uid), str(memory_mb << 20), str(max(1, int(timeout_s + 0.999))), str(16 << 20)]
    args += [str(max_processes), "1" if iso.namespaces else "0", iso.python]
    cmd = [sys.executable, "-I", "-S", "-c", _BOOTSTRAP, *args]
    if iso.namespaces:
        cmd = ["unshare", "--pid", "--fork", "--kill-child", "--net", "--mount", *cmd]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}
    env["PYTHONIOENCODING"] = "utf-8"
    start = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=outer,
        start_new_session=True,
        close_fds=True,
    )

    def kill() -> None:
        if iso.namespaces:
            # Kill the namespace's init (unshare's child), not unshare: unshare then reaps it, and the
            # kernel kills everything else in the namespace. Killing unshare too would orphan a zombie.
            for child in _children(proc.pid):
                try:
                    os.kill(child, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                proc.wait(timeout=2.0)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    out: list[bytes] = []
    err: list[bytes] = []
    over = threading.Event()
    jobs = [
        (_feed, (proc.stdin, stdin.encode("utf-8", "replace"))),
        (_read_capped, (proc.stdout, max_output_bytes, out, over, kill)),
        (_read_capped, (proc.stderr, 65536, err, threading.Event(), kill)),  # stderr: kept for diagnosis only
    ]
    threads = [threading.Thread(target=fn, args=a, daemon=True) for fn, a in jobs]
    for t in threads:
        t.start()
    timed_out = False
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        kill()  # the whole group, also when the program exited but left children behind
        proc.wait()
        for t in threads:
            t.join(timeout=2.0)
        elapsed = time.monotonic() - start
        shutil.rmtree(outer, ignore_errors=True)
    returncode = proc.returncode
    # RLIMIT_CPU sends SIGXCPU: the CPU-time limit, reported as a time-out.
    timed_out = timed_out or returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU)
    return ProgramResult(b"".join(out), b"".join(err), returncode, timed_out, over.is_set(), elapsed)
