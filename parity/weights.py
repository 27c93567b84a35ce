"""The canonical weight format: one flat table of numpy arrays, stored as safetensors.

Names follow timm's conventions; layouts follow the maths, x @ kernel (kernels are
(in, out), as in Flax). See `canonical_shapes` for the table, README for its meaning.

  Flax params  <->  canonical  <->  torch state_dict

The converters only rename and transpose, so every round trip is bitwise exact.
Nothing here ever unpickles: safetensors holds raw tensors and a JSON header.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from parity.config import ConfigError, ViTConfig

FORMAT = "vit-canonical/1"


class WeightsError(ValueError):
    """A weight file or table that does not fit the config it is loaded for."""


# ---- the table -----------------------------------------------------------------------
def canonical_shapes(config: ViTConfig) -> dict[str, tuple[int, ...]]:
    """Every canonical tensor name with its shape, in model order."""
    c = config
    d, m = c.width, c.mlp_dim
    shapes: dict[str, tuple[int, ...]] = {}
    if c.spt:
        shapes.update({"patch_norm.scale": (c.stem_dim,), "patch_norm.bias": (c.stem_dim,)})
    shapes.update({"patch_embed.kernel": (c.stem_dim, d), "patch_embed.bias": (d,)})
    if c.pool == "cls":
        shapes["cls_token"] = (1, 1, d)
    if c.posemb == "learned":
        shapes["pos_embed"] = (1, c.num_tokens, d)
    for i in range(c.depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "norm1.scale": (d,), b + "norm1.bias": (d,),
            b + "attn.qkv.kernel": (d, 3 * d),
        })
        if c.qkv_bias:
            shapes[b + "attn.qkv.bias"] = (3 * d,)
        if c.lsa:
            shapes[b + "attn.logit_scale"] = (c.num_heads,)
        shapes.update({
            b + "attn.proj.kernel": (d, d), b + "attn.proj.bias": (d,),
            b + "norm2.scale": (d,), b + "norm2.bias": (d,),
            b + "mlp.fc1.kernel": (d, m), b + "mlp.fc1.bias": (m,),
            b + "mlp.fc2.kernel": (m, d), b + "mlp.fc2.bias": (d,),
        })
    shapes.update({"norm.scale": (d,), "norm.bias": (d,),
                   "head.kernel": (d, c.num_classes), "head.bias": (c.num_classes,)})
    return shapes


def check(tensors: Mapping[str, Any], config: ViTConfig, *, source: str = "weights") -> None:
    """Refuse a table whose names or shapes do not fit `config`, naming the offenders."""
    expected = canonical_shapes(config)
    problems = []
    missing = [n for n in expected if n not in tensors]
    unexpected = sorted(n for n in tensors if n not in expected)
    if missing:
        problems.append(f"missing {_short(missing)}")
    if unexpected:
        problems.append(f"unexpected {_short(unexpected)}")
    wrong = [f"{n} has shape {tuple(np.shape(tensors[n]))}, expected {expected[n]}"
             for n in expected if n in tensors and tuple(np.shape(tensors[n])) != expected[n]]
    if wrong:
        problems.append("; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4
                                                else ""))
    if problems:
        raise WeightsError(f"{source} do not fit the config: " + "; ".join(problems))


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def random_canonical(config: ViTConfig, seed: int = 0, scale: float = 0.2) -> dict[str, np.ndarray]:
    """Seeded random float32 weights for every tensor (norm scales around 1): for parity tests."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in canonical_shapes(config).items():
        value = rng.normal(0.0, scale, size=shape)
        if name.endswith(".scale"):
            value = 1.0 + value
        elif name.endswith(".kernel"):
            value = value / np.sqrt(max(shape[0], 1)) * 3.0
        out[name] = value.astype(np.float32)
    return out


# ---- Flax <-> canonical ----------------------------------------------------------------
_FLAX_BLOCK = re.compile(r"^blocks_(\d+)$")


def flax_to_canonical(params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Nested Flax params -> flat canonical table ('blocks_3' becomes 'blocks.3')."""
    out: dict[str, np.ndarray] = {}

    def walk(tree: Mapping[str, Any], path: tuple[str, ...]) -> None:
        for key, value in tree.items():
            if isinstance(value, Mapping):
                walk(value, path + (key,))
            else:
                out[flax_path_to_canonical(path + (key,))] = np.asarray(value)

    walk(params, ())
    return out


def flax_path_to_canonical(path: tuple[str, ...]) -> str:
    """The canonical name of one Flax leaf, by its keys: ('blocks_3', 'mlp', 'fc1', 'kernel')
    -> 'blocks.3.mlp.fc1.kernel'."""
    return ".".join(f"blocks.{m.group(1)}" if (m := _FLAX_BLOCK.match(key)) else key for key in path)


def canonical_to_flax(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    """Flat canonical table -> nested Flax params (numpy leaves; jnp.asarray them to use)."""
    check(tensors, config)
    params: dict[str, Any] = {}
    for name, value in tensors.items():
        parts = name.split(".")
        if parts[0] == "blocks":
            parts = [f"blocks_{parts[1]}"] + parts[2:]
        node = params
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = np.asarray(value)
    return params


# ---- torch <-> canonical ---------------------------------------------------------------
# canonical leaf -> torch leaf. Kernels are stored (in, out) here and (out, in) in torch.
def canonical_to_torch(tensors: Mapping[str, np.ndarray], config: ViTConfig) -> dict[str, Any]:
    """Flat canonical table -> torch state_dict (torch tensors, contiguous)."""
    import torch

    check(tensors, config)
    state = {}
    for name, value in tensors.items():
        value = np.asarray(value)
        if name.endswith(".kernel"):
            state[name[: -len("kernel")] + "weight"] = torch.from_numpy(np.ascontiguousarray(value.T))
        elif name.endswith(".scale"):
            state[name[: -len("scale")] + "weight"] = torch.from_numpy(value.copy())
        else:
            state[name] = torch.from_numpy(value.copy())
    return state


def torch_to_canonical(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """torch state_dict -> flat canonical table. 2-D weights are kernels, 1-D are norm scales."""
    out = {}
    for name, tensor in state_dict.items():
        value = tensor.detach().cpu().numpy()
        if name.endswith(".weight") and value.ndim == 2:
            out[name[: -len("weight")] + "kernel"] = np.ascontiguousarray(value.T)
        elif name.endswith(".weight") and value.ndim == 1:
            out[name[: -len("weight")] + "scale"] = value.copy()
        else:
            out[name] = value.copy()
    return out


# ---- files ---------------------------------------------------------------------------
def save(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], config: ViTConfig,
         metadata: Mapping[str, str] | None = None) -> None:
    """Write a canonical safetensors file atomically (temp file, fsync, rename). The same
    weights and config always give the same bytes."""
    from safetensors.numpy import save as to_bytes

    check(tensors, config)
    path = Path(path)
    meta = {"format": FORMAT, "config": json.dumps(config.to_dict(), sort_keys=True)}
    meta.update(metadata or {})
    arrays = {n: np.ascontiguousarray(np.asarray(tensors[n], dtype=np.float32))
              for n in canonical_shapes(config)}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(_sorted_metadata(to_bytes(arrays, metadata=meta)))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sorted_metadata(blob: bytes) -> bytes:
    """The same file with its header's metadata in sorted order. safetensors writes the
    metadata in a random order on each save (a Rust HashMap: safetensors issue #584), so two
    saves of the same weights would differ in bytes and in checksum. The header is rewritten
    at the same length, so the tensors' bytes and offsets stay as they are."""
    n = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > n:  # the same keys and values, compact: never longer than the library's
        raise WeightsError(f"could not rewrite the safetensors header ({len(text)} > {n} bytes)")
    return blob[:8] + text.ljust(n) + blob[8 + n:]


def file_format(path: str | os.PathLike) -> str | None:
    """The format a safetensors file's header names ('vit-canonical/1', or train/cnn.py's
    'cnn/1'), None if it names none; a file that is not safetensors is refused."""
    return (_header(Path(path)).get("__metadata__") or {}).get("format")


def read_config(path: str | os.PathLike) -> ViTConfig:
    """The config stored in a canonical file's header."""
    meta = _header(Path(path)).get("__metadata__") or {}
    if meta.get("format") != FORMAT or "config" not in meta:
        raise WeightsError(f"{path}: not a canonical ViT weight file (no '{FORMAT}' header)")
    try:
        return ViTConfig.from_dict(json.loads(meta["config"]))
    except (json.JSONDecodeError, ConfigError, TypeError) as e:
        raise WeightsError(f"{path}: the config in its header is invalid: {e}") from None


def load(path: str | os.PathLike, config: ViTConfig | None = None) -> tuple[dict[str, np.ndarray], ViTConfig]:
    """Read a canonical file; check it against `config` (default: the config in its header)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    path = Path(path)
    stored = read_config(path)
    config = config or stored
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise WeightsError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    check(tensors, config, source=f"weights in {path}")
    for name, value in tensors.items():
        if not np.all(np.isfinite(value)):
            raise WeightsError(f"{path}: tensor {name} holds non-finite values")
    return tensors, config


def _header(path: Path) -> dict[str, Any]:
    """Parse the safetensors JSON header by hand: 8-byte little-endian length, then JSON."""
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            size = path.stat().st_size
            if len(raw) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes)")
            n = int.from_bytes(raw, "little")
            if n <= 0 or n > min(size - 8, 100_000_000):
                raise WeightsError(f"{path}: corrupt safetensors header (length {n}, file {size} bytes)")
            header = json.loads(f.read(n))
    except FileNotFoundError:
        raise WeightsError(f"{path}: no such weight file") from None
    except IsADirectoryError:
        raise WeightsError(f"{path}: is a directory, expected a .safetensors file") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise WeightsError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: corrupt safetensors header")
    return header


# ---- which tensors take weight decay -------------------------------------------------
def decays(name: str) -> bool:
    """Weight decay applies to kernels only: never to norms, biases, class token or positions."""
    return name.endswith(".kernel")


def torch_name_to_canonical(name: str, ndim: int) -> str:
    """The canonical name of one torch parameter ('blocks.0.norm1.weight' -> '...scale')."""
    if name.endswith(".weight"):
        return name[: -len("weight")] + ("kernel" if ndim == 2 else "scale")
    return name


def flax_decay_mask(params: Any) -> Any:
    """Flax params -> the same tree of bools, True where `decays` (optax's `mask=`). Works on
    traced params too: it reads only the tree's keys."""
    import jax

    return jax.tree_util.tree_map_with_path(
        lambda path, _: decays(flax_path_to_canonical(tuple(k.key for k in path))), params)


def torch_param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """A torch model's parameters as AdamW's two groups: those that `decays`, at weight_decay,
    then the rest, at 0."""
    named = [(torch_name_to_canonical(n, p.ndim), p) for n, p in model.named_parameters()]
    return [{"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},
            {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]
