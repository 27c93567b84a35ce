"""A small convolutional network: the CNN baseline the ViT is measured against, and a teacher.

Not a ViT and not part of the twin contract: Flax only, trained by train/cnn_baseline.py with
the ViT trainer's own jitted step (the same augmentation, optimizer, schedule and EMA), so that
the two kinds of model are compared on one recipe, one split and one machine. Its weights are
a safetensors file of their own format ("cnn/1"), which the Flax trainer's `--teacher` also
takes, to distill a ViT from a convolutional network as DeiT does (Touvron et al. 2021).

The network: blocks of two 3x3 convolutions (ReLU after each), each block but the last
followed by 2x2 max pooling, then a dense layer to the classes. No batch norm, so that the
training step stays a pure function of (params, batch) as the ViT's is.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

FORMAT = "cnn/1"


class CNNError(ValueError):
    """A CNN weight file that cannot be used."""


@dataclasses.dataclass(frozen=True)
class CNNConfig:
    channels: tuple[int, ...] = (32, 64, 128)  # two 3x3 convolutions per block, this many channels
    num_classes: int = 10
    image_height: int = 28
    image_width: int = 28

    def to_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CNNConfig:
        return cls(**{**d, "channels": tuple(d["channels"])})


class CNN(nn.Module):
    config: CNNConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
        """x: (B, H, W, 1) normalized images -> (B, K) logits. `train` is taken and ignored
        (no dropout), so that the ViT's training step can call either model."""
        x = x.astype(self.dtype)
        last = len(self.config.channels) - 1
        for i, c in enumerate(self.config.channels):
            x = nn.relu(nn.Conv(c, (3, 3), dtype=self.dtype, name=f"conv{i}_0")(x))
            x = nn.relu(nn.Conv(c, (3, 3), dtype=self.dtype, name=f"conv{i}_1")(x))
            if i < last:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
        x = x.reshape(x.shape[0], -1)
        return nn.Dense(self.config.num_classes, dtype=self.dtype, name="head")(x).astype(jnp.float32)


def init_params(config: CNNConfig, seed: int) -> dict[str, Any]:
    x = jnp.zeros((1, config.image_height, config.image_width, 1), jnp.float32)
    return CNN(config).init(jax.random.PRNGKey(seed), x)["params"]


def named_leaves(tree: Any) -> dict[str, Any]:
    """Nested Flax params (or their shapes) -> {'conv0_0.kernel': leaf, ...}."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {".".join(k.key for k in path): v for path, v in leaves}


def flat(params: Any) -> dict[str, np.ndarray]:
    """Nested Flax params -> float32 arrays by name (Flax's layout: HWIO kernels)."""
    return {k: np.asarray(v, np.float32) for k, v in named_leaves(jax.device_get(params)).items()}


def nested(tensors: dict[str, np.ndarray]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in tensors.items():
        module, leaf = name.split(".")
        out.setdefault(module, {})[leaf] = value
    return out


def save(path: str | os.PathLike, params: Any, config: CNNConfig) -> None:
    """Write the weights atomically (temp file, fsync, rename)."""
    from safetensors.numpy import save as to_bytes

    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(to_bytes(flat(params), metadata=meta))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def is_cnn_file(path: str | os.PathLike) -> bool:
    """Whether a safetensors file says it holds this module's weights (False for anything else,
    readable or not: the caller's own loader then says what is wrong with it)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT
    except (SafetensorError, OSError, ValueError):
        return False


def load(path: str | os.PathLike) -> tuple[dict[str, Any], CNNConfig]:
    """-> (nested Flax params as numpy arrays, config), checked against the config's shapes."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        config = CNNConfig.from_dict(json.loads(meta["config"]))
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        raise CNNError(f"{path}: not a readable CNN weight file ({e})") from None
    expected = jax.eval_shape(lambda: init_params(config, 0))
    want = {name: v.shape for name, v in named_leaves(expected).items()}
    got = {name: v.shape for name, v in tensors.items()}
    if want != got:
        raise CNNError(f"{path}: its tensors do not fit its config {config.to_dict()}")
    if not all(np.all(np.isfinite(v)) for v in tensors.values()):
        raise CNNError(f"{path}: non-finite weights")
    return nested(tensors), config

