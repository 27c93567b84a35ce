"""Where the trainers keep what a second launch can reuse: parsed CSVs and compiled XLA programs.

Both cost seconds at every launch and depend only on their inputs: parsing the competition's
CSVs (3-6 s here) and compiling the Flax train step (seconds on a CPU, 10-35 s on a GPU). The
cache folder is `$VIT_CACHE_DIR`, by default `$XDG_CACHE_HOME/vit-twins` (`~/.cache/vit-twins`);
`VIT_CACHE_DIR=off` (or empty) turns both off. Deleting the folder is always safe.

- `data/`: train.csv and test.csv as uint8 arrays, one file per download, named by the SHA-256
  of the bytes they came from, written only after every check of train/data.py passed.
- `xla/`: JAX's persistent compilation cache (keyed by JAX on the program, the backend, the
  XLA flags and the library versions). The Flax trainer, train/ensemble.py and
  train/tta_study.py use it; PyTorch eager has nothing to compile, and `torch.compile` keeps
  its own cache.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

ENV = "VIT_CACHE_DIR"


def cache_dir(kind: str, environ: dict | None = None) -> Path | None:
    """The folder for one kind of cache ("data", "xla"), or None when caching is off."""
    env = os.environ if environ is None else environ
    root = env.get(ENV)
    if root is None:
        root = str(Path(env.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "vit-twins")
    if root.strip().lower() in ("", "0", "off", "none"):
        return None
    return Path(root) / kind


def use_jax_compilation_cache(environ: dict | None = None) -> Path | None:
    """Point JAX's persistent compilation cache at cache_dir("xla"), for every program however
    quick to compile; returns the folder. A cache folder the user gave JAX
    (JAX_COMPILATION_CACHE_DIR) is left as it is."""
    import jax

    folder = cache_dir("xla", environ)
    if folder is None or jax.config.jax_compilation_cache_dir:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        print(f"note: no compilation cache ({folder}: {e.strerror}); compiling afresh", file=sys.stderr)
        return None
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    return folder
