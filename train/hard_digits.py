"""Which validation digits does every model get wrong, and what does that leave of a goal?

    python train/hard_digits.py                                  # the reports in docs/results/
    python train/hard_digits.py runs/ens/ensemble.json ... --data digit-recognizer.zip --png hard.png

train/ensemble.py writes into its ensemble.json which validation images (train.csv rows, 0 =
the first image) each member got wrong, beside the member's weight file. This reads any number
of those reports, and the JSON files that hold them nested (docs/results/), and takes each
model once (a weight file scored twice with the same errors counts once). Then it prints:

- how many models were scored, by validation split (only the most common split is used: rows
  of different splits are different images). A split is its size and the report's `split`
  (--val-fraction, --split-seed, --limit-train); a report from before ensemble.py wrote `split`
  counts as --split-seed 0, as every such report in docs/results/ was;
- the rows most of those models got wrong, with how many got each wrong (and its label, with
  --data);
- for each accuracy goal, how many errors the goal allows on the split, how many of those the
  rows wrong in every model take up, and how many models made few enough errors to reach it.

With --data, --png draws those rows. It is made of train.csv's images: keep it on your machine.
"""

from __future__ import annotations

import json
import math
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from train import common, data
from train.common import UsageError

RESULTS = Path(__file__).resolve().parent.parent / "docs" / "results"


@dataclass(frozen=True)
class Scored:
    """One model's errors on a validation split: train.csv rows it labelled wrong."""
    weights: str
    wrong: frozenset[int]
    val_images: int
    split: tuple = ()  # (val_fraction, split_seed, limit_train); () for the default split


def split_key(report: dict) -> tuple:
    """Which validation split a report scored on, beyond its size (see the module's docstring)."""
    split = report.get("split")
    if not isinstance(split, dict):
        return ()
    key = (split.get("val_fraction"), split.get("split_seed"), split.get("limit_train"))
    default = common.Recipe()
    return () if key == (default.val_fraction, default.split_seed, None) else key


def scored_models(report) -> list[Scored]:
    """Every member of every ensemble report found anywhere inside a JSON value."""
    found = []
    if isinstance(report, dict):
        members, errors = report.get("members"), report.get("errors")
        if isinstance(members, list) and isinstance(errors, dict) and "val_images" in report \
                and len(errors.get("members", [])) == len(members):
            for member, wrong in zip(members, errors["members"], strict=True):
                weights = member["weights"] if isinstance(member, dict) else str(member)
                found.append(Scored(weights, frozenset(wrong), int(report["val_images"]),
                                    split_key(report)))
        children = report.values()
    elif isinstance(report, list):
        children = report
    else:
        return found
    for child in children:
        found += scored_models(child)
    return found


def read_reports(paths: list[Path]) -> list[Scored]:
    """The models of all the reports, each once, in the order first met."""
    models: dict[tuple[str, frozenset[int]], Scored] = {}
    for path in paths:
        try:
            report = json.loads(path.read_text())
        except OSError as e:
            raise UsageError(f"{path}: cannot read it ({e.strerror or e})") from None
        except json.JSONDecodeError as e:
            raise UsageError(f"{path}: not JSON ({e.msg}, line {e.lineno})") from None
        for m in scored_models(report):
            models.setdefault((m.weights, m.wrong), m)
    if not models:
        raise UsageError(f"no model's errors in {len(paths)} file(s): give train/ensemble.py's "
                         f"ensemble.json files (from a version that writes `errors`)")
    return list(models.values())


def one_split(models: list[Scored]) -> tuple[int, list[Scored]]:
    """The most common validation split's size and the models scored on it."""
    size, split = Counter((m.val_images, m.split) for m in models).most_common(1)[0][0]
    return size, [m for m in models if (m.val_images, m.split) == (size, split)]


def allowed_errors(goal: float, val_images: int) -> int:
    """The most errors a model can make on the split and still score at least `goal`."""
    return math.floor(val_images * (1 - goal) + 1e-9)


def summarize(models: list[Scored], goals: list[float], share: float) -> dict:
    """The rows wrong in at least `share` of the models, and what each goal leaves."""
    val_images, same = one_split(models)
    counts = Counter(row for m in same for row in m.wrong)
    hard = sorted((row for row, k in counts.items() if k >= share * len(same)),
                  key=lambda row: (-counts[row], row))
    every = [row for row in hard if counts[row] == len(same)]
    errors = sorted(len(m.wrong) for m in same)
    goal_rows = []
    for goal in goals:
        allowed = allowed_errors(goal, val_images)
        goal_rows.append({"goal": goal, "errors_allowed": allowed,
                          "taken_by_rows_wrong_in_every_model": len(every),
                          "models_reaching_it": sum(e <= allowed for e in errors)})
    return {"val_images": val_images, "models": len(same),
            "models_on_other_splits": len(models) - len(same),
            "hard": [{"row": row, "wrong_in": counts[row]} for row in hard],
            "wrong_in_every_model": every, "fewest_errors": errors[0],
            "median_errors": errors[len(errors) // 2],
            "hard_rows_each_model_gets_wrong": dict(sorted(Counter(
                len(m.wrong & set(hard)) for m in same).items())),
            "goals": goal_rows}


def report_lines(s: dict, labels: dict[int, int] | None) -> list[str]:
    n = s["models"]
    lines = [f"{n} models scored on a validation split of {s['val_images']} images"
             + (f" ({s['models_on_other_splits']} on other splits, left out)"
                if s["models_on_other_splits"] else ""),
             f"errors a model: fewest {s['fewest_errors']}, median {s['median_errors']}",
             "", "| train.csv row | label | wrong in |", "|---|---|---|"]
    for h in s["hard"]:
        label = labels[h["row"]] if labels is not None else ""
        lines.append(f"| {h['row']} | {label} | {h['wrong_in']} of {n} |")
    lines += ["", f"of those {len(s['hard'])} rows, a model gets wrong: " + ", ".join(
        f"{k} ({v} model{'s' * (v != 1)})" for k, v in s["hard_rows_each_model_gets_wrong"].items()), ""]
    for g in s["goals"]:
        lines.append(f"goal {100 * g['goal']:.2f}%: at most {g['errors_allowed']} errors, "
                     f"{g['taken_by_rows_wrong_in_every_model']} of them taken by the rows every "
                     f"model gets wrong; {g['models_reaching_it']} of {n} models reach it")
    return lines


def draw(path: Path, images: np.ndarray, rows: list[int], labels: dict[int, int],
         wrong_in: list[int], models: int) -> Path:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(rows), 6)
    lines = math.ceil(len(rows) / cols)
    fig, axes = plt.subplots(lines, cols, figsize=(1.8 * cols, 2.1 * lines), squeeze=False)
    for ax in axes.ravel():
        ax.set_axis_off()
    for ax, row, k in zip(axes.ravel(), rows, wrong_in, strict=False):
        ax.imshow(images[row], cmap="gray", vmin=0, vmax=255)
        ax.set_title(f"row {row}, label {labels[row]}\nwrong in {k} of {models}", fontsize=8)
    fig.tight_layout()
    common.atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    p = common.OneLineParser(
        prog="python train/hard_digits.py",
        description="Which validation digits do the models of train/ensemble.py's reports all get "
                    "wrong, and what does that leave of an accuracy goal?")
    p.add_argument("reports", nargs="*", type=Path,
                   help="ensemble.json files, or JSON files holding them (default: docs/results/*.json)")
    p.add_argument("--goals", type=float, nargs="+", default=[0.995, 0.997, 0.9978],
                   help="validation accuracies to measure the rows against (default: 0.995 0.997 0.9978)")
    p.add_argument("--share", type=float, default=0.5,
                   help="list the rows at least this share of the models got wrong (default 0.5)")
    p.add_argument("--data", default=None, help="the competition download, for the rows' labels")
    p.add_argument("--png", type=Path, default=None, help="with --data: draw the rows listed into this file")
    p.add_argument("--json", type=Path, default=None, help="also write the summary as JSON here")
    args = p.parse_args(argv)
    try:
        if not all(0 < g < 1 for g in args.goals) or not 0 < args.share <= 1:
            raise UsageError("--goals must lie between 0 and 1, --share in (0, 1]")
        if args.png is not None and args.data is None:
            raise UsageError("--png needs --data (the pictures are train.csv's images)")
        paths = args.reports or sorted(RESULTS.glob("*.json"))
        s = summarize(read_reports(paths), args.goals, args.share)
        labels = images = None
        if args.data is not None:
            dataset = data.resolve(args.data)
            if len(dataset.train_labels) <= max((h["row"] for h in s["hard"]), default=-1):
                raise UsageError(f"{args.data}: has fewer train.csv rows than the reports name")
            images, labels = dataset.train_images, {h["row"]: int(dataset.train_labels[h["row"]])
                                                    for h in s["hard"]}
    except (UsageError, data.DataError) as e:
        common.fail(str(e))
    print("\n".join(report_lines(s, labels)))
    if args.json is not None:
        common.atomic_write_text(args.json, json.dumps(s, indent=1) + "\n")
    if args.png is not None and s["hard"]:
        rows = [h["row"] for h in s["hard"]]
        print(f"drew {draw(args.png, images, rows, labels, [h['wrong_in'] for h in s['hard']], s['models'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
