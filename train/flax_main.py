"""Train the Flax ViT on Kaggle's Digit Recognizer and write submission.csv.

    python train/flax_main.py --data ../shared/data/digit-recognizer.zip

The run directory (--out) ends up holding config.json, metrics.jsonl, model.safetensors
(final weights, canonical format), best.safetensors (best validation accuracy),
checkpoint.safetensors (everything --resume needs), submission.csv and plots/ (pictures of
the run, train/plots.py; --no-plots skips them).
Twin: train/torch_main.py takes the same options and writes the same files.
"""

from __future__ import annotations

import json
import os
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
from parity import weights as W
from parity.config import ConfigError, ViTConfig
from train import cache, common, data
from train.common import UsageError, fail

FRAMEWORK = "flax"
LAUNCH = time.time()  # "since_launch_s" in metrics.jsonl counts from here (jax/torch imports later)


# ---- checkpoints: the whole state pytree as one safetensors file ----------------------------
def save_checkpoint(path: Path, state, meta: dict) -> None:
    import jax
    from safetensors.numpy import save_file

    leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
    arrays = {jax.tree_util.keystr(p): np.array(v, order="C") for p, v in leaves}  # keeps 0-d
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(arrays, str(tmp), metadata={"meta": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        common.pause_for_tests("checkpoint-written")  # tests kill the run here
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, template):
    """-> (state shaped like template, meta). Refuses a file that does not fit."""
    import jax
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "numpy") as f:
            meta = json.loads((f.metadata() or {})["meta"])
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise W.WeightsError(f"{path}: unreadable checkpoint ({e})") from None
    common.check_checkpoint_meta(meta, path)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    out = []
    for p, leaf in leaves:
        name = jax.tree_util.keystr(p)
        if name not in stored or stored[name].shape != np.shape(leaf):
            raise W.WeightsError(f"{path}: checkpoint does not fit this run (tensor {name})")
        out.append(stored[name])
    return jax.tree_util.tree_unflatten(treedef, out), meta


# ---- the run -----------------------------------------------------------------------------
def evaluate(predict, params, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    """Class probabilities (N, K) in fixed-size batches (the last one padded)."""
    import jax

    out = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        n = len(chunk)
        if n < batch and len(images) > batch:
            chunk = np.concatenate([chunk, np.zeros((batch - n,) + chunk.shape[1:], chunk.dtype)])
        out.append(np.asarray(jax.device_get(predict(params, chunk)))[:n])
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def run(args) -> int:
    spec, out = common.open_run(args, FRAMEWORK)
    if args.eval_only:
        return eval_only(args, spec, out)
    job = common.load_job(args, spec, FRAMEWORK)  # everything that can be refused, before any write
    recipe, config, dataset = spec.recipe, spec.config, job.dataset
    images, labels, test_images = job.images, job.labels, job.test_images
    train_idx, val_idx, steps_per_epoch = job.train_idx, job.val_idx, job.steps_per_epoch

    import jax
    import jax.numpy as jnp

    from jaxvit import train as jt
    from jaxvit.model import ViT

    cache.use_jax_compilation_cache()  # a second launch reuses the compiled steps
    cpu_devices = xla_flags.cpu_devices(spec.options.get("cpu_devices"), recipe.batch_size)
    if cpu_devices is not None:  # before JAX creates its CPU backend; GPUs are not touched
        jax.config.update("jax_num_cpu_devices", cpu_devices)
    if int(os.environ.get("JAX_NUM_PROCESSES", "1")) > 1:  # several hosts: one process each
        jax.distributed.initialize()  # reads JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID
    devices = jax.devices()
    common.check_batch_splits(recipe.batch_size, len(devices), "devices")
    mesh = jt.data_mesh(devices) if len(devices) > 1 else None
    lead = jax.process_index() == 0  # with several hosts, only process 0 writes and prints
    if lead:
        common.prepare_out(out)

    dtype_name = spec.options.get("dtype") or "auto"
    if dtype_name == "auto":
        dtype_name = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    model = ViT(config, dtype=jnp.dtype(dtype_name))
    eval_model = ViT(config)  # evaluation in float32, like the PyTorch twin
    tx = jt.make_optimizer(recipe, steps_per_epoch)
    state = jt.replicate(jt.create_state(config, recipe, tx, recipe.seed), mesh)
    start_epoch, best = 0, {"val_acc": -1.0, "epoch": -1}
    ckpt = out / "checkpoint.safetensors"
    if args.resume:
        if not ckpt.exists():
            raise UsageError(f"{out}: no checkpoint.safetensors yet (killed before the first "
                             f"epoch ended?); start the run again without --resume")
        state, meta = load_checkpoint(ckpt, state)
        state = jt.replicate(jax.tree_util.tree_map(jnp.asarray, state), mesh)
        start_epoch, best = meta["epoch"] + 1, meta["best"]
        if lead:
            common.trim_metrics(out, meta["epoch"] + 1)
            print(f"resuming {out} after epoch {meta['epoch'] + 1}", file=sys.stderr)
    elif lead:
        common.start_run(out, spec, FRAMEWORK)

    print(f"flax: {len(devices)} device(s) ({devices[0].device_kind}"
          f"{', data-parallel: each global batch split over them' if mesh else ''}), {dtype_name}, "
          f"preset {spec.preset}, {len(train_idx)} train / {len(val_idx)} val / "
          f"{len(test_images)} test images", file=sys.stderr)
    # The training split lives on the device(s) as uint8 (N, 28, 28); every step slices there.
    x_all = jt.replicate(jax.device_put(images[train_idx]), mesh)
    y_all = jt.replicate(jax.device_put(labels[train_idx].astype(np.int32)), mesh)
    teacher = None
    if job.teacher is not None:  # --distill: the teacher in float32, as the PyTorch twin's
        tensors, teacher_config = job.teacher
        if isinstance(teacher_config, ViTConfig):
            teacher = (ViT(teacher_config), jax.tree_util.tree_map(
                jnp.asarray, W.canonical_to_flax(tensors, teacher_config)))
        else:  # a CNN (train/cnn.py), its params already Flax's
            from train.cnn import CNN

            teacher = (CNN(teacher_config), jax.tree_util.tree_map(jnp.asarray, tensors))
    train_step = jt.make_train_step(model, tx, recipe, recipe.batch_size, steps_per_epoch, recipe.seed,
                                    mesh, teacher)
    predict = jt.make_predict(eval_model, tta=False)
    weights_of = (lambda s: s["ema"]) if "ema" in state else (lambda s: s["params"])

    # XLA:CPU with several devices (--cpu-devices, the default 2, or XLA_FLAGS) can deadlock in
    # the gradient all-reduce once ~150 steps are queued ahead of the runtime (jaxlib 0.10.2,
    # 2 cores: a rendezvous timeout, then an abort); waiting for each step avoids it.
    wait_each_step = mesh is not None and jax.default_backend() == "cpu"
    wall0 = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.perf_counter()
            order = jt.replicate(jax.device_put(common.epoch_indices(
                recipe, len(train_idx), epoch, steps_per_epoch).astype(np.int32)), mesh)
            state["totals"] = jt.replicate(jnp.zeros(3, jnp.float32), mesh)
            bar = common.progress_bar(steps_per_epoch, epoch, recipe.epochs, spec.options.get("quiet"))
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                state = train_step(state, x_all, y_all, order, np.int32(i), np.int32(step))
                if wait_each_step:
                    jax.block_until_ready(state)
                if bar is not None and (i % 20 == 19 or i == steps_per_epoch - 1):
                    loss_sum, correct, count = np.asarray(state["totals"])
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}",
                                    img_s=f"{count / (time.perf_counter() - t0):.0f}")
                    bar.update(i + 1 - bar.n)
            loss_sum, correct, count = np.asarray(jax.device_get(state["totals"]))
            train_time = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if not np.isfinite(loss_sum):
                return common.diverged(out, epoch)
            row = common.epoch_row(epoch, loss_sum, correct, count, train_time, recipe, steps_per_epoch)
            if len(val_idx):
                probs = evaluate(predict, weights_of(state), images[val_idx])
                row.update(common.val_scores(probs, labels[val_idx]))
                if row["val_acc"] > best["val_acc"]:
                    best = {"val_acc": row["val_acc"], "epoch": epoch + 1}
                    if lead:
                        W.save(out / "best.safetensors",
                               W.flax_to_canonical(jax.device_get(weights_of(state))), config)
            row["wall_seconds"] = time.perf_counter() - wall0
            row["since_launch_s"] = time.time() - LAUNCH
            if not lead:
                continue
            common.append_metrics(out, row)
            save_checkpoint(ckpt, state, {"epoch": epoch, "best": best, "framework": FRAMEWORK})
            common.print_epoch(row, recipe.epochs)
    except KeyboardInterrupt:
        return common.interrupted(out, epoch, FRAMEWORK)

    if not lead:
        return 0
    final = W.flax_to_canonical(jax.device_get(weights_of(state)))
    W.save(out / "model.safetensors", final, config)
    chosen = common.submission_weights(out, best, spec.options)
    tensors, _ = W.load(chosen, config)
    params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(tensors, config))
    tta = bool(spec.options.get("tta"))
    submission_predict = jt.make_predict(eval_model, tta=tta)
    probs = evaluate(submission_predict, params, test_images)
    data.write_submission(out / "submission.csv", probs.argmax(-1))
    tta_val_acc = None
    if tta and len(val_idx):  # what TTA gives the submission's weights on the held-out images
        val_probs = evaluate(submission_predict, params, images[val_idx])
        tta_val_acc = common.val_scores(val_probs, labels[val_idx])["val_acc"]
    common.print_done(out, len(probs), chosen.name, tta, best, time.perf_counter() - wall0,
                      tta_val_acc)
    # Pictures after the results are on disk, from one process only; they never fail the run.
    if not spec.options.get("no_plots"):
        from train import plots

        plots.draw_safely(out, dataset)
    return 0


def eval_only(args, spec, out: Path) -> int:
    """Evaluate a canonical checkpoint (from either trainer) and write the submission."""
    if not args.checkpoint:
        raise UsageError("--eval-only needs --checkpoint FILE (a canonical .safetensors)")
    config = W.read_config(args.checkpoint)
    tensors, config = W.load(args.checkpoint, config)
    common.check_eval_config(args, spec.config, config)
    dataset = data.resolve(spec.options.get("data"))
    common.prepare_out(out)

    import jax
    import jax.numpy as jnp

    from jaxvit import train as jt
    from jaxvit.model import ViT

    cache.use_jax_compilation_cache()
    params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(tensors, config))
    predict = jt.make_predict(ViT(config), tta=bool(args.tta))
    images, labels, test_images, _, val_idx = common.split_data(spec, dataset)
    if len(val_idx):
        acc = float(np.mean(evaluate(predict, params, images[val_idx]).argmax(-1) == labels[val_idx]))
        print(f"val acc {acc:.4f} on {len(val_idx)} images", file=sys.stderr)
    probs = evaluate(predict, params, test_images)
    data.write_submission(out / "submission.csv", probs.argmax(-1))
    print(f"wrote {out / 'submission.csv'} ({len(probs)} rows)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = common.build_parser("train/flax_main.py", "Flax").parse_args(argv)
    xla_flags.apply()  # before JAX creates its backend
    common.stop_on_sigterm()
    try:
        return run(args)
    except (UsageError, data.DataError, W.WeightsError, ConfigError) as e:
        fail(str(e))
    except KeyboardInterrupt:  # the epochs say more (in run)
        print("\ninterrupted outside the epochs", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    status = main()
    if status == 130:  # interrupted: XLA's threads may be mid-step, and the interpreter's teardown
        sys.stdout.flush()  # can then crash (a segfault, seen on 2 CPU devices); every file is
        sys.stderr.flush()  # whole already, so leave at once
        os._exit(130)
    sys.exit(status)
