"""NumPy references for the parts both twins must compute identically.

Written in the plainest form (loops, no clever reshapes) so they can be checked by eye.
"""

from __future__ import annotations

import numpy as np


def crop(images: np.ndarray, pixels: int) -> np.ndarray:
    """(B, H, W, C) -> (B, H - 2 pixels, W - 2 pixels, C): every border less `pixels` rows/columns."""
    b, h, w, c = images.shape
    out = np.empty((b, h - 2 * pixels, w - 2 * pixels, c), images.dtype)
    for row in range(h - 2 * pixels):
        for col in range(w - 2 * pixels):
            out[:, row, col, :] = images[:, pixels + row, pixels + col, :]
    return out


def patchify(images: np.ndarray, patch_size: int, stride: int | None = None) -> np.ndarray:
    """(B, H, W, C) -> (B, N, p*p*C): patches row by row, each flattened as (p1, p2, c); one at
    every `stride` pixels down and across (patch_size when None: the patches do not overlap)."""
    b, h, w, c = images.shape
    p = patch_size
    s = stride or p
    rows, cols = (h - p) // s + 1, (w - p) // s + 1
    out = np.empty((b, rows * cols, p * p * c), images.dtype)
    n = 0
    for row in range(rows):
        for col in range(cols):
            out[:, n] = images[:, row * s:row * s + p, col * s:col * s + p, :].reshape(b, -1)
            n += 1
    return out


def sincos1d(num_tokens: int, width: int) -> np.ndarray:
    """PE[t, 2i] = sin(t / 10000^(2i/D)), PE[t, 2i+1] = cos(t / 10000^(2i/D))  (Vaswani et al.)."""
    table = np.zeros((num_tokens, width), np.float64)
    for t in range(num_tokens):
        for i in range(0, width, 2):
            angle = t / 10000.0 ** (i / width)
            table[t, i] = np.sin(angle)
            table[t, i + 1] = np.cos(angle)
    return table.astype(np.float32)


def sincos2d(rows: int, cols: int, width: int) -> np.ndarray:
    """MoCo v3's 2-D sin-cos table: per patch (y, x), [sin(x w), cos(x w), sin(y w), cos(y w)],
    w = 10000^(-k / (D/4)) for k < D/4."""
    quarter = width // 4
    omega = 1.0 / 10000.0 ** (np.arange(quarter) / quarter)
    table = np.zeros((rows * cols, width), np.float64)
    for y in range(rows):
        for x in range(cols):
            table[y * cols + x] = np.concatenate(
                [np.sin(x * omega), np.cos(x * omega), np.sin(y * omega), np.cos(y * omega)])
    return table.astype(np.float32)


def posemb(config) -> np.ndarray:
    """The fixed table in use, (T, D), with a zero row for the class token under sincos2d; all
    zeros under none."""
    if config.posemb == "none":
        return np.zeros((config.num_tokens, config.width), np.float32)
    if config.posemb == "sincos1d":
        return sincos1d(config.num_tokens, config.width)
    table = sincos2d(*config.grid, config.width)
    if config.pool == "cls":
        table = np.concatenate([np.zeros((1, config.width), np.float32), table])
    return table


def rope_angles(config) -> np.ndarray:
    """RoPE-Axial (Heo et al. 2024): patch (y, x) turns pair i of its head dims by x w_i for
    i < hd/4 and by y w_(i - hd/4) after, w_j = 100^(-j / (hd/4)); the class token by nothing."""
    rows, cols = config.grid
    quarter = config.head_dim // 4
    table = [np.zeros(2 * quarter)] if config.pool == "cls" else []
    for y in range(rows):
        for x in range(cols):
            table.append([x / 100.0 ** (j / quarter) for j in range(quarter)]
                         + [y / 100.0 ** (j / quarter) for j in range(quarter)])
    return np.asarray(table, np.float32)  # (T, hd/2)


def rope(x: np.ndarray, angles: np.ndarray) -> np.ndarray:
    """(B, T, H, hd): each pair (x_2i, x_2i+1) of token t multiplied by the rotation matrix
    [[cos a, -sin a], [sin a, cos a]], a = angles[t, i]."""
    out = np.empty_like(x)
    for t in range(x.shape[1]):
        for i in range(x.shape[3] // 2):
            a = angles[t, i]
            turn = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
            out[:, t, :, 2 * i:2 * i + 2] = x[:, t, :, 2 * i:2 * i + 2] @ turn.T
    return out
