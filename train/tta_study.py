"""Which test-time augmentation helps: score finished runs on many views of the validation split.

    python train/tta_study.py runs/a runs/b --data digit-recognizer.zip --out runs/tta-study

The trainers' `--tta` averages the softmax over five views: the image and its four one-pixel
shifts (TTA_SHIFTS in both twins). This measures the alternatives on each run's final weights
(its model.safetensors, the weights a submission uses; the best epoch's were chosen on the
validation split): the softmax of every view below, saved per run as RUN/tta_views.npz (reused
on a second call), then, for each set of views, the validation accuracy, the count of wrong
images and the mean negative log-likelihood of the averaged softmax, per run and as mean +- sd.

Choosing a set of views by these numbers is choosing on the validation split; with ~20 sets
and differences of a few images out of 4,200, that bias is small but not nil, so the report
also scores each set on the two halves of the split (even and odd positions): a set that wins
on one half should win on the other.

Views: integer shifts (exact), small rotations and zooms (bilinear, as the training's warp),
and random draws of the training augmentation itself, at its strength and at half of it
(fixed keys, so every run sees the same draws).
"""

from __future__ import annotations

import dataclasses
import json
import sys
import zipfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # restart with glibc keeping XLA's step buffers (train/malloc.py)
    from train import malloc

    malloc.restart()

import numpy as np

from jaxvit import xla_flags
from parity import weights as W
from train import cache, data
from train.common import OneLineParser, Recipe, UsageError, atomic_write, atomic_write_text, fail, prepare_out
from train.ensemble import member_weights

DRAWS = 16  # random draws of each augmentation strength
# (name, (angle in degrees, zoom, row shift, column shift)) of the deterministic views
SHIFTS1 = [("id", (0, 1, 0, 0)), ("dy+1", (0, 1, 1, 0)), ("dy-1", (0, 1, -1, 0)),
           ("dx+1", (0, 1, 0, 1)), ("dx-1", (0, 1, 0, -1))]
DIAGONALS = [(f"d{dy:+d}{dx:+d}", (0, 1, dy, dx)) for dy in (1, -1) for dx in (1, -1)]
SHIFTS2 = [("dy+2", (0, 1, 2, 0)), ("dy-2", (0, 1, -2, 0)), ("dx+2", (0, 1, 0, 2)), ("dx-2", (0, 1, 0, -2))]
ROTATIONS = [(f"rot{a:+d}", (a, 1, 0, 0)) for a in (5, -5, 10, -10)]
ZOOMS = [("zoom0.9", (0, 0.9, 0, 0)), ("zoom1.1", (0, 1.1, 0, 0))]
AFFINE = dict(SHIFTS1 + DIAGONALS + SHIFTS2 + ROTATIONS + ZOOMS)
# the training augmentation of the patch-4 recipe, and at half its strength (no elastic)
STRENGTHS = {"aug": dict(rotate=15.0, translate=3.0, scale=0.15, elastic=17.0),
             "mild": dict(rotate=7.5, translate=1.5, scale=0.075, elastic=0.0)}
VIEWS = list(AFFINE) + [f"{s}{i}" for s in STRENGTHS for i in range(DRAWS)]


def names(views):
    return [n for n, _ in views]


SETS = {  # the sets of views scored; "shifts5" is what --tta does now
    "none": ["id"],
    "shifts5": names(SHIFTS1),
    "shifts9": names(SHIFTS1 + DIAGONALS),
    "shifts13": names(SHIFTS1 + DIAGONALS + SHIFTS2),
    "shifts5+rot5": names(SHIFTS1) + ["rot+5", "rot-5"],
    "shifts5+rot10": names(SHIFTS1 + ROTATIONS),
    "shifts5+zoom": names(SHIFTS1 + ZOOMS),
    "shifts9+rot5+zoom": names(SHIFTS1 + DIAGONALS + ZOOMS) + ["rot+5", "rot-5"],
    "all-affine": list(AFFINE),
    "id+aug8": ["id"] + [f"aug{i}" for i in range(8)],
    "id+aug16": ["id"] + [f"aug{i}" for i in range(DRAWS)],
    "id+mild8": ["id"] + [f"mild{i}" for i in range(8)],
    "id+mild16": ["id"] + [f"mild{i}" for i in range(DRAWS)],
    "shifts5+mild16": names(SHIFTS1) + [f"mild{i}" for i in range(DRAWS)],
    "shifts9+mild16": names(SHIFTS1 + DIAGONALS) + [f"mild{i}" for i in range(DRAWS)],
}


def view_probs(params, config, images: np.ndarray, batch: int = 700) -> dict[str, np.ndarray]:
    """Softmax (N, K) of every view in VIEWS, for uint8 images (N, H, W)."""
    import jax
    import jax.numpy as jnp

    from jaxvit import train as jt
    from jaxvit.model import ViT

    model = ViT(config)

    def softmax(params, x):
        return jax.nn.softmax(model.apply({"params": params}, jt.normalize(x)))

    @jax.jit
    def affine(params, images, view):  # view: (angle, zoom, row shift, column shift)
        x = jt.to_unit(images)
        b = x.shape[0]
        full = lambda v: jnp.full((b,), v)  # noqa: E731
        x = jt.warp(x, angle=full(view[0]), zoom=full(view[1]), shear=full(0.0),
                    shift=jnp.broadcast_to(view[2:], (b, 2)))
        return softmax(params, x)

    def drawer(recipe):
        return jax.jit(lambda params, images, key: softmax(params, jt.augment(jt.to_unit(images), key, recipe)))

    drawn = {s: drawer(dataclasses.replace(Recipe(), **kw)) for s, kw in STRENGTHS.items()}
    batch = min(batch, len(images))  # a small split is not padded up to a whole batch
    pad = -len(images) % batch
    padded = np.concatenate([images, np.zeros((pad,) + images.shape[1:], images.dtype)])
    out = {}
    for name in VIEWS:
        chunks = []
        for i, start in enumerate(range(0, len(padded), batch)):
            chunk = padded[start:start + batch]
            if name in AFFINE:
                p = affine(params, chunk, jnp.asarray(AFFINE[name], jnp.float32))
            else:
                strength, draw = name.rstrip("0123456789"), int(name[len(name.rstrip("0123456789")):])
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(20261203), draw), i)
                p = drawn[strength](params, chunk, key)
            chunks.append(np.asarray(p, np.float32))
        out[name] = np.concatenate(chunks)[:len(images)]
    return out


def run_views(run_dir: Path, dataset) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> (softmax of every view on the run's validation split, its labels); cached in the run."""
    path, run = member_weights(run_dir, "final")
    recipe, limit = run["recipe"], run["options"].get("limit_train")
    images, labels = dataset.train_images[:limit], dataset.train_labels[:limit]
    _, val_idx = data.stratified_split(labels, recipe["val_fraction"], recipe.get("split_seed", 0))
    if not len(val_idx):
        raise UsageError(f"{run_dir}: trained without a validation split; nothing to score on")
    cache = run_dir / "tta_views.npz"
    if cache.is_file():
        try:
            with np.load(cache) as saved:
                if set(saved.files) == set(VIEWS) | {"labels"} and \
                        np.array_equal(saved["labels"], labels[val_idx]):
                    return {v: saved[v] for v in VIEWS}, labels[val_idx]
        except (OSError, ValueError, EOFError, zipfile.BadZipFile):
            pass  # a damaged cache: score the views again and write it anew
    import jax
    import jax.numpy as jnp

    tensors, config = W.load(path)
    params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(tensors, config))
    probs = view_probs(params, config, images[val_idx])
    atomic_write(cache, lambda f: np.savez(f, labels=labels[val_idx], **probs))
    return probs, labels[val_idx]


def score(probs: dict[str, np.ndarray], labels: np.ndarray, views: list[str]) -> dict:
    p = np.mean([probs[v] for v in views], 0)
    right = p.argmax(-1) == labels
    nll = -np.log(np.clip(p[np.arange(len(labels)), labels], 1e-12, None))
    return {"val_acc": float(right.mean()), "wrong": int((~right).sum()), "nll": float(nll.mean()),
            "wrong_even": int((~right[0::2]).sum()), "wrong_odd": int((~right[1::2]).sum())}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/tta_study.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run directories (either trainer) with a validation split")
    p.add_argument("--data", default=None, help="the competition download (zip or folder)")
    p.add_argument("--out", default="runs/tta-study", help="where tta_study.json and tta_study.md go")
    args = p.parse_args(argv)
    xla_flags.apply()  # before JAX creates its backend
    try:
        return run(args)
    except (UsageError, data.DataError, W.WeightsError) as e:
        fail(str(e))
    return 2


def run(args) -> int:
    run_dirs = [Path(r) for r in args.runs]
    for r in run_dirs:  # refuse a bad directory, or one with nothing to score, before any work
        if member_weights(r, "final")[1]["recipe"]["val_fraction"] == 0:
            raise UsageError(f"{r}: trained without a validation split; nothing to score on")
    dataset = data.resolve(args.data)
    out = Path(args.out)
    prepare_out(out)
    cache.use_jax_compilation_cache()  # the views' programs, compiled once for every later call
    scores = {}
    for r in run_dirs:
        probs, labels = run_views(r, dataset)
        scores[str(r)] = {name: score(probs, labels, views) for name, views in SETS.items()}
        print(f"{r}: scored {len(VIEWS)} views of {len(labels)} validation images", file=sys.stderr)
    rows = []
    for name, views in SETS.items():
        per_run = [scores[str(r)][name] for r in run_dirs]
        acc = np.array([s["val_acc"] for s in per_run]) * 100
        rows.append({"set": name, "views": len(views), "val_acc_mean": float(acc.mean()),
                     "val_acc_sd": float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
                     "nll_mean": float(np.mean([s["nll"] for s in per_run])),
                     **{k: [s[k] for s in per_run] for k in ("wrong", "wrong_even", "wrong_odd")}})
    lines = ["| views | n | val acc % (mean ± sd) | wrong per run | NLL | wrong, even half | wrong, odd half |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['set']} | {row['views']} | {row['val_acc_mean']:.2f} ± {row['val_acc_sd']:.2f} | "
                     f"{', '.join(map(str, row['wrong']))} | {row['nll_mean']:.4f} | "
                     f"{', '.join(map(str, row['wrong_even']))} | {', '.join(map(str, row['wrong_odd']))} |")
    table = "\n".join(lines) + "\n"
    report = {"runs": [str(r) for r in run_dirs], "sets": SETS, "rows": rows, "per_run": scores}
    atomic_write_text(out / "tta_study.json", json.dumps(report, indent=1))
    atomic_write_text(out / "tta_study.md", table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
