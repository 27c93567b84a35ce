"""How long a launch takes before training runs, with the caches of train/cache.py off, cold, warm.

    python train/startup.py --data digit-recognizer.zip --out startup

For each trainer and round: one launch with VIT_CACHE_DIR=off, one with a fresh empty cache
folder (cold: it parses the CSVs, compiles, and fills the folder) and one more with the same
folder (warm). Each is a real `--epochs 1` run of the preset (a subprocess, timed from launch
to exit); the results hold, from its metrics.jsonl, the seconds before the first step (imports,
data, model), the first epoch (compilation included) and the end of epoch 1 since launch, and
its training loss, which must not depend on the cache. Writes startup.json, prints a table.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.common import OneLineParser

ROOT = Path(__file__).resolve().parent.parent


def launch(framework: str, cache: str, data: str, out: Path, extra: list[str]) -> dict:
    env = dict(os.environ, VIT_CACHE_DIR=cache, PYTHONUNBUFFERED="1")
    cmd = [sys.executable, str(ROOT / "train" / f"{framework}_main.py"), "--quiet", "--no-plots",
           "--data", data, "--epochs", "1", "--out", str(out), *extra]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.time() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} exited {proc.returncode}: "
                         f"{proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ''}")
    row = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    return {"wall_s": wall, "before_first_step_s": row["since_launch_s"] - row["wall_seconds"],
            "epoch1_s": row["epoch_seconds"], "epoch1_end_since_launch_s": row["since_launch_s"],
            "train_loss": row["train_loss"]}


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/startup.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="the competition zip or folder")
    p.add_argument("--frameworks", default="flax,torch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--out", default="startup")
    p.add_argument("--extra", default="", help="more trainer options (e.g. --preset kaggle)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.frameworks.split(",")) - {"flax", "torch"})
    if unknown or args.rounds < 1:
        p.error(f"unknown framework(s) {unknown} (flax, torch)" if unknown else "--rounds must be >= 1")
    if not Path(args.data).exists():
        p.error(f"--data {args.data}: no such file or folder")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="vit-startup-") as work:
        for rnd in range(args.rounds):
            for fw in args.frameworks.split(","):
                folder = Path(work) / f"cache-{fw}-{rnd}"
                for mode, cache in (("off", "off"), ("cold", str(folder)), ("warm", str(folder))):
                    run_dir = Path(work) / f"{fw}-{mode}-{rnd}"
                    res = launch(fw, cache, args.data, run_dir, args.extra.split())
                    rows.append({"framework": fw, "cache": mode, "round": rnd, **res})
                    print(f"{fw} {mode:4} round {rnd}: first step after {res['before_first_step_s']:.1f} s, "
                          f"epoch 1 ends {res['epoch1_end_since_launch_s']:.1f} s after launch, "
                          f"exit {res['wall_s']:.1f} s", file=sys.stderr, flush=True)
                    shutil.rmtree(run_dir, ignore_errors=True)
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]), "rows": rows}
    (out / "startup.json").write_text(json.dumps(report, indent=1))
    print("| trainer | caches | before the first step (s) | epoch 1 incl. compilation (s) | "
          "epoch 1 ends after launch (s) | launch to exit (s) |\n|---|---|---|---|---|---|")
    for fw in args.frameworks.split(","):
        for mode in ("off", "cold", "warm"):
            sel = [r for r in rows if r["framework"] == fw and r["cache"] == mode]
            cells = [" / ".join(f"{r[k]:.1f}" for r in sel) for k in
                     ("before_first_step_s", "epoch1_s", "epoch1_end_since_launch_s", "wall_s")]
            print(f"| {fw} | {mode} | " + " | ".join(cells) + " |")
    # one training loss per (trainer, round): the caches must not change what is trained
    runs = {(r["framework"], r["round"], r["train_loss"]) for r in rows}
    same = len(runs) == len({(r["framework"], r["round"]) for r in rows})
    print(f"training loss the same with and without the caches: {same} "
          f"({statistics.mean(r['train_loss'] for r in rows):.6f} on average)")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
