"""Hostile programs: each must end as a failed test within its limit, leave no process and no file behind,
and leave the test process (standing in for the trainer) unharmed.

The fork bomb runs only where a PID namespace bounds it (``isolation().namespaces``); ``ulimit`` alone would
not stop it for root and could take the machine down, so without namespaces it is skipped.
"""

import os
import time
import uuid

import pytest

from lightning_rlhf.rewards import CodeExecutionReward, isolation, run_program
from lightning_rlhf.rewards.sandbox import _UID_BASE

TIMEOUT_S = 1.0
SLACK_S = 4.0  # process start, namespace set-up and the kill, on a loaded 2-core CI machine
EXPECTED = "1 2 3"
TESTS = [{"inputs": [""], "outputs": [EXPECTED]}]


def sandbox_processes() -> list[str]:
    """Processes (zombies included) a sandboxed program of this test could have left: its uids, or a sandbox
    cwd. Another test process may be running sandboxes of its own meanwhile (pytest -n: one per worker), so
    a sandbox process counts only when the first process above it that is no sandbox process is this one or
    init (an orphan); one whose chain leads to another live process is that process's business."""
    table = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
            uid, ppid = int(fields["Uid"].split()[0]), int(fields["PPid"])
            try:
                cwd = os.readlink(f"/proc/{pid}/cwd")
            except OSError:
                cwd = ""
        except (OSError, KeyError, ValueError):
            continue  # it ended while we looked
        sandboxed = _UID_BASE <= uid < _UID_BASE + 256 or "lrlhf-sandbox-" in cwd
        table[int(pid)] = (
            ppid,
            sandboxed,
            f"{pid} {fields.get('Name', '').strip()} {fields.get('State', '').strip()}",
        )
    found = []
    for pid, (ppid, sandboxed, description) in table.items():
        if not sandboxed:
            continue
        seen = {pid}
        while ppid in table and table[ppid][1] and ppid not in seen:
            seen.add(ppid)
            ppid = table[ppid][0]
        if ppid in (os.getpid(), 1, 0) or ppid not in table:
            found.append(description)
    return found


def descendants(pid: int) -> set[int]:
    found, todo = set(), [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/task/{p}/children") as f:
                kids = {int(c) for c in f.read().split()}
        except OSError:
            kids = set()
        todo.extend(kids - found)
        found |= kids
    return found


@pytest.fixture
def hostile(tmp_path, monkeypatch):
    """Run one program against ``TESTS`` and check the aftermath; returns (record, elapsed seconds)."""
    marker = f"lrlhf-hostile-{uuid.uuid4().hex}"
    monkeypatch.setenv("LRLHF_TRAINER_SECRET", marker)
    outside = [f"/tmp/{marker}", f"/var/tmp/{marker}", f"/dev/shm/{marker}", str(tmp_path / marker)]
    before = descendants(os.getpid())
    reward = CodeExecutionReward(timeout_s=TIMEOUT_S, memory_mb=256, max_output_bytes=1 << 16, num_workers=1)

    def run(code: str, tests=TESTS):
        code = code.replace("MARKER", marker).replace("OUTSIDE", repr(outside))
        code = code.replace("TRAINER_PID", str(os.getpid()))
        start = time.monotonic()
        [record] = reward.run(["p"], [code], tests=tests)
        elapsed = time.monotonic() - start
        assert record.status != "passed", record
        assert reward(["p"], [code], tests=tests) == [0.0]
        time.sleep(0.2)  # let the kernel reap a killed namespace
        assert sandbox_processes() == []
        assert descendants(os.getpid()) <= before
        assert [p for p in outside if os.path.exists(p)] == []
        assert os.environ["LRLHF_TRAINER_SECRET"] == marker  # the trainer is unharmed
        return record, elapsed

    yield run
    # and it still runs a good program afterwards
    assert reward(["p"], ["print('1 2 3')"], tests=TESTS) == [10.0]


def test_isolation_is_described():
    iso = isolation()
    assert "RLIMIT_AS" in iso.enforced and "output cap" in iso.enforced
    assert ("PID namespace" in iso.enforced) == iso.namespaces


def test_infinite_loop(hostile):
    record, elapsed = hostile("while True:\n    pass\n")
    assert record.status == "timeout" and elapsed < TIMEOUT_S + SLACK_S


def test_sleep(hostile):
    record, elapsed = hostile("import time\nprint('1 2', flush=True)\ntime.sleep(60)\n")
    assert record.status == "timeout" and elapsed < TIMEOUT_S + SLACK_S


def test_ignores_sigterm(hostile):
    code = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    code += "while True:\n    time.sleep(0.01)\n"
    record, elapsed = hostile(code)
    assert record.status == "timeout" and elapsed < TIMEOUT_S + SLACK_S


NO_PID_NS = not isolation().namespaces


@pytest.mark.skipif(NO_PID_NS, reason="no PID namespace here: a fork bomb would be unbounded")
def test_fork_bomb(hostile):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    record, elapsed = hostile(code)
    assert record.status == "timeout" and elapsed < TIMEOUT_S + SLACK_S


@pytest.mark.skipif(NO_PID_NS, reason="without a PID namespace a setsid daemon escapes killpg")
def test_daemon_that_detaches(hostile):
    code = "import os, time\nif os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\nprint('1 2')\n"
    record, elapsed = hostile(code)
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S


@pytest.mark.skipif(NO_PID_NS, reason="no network namespace here")
def test_no_network(hostile):
    """A port the trainer listens on (loopback) is unreachable from the program's network namespace."""
    import socket

    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        code = (
            "import socket\ns = socket.socket()\ns.settimeout(0.5)\n"
            f"s.connect(('127.0.0.1', {server.getsockname()[1]}))\nprint('1 2 3')\n"
        )
        record, elapsed = hostile(code)
    assert record.status == "runtime_error" and elapsed < TIMEOUT_S + SLACK_S


def test_memory_bomb(hostile):
    record, elapsed = hostile("x = bytearray(10 ** 10)\n")
    assert record.status == "memory" and elapsed < TIMEOUT_S + SLACK_S
    record, elapsed = hostile("chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 20))\n")
    assert record.status in ("memory", "timeout") and elapsed < TIMEOUT_S + SLACK_S


def test_output_flood(hostile):
    record, elapsed = hostile("while True:\n    print('1 2 3' * 1000)\n")
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S


def test_writes_outside_its_directory(hostile):
    code = (
        "import os\nfor path in OUTSIDE + ['../MARKER', '../../MARKER']:\n    try:\n"
        "        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
        "open('inside.txt', 'w').write('allowed')\nprint(os.listdir('.'))\n"
    )
    record, elapsed = hostile(code)
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S


def test_reads_trainer_environment(hostile):
    code = (
        "import os\nfound = [v for v in os.environ.values() if 'lrlhf-hostile' in v]\n"
        "for pid in (os.getppid(), TRAINER_PID):\n    try:\n"
        "        found.append(open(f'/proc/{pid}/environ', 'rb').read().decode(errors='replace'))\n"
        "    except OSError:\n        pass\n"
        "print('1 2 3' if any('MARKER' in f for f in found) else 'nothing')\n"
    )
    record, elapsed = hostile(code)
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S
    # the same probe, run directly: it prints what it saw, and it saw nothing
    probe = code.replace("MARKER", os.environ.get("LRLHF_TRAINER_SECRET", "x")).replace(
        "TRAINER_PID", str(os.getpid())
    )
    assert run_program(probe, timeout_s=TIMEOUT_S + 1).stdout.strip() == b"nothing"


def test_reads_expected_outputs(hostile):
    """The expected output is a unique token; the program looks for it wherever the child could."""
    token = f"expected-{uuid.uuid4().hex}"
    code = (
        "import os, sys\nfound = ''\nplaces = ['.', '..', '/tmp']\n"
        "for d in places:\n    try:\n        for n in os.listdir(d):\n"
        "            p = os.path.join(d, n)\n            try:\n"
        "                t = open(p, errors='replace').read()\n"
        "                if 'expected-' in t: found = t\n            except OSError:\n                pass\n"
        "    except OSError:\n        pass\n"
        "for pid in os.listdir('/proc'):\n    if pid.isdigit():\n        try:\n"
        "            t = open(f'/proc/{pid}/cmdline', 'rb').read().decode(errors='replace')\n"
        "            if 'expected-' in t: found = t\n        except OSError:\n            pass\n"
        "found += sys.stdin.read()\n"
        "print(found[found.find('expected-'):][:41] if 'expected-' in found else 'no')\n"
    )
    record, elapsed = hostile(code, tests=[{"inputs": [""], "outputs": [token]}])
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S


def test_deep_recursion(hostile):
    code = "import sys\nsys.setrecursionlimit(10 ** 7)\ndef f(n):\n    return f(n + 1) + 1\nf(0)\n"
    record, elapsed = hostile(code)
    assert record.status in ("runtime_error", "memory", "timeout") and elapsed < TIMEOUT_S + SLACK_S


def test_os_exit_zero_with_partial_output(hostile):
    code = "import os, sys\nsys.stdout.write('1 2')\nsys.stdout.flush()\nos._exit(0)\n"
    record, elapsed = hostile(code)
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S


def test_binary_output(hostile):
    record, elapsed = hostile("import sys\nsys.stdout.buffer.write(b'1 2 3\\xff\\x00\\n')\n")
    assert record.status == "failed" and elapsed < TIMEOUT_S + SLACK_S
