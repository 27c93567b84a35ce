"""Did two runs compute the same thing? Their weights tensor by tensor, their curves epoch by epoch.

    python train/compare_runs.py runs/a runs/b

Prints, for the final weights (model.safetensors) of either trainer's runs, whether every
tensor is equal to the bit and else the largest difference and the tensor it is in; the first
epoch whose training loss or validation accuracy differs; and where the runs' summary.json
says they ran (CPU, its vector extensions, library versions, XLA_FLAGS), the fields that
differ. Exit status 0 if the weights are equal to the bit, 1 if not, 2 on bad input.

Compare tensors, not files: the safetensors header holds a JSON dict whose key order is not
fixed, so two files of equal tensors can differ in their bytes.

On one machine a command and seed repeat to the bit. On a CPU with other vector extensions
they do not: XLA:CPU compiles for the widest it finds, and the sums round differently
(docs/results.md, "Reproducibility"); `XLA_FLAGS=--xla_cpu_max_isa=AVX2` (or SSE4_2, AVX)
caps it, which is how to show that on one machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np

from parity import weights as W
from train.common import OneLineParser, UsageError, fail


def load_run(run_dir: Path) -> tuple[dict[str, np.ndarray], list[dict], dict]:
    path = run_dir / "model.safetensors"
    if not path.is_file():
        raise UsageError(f"{run_dir}: holds no model.safetensors (not a finished run?)")
    tensors, _ = W.load(path)
    metrics = run_dir / "metrics.jsonl"
    rows = []
    for line in metrics.read_text().splitlines() if metrics.is_file() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a torn last line, which a kill mid-write leaves: the epochs before it count
    summary = run_dir / "summary.json"
    try:
        env = json.loads(summary.read_text()).get("environment", {}) if summary.is_file() else {}
    except (json.JSONDecodeError, AttributeError):
        raise UsageError(f"{summary}: unreadable (not the JSON a finished run writes)") from None
    return tensors, rows, env


def compare(a: Path, b: Path) -> dict:
    (ta, ra, ea), (tb, rb, eb) = load_run(a), load_run(b)
    if set(ta) != set(tb) or any(ta[k].shape != tb[k].shape for k in ta):
        raise UsageError(f"{a} and {b} hold different models (tensor names or shapes differ)")
    diffs = {k: float(np.max(np.abs(ta[k].astype(np.float64) - tb[k].astype(np.float64))))
             for k in sorted(ta)}
    worst = max(diffs, key=diffs.get)
    first = next((x["epoch"] for x, y in zip(ra, rb, strict=False)
                  if (x.get("train_loss"), x.get("val_acc")) != (y.get("train_loss"), y.get("val_acc"))), None)
    return {"equal": all(v == 0 for v in diffs.values()), "max_abs_diff": diffs[worst], "worst_tensor": worst,
            "tensors_differing": sum(v > 0 for v in diffs.values()), "tensors": len(diffs),
            "epochs_compared": min(len(ra), len(rb)), "first_epoch_differing": first,
            "environment_differs": {k: [ea.get(k), eb.get(k)] for k in sorted(set(ea) | set(eb))
                                    if ea.get(k) != eb.get(k)}}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/compare_runs.py", description=__doc__.split("\n\n")[0])
    p.add_argument("a", help="a finished run directory")
    p.add_argument("b", help="another one")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON")
    args = p.parse_args(argv)
    try:
        r = compare(Path(args.a), Path(args.b))
    except (UsageError, W.WeightsError) as e:
        fail(str(e))
        return 2
    if args.json:
        print(json.dumps(r, indent=1))
    else:
        print("weights: equal to the bit" if r["equal"] else
              f"weights: {r['tensors_differing']} of {r['tensors']} tensors differ, at most by "
              f"{r['max_abs_diff']:.3g} (in {r['worst_tensor']})")
        print(f"curves: equal over {r['epochs_compared']} epochs" if r["first_epoch_differing"] is None
              else f"curves: first differ at epoch {r['first_epoch_differing']} of {r['epochs_compared']}")
        for k, (x, y) in r["environment_differs"].items():
            print(f"environment: {k}: {x} against {y}")
    return 0 if r["equal"] else 1


if __name__ == "__main__":
    sys.exit(main())
