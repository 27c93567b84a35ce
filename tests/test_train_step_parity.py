"""The two trainers take the same steps: same weights + same batches -> same weights after 10 steps.

This covers what the model parity suite does not: the whole optimizer chain of each trainer
(warm-up + cosine schedule, global-norm clipping, label smoothing, AdamW with the decay mask,
the EMA of the weights with its warmed-up decay).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvit import train as jt
from jaxvit.model import ViT as FlaxViT
from parity import weights as W
from parity.config import preset
from torchvit import train as tt
from torchvit.model import ViT as TorchViT
from train.common import Recipe

PLAIN = Recipe(epochs=2, batch_size=32, lr=2e-3, rotate=0, translate=0, scale=0,
               label_smoothing=0.1, grad_clip=1.0, weight_decay=0.05, warmup_epochs=1, ema_decay=0.99)
# augmentation asked for, but every epoch is a clean one: both trainers must skip it alike
ALL_CLEAN = dataclasses.replace(PLAIN, rotate=15, translate=3, scale=0.15, elastic=17, erase=0.5,
                                mixup=0.4, cutmix=1.0, clean_epochs=2)
# sharpness-aware minimization: a second gradient a step, at the moved weights
SAM = dataclasses.replace(PLAIN, sam=0.05)
# knowledge distillation from a teacher of another size (the twins draw their augmentations
# from different generators, so the images are as they are)
DISTILL = dataclasses.replace(PLAIN, distill=0.6)
DISTILL_HARD = dataclasses.replace(DISTILL, distill_hard=True)  # DeiT's: the teacher's top class
TEACHER_CONFIG = preset("tiny", patch_size=7, width=48)


class Twins:
    """Both trainers of `tiny` at patch 4 from the same random weights, and their one data set:
    200 random images, of which an epoch's order takes 160 (5 steps of 32). With
    recipe.distill, both are taught by one random teacher (patch 7, width 48)."""

    steps_per_epoch = 5

    def __init__(self, recipe):
        config = preset("tiny", patch_size=4)
        self.canonical = W.random_canonical(config, 0, scale=0.05)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (200, 28, 28)).astype(np.uint8)
        labels = rng.integers(0, 10, 200).astype(np.int32)
        order = rng.permutation(200)[:160].astype(np.int32)

        tx = jt.make_optimizer(recipe, self.steps_per_epoch)
        self.state = jt.create_state(config, recipe, tx, 0)
        self.state["params"] = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(self.canonical, config))
        self.state["opt_state"] = tx.init(self.state["params"])
        self.state["ema"] = jax.tree_util.tree_map(jnp.copy, self.state["params"])
        self.teacher = teacher = W.random_canonical(TEACHER_CONFIG, 1, scale=0.5) if recipe.distill else None
        self.flax_step = jt.make_train_step(
            FlaxViT(config), tx, recipe, 32, self.steps_per_epoch, 0, teacher=None if teacher is None else (
                FlaxViT(TEACHER_CONFIG), W.canonical_to_flax(teacher, TEACHER_CONFIG)))
        self.flax_data = jnp.asarray(images), jnp.asarray(labels), jnp.asarray(order)

        self.model = TorchViT(config)
        self.model.load_state_dict(W.canonical_to_torch(self.canonical, config))
        torch_teacher = None
        if teacher is not None:
            torch_teacher = TorchViT(TEACHER_CONFIG)
            torch_teacher.load_state_dict(W.canonical_to_torch(teacher, TEACHER_CONFIG))
        self.trainer = tt.Trainer(self.model, recipe, self.steps_per_epoch, 0, teacher=torch_teacher)
        self.torch_data = (torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64)),
                           torch.from_numpy(order.astype(np.int64)))

    def step(self, step: int) -> None:
        """Training step `step` of both trainers: batch `step % 5` of the epoch's order."""
        i = step % self.steps_per_epoch
        self.state = self.flax_step(self.state, *self.flax_data, np.int32(i), np.int32(step))
        images, labels, order = self.torch_data
        self.trainer.train_step(images, labels, order[i * 32:(i + 1) * 32], step)


@pytest.mark.parametrize("recipe", [PLAIN, ALL_CLEAN, SAM, DISTILL],
                         ids=["no-augmentation", "all-clean-epochs", "sam", "distill"])
def test_ten_training_steps_agree_between_the_trainers(recipe):
    twins = Twins(recipe)
    for step in range(10):
        twins.step(step)
    canonical, state, trainer = twins.canonical, twins.state, twins.trainer
    flax_w = W.flax_to_canonical(jax.device_get(state["params"]))
    torch_w = W.torch_to_canonical(twins.model.state_dict())
    moved = max(np.abs(flax_w[n] - canonical[n]).max() for n in canonical)
    diff = max(np.abs(flax_w[n] - torch_w[n]).max() for n in canonical)
    assert moved > 1e-3, "the steps did not move the weights"
    assert diff < 1e-4, f"trainers diverged by {diff}"
    flax_ema = W.flax_to_canonical(jax.device_get(state["ema"]))
    torch_ema = W.torch_to_canonical(trainer.eval_state())
    # warmed up, the average of 10 steps sits between the init and the weights (not at the init)
    ema_moved = max(np.abs(flax_ema[n] - canonical[n]).max() for n in canonical)
    assert ema_moved > 0.3 * moved, "the EMA's decay was not warmed up"
    ema_diff = max(np.abs(flax_ema[n] - torch_ema[n]).max() for n in canonical)
    assert ema_diff < 1e-4, f"the EMAs diverged by {ema_diff}"
    loss_f, _, count_f = np.asarray(state["totals"])
    loss_t, _, count_t = trainer.totals.tolist()
    assert count_f == count_t
    np.testing.assert_allclose(loss_f / count_f, loss_t / count_t, rtol=1e-4)


def test_the_trainers_optimizers_agree_over_a_whole_schedule():
    # Ten steps are too few to see every setting of the optimizer: Adam's beta2 = 0.99 against
    # 0.999, say, moves the weights by less than 1e-4 in ten steps (python -m parity.mutants).
    # So both trainers' update, everything after the gradients (clipping, warm-up and cosine
    # schedule, AdamW with its decay mask, the weight average), runs a whole 300-step schedule
    # on the same random gradients, whose size varies from step to step so that the second
    # moment matters and the clipping acts on about half of the steps.
    recipe = dataclasses.replace(PLAIN, epochs=10, lr=1e-3)
    steps_per_epoch = 30
    config = preset("tiny", patch_size=4)
    canonical = W.random_canonical(config, 0, scale=0.05)
    tx = jt.make_optimizer(recipe, steps_per_epoch)
    params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(canonical, config))
    state = {"params": params, "opt_state": tx.init(params), "ema": params}
    update = jax.jit(lambda state, grads, step: jt.apply_gradients(state, grads, tx, recipe, step))
    model = TorchViT(config)
    model.load_state_dict(W.canonical_to_torch(canonical, config))
    trainer = tt.Trainer(model, recipe, steps_per_epoch, seed=0)
    named = dict(model.named_parameters())
    rng = np.random.default_rng(0)
    size = sum(v.size for v in canonical.values())
    clipped = 0
    for step in range(recipe.epochs * steps_per_epoch):
        scale = np.exp(rng.normal()) / np.sqrt(size)  # the gradient's norm: about exp(N(0, 1))
        grads = {n: (rng.normal(size=v.shape) * scale).astype(np.float32) for n, v in canonical.items()}
        clipped += np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in grads.values())) > 1.0
        state = update(state, W.canonical_to_flax(grads, config), np.int32(step))
        for n, g in W.canonical_to_torch(grads, config).items():
            named[n].grad = g
        trainer.apply_gradients(step)
    assert 0.3 < clipped / (recipe.epochs * steps_per_epoch) < 0.7
    flax_w = W.flax_to_canonical(jax.device_get(state["params"]))
    torch_w = W.torch_to_canonical(model.state_dict())
    flax_ema = W.flax_to_canonical(jax.device_get(state["ema"]))
    torch_ema = W.torch_to_canonical(trainer.eval_state())
    moved = max(np.abs(flax_w[n] - canonical[n]).max() for n in canonical)
    assert moved > 0.02, "the schedule did not move the weights"
    for name in canonical:
        np.testing.assert_allclose(torch_w[name], flax_w[name], atol=1e-5, err_msg=name)
        np.testing.assert_allclose(torch_ema[name], flax_ema[name], atol=1e-5, err_msg=name)


@pytest.mark.parametrize("recipe", [DISTILL, DISTILL_HARD], ids=["soft", "hard"])
def test_distilled_targets_mix_the_label_and_the_teachers_answer_in_both_trainers(recipe):
    twins = Twins(recipe)
    twins.step(0)  # batch 0 of the epoch's order, the images as they are
    images, labels, order = (np.asarray(a) for a in twins.flax_data)
    x = jt.normalize(jt.to_unit(jnp.asarray(images[order[:32]])))
    y = np.eye(10)[labels[order[:32]]]
    config = preset("tiny", patch_size=4)
    student = FlaxViT(config).apply({"params": W.canonical_to_flax(twins.canonical, config)}, x)
    teacher = FlaxViT(TEACHER_CONFIG).apply(
        {"params": W.canonical_to_flax(twins.teacher, TEACHER_CONFIG)}, x)
    log_p = np.asarray(jax.nn.log_softmax(student), np.float64)

    def cross_entropy(targets):  # after label smoothing 0.1, the recipe's
        return float(-((0.9 * targets + 0.01) * log_p).sum(-1).mean())

    probabilities = np.asarray(jax.nn.softmax(teacher), np.float64)
    top_class = np.eye(10)[probabilities.argmax(-1)]
    taught, other = (top_class, probabilities) if recipe.distill_hard else (probabilities, top_class)
    want = cross_entropy(0.4 * y + 0.6 * taught)
    assert abs(want - cross_entropy(y)) > 0.01  # the teacher's share moves the loss
    assert abs(want - cross_entropy(0.4 * y + 0.6 * other)) > 0.01  # and its kind matters
    loss_f, _, count_f = np.asarray(twins.state["totals"])
    loss_t, _, count_t = twins.trainer.totals.tolist()
    np.testing.assert_allclose([loss_f / count_f, loss_t / count_t], want, rtol=1e-5)


def test_sharpness_aware_gradients_are_taken_at_the_moved_weights_in_both_trainers():
    # loss(p) = sum(p**3) / 3 has gradient p**2: at the weights moved rho along the normalized
    # gradient g = p**2, the gradient is (p + rho g / |g|)**2, over both tensors' norm together
    a, b = np.array([0.5, -1.0, 2.0], np.float32), np.array([[1.5, -0.25]], np.float32)
    g = np.concatenate([a ** 2, b.ravel() ** 2])
    scale = 0.3 / np.linalg.norm(g)
    want = [(a + scale * a ** 2) ** 2, (b + scale * b ** 2) ** 2]

    def flax_loss(params):
        return sum(jnp.sum(v ** 3) for v in params.values()) / 3

    params = {"a": jnp.asarray(a), "b": jnp.asarray(b)}
    got = jt.sharpness_aware(flax_loss, params, jax.grad(flax_loss)(params), 0.3)
    for name, w in zip("ab", want, strict=True):
        np.testing.assert_allclose(np.asarray(got[name]), w, rtol=1e-6)

    ta, tb = torch.tensor(a, requires_grad=True), torch.tensor(b, requires_grad=True)

    def torch_loss():
        return ((ta ** 3).sum() + (tb ** 3).sum()) / 3

    torch_loss().backward()
    tt.sharpness_aware(torch_loss, [ta, tb], 0.3)
    for t, w, before in zip((ta, tb), want, (a, b), strict=True):
        np.testing.assert_allclose(t.grad.numpy(), w, rtol=1e-6)
        assert (t.detach().numpy() == before).all(), "the weights were not put back"


def test_the_augmentations_of_both_trainers_are_the_same_warp():
    rng = np.random.default_rng(0)
    x = rng.random((16, 28, 20, 1), dtype=np.float32)
    angle = rng.uniform(-20, 20, 16).astype(np.float32)
    zoom = rng.uniform(0.8, 1.2, 16).astype(np.float32)
    shear = rng.uniform(-10, 10, 16).astype(np.float32)
    shift = rng.uniform(-3, 3, (16, 2)).astype(np.float32)
    flax_out = np.asarray(jt.warp(jnp.asarray(x), *map(jnp.asarray, (angle, zoom, shear, shift))))
    torch_out = tt.warp(torch.from_numpy(x).permute(0, 3, 1, 2),
                        *map(torch.from_numpy, (angle, zoom, shear, shift))).permute(0, 2, 3, 1)
    assert np.abs(flax_out - x).max() > 0.5  # the warp did something
    np.testing.assert_allclose(flax_out, torch_out.numpy(), atol=1e-4)


def test_the_warp_by_whole_pixels_is_an_exact_shift_with_black_edges():
    # the identity returns the image bit for bit; a whole-pixel shift is shift_images, edges included
    x = jnp.asarray(np.random.default_rng(1).random((3, 28, 20, 1), dtype=np.float32))
    ones, zeros = jnp.ones(3), jnp.zeros(3)
    np.testing.assert_array_equal(jt.warp(x, zeros, ones, zeros, jnp.zeros((3, 2))), x)
    # the PyTorch twin's identity keeps the edge pixels too (its grid's rounding forgiven)
    xt, z = torch.from_numpy(np.array(x)).permute(0, 3, 1, 2), torch.zeros(3)
    np.testing.assert_allclose(tt.warp(xt, z, torch.ones(3), z, torch.zeros(3, 2)), xt, atol=1e-5)
    for dy, dx in ((2, 0), (0, -3), (-1, 27), (5, 4)):
        got = jt.warp(x, zeros, ones, zeros, jnp.tile(jnp.array([dy, dx], jnp.float32), (3, 1)))
        np.testing.assert_allclose(got, jt.shift_images(x, -dy, -dx), atol=1e-6)


def test_the_elastic_field_and_its_warp_are_the_same_in_both_trainers():
    rng = np.random.default_rng(2)
    x = rng.random((8, 28, 20, 1), dtype=np.float32)
    noise = rng.uniform(-1, 1, (8, 2, 28, 20)).astype(np.float32)
    flow_f = np.array(jt.elastic_flow(jnp.asarray(noise), 34.0, 4.0))
    flow_t = tt.elastic_flow(torch.from_numpy(noise), 34.0, 4.0).numpy()
    assert flow_f.shape == (8, 28, 20, 2)
    np.testing.assert_allclose(flow_f, flow_t, atol=1e-5)
    # smooth (neighbours move together) and about a pixel or two, as in Simard et al.
    assert 0.5 < flow_f.std() < 3.0
    assert np.abs(np.diff(flow_f, axis=1)).mean() < 0.2 * np.abs(flow_f).mean()
    np.testing.assert_allclose(jt.elastic_flow(jnp.asarray(noise), 17.0, 4.0), flow_f / 2, rtol=1e-5, atol=1e-6)
    zeros, ones = np.zeros(8, np.float32), np.ones(8, np.float32)
    args = (zeros, ones, zeros, np.zeros((8, 2), np.float32), flow_f)
    flax_out = np.asarray(jt.warp(jnp.asarray(x), *map(jnp.asarray, args)))
    torch_out = tt.warp(torch.from_numpy(x).permute(0, 3, 1, 2), *map(torch.from_numpy, args)).permute(0, 2, 3, 1)
    assert np.abs(flax_out - x).max() > 0.5  # the field moved pixels
    np.testing.assert_allclose(flax_out, torch_out.numpy(), atol=1e-4)
    # a constant field of whole pixels is a shift
    const = jnp.tile(jnp.array([2.0, -3.0]), (8, 28, 20, 1))
    got = jt.warp(jnp.asarray(x), *map(jnp.asarray, args[:4]), flow=const)
    np.testing.assert_allclose(got, jt.shift_images(jnp.asarray(x), -2, 3), atol=1e-6)


def _moved_blob(recipe, n=4096):
    """Where each trainer's augmentation moves one small blob, 6 pixels right of the centre of a
    28x28 image, in n draws: (n, 2) centroids (row, col), Flax's then PyTorch's."""
    r, c = np.mgrid[:28, :28]
    x = np.broadcast_to(np.exp(-((r - 13.5) ** 2 + (c - 19.5) ** 2) / 2.0), (n, 28, 28)).astype(np.float32)
    flax_out = np.asarray(jt.augment(jnp.asarray(x[..., None]), jax.random.PRNGKey(0), recipe))[..., 0]
    torch.manual_seed(0)
    torch_out = tt.augment(torch.from_numpy(x[:, None]), recipe)[:, 0].numpy()
    return [np.stack([(a * r).sum((1, 2)), (a * c).sum((1, 2))], 1) / a.sum((1, 2))[:, None]
            for a in (flax_out, torch_out)]


@pytest.mark.parametrize("option", ["translate", "rotate", "scale", "shear", "elastic"])
def test_both_trainers_draw_their_warps_from_the_same_laws(option):
    """The tests above give both warps the same numbers; in training each trainer draws its own.
    So the laws must be the same: one warp at a time, the quantiles of what it does to a blob
    agree between the twins and, where the law is plain, with the recipe's law (uniform within
    its bound; the blob 6 pixels from the centre moves by 6 tan(shear) across)."""
    bound = {"translate": 3.0, "rotate": 15.0, "scale": 0.15, "shear": 10.0, "elastic": 17.0}[option]
    recipe = dataclasses.replace(Recipe(rotate=0, translate=0, scale=0), **{option: bound})
    q = np.linspace(0.05, 0.95, 10)
    u = -1 + 2 * q  # the same quantiles of a uniform law on [-1, 1]
    measure, law = {  # what the warp moves, and its quantiles by the law (None: no plain law)
        "translate": (lambda p: p - (13.5, 19.5), np.stack([bound * u] * 2, 1)),
        "rotate": (lambda p: np.degrees(np.arctan2(p[:, :1] - 13.5, p[:, 1:] - 13.5)), bound * u[:, None]),
        "scale": (lambda p: np.hypot(p[:, :1] - 13.5, p[:, 1:] - 13.5) / 6, 1 + bound * u[:, None]),
        "shear": (lambda p: p[:, :1] - 13.5, 6 * np.tan(np.radians(bound * u))[:, None]),
        "elastic": (lambda p: p - (13.5, 19.5), None),
    }[option]
    flax_q, torch_q = (np.quantile(measure(p), q, axis=0) for p in _moved_blob(recipe))
    tol = 0.04 * (flax_q[-1] - flax_q[0]).min()  # 4% of the middle 90%'s width
    assert tol > 0.01  # the warp moved the blob
    np.testing.assert_allclose(flax_q, torch_q, atol=tol, err_msg=f"--{option}: the twins' laws differ")
    if law is not None:
        np.testing.assert_allclose(flax_q, law, atol=tol, err_msg=f"--{option}: not the recipe's law")


def _ks(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov distance of two samples: the largest gap between their CDFs."""
    x = np.concatenate([a, b])
    return float(np.abs(np.searchsorted(np.sort(a), x, side="right") / len(a)
                        - np.searchsorted(np.sort(b), x, side="right") / len(b)).max())


@pytest.mark.parametrize("recipe", [Recipe(mixup=0.4), Recipe(cutmix=1.0), Recipe(mixup=0.4, cutmix=1.0)],
                         ids=["mixup", "cutmix", "both"])
def test_both_trainers_draw_mixup_and_cutmix_from_the_same_laws(recipe):
    """The mixing draws of each trainer (Beta blends, CutMix boxes, which of the two): over
    4,096 images the blend, the box's area and its centre have the same law in both twins (a
    Kolmogorov-Smirnov distance under 0.05; two draws of one law stay under 0.043 but once in
    a thousand)."""
    n = 4096
    blend_f, boxes_f = (np.asarray(a) for a in jt.draw_mix(jax.random.PRNGKey(0), recipe, n, 28, 20))
    torch.manual_seed(0)
    blend_t, boxes_t = (a.numpy() for a in tt.draw_mix(recipe, n, 28, 20, slice(0, n), "cpu"))

    def measures(blend, boxes):  # the blend, the box's area and centre (0 with no box)
        top, left, height, width = boxes.T
        boxed = height > 0
        return blend, height * width / (28 * 20), (top + height / 2) * boxed, (left + width / 2) * boxed

    mf, mt = measures(blend_f, boxes_f), measures(blend_t, boxes_t)
    assert max(np.std(mf[0]), np.std(mf[1])) > 0.1  # something is mixed
    for name, f, t in zip(("blend", "box area", "box row", "box column"), mf, mt, strict=True):
        assert _ks(f, t) < 0.05, f"{name}: the twins' laws differ (KS {_ks(f, t):.3f})"


def test_random_erasing_is_the_same_in_both_trainers_and_blacks_out_its_box():
    u = np.random.default_rng(3).random((64, 5), dtype=np.float32)
    boxes_f = np.array(jt.erase_boxes(jnp.asarray(u), 0.5, 28, 20))
    boxes_t = tt.erase_boxes(torch.from_numpy(u), 0.5, 28, 20).numpy()
    np.testing.assert_allclose(boxes_f, boxes_t, rtol=1e-5, atol=1e-5)
    top, left, height, width = boxes_f.T
    assert ((height > 0) == (u[:, 0] < 0.5)).all()  # erased with probability p
    assert (top >= 0).all() and (top + height <= 28 + 1e-4).all() and (left + width <= 20 + 1e-4).all()
    area = (height * width)[height > 0] / (28 * 20)
    assert area.min() >= 0.02 - 1e-6 and area.max() <= 0.2 + 1e-6
    x = np.ones((64, 28, 20, 1), np.float32)
    out_f = np.asarray(jt.erase(jnp.asarray(x), jnp.asarray(boxes_f)))
    out_t = tt.erase(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(boxes_f)).permute(0, 2, 3, 1)
    np.testing.assert_array_equal(out_f, out_t.numpy())
    black = (out_f == 0).reshape(64, -1).sum(1)
    assert (black[height == 0] == 0).all()  # no box, no change
    # each box blacks out about its area (whole pixels inside it), and nothing else is touched
    np.testing.assert_allclose(black[height > 0], (height * width)[height > 0], rtol=0.6, atol=6)
    assert set(np.unique(out_f)) <= {0.0, 1.0}


def test_both_trainers_augment_with_elastic_and_erasing_when_asked():
    x = np.random.default_rng(4).random((8, 28, 28, 1), dtype=np.float32)
    affine_only = Recipe(rotate=10, translate=2, scale=0.1)
    both = dataclasses.replace(affine_only, elastic=34.0, erase=1.0)
    key = jax.random.PRNGKey(0)
    plain, extra = (np.asarray(jt.augment(jnp.asarray(x), key, r)) for r in (affine_only, both))
    assert np.abs(plain - extra).max() > 0.5
    assert ((extra == 0).sum((1, 2, 3)) > (plain == 0).sum((1, 2, 3))).all()  # every image lost a box
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    torch.manual_seed(0)
    plain_t = tt.augment(xt, affine_only)
    torch.manual_seed(0)
    extra_t = tt.augment(xt, both)
    assert (plain_t - extra_t).abs().max() > 0.5
    assert ((extra_t == 0).sum((1, 2, 3)) > (plain_t == 0).sum((1, 2, 3))).all()


def test_the_schedule_of_both_trainers_is_the_same():
    from train.common import lr_at, schedule_steps

    recipe = Recipe(epochs=3, lr=1e-3, warmup_epochs=0.5)
    tx_sched = __import__("optax").warmup_cosine_decay_schedule(
        0.0, recipe.lr, *schedule_steps(recipe, 40), end_value=0.0)
    for step in range(0, 121, 7):
        np.testing.assert_allclose(float(tx_sched(step)), lr_at(step, recipe.lr, *schedule_steps(recipe, 40)),
                                   rtol=1e-5, atol=1e-9)


def _one_step_losses(recipe, step):
    """The training loss of step `step` of each trainer, from the same weights and batch."""
    twins = Twins(recipe)
    twins.step(step)
    return float(twins.state["totals"][0]), float(twins.trainer.totals[0])


def test_clean_epochs_train_on_the_images_as_they_are_in_both_trainers():
    """With --clean-epochs 1 of 2, a step of the first epoch augments its batch (its training
    loss differs from the same step's without augmentation) and a step of the last does not
    (the same loss, to the bit)."""
    augmented = dataclasses.replace(PLAIN, rotate=15, translate=3, scale=0.15, elastic=17, clean_epochs=1)
    last_augmented, first_clean = 4, 5
    for aug, plain in zip(_one_step_losses(augmented, last_augmented),
                          _one_step_losses(PLAIN, last_augmented), strict=True):
        assert aug != plain
    assert _one_step_losses(augmented, first_clean) == _one_step_losses(PLAIN, first_clean)


def test_aug_anneal_weakens_the_warps_linearly_to_none_in_both_trainers():
    """--aug-anneal: the strength is 1 until its last augmented steps, then falls linearly (the
    same numbers in both twins, jnp's traced clip and Python's); a strength of 0 leaves the
    images as they are, 1 is the unannealed warp to the bit, and in between warps less."""
    from train.common import warp_strength

    aug_steps, anneal_steps = 30, 10  # steps 20 .. 29 anneal
    python = [warp_strength(s, aug_steps, anneal_steps) for s in range(35)]
    traced = jax.jit(lambda s: warp_strength(s, aug_steps, anneal_steps, lambda v: jnp.clip(v, 0.0, 1.0)))
    np.testing.assert_allclose([float(traced(np.int32(s))) for s in range(35)], python, rtol=1e-6)
    assert python[:21] == [1.0] * 21 and python[29] == 0.1 and python[30:] == [0.0] * 5
    assert np.allclose(np.diff(python[20:31]), -0.1)

    # smooth images (a Gaussian blob each), whose change grows with how far the warp moves them
    centres = np.random.default_rng(6).uniform(10, 18, (8, 2, 1, 1))
    r, c = np.mgrid[:28, :28]
    x = np.exp(-((r - centres[:, 0]) ** 2 + (c - centres[:, 1]) ** 2) / 50)[..., None].astype(np.float32)
    recipe = Recipe(rotate=15, translate=3, scale=0.15, shear=10, elastic=17)
    key, xt = jax.random.PRNGKey(1), torch.from_numpy(x).permute(0, 3, 1, 2)

    def flax_aug(strength):
        return np.asarray(jt.augment(jnp.asarray(x), key, recipe, strength))

    def torch_aug(strength):
        torch.manual_seed(1)
        return tt.augment(xt, recipe, strength=strength).permute(0, 2, 3, 1).numpy()

    for aug in (flax_aug, torch_aug):
        full, half = aug(None), aug(0.5)
        np.testing.assert_array_equal(aug(1.0), full)
        np.testing.assert_allclose(aug(0.0), x, atol=1e-6)
        assert 0.2 < np.abs(half - x).mean() / np.abs(full - x).mean() < 0.9


def test_both_trainers_anneal_the_warps_over_the_last_augmented_steps():
    """--aug-anneal 2 of 2 epochs (10 steps): step 9 warps at a tenth of full strength, so its
    loss lies nearer the unaugmented step's than full strength's does."""
    full = dataclasses.replace(PLAIN, rotate=15, translate=3, scale=0.15, elastic=17)
    annealed = dataclasses.replace(full, aug_anneal=2)
    weak, strong, plain = (np.array(_one_step_losses(r, 9)) for r in (annealed, full, PLAIN))
    assert (np.abs(weak - plain) < np.abs(strong - plain)).all() and (weak != plain).all()


def test_mixup_and_cutmix_are_the_same_in_both_trainers():
    rng = np.random.default_rng(5)
    x = rng.random((16, 28, 20, 1), dtype=np.float32)
    targets = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]
    for recipe in (Recipe(mixup=0.4), Recipe(cutmix=1.0), Recipe(mixup=0.4, cutmix=1.0)):
        lam_mixup, lam_cutmix = rng.beta(0.4, 0.4, 16), rng.beta(1.0, 1.0, 16)
        draws = [a.astype(np.float32) for a in (lam_mixup, lam_cutmix, rng.random((16, 3)))]
        blend, boxes = (np.array(a) for a in jt.mix_params(*map(jnp.asarray, draws), recipe, 28, 20))
        blend_t, boxes_t = tt.mix_params(*map(torch.from_numpy, draws), recipe, 28, 20)
        np.testing.assert_array_equal(blend, blend_t.numpy())
        np.testing.assert_allclose(boxes, boxes_t.numpy(), atol=1e-5)
        cut = boxes[:, 2] > 0
        if recipe.mixup == 0:
            assert (blend == 1).all() and cut.any()
        if recipe.cutmix == 0:
            assert not cut.any() and np.allclose(blend, draws[0])
        out, mixed = (np.asarray(a) for a in jt.mix(jnp.asarray(x), jnp.asarray(targets), jnp.asarray(blend),
                                                    jnp.asarray(boxes)))
        out_t, mixed_t = tt.mix(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(targets),
                                torch.from_numpy(blend), torch.from_numpy(boxes))
        np.testing.assert_allclose(out, out_t.permute(0, 2, 3, 1).numpy(), atol=1e-6)
        np.testing.assert_allclose(mixed, mixed_t.numpy(), atol=1e-6)
        # each image is a mixture of itself and its partner (rows 0 and 1, 2 and 3, ... swapped)
        partner = x.reshape(8, 2, 28, 20, 1)[:, ::-1].reshape(x.shape)
        own_pixels = np.isclose(out, x, atol=1e-6) & ~np.isclose(x, partner, atol=1e-6)
        np.testing.assert_allclose(mixed.sum(1), 1, atol=1e-6)
        for i in np.flatnonzero(cut):  # CutMix: the target's share is the share of own pixels
            assert mixed[i, targets[i].argmax()] >= own_pixels[i].mean() - 1e-6
            assert 0 < own_pixels[i].mean() < 1
        for i in np.flatnonzero(~cut):  # mixup: a blend everywhere
            np.testing.assert_allclose(out[i], blend[i] * x[i] + (1 - blend[i]) * partner[i], atol=1e-6)


def test_both_trainers_mix_their_batch_when_asked():
    mixing = dataclasses.replace(PLAIN, mixup=0.4, cutmix=1.0)
    for mixed, plain in zip(_one_step_losses(mixing, 2), _one_step_losses(PLAIN, 2), strict=True):
        assert np.isfinite(mixed) and mixed != plain
