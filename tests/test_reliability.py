"""Interruption, divergence and damaged files: nothing lost, nothing half-written, one clear line."""

import os
import signal
import time

import numpy as np
import pytest

from parity import weights as W
from tests.helpers import popen_trainer, trainer, write_competition

FAST = ["--preset", "tiny", "--lr", "3e-3", "--batch-size", "64", "--rotate", "0",
        "--translate", "0", "--scale", "0", "--val-fraction", "0.2", "--limit-train", "600"]


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_competition(tmp_path_factory.mktemp("data") / "comp", 700, 30, as_zip=True)


@pytest.fixture(scope="module")
def whole(comp, tmp_path_factory):
    """The weights of the 3-epoch run that the killed runs below must end up with."""
    out = tmp_path_factory.mktemp("whole")
    trainer("flax", "--data", str(comp), "--epochs", "3", *FAST, "--out", str(out))
    return W.load(out / "model.safetensors")[0]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.time() + timeout
    while not predicate() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    return predicate()


def test_sigkill_while_a_checkpoint_is_being_written_loses_nothing(comp, whole, tmp_path):
    args = ["--data", str(comp), "--epochs", "3", *FAST]
    cut = tmp_path / "cut"
    os.environ["VIT_TEST_PAUSE"] = "checkpoint-written:30"
    try:
        proc = popen_trainer("flax", *args, "--out", str(cut))
    finally:
        del os.environ["VIT_TEST_PAUSE"]
    # The first checkpoint's temp file is complete but not yet renamed: kill now.
    assert _wait_for(lambda: any(p.name.startswith(".checkpoint") for p in cut.glob(".*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (cut / "checkpoint.safetensors").exists()  # never a half-written checkpoint
    # Nothing complete on disk yet: resume says so; a fresh start with the same command works.
    proc2 = trainer("flax", "--resume", str(cut), "--data", str(comp), check=False)
    assert proc2.returncode == 2 and "no checkpoint.safetensors yet" in proc2.stderr
    trainer("flax", *args, "--out", str(cut))
    again, _ = W.load(cut / "model.safetensors")
    for name in whole:
        np.testing.assert_allclose(again[name], whole[name], atol=1e-6, err_msg=name)


def test_sigkill_during_the_second_checkpoint_write_resumes_from_the_first(comp, whole, tmp_path):
    args = ["--data", str(comp), "--epochs", "3", *FAST]
    cut = tmp_path / "cut"
    proc = popen_trainer("flax", *args, "--out", str(cut))
    assert _wait_for(lambda: (cut / "checkpoint.safetensors").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # Hold the next run inside its checkpoint write and kill it there.
    os.environ["VIT_TEST_PAUSE"] = "checkpoint-written:30"
    try:
        proc = popen_trainer("flax", "--resume", str(cut), "--data", str(comp))
    finally:
        del os.environ["VIT_TEST_PAUSE"]
    assert _wait_for(lambda: any(p.name.startswith(".checkpoint") for p in cut.glob(".*")), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert (cut / "checkpoint.safetensors").exists()  # the first epoch's, untouched
    trainer("flax", "--resume", str(cut), "--data", str(comp))
    resumed, _ = W.load(cut / "model.safetensors")
    for name in whole:
        np.testing.assert_allclose(resumed[name], whole[name], atol=1e-6, err_msg=name)


@pytest.mark.parametrize("framework, stop", [("flax", signal.SIGINT), ("torch", signal.SIGINT),
                                             ("flax", signal.SIGTERM)])
def test_ctrl_c_exits_cleanly_and_says_how_to_resume(framework, stop, comp, tmp_path):
    out = tmp_path / "run"
    # 12 epochs: the signal lands within milliseconds of the first checkpoint, 11 epochs early
    proc = popen_trainer(framework, "--data", str(comp), "--epochs", "12", *FAST, "--out", str(out))
    assert _wait_for(lambda: (out / "checkpoint.safetensors").exists(), proc)
    proc.send_signal(stop)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"--resume {out}" in err and "Traceback" not in err
    assert not (out / "submission.csv").exists()
    if stop == signal.SIGTERM:
        return  # the resume below is the same after either signal
    done = trainer(framework, "--resume", str(out), "--data", str(comp), "--epochs", "12",
                   check=False)
    assert done.returncode == 0 and (out / "submission.csv").exists()
    assert f"resuming {out} after epoch" in done.stderr  # not started again from scratch


def test_ctrl_c_in_the_first_checkpoint_write_leaves_no_file_and_says_start_again(comp, tmp_path):
    out = tmp_path / "run"
    os.environ["VIT_TEST_PAUSE"] = "checkpoint-written:30"
    try:
        proc = popen_trainer("flax", "--data", str(comp), "--epochs", "3", *FAST, "--out", str(out))
    finally:
        del os.environ["VIT_TEST_PAUSE"]
    assert _wait_for(lambda: any(p.name.startswith(".checkpoint") for p in out.glob(".*")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "nothing to resume; start the run again" in err
    assert "Traceback" not in err and "--resume" not in err
    assert not list(out.glob(".*tmp*")) and not (out / "checkpoint.safetensors").exists()


def test_ctrl_c_while_the_pictures_are_drawn_keeps_the_results_and_no_half_set(comp, tmp_path):
    out = tmp_path / "run"
    os.environ["VIT_TEST_PAUSE"] = "plots-one-drawn:30"
    try:
        proc = popen_trainer("flax", "--data", str(comp), "--epochs", "1", *FAST, "--out", str(out),
                             plots=True)
    finally:
        del os.environ["VIT_TEST_PAUSE"]
    assert _wait_for(lambda: any(out.glob(".plots.tmp-*/posemb.png")), proc)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "interrupted while drawing the pictures" in err
    assert "python -m train.plots" in err and "Traceback" not in err
    assert (out / "submission.csv").exists() and (out / "model.safetensors").exists()
    assert not (out / "plots").exists() and not list(out.glob(".plots*"))


def test_a_new_run_in_a_finished_runs_directory_replaces_it_whole(comp, tmp_path):
    out = tmp_path / "run"
    trainer("flax", "--data", str(comp), "--epochs", "1", *FAST, "--out", str(out))
    assert (out / "best.safetensors").exists() and (out / "checkpoint.safetensors").exists()
    # the new run is killed in its first checkpoint write: the older run's checkpoint must not
    # be left for --resume to take up as this run's
    os.environ["VIT_TEST_PAUSE"] = "checkpoint-written:30"
    try:
        proc = popen_trainer("flax", "--data", str(comp), "--epochs", "2", *FAST, "--seed", "1",
                             "--out", str(out))
    finally:
        del os.environ["VIT_TEST_PAUSE"]
    assert _wait_for(lambda: any(p.name.startswith(".checkpoint") for p in out.glob(".*")), proc)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert f"{out}: replacing the older run there (checkpoint.safetensors, best.safetensors" in err
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "best.safetensors", "config.json", "metrics.jsonl"]  # the new run's epoch 1, nothing older
    again = trainer("flax", "--resume", str(out), "--data", str(comp), check=False)
    assert again.returncode == 2 and "no checkpoint.safetensors yet" in again.stderr
    # without a validation split the new run writes no best.safetensors: the older one is gone
    trainer("flax", "--data", str(comp), "--epochs", "1", *FAST, "--val-fraction", "0", "--out", str(out))
    assert not (out / "best.safetensors").exists() and (out / "submission.csv").exists()


def test_a_diverging_run_stops_with_a_clear_message_and_no_submission(comp, tmp_path):
    out = tmp_path / "run"
    proc = trainer("flax", "--data", str(comp), "--epochs", "3", *FAST, "--lr", "1e30",
                   "--grad-clip", "0", "--warmup-epochs", "0", "--out", str(out), check=False)
    assert proc.returncode == 3
    assert "non-finite in epoch 1; stopping. there is no checkpoint yet" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (out / "submission.csv").exists() and not (out / "model.safetensors").exists()


@pytest.mark.parametrize("framework", ["flax", "torch"])
def test_eval_only_refuses_damaged_or_foreign_checkpoints(framework, comp, tmp_path):
    from parity.config import preset

    good = tmp_path / "good.safetensors"
    config = preset("tiny")
    W.save(good, W.random_canonical(config, 0), config)
    raw = good.read_bytes()
    cases = {
        "truncated.safetensors": raw[: len(raw) // 2],
        "tampered.safetensors": raw[:8] + raw[8:40].replace(b"{", b"[", 1) + raw[40:],
        "pickle.safetensors": b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.",
    }
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
        proc = trainer(framework, "--eval-only", "--checkpoint", str(tmp_path / name),
                       "--data", str(comp), "--out", str(tmp_path / f"out-{name}"), check=False)
        assert proc.returncode == 2, (name, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        assert not (tmp_path / f"out-{name}").exists()
