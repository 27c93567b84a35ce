"""train/malloc.py: the entry points restart once with glibc told to keep freed blocks, and
that stops the page faults it is there for (real processes, real glibc)."""

import subprocess
import sys

import pytest

from tests.helpers import env
from train import malloc

# wanted() on an empty environment: Linux with glibc >= 2.35, whatever the caller's variables
needs_glibc = pytest.mark.skipif(not malloc.wanted({}), reason="needs Linux with glibc >= 2.35")

# What XLA:CPU does each step, in miniature: malloc a 40 MB block, write all of it, free it;
# three times. The minor page faults of the last round say whether the kernel had to map and
# zero the block again.
ROUNDS = """
import ctypes, os, resource
from train import malloc
print("pid", os.getpid(), os.environ.get("GLIBC_TUNABLES"), flush=True)
malloc.restart()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = libc.malloc(40 << 20)
    ctypes.memset(block, 1, 40 << 20)
    libc.free(block)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print("faults", faults)
"""


def _run(extra: dict) -> list[str]:
    e = {k: v for k, v in env().items() if k not in ("GLIBC_TUNABLES", "VIT_MALLOC_DEFAULTS")}
    proc = subprocess.run([sys.executable, "-c", ROUNDS], capture_output=True, text=True,
                          env={**e, **extra}, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.split("\n")


def test_restart_is_wanted_only_on_new_glibc_on_linux_and_never_over_the_user():
    assert malloc.wanted({}, (2, 36)) == sys.platform.startswith("linux")
    assert not malloc.wanted({}, (2, 34))  # no hugetlb tunable before 2.35
    assert not malloc.wanted({}, None)  # not glibc (musl, macOS)
    assert not malloc.wanted({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36))
    assert not malloc.wanted({"VIT_MALLOC_DEFAULTS": "0"}, (2, 36))


@needs_glibc
def test_restart_replaces_the_process_once_with_the_tunables_and_the_faults_stop():
    lines = _run({})
    first, second = lines[0].split(), lines[1].split()
    assert first[2] == "None" and second[2] == malloc.TUNABLES  # the same command, restarted once
    assert first[1] == second[1]  # ... in the same process (os.execv), so a parent's pid still holds
    assert lines[2].startswith("faults") and int(lines[2].split()[1]) < 100  # the block was kept
    # without the restart, glibc hands the 40 MB back each round: 10,240 pages mapped again
    off = _run({"VIT_MALLOC_DEFAULTS": "0"})
    assert off[0].split()[2] == "None" and off[1].startswith("faults")
    assert int(off[1].split()[1]) > 5000
