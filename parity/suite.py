"""The parity suite: load the same canonical weights into both twins and compare every stage.

Each `check_*` returns `Row`s (stage, config, max diff, tolerance, pass); pytest asserts
them, and `python -m parity` prints them as a table.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator

import numpy as np

from parity import reference
from parity import weights as W
from parity.config import ViTConfig, preset

# The config matrix: patch 2, 4 and 7; cls and gap; all four position tables (none included);
# widths that are not multiples of 64; square and non-square images, whole and cropped; LSA and
# SPT; rotary position embedding (with and without a class token, with and without a table);
# disjoint and overlapping patches.
CONFIGS: dict[str, ViTConfig] = {
    "p4-cls-learned-28x28-w48": preset("tiny", patch_size=4, width=48, num_heads=3),
    "p2-gap-sincos2d-12x16-w36": preset("tiny", patch_size=2, width=36, num_heads=3,
                                        image_height=12, image_width=16, pool="gap",
                                        posemb="sincos2d"),
    "p7-cls-sincos1d-28x28-w40": preset("tiny", patch_size=7, width=40, num_heads=4,
                                        posemb="sincos1d", gelu_exact=False),
    "p4-gap-learned-20x28c3crop2-w40": preset("tiny", patch_size=4, width=40, num_heads=2,
                                              image_height=20, image_width=28, channels=3, crop=2,
                                              pool="gap", qkv_bias=False),
    # a LayerNorm epsilon far from both frameworks' defaults (1e-5, 1e-6): a norm that ignores
    # the config's shows here at 60-100x the tolerance, not 2-4x (python -m parity.mutants)
    "p7-gap-sincos1d-21x28-w52-eps1e-3": preset("tiny", patch_size=7, width=52, num_heads=4,
                                                image_height=21, image_width=28, pool="gap",
                                                posemb="sincos1d", ln_eps=1e-3),
    "p2-cls-sincos2d-14x14-w44": preset("tiny", patch_size=2, width=44, num_heads=4,
                                        image_height=14, image_width=14, posemb="sincos2d",
                                        depth=3),
    # Lee et al. 2021's two changes for small data: Locality Self-Attention, shifted patches
    "p4-cls-lsa-spt-20x28c3-w48": preset("tiny", patch_size=4, width=48, num_heads=3,
                                         image_height=20, image_width=28, channels=3,
                                         lsa=True, spt=True),
    # Heo et al. 2024's axial rotary embedding, on top of the additive table; a non-square grid
    "p4-cls-rope-learned-20x28-w48": preset("tiny", patch_size=4, width=48, num_heads=3,
                                            image_height=20, image_width=28, rope=True),
    "p2-gap-rope-sincos2d-12x16-w32": preset("tiny", patch_size=2, width=32, num_heads=2,
                                             image_height=12, image_width=16, pool="gap",
                                             posemb="sincos2d", rope=True),
    # ... as the only position information (no table)
    "p7-cls-rope-none-21x28-w40": preset("tiny", patch_size=7, width=40, num_heads=2,
                                         image_height=21, image_width=28, posemb="none", rope=True),
    # overlapping patches (6x6 every 4 pixels: a 5x4 grid), with the two grid-shaped position
    # encodings and the shifted copies, all of which must follow the strided grid
    "p6s4-gap-rope-sincos2d-spt-22x18-w32": preset("tiny", patch_size=6, patch_stride=4, width=32,
                                                   num_heads=2, image_height=22, image_width=18,
                                                   pool="gap", posemb="sincos2d", rope=True,
                                                   spt=True),
}
BATCHES = (1, 17)

TOL_FORWARD = 1e-5  # every block, attention weights, logits: max abs diff
TOL_POSEMB = 1e-6
TOL_GRAD = 1e-4  # relative to the tensor's largest gradient
TOL_ADAMW = 1e-5


@dataclasses.dataclass(frozen=True)
class Row:
    stage: str
    config: str
    diff: float
    tol: float
    note: str = ""

    @property
    def ok(self) -> bool:
        return bool(self.diff <= self.tol)


def _max_abs(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.max(np.abs(a - b))) if a.size else 0.0


def _images(config: ViTConfig, batch: int, seed: int = 0) -> np.ndarray:
    """(B, H, W, C) float32 in [0, 1)."""
    rng = np.random.default_rng(seed)
    shape = (batch, config.image_height, config.image_width, config.channels)
    return rng.random(shape, dtype=np.float32)


def _labels(config: ViTConfig, batch: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, config.num_classes, batch)


def check_patchify(config: ViTConfig, name: str, batch: int) -> list[Row]:
    """The crop, then patchify: naive == vectorized in each framework; jax == torch == NumPy
    reference: exactly."""
    import jax.numpy as jnp
    import torch

    from jaxvit import model as jm
    from torchvit import model as tm

    whole = _images(config, batch)
    x = reference.crop(whole, config.crop)  # (B, *config.seen, C)
    j_crop = np.asarray(jm.crop(jnp.asarray(whole), config.crop))
    t_crop = tm.crop(torch.from_numpy(whole).permute(0, 3, 1, 2), config.crop).permute(0, 2, 3, 1).numpy()
    p, s = config.patch_size, config.stride
    ref = reference.patchify(x, p, s)
    j_fast = np.asarray(jm.patchify(jnp.asarray(x), p, s))
    j_naive = np.asarray(jm.patchify_naive(jnp.asarray(x), p, s))
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, C, H, W)
    t_fast = tm.patchify(xt, p, s).numpy()
    t_naive = tm.patchify_naive(xt, p, s).numpy()
    tag = f"{name} b{batch}"
    rows = [
        Row("crop jax==numpy", tag, _max_abs(j_crop, x), 0.0),
        Row("crop torch==numpy", tag, _max_abs(t_crop, x), 0.0),
        Row("patchify jax naive==vectorized", tag, _max_abs(j_naive, j_fast), 0.0),
        Row("patchify torch naive==vectorized", tag, _max_abs(t_naive, t_fast), 0.0),
        Row("patchify jax==numpy", tag, _max_abs(j_fast, ref), 0.0),
        Row("patchify torch==numpy", tag, _max_abs(t_fast, ref), 0.0),
    ]
    if s == p:  # disjoint patches hold every pixel once: patchify has an inverse
        j_back = np.asarray(jm.unpatchify(jnp.asarray(ref), p, *config.seen))
        t_back = tm.unpatchify(torch.from_numpy(ref), p, *config.seen)
        rows += [Row("unpatchify jax inverse", tag, _max_abs(j_back, x), 0.0),
                 Row("unpatchify torch inverse", tag, _max_abs(t_back.permute(0, 2, 3, 1).numpy(), x),
                     0.0)]
    return rows


def check_posemb(config: ViTConfig, name: str) -> list[Row]:
    """The fixed tables of both frameworks against the NumPy reference."""
    from jaxvit import model as jm
    from torchvit import model as tm

    if config.posemb == "learned":
        return []
    ref = reference.posemb(config)
    return [
        Row(f"posemb {config.posemb} jax==numpy", name, _max_abs(jm.fixed_posemb(config), ref),
            TOL_POSEMB),
        Row(f"posemb {config.posemb} torch==numpy", name,
            _max_abs(tm.fixed_posemb(config).numpy(), ref), TOL_POSEMB),
    ]


def check_rope(config: ViTConfig, name: str) -> list[Row]:
    """RoPE's angle tables and the turn of q and k (on random (B, T, H, hd) input) in both
    frameworks against the NumPy reference."""
    import jax.numpy as jnp
    import torch

    from jaxvit import model as jm
    from torchvit import model as tm

    if not config.rope:
        return []
    ref = reference.rope_angles(config)
    shape = (3, config.num_tokens, config.num_heads, config.head_dim)
    x = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
    turned = reference.rope(x, ref)
    t_turned = tm.rope(torch.from_numpy(x).transpose(1, 2), tm.rope_angles(config)).transpose(1, 2)
    return [
        Row("rope angles jax==numpy", name, _max_abs(jm.rope_angles(config), ref), TOL_POSEMB),
        Row("rope angles torch==numpy", name, _max_abs(tm.rope_angles(config).numpy(), ref),
            TOL_POSEMB),
        Row("rope turn jax==numpy", name, _max_abs(jm.rope(jnp.asarray(x), jm.rope_angles(config)),
                                                   turned), TOL_FORWARD),
        Row("rope turn torch==numpy", name, _max_abs(t_turned.numpy(), turned), TOL_FORWARD),
    ]


class Twins:
    """Both models holding the same canonical weights, run on the same batch.

    The Flax side is one jitted function (forward with intermediates, gradients of the
    loss, one AdamW step), so each config and batch compiles once.
    """

    def __init__(self, config: ViTConfig, seed: int = 0) -> None:
        from torchvit.model import ViT as TorchViT

        self.config = config
        self.canonical = W.random_canonical(config, seed)
        self.torch_model = TorchViT(config).eval()
        self.torch_model.load_state_dict(W.canonical_to_torch(self.canonical, config))

    def run_flax(self, x: np.ndarray, y: np.ndarray, adamw: dict) -> tuple[dict, dict, dict]:
        """-> (intermediates, canonical gradients, canonical weights after one AdamW step)."""
        import jax
        import jax.numpy as jnp
        import optax

        from jaxvit.model import ViT as FlaxViT

        model = FlaxViT(self.config)
        params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(self.canonical, self.config))
        tx = optax.adamw(adamw["lr"], b1=0.9, b2=0.999, eps=adamw["eps"],
                         weight_decay=adamw["wd"], mask=W.flax_decay_mask)

        @jax.jit
        def everything(params, x, y):
            _, out = model.apply({"params": params}, x, capture=True)

            def loss_fn(params):
                logits = model.apply({"params": params}, x)
                return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

            grads = jax.grad(loss_fn)(params)
            updates, _ = tx.update(grads, tx.init(params), params)
            return out, grads, optax.apply_updates(params, updates)

        out, grads, new = everything(params, jnp.asarray(x), jnp.asarray(y))
        return ({k: np.asarray(v) for k, v in out.items()}, W.flax_to_canonical(grads),
                W.flax_to_canonical(new))

    def run_torch(self, x: np.ndarray, y: np.ndarray, adamw: dict,
                  step_grads: dict[str, np.ndarray]) -> tuple[dict, dict, dict]:
        """-> (intermediates, canonical gradients, canonical weights after one AdamW step
        taken with `step_grads`)."""
        import torch
        import torch.nn.functional as F

        model = self.torch_model
        model.load_state_dict(W.canonical_to_torch(self.canonical, self.config))
        images = torch.from_numpy(x).permute(0, 3, 1, 2)  # (B, C, H, W)
        with torch.no_grad():
            _, out = model(images, capture=True)
        named = list(model.named_parameters())
        opt = torch.optim.AdamW(W.torch_param_groups(model, adamw["wd"]),
                                lr=adamw["lr"], betas=(0.9, 0.999), eps=adamw["eps"])
        opt.zero_grad()
        F.cross_entropy(model(images), torch.from_numpy(y)).backward()
        grads = W.torch_to_canonical({n: p.grad for n, p in named})
        given = W.canonical_to_torch(step_grads, self.config)
        for n, p in named:
            p.grad = given[n]
        opt.step()
        return ({k: v.numpy() for k, v in out.items()}, grads,
                W.torch_to_canonical(model.state_dict()))


# The AdamW row feeds both optimizers the same gradients (the Flax ones; the gradient row
# above proves the two agree). Adam's first step is lr * g / (|g| + eps), so where a gradient
# is zero in exact arithmetic (the key bias of attention: softmax ignores it) each framework's
# ~1e-9 rounding noise would be blown up to a full +-lr step and hide what this row measures.
ADAMW = dict(lr=1e-3, wd=0.05, eps=1e-8)


def _grad_rel(grads: dict, ref: dict) -> tuple[float, str]:
    """The worst tensor's max abs diff relative to the reference gradient's largest magnitude."""
    rel = {n: _max_abs(grads[n], ref[n]) / max(float(np.max(np.abs(ref[n]))), 1e-12) for n in ref}
    worst = max(rel, key=rel.get)
    return rel[worst], worst


def check_model(config: ViTConfig, name: str, batch: int) -> list[Row]:
    """Every intermediate, the logits, the gradients and one AdamW step."""
    twins = Twins(config)
    x, y = _images(config, batch), _labels(config, batch)
    tag = f"{name} b{batch}"
    rows = []
    j_out, j_grads, j_new = twins.run_flax(x, y, ADAMW)
    t_out, t_grads, t_new = twins.run_torch(x, y, ADAMW, step_grads=j_grads)
    missing = sorted(set(j_out) ^ set(t_out))
    rows.append(Row("intermediate keys identical", tag, float(len(missing)), 0.0,
                    ", ".join(missing)))
    for key in j_out:
        if key in t_out and key not in ("logits", "patches"):
            rows.append(Row(f"forward {key}", tag, _max_abs(j_out[key], t_out[key]), TOL_FORWARD))
    rows.append(Row("logits", tag, _max_abs(j_out["logits"], t_out["logits"]), TOL_FORWARD))
    mismatched = int(np.sum(j_out["logits"].argmax(-1) != t_out["logits"].argmax(-1)))
    rows.append(Row("logits argmax mismatches", tag, float(mismatched), 0.0))

    worst, worst_name = _grad_rel(j_grads, t_grads)
    rows.append(Row("grads (worst tensor, relative)", tag, worst, TOL_GRAD, worst_name))

    diff = max(_max_abs(j_new[n], t_new[n]) for n in W.canonical_shapes(config))
    moved = max(_max_abs(j_new[n], twins.canonical[n]) for n in W.canonical_shapes(config))
    rows.append(Row("adamw step weights (same grads)", tag, diff, TOL_ADAMW, f"step moved weights by {moved:.2g}"))
    return rows


# bf16: each twin's own mixed precision (Flax: the model's dtype=bfloat16; PyTorch: autocast),
# on the CPU, against the other twin and against float32. The differences are bf16 rounding
# (8 bits of mantissa: ~0.4% per rounding), so the tolerances are relative and loose; what they
# catch is a twin that rounds where the other does not, e.g. a bias gradient summed in bf16
# (up to 3% off float32 at this batch before jaxvit's Dense summed it in float32; 1% or less now).
BF16_BATCH = 256
TOL_BF16_LOGITS = 0.03  # max abs diff / the float32 logits' largest magnitude
TOL_BF16_GRAD = 0.015  # worst tensor, max abs diff / its float32 gradient's largest magnitude


def check_bf16(config: ViTConfig, name: str, batch: int = BF16_BATCH) -> list[Row]:
    """Logits and gradients of both twins in bf16 against each other and against float32."""
    import jax
    import jax.numpy as jnp
    import optax
    import torch
    import torch.nn.functional as F

    from jaxvit.model import ViT as FlaxViT
    from torchvit.model import ViT as TorchViT

    canonical = W.random_canonical(config, 0)
    x, y = _images(config, batch), _labels(config, batch)
    params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(canonical, config))

    def flax(dtype) -> tuple[np.ndarray, dict]:
        model = FlaxViT(config, dtype=dtype)

        def loss_fn(params):
            logits = model.apply({"params": params}, jnp.asarray(x))
            return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(y)).mean(), logits

        grads, logits = jax.jit(jax.grad(loss_fn, has_aux=True))(params)
        return np.asarray(logits), W.flax_to_canonical(grads)

    def torch_(bf16: bool) -> tuple[np.ndarray, dict]:
        model = TorchViT(config).eval()
        model.load_state_dict(W.canonical_to_torch(canonical, config))
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits = model(torch.from_numpy(x).permute(0, 3, 1, 2))
            F.cross_entropy(logits, torch.from_numpy(y)).backward()
        return logits.detach().float().numpy(), W.torch_to_canonical(
            {n: p.grad for n, p in model.named_parameters()})

    (_, jg32), (j16, jg16) = flax(jnp.float32), flax(jnp.bfloat16)
    (t32, tg32), (t16, tg16) = torch_(False), torch_(True)
    tag, scale = f"{name} b{batch}", max(float(np.max(np.abs(t32))), 1e-12)
    rows = [Row("bf16 logits, Flax vs PyTorch (relative)", tag, _max_abs(j16, t16) / scale, TOL_BF16_LOGITS)]
    for stage, grads, ref in (("bf16 grads, Flax vs PyTorch", jg16, tg16),
                              ("bf16 grads, Flax vs its float32", jg16, jg32),
                              ("bf16 grads, PyTorch vs its float32", tg16, tg32)):
        rel, worst = _grad_rel(grads, ref)
        rows.append(Row(f"{stage} (worst tensor, relative)", tag, rel, TOL_BF16_GRAD, worst))
    return rows


def check_round_trips(config: ViTConfig, name: str) -> list[Row]:
    """canonical -> flax -> canonical and canonical -> torch -> canonical, bitwise."""
    canonical = W.random_canonical(config, 3)
    via_flax = W.flax_to_canonical(W.canonical_to_flax(canonical, config))
    via_torch = W.torch_to_canonical(W.canonical_to_torch(canonical, config))
    bad = sum(not np.array_equal(canonical[n], via_flax[n]) or
              not np.array_equal(canonical[n], via_torch[n]) for n in canonical)
    bad += len(set(canonical) ^ set(via_flax)) + len(set(canonical) ^ set(via_torch))
    return [Row("round trips bitwise (tensors differing)", name, float(bad), 0.0)]


def all_rows(names: Iterable[str] | None = None) -> Iterator[Row]:
    for name in names or CONFIGS:
        config = CONFIGS[name]
        yield from check_round_trips(config, name)
        yield from check_posemb(config, name)
        yield from check_rope(config, name)
        for batch in BATCHES:
            yield from check_patchify(config, name, batch)
            yield from check_model(config, name, batch)
        yield from check_bf16(config, name)
