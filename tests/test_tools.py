"""The accuracy commands, run for real at tiny sizes: the experiment plans and their runner,
ensembles (with TTA and pseudo-labels), hard_digits, the TTA study and the run comparison."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.helpers import ROOT, env, run_refused, run_tool, trainer, write_competition
from train import data
from train.ensemble import combine
from train.tta_study import SETS, VIEWS


def test_every_run_of_every_plan_is_one_its_trainer_accepts():
    # a plan's typo would otherwise surface only when it runs, on a GPU lent for minutes
    from train import cnn_main
    from train.common import build_parser, resolve_run
    from train.experiments import PLANS

    runs = 0
    for name, plan in PLANS.items():
        done: set[str] = set()
        for stage in plan.get("stages", [plan]):
            for r in stage["runs"]:
                argv = [*r["args"], "--data", "digit-recognizer.zip", "--out", "run"]
                if r["trainer"] == "cnn":  # the CNN baseline: its own options, the same recipe's
                    cnn_main.build_parser().parse_args(argv)
                else:
                    resolve_run(build_parser("trainer", r["trainer"]).parse_args(argv))
                runs += 1
            done |= {r["name"] for r in stage["runs"]}
            for ensemble, members, *_ in stage.get("ensembles", []):
                assert set(members) <= done, (name, ensemble, set(members) - done)
    assert runs > 100


def test_kaggle_preset_trains_and_ensemble_with_tta_scores_runs(tmp_path):
    comp = write_competition(tmp_path / "comp", 700, 30, as_zip=True)
    common = ["--data", str(comp), "--epochs", "1", "--limit-train", "600", "--batch-size", "64",
              "--val-fraction", "0.2"]
    # the preset's recipe and drop path, at a width and depth a test can afford
    trainer("flax", "--preset", "kaggle", *common, "--repeat-aug", "3", "--width", "48", "--depth", "2",
            "--out", str(tmp_path / "k0"))
    # a second member of another size, on the same split: ensembles take unlike models
    trainer("flax", "--preset", "tiny", *common, "--seed", "1", "--out", str(tmp_path / "k1"))
    cfg = json.loads((tmp_path / "k0" / "config.json").read_text())
    assert cfg["model"]["drop_path"] == 0.1 and cfg["recipe"]["ema_decay"] > 0
    assert cfg["model"]["patch_size"] == 4 and cfg["model"]["mlp_ratio"] == 4 and cfg["model"]["depth"] == 2
    assert cfg["recipe"]["rotate"] == 15 and cfg["recipe"]["translate"] == 3  # the stronger augmentation
    assert cfg["recipe"]["repeat_aug"] == 3
    pseudo = tmp_path / "pseudo.csv"
    proc = run_tool(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "k0"), str(tmp_path / "k1"),
                    "--data", str(comp), "--tta", "--out", str(tmp_path / "ens"),
                    "--pseudo-labels", str(pseudo), "--min-confidence", "0.1055")
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
    assert (kept["Confidence"] >= 0.1055).all()  # near the median of these 1-epoch models' (0.103-0.109)
    assert (submission.set_index("ImageId").loc[kept["ImageId"], "Label"].to_numpy()
            == kept["Label"].to_numpy()).all()
    # --weights final scores each run's model.safetensors: the last epoch's weights, as trained
    # (here the tiny member's: quicker to score than the kaggle one)
    run_tool(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "k1"), "--data", str(comp),
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
    proc = run_tool(str(ROOT / "train" / "hard_digits.py"), str(tmp_path / "ens" / "ensemble.json"),
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
    proc = run_tool(str(ROOT / "train" / "hard_digits.py"), a, str(tmp_path / "b.json"), other, other_seed,
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
    proc = run_tool(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"), "--out", str(tmp_path / "e"))
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
    proc = run_tool(*study, "--out", str(tmp_path / "s"))
    report = json.loads((tmp_path / "s" / "tta_study.json").read_text())
    acc = {r["set"]: r["val_acc_mean"] / 100 for r in report["rows"]}
    assert set(acc) == set(SETS) and "| shifts5 | 5 |" in proc.stdout
    # its "none" is the trainer's score of its final weights, its "shifts5" what ensemble.py
    # scores on them with --tta
    last = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
    assert acc["none"] == pytest.approx(last["val_acc"])
    run_tool(str(ROOT / "train" / "ensemble.py"), str(tmp_path / "a"), "--data", str(comp), "--weights",
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
    run_tool(*study, "--out", str(tmp_path / "s2"))
    assert cache.stat().st_mtime_ns == before
    assert (tmp_path / "s2" / "tta_study.md").read_text() == (tmp_path / "s" / "tta_study.md").read_text()
    # a damaged cache is scored again and written anew, to the same table
    cache.write_bytes(cache.read_bytes()[:200])
    run_tool(*study, "--out", str(tmp_path / "s3"))
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
    run_tool(str(ROOT / "train" / "experiments.py"), "--plan", "smoke", "--data", str(comp),
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


@pytest.mark.parametrize("args, words", [
    (["--plan", "no-such-plan"], "unknown plan 'no-such-plan', not one of the"),
    (["--plan", "smoke", "--jobs", "0"], "--jobs must be >= 1"),
    (["--plan", "smoke", "--deadline", "-5"], "--deadline >= 0"),
    (["--plan", "smoke", "--data", "no-such.zip"], "--data no-such.zip: no such file or folder"),
])
def test_experiment_runner_refuses_bad_input_in_one_line_before_any_run(args, words, tmp_path):
    proc = run_refused(str(ROOT / "train" / "experiments.py"), *args, "--out", str(tmp_path / "exp"),
                       cwd=tmp_path)
    assert words in proc.stderr and not (tmp_path / "exp").exists()


def test_experiment_runner_stops_runs_at_the_deadline_and_keeps_what_they_did(tmp_path):
    comp = write_competition(tmp_path / "comp", 500, 10, as_zip=True)
    run_tool(str(ROOT / "train" / "experiments.py"), "--plan", "smoke", "--data", str(comp),
             "--out", str(tmp_path / "exp"), "--deadline", "0")
    results = json.loads((tmp_path / "exp" / "results.json").read_text())
    assert [r["name"] for r in results["runs"]] == ["tiny-s0"]  # the second never started
    assert results["runs"][0]["killed_at_deadline"] and results["runs"][0]["returncode"] < 0
    assert results["ensembles"] == []  # nothing finished to ensemble
