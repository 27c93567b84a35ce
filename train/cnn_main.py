"""Train the CNN baseline (train/cnn.py) with the Flax ViT trainer's recipe, on the same split.

    python train/cnn_main.py --data ../shared/data/digit-recognizer.zip --out runs/cnn \\
        --epochs 44 --rotate 15 --translate 3 --scale 0.15 --elastic 17 --clean-epochs 4 --tta

The recipe options are the trainers' own and default to the `cpu` preset's recipe; the step
is jaxvit.train's, the ViT's own (augmentation, AdamW, schedule, EMA), with the CNN in the
ViT's place. The run directory gets config.json, metrics.jsonl (the trainers' columns, so
train/experiments.py summarizes it as it does theirs), model.safetensors (the final weights,
EMA where on: a `--teacher` for the Flax trainer) and summary.json. No checkpoints: an
interrupted run starts again.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # restart with glibc keeping XLA's step buffers (train/malloc.py)
    from train import malloc

    malloc.restart()

import numpy as np

from jaxvit import xla_flags
from train import cache, common, data
from train.common import UsageError, fail

FRAMEWORK = "flax-cnn"
BASE_RECIPE = "cpu"  # the recipe the options start from
LAUNCH = time.time()


def parse_channels(text: str) -> tuple[int, ...]:
    try:
        channels = tuple(int(c) for c in text.split(","))
    except ValueError:
        channels = ()
    if not channels or min(channels) < 1:
        raise ValueError(f"--channels: expected whole numbers >= 1 separated by commas, got {text!r}")
    return channels


def build_parser() -> common.OneLineParser:
    p = common.OneLineParser(
        prog="train/cnn_main.py",
        description="Train the CNN baseline on Kaggle's Digit Recognizer with the ViT trainers' "
                    "recipe options and step, and score it on their validation split.")
    p.add_argument("--data", default=None, help="the competition download, as the trainers take it")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--channels", default="16,32,64",
                   help="channels of each block of two 3x3 convolutions (default: 16,32,64)")
    p.add_argument("--tta", action="store_true",
                   help="also score the final weights with the trainers' test-time shifts")
    p.add_argument("--limit-train", type=common._count, default=None, metavar="N",
                   help="use only the first N rows of train.csv (smoke tests)")
    p.add_argument("--cpu-devices", type=common._count, default=None, metavar="N",
                   help="on a CPU: split each batch over N XLA CPU devices (default as the Flax trainer)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    common.add_recipe_options(p, f"the `{BASE_RECIPE}` preset's recipe")
    return p


@dataclasses.dataclass
class Spec:  # what common.start_run writes as config.json
    config: object
    recipe: common.Recipe
    options: dict

    def to_json(self, framework: str) -> str:
        return json.dumps({"framework": framework, "model": self.config.to_dict(),
                           "recipe": dataclasses.asdict(self.recipe), "options": self.options},
                          indent=2, sort_keys=True)


def run(args) -> int:
    from train import cnn

    given = vars(args)
    fields = [f.name for f in dataclasses.fields(common.Recipe)]
    recipe = dataclasses.replace(common.RECIPES[BASE_RECIPE],
                                 **{k: given[k] for k in fields if given.get(k) is not None})
    common.check_recipe(recipe)
    if recipe.distill > 0 or recipe.sam > 0:
        raise UsageError("the CNN baseline takes no --distill or --sam")
    try:
        config = cnn.CNNConfig(channels=parse_channels(args.channels))
    except ValueError as e:
        raise UsageError(str(e)) from None
    dataset = data.resolve(args.data)
    options = {k: given[k] for k in ("data", "channels", "tta", "limit_train", "cpu_devices")}
    spec = Spec(config, recipe, options)
    images, labels, _, train_idx, val_idx = common.split_data(
        common.Run(BASE_RECIPE, None, recipe, {"limit_train": args.limit_train}), dataset)
    steps_per_epoch = len(train_idx) // recipe.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {recipe.batch_size} is larger than the training split "
                         f"({len(train_idx)} images)")
    out = Path(args.out)

    import jax
    import jax.numpy as jnp

    from jaxvit import train as jt
    from train.flax_main import evaluate

    cache.use_jax_compilation_cache()
    devices = xla_flags.cpu_devices(args.cpu_devices, recipe.batch_size)
    if devices is not None:
        jax.config.update("jax_num_cpu_devices", devices)
    common.check_batch_splits(recipe.batch_size, len(jax.devices()), "devices")
    mesh = jt.data_mesh() if len(jax.devices()) > 1 else None
    common.prepare_out(out)
    common.start_run(out, spec, FRAMEWORK)

    model = cnn.CNN(config)
    tx = jt.make_optimizer(recipe, steps_per_epoch)
    params = cnn.init_params(config, recipe.seed)
    state = {"params": params, "opt_state": tx.init(params), "totals": jnp.zeros(3, jnp.float32)}
    if recipe.ema_decay > 0:
        state["ema"] = jax.tree_util.tree_map(jnp.copy, params)
    state = jt.replicate(state, mesh)
    count = sum(int(np.size(v)) for v in jax.tree_util.tree_leaves(params))
    print(f"cnn: channels {config.channels}, {count:,} parameters, {len(jax.devices())} device(s), "
          f"{len(train_idx)} train / {len(val_idx)} val images", file=sys.stderr)
    x_all = jt.replicate(jax.device_put(images[train_idx]), mesh)
    y_all = jt.replicate(jax.device_put(labels[train_idx].astype(np.int32)), mesh)
    train_step = jt.make_train_step(model, tx, recipe, recipe.batch_size, steps_per_epoch,
                                    recipe.seed, mesh)
    predict = jt.make_predict(model, tta=False)
    weights_of = (lambda s: s["ema"]) if "ema" in state else (lambda s: s["params"])
    # as the Flax trainer does (its comment says why): on several XLA CPU devices, wait for each step
    wait_each_step = mesh is not None and jax.default_backend() == "cpu"
    wall0 = time.perf_counter()
    epoch = 0
    try:
        for epoch in range(recipe.epochs):
            t0 = time.perf_counter()
            order = jt.replicate(jax.device_put(common.epoch_indices(
                recipe, len(train_idx), epoch, steps_per_epoch).astype(np.int32)), mesh)
            state["totals"] = jt.replicate(jnp.zeros(3, jnp.float32), mesh)
            bar = common.progress_bar(steps_per_epoch, epoch, recipe.epochs, args.quiet)
            for i in range(steps_per_epoch):
                state = train_step(state, x_all, y_all, order, np.int32(i),
                                   np.int32(epoch * steps_per_epoch + i))
                if wait_each_step:
                    jax.block_until_ready(state)
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
            loss_sum, correct, n = np.asarray(jax.device_get(state["totals"]))
            if not np.isfinite(loss_sum):
                print(f"error: the loss became non-finite in epoch {epoch + 1}; try a lower --lr",
                      file=sys.stderr)
                return 3
            row = common.epoch_row(epoch, loss_sum, correct, n, time.perf_counter() - t0, recipe,
                                   steps_per_epoch)
            if len(val_idx):
                row.update(common.val_scores(evaluate(predict, weights_of(state), images[val_idx]),
                                             labels[val_idx]))
            row["wall_seconds"] = time.perf_counter() - wall0
            row["since_launch_s"] = time.time() - LAUNCH
            common.append_metrics(out, row)
            common.print_epoch(row, recipe.epochs)
    except KeyboardInterrupt:
        print(f"\ninterrupted in epoch {epoch + 1}; the CNN baseline keeps no checkpoint: start "
              f"it again", file=sys.stderr)
        return 130

    final = jax.device_get(weights_of(state))
    cnn.save(out / "model.safetensors", final, config)
    tta_val_acc = None
    if args.tta and len(val_idx):
        probs = evaluate(jt.make_predict(model, tta=True), final, images[val_idx])
        tta_val_acc = common.val_scores(probs, labels[val_idx])["val_acc"]
    summary = {"tta": bool(args.tta), "tta_val_acc": tta_val_acc,
               "final_val_acc": row.get("val_acc"), "seconds": time.perf_counter() - wall0,
               "parameters": count, "environment": common.environment()}
    common.atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    score = "" if tta_val_acc is None else f", {tta_val_acc:.4f} with TTA"
    print(f"wrote {out / 'model.safetensors'}; final val acc {row.get('val_acc', float('nan')):.4f}"
          f"{score}; {summary['seconds']:.0f} s", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    xla_flags.apply()  # before JAX creates its backend
    common.stop_on_sigterm()
    try:
        return run(args)
    except (UsageError, data.DataError) as e:
        fail(str(e))
    return 2


if __name__ == "__main__":
    sys.exit(main())
