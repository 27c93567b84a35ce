"""Vision Transformer in Flax linen (Dosovitskiy et al. 2020), twin of torchvit/model.py.

Images are channels-last, (B, H, W, C), as is usual in JAX. The two files line up block
for block: same classes, same order, same names, same intermediate keys.

  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos           (eq. 1)  -> ViT.embed
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                        (eq. 2)  -> Block
  z_l = MLP(LN(z'_l)) + z'_l                               (eq. 3)  -> Block
  y = LN(z_L^0)                                            (eq. 4)  -> ViT.norm, pooling
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from parity.config import ViTConfig

Array = jax.Array


# ---- patchify ----------------------------------------------------------------------
def crop(images: Array, pixels: int) -> Array:
    """(B, H, W, C) -> (B, H - 2 pixels, W - 2 pixels, C): the central part (config.crop)."""
    if pixels == 0:
        return images
    return images[:, pixels:-pixels, pixels:-pixels, :]


def patchify(images: Array, patch_size: int, stride: int | None = None) -> Array:
    """(B, H, W, C) -> (B, N, p*p*C), patches in row-major grid order, pixels (p1 p2 c); a
    patch every `stride` pixels (patch_size: disjoint, the paper's; less: overlapping)."""
    b, h, w, c = images.shape
    p, s = patch_size, stride or patch_size
    if s == p:
        x = images.reshape(b, h // p, p, w // p, p, c)  # (B, h, p1, w, p2, C)
    else:  # overlapping: gather each patch row's pixel rows, then each patch column's columns
        rows = np.arange((h - p) // s + 1)[:, None] * s + np.arange(p)  # (h, p1): pixel rows
        cols = np.arange((w - p) // s + 1)[:, None] * s + np.arange(p)  # (w, p2): pixel columns
        x = images[:, rows][:, :, :, cols]  # (B, h, p1, w, p2, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p1, p2, C)
    return x.reshape(b, x.shape[1] * x.shape[2], p * p * c)  # (B, N, p1*p2*C)


def unpatchify(patches: Array, patch_size: int, height: int, width: int) -> Array:
    """Inverse of patchify: (B, N, p*p*C) -> (B, H, W, C)."""
    b, n, d = patches.shape
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c)  # (B, h, w, p1, p2, C)
    x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, p1, w, p2, C)
    return x.reshape(b, height, width, c)


def patchify_naive(images: Array, patch_size: int, stride: int | None = None) -> Array:
    """The same as `patchify`, one patch at a time in Python: slow on purpose, obviously right."""
    b, h, w, c = images.shape
    p, s = patch_size, stride or patch_size
    patches = []
    for row in range((h - p) // s + 1):
        for col in range((w - p) // s + 1):
            patch = images[:, row * s:row * s + p, col * s:col * s + p, :]  # (B, p, p, C)
            patches.append(patch.reshape(b, p * p * c))
    return jnp.stack(patches, axis=1)  # (B, N, p*p*C)


def shifted_copies(images: Array, patch_size: int) -> Array:
    """Shifted Patch Tokenization's input (Lee et al. 2021): (B, H, W, C) -> (B, H, W, 5C), the
    image and its copies moved half a patch along each diagonal, zero-filled, on channels."""
    _, h, w, _ = images.shape
    s = patch_size // 2
    padded = jnp.pad(images, ((0, 0), (s, s), (s, s), (0, 0)))  # (B, H+2s, W+2s, C)
    # copy[y, x] = image[y - dy, x - dx]: moved up-left, up-right, down-left, down-right
    copies = [padded[:, s - dy:s - dy + h, s - dx:s - dx + w]
              for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]
    return jnp.concatenate([images, *copies], axis=-1)  # (B, H, W, 5C)


# ---- position encodings ------------------------------------------------------------
def sincos1d(num_tokens: int, width: int) -> Array:
    """The Transformer's table over the token index: [sin(t w_i), cos(t w_i)] interleaved."""
    position = jnp.arange(num_tokens, dtype=jnp.float32)[:, None]  # (T, 1)
    omega = 1.0 / 10000.0 ** (jnp.arange(0, width, 2, dtype=jnp.float32) / width)  # (D/2,)
    angle = position * omega[None, :]  # (T, D/2)
    table = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # (T, D/2, 2)
    return table.reshape(num_tokens, width)  # (T, D): even dims sin, odd dims cos


def sincos2d(grid: tuple[int, int], width: int) -> Array:
    """MoCo v3's 2-D table (Chen et al. 2021): [sin(x w), cos(x w), sin(y w), cos(y w)] per patch,
    the D/4 frequencies w = 10000^(-k / (D/4)) (big_vision's spaces them over D/4 - 1 steps)."""
    rows, cols = grid
    y, x = jnp.meshgrid(jnp.arange(rows, dtype=jnp.float32),
                        jnp.arange(cols, dtype=jnp.float32), indexing="ij")  # (rows, cols)
    omega = 1.0 / 10000.0 ** (jnp.arange(width // 4, dtype=jnp.float32) / (width // 4))
    x = x.reshape(-1)[:, None] * omega[None, :]  # (N, D/4)
    y = y.reshape(-1)[:, None] * omega[None, :]  # (N, D/4)
    return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], axis=1)  # (N, D)


def fixed_posemb(config: ViTConfig) -> Array:
    """The fixed table added to the tokens, (T, D); the class token's row is zero for sincos2d;
    all zeros for none (no position information, unless rope adds it in the attention)."""
    if config.posemb == "none":
        return jnp.zeros((config.num_tokens, config.width))
    if config.posemb == "sincos1d":
        return sincos1d(config.num_tokens, config.width)
    table = sincos2d(config.grid, config.width)  # (N, D)
    if config.pool == "cls":
        table = jnp.concatenate([jnp.zeros((1, config.width)), table], axis=0)  # (1+N, D)
    return table


def rope_angles(config: ViTConfig) -> Array:
    """Axial 2-D RoPE (Heo et al. 2024): the angle each pair of head dims turns by, (T, hd/2).
    The first hd/4 pairs turn by x w_i, the last hd/4 by y w_i, w_i = 100^(-i/(hd/4)), (x, y)
    the patch's column and row; the class token's row is zero: it is not turned."""
    rows, cols = config.grid
    quarter = config.head_dim // 4
    y, x = jnp.meshgrid(jnp.arange(rows, dtype=jnp.float32),
                        jnp.arange(cols, dtype=jnp.float32), indexing="ij")  # (rows, cols)
    omega = 1.0 / 100.0 ** (jnp.arange(quarter, dtype=jnp.float32) / quarter)  # (hd/4,)
    x = x.reshape(-1)[:, None] * omega[None, :]  # (N, hd/4)
    y = y.reshape(-1)[:, None] * omega[None, :]  # (N, hd/4)
    angles = jnp.concatenate([x, y], axis=1)  # (N, hd/2)
    if config.pool == "cls":
        angles = jnp.concatenate([jnp.zeros((1, 2 * quarter)), angles], axis=0)  # (1+N, hd/2)
    return angles


def rope(x: Array, angles: Array) -> Array:
    """Turn each pair (x_2i, x_2i+1) of the head dims by angles[t, i], in float32: (B, T, H, hd)
    -> the same shape and dtype. Then q_s . k_t depends on the two patches' offset only."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)  # (B, T, H, hd/2, 2)
    cos, sin = jnp.cos(angles)[:, None], jnp.sin(angles)[:, None]  # (T, 1, hd/2)
    even, odd = pairs[..., 0], pairs[..., 1]  # each (B, T, H, hd/2)
    turned = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return turned.reshape(x.shape).astype(x.dtype)


# ---- blocks ------------------------------------------------------------------------
class Dense(nn.Dense):
    """nn.Dense's parameters and function, on a 2-D view (B*T, D) of its input, the bias added
    in its own dtype.

    XLA:CPU turns the weight gradient of a (B, T, D) contraction into transposes and slow
    reductions; on the flat view it is one plain matmul (2-core CPU, `cpu` preset, batch 128:
    train step 67 -> 60 ms). On a GPU the reshape is free. torch's nn.Linear needs no help.
    In bf16 the bias (float32) is added before the one rounding to bf16, as torch's addmm does
    under autocast, so its gradient is a float32 sum: nn.Dense adds a bf16 copy, and XLA then
    sums the bias gradient in bf16 (2.5% off float32 over 3,200 rows, 4x the rest; the bf16
    rows of the parity suite). In float32 this is nn.Dense's computation exactly.
    """

    @nn.compact
    def __call__(self, inputs: Array) -> Array:
        lead, d = inputs.shape[:-1], inputs.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (d, self.features), self.param_dtype)
        dtype = self.dtype or jnp.result_type(inputs, kernel)
        x = inputs.reshape(-1, d).astype(dtype)  # (B*T, D)
        y = jax.lax.dot(x, kernel.astype(dtype), precision=self.precision)  # (B*T, F)
        if self.use_bias:
            bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype)
            y = (y.astype(bias.dtype) + bias).astype(dtype)
        return y.reshape(*lead, self.features)


def gelu(x: Array, exact: bool) -> Array:
    """GELU. The exact one written as torch writes it, x/2 (1 + erf(x/sqrt 2)): the same
    function as jax.nn.gelu's erfc form, and XLA:CPU runs erf faster (train step -3%)."""
    if not exact:
        return nn.gelu(x, approximate=True)
    return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))


class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    config: ViTConfig
    dtype: Any = jnp.float32
    # jax.nn.dot_product_attention's kernel: None lets JAX choose (XLA); "cudnn" asks for
    # cuDNN's fused attention (GPU, bf16). The same function either way; train/bench.py
    # --flax-attention compares them.
    implementation: str | None = None

    def setup(self) -> None:
        c = self.config
        dense = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform())
        self.qkv = Dense(3 * c.width, use_bias=c.qkv_bias, **dense)
        if c.lsa:  # learned per head, from the usual 1/sqrt(hd)
            self.logit_scale = self.param("logit_scale", nn.initializers.constant(c.head_dim ** -0.5),
                                          (c.num_heads,))
        if c.rope:  # a constant, computed when traced; not a parameter
            self.rope_angles = rope_angles(c)  # (T, hd/2)
        self.proj = Dense(c.width, **dense)
        self.attn_drop = nn.Dropout(c.attn_dropout)
        self.proj_drop = nn.Dropout(c.dropout)

    def __call__(self, x: Array, *, train: bool, capture: bool) -> tuple[Array, Array | None]:
        c = self.config
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, c.num_heads, c.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # each (B, T, H, hd)
        if c.rope:  # relative position, in the attention logits
            angles = self.rope_angles  # (T, hd/2)
            q, k = rope(q, angles), rope(k, angles)
        scale, mask = c.head_dim ** -0.5, None
        if c.lsa:  # Locality Self-Attention: the scale goes into q; a token never sees itself
            # in float32, so that in bf16 the scale's gradient is a float32 sum, as in torch
            q = (q.astype(jnp.float32) * self.logit_scale[:, None]).astype(q.dtype)  # (B, T, H, hd)
            scale, mask = 1.0, ~jnp.eye(t, dtype=bool)[None, None]  # (1, 1, T, T)
        weights = None
        if capture or (train and c.attn_dropout > 0):
            logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * scale  # (B, H, T, T)
            if mask is not None:
                logits = jnp.where(mask, logits, -jnp.inf)
            weights = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)  # (B, H, T, T)
            dropped = self.attn_drop(weights, deterministic=not train).astype(v.dtype)
            out = jnp.einsum("bhqk,bkhd->bqhd", dropped, v)  # (B, T, H, hd)
        else:
            out = jax.nn.dot_product_attention(  # (B, T, H, hd), fp32 softmax inside
                q, k, v, mask=mask, scale=scale, implementation=self.implementation)
        out = self.proj(out.reshape(b, t, d))  # (B, T, D)
        return self.proj_drop(out, deterministic=not train), weights


class Mlp(nn.Module):
    """Two dense layers with a GELU between them."""

    config: ViTConfig
    dtype: Any = jnp.float32

    def setup(self) -> None:
        c = self.config
        dense = dict(dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(),
                     bias_init=nn.initializers.normal(1e-6))
        self.fc1 = Dense(c.mlp_dim, **dense)
        self.fc2 = Dense(c.width, **dense)
        self.drop = nn.Dropout(c.dropout)

    def __call__(self, x: Array, *, train: bool) -> Array:
        x = gelu(self.fc1(x), exact=self.config.gelu_exact)  # (B, T, M)
        x = self.drop(x, deterministic=not train)
        return self.drop(self.fc2(x), deterministic=not train)  # (B, T, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scale the kept ones."""

    rate: float

    def __call__(self, x: Array, *, train: bool) -> Array:
        if not train or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, (x.shape[0], 1, 1))
        return jnp.where(mask, x / keep, 0.0).astype(x.dtype)


class Block(nn.Module):
    """Pre-LN encoder block, eq. 2-3: x + MSA(LN(x)), then x + MLP(LN(x))."""

    config: ViTConfig
    drop_path_rate: float = 0.0
    dtype: Any = jnp.float32
    attention_impl: str | None = None  # Attention.implementation

    def setup(self) -> None:
        c = self.config
        # LayerNorm runs in float32 whatever the compute dtype. Its variance is E[x²] - E[x]²
        # (Flax's default), torch's two-pass; on trained weights the twins' logits agree as
        # closely either way (README, "The parity suite").
        self.norm1 = nn.LayerNorm(epsilon=c.ln_eps, dtype=jnp.float32)
        self.attn = Attention(c, dtype=self.dtype, implementation=self.attention_impl)
        self.norm2 = nn.LayerNorm(epsilon=c.ln_eps, dtype=jnp.float32)
        self.mlp = Mlp(c, dtype=self.dtype)
        self.drop_path = DropPath(self.drop_path_rate)

    def __call__(self, x: Array, *, train: bool, capture: bool) -> tuple[Array, Array | None]:
        y, weights = self.attn(self.norm1(x), train=train, capture=capture)
        x = x + self.drop_path(y, train=train)  # (B, T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x), train=train), train=train)
        return x, weights


class ViT(nn.Module):
    """The whole model: patchify, embed, L blocks, final norm, pool, head.

    `model.apply(variables, images)` gives logits (B, K); with `capture=True` it gives
    `(logits, out)`, `out` a dict of named intermediates (keys listed in `INTERMEDIATES`).
    """

    config: ViTConfig
    dtype: Any = jnp.float32  # compute dtype; parameters stay float32
    attention_impl: str | None = None  # the attention kernel (Attention.implementation)

    def setup(self) -> None:
        c = self.config
        if c.spt:  # LayerNorm over each token's 5 stacked patches, before the projection
            self.patch_norm = nn.LayerNorm(epsilon=c.ln_eps, dtype=jnp.float32)
        self.patch_embed = Dense(c.width, dtype=self.dtype,
                                 kernel_init=nn.initializers.xavier_uniform())
        if c.pool == "cls":
            self.cls_token = self.param("cls_token", nn.initializers.zeros, (1, 1, c.width))
        if c.posemb == "learned":
            self.pos_embed = self.param("pos_embed", nn.initializers.normal(0.02),
                                        (1, c.num_tokens, c.width))
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = [Block(c, drop_path_rate=r, dtype=self.dtype, attention_impl=self.attention_impl)
                       for r in rates]
        self.norm = nn.LayerNorm(epsilon=c.ln_eps, dtype=jnp.float32)
        # Every linear layer computes in the compute dtype, the head included, as under autocast.
        self.head = Dense(c.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros)

    def posemb_table(self) -> Array:
        """E_pos, (1, T, D)."""
        if self.config.posemb == "learned":
            return self.pos_embed
        return fixed_posemb(self.config)[None]

    def embed(self, images: Array, out: dict[str, Array], *, train: bool) -> Array:
        """Eq. 1: (B, H, W, C) -> z0 (B, T, D)."""
        c = self.config
        images = crop(images, c.crop)  # (B, H - 2 crop, W - 2 crop, C)
        if c.spt:  # (B, N, p*p*5C), each token normalized
            patches = self.patch_norm(patchify(shifted_copies(images, c.patch_size), c.patch_size,
                                               c.stride))
        else:
            patches = patchify(images, c.patch_size, c.stride)  # (B, N, p*p*C)
        # The residual stream stays float32 whatever the compute dtype (as under torch autocast):
        # a bf16 stream loses the small block updates and trains measurably worse.
        x = self.patch_embed(patches).astype(jnp.float32)  # (B, N, D)
        out["patches"], out["stem"] = patches, x
        if c.pool == "cls":
            cls = jnp.broadcast_to(self.cls_token, (x.shape[0], 1, c.width))
            x = jnp.concatenate([cls, x], axis=1)  # (B, 1+N, D)
        x = x + self.posemb_table()  # (B, T, D)
        out["with_posemb"] = x
        return self.pos_drop(x, deterministic=not train)

    def __call__(self, images: Array, *, train: bool = False,
                 capture: bool = False) -> Array | tuple[Array, dict[str, Array]]:
        out: dict[str, Array] = {}
        x = self.embed(images, out, train=train)
        for i, block in enumerate(self.blocks):
            x, weights = block(x, train=train, capture=capture)
            out[f"blocks.{i}"] = x
            if weights is not None:
                out[f"blocks.{i}.attn"] = weights  # (B, H, T, T)
        x = self.norm(x)  # (B, T, D)
        out["encoded"] = x
        x = x[:, 0] if self.config.pool == "cls" else x.mean(axis=1)  # (B, D)
        out["pooled"] = x
        logits = self.head(x).astype(jnp.float32)  # (B, K)
        out["logits"] = logits
        return (logits, out) if capture else logits


INTERMEDIATES = ("patches", "stem", "with_posemb", "blocks.{i}", "blocks.{i}.attn",
                 "encoded", "pooled", "logits")


def init_params(config: ViTConfig, seed: int = 0) -> dict[str, Any]:
    """Fresh float32 parameters (the Flax-side init; the torch twin uses the same laws).

    `lazy_init` runs the initializers only, not the forward pass on a dummy image that `init`
    also runs op by op (each op compiled on its own): the same values to the bit, and a first
    launch (cold caches) about 4 s sooner on the 2-core CPU."""
    images = jax.ShapeDtypeStruct((1, config.image_height, config.image_width, config.channels),
                                  jnp.float32)
    return ViT(config).lazy_init(jax.random.PRNGKey(seed), images)["params"]
