"""The PyTorch training step (twin of jaxvit/train.py).

The training state is the model, the optimizer and an optional EMA of the weights.
Augmentation, dropout and the loss all run on the device, and the randomness of step s is
seeded from (seed, s) alone, so a resumed run draws the same numbers as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor

from parity import weights as W
from torchvit.model import ViT
from train.common import annealed_steps, augmented_steps, augments, lr_at, mixes, schedule_steps, warp_strength

MEAN, STD = 0.1307, 0.3081  # MNIST pixel statistics, on [0, 1] images
TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))  # (dy, dx) in pixels


def make_optimizer(model: ViT, recipe) -> torch.optim.AdamW:
    """AdamW; decay only on kernels (2-D weights). The learning rate is set every step."""
    return torch.optim.AdamW(W.torch_param_groups(model, recipe.weight_decay),
                             lr=0.0, betas=(0.9, 0.999), eps=1e-8)


def ema_decay_at(decay: float, step: int) -> float:
    """The EMA's decay at a step, warmed up: min(decay, (1 + t) / (10 + t)). Early on the average
    follows the live weights, instead of dragging the random init along for ~1/(1 - decay) steps
    (0.999 at batch 512 is 13 epochs of MNIST)."""
    return min(decay, (1.0 + step) / (10.0 + step))


def sharpness_aware(loss: Callable[[], Tensor], params: list[Tensor], rho: float) -> None:
    """Sharpness-aware minimization (Foret et al. 2021): each p.grad becomes the gradient of
    loss() taken at the weights moved a distance rho along the normalized gradient, the steepest
    way up nearby; the weights are put back, for the optimizer to apply it to them."""
    grads = [p.grad for p in params]
    scale = rho / (torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
                   + 1e-12)
    here = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p.add_(g * scale)
            p.grad = None
    loss().backward()
    with torch.no_grad():
        for p, h in zip(params, here, strict=True):
            p.copy_(h)


def to_unit(images: Tensor) -> Tensor:
    """uint8 (B, H, W) -> float32 (B, 1, H, W) in [0, 1]."""
    return images.float()[:, None] / 255.0


def normalize(x: Tensor) -> Tensor:
    """[0, 1] images -> standardized model input."""
    return (x - MEAN) / STD


def augment(images: Tensor, recipe, rows: slice | None = None, global_batch: int | None = None,
            strength: float | None = None) -> Tensor:
    """Random affine per image (rotation, zoom, shear, shift, each uniform about the identity),
    plus an elastic distortion and a random erasing where the recipe asks for them. A strength
    (--aug-anneal's share of full) scales the warps' bounds and the elastic size.

    Under data parallelism each process draws the parameters of the whole global batch and
    keeps its own `rows`, so every image gets the warp it would get in a single process.
    """
    n = global_batch or images.shape[0]
    rows = rows or slice(0, n)
    h, w = images.shape[-2:]

    def uniform(*shape, bound):
        return ((torch.rand((n, *shape), device=images.device) * 2 - 1) * bound)[rows]

    def full(name):  # the recipe's bound, weakened by the strength when annealing
        return getattr(recipe, name) if strength is None else getattr(recipe, name) * strength

    angle, zoom = uniform(bound=full("rotate")), 1 + uniform(bound=full("scale"))
    shear, shift = uniform(bound=full("shear")), uniform(2, bound=full("translate"))
    flow = None
    if recipe.elastic > 0:  # drawn after the affine numbers, so that those stay older runs'
        flow = elastic_flow(uniform(2, h, w, bound=1.0), full("elastic"), recipe.elastic_sigma)
    out = warp(images, angle=angle, zoom=zoom, shear=shear, shift=shift, flow=flow)
    if recipe.erase > 0:
        u = torch.rand((n, 5), device=images.device)[rows]
        out = erase(out, erase_boxes(u, recipe.erase, h, w))
    return out


def elastic_flow(noise: Tensor, alpha: float, sigma: float) -> Tensor:
    """Noise (B, 2, H, W) uniform in [-1, 1] -> displacement field (B, H, W, 2), (row, col) in
    pixels: each component smoothed by a Gaussian of width sigma (zero past the borders, as a
    separable product G_H @ noise @ G_W^T) and scaled by alpha (Simard et al. 2003)."""
    h, w = noise.shape[-2:]

    def gaussian(n):  # (n, n), rows are the normalized Gaussian about each pixel
        d = torch.arange(n, dtype=torch.float32, device=noise.device)
        return torch.exp(-((d[:, None] - d[None, :]) ** 2) / (2 * sigma**2)) / (sigma * math.sqrt(2 * math.pi))

    smooth = torch.einsum("ij,bcjk,lk->bcil", gaussian(h), noise, gaussian(w))
    return alpha * torch.movedim(smooth, 1, -1)


def erase_boxes(u: Tensor, p: float, h: int, w: int) -> Tensor:
    """(B, 5) numbers uniform in [0, 1) -> (B, 4) boxes (top, left, height, width) in pixels:
    with probability p a rectangle of 2-20% of the image, aspect (height / width) log-uniform
    in [0.3, 3.3], anywhere inside it; otherwise an empty box (height 0)."""
    area = (0.02 + 0.18 * u[:, 1]) * h * w
    aspect = torch.exp(math.log(0.3) + math.log(3.3 / 0.3) * u[:, 2])
    height = torch.clamp(torch.sqrt(area * aspect), max=h)
    width = torch.clamp(torch.sqrt(area / aspect), max=w)
    top, left = u[:, 3] * (h - height), u[:, 4] * (w - width)
    return torch.stack([top, left, torch.where(u[:, 0] < p, height, 0.0), width], -1)


def box_mask(boxes: Tensor, h: int, w: int) -> Tensor:
    """(B, 4) boxes (top, left, height, width) -> (B, 1, H, W) bool: pixel (i, j) is in its
    image's box where top <= i < top + height and left <= j < left + width."""
    top, left, height, width = (boxes[:, k, None] for k in range(4))  # (B, 1) each
    rows = torch.arange(h, dtype=torch.float32, device=boxes.device)
    cols = torch.arange(w, dtype=torch.float32, device=boxes.device)
    in_rows = (rows >= top) & (rows < top + height)  # (B, H)
    in_cols = (cols >= left) & (cols < left + width)  # (B, W)
    return in_rows[:, None, :, None] & in_cols[:, None, None, :]


def erase(images: Tensor, boxes: Tensor) -> Tensor:
    """Black out each image's box in (B, 1, H, W) images."""
    return images * ~box_mask(boxes, *images.shape[-2:])


def partner(a: Tensor) -> Tensor:
    """Each row's partner in the batch: rows (0, 1), (2, 3), ... swapped. The batch arrives in
    random order, so this is a random pairing; it never crosses an even split of the batch."""
    return a.reshape(a.shape[0] // 2, 2, *a.shape[1:]).flip(1).reshape(a.shape)


def mix_params(lam_mixup: Tensor, lam_cutmix: Tensor, u: Tensor, recipe, h: int,
               w: int) -> tuple[Tensor, Tensor]:
    """How each image is mixed with its partner, from (B,) Beta draws of each kind and (B, 3)
    numbers uniform in [0, 1) -> (blend (B,), boxes (B, 4)). A mixup image keeps `blend` of its
    own pixels and no box. A CutMix image (blend 1) gets a box of 1 - lam of its area, sides
    sqrt(1 - lam) H and W, centred anywhere in the image and clipped to it (Yun et al. 2019).
    With both asked for, u[:, 0] < 0.5 picks CutMix."""
    b = u.shape[0]
    if recipe.cutmix > 0 and recipe.mixup > 0:
        cut = u[:, 0] < 0.5
    else:
        cut = torch.full((b,), recipe.cutmix > 0, device=u.device)
    side = torch.sqrt(1 - lam_cutmix)
    cy, cx = u[:, 1] * h, u[:, 2] * w
    top, bottom = torch.clamp(cy - side * h / 2, 0, h), torch.clamp(cy + side * h / 2, 0, h)
    left, right = torch.clamp(cx - side * w / 2, 0, w), torch.clamp(cx + side * w / 2, 0, w)
    boxes = torch.stack([top, left, torch.where(cut, bottom - top, 0.0), right - left], -1)
    return torch.where(cut, 1.0, lam_mixup), boxes


def mix(images: Tensor, targets: Tensor, blend: Tensor, boxes: Tensor) -> tuple[Tensor, Tensor]:
    """Mix each (B, 1, H, W) image with its partner: inside its box the partner's pixels,
    elsewhere blend * its own + (1 - blend) * the partner's; its (B, K) target becomes the
    same mixture of the two targets, weighted by the share of its own pixels."""
    other = partner(images)
    inside = box_mask(boxes, *images.shape[-2:])
    b = blend[:, None, None, None]
    out = torch.where(inside, other, b * images + (1 - b) * other)
    own = (blend * (1 - inside.float().mean((1, 2, 3))))[:, None]  # (B, 1)
    return out, own * targets + (1 - own) * partner(targets)


def draw_mix(recipe, n: int, h: int, w: int, rows: slice, device) -> tuple[Tensor, Tensor]:
    """The random (blend, boxes) of mix() for this process's rows of a global batch of n."""

    def beta(a):
        if a == 0:
            return torch.ones(n, device=device)
        a = torch.tensor(a, device=device)
        return torch.distributions.Beta(a, a).sample((n,))

    lam_mixup, lam_cutmix = beta(recipe.mixup), beta(recipe.cutmix)
    u = torch.rand((n, 3), device=device)
    return mix_params(lam_mixup[rows], lam_cutmix[rows], u[rows], recipe, h, w)


EDGE = 1e-4  # pixels: how far outside the edge pixels' centres a sample still counts as inside


def warp(images: Tensor, angle: Tensor, zoom: Tensor, shear: Tensor, shift: Tensor,
         flow: Tensor | None = None) -> Tensor:
    """Affine warp per image, bilinear, black outside; angles in degrees, shift (row, col) pixels.

    images: (B, 1, H, W) in [0, 1]. grid_sample pulls each output pixel o from the input
    position theta @ o (+ flow[o], a (B, H, W, 2) displacement in pixels, if given), so theta
    is the inverse map; every parameter is drawn from a distribution symmetric about the
    identity, so drawing the inverse is drawing the map.
    """
    b, _, h, w = images.shape
    deg = math.pi / 180.0
    cos, sin, tan = (angle * deg).cos(), (angle * deg).sin(), (shear * deg).tan()
    # (B, 2, 2) in (row, col) pixel coordinates about the centre: rotation @ shear / zoom
    linear = torch.stack([torch.stack([cos, -sin + cos * tan], -1),
                          torch.stack([sin, cos + sin * tan], -1)], -2) / zoom[:, None, None]
    # affine_grid works in normalized (x, y) = (col, row) coordinates, x = (2 col + 1) / W - 1
    theta = torch.zeros(b, 2, 3, device=images.device)
    theta[:, 0, 0], theta[:, 0, 1] = linear[:, 1, 1], linear[:, 1, 0] * h / w
    theta[:, 1, 0], theta[:, 1, 1] = linear[:, 0, 1] * w / h, linear[:, 0, 0]
    theta[:, 0, 2], theta[:, 1, 2] = shift[:, 1] * 2 / w, shift[:, 0] * 2 / h
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)  # (B, H, W, 2)
    if flow is not None:  # pixels (row, col) -> normalized (x, y)
        grid = grid + torch.stack([flow[..., 1] * 2 / w, flow[..., 0] * 2 / h], -1)
    out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    # As in the Flax twin, a sample point outside the pixel centres is black, not blended. The
    # round trip through normalized coordinates puts even the identity's edge pixels up to ~1e-6
    # px outside, which the Flax twin (in pixels throughout) does not: EDGE forgives that.
    col = ((grid[..., 0] + 1) * w - 1) / 2  # (B, H, W) source column of each output pixel
    row = ((grid[..., 1] + 1) * h - 1) / 2
    inside = (col >= -EDGE) & (col <= w - 1 + EDGE) & (row >= -EDGE) & (row <= h - 1 + EDGE)
    return out * inside[:, None].to(out.dtype)


def shift_images(images: Tensor, dy: int, dx: int) -> Tensor:
    """Integer shift of (B, C, H, W) with zeros filling in: exact, no interpolation."""
    h, w = images.shape[-2:]
    padded = F.pad(images, (abs(dx), abs(dx), abs(dy), abs(dy)))
    return padded[..., abs(dy) - dy: abs(dy) - dy + h, abs(dx) - dx: abs(dx) - dx + w]


def step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step) % (2**63 - 1)


class Trainer:
    """model + optimizer + EMA, and the one training step."""

    def __init__(self, model: ViT, recipe, steps_per_epoch: int, seed: int,
                 dtype: torch.dtype = torch.float32, compile: bool = False,
                 rank: int = 0, world: int = 1, teacher: ViT | None = None) -> None:
        """With world > 1 (under torchrun, the process group initialized), the model is wrapped
        in DistributedDataParallel and each process trains on its slice of every global batch.

        With a teacher and recipe.distill > 0, each target is (1 - distill) x the label +
        distill x the teacher's probabilities for the same image, as augmented and mixed, before
        label smoothing (knowledge distillation, Hinton et al. 2015); with recipe.distill_hard,
        the teacher's top class, one-hot, in place of its probabilities (DeiT's hard
        distillation, Touvron et al. 2021)."""
        self.model, self.recipe, self.seed = model, recipe, seed
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        self.rank, self.world = rank, world
        self.optimizer = make_optimizer(model, recipe)
        self.warmup, self.total = schedule_steps(recipe, steps_per_epoch)
        self.ema = ({n: p.detach().clone() for n, p in model.named_parameters()}
                    if recipe.ema_decay > 0 else None)
        self.augmenting, self.mixing = augments(recipe), mixes(recipe)
        self.aug_steps = augmented_steps(recipe, steps_per_epoch)
        self.anneal_steps = annealed_steps(recipe, steps_per_epoch)
        self.dtype = dtype
        wrapped = model
        if world > 1:
            from torch.nn.parallel import DistributedDataParallel

            wrapped = DistributedDataParallel(model)
        self.forward = torch.compile(wrapped) if compile else wrapped
        self.totals = None

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(device_type=next(self.model.parameters()).device.type, dtype=self.dtype)

    def train_step(self, images: Tensor, labels: Tensor, idx: Tensor, step: int) -> None:
        """One AdamW step on the global batch images[idx]; adds this process's
        (loss sum, correct, count) to self.totals."""
        recipe = self.recipe
        torch.manual_seed(step_seed(self.seed, step))
        self.model.train()
        b = idx.shape[0] // self.world
        rows = slice(self.rank * b, (self.rank + 1) * b)  # this process's share of the batch
        x = to_unit(images[idx[rows]])  # (b, 1, H, W) in [0, 1]
        y = labels[idx[rows]].long()  # (b,)
        targets = y  # class indices; (b, K) probabilities once mixed
        if self.augmenting and step < self.aug_steps:  # the last --clean-epochs epochs: as they are
            strength = None if self.anneal_steps == 0 else warp_strength(step, self.aug_steps, self.anneal_steps)
            x = augment(x, recipe, rows, idx.shape[0], strength)
            if self.mixing:  # pairs of images and their targets, after the warps
                one_hot = F.one_hot(y, self.model.config.num_classes).float()
                x, targets = mix(x, one_hot, *draw_mix(recipe, idx.shape[0], *x.shape[-2:], rows, x.device))
        x = normalize(x)
        if self.teacher is not None:  # what the teacher makes of the same image, in eval mode
            classes = self.model.config.num_classes
            with torch.no_grad():
                said = self.teacher(x).float()  # (b, K) logits
            taught = (F.one_hot(said.argmax(-1), classes).float() if recipe.distill_hard
                      else said.softmax(-1))
            if targets.ndim == 1:
                targets = F.one_hot(y, classes).float()
            targets = (1 - recipe.distill) * targets + recipe.distill * taught

        def loss_fn() -> tuple[Tensor, Tensor]:
            with self.autocast():
                logits = self.forward(x)
            return F.cross_entropy(logits.float(), targets, label_smoothing=recipe.label_smoothing), logits

        # under --sam the random generators are put back after this pass, so that the second
        # one draws the same dropout and stochastic depth
        with torch.random.fork_rng(devices=[x.device] if x.is_cuda else [], enabled=recipe.sam > 0):
            loss, logits = loss_fn()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.sam > 0:  # the same batch, dropout and stochastic depth, at the moved weights
            sharpness_aware(lambda: loss_fn()[0],
                            [p for p in self.model.parameters() if p.grad is not None], recipe.sam)
        self.apply_gradients(step)
        with torch.no_grad():
            batch = torch.stack([loss.detach() * y.shape[0], (logits.argmax(-1) == y).sum().float(),
                                 torch.tensor(float(y.shape[0]), device=y.device)])
            self.totals = batch if self.totals is None else self.totals + batch

    def apply_gradients(self, step: int) -> None:
        """The part of a step after the gradients (in each p.grad): clip them, set the scheduled
        learning rate, take the AdamW step; then the weight average follows."""
        recipe = self.recipe
        if recipe.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)
        lr = lr_at(step, recipe.lr, self.warmup, self.total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        if self.ema is not None:
            d = ema_decay_at(recipe.ema_decay, step)
            with torch.no_grad():
                for n, p in self.model.named_parameters():
                    self.ema[n].lerp_(p, 1 - d)

    def eval_state(self) -> dict[str, Tensor]:
        """The weights to evaluate: the EMA if kept, else the live ones (state_dict names)."""
        state = {n: t.detach() for n, t in self.model.state_dict().items()}
        if self.ema is not None:
            state.update(self.ema)
        return state


@torch.no_grad()
def predict(model: ViT, images: Tensor, tta: bool = False) -> Tensor:
    """uint8 images (B, H, W) -> class probabilities (B, K), in eval mode."""
    model.eval()
    x = to_unit(images)  # (B, 1, H, W)
    shifts = TTA_SHIFTS if tta else TTA_SHIFTS[:1]
    probs = [model(normalize(shift_images(x, dy, dx))).float().softmax(-1) for dy, dx in shifts]
    return sum(probs) / len(probs)
