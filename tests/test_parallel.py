"""Data parallelism gives the same training as one device: JAX sharding and torchrun + DDP."""

import shutil
import subprocess
import sys

import numpy as np
import pytest

from parity import weights as W
from tests.helpers import ROOT, SHARED_ZIP, env, trainer, write_competition

ARGS = ["--preset", "tiny", "--epochs", "2", "--limit-train", "700", "--batch-size", "64",
        "--val-fraction", "0.2", "--no-plots"]

ONE_STEP = """
import numpy as np, jax, jax.numpy as jnp
from parity.config import preset
from parity import weights as W
from train.common import Recipe
from jaxvit import train as jt
from jaxvit.model import ViT
assert len(jax.devices()) == 4, jax.devices()
config, recipe = preset("tiny", patch_size=4, drop_path=0.1), Recipe(batch_size=32, lr=2e-3)
tx = jt.make_optimizer(recipe, 5)
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (200, 28, 28)).astype(np.uint8)
labels = rng.integers(0, 10, 200).astype(np.int32)
order = rng.permutation(200)[:160].astype(np.int32)
out = {}
for name, mesh in (("one", None), ("four", jt.data_mesh())):
    state = jt.replicate(jt.create_state(config, recipe, tx, 0), mesh)
    x, y, o = (jt.replicate(jnp.asarray(a), mesh) for a in (images, labels, order))
    step = jt.make_train_step(ViT(config), tx, recipe, 32, 5, 0, mesh)
    probe = jt.normalize(jt.to_unit(x[:32]))
    grads_fn = jax.jit(jax.grad(lambda p: jnp.sum(ViT(config).apply({"params": p}, probe) ** 2)))
    out[name + "_grads"] = W.flax_to_canonical(jax.device_get(grads_fn(state["params"])))
    state = step(state, x, y, o, np.int32(0), np.int32(0))
    state = step(state, x, y, o, np.int32(1), np.int32(1))
    out[name] = W.flax_to_canonical(jax.device_get(state["params"]))
    if mesh is not None:
        assert len(state["params"]["head"]["kernel"].sharding.device_set) == 4
print(max(float(np.abs(out["one"][n] - out["four"][n]).max()) for n in out["one"]),
      max(float(np.abs(out["one_grads"][n] - out["four_grads"][n]).max()) for n in out["one"]))
"""


def _four_devices():
    e = env()
    e["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    return e


def test_one_data_parallel_step_on_4_devices_matches_one_device():
    proc = subprocess.run([sys.executable, "-c", ONE_STEP], capture_output=True, text=True,
                          env=_four_devices(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights_diff, grads_diff = map(float, proc.stdout.split())
    assert weights_diff <= 1e-5 and grads_diff <= 1e-5


@pytest.fixture(scope="module")
def comp(tmp_path_factory):
    return write_competition(tmp_path_factory.mktemp("data") / "comp", 800, 20, as_zip=True)


# Data-parallel runs are compared without the qkv bias: its key part has an exactly-zero
# gradient (softmax ignores it), and Adam's g / (|g| + eps) turns the different summation
# order's ~1e-10 noise there into steps of ~lr, which says nothing about data parallelism.
# Every other tensor is compared.
NO_KEY_BIAS = ["--qkv-bias", "false"]


def test_training_on_4_simulated_devices_ends_with_the_weights_of_one(comp, tmp_path):
    args = [*ARGS, *NO_KEY_BIAS]
    one = trainer("flax", "--data", str(comp), *args, "--cpu-devices", "1", "--out", str(tmp_path / "one"))
    assert "flax: 1 device(s)" in one.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "flax_main.py"), "--quiet",
                           "--data", str(comp), *args, "--out", str(tmp_path / "four")],
                          capture_output=True, text=True, env=_four_devices(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "flax: 4 device(s)" in proc.stderr
    one, _ = W.load(tmp_path / "one" / "model.safetensors")
    four, _ = W.load(tmp_path / "four" / "model.safetensors")
    for name in one:
        np.testing.assert_allclose(four[name], one[name], atol=1e-4, err_msg=name)


@pytest.mark.skipif(not SHARED_ZIP.exists(), reason="needs more rows than the demo sample has")
def test_a_long_epoch_on_2_cpu_devices_does_not_deadlock(tmp_path):
    # XLA:CPU (jaxlib 0.10.2, 2 cores) deadlocked in the gradient all-reduce once ~150 steps
    # were queued ahead of the runtime: a rendezvous timeout, then an abort (signal 6).
    # The trainer now waits for each step when it runs on several CPU devices.
    comp = write_competition(tmp_path / "comp", 12000, 10, as_zip=True)
    proc = trainer("flax", "--data", str(comp), "--preset", "tiny", "--epochs", "1",
                   "--batch-size", "64", "--cpu-devices", "2", "--out", str(tmp_path / "r"),
                   timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "flax: 2 device(s)" in proc.stderr and (tmp_path / "r" / "submission.csv").exists()


def test_a_batch_that_does_not_split_over_the_devices_is_refused(comp, tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "flax_main.py"), "--data", str(comp),
                           *ARGS, "--batch-size", "66", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, env=_four_devices(), timeout=300)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "does not split evenly over 4 devices; use a multiple of 4, such as 64 or 68" in proc.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not on PATH")
def test_torchrun_with_2_processes_ends_with_the_weights_of_one(comp, tmp_path):
    args = [*ARGS, *NO_KEY_BIAS]
    trainer("torch", "--data", str(comp), *args, "--out", str(tmp_path / "one"))
    e = env()
    e["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(["torchrun", "--standalone", "--nproc_per_node=2",
                           str(ROOT / "train" / "torch_main.py"), "--quiet", "--data", str(comp),
                           *args, "--out", str(tmp_path / "two")],
                          capture_output=True, text=True, env=e, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("torch: 2 process(es)") == 1  # only rank 0 speaks
    one, _ = W.load(tmp_path / "one" / "model.safetensors")
    two, _ = W.load(tmp_path / "two" / "model.safetensors")
    for name in one:
        np.testing.assert_allclose(two[name], one[name], atol=1e-4, err_msg=name)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == sorted(
        p.name for p in (tmp_path / "one").iterdir())
    assert (tmp_path / "two" / "submission.csv").read_bytes() == \
        (tmp_path / "one" / "submission.csv").read_bytes()
