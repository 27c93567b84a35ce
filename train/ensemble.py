"""Average the predictions of several finished runs (either trainer) and write one submission.

    python train/ensemble.py runs/s0 runs/s1 runs/s2 --data digit-recognizer.zip --tta --out runs/ens

Each member contributes its best.safetensors (its model.safetensors when it had no
validation split); `--weights final` takes every member's model.safetensors, the weights at
the end of training, instead: the best epoch was chosen on the validation split, so its score
there is slightly optimistic, the final weights' is not. The members must share the
validation split (same --val-fraction and --split-seed), so that the ensemble's validation
accuracy is measured on images that no member trained on.

`--pseudo-labels FILE` also writes the test images the ensemble is sure of (averaged top
probability >= --min-confidence) with its labels, for a trainer's `--pseudo-labels FILE`:
self-training on the unlabelled test.csv, as Kaggle competitors do. Its validation split
stays untouched, so the student's validation accuracy stays honest.

`--combine` picks how the members' class probabilities become one: their mean (the default),
the mean of their logs (a geometric mean: a class that any member rules out loses), a majority
vote (ties go to the higher mean probability), or the most confident member's alone.
ensemble.json scores every rule on the validation split, whichever one the submission used;
choosing a rule by those scores is choosing on the validation split.

ensemble.json also says where the errors are: the validation images (train.csv rows) each
member gets wrong, those every member gets wrong (what picking the right member for each
image could not fix) and those at least one does, and which split those rows came from
(`split`: its --val-fraction, --split-seed and --limit-train), for train/hard_digits.py.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # restart with glibc keeping XLA's step buffers (train/malloc.py)
    from train import malloc

    malloc.restart()

import numpy as np

from jaxvit import xla_flags
from parity import weights as W
from train import data
from train.common import OneLineParser, UsageError, atomic_write, atomic_write_text, fail, prepare_out


def member_weights(run_dir: Path, which: str = "best") -> tuple[Path, dict]:
    config_path = run_dir / "config.json"
    if not config_path.is_file():
        raise UsageError(f"{run_dir}: not a run directory (no config.json)")
    try:
        run = json.loads(config_path.read_text())
    except json.JSONDecodeError as e:
        raise UsageError(f"{config_path}: unreadable run config ({e})") from None
    if not (isinstance(run, dict) and isinstance(run.get("recipe"), dict)
            and "val_fraction" in run["recipe"] and isinstance(run.get("options"), dict)):
        raise UsageError(f"{config_path}: not a trainer's run config (no recipe or options)")
    names = ("best.safetensors", "model.safetensors") if which == "best" else ("model.safetensors",)
    for name in names:
        if (run_dir / name).is_file():
            return run_dir / name, run
    raise UsageError(f"{run_dir}: holds no {' or '.join(names)} (has the run finished?)")


def members_data(members: list[tuple[Path, dict]]) -> str | None:
    """The --data the runs trained on, when they all name the same one and it is still there."""
    named = {m["options"].get("data") for _, m in members}
    if len(named) == 1 and (path := named.pop()) is not None and Path(path).exists():
        print(f"--data not given: scoring on {path}, the runs' own", file=sys.stderr)
        return path
    return None


COMBINERS = ("mean", "log-mean", "vote", "max-confidence")


def combine(probs: list[np.ndarray], how: str = "mean") -> np.ndarray:
    """One (N, classes) probability table from the members' tables, by the rule `how`."""
    p = np.stack(probs).astype(np.float64)  # (members, N, classes)
    if how == "mean":
        return p.mean(0)
    if how == "log-mean":
        logs = np.log(np.clip(p, 1e-12, 1.0)).mean(0)
        e = np.exp(logs - logs.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    if how == "vote":
        votes = np.eye(p.shape[-1])[p.argmax(-1)].mean(0)  # each member's share of the vote
        scores = votes + 1e-6 * p.mean(0)  # a tie goes to the higher mean probability
        return scores / scores.sum(-1, keepdims=True)
    if how == "max-confidence":
        sure = p.max(-1).argmax(0)  # (N,): the member surest of each image
        return p[sure, np.arange(p.shape[1])]
    raise UsageError(f"--combine {how}: not one of {', '.join(COMBINERS)}")


def error_overlap(val_probs: list[np.ndarray], labels: np.ndarray, rows: np.ndarray,
                  how: str = "mean") -> dict:
    """Which validation images each member gets wrong, as train.csv row numbers (0 = its first
    image), and how the sets overlap: wrong in every member, in at least one, by the ensemble.
    `oracle_val_acc` is the score of picking the right member for each image. Averaging can
    beat it only by getting right an image that every member gets wrong (their wrong answers
    differ and the right one is each one's second choice); `rescued` lists those."""
    wrong = [set(rows[p.argmax(-1) != labels].tolist()) for p in val_probs]
    every, anyone = set.intersection(*wrong), set.union(*wrong)
    ensemble = set(rows[combine(val_probs, how).argmax(-1) != labels].tolist())
    return {"members": [sorted(w) for w in wrong], "every": sorted(every), "any": sorted(anyone),
            "ensemble": sorted(ensemble), "rescued": sorted(every - ensemble),
            "oracle_val_acc": 1 - len(every) / len(labels)}


def save_probs(path: Path, val_probs: list[np.ndarray], test_probs: list[np.ndarray],
               val_rows: np.ndarray, val_labels: np.ndarray, members: list[str]) -> None:
    """The members' class probabilities, written whole or not at all (see the module's notes)."""
    classes = test_probs[0].shape[-1]
    arrays = {"val_probs": np.stack(val_probs) if val_probs else np.zeros((len(members), 0, classes)),
              "test_probs": np.stack(test_probs), "val_rows": np.asarray(val_rows, np.int64),
              "val_labels": np.asarray(val_labels, np.int64), "members": np.array(members)}
    atomic_write(path, lambda f: np.savez(f, **{k: v.astype(np.float32) if k.endswith("probs") else v
                                                for k, v in arrays.items()}))


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/ensemble.py", description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="finished run directories")
    p.add_argument("--data", default=None, help="the competition download (zip or folder)")
    p.add_argument("--tta", action="store_true", help="also average over small shifts")
    p.add_argument("--weights", choices=("best", "final"), default="best",
                   help="each run's best-epoch weights (chosen on the validation split) or its final ones")
    p.add_argument("--combine", choices=COMBINERS, default="mean",
                   help="how the members' probabilities become one (default: their mean)")
    p.add_argument("--out", default="runs/ensemble", help="where submission.csv and ensemble.json go")
    p.add_argument("--pseudo-labels", default=None, metavar="CSV",
                   help="also write the test images the ensemble is sure of, as ImageId,Label,"
                        "Confidence, for a trainer's --pseudo-labels")
    p.add_argument("--min-confidence", type=float, default=0.5, metavar="P",
                   help="with --pseudo-labels: keep the test images whose combined top "
                        "probability is at least P (default 0.5)")
    args = p.parse_args(argv)
    xla_flags.apply()  # before JAX creates its backend
    try:
        return run(args)
    except (UsageError, data.DataError, W.WeightsError) as e:
        fail(str(e))
    return 2


def run(args) -> int:
    if not 0 <= args.min_confidence <= 1:
        raise UsageError(f"--min-confidence must be in [0, 1], got {args.min_confidence}")
    if args.pseudo_labels and not Path(args.pseudo_labels).resolve().parent.is_dir():
        raise UsageError(f"--pseudo-labels {args.pseudo_labels}: no such folder to write it in")
    if args.pseudo_labels and Path(args.pseudo_labels).is_dir():
        raise UsageError(f"--pseudo-labels {args.pseudo_labels}: a folder; give the CSV file to write")
    members = [member_weights(Path(r), args.weights) for r in args.runs]
    splits = {(m["recipe"]["val_fraction"], m["recipe"].get("split_seed", 0),
               m["options"].get("limit_train")) for _, m in members}
    if len(splits) > 1:
        raise UsageError(f"the runs were scored on different validation splits {sorted(splits)}; "
                         f"an ensemble needs one (same --val-fraction and --split-seed)")
    val_fraction, split_seed, limit = splits.pop()
    dataset = data.resolve(args.data if args.data is not None else members_data(members))
    if dataset.demo:
        print(f"DEMO: no --data given, and the runs name none: scoring on {dataset.source}",
              file=sys.stderr)
    images, labels = dataset.train_images[:limit], dataset.train_labels[:limit]
    trained_on = {m["options"].get("train_sha256") for _, m in members} - {None}
    if trained_on and len(trained_on | {data.train_digest(images, labels)}) > 1:
        raise UsageError(f"{dataset.source}: not the train.csv the runs trained on (or the runs trained "
                         f"on different ones); give the same --data")
    out = Path(args.out)
    prepare_out(out)

    import jax
    import jax.numpy as jnp

    from jaxvit import train as jt
    from jaxvit.model import ViT
    from train import cache
    from train.flax_main import evaluate

    cache.use_jax_compilation_cache()  # scoring the same members again compiles nothing

    _, val_idx = data.stratified_split(labels, val_fraction, split_seed)
    val_probs, test_probs, report = [], [], {"members": []}
    for path, _ in members:
        tensors, config = W.load(path)
        params = jax.tree_util.tree_map(jnp.asarray, W.canonical_to_flax(tensors, config))
        predict = jt.make_predict(ViT(config), tta=args.tta)
        test_probs.append(evaluate(predict, params, dataset.test_images))
        if len(val_idx):
            val_probs.append(evaluate(predict, params, images[val_idx]))
            acc = float(np.mean(val_probs[-1].argmax(-1) == labels[val_idx]))
            report["members"].append({"weights": str(path), "val_acc": acc})
            print(f"{path}: val acc {acc:.4f}", file=sys.stderr)
    if val_probs:
        report["combiners"] = {how: float(np.mean(combine(val_probs, how).argmax(-1) == labels[val_idx]))
                               for how in COMBINERS}
        report["ensemble_val_acc"] = report["combiners"][args.combine]
        report["val_images"] = int(len(val_idx))
        report["split"] = {"val_fraction": val_fraction, "split_seed": split_seed,
                           "limit_train": limit}  # which images the validation split holds
        report["errors"] = error_overlap(val_probs, labels[val_idx], val_idx, args.combine)
        print(f"ensemble of {len(members)}{' with TTA' if args.tta else ''} ({args.combine}): val acc "
              f"{report['ensemble_val_acc']:.4f} on {len(val_idx)} images; other rules: "
              + ", ".join(f"{h} {a:.4f}" for h, a in report["combiners"].items() if h != args.combine),
              file=sys.stderr)
        e = report["errors"]
        print(f"wrong in every member: {len(e['every'])}, in at least one: {len(e['any'])}; the best "
              f"member for each image would score {e['oracle_val_acc']:.4f}", file=sys.stderr)
    report["tta"] = bool(args.tta)
    report["weights"] = args.weights
    report["combine"] = args.combine
    test_scores = combine(test_probs, args.combine)
    data.write_submission(out / "submission.csv", test_scores.argmax(-1))
    if args.pseudo_labels:
        confidence = test_scores.max(-1)
        keep = np.flatnonzero(confidence >= args.min_confidence)
        data.write_pseudo_labels(args.pseudo_labels, keep, test_scores[keep].argmax(-1), confidence[keep])
        report["pseudo_labels"] = {"path": str(args.pseudo_labels), "min_confidence": args.min_confidence,
                                   "kept": int(len(keep)), "of": int(len(test_scores))}
        print(f"wrote {args.pseudo_labels}: {len(keep)} of {len(test_scores)} test images at "
              f"confidence >= {args.min_confidence}", file=sys.stderr)
    save_probs(out / "probs.npz", val_probs, test_probs, val_idx, labels[val_idx],
               [str(path) for path, _ in members])
    atomic_write_text(out / "ensemble.json", json.dumps(report, indent=1))
    print(f"wrote {out / 'submission.csv'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
