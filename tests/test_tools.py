"""The benchmark, ensemble and experiment commands, run for real at tiny sizes."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from parity.config import preset
from tests.helpers import ROOT, env, trainer, write_competition
from train import data
from train.bench import flops_per_image, markdown, pool_rounds
from train.ensemble import combine
from train.tta_study import SETS, VIEWS


def _run(*args, timeout=600):
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env(),
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_bench_writes_rows_table_and_chart(tmp_path):
    out = tmp_path / "bench"
    proc = _run(str(ROOT / "train" / "bench.py"), "--preset", "tiny", "--batch-size", "8",
                "--steps", "2", "--warmup", "1", "--modes", "flax-fp32,torch-eager-fp32",
                "--patchify-batches", "8", "--cpu-devices", "2", "--depth", "1", "--spt", "true",
                "--out", str(out))
    rows = json.loads((out / "bench.json").read_text())
    # config overrides, as the trainers take them: the model timed and its FLOPs are that one
    config = preset("tiny", depth=1, spt=True)
    timed = [r for r in rows if r["kind"] in ("train", "inference")]
    assert {(r["mode"], r["kind"]) for r in timed} == {
        (m, k) for m in ("flax-fp32", "torch-eager-fp32") for k in ("train", "inference")}
    for r in timed:
        for key in ("device", "jax", "flax", "torch", "config", "batch", "flops_per_image",
                    "img_per_s", "tflops", "mfu", "median_s", "first_call_s"):
            assert key in r, key
        assert r["batch"] == 8 and r["img_per_s"] > 0 and r["config"] == config.to_dict()
        assert r["flops_per_image"] == (3 if r["kind"] == "train" else 1) * flops_per_image(config)
        assert r["devices"] == (2 if r["framework"] == "flax" else 1)
        if r["framework"] == "flax":  # the flags the trainer uses, recorded beside the timing
            assert "--xla_cpu_experimental_ynn_fusion_type=" in r["xla_flags"].split()
    patch = [r for r in rows if r["kind"] == "patchify"]
    assert {r["framework"] for r in patch} == {"flax", "torch"}
    header = "| mode | train img/s | train p10-p90 | train TFLOP/s | train MFU |"
    assert header in proc.stdout and header in (out / "bench.md").read_text()
    assert "preset `tiny (depth=1, spt=True)`" in proc.stdout
    assert "| flax-fp32 (2 CPU devices) |" in proc.stdout and "| torch-eager-fp32 |" in proc.stdout
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_rounds_pool_the_steps_and_pair_each_round(tmp_path):
    # --rounds: the same modes timed in turn; two rounds of made-up step times, the machine
    # twice as slow in the second round, where the ratio between modes stays 2
    def row(mode, kind, times, first):
        return {"mode": mode, "kind": kind, "framework": mode.split("-")[0], "devices": 1,
                "batch": 10, "flops_per_image": 1e6, "device": "CPU", "first_call_s": first,
                "times_s": times, "attention": "sdpa"}
    rounds = [[row("flax-fp32", k, [0.1, 0.1, 0.12], 5.0), row("torch-eager-fp32", k, [0.05] * 3, 1.0)]
              for k in ("train", "inference")]
    rounds = [rounds[0] + rounds[1],
              [row("flax-fp32", k, [0.2] * 3, 2.0) for k in ("train", "inference")]
              + [row("torch-eager-fp32", k, [0.1] * 3, 0.5) for k in ("train", "inference")]]
    rows = pool_rounds(rounds)
    assert [(r["mode"], r["kind"]) for r in rows] == [
        ("flax-fp32", "train"), ("torch-eager-fp32", "train"), ("flax-fp32", "inference"),
        ("torch-eager-fp32", "inference")]
    flax, torch_ = rows[0], rows[1]
    assert flax["n"] == 6 and flax["median_s"] == pytest.approx(0.16)  # the six steps pooled
    assert flax["img_per_s"] == pytest.approx(10 / 0.16)
    assert [r["img_per_s"] for r in flax["rounds"]] == pytest.approx([100.0, 50.0])
    assert [r["first_call_s"] for r in torch_["rounds"]] == [1.0, 0.5]
    assert flax["round_ratio"] == 1.0 and torch_["round_ratio"] == pytest.approx(2.0)
    args = type("Args", (), {"rounds": 2, "steps": 3, "batch_size": 10, "preset": "tiny"})()
    env = {"device": "CPU", "jax": "x", "flax": "x", "torch": "x"}
    text = markdown(rows, env, args)
    assert "median of 2 rounds x 3 timed steps" in text
    assert "| torch-eager-fp32 | 200, 100 | 2.00 | 200, 100 | 2.00 |" in text


@pytest.mark.parametrize("args,words", [
    (["--patchify-batches", "64,x"], "expected comma-separated whole numbers >= 1, got '64,x'"),
    (["--warmup", "-1"], "--warmup >= 0"),
    (["--rounds", "0"], "--rounds and --cpu-devices must be >= 1"),
    (["--modes", "flax-fp64"], "unknown mode(s) ['flax-fp64']"),
    (["--modes", ",", "--patchify-batches", ""], "nothing to time"),
    (["--modes", "flax-fp32", "--steps", "lots"], "invalid int value: 'lots' (see python train/bench.py --help)"),
    (["--spt", "maybe"], "argument --spt: expected true or false, got 'maybe'"),
    (["--preset", "tiny", "--patch-size", "5"], "error: image size 28x28 is not divisible by patch_size 5"),
    (["--crop", "2", "--patch-size", "6", "--modes", "flax-fp32,timm-eager-fp32"],
     "timm-* modes need --crop 0"),
    (["--device", "cpu", "--modes", "flax-bf16", "--flax-attention", "cudnn"],
     "--flax-attention cudnn needs a GPU"),
])
def test_bench_refuses_bad_options_before_any_work(args, words, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "bench.py"), *args,
                           "--out", str(tmp_path / "bench")], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "bench").exists()


def test_bench_without_a_gpu_refuses_cudnn_attention_in_one_line(tmp_path):
    # found out in the measuring process, which JAX tells there is no GPU: its one line comes back
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "bench.py"), "--preset", "tiny",
                           "--modes", "flax-bf16", "--flax-attention", "cudnn", "--steps", "1",
                           "--patchify-batches", "", "--out", str(tmp_path / "bench")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last == "error: --flax-attention cudnn needs a GPU; JAX runs on cpu here"
    assert not (tmp_path / "bench" / "bench.json").exists()


@pytest.mark.skipif(importlib.util.find_spec("timm") is not None, reason="timm is installed here")
def test_bench_timm_modes_need_timm_and_say_so(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "bench.py"), "--modes",
                           "flax-fp32,timm-compile-bf16", "--out", str(tmp_path / "bench")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2 and "timm is not installed (pip install timm)" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "bench").exists()


def test_every_run_of_every_plan_is_one_its_trainer_accepts():
    # a plan's typo would otherwise surface only when it runs, on a GPU lent for minutes
    from train.common import build_parser, resolve_run
    from train.experiments import PLANS

    runs = 0
    for name, plan in PLANS.items():
        done: set[str] = set()
        for stage in plan.get("stages", [plan]):
            for r in stage["runs"]:
                args = build_parser("trainer", r["trainer"]).parse_args(
                    [*r["args"], "--data", "digit-recognizer.zip", "--out", "run"])
                resolve_run(args)  # the config and the recipe it describes are valid
                runs += 1
            done |= {r["name"] for r in stage["runs"]}
            for ensemble, members, *_ in stage.get("ensembles", []):
                assert set(members) <= done, (name, ensemble, set(members) - done)
    assert runs > 100


def test_kaggle_preset_trains_and_ensemble_with_tta_scores_runs(tmp_path):
    comp = write_competition(tmp_path / "comp", 700, 30, as_zip=True)
    common = ["--data", str(comp), "--epochs", "1", "--limit-train", "600", "--batch-size", "64",
              "--val-fraction", "0.2"]
    trainer("flax", "--preset", "kaggle", *common, "--repeat-aug", "3", "--out", str(tmp_path / "k0"))
    # a second member of another size, on the same split: ensembles take unlike models
    trainer("flax", "--preset", "tiny", *common, "--seed", "1", "--out", str(tmp_path / "k1"))
    cfg = json.loads((tmp_path / "k0" / "config.json").read_text())
    assert cfg["model"]["drop_path"] == 0.1 and cfg["recipe"]["ema_decay"] > 0
    assert cfg["recipe"]["rotate"] == 15 and cfg["recipe"]["translate"] == 3  # the stronger augmentation
    assert cfg["recipe"]["repeat_aug"] == 3
    pseudo = tmp_path / "pseudo.csv"
    proc = _run(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "k0"), str(tmp_path / "k1"),
                "--data", str(comp), "--tta", "--out", str(tmp_path / "ens"),
                "--pseudo-labels", str(pseudo), "--min-confidence", "0.111")
    report = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    assert report["tta"] and len(report["members"]) == 2 and report["val_images"] == 120
    assert 0.0 <= report["ensemble_val_acc"] <= 1.0
    assert report["combine"] == "mean" and report["ensemble_val_acc"] == report["combiners"]["mean"]
    assert set(report["combiners"]) == {"mean", "log-mean", "vote", "max-confidence"}
    assert "ensemble of 2 with TTA (mean)" in proc.stderr and "other rules: log-mean" in proc.stderr
    # where the errors are: train.csv rows, consistent with the accuracies and with each other
    errors = report["errors"]
    for member, wrong in zip(report["members"], errors["members"], strict=True):
        assert len(wrong) == round((1 - member["val_acc"]) * 120)
    assert len(errors["ensemble"]) == round((1 - report["ensemble_val_acc"]) * 120)
    every, anyone = set(errors["every"]), set(errors["any"])
    assert every == set(errors["members"][0]) & set(errors["members"][1])
    assert anyone == set(errors["members"][0]) | set(errors["members"][1])
    assert set(errors["rescued"]) == every - set(errors["ensemble"])
    assert errors["oracle_val_acc"] == pytest.approx(1 - len(every) / 120)
    _, val_rows = data.stratified_split(data.resolve(str(comp)).train_labels[:600], 0.2, 0)
    assert anyone <= set(val_rows.tolist()) and "wrong in every member" in proc.stderr
    # probs.npz: what each member predicted, from which the ensemble's scores follow again
    probs = np.load(tmp_path / "ens" / "probs.npz")
    assert probs["val_probs"].shape == (2, 120, 10) and probs["test_probs"].shape == (2, 30, 10)
    assert (probs["val_rows"] == val_rows).all()
    assert report["split"] == {"val_fraction": 0.2, "split_seed": 0, "limit_train": 600}
    assert list(probs["members"]) == [m["weights"] for m in report["members"]]
    assert np.allclose(probs["val_probs"].sum(-1), 1, atol=1e-5)
    for member, p in zip(report["members"], probs["val_probs"], strict=True):
        assert np.mean(p.argmax(-1) == probs["val_labels"]) == pytest.approx(member["val_acc"])
    assert (np.mean(combine(list(probs["val_probs"])).argmax(-1) == probs["val_labels"])
            == pytest.approx(report["ensemble_val_acc"]))
    submission = pd.read_csv(tmp_path / "ens" / "submission.csv")
    assert len(submission) == 30
    # the pseudo-labels: the test images the ensemble is sure of, with its submitted labels
    kept = pd.read_csv(pseudo)
    assert list(kept.columns) == ["ImageId", "Label", "Confidence"]
    assert len(kept) == report["pseudo_labels"]["kept"] and 0 < len(kept) < 30
    assert (kept["Confidence"] >= 0.111).all()  # near the median of a 1-epoch model's (~0.11)
    assert (submission.set_index("ImageId").loc[kept["ImageId"], "Label"].to_numpy()
            == kept["Label"].to_numpy()).all()
    # --weights final scores each run's model.safetensors: the last epoch's weights, as trained
    # (here the tiny member's: quicker to score than the kaggle one)
    _run(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "k1"), "--data", str(comp),
         "--weights", "final", "--combine", "vote", "--out", str(tmp_path / "fin"))
    report = json.loads((tmp_path / "fin" / "ensemble.json").read_text())
    assert report["combine"] == "vote" and report["ensemble_val_acc"] == report["combiners"]["vote"]
    last = json.loads((tmp_path / "k1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert report["weights"] == "final" and report["members"][0]["weights"].endswith("model.safetensors")
    assert report["members"][0]["val_acc"] == pytest.approx(last["val_acc"], abs=1e-9)
    # the reports' errors, gathered over both ensembles by train/hard_digits.py: three models
    # (k0 and k1's best weights, k1's final), each row counted once a model that got it wrong
    first = json.loads((tmp_path / "ens" / "ensemble.json").read_text())
    wrong = [set(w) for w in first["errors"]["members"] + report["errors"]["members"]]
    proc = _run(str(ROOT / "train" / "hard_digits.py"), str(tmp_path / "ens" / "ensemble.json"),
                str(tmp_path / "fin" / "ensemble.json"), "--data", str(comp), "--share", "0.3",
                "--png", str(tmp_path / "hard.png"), "--json", str(tmp_path / "hard.json"))
    hard = json.loads((tmp_path / "hard.json").read_text())
    assert hard["models"] == 3 and hard["val_images"] == 120
    assert {h["row"]: h["wrong_in"] for h in hard["hard"]} == {
        row: k for row in set.union(*wrong) if (k := sum(row in w for w in wrong)) >= 0.3 * 3}
    assert hard["wrong_in_every_model"] == sorted(set.intersection(*wrong))
    labels = data.resolve(str(comp)).train_labels
    for h in hard["hard"][:3]:
        assert f"| {h['row']} | {labels[h['row']]} | {h['wrong_in']} of 3 |" in proc.stdout
    assert (tmp_path / "hard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _report(path, val_images, members, split_seed=None):
    """An ensemble.json as train/ensemble.py writes it, reduced to what hard_digits reads (and
    without `split`, as before ensemble.py wrote it, unless a split seed is given)."""
    report = {"val_images": val_images, "members": [{"weights": w} for w, _ in members],
              "errors": {"members": [sorted(e) for _, e in members]}}
    if split_seed is not None:
        report["split"] = {"val_fraction": 0.1, "split_seed": split_seed, "limit_train": None}
    path.write_text(json.dumps(report))
    return str(path)


def test_hard_digits_counts_each_model_once_on_one_split_and_measures_the_goals(tmp_path):
    a = _report(tmp_path / "a.json", 1000, [("m0", {1, 2, 3}), ("m1", {1, 2, 4, 5, 6})])
    # nested as docs/results holds them; m0 scored again with the same errors counts once
    (tmp_path / "b.json").write_text(json.dumps({"plan": "x", "ensembles": [json.loads(
        Path(_report(tmp_path / "c.json", 1000, [("m0", {1, 2, 3}), ("m2", {1, 7})])).read_text())]}))
    other = _report(tmp_path / "d.json", 500, [("m9", {1, 2})])  # another split: left out
    # the same size, but other images: split seed 3 is left out; seed 0 named is the default split
    other_seed = _report(tmp_path / "e.json", 1000, [("m7", {1, 2}), ("m8", {2, 9})], split_seed=3)
    named = _report(tmp_path / "f.json", 1000, [("m2", {1, 7})], split_seed=0)  # m2 again: once
    proc = _run(str(ROOT / "train" / "hard_digits.py"), a, str(tmp_path / "b.json"), other, other_seed,
                named, "--goals", "0.998", "0.997", "--json", str(tmp_path / "s.json"))
    s = json.loads((tmp_path / "s.json").read_text())
    assert (s["models"], s["models_on_other_splits"]) == (3, 3)
    assert s["hard"] == [{"row": 1, "wrong_in": 3}, {"row": 2, "wrong_in": 2}]  # share 0.5 of 3
    assert s["wrong_in_every_model"] == [1] and (s["fewest_errors"], s["median_errors"]) == (2, 3)
    assert [(g["errors_allowed"], g["models_reaching_it"]) for g in s["goals"]] == [(2, 1), (3, 2)]
    assert "3 models scored on a validation split of 1000 images (3 on other splits" in proc.stdout
    assert "goal 99.80%: at most 2 errors, 1 of them taken" in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["{bad}"], "not JSON"), (["{none}"], "no model's errors"), (["{missing}"], "cannot read"),
    (["{none}", "--png", "x.png"], "--png needs --data"), (["{none}", "--goals", "99.7"], "between 0 and 1")])
def test_hard_digits_refuses_bad_input_in_one_line(args, words, tmp_path):
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "none.json").write_text(json.dumps({"plan": "x", "runs": []}))
    names = {"bad": tmp_path / "bad.json", "none": tmp_path / "none.json", "missing": tmp_path / "no.json"}
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "hard_digits.py"),
                           *[a.format(**names) for a in args]], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_each_combining_rule_decides_as_it_says():
    from train.ensemble import COMBINERS

    # three members, four images (rows), three classes; each image splits the rules differently
    members = [np.array([[0.9, 0.1, 0.0], [0.51, 0.49, 0.0], [0.6, 0.4, 0.0], [0.5, 0.3, 0.2]]),
               np.array([[0.9, 0.1, 0.0], [0.51, 0.49, 0.0], [0.6, 0.4, 0.0], [0.1, 0.6, 0.3]]),
               np.array([[1e-9, 0.9, 0.1], [0.0, 1.0, 0.0], [0.35, 0.65, 0.0], [0.3, 0.3, 0.4]])]
    expected = {"mean": [0, 1, 0, 1],
                "log-mean": [1, 1, 0, 1],  # the third member all but rules out class 0 of image 0
                "vote": [0, 0, 0, 1],  # image 3: one vote each, the mean breaks the tie
                "max-confidence": [0, 1, 1, 1]}  # image 2: the third member is the surest
    assert set(expected) == set(COMBINERS)
    for how, labels in expected.items():
        p = combine(members, how)
        assert p.argmax(-1).tolist() == labels, how
        assert np.allclose(p.sum(-1), 1) and (p >= 0).all()


def test_ensemble_refuses_runs_scored_on_different_splits(tmp_path):
    comp = write_competition(tmp_path / "comp", 300, 10, as_zip=True)
    common = ["--data", str(comp), "--preset", "tiny", "--epochs", "1", "--batch-size", "64"]
    trainer("flax", *common, "--out", str(tmp_path / "a"))
    trainer("flax", *common, "--split-seed", "5", "--out", str(tmp_path / "b"))
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"),
                           str(tmp_path / "b"), "--data", str(comp), "--out", str(tmp_path / "e")],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "different validation splits" in proc.stderr
    # without --data the ensemble scores on the runs' own data; other data is refused
    proc = _run(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"), "--out", str(tmp_path / "e"))
    assert f"scoring on {comp}, the runs' own" in proc.stderr and "DEMO" not in proc.stderr
    assert len(pd.read_csv(tmp_path / "e" / "submission.csv")) == 10
    other = write_competition(tmp_path / "other", 290, 10, as_zip=True)
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"),
                           "--data", str(other), "--out", str(tmp_path / "e2")],
                          capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "not the train.csv the runs trained on" in proc.stderr
    (tmp_path / "b" / "config.json").write_text("{torn")
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ensemble.py"), str(tmp_path / "b"),
                           "--out", str(tmp_path / "e3")], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "unreadable run config" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("args,words", [
    (["--min-confidence", "2"], "--min-confidence must be in [0, 1], got 2.0"),
    (["--pseudo-labels", "/no/such/folder/p.csv"], "no such folder to write it in"),
    (["--pseudo-labels", "/tmp"], "a folder; give the CSV file to write"),
    (["--combine", "median"], "invalid choice: 'median'"),
])
def test_ensemble_refuses_bad_pseudo_label_options_before_any_work(args, words, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "ensemble.py"), str(tmp_path / "run"),
                           "--out", str(tmp_path / "e"), *args], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "e").exists()


def test_tta_study_scores_view_sets_as_the_trainers_tta_does(tmp_path):
    comp = write_competition(tmp_path / "comp", 400, 10, as_zip=True)
    trainer("flax", "--data", str(comp), "--preset", "tiny", "--epochs", "1", "--batch-size", "64",
            "--val-fraction", "0.25", "--out", str(tmp_path / "a"))
    study = [str(ROOT / "train" / "tta_study.py"), str(tmp_path / "a"), "--data", str(comp)]
    proc = _run(*study, "--out", str(tmp_path / "s"))
    report = json.loads((tmp_path / "s" / "tta_study.json").read_text())
    acc = {r["set"]: r["val_acc_mean"] / 100 for r in report["rows"]}
    assert set(acc) == set(SETS) and "| shifts5 | 5 |" in proc.stdout
    # its "none" is the trainer's score of its final weights, its "shifts5" what ensemble.py
    # scores on them with --tta
    last = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert acc["none"] == pytest.approx(last["val_acc"])
    _run(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"), "--data", str(comp), "--weights",
         "final", "--tta", "--out", str(tmp_path / "e"))
    scored = json.loads((tmp_path / "e" / "ensemble.json").read_text())["ensemble_val_acc"]
    assert acc["shifts5"] == pytest.approx(scored)
    row = next(r for r in report["rows"] if r["set"] == "shifts9")
    assert row["wrong_even"][0] + row["wrong_odd"][0] == row["wrong"][0] == round((1 - acc["shifts9"]) * 100)
    # every view's softmax is kept in the run, and a second call reads it instead of recomputing
    cache = tmp_path / "a" / "tta_views.npz"
    views = np.load(cache)
    assert set(views.files) == set(VIEWS) | {"labels"} and views["aug3"].shape == (100, 10)
    assert not np.allclose(views["aug3"], views["aug4"])  # draws differ from one another
    before = cache.stat().st_mtime_ns
    _run(*study, "--out", str(tmp_path / "s2"))
    assert cache.stat().st_mtime_ns == before
    assert (tmp_path / "s2" / "tta_study.md").read_text() == (tmp_path / "s" / "tta_study.md").read_text()
    # a damaged cache is scored again and written anew, to the same table
    cache.write_bytes(cache.read_bytes()[:200])
    _run(*study, "--out", str(tmp_path / "s3"))
    assert (tmp_path / "s3" / "tta_study.md").read_text() == (tmp_path / "s" / "tta_study.md").read_text()
    assert set(np.load(cache).files) == set(VIEWS) | {"labels"}


def test_tta_study_refuses_a_directory_that_is_not_a_run(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "tta_study.py"), str(tmp_path),
                           "--out", str(tmp_path / "s")], capture_output=True, text=True, env=env())
    assert proc.returncode == 2 and "not a run directory" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_compare_runs_tells_a_repeated_run_from_another_seed(tmp_path):
    comp = write_competition(tmp_path / "comp", 300, 10, as_zip=True)
    common = ["--data", str(comp), "--preset", "tiny", "--epochs", "1", "--batch-size", "64"]
    for name, seed in (("a", "0"), ("b", "0"), ("c", "1")):
        trainer("flax", *common, "--seed", seed, "--out", str(tmp_path / name))
    def compare(*args):
        return subprocess.run([sys.executable, str(ROOT / "train" / "compare_runs.py"), *args],
                              capture_output=True, text=True, env=env())

    same = compare(str(tmp_path / "a"), str(tmp_path / "b"))
    assert same.returncode == 0 and "weights: equal to the bit" in same.stdout
    assert "curves: equal over 1 epochs" in same.stdout
    other = compare(str(tmp_path / "a"), str(tmp_path / "c"), "--json")
    report = json.loads(other.stdout)
    assert other.returncode == 1 and not report["equal"] and report["max_abs_diff"] > 0
    assert report["first_epoch_differing"] == 1 and report["environment_differs"] == {}
    bad = compare(str(tmp_path / "a"), str(tmp_path / "comp"))
    assert bad.returncode == 2 and "holds no model.safetensors" in bad.stderr
    assert len(bad.stderr.splitlines()) == 1
    # a kill mid-write leaves a torn last metrics line: the epochs before it still compare
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "val_ac')
    assert compare(str(tmp_path / "a"), str(tmp_path / "b")).returncode == 0
    (tmp_path / "c" / "summary.json").write_text("{torn")
    torn = compare(str(tmp_path / "a"), str(tmp_path / "c"))
    assert torn.returncode == 2 and "summary.json: unreadable" in torn.stderr and "Traceback" not in torn.stderr


def test_experiment_runner_collects_groups_and_ensembles(tmp_path):
    comp = write_competition(tmp_path / "comp", 500, 10, as_zip=True)
    _run(str(ROOT / "train" / "experiments.py"), "--plan", "smoke", "--data", str(comp),
         "--out", str(tmp_path / "exp"), "--extra", "--limit-train 400", "--jobs", "2")
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["tiny-s0", "tiny-s1", "tiny-pseudo"]  # plan order
    assert all(r["returncode"] == 0 and r["epochs"] == 1 and r["concurrent_runs"] == 2
               and not r["killed_at_deadline"] for r in results["runs"])
    assert results["groups"]["tiny"]["n"] == 2
    ens = results["ensembles"][0]
    assert ens["name"] == "tiny-ens" and "ensemble_val_acc" in ens
    assert ens["pseudo_labels"]["kept"] == 10  # --min-confidence 0 keeps all of test.csv
    # the second stage trained on them: the ensemble's labels of the 10 test images
    assert "pseudo-labels: 10 test images" in (tmp_path / "exp" / "tiny-pseudo.log").read_text()


def test_experiment_runner_stops_runs_at_the_deadline_and_keeps_what_they_did(tmp_path):
    comp = write_competition(tmp_path / "comp", 500, 10, as_zip=True)
    _run(str(ROOT / "train" / "experiments.py"), "--plan", "smoke", "--data", str(comp),
         "--out", str(tmp_path / "exp"), "--deadline", "0")
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["tiny-s0"]  # the second never started
    assert results["runs"][0]["killed_at_deadline"] and results["runs"][0]["returncode"] < 0
    assert results["ensembles"] == []  # nothing finished to ensemble


def test_xla_flags_are_appended_once_and_never_override_the_user():
    from jaxvit import xla_flags

    env = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=true"}
    assert xla_flags.apply(env).split() == ["--xla_cpu_multi_thread_eigen=true",
                                            "--xla_cpu_experimental_ynn_fusion_type="]
    assert xla_flags.apply(env) == env["XLA_FLAGS"]  # a second call adds nothing
    mine = {"XLA_FLAGS": "--xla_cpu_experimental_ynn_fusion_type=individual_dot"}
    assert xla_flags.apply(mine) == "--xla_cpu_experimental_ynn_fusion_type=individual_dot"
    off = {"VIT_XLA_DEFAULTS": "0"}
    assert xla_flags.apply(off) == "" and "XLA_FLAGS" not in off
    assert xla_flags._version("0.10.2") == (0, 10) and xla_flags._version("0.9.0rc1") == (0, 9)


def test_profile_step_names_where_each_frameworks_time_goes(tmp_path):
    out = tmp_path / "profile"
    proc = _run(str(ROOT / "train" / "profile_step.py"), "--preset", "tiny", "--batch-size", "8",
                "--steps", "2", "--depth", "1", "--rope", "true", "--out", str(out))
    results = json.loads((out / "profile.json").read_text())
    assert [r["framework"] for r in results] == ["flax", "torch"]
    for r in results:
        assert r["total_ms"] > 0 and r["top_ops"]
        assert abs(sum(c["share"] for c in r["classes"]) - 1) < 1e-6
        assert abs(sum(c["ms"] for c in r["classes"]) - r["total_ms"]) < 1e-6 * r["total_ms"] + 1e-9
    flax_classes = {c["class"] for c in results[0]["classes"]}
    # the traced XLA kernels were matched to the compiled module, not all left as "other"
    assert {"matmul (dense layers)", "matmul, batched (attention)"} <= flax_classes
    assert "| class | flax | torch |" in proc.stdout and (out / "profile.md").is_file()
    assert "preset `tiny (depth=1, rope=True)`" in proc.stdout  # config overrides, as bench takes them


def test_profile_reads_gpu_kernels_run_inside_a_command_buffer():
    # the H100 trace's format: a CUDA graph's kernels all carry hlo_op "command_buffer_N" and
    # their own names with '_' where the HLO instruction has '.'; cuBLAS kernels match no name
    from train import profile_step as ps

    hlo = "\n".join([
        "ENTRY %main (p: f32[4]) -> f32[4] {",
        '  %input_transpose_fusion.38 = f32[50,192,1024]{2,1,0} fusion(%a), kind=kInput, calls=%t, '
        'metadata={op_name="jit(train_step)/jvp(ViT)/blocks_0/add"}',
        '  %input_add_reduce_fusion = (bf16[128,768]{1,0}, bf16[51200,768]{1,0}) fusion(%b), '
        'kind=kInput, calls=%r, metadata={op_name="jit(train_step)/transpose(jvp(ViT))/fc1/reduce_sum"}',
        "}",
        "%t (x: f32[4]) -> f32[4] {", "  ROOT %transpose.1 = f32[4]{0} transpose(%x), dimensions={0}", "}",
        "%r (x: f32[4]) -> f32[4] {", "  ROOT %reduce.1 = f32[4]{0} reduce(%x, %c), dimensions={0}", "}",
    ])
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 14,
             "args": {"name": "Stream #14(Memset,Compute)"}},
            {"ph": "M", "name": "thread_name", "pid": 1, "tid": 99, "args": {"name": "XLA Ops"}}]

    def kernel(name, dur, tid=14):
        return {"ph": "X", "pid": 1, "tid": tid, "name": name, "dur": dur,
                "args": {"hlo_op": "command_buffer_1"}}

    trace = {"traceEvents": meta + [
        kernel("input_transpose_fusion_38", 3000), kernel("input_add_reduce_fusion", 2000),
        kernel("nvjet_sm90_tss_192x96_64x5_1x2_h_bz_NTT", 1000),
        kernel("input_transpose_fusion_38", 3000, tid=99)]}  # a summary line: not counted
    result = ps.analyze_flax(trace, hlo, steps=2, wall=4.0)
    classes = {c["class"]: c["ms"] for c in result["classes"]}
    assert classes == {"transposes (with what XLA fused into them)": 1.5,
                       "reductions (softmax, LayerNorm, bias grads)": 1.0,
                       "matmul (dense layers)": 0.5}
    phases = {p["phase"]: p["ms"] for p in result["phases"]}
    assert phases["forward"] == 1.5 and phases["backward"] == 1.0


def test_profile_names_pytorch_gpu_kernels_by_class_eager_and_compiled():
    # eager ATen kernels and torch.compile's Triton kernels (named after the operators they fuse)
    from train.profile_step import kernel_class, shown

    expected = {
        "triton_per_fused_native_layer_norm_0": "reductions",
        "triton_red_fused_sum_7": "reductions",
        "triton_poi_fused__to_copy_add_mul_4": "elementwise",
        "triton_poi_fused_clone_permute_12": "layout",
        "nvjet_sm90_tss_192x96_64x5_1x2_h_bz_NTT": "matmul (dense",
        "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64": "matmul (dense",
        "void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<>": "matmul, batched",
        "cudnn_generated_fort_native_sdpa_sm90_knob_7_64x128x64_4x1x1_kernel0_0": "matmul, batched",
        "void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, float>": "reductions",
        "void at::native::reduce_kernel<512, 1, at::native::ReduceOp<float>>": "reductions",
        "void at::native::unrolled_elementwise_kernel<at::native::direct_copy_kernel_cuda>": "layout",
        "void at::native::(anonymous namespace)::CatArrayBatchedCopy<float>": "layout",
        "void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>": "elementwise",
        "void at::native::multi_tensor_apply_kernel<at::native::FusedAdamMathFunctor>": "optimizer",
        "void some::kernel_of_its_own<>": "other",
    }
    for name, cls in expected.items():
        assert kernel_class(name).startswith(cls), (name, kernel_class(name))
    # and in the tables, a C++ kernel's name without its namespaces, arguments and parameters
    assert shown("void at::native::(anonymous namespace)::vectorized_layer_norm_kernel<float, "
                 "float>(int, float, float const*, float const*)") == "vectorized_layer_norm_kernel<…>"
    assert shown("aten::native_layer_norm_backward") == "aten::native_layer_norm_backward"


@pytest.mark.parametrize("frameworks,words", [
    ("flax,jax", "unknown framework(s) ['jax']"),
    pytest.param("torch,timm-compile", "timm is not installed (pip install timm)",
                 marks=pytest.mark.skipif(importlib.util.find_spec("timm") is not None,
                                          reason="timm is installed here")),
])
def test_profile_refuses_unknown_frameworks_before_any_work(frameworks, words, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "profile_step.py"), "--frameworks",
                           frameworks, "--out", str(tmp_path / "p")], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2 and words in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "p").exists()


def test_profile_refuses_a_bad_config_override_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "profile_step.py"), "--preset", "tiny",
                           "--rope", "true", "--width", "36", "--num-heads", "2",
                           "--out", str(tmp_path / "p")], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2 and "rope" in proc.stderr and "divisible by 4" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "p").exists()


def test_startup_measures_launches_with_the_caches_off_cold_and_warm(tmp_path):
    comp = write_competition(tmp_path / "comp", 400, 30, as_zip=True)
    proc = _run(str(ROOT / "train" / "startup.py"), "--data", str(comp), "--frameworks", "flax",
                "--rounds", "1", "--out", str(tmp_path / "su"),
                "--extra", "--preset tiny --batch-size 64")
    rows = json.loads((tmp_path / "su" / "startup.json").read_text())["rows"]
    assert [(r["framework"], r["cache"]) for r in rows] == [("flax", m) for m in ("off", "cold", "warm")]
    for r in rows:
        assert 0 < r["before_first_step_s"] < r["epoch1_end_since_launch_s"] < r["wall_s"]
    assert len({r["train_loss"] for r in rows}) == 1
    assert "| flax | warm |" in proc.stdout and "the same with and without the caches: True" in proc.stdout
