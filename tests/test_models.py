"""Each twin on its own (shapes, finiteness, gradients reach every parameter, jit, patchify), and
the laws their fresh draws come from (init, stochastic depth)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from jaxvit import model as jm
from parity import weights as W
from parity.config import PRESETS, ConfigError, ViTConfig, preset
from torchvit import model as tm

CONFIGS = {
    "tiny-cls-learned": preset("tiny"),
    "p4-gap-sincos2d-nonsquare": preset("tiny", patch_size=4, image_height=16, image_width=28,
                                        pool="gap", posemb="sincos2d"),
    "p2-cls-sincos1d-dropouts": preset("tiny", patch_size=2, image_height=8, image_width=8,
                                       posemb="sincos1d", dropout=0.1, attn_dropout=0.1,
                                       drop_path=0.2),
    "p4-cls-lsa-spt-c3": preset("tiny", patch_size=4, image_height=12, image_width=16, channels=3,
                                lsa=True, spt=True),
    "p2-cls-rope-nonsquare": preset("tiny", patch_size=2, image_height=6, image_width=10, rope=True),
    "p4-gap-none-rope": preset("tiny", patch_size=4, image_height=12, image_width=12, pool="gap",
                               posemb="none", rope=True),
}


def _x(config, batch=3):
    shape = (batch, config.image_height, config.image_width, config.channels)
    return np.random.default_rng(0).random(shape, dtype=np.float32)


@pytest.mark.parametrize("name", CONFIGS)
def test_flax_model_shapes_finite_and_every_param_gets_gradient(name):
    c = CONFIGS[name]
    model = jm.ViT(c)
    params = W.canonical_to_flax(W.random_canonical(c, 0), c)
    # jitted: one compiled program instead of one per op (the eager path: test_flax_jit_and_eager_agree)
    logits, out = jax.jit(lambda p, x: model.apply({"params": p}, x, capture=True))(params, _x(c))
    assert logits.shape == (3, c.num_classes)
    assert out["patches"].shape == (3, c.num_patches, c.stem_dim)
    assert out["with_posemb"].shape == (3, c.num_tokens, c.width)
    assert out[f"blocks.{c.depth - 1}.attn"].shape == (3, c.num_heads, c.num_tokens, c.num_tokens)
    assert out["pooled"].shape == (3, c.width)
    assert all(bool(jnp.all(jnp.isfinite(v))) for v in out.values())
    np.testing.assert_allclose(out["blocks.0.attn"].sum(-1), 1.0, atol=1e-5)

    def loss(p):
        lg = model.apply({"params": p}, jnp.asarray(_x(c)), train=True,
                         rngs={"dropout": jax.random.PRNGKey(1)})
        return -jax.nn.log_softmax(lg)[:, 0].mean()

    grads = W.flax_to_canonical(jax.jit(jax.grad(loss))(params))
    dead = [n for n, g in grads.items() if not np.any(g != 0)]
    assert not dead, f"no gradient reached {dead}"


@pytest.mark.parametrize("name", CONFIGS)
def test_torch_model_shapes_finite_and_every_param_gets_gradient(name):
    c = CONFIGS[name]
    torch.manual_seed(0)
    model = tm.ViT(c)
    model.load_state_dict(W.canonical_to_torch(W.random_canonical(c, 0), c))
    x = torch.from_numpy(_x(c)).permute(0, 3, 1, 2)
    model.eval()
    logits, out = model(x, capture=True)
    assert logits.shape == (3, c.num_classes)
    assert out["patches"].shape == (3, c.num_patches, c.stem_dim)
    assert out["with_posemb"].shape == (3, c.num_tokens, c.width)
    assert out[f"blocks.{c.depth - 1}.attn"].shape == (3, c.num_heads, c.num_tokens, c.num_tokens)
    assert all(bool(torch.isfinite(v).all()) for v in out.values())
    model.train()
    (-model(x).log_softmax(-1)[:, 0].mean()).backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
    assert not dead, f"no gradient reached {dead}"


def test_fresh_inits_have_the_canonical_names_and_shapes_in_both_frameworks():
    for c in CONFIGS.values():
        W.check(W.flax_to_canonical(jm.init_params(c, 0)), c)
        W.check(W.torch_to_canonical(tm.ViT(c).state_dict()), c)


def test_fresh_inits_draw_each_tensor_from_the_same_law_in_both_frameworks():
    """The parity suite runs the twins on one set of weights; a training run starts from its
    own framework's draw. So each tensor's law must be the same in both: the constants equal
    (zeros, ones, LSA's 1/sqrt(head dim)), and each random tensor of the same sd, mean and shape
    (xavier-uniform kernels, the MLP's tiny normal biases, the normal position table). Draws
    are pooled over 4 seeds and over the blocks, whose tensors share their laws."""
    c = preset("cpu", spt=True, lsa=True)  # every kind of tensor the twins have
    draws = {"flax": {}, "torch": {}}
    for seed in range(4):
        torch.manual_seed(seed)
        for framework, tensors in (("flax", W.flax_to_canonical(jm.init_params(c, seed))),
                                   ("torch", W.torch_to_canonical(tm.ViT(c).state_dict()))):
            for name, t in tensors.items():
                kind = re.sub(r"^blocks\.\d+\.", "blocks.N.", name)
                draws[framework].setdefault(kind, []).append(np.asarray(t, np.float64).ravel())
    random = set()
    for kind in draws["flax"]:
        f, t = np.concatenate(draws["flax"][kind]), np.concatenate(draws["torch"][kind])
        if f.std() == 0 or t.std() == 0:
            np.testing.assert_array_equal(f, t, err_msg=f"{kind}: not the same constant")
            continue
        random.add(kind)
        se = 1 / np.sqrt(f.size)  # about the standard error of the ratio of two sample sds
        assert abs(f.std() / t.std() - 1) < 4.5 * se, f"{kind}: sd {f.std():.4g} against {t.std():.4g}"
        assert abs(f.mean() - t.mean()) < 4.5 * se * f.std(), f"{kind}: another mean"
        # the shape of the law: a uniform has 58% of its draws within one sd, a normal 68%
        within = [np.mean(np.abs(a - a.mean()) < a.std()) for a in (f, t)]
        assert abs(within[0] - within[1]) < 2.5 * se, f"{kind}: another law"
    assert random == {"patch_embed.kernel", "pos_embed", "blocks.N.attn.qkv.kernel",
                      "blocks.N.attn.proj.kernel", "blocks.N.mlp.fc1.kernel",
                      "blocks.N.mlp.fc2.kernel", "blocks.N.mlp.fc1.bias", "blocks.N.mlp.fc2.bias"}


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_the_twins_drop_paths_by_the_same_law(rate):
    """Stochastic depth in training: each sample's whole branch is dropped with probability
    `rate` and the kept ones scaled by 1 / (1 - rate), in both twins (4,096 samples)."""
    x = np.ones((4096, 3, 8), np.float32)
    flax_out = np.asarray(jm.DropPath(rate).apply({}, jnp.asarray(x), train=True,
                                                  rngs={"dropout": jax.random.PRNGKey(0)}))
    torch.manual_seed(0)
    torch_out = tm.DropPath(rate).train()(torch.from_numpy(x)).numpy()
    for out in (flax_out, torch_out):
        kept = out[:, :1, :1].ravel() > 0
        np.testing.assert_allclose(out, np.where(kept, 1 / (1 - rate), 0)[:, None, None] * x, rtol=1e-6)
        se = np.sqrt(rate * (1 - rate) / len(kept))
        assert abs((~kept).mean() - rate) < 4 * se
    assert np.array_equal(np.asarray(jm.DropPath(rate).apply({}, jnp.asarray(x), train=False)), x)
    assert torch.equal(tm.DropPath(rate).eval()(torch.from_numpy(x)), torch.from_numpy(x))


@pytest.mark.parametrize("name", ["tiny-cls-learned", "p4-cls-lsa-spt-c3"])
def test_flax_init_without_the_forward_pass_gives_init_s_values_to_the_bit(name):
    # init_params runs the initializers only (lazy_init); a seed's weights stay what they were
    c = CONFIGS[name]
    eager = jm.ViT(c).init(jax.random.PRNGKey(3), jnp.zeros((1, *_x(c).shape[1:])))["params"]
    lazy = jm.init_params(c, 3)
    assert jax.tree_util.tree_structure(lazy) == jax.tree_util.tree_structure(eager)
    for a, b in zip(jax.tree_util.tree_leaves(lazy), jax.tree_util.tree_leaves(eager), strict=True):
        assert isinstance(a, jax.Array) and a.dtype == b.dtype and bool((a == b).all())


def test_flax_jit_and_eager_agree():
    c = CONFIGS["p4-gap-sincos2d-nonsquare"]
    model = jm.ViT(c)
    params = W.canonical_to_flax(W.random_canonical(c, 0), c)
    x = jnp.asarray(_x(c))
    eager = model.apply({"params": params}, x)
    jitted = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    np.testing.assert_allclose(eager, jitted, atol=1e-5)


def test_flax_attention_kernel_choice_keeps_the_function_and_the_parameters():
    c = preset("tiny", patch_size=4)
    params = W.canonical_to_flax(W.random_canonical(c, 0), c)
    x = jnp.asarray(_x(c))
    def logits(attention):
        return jax.jit(lambda p, x: jm.ViT(c, attention_impl=attention).apply({"params": p}, x))(params, x)

    np.testing.assert_allclose(logits(None), logits("xla"), atol=1e-6)
    fresh = jax.eval_shape(jm.ViT(c, attention_impl="xla").init, jax.random.PRNGKey(0), x)["params"]
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(params)
    with pytest.raises(ValueError, match="no-such-kernel"):  # the choice reaches JAX
        logits("no-such-kernel")


def test_torch_dropout_only_in_train_mode():
    c = CONFIGS["p2-cls-sincos1d-dropouts"]
    model = tm.ViT(c)
    model.load_state_dict(W.canonical_to_torch(W.random_canonical(c, 0), c))
    x = torch.from_numpy(_x(c)).permute(0, 3, 1, 2)
    model.eval()
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))


def test_flax_dropout_only_in_train_mode():
    c = CONFIGS["p2-cls-sincos1d-dropouts"]
    model = jm.ViT(c)
    params = W.canonical_to_flax(W.random_canonical(c, 0), c)
    x = jnp.asarray(_x(c))
    train = jax.jit(lambda key: model.apply({"params": params}, x, train=True, rngs={"dropout": key}))
    assert not np.allclose(train(jax.random.PRNGKey(0)), train(jax.random.PRNGKey(1)))
    infer = jax.jit(lambda: model.apply({"params": params}, x))
    np.testing.assert_array_equal(infer(), infer())


@pytest.mark.parametrize("p,h,w,ch", [(2, 8, 6, 1), (4, 28, 28, 1), (7, 28, 21, 3)])
def test_patchify_then_unpatchify_gives_back_the_image(p, h, w, ch):
    x = np.random.default_rng(0).random((2, h, w, ch), dtype=np.float32)
    back = jm.unpatchify(jm.patchify(jnp.asarray(x), p), p, h, w)
    np.testing.assert_array_equal(back, x)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2)
    assert torch.equal(tm.unpatchify(tm.patchify(xt, p), p, h, w), xt)


def test_overlapping_patches_hold_a_pixel_in_every_patch_that_covers_it_and_in_no_other():
    c = preset("tiny", crop=2, patch_size=8, patch_stride=4)  # 8x8 every 4 over the central 24x24
    assert c.grid == (5, 5) and c.num_tokens == 26 and c.patch_dim == 64
    assert preset("tiny", patch_size=7, patch_stride=7).grid == preset("tiny", patch_size=7).grid
    x = np.zeros((1, 24, 24, 1), np.float32)
    x[0, 9, 14] = 1.0  # rows 4-11 and 8-15 of patches hold row 9; columns 8-15 and 12-19 column 14
    j = np.asarray(jm.patchify(jnp.asarray(x), 8, 4))[0]  # (25, 64)
    t = tm.patchify(torch.from_numpy(x).permute(0, 3, 1, 2), 8, 4).numpy()[0]
    np.testing.assert_array_equal(j, t)
    holding = {(n // 5, n % 5): int(np.argmax(j[n])) for n in np.flatnonzero(j.sum(axis=1))}
    # grid (row, col) -> where the pixel sits in the flattened (p1 p2) patch: 8 * (9 - 4 row) + 14 - 4 col
    assert holding == {(1, 2): 8 * 5 + 6, (1, 3): 8 * 5 + 2, (2, 2): 8 * 1 + 6, (2, 3): 8 * 1 + 2}


def test_every_preset_builds_and_presets_table_is_complete():
    assert {"tiny", "small", "base", "kaggle"} <= set(PRESETS)
    for name in PRESETS:
        preset(name)


@pytest.mark.parametrize("changes,words", [
    (dict(patch_size=5), "not divisible by patch_size 5"),
    (dict(width=30, num_heads=4), "width 30 is not divisible by num_heads 4"),
    (dict(posemb="sincos2d", width=42, num_heads=2), "divisible by 4"),
    (dict(pool="max"), "pool must be"),
    (dict(dropout=1.5), "dropout must be in [0, 1)"),
    (dict(depth=0), "depth must be a positive integer"),
    (dict(crop=14), "crop must be a whole number of pixels, 0 <= 2 * crop <"),
    (dict(crop=-1), "crop must be"),
    (dict(crop=1, patch_size=7), "image size 26x26 (after a crop of 1) is not divisible by patch_size 7"),
    (dict(mlp_ratio=0.001), "leaves the MLP at least one unit"),
    (dict(mlp_ratio=float("inf")), "mlp_ratio must be a finite number"),
    (dict(ln_eps=float("inf")), "ln_eps must be a finite number > 0"),
    (dict(rope="false"), "rope must be true or false, got 'false'"),
    (dict(patch_size=4, patch_stride=5), "patch_stride must be a whole number of pixels from 1 to "
                                         "patch_size (4), or 0 for patch_size, got 5"),
    (dict(patch_stride=-1), "patch_stride must be"),
    (dict(patch_stride=True), "patch_stride must be"),
    (dict(patch_size=8, patch_stride=3), "patches of 8 every 3 pixels do not tile image size 28x28"),
])
def test_config_refuses_impossible_values_with_a_clear_message(changes, words):
    with pytest.raises(ConfigError, match=None) as err:
        ViTConfig().replace(**changes)
    assert words in str(err.value)


def test_config_refuses_unknown_fields_and_presets():
    with pytest.raises(ConfigError, match="unknown config field"):
        ViTConfig.from_dict({"widht": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        preset("huge")
    c = preset("small", pool="gap")
    assert ViTConfig.from_dict(c.to_dict()) == c


def test_crop_makes_both_twins_blind_to_the_border_and_only_to_it():
    c = preset("tiny", patch_size=6, crop=2)  # the central 24x24 of 28x28: 16 patches of 6x6
    assert c.seen == (24, 24) and c.grid == (4, 4) and c.num_tokens == 17
    canonical = W.random_canonical(c, 0)
    flax_model, params = jm.ViT(c), W.canonical_to_flax(canonical, c)
    torch_model = tm.ViT(c).eval()
    torch_model.load_state_dict(W.canonical_to_torch(canonical, c))

    def logits(x):  # (B, H, W, C) -> each twin's logits
        with torch.no_grad():
            t = torch_model(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
        return np.asarray(flax_model.apply({"params": params}, jnp.asarray(x))), t

    x = _x(c)
    border, inside = x.copy(), x.copy()
    border[:, :2] = border[:, -2:] = border[:, :, :2] = border[:, :, -2:] = 7.0
    inside[:, 2, 2] += 1.0  # the first pixel the model sees
    for base, same, moved in zip(logits(x), logits(border), logits(inside), strict=True):
        np.testing.assert_array_equal(base, same)
        assert np.abs(base - moved).max() > 1e-4


def test_shifted_copies_move_a_pixel_half_a_patch_along_each_diagonal_in_both_frameworks():
    x = np.zeros((1, 8, 8, 1), np.float32)
    x[0, 3, 5, 0] = 1.0  # row 3, column 5
    p = 4  # shifts of 2
    want = [(3, 5), (1, 3), (1, 7), (5, 3), (5, 7)]  # the image, up-left, up-right, down-left, down-right
    flax = np.asarray(jm.shifted_copies(jnp.asarray(x), p))  # (1, 8, 8, 5)
    torch_ = tm.shifted_copies(torch.from_numpy(x).permute(0, 3, 1, 2), p).numpy()  # (1, 5, 8, 8)
    for channel, (row, col) in enumerate(want):
        assert np.argwhere(flax[0, :, :, channel]).tolist() == [[row, col]]
        assert np.argwhere(torch_[0, channel]).tolist() == [[row, col]]
    x[0, 0, 0, 0] = 1.0  # a corner pixel moved outward falls off the image: zero-filled, no wrap
    assert np.asarray(jm.shifted_copies(jnp.asarray(x), p))[0, :, :, 1].sum() == 1.0


def test_lsa_bars_each_token_from_itself_and_starts_at_the_usual_scale():
    c = CONFIGS["p4-cls-lsa-spt-c3"]
    params = jm.init_params(c, 0)
    np.testing.assert_allclose(params["blocks_0"]["attn"]["logit_scale"], c.head_dim ** -0.5)
    torch_model = tm.ViT(c).eval()
    np.testing.assert_allclose(torch_model.blocks[0].attn.logit_scale.detach(), c.head_dim ** -0.5)
    _, out = jm.ViT(c).apply({"params": params}, jnp.asarray(_x(c)), capture=True)
    weights = np.asarray(out["blocks.0.attn"])  # (B, H, T, T)
    assert np.all(np.diagonal(weights, axis1=-2, axis2=-1) == 0.0)
    np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
    with pytest.raises(ConfigError, match="spt"):
        preset("tiny", patch_size=1, spt=True)


def test_rope_makes_patch_logits_depend_on_the_offset_only_and_leaves_the_class_token():
    c = preset("tiny", patch_size=4, image_height=16, image_width=20, width=32, num_heads=2,
               rope=True)  # a 4 x 5 grid, head_dim 16
    rows, cols = c.grid
    rng = np.random.default_rng(0)
    q1, k1 = rng.standard_normal((2, c.head_dim)).astype(np.float32)  # one q and one k vector
    x = np.ascontiguousarray(np.broadcast_to(np.stack([q1, k1]), (1, c.num_tokens, 2, c.head_dim)))
    flax = np.asarray(jm.rope(jnp.asarray(x), jm.rope_angles(c)))  # (1, T, 2, hd): q and k as 2 heads
    torch_ = tm.rope(torch.from_numpy(x).transpose(1, 2), tm.rope_angles(c)).transpose(1, 2).numpy()
    for turned in (flax, torch_):
        q, k = turned[0, :, 0], turned[0, :, 1]  # each (T, hd)
        np.testing.assert_array_equal(q[0], q1)  # the class token is not turned
        np.testing.assert_allclose(np.linalg.norm(q, axis=-1), np.linalg.norm(q1), rtol=1e-5)
        logits = q[1:] @ k[1:].T  # (N, N), patches in row-major order
        for dy, dx in ((0, 1), (1, 0), (1, -2), (2, 3)):  # every pair at this offset: one logit
            pairs = [(r * cols + col, (r + dy) * cols + col + dx)
                     for r in range(rows) for col in range(cols)
                     if 0 <= r + dy < rows and 0 <= col + dx < cols]
            values = [logits[s, t] for s, t in pairs]
            np.testing.assert_allclose(values, values[0], atol=1e-5)
        assert abs(logits[0, 1] - logits[0, cols]) > 1e-3  # a column step is not a row step
    with pytest.raises(ConfigError, match="rope .* divisible by 4"):
        preset("tiny", width=36, num_heads=2, rope=True)  # head_dim 18


def test_without_a_position_table_the_twins_see_a_bag_of_patches_until_rope_tells_them_where():
    # posemb none (the paper's "no positional embedding", App. D.4): shuffling the patches of an
    # image leaves both twins' logits where they were; rope, or a table, moves them
    shuffled = np.random.default_rng(1).permutation(12)  # a 3 x 4 grid of 4x4 patches

    def logits_pair(c):  # (original, shuffled) logits of each twin, the same random weights
        canonical = W.random_canonical(c, 0)
        params = W.canonical_to_flax(canonical, c)
        torch_model = tm.ViT(c).eval()
        torch_model.load_state_dict(W.canonical_to_torch(canonical, c))
        x = _x(c)
        moved = np.array(jm.unpatchify(jm.patchify(jnp.asarray(x), 4)[:, shuffled], 4, 12, 16))  # writable
        for images in (x, moved):
            with torch.no_grad():
                t = torch_model(torch.from_numpy(images).permute(0, 3, 1, 2)).numpy()
            yield np.asarray(jm.ViT(c).apply({"params": params}, jnp.asarray(images))), t

    bag = preset("tiny", patch_size=4, image_height=12, image_width=16, posemb="none")
    assert "pos_embed" not in W.canonical_shapes(bag)
    (flax, torch_), (flax_moved, torch_moved) = logits_pair(bag)
    assert np.abs(flax).max() > 1e-3  # the logits are not trivially equal
    np.testing.assert_allclose(flax_moved, flax, atol=1e-5)
    np.testing.assert_allclose(torch_moved, torch_, atol=1e-5)
    for changes in (dict(rope=True), dict(posemb="learned"), dict(posemb="sincos2d")):
        (flax, torch_), (flax_moved, torch_moved) = logits_pair(bag.replace(**changes))
        assert np.abs(flax_moved - flax).max() > 1e-4, changes
        assert np.abs(torch_moved - torch_).max() > 1e-4, changes
