"""Vision Transformer in PyTorch (Dosovitskiy et al. 2020), twin of jaxvit/model.py.

Images are channels-first, (B, C, H, W), as is usual in PyTorch. The two files line up
block for block: same classes, same order, same names, same intermediate keys.

  z0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos           (eq. 1)  -> ViT.embed
  z'_l = MSA(LN(z_{l-1})) + z_{l-1}                        (eq. 2)  -> Block
  z_l = MLP(LN(z'_l)) + z'_l                               (eq. 3)  -> Block
  y = LN(z_L^0)                                            (eq. 4)  -> ViT.norm, pooling
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from parity.config import ViTConfig


# ---- patchify ----------------------------------------------------------------------
def crop(images: Tensor, pixels: int) -> Tensor:
    """(B, C, H, W) -> (B, C, H - 2 pixels, W - 2 pixels): the central part (config.crop)."""
    if pixels == 0:
        return images
    return images[:, :, pixels:-pixels, pixels:-pixels]


def patchify(images: Tensor, patch_size: int, stride: int | None = None) -> Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major grid order, pixels (p1 p2 c); a
    patch every `stride` pixels (patch_size: disjoint, the paper's; less: overlapping)."""
    b, c, h, w = images.shape
    p, s = patch_size, stride or patch_size
    if s == p:
        x = images.reshape(b, c, h // p, p, w // p, p)  # (B, C, h, p1, w, p2)
    else:  # overlapping: gather each patch row's pixel rows, then each patch column's columns
        at = dict(device=images.device)
        rows = torch.arange((h - p) // s + 1, **at)[:, None] * s + torch.arange(p, **at)  # (h, p1): pixel rows
        cols = torch.arange((w - p) // s + 1, **at)[:, None] * s + torch.arange(p, **at)  # (w, p2): pixel columns
        x = images[:, :, rows][..., cols]  # (B, C, h, p1, w, p2)
    x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)
    return x.reshape(b, x.shape[1] * x.shape[2], p * p * c)  # (B, N, p1*p2*C)


def unpatchify(patches: Tensor, patch_size: int, height: int, width: int) -> Tensor:
    """Inverse of patchify: (B, N, p*p*C) -> (B, C, H, W)."""
    b, n, d = patches.shape
    p = patch_size
    c = d // (p * p)
    x = patches.reshape(b, height // p, width // p, p, p, c)  # (B, h, w, p1, p2, C)
    x = x.permute(0, 5, 1, 3, 2, 4)  # (B, C, h, p1, w, p2)
    return x.reshape(b, c, height, width)


def patchify_naive(images: Tensor, patch_size: int, stride: int | None = None) -> Tensor:
    """The same as `patchify`, one patch at a time in Python: slow on purpose, obviously right."""
    b, c, h, w = images.shape
    p, s = patch_size, stride or patch_size
    patches = []
    for row in range((h - p) // s + 1):
        for col in range((w - p) // s + 1):
            patch = images[:, :, row * s:row * s + p, col * s:col * s + p]  # (B, C, p, p)
            patches.append(patch.permute(0, 2, 3, 1).reshape(b, p * p * c))
    return torch.stack(patches, dim=1)  # (B, N, p*p*C)


def shifted_copies(images: Tensor, patch_size: int) -> Tensor:
    """Shifted Patch Tokenization's input (Lee et al. 2021): (B, C, H, W) -> (B, 5C, H, W), the
    image and its copies moved half a patch along each diagonal, zero-filled, on channels."""
    _, _, h, w = images.shape
    s = patch_size // 2
    padded = F.pad(images, (s, s, s, s))  # (B, C, H+2s, W+2s)
    # copy[y, x] = image[y - dy, x - dx]: moved up-left, up-right, down-left, down-right
    copies = [padded[:, :, s - dy:s - dy + h, s - dx:s - dx + w]
              for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]
    return torch.cat([images, *copies], dim=1)  # (B, 5C, H, W)


# ---- position encodings ------------------------------------------------------------
def sincos1d(num_tokens: int, width: int) -> Tensor:
    """The Transformer's table over the token index: [sin(t w_i), cos(t w_i)] interleaved."""
    position = torch.arange(num_tokens, dtype=torch.float32)[:, None]  # (T, 1)
    omega = 1.0 / 10000.0 ** (torch.arange(0, width, 2, dtype=torch.float32) / width)  # (D/2,)
    angle = position * omega[None, :]  # (T, D/2)
    table = torch.stack([torch.sin(angle), torch.cos(angle)], dim=-1)  # (T, D/2, 2)
    return table.reshape(num_tokens, width)  # (T, D): even dims sin, odd dims cos


def sincos2d(grid: tuple[int, int], width: int) -> Tensor:
    """MoCo v3's 2-D table (Chen et al. 2021): [sin(x w), cos(x w), sin(y w), cos(y w)] per patch,
    the D/4 frequencies w = 10000^(-k / (D/4)) (big_vision's spaces them over D/4 - 1 steps)."""
    rows, cols = grid
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                          torch.arange(cols, dtype=torch.float32), indexing="ij")  # (rows, cols)
    omega = 1.0 / 10000.0 ** (torch.arange(width // 4, dtype=torch.float32) / (width // 4))
    x = x.reshape(-1)[:, None] * omega[None, :]  # (N, D/4)
    y = y.reshape(-1)[:, None] * omega[None, :]  # (N, D/4)
    return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)  # (N, D)


def fixed_posemb(config: ViTConfig) -> Tensor:
    """The fixed table added to the tokens, (T, D); the class token's row is zero for sincos2d;
    all zeros for none (no position information, unless rope adds it in the attention)."""
    if config.posemb == "none":
        return torch.zeros(config.num_tokens, config.width)
    if config.posemb == "sincos1d":
        return sincos1d(config.num_tokens, config.width)
    table = sincos2d(config.grid, config.width)  # (N, D)
    if config.pool == "cls":
        table = torch.cat([torch.zeros(1, config.width), table], dim=0)  # (1+N, D)
    return table


def rope_angles(config: ViTConfig) -> Tensor:
    """Axial 2-D RoPE (Heo et al. 2024): the angle each pair of head dims turns by, (T, hd/2).
    The first hd/4 pairs turn by x w_i, the last hd/4 by y w_i, w_i = 100^(-i/(hd/4)), (x, y)
    the patch's column and row; the class token's row is zero: it is not turned."""
    rows, cols = config.grid
    quarter = config.head_dim // 4
    y, x = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                          torch.arange(cols, dtype=torch.float32), indexing="ij")  # (rows, cols)
    omega = 1.0 / 100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter)  # (hd/4,)
    x = x.reshape(-1)[:, None] * omega[None, :]  # (N, hd/4)
    y = y.reshape(-1)[:, None] * omega[None, :]  # (N, hd/4)
    angles = torch.cat([x, y], dim=1)  # (N, hd/2)
    if config.pool == "cls":
        angles = torch.cat([torch.zeros(1, 2 * quarter), angles], dim=0)  # (1+N, hd/2)
    return angles


def rope(x: Tensor, angles: Tensor) -> Tensor:
    """Turn each pair (x_2i, x_2i+1) of the head dims by angles[t, i], in float32: (B, H, T, hd)
    -> the same shape and dtype. Then q_s . k_t depends on the two patches' offset only."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)  # (B, H, T, hd/2, 2)
    cos, sin = angles.cos(), angles.sin()  # (T, hd/2)
    even, odd = pairs[..., 0], pairs[..., 1]  # each (B, H, T, hd/2)
    turned = torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1)
    return turned.reshape(x.shape).to(x.dtype)


# ---- blocks ------------------------------------------------------------------------
class Attention(nn.Module):
    """Multi-head self-attention with one fused qkv projection."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.qkv = nn.Linear(c.width, 3 * c.width, bias=c.qkv_bias)
        if c.lsa:  # learned per head, from the usual 1/sqrt(hd)
            self.logit_scale = nn.Parameter(torch.full((c.num_heads,), c.head_dim ** -0.5))
        if c.rope:  # a buffer, so that it moves with the model; not in the state dict
            self.register_buffer("rope_angles", rope_angles(c), persistent=False)  # (T, hd/2)
        self.proj = nn.Linear(c.width, c.width)
        self.attn_drop = nn.Dropout(c.attn_dropout)
        self.proj_drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor, *, capture: bool) -> tuple[Tensor, Tensor | None]:
        c = self.config
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, c.num_heads, c.head_dim)  # (B, T, 3, H, hd)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        if c.rope:  # relative position, in the attention logits
            angles = self.rope_angles  # (T, hd/2)
            q, k = rope(q, angles), rope(k, angles)
        scale, mask = c.head_dim ** -0.5, None
        if c.lsa:  # Locality Self-Attention: the scale goes into q; a token never sees itself
            # in float32, so that in bf16 the scale's gradient is a float32 sum
            q = (q.float() * self.logit_scale[:, None, None]).to(q.dtype)  # (B, H, T, hd)
            scale, mask = 1.0, ~torch.eye(t, dtype=torch.bool, device=x.device)  # (T, T)
        weights = None
        if capture:
            logits = (q @ k.transpose(-2, -1)) * scale  # (B, H, T, T)
            if mask is not None:
                logits = logits.masked_fill(~mask, float("-inf"))
            weights = logits.float().softmax(dim=-1)
            out = self.attn_drop(weights).to(v.dtype) @ v  # (B, H, T, hd)
        else:
            p = c.attn_dropout if self.training else 0.0
            out = F.scaled_dot_product_attention(  # (B, H, T, hd)
                q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        out = self.proj(out.transpose(1, 2).reshape(b, t, d))  # (B, T, D)
        return self.proj_drop(out), weights


class Mlp(nn.Module):
    """Two dense layers with a GELU between them."""

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = self.config = config
        self.fc1 = nn.Linear(c.width, c.mlp_dim)
        self.fc2 = nn.Linear(c.mlp_dim, c.width)
        self.drop = nn.Dropout(c.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = F.gelu(self.fc1(x), approximate="none" if self.config.gelu_exact else "tanh")
        x = self.drop(x)  # (B, T, M)
        return self.drop(self.fc2(x))  # (B, T, D)


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample, scale the kept ones."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        mask = torch.empty(x.shape[0], 1, 1, device=x.device).bernoulli_(keep)
        return torch.where(mask.bool(), x / keep, 0.0).to(x.dtype)


class Block(nn.Module):
    """Pre-LN encoder block, eq. 2-3: x + MSA(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, config: ViTConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        c = self.config = config
        self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.attn = Attention(c)
        self.norm2 = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.mlp = Mlp(c)
        self.drop_path = DropPath(drop_path_rate)

    def forward(self, x: Tensor, *, capture: bool) -> tuple[Tensor, Tensor | None]:
        y, weights = self.attn(self.norm1(x), capture=capture)
        x = x + self.drop_path(y)  # (B, T, D)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, weights


class ViT(nn.Module):
    """The whole model: patchify, embed, L blocks, final norm, pool, head.

    `model(images)` gives logits (B, K); with `capture=True` it gives `(logits, out)`,
    `out` a dict of named intermediates (keys listed in `INTERMEDIATES`).
    Training mode (dropout, stochastic depth) follows `model.train()` / `model.eval()`.
    """

    def __init__(self, config: ViTConfig) -> None:
        super().__init__()
        c = self.config = config
        if c.spt:  # LayerNorm over each token's 5 stacked patches, before the projection
            self.patch_norm = nn.LayerNorm(c.stem_dim, eps=c.ln_eps)
        self.patch_embed = nn.Linear(c.stem_dim, c.width)
        if c.pool == "cls":
            self.cls_token = nn.Parameter(torch.zeros(1, 1, c.width))
        if c.posemb == "learned":
            self.pos_embed = nn.Parameter(torch.randn(1, c.num_tokens, c.width) * 0.02)
        else:
            self.register_buffer("fixed_pos_embed", fixed_posemb(c)[None], persistent=False)
        self.pos_drop = nn.Dropout(c.dropout)
        rates = [c.drop_path * i / max(c.depth - 1, 1) for i in range(c.depth)]
        self.blocks = nn.ModuleList([Block(c, drop_path_rate=r) for r in rates])
        self.norm = nn.LayerNorm(c.width, eps=c.ln_eps)
        self.head = nn.Linear(c.width, c.num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The same laws as the Flax init: xavier-uniform kernels, zero head, tiny MLP biases."""
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    if name.endswith(("fc1", "fc2")):
                        nn.init.normal_(module.bias, std=1e-6)
                    else:
                        nn.init.zeros_(module.bias)
        nn.init.zeros_(self.head.weight)

    def posemb_table(self) -> Tensor:
        """E_pos, (1, T, D)."""
        if self.config.posemb == "learned":
            return self.pos_embed
        return self.fixed_pos_embed

    def embed(self, images: Tensor, out: dict[str, Tensor]) -> Tensor:
        """Eq. 1: (B, C, H, W) -> z0 (B, T, D)."""
        c = self.config
        images = crop(images, c.crop)  # (B, C, H - 2 crop, W - 2 crop)
        if c.spt:  # (B, N, p*p*5C), each token normalized
            patches = self.patch_norm(patchify(shifted_copies(images, c.patch_size), c.patch_size,
                                               c.stride))
        else:
            patches = patchify(images, c.patch_size, c.stride)  # (B, N, p*p*C)
        # The residual stream stays float32 whatever the compute dtype (autocast included):
        # a bf16 stream loses the small block updates and trains measurably worse.
        x = self.patch_embed(patches).float()  # (B, N, D)
        out["patches"], out["stem"] = patches, x
        if c.pool == "cls":
            cls = self.cls_token.expand(x.shape[0], 1, c.width)
            x = torch.cat([cls, x], dim=1)  # (B, 1+N, D)
        x = x + self.posemb_table()  # (B, T, D)
        out["with_posemb"] = x
        return self.pos_drop(x)

    def forward(self, images: Tensor, *,
                capture: bool = False) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
        out: dict[str, Tensor] = {}
        x = self.embed(images, out)
        for i, block in enumerate(self.blocks):
            x, weights = block(x, capture=capture)
            out[f"blocks.{i}"] = x
            if weights is not None:
                out[f"blocks.{i}.attn"] = weights  # (B, H, T, T)
        x = self.norm(x)  # (B, T, D)
        out["encoded"] = x
        x = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)  # (B, D)
        out["pooled"] = x
        logits = self.head(x).float()  # (B, K)
        out["logits"] = logits
        return (logits, out) if capture else logits


INTERMEDIATES = ("patches", "stem", "with_posemb", "blocks.{i}", "blocks.{i}.attn",
                 "encoded", "pooled", "logits")
