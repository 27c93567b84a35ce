"""Pictures of a finished run: position table, patches, curves, confusion, mistakes, attention.

    python -m train.plots runs/flax-cpu [--data digit-recognizer.zip] [--compare runs/torch-cpu]

Reads the run directory (config.json, metrics.jsonl, best.safetensors or model.safetensors) and
writes into <run>/plots/ (or --out):

  posemb.png      the position table in use (tokens x dimensions) and the cosine similarity of
                  each patch position's embedding with every other one, on the patch grid
                  (the ViT paper's figure 7)
  patches.png     one validation digit cut into its patches, on the patch grid
  curves.png      loss and accuracy per epoch, train and validation, from metrics.jsonl
  confusion.png   the confusion matrix on the run's validation split
  mistakes.png    the validation digits the model gets wrong, most confident first
  attention.png   attention rollout (Abnar & Zuidema 2020) over a few validation digits
  plots.json      the numbers behind the pictures (confusion matrix, curves, mistakes, ...)

and, with --compare, curves-compare.png: the training curves of several runs overlaid.
Digits are named by their 0-based index among train.csv's rows ("train.csv #i"), as in
plots.json. Every PNG is FIGSIZE[name] * DPI pixels.

The model is run by the run's own framework (Flax or PyTorch) through the trainer's own
evaluation function, so the confusion matrix agrees exactly with the validation accuracy
the trainer logged for the plotted weights. The trainers call `draw_safely` at the end of a
run (skip it with --no-plots); a failure there is a warning, never a failed run.
matplotlib (Agg canvas, no pyplot) and the frameworks are imported only when drawing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from parity import reference
from parity import weights as W
from parity.config import ConfigError, ViTConfig
from train import common, data

DPI = 100
# Figure sizes in inches; every PNG is exactly FIGSIZE[name] * DPI pixels (no tight bbox).
FIGSIZE: dict[str, tuple[float, float]] = {
    "posemb": (12.0, 5.0),
    "patches": (9.0, 4.5),
    "curves": (11.0, 4.5),
    "confusion": (7.0, 6.0),
    "mistakes": (8.0, 9.0),
    "attention": (9.0, 10.0),
    "curves-compare": (11.0, 4.5),
}
PICTURES = ("posemb", "patches", "curves", "confusion", "mistakes", "attention")
MAX_MISTAKES = 16  # a 4 x 4 grid
ATTENTION_DIGITS = 4
CURVE_KEYS = ("train_loss", "val_loss", "train_acc", "val_acc")


class PlotError(ValueError):
    """A run directory (or data) that cannot be drawn; the message is one line."""


# ---- reading a run -------------------------------------------------------------------------
def read_run(run_dir: str | os.PathLike) -> tuple[dict[str, Any], ViTConfig]:
    """config.json of a run directory -> (the stored run, its model config)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise PlotError(f"{run_dir}: no such run directory")
    path = run_dir / "config.json"
    if not path.is_file():
        raise PlotError(f"{run_dir}: not a run directory (no config.json)")
    try:
        run = json.loads(path.read_text())
        config = ViTConfig.from_dict(run["model"])
        if "val_fraction" not in run["recipe"] or not isinstance(run["options"], dict):
            raise KeyError("recipe.val_fraction or options")
    except (json.JSONDecodeError, KeyError, TypeError, ConfigError) as e:
        raise PlotError(f"{path}: unreadable run config ({e})") from None
    return run, config


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of metrics.jsonl, one per epoch; refuses a missing, empty or damaged file."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir}: no metrics.jsonl (the run has not finished an epoch)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
            for key in ("epoch", "train_loss", "train_acc"):
                float(row[key])
        except (ValueError, KeyError, TypeError) as e:
            raise PlotError(f"{path}: line {n} is not a metrics row ({e})") from None
        rows.append(row)
    if not rows:
        raise PlotError(f"{path}: holds no epochs")
    return rows


def curves_of(rows: list[dict[str, Any]]) -> dict[str, list[float]]:
    """metrics rows -> {"epoch": [...], "train_loss": [...], ...}; val columns only if logged."""
    out: dict[str, list[float]] = {"epoch": [int(r["epoch"]) for r in rows]}
    for key in CURVE_KEYS:
        if all(key in r for r in rows):
            out[key] = [float(r[key]) for r in rows]
    return out


def weights_path(run_dir: Path) -> Path:
    """The weights the trainer wrote the submission with: those summary.json names (a finished
    run's), else best.safetensors, else model.safetensors."""
    try:
        named = json.loads((run_dir / "summary.json").read_text())["submission_weights"]
    except (OSError, ValueError, KeyError, TypeError):
        named = None
    if named in ("best.safetensors", "model.safetensors") and (run_dir / named).is_file():
        return run_dir / named
    for name in ("best.safetensors", "model.safetensors"):
        if (run_dir / name).is_file():
            return run_dir / name
    raise PlotError(f"{run_dir}: holds no weights (no best.safetensors or model.safetensors)")


def run_label(run_dir: str | os.PathLike) -> str:
    """How a run is named in a legend: its framework and directory name."""
    try:
        framework = json.loads((Path(run_dir) / "config.json").read_text()).get("framework", "?")
    except (OSError, json.JSONDecodeError, AttributeError):
        framework = "?"
    return f"{framework} {Path(run_dir).resolve().name}"


# ---- the maths behind the pictures -----------------------------------------------------------
def rollout(attentions: list[np.ndarray]) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020): per layer average the heads, add the identity
    (the residual path), renormalize the rows, and multiply the layers together, first layer
    on the right. [(B, heads, T, T)] * L -> (B, T, T): how much each output token draws on each
    input token through the whole encoder."""
    result = None
    for weights in attentions:
        a = np.asarray(weights, np.float64).mean(axis=1)  # (B, T, T)
        a = a + np.eye(a.shape[-1])[None]
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else a @ result
    return result


def rollout_to_patches(joint: np.ndarray, config: ViTConfig) -> np.ndarray:
    """(B, T, T) rollout -> (B, rows, cols): from the class token to each patch under cls
    pooling, the mean over the output tokens under gap pooling (what the head sees)."""
    if config.pool == "cls":
        maps = joint[:, 0, 1:]  # (B, N)
    else:
        maps = joint.mean(axis=1)  # (B, N)
    return maps.reshape(-1, *config.grid)


def posemb_table(config: ViTConfig, tensors: dict[str, np.ndarray]) -> np.ndarray:
    """The position table the model adds, (T, D): learned from the weights, else computed."""
    if config.posemb == "learned":
        return np.asarray(tensors["pos_embed"][0], np.float64)
    return np.asarray(reference.posemb(config), np.float64)


def patch_similarity(table: np.ndarray, config: ViTConfig) -> np.ndarray:
    """Cosine similarity of each patch position's embedding with every other one, on the grid:
    (rows, cols, rows, cols), [i, j] the map of patch (i, j). The class token's row is skipped."""
    patches = table[1:] if config.pool == "cls" else table  # (N, D)
    unit = patches / np.maximum(np.linalg.norm(patches, axis=1, keepdims=True), 1e-12)
    return (unit @ unit.T).reshape(*config.grid, *config.grid)


def confusion_matrix(labels: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    """(classes, classes) counts, rows the true label, columns the prediction."""
    matrix = np.zeros((classes, classes), np.int64)
    np.add.at(matrix, (labels, predicted), 1)
    return matrix


def mosaic(tiles: np.ndarray, grid: tuple[int, int], gap: int = 1) -> np.ndarray:
    """(rows*cols, h, w) tiles -> one image with the tiles on the grid and NaN gaps between."""
    rows, cols = grid
    h, w = tiles.shape[1:]
    out = np.full((rows * (h + gap) - gap, cols * (w + gap) - gap), np.nan)
    for n, tile in enumerate(tiles):
        r, c = divmod(n, cols)
        out[r * (h + gap): r * (h + gap) + h, c * (w + gap): c * (w + gap) + w] = tile
    return out


# ---- the model, run by the run's framework ---------------------------------------------------
class _Model:
    """The run's weights. `probs(images)`: class probabilities through the trainer's own
    evaluation function (so they match its logged accuracy exactly); `attention(images)`:
    (probabilities, [attention weights (B, heads, T, T) of each block]) from one forward pass
    with the intermediates captured."""

    def __init__(self, framework: str, config: ViTConfig, tensors: dict[str, np.ndarray]):
        self.config = config
        if framework == "torch":
            self._torch(tensors)
        else:
            self._flax(tensors)

    def _flax(self, tensors):
        import jax
        import jax.numpy as jnp

        from jaxvit import train as jt
        from jaxvit.model import ViT
        from train.flax_main import evaluate

        model = ViT(self.config)
        params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(tensors, self.config))
        predict = jt.make_predict(model, tta=False)

        @jax.jit
        def capture(params, images):
            logits, out = model.apply({"params": params}, jt.normalize(jt.to_unit(images)), capture=True)
            return jax.nn.softmax(logits), [out[f"blocks.{i}.attn"] for i in range(self.config.depth)]

        def attention(images):
            probs, weights = jax.device_get(capture(params, images))
            return np.asarray(probs), [np.asarray(a) for a in weights]

        self.probs = lambda images: evaluate(predict, params, images)
        self.attention = attention

    def _torch(self, tensors):
        import torch

        from torchvit import train as tt
        from torchvit.model import ViT
        from train.torch_main import evaluate

        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = ViT(self.config).to(device)
        model.load_state_dict(W.canonical_to_torch(tensors, self.config))
        model.eval()

        def attention(images):
            with torch.no_grad():
                x = tt.normalize(tt.to_unit(torch.from_numpy(images).to(device)))
                logits, out = model(x, capture=True)
            return (logits.float().softmax(-1).cpu().numpy(),
                    [out[f"blocks.{i}.attn"].float().cpu().numpy() for i in range(self.config.depth)])

        self.probs = lambda images: evaluate(model, images, device)
        self.attention = attention


# ---- drawing --------------------------------------------------------------------------------
def _figure(name: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=FIGSIZE[name], dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _cmap(name: str, bad: str = "white"):
    import matplotlib

    return matplotlib.colormaps[name].with_extremes(bad=bad)


def _grid_ticks(ax, grid: tuple[int, int], cell: int, gap: int) -> None:
    """Ticks at the centre of each cell of a mosaic, numbered from 1."""
    rows, cols = grid
    step = cell + gap
    ax.set_xticks([c * step + (cell - 1) / 2 for c in range(cols)], [str(c + 1) for c in range(cols)])
    ax.set_yticks([r * step + (cell - 1) / 2 for r in range(rows)], [str(r + 1) for r in range(rows)])


def draw_posemb(path: Path, config: ViTConfig, table: np.ndarray) -> Path:
    fig = _figure("posemb")
    left, right = fig.subplots(1, 2, width_ratios=[1.2, 1])
    vmax = float(np.abs(table).max()) or 1.0
    im = left.imshow(table, aspect="auto", cmap="RdBu_r", vmin=-vmax, vmax=vmax, interpolation="nearest")
    left.set_title(f"position table E_pos ({config.posemb}), {table.shape[0]} tokens x "
                   f"{table.shape[1]} dims")
    left.set_xlabel("dimension")
    left.set_ylabel("token (0: class token)" if config.pool == "cls" else "token (patch index)")
    fig.colorbar(im, ax=left, label="value")
    rows, cols = config.grid
    fig.suptitle(f"position embeddings ({config.posemb}, {config.pool} pooling, "
                 f"{rows}x{cols} patches of {config.patch_size}x{config.patch_size})")
    if config.posemb == "none":  # an all-zero table: no similarity to draw
        right.axis("off")
        right.text(0.5, 0.5, "no position table: the patches are a bag to the model"
                   + ("\nuntil rope turns q and k by position" if config.rope else ""),
                   ha="center", va="center", transform=right.transAxes)
        return _save(fig, path)
    sim = patch_similarity(table, config)  # (rows, cols, rows, cols)
    im = right.imshow(mosaic(sim.reshape(rows * cols, rows, cols), config.grid), cmap=_cmap("viridis"),
                      vmin=-1, vmax=1, interpolation="nearest")
    _grid_ticks(right, config.grid, cols, 1)
    right.set_title("cosine similarity of each patch's position\nembedding with every other patch")
    right.set_xlabel("input patch column")
    right.set_ylabel("input patch row")
    fig.colorbar(im, ax=right, label="cosine similarity")
    return _save(fig, path)


def draw_patches(path: Path, config: ViTConfig, image: np.ndarray, label: int, row: int) -> Path:
    p = config.patch_size
    seen = reference.crop(image[None, :, :, None], config.crop)  # (1, *config.seen, 1)
    patches = reference.patchify(seen, p, config.stride)[0]  # (N, p*p)
    fig = _figure("patches")
    left, right = fig.subplots(1, 2)
    im = left.imshow(image, cmap="gray", vmin=0, vmax=255)
    left.set_title(f"train.csv #{row}: a {label}, {image.shape[0]}x{image.shape[1]} pixels")
    left.set_xlabel("pixel column")
    left.set_ylabel("pixel row")
    gap = max(1, p // 4)
    right.imshow(mosaic(patches.reshape(-1, p, p).astype(np.float64), config.grid, gap),
                 cmap=_cmap("gray", bad="#d0d0ff"), vmin=0, vmax=255, interpolation="nearest")
    _grid_ticks(right, config.grid, p, gap)
    cropped = ""
    if config.crop:  # the part the model sees, framed on the image
        from matplotlib.patches import Rectangle

        (h, w), k = config.seen, config.crop
        left.add_patch(Rectangle((k - 0.5, k - 0.5), w, h, fill=False, edgecolor="#d0d0ff", linewidth=1.5))
        cropped = f"\n(the central {h}x{w}, framed)"
    every = f" every {config.stride} pixels" if config.stride != p else ""
    right.set_title(f"{config.num_patches} patches of {p}x{p}{every} = the tokens "
                    f"x_p^1..x_p^{config.num_patches}{cropped}")
    right.set_xlabel("patch column")
    right.set_ylabel("patch row")
    fig.colorbar(im, ax=[left, right], label="pixel value", shrink=0.8)
    fig.suptitle("patchify: the image as a sequence of flattened patches, row by row")
    return _save(fig, path)


def draw_curves(path: Path, curves: dict[str, list[float]], title: str,
                best_epoch: int | None = None) -> Path:
    from matplotlib.ticker import MaxNLocator

    fig = _figure("curves")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for ax, what in ((loss_ax, "loss"), (acc_ax, "acc")):
        for split, style in (("train", "-o"), ("val", "--s")):
            key = f"{split}_{what}"
            if key in curves:
                ax.plot(curves["epoch"], curves[key], style, ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    if best_epoch is not None:
        acc_ax.axvline(best_epoch, color="gray", ls=":", label="plotted weights")
        acc_ax.legend()
    loss_ax.set_ylabel("cross-entropy")
    loss_ax.set_title("loss (train: with label smoothing, augmented)")
    acc_ax.set_ylabel("accuracy")
    acc_ax.set_title("accuracy")
    fig.suptitle(title)
    return _save(fig, path)


def draw_confusion(path: Path, matrix: np.ndarray, title: str) -> Path:
    fig = _figure("confusion")
    ax = fig.subplots()
    im = ax.imshow(matrix, cmap="Blues", interpolation="nearest")
    k = len(matrix)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    threshold = matrix.max() / 2
    for t in range(k):
        for p in range(k):
            ax.text(p, t, str(matrix[t, p]), ha="center", va="center", fontsize=8,
                    color="white" if matrix[t, p] > threshold else ("black" if matrix[t, p] else "#bbbbbb"))
    ax.set_xlabel("predicted label")
    ax.set_ylabel("true label")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="images")
    return _save(fig, path)


def draw_mistakes(path: Path, images: np.ndarray, truth: np.ndarray, predicted: np.ndarray,
                  confidence: np.ndarray, title: str) -> Path:
    fig = _figure("mistakes")
    side = int(np.ceil(np.sqrt(MAX_MISTAKES)))
    axes = fig.subplots(side, side).ravel()
    im = None
    for ax, n in zip(axes, range(len(axes)), strict=True):
        ax.set_xticks([])
        ax.set_yticks([])
        if n >= len(images):
            ax.set_axis_off()
            continue
        im = ax.imshow(images[n], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"true {truth[n]}, pred {predicted[n]}\nconfidence {confidence[n]:.2f}", fontsize=9)
    if im is None:
        axes[0].set_axis_on()
        axes[0].text(0.5, 0.5, "no mistakes", ha="center", va="center", transform=axes[0].transAxes)
        im = axes[0].imshow(np.zeros((2, 2)), cmap="gray", vmin=0, vmax=255, alpha=0)
    fig.colorbar(im, ax=axes.tolist(), label="pixel value", shrink=0.6)
    fig.supxlabel("each: true label, predicted label, softmax probability of the prediction")
    fig.suptitle(title)
    return _save(fig, path)


def draw_attention(path: Path, config: ViTConfig, images: np.ndarray, maps: np.ndarray,
                   captions: list[str]) -> Path:
    fig = _figure("attention")
    axes = np.asarray(fig.subplots(len(images), 3, squeeze=False))
    h, w = images.shape[1:]
    what = "class token -> patches" if config.pool == "cls" else "mean over tokens -> patches"
    for n, (ax_img, ax_map, ax_over) in enumerate(axes):
        ax_img.imshow(images[n], cmap="gray", vmin=0, vmax=255)
        ax_img.set_ylabel(captions[n], fontsize=9)
        im = ax_map.imshow(maps[n], cmap="inferno", interpolation="nearest")
        ax_map.set_xticks(range(config.grid[1]), [str(c + 1) for c in range(config.grid[1])])
        ax_map.set_yticks(range(config.grid[0]), [str(r + 1) for r in range(config.grid[0])])
        fig.colorbar(im, ax=ax_map, label="rollout weight")
        ax_over.imshow(images[n], cmap="gray", vmin=0, vmax=255, extent=(0, w, h, 0))
        # a cell a stride wide around each patch's centre: the image less k pixels on every
        # side (k the crop) for disjoint patches; half the overlap less again for overlapping ones
        k = config.crop + (config.patch_size - config.stride) / 2
        im = ax_over.imshow(maps[n] / max(float(maps[n].max()), 1e-12), cmap="inferno", alpha=0.55,
                            vmin=0, vmax=1, extent=(k, w - k, h - k, k), interpolation="bilinear")
        fig.colorbar(im, ax=ax_over, label="rollout / its max")
        for ax in (ax_img, ax_over):
            ax.set_xticks([])
            ax.set_yticks([])
        if n == 0:
            ax_img.set_title("digit")
            ax_map.set_title(f"rollout: {what}")
            ax_over.set_title("overlay")
        if n == len(images) - 1:
            ax_img.set_xlabel("28x28 pixels")
            ax_map.set_xlabel("patch column")
            ax_over.set_xlabel("digit + rollout (upsampled)")
        ax_map.set_ylabel("patch row")
    fig.suptitle(f"attention rollout (Abnar & Zuidema 2020) over {config.depth} blocks, "
                 f"heads averaged, residual added")
    return _save(fig, path)


def compare_curves(run_dirs: list[str | os.PathLike], path: str | os.PathLike) -> Path:
    """Overlay the training curves of several runs (e.g. a Flax and a PyTorch run of one config):
    loss and accuracy per epoch, train solid, validation dashed, one colour per run."""
    from matplotlib.ticker import MaxNLocator

    runs = []
    for run_dir in run_dirs:
        read_run(run_dir)
        runs.append((run_label(run_dir), curves_of(read_metrics(run_dir))))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = _figure("curves-compare")
    loss_ax, acc_ax = fig.subplots(1, 2)
    for n, (label, curves) in enumerate(runs):
        color = f"C{n % 10}"
        for ax, what in ((loss_ax, "loss"), (acc_ax, "acc")):
            for split, style in (("train", "-"), ("val", "--")):
                if f"{split}_{what}" in curves:
                    ax.plot(curves["epoch"], curves[f"{split}_{what}"], style, color=color, marker="o",
                            ms=3, label=f"{label} ({split})")
    for ax, name in ((loss_ax, "cross-entropy"), (acc_ax, "accuracy")):
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    loss_ax.set_title("loss")
    acc_ax.set_title("accuracy")
    fig.suptitle("training curves: " + " vs ".join(label for label, _ in runs))
    return _save(fig, path)


# ---- a whole run ----------------------------------------------------------------------------
def plot_run(run_dir: str | os.PathLike, dataset: data.Dataset | None = None,
             out_dir: str | os.PathLike | None = None) -> dict[str, Path]:
    """Draw every picture of a finished run; -> {name: written file} (PNGs and "data": plots.json).

    `dataset` is the data the run trained on (default: the run's --data, resolved as the
    trainer does). The validation split is the run's own. Without one (--val-fraction 0),
    confusion.png and mistakes.png are not drawn and attention.png uses training digits.
    """
    run_dir = Path(run_dir)
    run, config = read_run(run_dir)
    rows = read_metrics(run_dir)
    chosen = weights_path(run_dir)
    tensors, _ = W.load(chosen, config)
    if dataset is None:
        dataset = data.resolve(run["options"].get("data"))
    recipe, options = run["recipe"], run["options"]
    images, labels = dataset.train_images, dataset.train_labels
    if options.get("limit_train"):
        images, labels = images[: options["limit_train"]], labels[: options["limit_train"]]
    if images.shape[1:] != (config.image_height, config.image_width):
        raise PlotError(f"the data's images are {images.shape[1]}x{images.shape[2]}, the run's "
                        f"model takes {config.image_height}x{config.image_width}")
    _, val_idx = data.stratified_split(labels, recipe["val_fraction"], recipe.get("split_seed", 0))
    out = Path(out_dir) if out_dir is not None else run_dir / "plots"
    common.prepare_out(out)
    framework = run.get("framework", "flax")
    curves = curves_of(rows)
    best_epoch = None
    if chosen.name == "best.safetensors" and "val_acc" in curves:
        best_epoch = curves["epoch"][int(np.argmax(curves["val_acc"]))]
    label = f"{framework} run {run_dir.resolve().name}, preset {run.get('preset')}"
    record: dict[str, Any] = {"run": str(run_dir), "framework": framework, "weights": chosen.name,
                              "weights_epoch": best_epoch or curves["epoch"][-1],
                              "figures": {}, "curves": curves}
    files: dict[str, Path] = {}

    table = posemb_table(config, tensors)
    files["posemb"] = draw_posemb(out / "posemb.png", config, table)
    record["posemb"] = {"kind": config.posemb, "shape": list(table.shape)}
    common.pause_for_tests("plots-one-drawn")

    shown = val_idx if len(val_idx) else np.arange(len(labels))
    if not len(shown):
        raise PlotError("the run's training data holds no images")
    first = int(shown[0])
    files["patches"] = draw_patches(out / "patches.png", config, images[first], int(labels[first]), first)
    record["patches"] = {"index": first, "label": int(labels[first])}

    files["curves"] = draw_curves(out / "curves.png", curves, f"training curves: {label}", best_epoch)

    model = _Model(framework, config, tensors)
    if len(val_idx):
        probs = model.probs(images[val_idx])  # (V, K)
        predicted = probs.argmax(-1)
        truth = labels[val_idx]
        matrix = confusion_matrix(truth, predicted, config.num_classes)
        accuracy = float(np.trace(matrix) / matrix.sum())
        files["confusion"] = draw_confusion(
            out / "confusion.png", matrix,
            f"{len(val_idx)} validation images, accuracy {accuracy:.4f}\n{label}, {chosen.name}")
        record["confusion"] = {"matrix": matrix.tolist(), "val_size": int(len(val_idx)),
                               "correct": int(np.trace(matrix)), "accuracy": accuracy}
        wrong = np.flatnonzero(predicted != truth)
        confidence = probs[np.arange(len(probs)), predicted]
        wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:MAX_MISTAKES]
        files["mistakes"] = draw_mistakes(
            out / "mistakes.png", images[val_idx[wrong]], truth[wrong], predicted[wrong], confidence[wrong],
            f"{int((predicted != truth).sum())} of {len(val_idx)} validation images wrong"
            f"{' (most confident first)' if len(wrong) else ''}; {label}")
        record["mistakes"] = [{"index": int(val_idx[i]), "true": int(truth[i]), "pred": int(predicted[i]),
                               "confidence": float(confidence[i])} for i in wrong]
    else:
        for name in ("confusion", "mistakes"):
            (out / f"{name}.png").unlink(missing_ok=True)

    # Attention: the first validation digit of each of a few different classes.
    picked: list[int] = []
    for i in shown:
        if int(labels[i]) not in {int(labels[j]) for j in picked}:
            picked.append(int(i))
        if len(picked) == ATTENTION_DIGITS:
            break
    digits = images[picked]
    digit_probs, attentions = model.attention(digits)
    maps = rollout_to_patches(rollout(attentions), config)
    if len(val_idx):  # the predictions the confusion matrix counted
        digit_pred = predicted[np.searchsorted(val_idx, picked)]
    else:
        digit_pred = digit_probs.argmax(-1)
    where = "validation" if len(val_idx) else "training"
    captions = [f"{where} digit, train.csv #{i}\ntrue {labels[i]}, pred {int(q)}"
                for i, q in zip(picked, digit_pred, strict=True)]
    files["attention"] = draw_attention(out / "attention.png", config, digits, maps, captions)
    record["attention"] = {"indices": picked, "pool": config.pool, "maps": maps.round(6).tolist()}

    record["figures"] = {name: [int(FIGSIZE[name][0] * DPI), int(FIGSIZE[name][1] * DPI)] for name in files}
    data_path = out / "plots.json"
    common.atomic_write_text(data_path, json.dumps(record, indent=1))
    files["data"] = data_path
    return files


def draw_safely(run_dir: str | os.PathLike, dataset: data.Dataset | None = None) -> dict[str, Path] | None:
    """plot_run for the trainers: a failure is one warning line on stderr, never an exception,
    so the run's exit status and files stay as they are."""
    import shutil

    t0 = time.perf_counter()
    final = Path(run_dir) / "plots"
    drawing = Path(run_dir) / f".plots.tmp-{os.getpid()}"  # renamed to plots/ once all are drawn
    try:
        files = plot_run(run_dir, dataset, drawing)
        shutil.rmtree(final, ignore_errors=True)
        drawing.rename(final)
        files = {name: final / path.name for name, path in files.items()}
    except Exception as e:  # noqa: BLE001 (the pictures must never fail a finished run)
        text = " ".join(str(e).split()) or "no message"
        if not isinstance(e, PlotError | common.UsageError | data.DataError | W.WeightsError):
            text = f"{type(e).__name__}: {text}"
        print(f"warning: plotting failed: {text[:400]}", file=sys.stderr)
        return None
    except KeyboardInterrupt:
        print(f"\ninterrupted while drawing the pictures; the run's results are whole (draw them "
              f"with: python -m train.plots {run_dir})", file=sys.stderr)
        raise
    finally:
        shutil.rmtree(drawing, ignore_errors=True)
    pictures = [p for name, p in files.items() if name != "data"]
    print(f"plots: {len(pictures)} pictures in {files['data'].parent} "
          f"({time.perf_counter() - t0:.1f} s)", file=sys.stderr)
    return files


# ---- the command ----------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = common.OneLineParser(
        prog="python -m train.plots",
        description="Draw the pictures of a finished run (position table, patches, curves, "
                    "confusion matrix, mistakes, attention rollout) into RUN_DIR/plots.")
    p.add_argument("run", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("--data", default=None,
                   help="the data the run trained on (default: the run's own --data)")
    p.add_argument("--compare", nargs="+", default=[], metavar="OTHER_RUN_DIR",
                   help="also overlay these runs' training curves in curves-compare.png")
    p.add_argument("--out", default=None, help="where the pictures go (default: RUN_DIR/plots)")
    args = p.parse_args(argv)
    try:
        for other in [args.run, *args.compare]:  # refuse bad runs before anything is drawn
            read_run(other)
            read_metrics(other)
        dataset = data.resolve(args.data) if args.data is not None else None
        files = plot_run(args.run, dataset, args.out)
        if args.compare:
            out = Path(args.out) if args.out is not None else Path(args.run) / "plots"
            files["curves-compare"] = compare_curves([args.run, *args.compare], out / "curves-compare.png")
    except (PlotError, common.UsageError, data.DataError, W.WeightsError, ConfigError) as e:
        common.fail(str(e))
    for name, path in files.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
