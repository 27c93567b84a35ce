"""XLA:CPU flags that make this ViT train faster, applied by the entry points before JAX starts.

Measured on the 2-core CPU (jaxlib 0.10.2, batch 128; README, "Where the time
goes"): XLA:CPU hands dots and some elementwise fusions to YNNPACK by default. For this model's
shapes YNNPACK is slower than XLA's own emitters plus Eigen: turning it off takes the
trainer's jitted step (augmentation included, 2 CPU devices) from about 920 to 980 img/s on
`small` and from 2,140 to 2,500 on `cpu`. The flag only touches the CPU backend; GPU runs are
unaffected.

`cpu_devices()` picks how many XLA CPU devices the Flax trainer splits each batch over. One
XLA:CPU device keeps about 1.6 of the 2 cores busy on this model (its many small kernels leave
gaps); two devices, each with half the batch and a gradient all-reduce between them, fill the
gaps: the `cpu` preset's train step goes from about 1,950 to 2,450-2,600 img/s here.

XLA reads XLA_FLAGS once, when JAX creates its first backend, so `apply()` must run before the
first JAX computation (importing jax is fine). A flag the user already set is left alone, and
jaxlib releases older than the one measured are left alone too (XLA aborts on flags it
does not know).
"""

from __future__ import annotations

import os
from importlib import metadata

CPU_FLAGS = {"--xla_cpu_experimental_ynn_fusion_type": ""}  # "" = YNNPACK fuses nothing
MIN_JAXLIB = (0, 10)


def _version(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split(".")[:2]:
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def apply(environ: dict | None = None) -> str:
    """Append CPU_FLAGS to XLA_FLAGS where they are not set already; returns the new XLA_FLAGS."""
    env = os.environ if environ is None else environ
    flags = env.get("XLA_FLAGS", "")
    try:
        known = _version(metadata.version("jaxlib")) >= MIN_JAXLIB
    except metadata.PackageNotFoundError:
        known = False
    if known and env.get("VIT_XLA_DEFAULTS", "1") != "0":
        given = {f.split("=", 1)[0] for f in flags.split()}
        extra = [f"{name}={value}" for name, value in CPU_FLAGS.items() if name not in given]
        flags = " ".join([flags, *extra]).strip()
        env["XLA_FLAGS"] = flags
    return flags


def cpu_devices(requested: int | None, batch_size: int, environ: dict | None = None) -> int | None:
    """How many XLA CPU devices to ask JAX for (jax_num_cpu_devices), or None to leave it be.

    `requested` (--cpu-devices) wins. Otherwise a count the user set through XLA_FLAGS
    (--xla_force_host_platform_device_count) or JAX_NUM_CPU_DEVICES is left alone, and the
    default is 2 on a machine with 2 or more cores when the batch splits in two, else 1.
    Only the CPU backend reads it: on a GPU machine the GPUs are still the devices used.
    """
    env = os.environ if environ is None else environ
    if requested is not None:
        return requested
    if "xla_force_host_platform_device_count" in env.get("XLA_FLAGS", "") or \
            env.get("JAX_NUM_CPU_DEVICES"):
        return None
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 2 if cores >= 2 and batch_size % 2 == 0 else 1
