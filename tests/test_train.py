"""The trainers end to end, as users run them: real subprocesses, real (small) data, real files."""

import json
import os
import signal
import time
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parity import weights as W
from parity.config import preset
from tests.helpers import popen_trainer, trainer, write_competition
from train import common, data, malloc

FAST = ["--preset", "tiny", "--lr", "3e-3", "--batch-size", "64", "--rotate", "0",
        "--translate", "0", "--scale", "0", "--val-fraction", "0.2"]


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_competition(tmp_path_factory.mktemp("data") / "comp", 1200, 60, as_zip=True)


@pytest.fixture(scope="module")
def flax_run(comp, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "flax"
    trainer("flax", "--data", str(comp), "--out", str(out), "--epochs", "4", *FAST)
    return out


def _metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_flax_training_learns_and_leaves_a_complete_run_directory(flax_run):
    rows = _metrics(flax_run)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in ("train_loss", "train_acc", "val_loss", "val_acc", "lr", "img_per_s", "wall_seconds"):
        assert all(key in r for r in rows), key
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert max(r["val_acc"] for r in rows) > 0.35  # chance is 0.1
    config = json.loads((flax_run / "config.json").read_text())
    assert config["framework"] == "flax" and config["preset"] == "tiny"
    assert config["recipe"]["lr"] == 3e-3 and config["model"]["patch_size"] == 7
    for name in ("model.safetensors", "best.safetensors"):
        W.load(flax_run / name)
    sub = pd.read_csv(flax_run / "submission.csv")
    assert list(sub.columns) == ["ImageId", "Label"]
    assert sub["ImageId"].tolist() == list(range(1, 61))
    assert sub["Label"].between(0, 9).all()
    assert not [p for p in flax_run.iterdir() if ".tmp" in p.name]


def test_torch_twin_trains_with_the_same_cli_and_files(comp, tmp_path):
    out = tmp_path / "torch"
    trainer("torch", "--data", str(comp), "--out", str(out), "--epochs", "3", *FAST)
    rows = _metrics(out)
    assert rows[-1]["train_loss"] < rows[0]["train_loss"] - 0.3
    assert max(r["val_acc"] for r in rows) > 0.3
    assert {p.name for p in out.iterdir()} >= {"config.json", "metrics.jsonl", "model.safetensors",
                                              "best.safetensors", "checkpoint.safetensors",
                                              "submission.csv"}


@pytest.mark.parametrize("tta", [[], ["--tta"]], ids=["plain", "tta"])
def test_flax_weights_scored_by_either_trainer_give_identical_submissions(tta, flax_run, comp, tmp_path):
    # with --tta each twin shifts the images by its own pad-and-slice (channels-last in Flax,
    # channels-first in PyTorch) and averages the five views' probabilities: the labels agree
    ckpt = str(flax_run / "model.safetensors")
    by_torch = trainer("torch", "--eval-only", *tta, "--checkpoint", ckpt, "--data", str(comp),
                       "--out", str(tmp_path / "t"), "--val-fraction", "0.2")
    by_flax = trainer("flax", "--eval-only", *tta, "--checkpoint", ckpt, "--data", str(comp),
                      "--out", str(tmp_path / "f"), "--val-fraction", "0.2")
    assert (tmp_path / "t" / "submission.csv").read_bytes() == (tmp_path / "f" / "submission.csv").read_bytes()
    acc = [line for line in (by_torch.stderr + by_flax.stderr).splitlines() if "val acc" in line]
    assert len(acc) == 2 and acc[0] == acc[1]


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_the_final_submission_trains_on_every_row_without_validation(framework, comp, tmp_path):
    # The accuracy issue's last step: --val-fraction 0 trains on all of train.csv, and the
    # submission comes from the final weights, as the README's final-submission command says.
    out = tmp_path / framework
    proc = trainer(framework, "--data", str(comp), "--out", str(out), "--epochs", "2", "--tta",
                   *FAST[:-2], "--val-fraction", "0")
    rows = _metrics(out)
    assert len(rows) == 2 and not any("val_acc" in r for r in rows)
    assert not (out / "best.safetensors").exists()
    last = proc.stderr.strip().splitlines()[-1]
    assert "weights: model.safetensors, TTA" in last and "no validation images" in last
    assert "1200 train / 0 val" in proc.stderr
    assert len(pd.read_csv(out / "submission.csv")) == 60
    summary = json.loads((out / "summary.json").read_text())
    assert summary["tta"] and summary["tta_val_acc"] is None and summary["best_val_acc"] is None
    # what it ran on, for telling apart two runs of one command that do not repeat to the bit
    env = summary["environment"]
    assert env["jax"] == version("jax") and env["torch"] == version("torch") and env["cpu_count"] >= 1
    assert env["cpu"] and env["python"].count(".") == 2 and "xla_flags" in env
    # both trainers restart with glibc keeping XLA's step buffers, where glibc can (train/malloc.py)
    assert env["glibc_tunables"] == (malloc.TUNABLES if malloc.wanted() else os.environ.get("GLIBC_TUNABLES", ""))
    assert set(env["cpu_isa"]) <= set(common.CPU_ISA)
    if Path("/proc/cpuinfo").is_file() and "avx2" in Path("/proc/cpuinfo").read_text():
        assert "avx2" in env["cpu_isa"]


@pytest.mark.parametrize("framework, submit", [("flax", None), ("torch", None), ("flax", "final"),
                                               ("torch", "final")])
def test_tta_run_reports_the_validation_accuracy_of_its_submission_weights_with_tta(framework, submit, comp,
                                                                                     tmp_path):
    # By default the submission comes from the best epoch's weights; --submit-weights final
    # takes the weights at the end instead (the better choice on the long recipes under TTA).
    args = ["--data", str(comp), "--limit-train", "600", *FAST]
    choice = ["--submit-weights", submit] if submit else []
    proc = trainer(framework, "--out", str(tmp_path / "run"), "--epochs", "2", "--tta", *choice, *args)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    weights = "model.safetensors" if submit == "final" else "best.safetensors"
    assert summary["submission_weights"] == weights and summary["tta"]
    assert f"weights: {weights}, TTA" in proc.stderr.strip().splitlines()[-1]
    assert f"{summary['tta_val_acc']:.4f} with TTA" in proc.stderr.strip().splitlines()[-1]
    # the same number and submission as scoring those weights again, with TTA, through --eval-only
    again = trainer(framework, "--eval-only", "--tta", "--checkpoint",
                    str(tmp_path / "run" / weights), "--out", str(tmp_path / "e"), *args)
    assert f"val acc {summary['tta_val_acc']:.4f} on 120 images" in again.stderr
    assert (tmp_path / "run" / "submission.csv").read_bytes() == (tmp_path / "e" / "submission.csv").read_bytes()


def test_tta_submission_is_written(flax_run, comp, tmp_path):
    trainer("flax", "--eval-only", "--tta", "--checkpoint", str(flax_run / "best.safetensors"),
            "--data", str(comp), "--out", str(tmp_path))
    assert len(pd.read_csv(tmp_path / "submission.csv")) == 60
    # model options beside --eval-only must name the checkpoint's model (tiny), or are refused
    proc = trainer("flax", "--eval-only", "--checkpoint", str(flax_run / "best.safetensors"), "--data",
                   str(comp), "--preset", "cpu", "--out", str(tmp_path / "cpu"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "width (checkpoint: 32, options: 96), depth (checkpoint: 2, options: 4)" in proc.stderr
    assert not (tmp_path / "cpu").exists()


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_sigkill_then_resume_ends_with_the_same_weights(framework, comp, tmp_path):
    args = ["--data", str(comp), "--epochs", "4", "--limit-train", "600", *FAST]
    trainer(framework, *args, "--out", str(tmp_path / "whole"))
    proc = popen_trainer(framework, *args, "--out", str(tmp_path / "cut"))
    ckpt = tmp_path / "cut" / "checkpoint.safetensors"
    deadline = time.time() + 300
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (tmp_path / "cut" / "model.safetensors").exists()
    trainer(framework, "--resume", str(tmp_path / "cut"), "--data", str(comp))
    whole, _ = W.load(tmp_path / "whole" / "model.safetensors")
    cut, _ = W.load(tmp_path / "cut" / "model.safetensors")
    for name in whole:
        np.testing.assert_allclose(cut[name], whole[name], rtol=0, atol=1e-6, err_msg=name)
    assert [r["epoch"] for r in _metrics(tmp_path / "cut")] == [1, 2, 3, 4]
    assert (tmp_path / "cut" / "submission.csv").read_bytes() == \
        (tmp_path / "whole" / "submission.csv").read_bytes()


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_pseudo_labelled_test_images_join_the_training_split_and_not_the_validation(
        framework, flax_run, comp, tmp_path):
    pseudo = tmp_path / "pseudo.csv"  # the 60 test images, labelled by a trained run
    pseudo.write_bytes((flax_run / "submission.csv").read_bytes())
    out = tmp_path / "run"
    proc = trainer(framework, "--data", str(comp), "--out", str(out), "--epochs", "1",
                   "--pseudo-labels", str(pseudo), *FAST)
    assert "pseudo-labels: 60 test images" in proc.stderr
    assert "1020 train / 240 val" in proc.stderr  # 960 + 60 train; the same 240 held out
    options = json.loads((out / "config.json").read_text())["options"]
    assert options["pseudo_labels"] == str(pseudo)
    assert options["pseudo_labels_sha256"] == data.digest([pseudo])
    relabelled = pd.read_csv(pseudo)
    relabelled.loc[0, "Label"] = (relabelled.loc[0, "Label"] + 1) % 10
    relabelled.to_csv(pseudo, index=False)
    again = trainer(framework, "--resume", str(out), check=False)
    assert again.returncode == 2 and "pseudo-label file changed since the run started" in again.stderr


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_a_student_of_another_size_distills_from_a_teacher_file(framework, flax_run, comp, tmp_path):
    teacher = tmp_path / "teacher.safetensors"  # a trained Flax run's weights teach either twin
    teacher.write_bytes((flax_run / "model.safetensors").read_bytes())
    out = tmp_path / "run"
    trainer(framework, "--data", str(comp), "--out", str(out), "--epochs", "1", "--width", "48",
            "--teacher", str(teacher), "--distill", "0.5", *FAST)
    run = json.loads((out / "config.json").read_text())
    assert run["recipe"]["distill"] == 0.5 and run["model"]["width"] == 48
    assert run["options"]["teacher"] == str(teacher)
    assert run["options"]["teacher_sha256"] == data.digest([teacher])
    assert (out / "submission.csv").is_file()
    W.save(teacher, W.random_canonical(preset("tiny"), 1), preset("tiny"))  # another teacher
    again = trainer(framework, "--resume", str(out), check=False)
    assert again.returncode == 2 and "the file changed since the run started" in again.stderr


def test_demo_run_without_data_says_so_and_writes_a_submission(tmp_path):
    proc = trainer("flax", "--epochs", "1", "--limit-train", "800", "--preset", "tiny", "--out",
                   str(tmp_path / "run"), cwd=tmp_path)
    assert "DEMO" in proc.stderr and "kaggle competitions download -c digit-recognizer" in proc.stderr
    assert len(pd.read_csv(tmp_path / "run" / "submission.csv")) == 1000


@pytest.mark.parametrize("args,words", [
    (["--data", "/no/such/file.zip"], "no such file or folder"),
    (["--preset", "tiny", "--patch-size", "5"], "not divisible by patch_size 5"),
    (["--lr", "-1"], "--lr must be a positive number"),
    (["--epochs", "0"], "--epochs must be at least 1"),
    (["--resume", ""], "--resume needs a run directory, got an empty string"),
    (["--warmup-epochs", "inf"], "--warmup-epochs must be a finite number, got inf"),
    (["--rotate", "nan"], "--rotate must be a finite number, got nan"),
    (["--num-classes", "5"], "the digits are 10 classes; the config asks for --num-classes 5"),
    (["--erase", "1.5"], "--erase must be in [0, 1], got 1.5"),
    (["--mixup", "-0.2"], "--mixup must be >= 0, got -0.2"),
    (["--sam", "-0.05"], "--sam must be >= 0, got -0.05"),
    (["--distill", "1.5"], "--distill must be in [0, 1], got 1.5"),
    (["--distill", "0.5"], "--distill and --teacher go together"),
    (["--distill-hard", "true"], "--distill-hard needs --distill > 0"),
    (["--teacher", "/no/such/teacher.safetensors", "--distill", "0.5"], "no such file"),
    (["--cutmix", "1", "--batch-size", "63"], "--batch-size must be even, got 63"),
    (["--epochs", "3", "--clean-epochs", "4"], "--clean-epochs must be in [0, --epochs (3)], got 4"),
    (["--repeat-aug", "0"], "--repeat-aug must be at least 1, got 0"),
    (["--epochs", "10", "--clean-epochs", "4", "--aug-anneal", "7"],
     "--aug-anneal must be in [0, --epochs - --clean-epochs (6)], got 7"),
    (["--aug-anneal", "2", "--rotate", "0", "--translate", "0", "--scale", "0"],
     "--aug-anneal weakens the warps"),
    (["--repeat-aug", "3", "--rotate", "0", "--translate", "0", "--scale", "0"],
     "this recipe augments nothing"),
    (["--eval-only"], "--eval-only needs --checkpoint"),
    (["--eval-only", "--checkpoint", "m.safetensors", "--teacher", "t.safetensors"],
     "--eval-only scores --checkpoint as it is; only training reads --teacher"),
    (["--eval-only", "--checkpoint", "m.safetensors", "--submit-weights", "final"],
     "only training reads --submit-weights"),
    (["--submit-weights", "last"], "invalid choice: 'last'"),
    (["--checkpoint", "m.safetensors"], "--checkpoint is read only by --eval-only"),
    (["--preset", "huge"], "invalid choice: 'huge'"),
    (["--widht", "3"], "unrecognized arguments: --widht 3"),
    (["--batch-size", "lots"], "invalid int value: 'lots'"),
    (["--limit-test", "-1"], "--limit-test: expected a whole number >= 1, got '-1'"),
])
def test_bad_options_fail_with_one_line_and_no_outputs(args, words, tmp_path, comp):
    extra = [] if "--data" in args else ["--data", str(comp)]
    proc = trainer("flax", *args, *extra, "--out", str(tmp_path / "run"), check=False)
    assert proc.returncode == 2
    assert words in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_with_another_config_is_refused_naming_the_fields(flax_run, comp):
    proc = trainer("flax", "--resume", str(flax_run), "--data", str(comp), "--lr", "0.1",
                   "--width", "64", check=False)
    assert proc.returncode == 2
    assert "lr (run: 0.003, now: 0.1)" in proc.stderr and "width (run: 32, now: 64)" in proc.stderr


def test_resume_with_other_data_is_refused_and_the_same_data_moved_is_taken(flax_run, comp, tmp_path):
    assert len(json.loads((flax_run / "config.json").read_text())["options"]["train_sha256"]) == 32
    other = write_competition(tmp_path / "other", 1100, 60, as_zip=True)  # 100 rows fewer
    proc = trainer("flax", "--resume", str(flax_run), "--data", str(other), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "its train.csv is not the one this run started with" in proc.stderr
    moved = tmp_path / "moved.zip"  # the same bytes elsewhere: the check is of the rows, not the path
    moved.write_bytes(comp.read_bytes())
    proc = trainer("flax", "--resume", str(flax_run), "--data", str(moved), check=False)
    assert "is not the one this run started with" not in proc.stderr


def test_unwritable_output_directory_is_refused(comp, tmp_path):
    if os.geteuid() == 0:
        target = "/proc/vit-run"  # even root cannot create this
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        target = str(tmp_path / "ro" / "run")
    proc = trainer("flax", "--data", str(comp), "--out", target, *FAST, check=False)
    assert proc.returncode == 2 and "cannot write the run directory" in proc.stderr


def test_a_bad_csv_through_the_trainer_fails_with_one_line_and_no_outputs(tmp_path):
    folder = write_competition(tmp_path / "comp", 20, 5)
    lines = (folder / "train.csv").read_text().splitlines()
    cells = lines[7].split(",")
    cells[100] = "300"
    lines[7] = ",".join(cells)
    (folder / "train.csv").write_text("\n".join(lines) + "\n")
    for framework in ("flax", "torch"):
        proc = trainer(framework, "--data", str(folder), "--out", str(tmp_path / "run"), check=False)
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
        assert "train.csv: row 8, column 'pixel99' is 300; expected a pixel value in 0..255" in proc.stderr
        assert not (tmp_path / "run").exists()


def test_a_second_flax_launch_reuses_the_compiled_step_and_trains_the_same(comp, tmp_path, monkeypatch):
    monkeypatch.setenv("VIT_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("JAX_LOG_COMPILES", "1")  # JAX then logs each persistent-cache hit
    fast_rotating = [*FAST, "--rotate", "10"]  # the step then draws random numbers from its key

    def launch(name, seed):
        proc = trainer("flax", "--data", str(comp), "--out", str(tmp_path / name), "--epochs", "1",
                       *fast_rotating, "--seed", seed)
        return proc.stderr, _metrics(tmp_path / name)

    hit = "Persistent compilation cache hit for 'jit_train_step'"
    cold_log, cold = launch("cold", "0")
    assert hit not in cold_log
    assert list((tmp_path / "cache" / "xla").glob("jit_train_step-*"))
    assert list((tmp_path / "cache" / "data").glob("digits-*.npz"))
    # Another seed is the same program (the key is an argument of the step): a hit, and
    # another run.
    warm_log, warm = launch("warm", "1")
    assert hit in warm_log
    assert [r["train_loss"] for r in warm] != [r["train_loss"] for r in cold]
    # With the cache off nothing is read (though it holds this program) or written, and the
    # first seed trains as it did with the cache. (tests/test_speed_tools.py's startup test checks a
    # launch that reads its step from the cache against one that compiles it.)
    before = sorted(p.name for p in (tmp_path / "cache").rglob("*"))
    monkeypatch.setenv("VIT_CACHE_DIR", "off")
    off_log, off = launch("off", "0")
    assert "Persistent compilation cache" not in off_log
    assert sorted(p.name for p in (tmp_path / "cache").rglob("*")) == before
    assert [r["train_loss"] for r in off] == [r["train_loss"] for r in cold]
    assert [r["val_acc"] for r in off] == [r["val_acc"] for r in cold]
