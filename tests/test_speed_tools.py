"""The speed commands, run for real at tiny sizes: the framework benchmark, the step
profiler, the start-up measurement, and the XLA:CPU flags the entry points set."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from parity.config import preset
from tests.helpers import ROOT, env, run_refused, run_tool, write_competition
from train import malloc
from train.bench import flops_per_image, markdown, pool_rounds


def test_bench_writes_rows_table_and_chart(tmp_path):
    out = tmp_path / "bench"
    proc = run_tool(str(ROOT / "train" / "bench.py"), "--preset", "tiny", "--batch-size", "8",
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
        assert r["glibc_tunables"] == (malloc.TUNABLES if malloc.wanted()  # both frameworks alike
                                       else os.environ.get("GLIBC_TUNABLES", ""))
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
    (["--patch-size", "8", "--patch-stride", "4", "--modes", "timm-eager-fp32"],
     "timm-* modes need --patch-stride 0"),
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
    proc = run_tool(str(ROOT / "train" / "profile_step.py"), "--preset", "tiny", "--batch-size", "8",
                    "--steps", "2", "--depth", "1", "--rope", "true", "--cpu-devices", "2",
                    "--out", str(out))
    results = json.loads((out / "profile.json").read_text())
    assert [r["framework"] for r in results] == ["flax", "torch"]
    for r in results:
        assert r["total_ms"] > 0 and r["top_ops"]
        assert abs(sum(c["share"] for c in r["classes"]) - 1) < 1e-6
        assert abs(sum(c["ms"] for c in r["classes"]) - r["total_ms"]) < 1e-6 * r["total_ms"] + 1e-9
    # Flax's batch went over two XLA CPU devices, as the trainer's does; the kernels' union is
    # no more than their sum
    assert results[0]["devices"] == 2 and 0 < results[0]["busy_ms"] <= results[0]["total_ms"] + 1e-9
    assert "split over 2 XLA CPU devices" in proc.stdout and "union of the kernels' spans" in proc.stdout
    flax_classes = {c["class"] for c in results[0]["classes"]}
    # the traced XLA kernels were matched to the compiled module, not all left as "other"
    assert {"matmul (dense layers)", "matmul, batched (attention)"} <= flax_classes
    assert "| class | flax | torch |" in proc.stdout and (out / "profile.md").is_file()
    assert "preset `tiny (depth=1, rope=True)`" in proc.stdout  # config overrides, as bench takes them


def test_profile_busy_time_is_the_union_of_the_kernels_spans():
    # XLA:CPU runs thunks side by side on several threads: overlapping spans count once, and
    # the time between them not at all
    from train.profile_step import busy_ms

    def op(tid, ts, dur):
        return {"ph": "X", "pid": 1, "tid": tid, "ts": ts, "dur": dur, "name": "f", "args": {"hlo_op": "f"}}

    trace = {"traceEvents": [op(1, 0, 10), op(2, 5, 10), op(1, 20, 10), op(2, 22, 3)]}
    assert busy_ms(trace, steps=1) == (15 + 10) / 1000
    assert busy_ms(trace, steps=5) == (15 + 10) / 1000 / 5
    assert busy_ms({"traceEvents": []}, steps=1) == 0


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


def test_profile_refuses_a_device_count_that_does_not_split_the_batch(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "profile_step.py"), "--preset", "tiny",
                           "--batch-size", "7", "--cpu-devices", "2", "--out", str(tmp_path / "p")],
                          capture_output=True, text=True, env=env(), timeout=120)
    assert proc.returncode == 2 and "--cpu-devices must be >= 1 and divide --batch-size (7)" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "p").exists()


def test_profile_refuses_a_bad_config_override_before_any_work(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "train" / "profile_step.py"), "--preset", "tiny",
                           "--rope", "true", "--width", "36", "--num-heads", "2",
                           "--out", str(tmp_path / "p")], capture_output=True, text=True,
                          env=env(), timeout=120)
    assert proc.returncode == 2 and "rope" in proc.stderr and "divisible by 4" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1 and not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, words", [
    ([], "the following arguments are required: --data"),
    (["--data", "no-such.zip"], "--data no-such.zip: no such file or folder"),
    (["--data", ".", "--frameworks", "flax,jax"], "unknown framework(s) ['jax']"),
    (["--data", ".", "--rounds", "0"], "--rounds must be >= 1"),
])
def test_startup_refuses_bad_input_in_one_line_before_any_launch(args, words, tmp_path):
    proc = run_refused(str(ROOT / "train" / "startup.py"), *args, "--out", str(tmp_path / "su"),
                       cwd=tmp_path)
    assert words in proc.stderr and not (tmp_path / "su").exists()


def test_startup_measures_launches_with_the_caches_off_cold_and_warm(tmp_path):
    comp = write_competition(tmp_path / "comp", 400, 30, as_zip=True)
    proc = run_tool(str(ROOT / "train" / "startup.py"), "--data", str(comp), "--frameworks", "flax",
                    "--rounds", "1", "--out", str(tmp_path / "su"),
                    "--extra", "--preset tiny --batch-size 64")
    rows = json.loads((tmp_path / "su" / "startup.json").read_text())["rows"]
    assert [(r["framework"], r["cache"]) for r in rows] == [("flax", m) for m in ("off", "cold", "warm")]
    for r in rows:
        assert 0 < r["before_first_step_s"] < r["epoch1_end_since_launch_s"] < r["wall_s"]
    assert len({r["train_loss"] for r in rows}) == 1
    assert "| flax | warm |" in proc.stdout and "the same with and without the caches: True" in proc.stdout
