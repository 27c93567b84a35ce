"""glibc's malloc told to keep the blocks it frees: the entry points restart once with it.

Why (measured; docs/speed.md, "The page faults: glibc hands XLA's step buffers back"): XLA:CPU
allocates each step's temporary buffers afresh, one block a device (on `small`, 32.7 MiB at
31 images a device, 67.5 MiB at 64), and frees them when the step ends. glibc serves every
block above its mmap threshold (32 MiB at most) with a fresh mmap and hands it back with
munmap, so each step the kernel maps and zeroes the memory again, 4 KiB page by 4 KiB page:
17,000 page faults a step at batch 64 on two devices, 35,000 at batch 128, where Flax's step
ran 1.45-1.67x slower than with the tunables. Three glibc tunables stop it:

- `glibc.malloc.mmap_max=0`: no block from mmap; malloc's own heaps serve them (up to 64 MiB
  in a thread's heap), and a freed block is there for the next step;
- `glibc.malloc.trim_threshold`: freed memory stays with the process, not handed back;
- `glibc.malloc.hugetlb=1`: what must still come from mmap (a block above 64 MiB asked for on
  a thread other than the main one) is backed by transparent huge pages, 512 times fewer
  faults.

glibc reads GLIBC_TUNABLES once, when the process starts, so `restart()` sets it and replaces
the process (os.execv: the same pid, arguments and open files) with a fresh interpreter,
before the heavy imports. It does nothing where it cannot help or was told not to: not Linux,
not glibc, glibc older than 2.35 (no hugetlb tunable), a GLIBC_TUNABLES the user set,
VIT_MALLOC_DEFAULTS=0. Speed only: the arithmetic, and so every result, is the same with or
without it. The price is memory: what glibc keeps stays with the process (the README's
one-command run peaked at 1.41 GB against 0.93 GB without).
"""

from __future__ import annotations

import os
import sys

TUNABLES = ("glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=17179869184:"
            "glibc.malloc.hugetlb=1")
MIN_GLIBC = (2, 35)


def glibc_version() -> tuple[int, ...] | None:
    """(major, minor) of the C library this Python runs on, or None if it is not glibc."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if name != "glibc":
        return None
    try:
        return tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return None


def wanted(environ: dict | None = None, version: tuple[int, ...] | None = ()) -> bool:
    """Whether restart() restarts, in `environ` (os.environ) on a C library of `version`
    (glibc_version(); None: not glibc): Linux, glibc >= 2.35, no GLIBC_TUNABLES of the user's,
    no VIT_MALLOC_DEFAULTS=0."""
    env = os.environ if environ is None else environ
    version = glibc_version() if version == () else version
    return (sys.platform.startswith("linux") and version is not None and version >= MIN_GLIBC
            and "GLIBC_TUNABLES" not in env and env.get("VIT_MALLOC_DEFAULTS", "1") != "0")


def restart() -> None:
    """Replace this process by the same command with GLIBC_TUNABLES set, where wanted().
    Call it first thing in a script's `if __name__ == "__main__"` path, before jax or torch
    load; it returns (having done nothing) in the restarted process."""
    if not wanted() or not sys.executable:
        return
    os.environ["GLIBC_TUNABLES"] = TUNABLES
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
