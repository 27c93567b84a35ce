"""The CNN baseline (train/cnn.py, train/cnn_main.py) and distilling a ViT from it."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxvit import train as jt
from jaxvit.model import ViT
from parity import weights as W
from parity.config import preset
from tests.helpers import run_refused, run_tool, trainer, write_competition
from train import cnn, common

CNN_FAST = ["--epochs", "2", "--lr", "3e-3", "--batch-size", "64", "--val-fraction", "0.2",
            "--channels", "8,16", "--quiet"]


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_competition(tmp_path_factory.mktemp("data") / "comp", 1200, 60, as_zip=True)


@pytest.fixture(scope="module")
def cnn_run(comp, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "cnn"
    run_tool("train/cnn_main.py", "--data", str(comp), "--out", str(out), "--tta", *CNN_FAST)
    return out


def test_the_cnn_baseline_learns_and_leaves_its_files(cnn_run):
    rows = [json.loads(line) for line in (cnn_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [1, 2]
    for key in ("train_loss", "val_acc", "img_per_s", "epoch_seconds", "since_launch_s"):
        assert all(key in r for r in rows), key
    assert rows[-1]["val_acc"] > 0.5  # chance is 0.1
    summary = json.loads((cnn_run / "summary.json").read_text())
    assert summary["final_val_acc"] == rows[-1]["val_acc"] and 0 < summary["tta_val_acc"] <= 1
    config = json.loads((cnn_run / "config.json").read_text())
    assert config["framework"] == "flax-cnn" and config["model"]["channels"] == [8, 16]
    assert config["recipe"]["lr"] == 3e-3 and config["recipe"]["ema_decay"] == 0.999  # the cpu recipe's
    assert W.file_format(cnn_run / "model.safetensors") == cnn.FORMAT
    params, loaded = cnn.load(cnn_run / "model.safetensors")
    assert loaded == cnn.CNNConfig(channels=(8, 16))
    logits = cnn.CNN(loaded).apply({"params": params}, jnp.zeros((2, 28, 28, 1)))
    assert logits.shape == (2, 10) and np.all(np.isfinite(logits))
    assert not [p for p in cnn_run.iterdir() if ".tmp" in p.name]


def test_a_cnn_file_whose_tensors_do_not_fit_its_config_is_refused(tmp_path):
    params = cnn.init_params(cnn.CNNConfig(channels=(8, 16)), 0)
    cnn.save(tmp_path / "a.safetensors", params, cnn.CNNConfig(channels=(8, 32)))
    with pytest.raises(cnn.CNNError, match="do not fit its config"):
        cnn.load(tmp_path / "a.safetensors")


def test_the_flax_trainer_distills_from_a_cnn_and_the_torch_twin_refuses_it(cnn_run, comp, tmp_path):
    teacher = cnn_run / "model.safetensors"
    fast = ["--preset", "tiny", "--batch-size", "64", "--val-fraction", "0.2", "--epochs", "1"]
    out = tmp_path / "student"
    trainer("flax", "--data", str(comp), "--out", str(out), "--teacher", str(teacher),
            "--distill", "0.5", *fast)
    run = json.loads((out / "config.json").read_text())
    assert run["recipe"]["distill"] == 0.5 and run["options"]["teacher"] == str(teacher)
    assert (out / "submission.csv").is_file()
    refused = run_refused("train/torch_main.py", "--data", str(comp), "--out", str(tmp_path / "t"),
                          "--teacher", str(teacher), "--distill", "0.5", *fast)
    assert "only the Flax trainer distills from a CNN" in refused.stderr
    assert not (tmp_path / "t").exists()  # refused before anything was written


def test_a_cnn_teacher_changes_the_students_step():
    """One training step of a ViT with and without a CNN teacher: the teacher's share of the
    targets moves the gradients (a teacher that went unused would leave them as they were; the
    loss is not compared: a fresh ViT's zero head gives ln 10 against any target)."""
    config = preset("tiny")
    recipe = common.Recipe(epochs=1, batch_size=8, rotate=0, translate=0, scale=0, distill=0.7)
    teacher_config = cnn.CNNConfig(channels=(4,))
    teacher = (cnn.CNN(teacher_config), cnn.init_params(teacher_config, 3))
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8))
    labels, order = jnp.arange(8, dtype=jnp.int32) % 10, jnp.arange(8, dtype=jnp.int32)
    tx = jt.make_optimizer(recipe, 1)
    after = []
    for t in (None, teacher):
        state = jt.create_state(config, recipe, tx, 0)
        step = jt.make_train_step(ViT(config), tx, recipe, 8, 1, 0, teacher=t)
        after.append(jax.device_get(step(state, images, labels, order, np.int32(0), np.int32(0))))
    moments = [a["opt_state"][1][0].mu for a in after]  # AdamW's first moments: the gradients' trace
    moved = jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), *moments)
    assert max(jax.tree_util.tree_leaves(moved)) > 1e-6


@pytest.mark.parametrize("args,words", [
    (["--channels", "8,0"], "--channels: expected whole numbers >= 1"),
    (["--distill", "0.5"], "the CNN baseline takes no --distill or --sam"),
    (["--cpu-devices", "0"], "expected a whole number >= 1, got '0'"),
    (["--batch-size", "63", "--cpu-devices", "2"], "--batch-size 63 does not split evenly over 2 devices"),
])
def test_cnn_main_refuses_bad_options_in_one_line(args, words, tmp_path):
    proc = run_refused("train/cnn_main.py", "--out", str(tmp_path / "r"), *args)
    assert words in proc.stderr
    assert not (tmp_path / "r").exists()
