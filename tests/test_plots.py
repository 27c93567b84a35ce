"""The pictures of a run (train/plots.py): drawn by both trainers at the end of real (tiny) runs,
redrawn by `python -m train.plots`, and checked against the run's own numbers."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import ROOT, env, trainer, write_competition
from train import data, plots

TINY = ["--preset", "tiny", "--epochs", "2", "--limit-train", "600", "--batch-size", "64",
        "--val-fraction", "0.2"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_competition(tmp_path_factory.mktemp("data") / "comp", 600, 20)


@pytest.fixture(scope="module")
def runs(comp, tmp_path_factory):
    """A Flax run (learned table, class token) and a PyTorch run (sincos2d table, gap pooling)."""
    root = tmp_path_factory.mktemp("runs")
    flax = trainer("flax", "--data", str(comp), "--out", str(root / "flax-learned"), *TINY,
                   "--posemb", "learned", "--pool", "cls", plots=True)
    torch = trainer("torch", "--data", str(comp), "--out", str(root / "torch-sincos2d"), *TINY,
                    "--posemb", "sincos2d", "--pool", "gap", plots=True)
    return {"flax": (root / "flax-learned", flax.stderr), "torch": (root / "torch-sincos2d", torch.stderr)}


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _val_labels(comp):
    labels = data.load_competition(comp).train_labels[:600]
    _, val_idx = data.stratified_split(labels, 0.2, 0)
    return labels, val_idx


def _check_png(path, name):
    assert path.read_bytes()[:8] == PNG_SIGNATURE, path
    import matplotlib.image

    width, height = (round(v * plots.DPI) for v in plots.FIGSIZE[name])
    assert matplotlib.image.imread(path).shape == (height, width, 4), path


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_both_trainers_draw_every_picture_at_the_end(runs, framework):
    run, stderr = runs[framework]
    assert "plots: 6 pictures" in stderr and "warning" not in stderr
    assert (run / "submission.csv").is_file()
    for name in plots.PICTURES:
        _check_png(run / "plots" / f"{name}.png", name)
    record = json.loads((run / "plots" / "plots.json").read_text())
    assert record["framework"] == framework and record["weights"] == "best.safetensors"
    assert record["figures"] == {n: [round(w * plots.DPI), round(h * plots.DPI)]
                                 for n, (w, h) in plots.FIGSIZE.items() if n in plots.PICTURES}


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_the_confusion_matrix_is_the_run_s_validation_accuracy(runs, comp, framework):
    run, _ = runs[framework]
    record = json.loads((run / "plots" / "plots.json").read_text())
    matrix = np.array(record["confusion"]["matrix"])
    labels, val_idx = _val_labels(comp)
    assert matrix.shape == (10, 10) and matrix.sum() == len(val_idx) == record["confusion"]["val_size"]
    np.testing.assert_array_equal(matrix.sum(axis=1), np.bincount(labels[val_idx], minlength=10))
    # The plotted weights are best.safetensors: the epoch of the best logged validation accuracy,
    # scored through the trainer's own evaluation, so the two accuracies are the same number.
    rows = _metrics(run)
    best = max(rows, key=lambda r: r["val_acc"])  # max() keeps the first of equal rows, as the trainer
    assert record["weights_epoch"] == best["epoch"]
    assert abs(np.trace(matrix) / matrix.sum() - best["val_acc"]) < 1e-9
    mistakes = record["mistakes"]
    assert len(mistakes) == min(plots.MAX_MISTAKES, matrix.sum() - np.trace(matrix))
    assert all(m["true"] != m["pred"] and m["index"] in set(val_idx.tolist()) for m in mistakes)
    assert all(labels[m["index"]] == m["true"] for m in mistakes)
    confidences = [m["confidence"] for m in mistakes]
    assert confidences == sorted(confidences, reverse=True) and all(0.1 <= c <= 1 for c in confidences)


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_curves_posemb_and_attention_come_from_the_run(runs, comp, framework):
    run, _ = runs[framework]
    record = json.loads((run / "plots" / "plots.json").read_text())
    rows = _metrics(run)
    assert record["curves"]["epoch"] == [1, 2]
    for key in plots.CURVE_KEYS:
        assert record["curves"][key] == [r[key] for r in rows], key
    config = json.loads((run / "config.json").read_text())["model"]
    tokens = 16 + (config["pool"] == "cls")
    assert record["posemb"] == {"kind": config["posemb"], "shape": [tokens, 32]}
    labels, val_idx = _val_labels(comp)
    assert record["patches"]["index"] == val_idx[0]
    picked = record["attention"]["indices"]
    assert len(picked) == plots.ATTENTION_DIGITS and set(picked) <= set(val_idx.tolist())
    assert len({int(labels[i]) for i in picked}) == len(picked)  # different digits
    maps = np.array(record["attention"]["maps"])
    assert maps.shape == (len(picked), 4, 4) and (maps > 0).all()
    if config["pool"] == "gap":  # the mean over tokens of row-stochastic rows sums to one
        np.testing.assert_allclose(maps.sum(axis=(1, 2)), 1, atol=1e-5)
    else:  # the class token's row without its own entry
        assert (maps.sum(axis=(1, 2)) < 1).all()


def test_the_plotted_weights_are_those_the_summary_names_as_the_submission_s(tmp_path):
    # best.safetensors unless the run submitted its final weights (--submit-weights final); a run
    # cut short has no summary.json yet, and then the best epoch's weights are drawn if there are any.
    for name in ("best.safetensors", "model.safetensors"):
        (tmp_path / name).write_bytes(b"weights")
    assert plots.weights_path(tmp_path).name == "best.safetensors"
    for named in ("model.safetensors", "best.safetensors"):
        (tmp_path / "summary.json").write_text(json.dumps({"submission_weights": named}))
        assert plots.weights_path(tmp_path).name == named
    (tmp_path / "summary.json").write_text("{not json")
    assert plots.weights_path(tmp_path).name == "best.safetensors"
    (tmp_path / "best.safetensors").unlink()
    assert plots.weights_path(tmp_path).name == "model.safetensors"


def test_rollout_averages_heads_adds_the_residual_and_multiplies_the_layers():
    rng = np.random.default_rng(0)
    layers = [rng.dirichlet(np.ones(5), size=(2, 3, 5)) for _ in range(3)]  # (B, heads, T, T), rows sum 1
    expected = np.eye(5)[None]
    for a in layers:
        a = (a.mean(axis=1) + np.eye(5)) / 2  # rows summing to one, plus I, renormalized
        expected = a @ expected
    joint = plots.rollout(layers)
    np.testing.assert_allclose(joint, expected, atol=1e-12)
    np.testing.assert_allclose(joint.sum(-1), 1, atol=1e-12)
    # Uniform attention everywhere: the rollout stays uniform off the residual's diagonal share.
    uniform = [np.full((1, 2, 4, 4), 0.25)]
    np.testing.assert_allclose(plots.rollout(uniform)[0], (np.full((4, 4), 0.25) + np.eye(4)) / 2)


def test_patch_similarity_skips_the_class_token_and_is_one_on_the_diagonal():
    from parity.config import preset

    config = preset("tiny")  # learned, cls: 17 tokens
    table = np.random.default_rng(1).normal(size=(17, 32))
    table[0] = 100.0  # the class token's row must play no part
    sim = plots.patch_similarity(table, config)
    assert sim.shape == (4, 4, 4, 4)
    np.testing.assert_allclose([sim[r, c, r, c] for r in range(4) for c in range(4)], 1)
    unit = table[1:] / np.linalg.norm(table[1:], axis=1, keepdims=True)
    np.testing.assert_allclose(sim[1, 2, 3, 0], unit[1 * 4 + 2] @ unit[3 * 4 + 0])


def test_command_redraws_a_run_and_compares_two(runs, tmp_path):
    flax_run, torch_run = runs["flax"][0], runs["torch"][0]
    proc = subprocess.run([sys.executable, "-m", "train.plots", str(flax_run), "--compare", str(torch_run),
                           "--out", str(tmp_path / "pics")], capture_output=True, text=True, cwd=ROOT,
                          env=env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for name in (*plots.PICTURES, "curves-compare"):
        _check_png(tmp_path / "pics" / f"{name}.png", name)
    assert "curves-compare: " in proc.stdout
    assert plots.run_label(flax_run) == "flax flax-learned"
    assert plots.run_label(torch_run) == "torch torch-sincos2d"
    # The redrawn numbers are the trainer's: the same confusion matrix.
    redrawn = json.loads((tmp_path / "pics" / "plots.json").read_text())
    original = json.loads((flax_run / "plots" / "plots.json").read_text())
    assert redrawn["confusion"] == original["confusion"]


@pytest.mark.parametrize("case", ["missing", "no-metrics", "empty-metrics"])
def test_command_refuses_a_bad_run_with_one_line(case, runs, tmp_path):
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
        shutil.copy(runs["flax"][0] / "config.json", run)
    if case == "empty-metrics":
        (run / "metrics.jsonl").write_text("")
    proc = subprocess.run([sys.executable, "-m", "train.plots", str(run)], capture_output=True, text=True,
                          cwd=ROOT, env=env(), timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr
    assert {"missing": "no such run directory", "no-metrics": "no metrics.jsonl",
            "empty-metrics": "holds no epochs"}[case] in lines[0]
    assert not (run / "plots").exists()


@pytest.mark.parametrize("damage", ["metrics", "weights"])
def test_a_plotting_failure_is_one_warning_and_no_exception(damage, runs, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(runs["flax"][0], run, ignore=shutil.ignore_patterns("plots"))
    if damage == "metrics":
        (run / "metrics.jsonl").write_text('{"epoch": 1, "train_loss": 2.3, "train_acc"\n')
    else:
        raw = (run / "best.safetensors").read_bytes()
        (run / "best.safetensors").write_bytes(raw[: len(raw) // 2])
    submission = (run / "submission.csv").read_bytes()
    assert plots.draw_safely(run) is None
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: plotting failed: ")
    assert ("metrics.jsonl: line 1" if damage == "metrics" else "best.safetensors") in err[0]
    assert (run / "submission.csv").read_bytes() == submission
    assert not (run / "plots").exists()


def test_without_a_validation_split_the_held_out_pictures_are_left_out(runs, comp, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(runs["torch"][0], run, ignore=shutil.ignore_patterns("plots"))
    stored = json.loads((run / "config.json").read_text())
    stored["recipe"]["val_fraction"] = 0.0
    (run / "config.json").write_text(json.dumps(stored))
    files = plots.plot_run(run, data.load_competition(comp))
    assert set(files) == {"posemb", "patches", "curves", "attention", "data"}
    record = json.loads(files["data"].read_text())
    assert "confusion" not in record and record["attention"]["indices"][0] == 0
    for name in ("posemb", "patches", "curves", "attention"):
        _check_png(files[name], name)


def test_no_plots_skips_the_pictures(comp, tmp_path):
    proc = trainer("torch", "--data", str(comp), "--out", str(tmp_path / "run"), *TINY, "--epochs", "1",
                   "--no-plots")
    assert (tmp_path / "run" / "submission.csv").is_file()
    assert not (tmp_path / "run" / "plots").exists() and "plots:" not in proc.stderr


def test_posemb_picture_without_a_table_says_so_instead_of_a_similarity(tmp_path):
    from parity.config import preset

    c = preset("tiny", posemb="none", rope=True)
    table = plots.posemb_table(c, {})
    assert table.shape == (c.num_tokens, c.width) and not table.any()
    path = plots.draw_posemb(tmp_path / "posemb.png", c, table)
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    with_table = preset("tiny", posemb="sincos2d")
    assert not np.isnan(plots.patch_similarity(plots.posemb_table(with_table, {}), with_table)).any()
