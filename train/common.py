"""What the two trainers share: the command line, the recipes, the run directory, the schedule.

Framework-neutral: the Flax trainer (train/flax_main.py) and its PyTorch twin
(train/torch_main.py) both build on this file, so they take the same options and leave the
same files behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from parity.cli import OneLineParser  # noqa: F401 (the trainers' and tools' parser)
from parity.config import PRESETS, ConfigError, ViTConfig, preset


class UsageError(ValueError):
    """A command-line value that cannot work."""


# ---- recipes: the training defaults of each preset -----------------------------------------
@dataclasses.dataclass(frozen=True)
class Recipe:
    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    sam: float = 0.0  # radius rho of sharpness-aware minimization (0: off)
    distill: float = 0.0  # share of the --teacher's answer in each target (0: off)
    distill_hard: bool = False  # that share is the teacher's top class, one-hot (DeiT's hard distillation)
    ema_decay: float = 0.0  # 0 turns the EMA off
    rotate: float = 10.0  # degrees, uniform in [-rotate, rotate]
    translate: float = 2.0  # pixels, uniform in [-translate, translate] on each axis
    scale: float = 0.1  # zoom uniform in [1 - scale, 1 + scale]
    shear: float = 0.0  # degrees
    elastic: float = 0.0  # elastic distortion strength alpha, pixels (Simard et al. 2003)
    elastic_sigma: float = 4.0  # smoothness of the elastic displacement field, pixels
    erase: float = 0.0  # probability of erasing one random rectangle of an image to black
    mixup: float = 0.0  # Beta(a, a) of mixup: blend each image with its batch partner (0: off)
    cutmix: float = 0.0  # Beta(a, a) of CutMix: paste a box of the partner in (0: off)
    clean_epochs: int = 0  # the last N epochs train on the images as they are, unaugmented
    aug_anneal: int = 0  # the warps' strength falls linearly to none over the last N augmented epochs
    repeat_aug: int = 1  # each augmented epoch takes 1/N of the images, each N times (1: off)
    val_fraction: float = 0.1
    split_seed: int = 0
    seed: int = 0


WARPS = ("rotate", "translate", "scale", "shear", "elastic")  # what --aug-anneal weakens
AUGMENTATIONS = (*WARPS, "erase", "mixup", "cutmix")


def mixes(recipe: Recipe) -> bool:
    """Whether the recipe mixes pairs of training images (and their targets) at all."""
    return recipe.mixup > 0 or recipe.cutmix > 0


def augments(recipe: Recipe) -> bool:
    """Whether the recipe augments the training images at all."""
    return any(getattr(recipe, k) > 0 for k in AUGMENTATIONS)


DEFAULT_PRESET = "cpu"
RECIPES: dict[str, Recipe] = {
    "tiny": Recipe(epochs=2, batch_size=128, lr=2e-3),
    "cpu": Recipe(epochs=22, batch_size=128, lr=2e-3, ema_decay=0.999),
    "small": Recipe(epochs=10, batch_size=128, lr=2e-3),
    "base": Recipe(epochs=30, batch_size=512, lr=1e-3),
    # 120 epochs with the stronger augmentation: 99.39% +- 0.14 on the H100 (README, plan gpu-f)
    # against 99.21% +- 0.05 for 60 epochs with the default one (plan gpu-c)
    "kaggle": Recipe(epochs=120, batch_size=512, lr=1e-3, ema_decay=0.999,
                     rotate=15.0, translate=3.0, scale=0.15),
}

RECIPE_HELP = {
    "epochs": "passes over the training split",
    "batch_size": "images per step",
    "lr": "peak learning rate (AdamW), reached after the warm-up, then cosine decay to 0",
    "weight_decay": "AdamW decoupled weight decay, on kernels only (not norms, biases, "
                    "class token or position table)",
    "warmup_epochs": "linear warm-up length, in epochs",
    "label_smoothing": "label smoothing of the cross-entropy",
    "grad_clip": "clip the global gradient norm to this (0: off)",
    "sam": "sharpness-aware minimization (Foret et al. 2021): step with the gradient taken at "
           "the weights moved this far (rho; 0.05 in the paper) along the normalized gradient, "
           "the same batch again: a second forward and backward pass a step (0: off)",
    "distill": "knowledge distillation (Hinton et al. 2015): each training target becomes "
               "(1 - DISTILL) x its label + DISTILL x the --teacher's probabilities for the same "
               "augmented image (its top class with --distill-hard true), before label "
               "smoothing (0: off; needs --teacher)",
    "distill_hard": "hard-label distillation (Touvron et al. 2021, DeiT): the teacher's share of "
                    "each target is its top class for the augmented image, one-hot, not its "
                    "probabilities (needs --distill > 0)",
    "ema_decay": "keep an exponential moving average of the weights with this decay and "
                 "evaluate it (0: off)",
    "rotate": "augmentation: max rotation in degrees (0: off)",
    "translate": "augmentation: max shift in pixels (0: off)",
    "scale": "augmentation: max zoom in or out, as a fraction (0: off)",
    "shear": "augmentation: max shear in degrees (0: off)",
    "elastic": "augmentation: elastic distortion strength alpha in pixels, a random "
               "displacement field smoothed by a Gaussian (Simard et al. 2003; 34 there; 0: off)",
    "elastic_sigma": "augmentation: width in pixels of the Gaussian that smooths the elastic "
                     "displacement field",
    "erase": "augmentation: probability of erasing one random rectangle (2-20%% of the image, "
             "aspect 0.3-3.3) to black (0: off)",
    "mixup": "augmentation: mixup (Zhang et al. 2018): each training image is blended with its "
             "partner in the batch, weight lam ~ Beta(a, a), and so are their targets; a is this "
             "(0.2-0.4 in the paper; 0: off)",
    "cutmix": "augmentation: CutMix (Yun et al. 2019): a box of the partner image, a 1 - lam "
              "share of the area with lam ~ Beta(a, a), is pasted in, and the targets mixed by "
              "area; a is this (1 in the paper; 0: off; with --mixup too, each image gets one "
              "of the two, at even odds)",
    "clean_epochs": "train the last N epochs on the images as they are, without augmentation "
                    "(the learning-rate schedule unchanged; 0: augment to the end)",
    "aug_anneal": "over the last N augmented epochs (those before --clean-epochs), the warps' "
                  "strength falls linearly from full to none: the bounds of --rotate, --translate, "
                  "--scale and --shear and the size of --elastic (not --erase, --mixup or "
                  "--cutmix; 0: full strength to the end)",
    "repeat_aug": "repeated augmentation (Hoffer et al. 2020, as in DeiT): each augmented epoch "
                  "takes 1/N of the training images, each N times in a row, so that an image's "
                  "N copies share a batch, each augmented on its own; the steps are unchanged "
                  "(1: off)",
    "val_fraction": "stratified hold-out share of train.csv scored every epoch (0: train on all)",
    "split_seed": "seed of the validation split (kept apart from --seed so that runs and "
                  "ensembles of several seeds are scored on the same held-out images)",
    "seed": "seed of the init, the data order, augmentation and dropout",
}

# Options that change nothing about the run's result, so a resume may give other values.
# (--cpu-devices changes only the order of the gradient sums, so float rounding.)
RESUMABLE_FREELY = {"data", "out", "resume", "tta", "submit_weights", "limit_test", "quiet",
                    "compile", "plots", "no_plots", "cpu_devices"}


def build_parser(prog: str, framework: str) -> argparse.ArgumentParser:
    p = OneLineParser(
        prog=prog,
        description=f"Train the {framework} ViT on Kaggle's Digit Recognizer and write "
                    f"submission.csv. Every option left out comes from the preset's recipe.",
        epilog="Parsed CSVs (both trainers) and compiled XLA programs (Flax) are cached for the "
               "next launch in $VIT_CACHE_DIR (default ~/.cache/vit-twins; VIT_CACHE_DIR=off "
               "turns it off); see train/cache.py.")
    p.add_argument("--data", default=None,
                   help="the competition download: the zip, or a folder with train.csv and "
                        "test.csv (default: ./data if present, else a 5,000-digit demo sample)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="model size and training recipe (default: cpu)")
    p.add_argument("--out", default=None, help="run directory (default: runs/<framework>-<preset>)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="continue the run in DIR from its last completed epoch")
    p.add_argument("--tta", action="store_true",
                   help="test-time augmentation: average predictions over small shifts")
    p.add_argument("--submit-weights", dest="submit_weights", default=None, choices=["best", "final"],
                   help="the weights that make the submission (and, with --tta, its validation "
                        "score): the best epoch's on the validation split (default) or the final "
                        "ones, which were never chosen on it; without a split always the final ones")
    p.add_argument("--pseudo-labels", default=None, metavar="CSV",
                   help="also train on the test.csv images labelled in CSV (columns ImageId,Label: "
                        "a submission.csv, or what train/ensemble.py --pseudo-labels writes); "
                        "the validation split is untouched")
    p.add_argument("--teacher", default=None, metavar="FILE",
                   help="a trained model's canonical .safetensors (any size; a run's "
                        "model.safetensors) to distill from, with --distill")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16"],
                   help="compute dtype (auto: bfloat16 on a GPU, float32 on CPU); weights "
                        "stay float32")
    p.add_argument("--eval-only", action="store_true",
                   help="no training: evaluate --checkpoint on the validation split and write "
                        "the submission")
    p.add_argument("--checkpoint", default=None, help="canonical .safetensors for --eval-only")
    p.add_argument("--limit-train", type=_count, default=None, metavar="N",
                   help="use only the first N rows of train.csv (smoke tests)")
    p.add_argument("--limit-test", type=_count, default=None, metavar="N",
                   help="predict only the first N rows of test.csv (smoke tests)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-plots", dest="no_plots", action="store_true",
                   help="do not draw the run's pictures into OUT/plots at the end (see "
                        "python -m train.plots)")
    p.add_argument("--compile", action="store_true",
                   help="PyTorch trainer only: torch.compile the model (Flax always jits)")
    p.add_argument("--cpu-devices", type=_count, default=None, metavar="N",
                   help="Flax trainer only, on a CPU: split each batch over N XLA CPU devices, "
                        "data-parallel (default: 2 on a machine with 2+ cores when the batch "
                        "splits in two, else 1; one device leaves part of 2 cores idle)")
    add_recipe_options(p, "the preset's recipe")
    add_config_options(p)
    return p


def add_recipe_options(p: argparse.ArgumentParser, defaults: str) -> None:
    """--<field> for each Recipe field (--epochs, --rotate, ...): each overrides the default's."""
    rec = p.add_argument_group(f"training recipe (defaults: {defaults})")
    for f in dataclasses.fields(Recipe):
        rec.add_argument("--" + f.name.replace("_", "-"), type=_option_type(f), default=None,
                         help=RECIPE_HELP[f.name])


def add_config_options(p: argparse.ArgumentParser) -> None:
    """--<field> for each ViTConfig field (--patch-size, --spt, ...): each overrides the preset's."""
    cfg = p.add_argument_group("model config overrides (defaults: the preset)")
    for f in dataclasses.fields(ViTConfig):
        cfg.add_argument("--" + f.name.replace("_", "-"), type=_option_type(f), default=None,
                         help=f"ViTConfig.{f.name}")


def config_from_options(name: str, args: argparse.Namespace) -> ViTConfig:
    """The preset `name` with the config fields given on the command line; refuses bad ones."""
    given = vars(args)
    try:
        return preset(name, **{f.name: given[f.name] for f in dataclasses.fields(ViTConfig)
                               if given.get(f.name) is not None})
    except (ConfigError, TypeError) as e:
        raise UsageError(str(e)) from None


def _count(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}")
    return n


def _option_type(field: dataclasses.Field):
    """The argparse type of a Recipe or ViTConfig field's option (annotations are strings here)."""
    return {"int": int, "float": float, "bool": _bool}.get(str(field.type), str)


def _bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


@dataclasses.dataclass
class Run:
    """Everything that fixes a run: the model config, the recipe and the plumbing options."""

    preset: str
    config: ViTConfig
    recipe: Recipe
    options: dict[str, Any]

    def to_json(self, framework: str) -> str:
        return json.dumps({"framework": framework, "preset": self.preset,
                           "model": self.config.to_dict(),
                           "recipe": dataclasses.asdict(self.recipe),
                           "options": self.options}, indent=2, sort_keys=True)


def resolve_run(args: argparse.Namespace) -> Run:
    """The effective run from the parsed options; refuses impossible values."""
    name = args.preset or DEFAULT_PRESET
    given = vars(args)
    recipe_fields = {f.name for f in dataclasses.fields(Recipe)}
    config_fields = {f.name for f in dataclasses.fields(ViTConfig)}
    recipe = dataclasses.replace(RECIPES[name], **{k: given[k] for k in recipe_fields
                                                    if given.get(k) is not None})
    config = config_from_options(name, args)
    check_recipe(recipe)
    options = {k: v for k, v in given.items() if k not in recipe_fields | config_fields}
    return Run(name, config, recipe, options)


def check_recipe(r: Recipe) -> None:
    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise UsageError(msg)

    for field in dataclasses.fields(r):  # inf and nan pass the comparisons below; refuse them first
        value = getattr(r, field.name)
        need(not isinstance(value, float) or math.isfinite(value),
             f"--{field.name.replace('_', '-')} must be a finite number, got {value}")
    need(r.epochs >= 1, f"--epochs must be at least 1, got {r.epochs}")
    need(r.batch_size >= 1, f"--batch-size must be at least 1, got {r.batch_size}")
    need(r.lr > 0, f"--lr must be a positive number, got {r.lr}")
    need(r.weight_decay >= 0, f"--weight-decay must be >= 0, got {r.weight_decay}")
    need(r.warmup_epochs >= 0, f"--warmup-epochs must be >= 0, got {r.warmup_epochs}")
    need(0 <= r.label_smoothing < 1, f"--label-smoothing must be in [0, 1), got {r.label_smoothing}")
    need(r.grad_clip >= 0, f"--grad-clip must be >= 0, got {r.grad_clip}")
    need(r.sam >= 0, f"--sam must be >= 0, got {r.sam}")
    need(0 <= r.distill <= 1, f"--distill must be in [0, 1], got {r.distill}")
    need(not r.distill_hard or r.distill > 0, "--distill-hard needs --distill > 0 (the teacher's "
         "share of each target)")
    need(0 <= r.ema_decay < 1, f"--ema-decay must be in [0, 1), got {r.ema_decay}")
    need(0 <= r.val_fraction < 1, f"--val-fraction must be in [0, 1), got {r.val_fraction}")
    for k in WARPS:
        need(getattr(r, k) >= 0, f"--{k} must be >= 0, got {getattr(r, k)}")
    need(r.scale < 1, f"--scale must be < 1, got {r.scale}")
    need(r.elastic_sigma > 0, f"--elastic-sigma must be > 0, got {r.elastic_sigma}")
    need(0 <= r.erase <= 1, f"--erase must be in [0, 1], got {r.erase}")
    for k in ("mixup", "cutmix"):
        need(getattr(r, k) >= 0, f"--{k} must be >= 0, got {getattr(r, k)}")
    need(not mixes(r) or r.batch_size % 2 == 0,
         f"--mixup and --cutmix mix pairs of images: --batch-size must be even, got {r.batch_size}")
    need(0 <= r.clean_epochs <= r.epochs,
         f"--clean-epochs must be in [0, --epochs ({r.epochs})], got {r.clean_epochs}")
    need(0 <= r.aug_anneal <= r.epochs - r.clean_epochs,
         f"--aug-anneal must be in [0, --epochs - --clean-epochs ({r.epochs - r.clean_epochs})], "
         f"got {r.aug_anneal}")
    need(r.aug_anneal == 0 or any(getattr(r, k) > 0 for k in WARPS),
         "--aug-anneal weakens the warps (--rotate, --translate, --scale, --shear, --elastic); "
         "this recipe has none")
    need(r.repeat_aug >= 1, f"--repeat-aug must be at least 1, got {r.repeat_aug}")
    need(r.repeat_aug == 1 or augments(r),
         "--repeat-aug repeats images to augment each copy on its own; this recipe augments nothing")


def resumed_run(run_dir: Path, args: argparse.Namespace, framework: str) -> Run:
    """The run stored in run_dir; refuses options given now that differ from it."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.json); nothing to resume")
    try:
        stored = json.loads(path.read_text())
        config = ViTConfig.from_dict(stored["model"])
        recipe = Recipe(**stored["recipe"])
        name, options = stored["preset"], dict(stored["options"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, ConfigError) as e:
        raise UsageError(f"{path}: unreadable run config ({e})") from None
    if stored.get("framework") != framework:
        raise UsageError(f"{run_dir}: a {stored.get('framework')} run; resume it with that "
                         f"framework's trainer")
    differ = []
    given = vars(args)
    for k, v in given.items():
        if v is None or v is False or k in RESUMABLE_FREELY:
            continue
        old = (getattr(recipe, k) if hasattr(recipe, k) else getattr(config, k)
               if hasattr(config, k) else options.get(k, stored.get(k)))
        if old != v:
            differ.append(f"{k.replace('_', '-')} (run: {old}, now: {v})")
    if differ:
        raise UsageError(f"{run_dir} was started with another config; these differ: "
                         + ", ".join(differ))
    options.update({k: given[k] for k in RESUMABLE_FREELY if given.get(k) not in (None, False)})
    return Run(name, config, recipe, options)


# ---- the learning-rate schedule ------------------------------------------------------------
def augmented_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """Steps 0 .. this - 1 augment their batch (when the recipe augments at all); the steps of
    the last --clean-epochs epochs train on the images as they are."""
    return (recipe.epochs - recipe.clean_epochs) * steps_per_epoch


def annealed_steps(recipe: Recipe, steps_per_epoch: int) -> int:
    """Over this many steps before augmented_steps, --aug-anneal weakens the warps to none."""
    return recipe.aug_anneal * steps_per_epoch


def warp_strength(step, aug_steps: int, anneal_steps: int, clip=lambda v: min(max(v, 0.0), 1.0)):
    """The share of the warps' full strength at `step` under --aug-anneal (anneal_steps > 0):
    1 until the last anneal_steps augmented steps, then falling linearly to 1 / anneal_steps
    at the last one. `clip` keeps it in [0, 1]; the Flax twin passes jnp's, for a traced step."""
    return clip((aug_steps - step) / anneal_steps)


def epoch_indices(recipe: Recipe, num: int, epoch: int, steps_per_epoch: int):
    """The positions in the training split (of `num` images) that epoch `epoch` trains on, batch
    after batch: steps_per_epoch full batches. --repeat-aug repeats images in the augmented
    epochs only: a clean epoch would see the same image N times over."""
    from train import data

    repeats = recipe.repeat_aug if epoch < recipe.epochs - recipe.clean_epochs else 1
    return data.epoch_order(num, recipe.seed, epoch, repeats)[: steps_per_epoch * recipe.batch_size]


def schedule_steps(recipe: Recipe, steps_per_epoch: int) -> tuple[int, int]:
    """(warm-up steps, total steps) of a run; warm-up at least 1 step, total past warm-up."""
    warmup = max(1, int(round(recipe.warmup_epochs * steps_per_epoch)))
    return warmup, max(recipe.epochs * steps_per_epoch, warmup + 1)


def lr_at(step: int, peak: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warm-up from 0 to peak, then cosine decay to 0 (= optax.warmup_cosine_decay_schedule)."""
    if step < warmup_steps:
        return peak * step / warmup_steps
    progress = min((step - warmup_steps) / max(total_steps - warmup_steps, 1), 1.0)
    return peak * 0.5 * (1.0 + math.cos(math.pi * progress))


# ---- files ---------------------------------------------------------------------------------
def atomic_write(path: Path, write: Callable[[BinaryIO], Any]) -> None:
    """write(f) fills a temporary file beside path, which is renamed into place once whole and
    on disk: a reader sees the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def prepare_out(out: Path) -> None:
    """Create the run directory, or fail with a one-line reason if it cannot be written."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{out}: cannot write the run directory ({e.strerror or e})") from None


# What a run writes into its directory besides config.json. A new run in a directory that holds
# an older one removes these first, so that nothing of the older run (its best weights, its
# checkpoint, which --resume would take up) passes for the new run's.
RUN_FILES = ("checkpoint.safetensors", "best.safetensors", "model.safetensors", "metrics.jsonl",
             "submission.csv", "summary.json", "tta_views.npz", "plots")


def start_run(out: Path, spec: Run, framework: str) -> None:
    """Write a new run's config.json into `out`, after removing what an older run left there."""
    import shutil

    def remove(path: Path) -> None:
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)

    older = [name for name in RUN_FILES if (out / name).exists()]
    if older:
        print(f"{out}: replacing the older run there ({', '.join(older)})", file=sys.stderr)
    for path in [out / name for name in older] + list(out.glob(".*.tmp-*")):  # .tmp-*: what an
        remove(path)  # older run was writing when it was killed
    atomic_write_text(out / "config.json", spec.to_json(framework))


def append_metrics(out: Path, row: dict[str, Any]) -> None:
    with open(out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def trim_metrics(out: Path, last_epoch: int) -> None:
    """Keep the metric lines of epochs 1..last_epoch (a kill may fall between the two writes)."""
    path = out / "metrics.jsonl"
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["epoch"] <= last_epoch:
                keep.append(line)
        except (json.JSONDecodeError, KeyError, TypeError):
            continue  # a torn last line
    atomic_write_text(path, "".join(line + "\n" for line in keep))


def pause_for_tests(point: str) -> None:
    """Sleep at a named point when VIT_TEST_PAUSE=point:seconds: lets the tests kill a real run
    at a chosen moment (mid-checkpoint-write). Does nothing otherwise."""
    spec = os.environ.get("VIT_TEST_PAUSE", "")
    if spec.startswith(point + ":"):
        import time

        time.sleep(float(spec.split(":", 1)[1]))


def check_checkpoint_meta(meta, path: Path) -> None:
    """Refuse a checkpoint whose header lacks the record a resume reads (epoch, best score)."""
    from parity import weights as W

    if not (isinstance(meta, dict) and isinstance(meta.get("epoch"), int)
            and isinstance(meta.get("best"), dict) and "val_acc" in meta["best"]):
        raise W.WeightsError(f"{path}: a checkpoint without its epoch and best score (not this trainer's?)")


def check_eval_config(args: argparse.Namespace, asked: ViTConfig, stored: ViTConfig) -> None:
    """--eval-only takes the model from the checkpoint's own config; a --preset or model option
    given beside it must describe that model, or it is refused rather than silently ignored."""
    named = args.preset is not None or any(getattr(args, f.name, None) is not None
                                           for f in dataclasses.fields(ViTConfig))
    differ = [f"{f.name} (checkpoint: {getattr(stored, f.name)}, options: {getattr(asked, f.name)})"
              for f in dataclasses.fields(ViTConfig) if getattr(stored, f.name) != getattr(asked, f.name)]
    if named and differ:
        raise UsageError(f"--checkpoint holds another model than the options name: {', '.join(differ)}; "
                         f"--eval-only takes the checkpoint's, so leave the model options out")


# ---- what both trainers do before training --------------------------------------------------
def open_run(args: argparse.Namespace, framework: str) -> tuple[Run, Path]:
    """The run to do and its directory: a resumed one (its stored config) or a new one."""
    if args.checkpoint and not args.eval_only:
        raise UsageError("--checkpoint is read only by --eval-only (to continue a run: --resume DIR)")
    if args.eval_only:  # it scores --checkpoint as it is: refuse the inputs only training reads
        unused = [f"--{k.replace('_', '-')}"
                  for k in ("resume", "pseudo_labels", "teacher", "submit_weights") if getattr(args, k)]
        if unused:
            raise UsageError(f"--eval-only scores --checkpoint as it is; only training reads "
                             f"{', '.join(unused)}")

    if args.resume is not None and not args.resume.strip():  # an empty shell variable, say
        raise UsageError("--resume needs a run directory, got an empty string")
    if args.resume:
        out = Path(args.resume)
        return resumed_run(out, args, framework), out
    spec = resolve_run(args)
    return spec, Path(args.out or f"runs/{framework}-{spec.preset}")


@dataclasses.dataclass
class Job:
    """The data of a run, split and checked; nothing written yet."""

    dataset: Any  # train.data.Dataset
    images: Any  # (N, 28, 28) uint8, train.csv rows (after --limit-train)
    labels: Any  # (N,) int32
    test_images: Any  # (M, 28, 28) uint8 (after --limit-test)
    train_idx: Any
    val_idx: Any
    steps_per_epoch: int
    teacher: Any = None  # (canonical tensors, ViTConfig) of --teacher, (Flax params, CNNConfig)
    # of a CNN --teacher (train/cnn.py; the Flax trainer only), or None


def split_data(spec: Run, dataset) -> tuple[Any, Any, Any, Any, Any]:
    """-> (images, labels, test images, train indices, validation indices) of the run."""
    from train import data

    images, labels = dataset.train_images, dataset.train_labels
    if spec.options.get("limit_train"):
        images, labels = images[: spec.options["limit_train"]], labels[: spec.options["limit_train"]]
    test_images = dataset.test_images[: spec.options.get("limit_test") or None]
    train_idx, val_idx = data.stratified_split(labels, spec.recipe.val_fraction, spec.recipe.split_seed)
    return images, labels, test_images, train_idx, val_idx


def add_pseudo_labels(spec: Run, dataset, images, labels, train_idx):
    """Append the pseudo-labelled test images to the training split (--pseudo-labels).

    They go after train.csv's rows, so the validation indices keep pointing at the same
    held-out digits. The file's SHA-256 is kept in the run's options: a resume refuses a file
    that changed. -> (images, labels, train indices)."""
    import numpy as np

    from train import data

    path = Path(spec.options["pseudo_labels"])
    rows, pseudo = data.read_pseudo_labels(path, len(dataset.test_images))
    check_unchanged(spec, "pseudo_labels_sha256", path, f"{path}: the pseudo-label file")
    print(f"pseudo-labels: {len(rows)} test images from {path} join the training split",
          file=sys.stderr)
    first = len(images)
    return (np.concatenate([images, dataset.test_images[rows]]),
            np.concatenate([labels, pseudo]),
            np.concatenate([train_idx, first + np.arange(len(rows))]))


def load_job(args: argparse.Namespace, spec: Run, framework: str) -> Job:
    """Load and check everything that can be refused, before anything is written."""
    from train import data

    dataset = data.resolve(spec.options.get("data"))
    if dataset.demo and args.epochs is None and not args.resume:
        # 3,600 images make short epochs: twice the preset's epochs, still under 3 CPU minutes.
        spec.recipe = dataclasses.replace(spec.recipe, epochs=2 * spec.recipe.epochs)
    if dataset.demo:
        print(f"DEMO: no --data given and no ./data found, so this trains on {dataset.source} "
              f"(5,000 real MNIST digits). For the competition, {data.GET_THE_DATA}.",
              file=sys.stderr)
    c = spec.config
    if (c.image_height, c.image_width, c.channels) != (28, 28, 1):
        raise UsageError(f"the digits are 28x28x1; the config asks for "
                         f"{c.image_height}x{c.image_width}x{c.channels}")
    if c.num_classes != 10:
        raise UsageError(f"the digits are 10 classes; the config asks for --num-classes {c.num_classes}")
    images, labels, test_images, train_idx, val_idx = split_data(spec, dataset)
    check_same_data(spec, images, labels)
    if spec.options.get("pseudo_labels"):
        images, labels, train_idx = add_pseudo_labels(spec, dataset, images, labels, train_idx)
    steps_per_epoch = len(train_idx) // spec.recipe.batch_size
    if steps_per_epoch == 0:
        raise UsageError(f"--batch-size {spec.recipe.batch_size} is larger than the training split "
                         f"({len(train_idx)} images)")
    return Job(dataset, images, labels, test_images, train_idx, val_idx, steps_per_epoch,
               load_teacher(spec, framework))


def load_teacher(spec: Run, framework: str):
    """The --teacher's weights and config for --distill, checked; None without distillation.
    A ViT's canonical file teaches either trainer; a CNN's (train/cnn_main.py) the Flax one.
    Its SHA-256 is kept in the run's options: a resume refuses a file that changed."""
    from parity import weights as W

    path, share = spec.options.get("teacher"), spec.recipe.distill
    if (path is None) != (share == 0):
        raise UsageError("--distill and --teacher go together: --distill > 0 needs a --teacher "
                         "file, and a --teacher is used only with --distill > 0")
    if path is None:
        return None
    if not Path(path).is_file():
        raise UsageError(f"--teacher {path}: no such file")
    if W.file_format(path) == "cnn/1":  # train/cnn.py's FORMAT, read without importing JAX
        if framework != "flax":
            raise UsageError(f"--teacher {path}: a CNN's weights (train/cnn_main.py); only the Flax "
                             f"trainer distills from a CNN")
        from train import cnn

        try:
            tensors, config = cnn.load(path)
        except cnn.CNNError as e:
            raise UsageError(f"--teacher {e}") from None
        channels = 1  # a CNN takes one input channel
    else:
        tensors, config = W.load(path)
        channels = config.channels
    if (config.image_height, config.image_width, channels, config.num_classes) != (28, 28, 1, 10):
        raise UsageError(f"--teacher {path}: a model of {config.image_height}x{config.image_width}x"
                         f"{channels} images and {config.num_classes} classes, not the digits'")
    check_unchanged(spec, "teacher_sha256", Path(path), f"--teacher {path}: the file")
    return tensors, config


def check_same_data(spec: Run, images, labels) -> None:
    """Keep the SHA-256 of the training rows (train.csv's, after --limit-train) in the run's
    options; on a resume, refuse other data (another split, other epochs: another run)."""
    from train import data

    digest = data.train_digest(images, labels)
    if spec.options.setdefault("train_sha256", digest) != digest:
        raise UsageError(f"--data {spec.options.get('data')}: its train.csv is not the one this run "
                         f"started with; resume with that data")


def check_unchanged(spec: Run, key: str, path: Path, what: str) -> None:
    """Keep the SHA-256 of an input file in the run's options under `key`; on a resume, refuse
    a file that changed since the run started."""
    from train import data

    digest = data.digest([path])
    if spec.options.setdefault(key, digest) != digest:
        raise UsageError(f"{what} changed since the run started; resume with the file it started with")


def progress_bar(total: int, epoch: int, epochs: int, quiet: bool):
    """A tqdm bar for one epoch on stderr, or None when quiet."""
    if quiet:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=f"epoch {epoch + 1}/{epochs}", unit="step", leave=False,
                file=sys.stderr, mininterval=0.5)


def fail(message: str) -> None:
    """One line on stderr, exit status 2."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


# ---- the epoch loop's bookkeeping, the same in both trainers ----------------------------------
def check_batch_splits(batch_size: int, parts: int, what: str) -> None:
    """Refuse a global batch that does not split evenly over `parts` devices or processes."""
    if batch_size % parts:
        fits = [b for b in (batch_size // parts * parts, (batch_size // parts + 1) * parts) if b > 0]
        raise UsageError(f"--batch-size {batch_size} does not split evenly over {parts} {what}; "
                         f"use a multiple of {parts}, such as {' or '.join(map(str, fits))}")


def diverged(out: Path, epoch: int) -> int:
    """Say that the loss of epoch `epoch` (0-based) went non-finite; -> exit status 3."""
    kept = (f"{out} keeps the epoch {epoch} checkpoint" if epoch > 0
            else "there is no checkpoint yet (first epoch)")
    print(f"error: the loss became non-finite in epoch {epoch + 1}; stopping. {kept}; "
          "try a lower --lr", file=sys.stderr)
    return 3


def epoch_row(epoch: int, loss_sum, correct, count, train_time: float, recipe: Recipe,
              steps_per_epoch: int) -> dict[str, Any]:
    """The training half of an epoch's metrics.jsonl line (epoch is 0-based)."""
    return {"epoch": epoch + 1, "train_loss": float(loss_sum / count),
            "train_acc": float(correct / count),
            "lr": float(lr_at((epoch + 1) * steps_per_epoch - 1, recipe.lr,
                              *schedule_steps(recipe, steps_per_epoch))),
            "img_per_s": float(count / train_time), "epoch_seconds": train_time}


def val_scores(probs, labels) -> dict[str, float]:
    """Validation loss and accuracy of class probabilities (N, K) against labels (N,)."""
    import numpy as np

    return {"val_loss": float(-np.mean(np.log(probs[np.arange(len(labels)), labels] + 1e-12))),
            "val_acc": float(np.mean(probs.argmax(-1) == labels))}


def print_epoch(row: dict[str, Any], epochs: int) -> None:
    val = f", val acc {row['val_acc']:.4f}" if "val_acc" in row else ""
    print(f"epoch {row['epoch']}/{epochs}: loss {row['train_loss']:.4f}, "
          f"train acc {row['train_acc']:.4f}{val}, {row['img_per_s']:.0f} img/s", file=sys.stderr)


# the x86 vector extensions XLA:CPU generates code for: its float rounding follows them
CPU_ISA = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_tile")


def environment() -> dict[str, Any]:
    """What the run ran on: the CPU and its vector extensions, the Python and library versions,
    XLA's flags. Two runs of one command and seed repeat each other to the bit on one machine
    and set of libraries; on a CPU with other vector extensions they do not, since XLA:CPU
    compiles to the widest the CPU has and the sums round differently (docs/results.md,
    "Reproducibility")."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    cpu, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
        cpu = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                    if line.startswith("model name")), cpu)
        flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines()
                          if line.startswith("flags")), []))
    except OSError:
        pass
    libraries = {}
    for name in ("jax", "jaxlib", "flax", "optax", "torch", "numpy"):
        try:
            libraries[name] = version(name)
        except PackageNotFoundError:
            libraries[name] = None
    return {"cpu": cpu, "cpu_isa": [x for x in CPU_ISA if x in flags], "cpu_count": os.cpu_count(),
            "python": platform.python_version(),
            **libraries, "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", "")}  # train/malloc.py


def submission_weights(out: Path, best: dict[str, Any], options: dict[str, Any]) -> Path:
    """The file the submission comes from: best.safetensors if there was a validation split and
    --submit-weights is not `final`, else model.safetensors (the weights at the end)."""
    if best["epoch"] > 0 and options.get("submit_weights") != "final":
        return out / "best.safetensors"
    return out / "model.safetensors"


def print_done(out: Path, rows: int, weights: str, tta: bool, best: dict[str, Any],
               seconds: float, tta_val_acc: float | None = None) -> None:
    """The run's last line: where the submission is, from which weights, the best epoch, and
    with --tta the validation accuracy of the submission's weights with TTA; the same in
    summary.json, with the environment the run ended in."""
    score = (f"best val acc {best['val_acc']:.4f} at epoch {best['epoch']}" if best["epoch"] > 0
             else "no validation images (--val-fraction 0, or too few rows for one)")
    if tta_val_acc is not None:
        score += f", {tta_val_acc:.4f} with TTA"
    scored = best["epoch"] > 0
    summary = {"submission_weights": weights, "tta": tta,
               "best_val_acc": best["val_acc"] if scored else None,
               "best_epoch": best["epoch"] if scored else None,
               "tta_val_acc": tta_val_acc, "seconds": seconds, "environment": environment()}
    atomic_write_text(out / "summary.json", json.dumps(summary, indent=1) + "\n")
    print(f"wrote {out / 'submission.csv'} ({rows} rows, weights: {weights}"
          f"{', TTA' if tta else ''}); {score}; {seconds:.0f} s", file=sys.stderr)


def interrupted(out: Path, epoch: int, framework: str) -> int:
    """Say where a Ctrl-C (or SIGTERM) in epoch `epoch` (0-based) left the run; -> exit status 130."""
    if (out / "checkpoint.safetensors").exists():
        print(f"\ninterrupted in epoch {epoch + 1}; {out} holds the run after epoch {epoch}. Resume "
              f"with: python train/{framework}_main.py --resume {out}", file=sys.stderr)
    else:
        print(f"\ninterrupted in epoch {epoch + 1}, before any checkpoint was written: nothing to "
              f"resume; start the run again", file=sys.stderr)
    return 130


def stop_on_sigterm() -> None:
    """Make SIGTERM (a job scheduler's, `kill`'s) stop a trainer as Ctrl-C does: files being written
    are removed half-written, and the run says where it stands."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
