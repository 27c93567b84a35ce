"""Train the PyTorch ViT on Kaggle's Digit Recognizer and write submission.csv.

    python train/torch_main.py --data ../shared/data/digit-recognizer.zip

Twin of train/flax_main.py: the same options, the same run directory (config.json,
metrics.jsonl, model.safetensors, best.safetensors, checkpoint.safetensors, submission.csv,
plots/), the same canonical weights. `--eval-only --checkpoint FILE` scores a checkpoint from either.
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

from parity import weights as W
from parity.config import ConfigError
from train import common, data
from train.common import UsageError, fail

FRAMEWORK = "torch"
LAUNCH = time.time()  # "since_launch_s" in metrics.jsonl counts from here (jax/torch imports later)


# ---- checkpoints: model, EMA and optimizer state as one safetensors file --------------------
def save_checkpoint(path: Path, trainer, meta: dict) -> None:
    from safetensors.torch import save_file

    tensors = {f"model.{n}": t.detach().cpu().contiguous()
               for n, t in trainer.model.state_dict().items()}
    if trainer.ema is not None:
        tensors.update({f"ema.{n}": t.detach().cpu().contiguous() for n, t in trainer.ema.items()})
    names = {id(p): n for n, p in trainer.model.named_parameters()}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            for key, value in trainer.optimizer.state.get(p, {}).items():
                tensors[f"opt.{names[id(p)]}.{key}"] = value.detach().cpu().contiguous()
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata={"meta": json.dumps(meta)})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        common.pause_for_tests("checkpoint-written")  # tests kill the run here
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: Path, trainer) -> dict:
    """Restore the trainer in place; -> meta. Refuses a file that does not fit."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {})["meta"])
            stored = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, KeyError, ValueError) as e:
        raise W.WeightsError(f"{path}: unreadable checkpoint ({e})") from None
    common.check_checkpoint_meta(meta, path)
    device = next(trainer.model.parameters()).device
    model_state = {k[len("model."):]: v for k, v in stored.items() if k.startswith("model.")}
    try:
        trainer.model.load_state_dict(model_state)
    except RuntimeError as e:
        raise W.WeightsError(f"{path}: checkpoint does not fit this run ({str(e)[:200]})") from None
    if trainer.ema is not None:
        for n in trainer.ema:
            trainer.ema[n].copy_(stored[f"ema.{n}"])
    for n, p in trainer.model.named_parameters():
        keys = [k for k in stored if k.startswith(f"opt.{n}.")]
        if keys:
            trainer.optimizer.state[p] = {k[len(f"opt.{n}."):]: stored[k].to(device)
                                          if stored[k].ndim else stored[k] for k in keys}
    return meta


# ---- the run -----------------------------------------------------------------------------
def evaluate(model, images: np.ndarray, device, tta: bool = False, batch: int = 1000) -> np.ndarray:
    """Class probabilities (N, K) in batches."""
    import torch

    from torchvit.train import predict

    out = [predict(model, torch.from_numpy(images[s:s + batch]).to(device), tta=tta).cpu().numpy()
           for s in range(0, len(images), batch)]
    return np.concatenate(out) if out else np.zeros((0, 10), np.float32)


def run(args) -> int:
    spec, out = common.open_run(args, FRAMEWORK)
    if args.eval_only:
        return eval_only(args, spec, out)
    job = common.load_job(args, spec, FRAMEWORK)  # everything that can be refused, before any write
    recipe, config, dataset = spec.recipe, spec.config, job.dataset
    images, labels, test_images = job.images, job.labels, job.test_images
    train_idx, val_idx, steps_per_epoch = job.train_idx, job.val_idx, job.steps_per_epoch

    import torch

    from torchvit import train as tt
    from torchvit.model import ViT

    # Under torchrun: one process per device, each training on its slice of every global batch
    # (DistributedDataParallel); only rank 0 writes files or prints.
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    common.check_batch_splits(recipe.batch_size, world, "processes")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        import torch.distributed as dist

        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    lead = rank == 0
    if lead:
        common.prepare_out(out)
    dtype_name = spec.options.get("dtype") or "auto"
    if dtype_name == "auto":
        dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    torch.manual_seed(recipe.seed)
    model = ViT(config).to(device)
    teacher = None
    if job.teacher is not None:  # --distill: the teacher in float32, as the Flax twin's
        tensors, teacher_config = job.teacher
        teacher = ViT(teacher_config)  # (its random init drawn after the student's)
        teacher.load_state_dict(W.canonical_to_torch(tensors, teacher_config))
        teacher.to(device)
    trainer = tt.Trainer(model, recipe, steps_per_epoch, recipe.seed,
                         dtype=getattr(torch, dtype_name), compile=bool(spec.options.get("compile")),
                         rank=rank, world=world, teacher=teacher)
    start_epoch, best = 0, {"val_acc": -1.0, "epoch": -1}
    ckpt = out / "checkpoint.safetensors"
    if args.resume:
        if not ckpt.exists():
            raise UsageError(f"{out}: no checkpoint.safetensors yet (killed before the first "
                             f"epoch ended?); start the run again without --resume")
        meta = load_checkpoint(ckpt, trainer)
        start_epoch, best = meta["epoch"] + 1, meta["best"]
        if lead:
            common.trim_metrics(out, meta["epoch"] + 1)
            print(f"resuming {out} after epoch {meta['epoch'] + 1}", file=sys.stderr)
    elif lead:
        common.start_run(out, spec, FRAMEWORK)

    if not lead:
        spec.options["quiet"] = True
    else:
        ddp = " (DistributedDataParallel)" if world > 1 else ""
        print(f"torch: {world} process(es) on {device}{ddp}, {dtype_name}, preset {spec.preset}, "
              f"{len(train_idx)} train / {len(val_idx)} val / {len(test_images)} test images",
              file=sys.stderr)
    x_all = torch.from_numpy(images[train_idx]).to(device)  # (N, 28, 28) uint8, on the device
    y_all = torch.from_numpy(labels[train_idx].astype(np.int64)).to(device)
    eval_model = ViT(config).to(device)

    def eval_weights():
        eval_model.load_state_dict(trainer.eval_state())
        return eval_model

    wall0 = time.perf_counter()
    epoch = start_epoch
    try:
        for epoch in range(start_epoch, recipe.epochs):
            t0 = time.perf_counter()
            order = torch.from_numpy(common.epoch_indices(recipe, len(train_idx), epoch,
                                                          steps_per_epoch)).to(device)
            trainer.totals = None
            bar = common.progress_bar(steps_per_epoch, epoch, recipe.epochs, spec.options.get("quiet"))
            for i in range(steps_per_epoch):
                step = epoch * steps_per_epoch + i
                idx = order[i * recipe.batch_size:(i + 1) * recipe.batch_size]
                trainer.train_step(x_all, y_all, idx, step)
                if bar is not None and (i % 20 == 19 or i == steps_per_epoch - 1):
                    loss_sum, correct, count = trainer.totals.tolist()
                    bar.set_postfix(loss=f"{loss_sum / count:.4f}", acc=f"{correct / count:.4f}",
                                    img_s=f"{count / (time.perf_counter() - t0):.0f}")
                    bar.update(i + 1 - bar.n)
            if world > 1:  # every process's (loss sum, correct, count), added up
                dist.all_reduce(trainer.totals)
            loss_sum, correct, count = trainer.totals.tolist()
            train_time = time.perf_counter() - t0
            if bar is not None:
                bar.close()
            if not np.isfinite(loss_sum):
                return common.diverged(out, epoch)
            row = common.epoch_row(epoch, loss_sum, correct, count, train_time, recipe, steps_per_epoch)
            if len(val_idx):
                probs = evaluate(eval_weights(), images[val_idx], device)
                row.update(common.val_scores(probs, labels[val_idx]))
                if row["val_acc"] > best["val_acc"]:
                    best = {"val_acc": row["val_acc"], "epoch": epoch + 1}
                    if lead:
                        W.save(out / "best.safetensors",
                               W.torch_to_canonical(trainer.eval_state()), config)
            row["wall_seconds"] = time.perf_counter() - wall0
            row["since_launch_s"] = time.time() - LAUNCH
            if world > 1:
                dist.barrier()
            if not lead:
                continue
            common.append_metrics(out, row)
            save_checkpoint(ckpt, trainer, {"epoch": epoch, "best": best, "framework": FRAMEWORK})
            common.print_epoch(row, recipe.epochs)
    except KeyboardInterrupt:
        return common.interrupted(out, epoch, FRAMEWORK)

    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
        if not lead:
            return 0
    W.save(out / "model.safetensors", W.torch_to_canonical(trainer.eval_state()), config)
    chosen = common.submission_weights(out, best, spec.options)
    tensors, _ = W.load(chosen, config)
    eval_model.load_state_dict(W.canonical_to_torch(tensors, config))
    tta = bool(spec.options.get("tta"))
    probs = evaluate(eval_model, test_images, device, tta=tta)
    data.write_submission(out / "submission.csv", probs.argmax(-1))
    tta_val_acc = None
    if tta and len(val_idx):  # what TTA gives the submission's weights on the held-out images
        val_probs = evaluate(eval_model, images[val_idx], device, tta=True)
        tta_val_acc = common.val_scores(val_probs, labels[val_idx])["val_acc"]
    common.print_done(out, len(probs), chosen.name, tta, best, time.perf_counter() - wall0,
                      tta_val_acc)
    if not spec.options.get("no_plots"):  # after the results are on disk; never fails the run
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

    import torch

    from torchvit.model import ViT

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = ViT(config).to(device)
    model.load_state_dict(W.canonical_to_torch(tensors, config))
    images, labels, test_images, _, val_idx = common.split_data(spec, dataset)
    if len(val_idx):
        probs = evaluate(model, images[val_idx], device, tta=bool(args.tta))
        acc = float(np.mean(probs.argmax(-1) == labels[val_idx]))
        print(f"val acc {acc:.4f} on {len(val_idx)} images", file=sys.stderr)
    probs = evaluate(model, test_images, device, tta=bool(args.tta))
    data.write_submission(out / "submission.csv", probs.argmax(-1))
    print(f"wrote {out / 'submission.csv'} ({len(probs)} rows)", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = common.build_parser("train/torch_main.py", "PyTorch").parse_args(argv)
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
    sys.exit(main())
