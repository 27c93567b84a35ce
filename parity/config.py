"""The one framework-neutral ViT config, and the table of named presets.

Imports neither jax nor torch: both twins, the converters and the trainers read
the same frozen dataclass, so a run is described by one JSON object.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Literal

PosEmb = Literal["sincos1d", "sincos2d", "learned", "none"]
Pool = Literal["cls", "gap"]


class ConfigError(ValueError):
    """A config value or field that cannot describe a ViT."""


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Everything that fixes the function a ViT computes (and its weight shapes).

    Dosovitskiy et al. 2020, eq. 1-4:
      z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
      z'_l = MSA(LN(z_{l-1})) + z_{l-1}
      z_l = MLP(LN(z'_l)) + z'_l
      y = LN(z_L^0)
    """

    image_height: int = 28
    image_width: int = 28
    channels: int = 1
    crop: int = 0  # pixels cut off every border before patchify: the model sees the central part
    patch_size: int = 4
    # pixels from one patch to the next; 0 means patch_size: the paper's disjoint patches. Less
    # than patch_size, the patches overlap (each pixel in up to ceil(p/s)^2 tokens).
    patch_stride: int = 0
    width: int = 64  # D, the token dimension
    depth: int = 4  # L, number of encoder blocks
    num_heads: int = 4
    mlp_ratio: float = 2.0  # MLP hidden = round(width * mlp_ratio)
    num_classes: int = 10
    posemb: PosEmb = "learned"  # none: E_pos = 0, the paper's "no positional embedding" (App. D.4)
    pool: Pool = "cls"
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth of the last block; linear from 0 at the first
    qkv_bias: bool = True
    ln_eps: float = 1e-6
    gelu_exact: bool = True  # erf GELU; False uses the tanh approximation
    # Lee et al. 2021, "Vision Transformer for Small-Size Datasets": both off in every preset.
    lsa: bool = False  # Locality Self-Attention: a learned logit scale per head, no token attends to itself
    spt: bool = False  # Shifted Patch Tokenization: the image and 4 half-patch diagonal shifts, LN, then E
    # Heo et al. 2024, "Rotary Position Embedding for Vision Transformer" (RoPE-Axial): off in every preset.
    rope: bool = False  # q and k of each patch token rotated by its column (first half) and row (second half)

    def __post_init__(self) -> None:
        self.validate()

    # ---- derived sizes -------------------------------------------------------------
    @property
    def seen(self) -> tuple[int, int]:
        """(height, width) of the part of the image the model patchifies: the image less `crop`
        pixels on every side (MNIST's digits sit in the central 20x20 of their 28x28)."""
        return self.image_height - 2 * self.crop, self.image_width - 2 * self.crop

    @property
    def stride(self) -> int:
        """Pixels from one patch to the next: patch_stride, or patch_size where it is 0."""
        return self.patch_stride or self.patch_size

    @property
    def grid(self) -> tuple[int, int]:
        """Patch grid (rows, cols): a patch at every stride that fits in the part seen."""
        height, width = self.seen
        p, s = self.patch_size, self.stride
        return (height - p) // s + 1, (width - p) // s + 1

    @property
    def num_patches(self) -> int:
        rows, cols = self.grid
        return rows * cols

    @property
    def num_tokens(self) -> int:
        """Sequence length seen by the encoder: the patches, plus the class token with pool='cls'."""
        return self.num_patches + (1 if self.pool == "cls" else 0)

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch, in (p1 p2 c) order."""
        return self.patch_size * self.patch_size * self.channels

    @property
    def stem_dim(self) -> int:
        """Length of the patch projection's input: one patch, or with `spt` the patch of the
        image stacked on channels with its 4 shifted copies, in (p1 p2 c) order."""
        return self.patch_dim * (5 if self.spt else 1)

    @property
    def mlp_dim(self) -> int:
        return int(round(self.width * self.mlp_ratio))

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    # ---- checks at the boundary ----------------------------------------------------
    def validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        for name in ("image_height", "image_width", "channels", "patch_size", "width",
                     "depth", "num_heads", "num_classes"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool) and value > 0,
                 f"{name} must be a positive integer, got {value!r}")
        need(isinstance(self.crop, int) and not isinstance(self.crop, bool)
             and 0 <= 2 * self.crop < min(self.image_height, self.image_width),
             f"crop must be a whole number of pixels, 0 <= 2 * crop < the image's height and width "
             f"({self.image_height}x{self.image_width}), got {self.crop!r}")
        need(isinstance(self.patch_stride, int) and not isinstance(self.patch_stride, bool)
             and 0 <= self.patch_stride <= self.patch_size,
             f"patch_stride must be a whole number of pixels from 1 to patch_size "
             f"({self.patch_size}), or 0 for patch_size, got {self.patch_stride!r}")
        height, width = self.seen
        cropped = f" (after a crop of {self.crop})" if self.crop else ""
        if self.stride == self.patch_size:
            need(height % self.patch_size == 0 and width % self.patch_size == 0,
                 f"image size {height}x{width}{cropped} is not divisible by patch_size "
                 f"{self.patch_size}")
        else:
            p, s = self.patch_size, self.stride
            need(height >= p and width >= p and (height - p) % s == 0 and (width - p) % s == 0,
                 f"patches of {p} every {s} pixels do not tile image size {height}x{width}"
                 f"{cropped}: height - patch_size and width - patch_size must be multiples of "
                 f"patch_stride")
        need(self.width % self.num_heads == 0,
             f"width {self.width} is not divisible by num_heads {self.num_heads}")
        need(0 < self.mlp_ratio < math.inf and self.mlp_dim >= 1,
             f"mlp_ratio must be a finite number that leaves the MLP at least one unit "
             f"(round(width * mlp_ratio) >= 1), got {self.mlp_ratio}")
        need(self.posemb in ("sincos1d", "sincos2d", "learned", "none"),
             f"posemb must be one of sincos1d, sincos2d, learned, none; got {self.posemb!r}")
        need(self.pool in ("cls", "gap"), f"pool must be 'cls' or 'gap', got {self.pool!r}")
        if self.posemb == "sincos1d":
            need(self.width % 2 == 0, f"posemb sincos1d needs an even width, got {self.width}")
        if self.posemb == "sincos2d":
            need(self.width % 4 == 0,
                 f"posemb sincos2d needs a width divisible by 4, got {self.width}")
        for name in ("dropout", "attn_dropout", "drop_path"):
            value = getattr(self, name)
            need(0.0 <= value < 1.0, f"{name} must be in [0, 1), got {value}")
        need(0 < self.ln_eps < math.inf, f"ln_eps must be a finite number > 0, got {self.ln_eps}")
        for name in ("qkv_bias", "gelu_exact", "spt", "lsa", "rope"):  # a weight file's "false" is no bool
            need(isinstance(getattr(self, name), bool), f"{name} must be true or false, got "
                                                         f"{getattr(self, name)!r}")
        if self.spt:
            need(self.patch_size >= 2, f"spt shifts by half a patch: it needs patch_size >= 2, "
                                       f"got {self.patch_size}")
        if self.lsa:
            need(self.num_tokens >= 2, "lsa bars each token from itself: it needs 2+ tokens")
        if self.rope:
            need(self.head_dim % 4 == 0, f"rope rotates pairs of head dims, half by column and "
                                         f"half by row: it needs head_dim (width / num_heads) "
                                         f"divisible by 4, got {self.head_dim}")

    # ---- (de)serialisation ---------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}; "
                              f"known fields are: {', '.join(sorted(known))}")
        return cls(**values)

    def replace(self, **changes: Any) -> ViTConfig:
        known = {f.name for f in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)


# Named presets. Sizes in the "Ti"/"S" rows follow the ViT family of Touvron et al. 2021
# (DeiT) and Steiner et al. 2021 ("How to train your ViT"), scaled down to 28x28 digits.
PRESETS: dict[str, dict[str, Any]] = {
    # Seconds on a CPU: for tests and smoke runs only.
    "tiny": dict(patch_size=7, width=32, depth=2, num_heads=2, mlp_ratio=2.0),
    # The default: 99% on Digit Recognizer within 10 minutes on a 2-core CPU. Patch 7 makes
    # 16 tokens, so attention is cheap and a step costs about half of `small`'s.
    "cpu": dict(patch_size=7, width=96, depth=4, num_heads=4, mlp_ratio=2.0),
    # The CPU config of the speed comparison (the 2-core CPU reference).
    "small": dict(patch_size=4, width=64, depth=4, num_heads=4, mlp_ratio=2.0),
    # The reference config of the speed comparison (a ViT-Ti/4): the GPU default.
    "base": dict(patch_size=4, width=192, depth=6, num_heads=3, mlp_ratio=4.0),
    # The accuracy recipe's model (issue: accuracy); ViT-Ti/4 with stochastic depth.
    "kaggle": dict(patch_size=4, width=192, depth=6, num_heads=3, mlp_ratio=4.0,
                   drop_path=0.1),
}


def preset(name: str, **overrides: Any) -> ViTConfig:
    """The named preset's config, with any field overridden."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ViTConfig().replace(**{**PRESETS[name], **overrides})
