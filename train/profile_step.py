"""Where a train step's time goes: the same step as train/bench.py, under each framework's profiler.

    python train/profile_step.py --preset small --batch-size 128 --out runs/profile
    python train/profile_step.py --preset cpu --rope true   # any ViTConfig field, as train/bench.py takes
    python train/profile_step.py --preset base --batch-size 1024 --bf16 \
        --frameworks torch-compile,timm-compile      # our PyTorch twin against timm's ViT
    python train/profile_step.py --preset cpu --cpu-devices 2 --frameworks flax  # as the trainer splits it

Flax: jax.profiler traces the jitted step; every XLA:CPU/GPU kernel in the trace is matched to
its HLO instruction in the compiled module and put in a class (batched matmuls, i.e. the
attention products; other matmuls; transposes and copies; reductions; elementwise fusions).
PyTorch (`torch`, `torch-compile`; with timm installed `timm`, `timm-compile`, timm's
VisionTransformer at the same config, as train/bench.py times it): torch.profiler over the same
steps. On a GPU every kernel is put in a class by its own name, so that eager and compiled steps
(whose fused Triton kernels no ATen operator names) read in one table; on a CPU each
millisecond is counted in the ATen operator that spent it, and a compiled step's fused C++
kernels in its graph's call.
With --cpu-devices N Flax's batch is split over N XLA CPU devices, as the Flax trainer's is;
its kernels' ms are then summed over them, and a row gives the union of the kernels' spans
(when some kernel runs), to set against the wall time.
Each one runs in its own process (see train/bench.py for why). Writes profile.json and
profile.md under --out and prints the Markdown.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import importlib.util
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # restart with glibc keeping XLA's step buffers (train/malloc.py)
    from train import malloc

    malloc.restart()

from jaxvit import xla_flags
from parity.config import PRESETS
from train.common import OneLineParser, UsageError, add_config_options, config_from_options

# ---- Flax ----------------------------------------------------------------------------------
TYPE = r"(?:\([^=]*?\)|\S+)"  # an HLO result type: a shape, or a tuple of shapes


def kernel_key(name: str) -> str:
    """HLO instruction names and the GPU kernels XLA names after them differ in '.' and '-'
    (`gemm_fusion_dot.104` runs as `gemm_fusion_dot_104`): one key for both."""
    return re.sub(r"[.-]", "_", name)


def hlo_classes(hlo: str) -> dict[str, tuple[str, str]]:
    """Instruction (kernel_key of its name) -> (class, phase), from the compiled module's text.
    The phase comes from the instruction's source op: forward (`jvp(`), backward
    (`transpose(jvp(`), else the optimizer and bookkeeping."""
    bodies = {m.group(1): m.group(2) for m in
              re.finditer(r"\n(%\S+) \([^\n]*\) -> [^\n]* \{\n(.*?)\n\}", hlo, re.S)}
    classes = {}
    for line in hlo.splitlines():
        m = re.match(rf"\s*(?:ROOT )?%(\S+) = {TYPE} ([\w-]+)\((.*)", line)
        if not m:
            continue
        name, op, rest = m.groups()
        calls = re.search(r"calls=(%[^\s,]+)", rest)
        text = line + "\n" + (bodies.get(calls.group(1), "") if calls else "")
        ops = set(re.findall(rf"= {TYPE} ([\w-]+)\(", text))
        source = re.search(r'op_name="([^"]*)"', line)
        source = source.group(1) if source else ""
        phase = ("backward" if "transpose(jvp(" in source else
                 "forward" if "jvp(" in source else "optimizer, loss and the rest")
        if "dot" in ops or "convolution" in ops or "__cublas" in line:
            batched = re.search(r'lhs_batch_dims=\{\d|"lhs_batch_dimensions":\["\d', text) is not None
            cls = "matmul, batched (attention)" if batched else "matmul (dense layers)"
        elif ops & {"reduce", "reduce-window"}:
            cls = "reductions (softmax, LayerNorm, bias grads)"
        elif "transpose" in ops:
            cls = "transposes (with what XLA fused into them)"
        elif ops & {"exponential", "tanh", "erf", "select", "rsqrt", "divide", "multiply", "add",
                    "subtract", "maximum", "negate"}:
            cls = "elementwise fusions"
        elif ops & {"copy", "pad", "slice", "concatenate", "broadcast"}:
            cls = "layout (copy, pad, slice, broadcast)"
        else:
            cls = "other"
        classes[kernel_key(name)] = (cls, phase)
    return classes


def classify_kernel(name: str, classes: dict[str, tuple[str, str]]) -> tuple[str, str]:
    """(class, phase) of a traced kernel: its HLO instruction's, else by the library kernel's
    name (cuBLAS kernels run inside a command buffer carry no instruction name)."""
    if kernel_key(name) in classes:
        return classes[kernel_key(name)]
    if re.search(r"gemm|nvjet|xmma|cutlass|cublas", name, re.I):
        return "matmul (dense layers)", "unattributed library kernels (cuBLAS)"
    if re.search(r"memcpy|memset", name, re.I):
        return "layout (copy, pad, slice, broadcast)", "optimizer, loss and the rest"
    return "other", "optimizer, loss and the rest"


def wall_ms(one_train, sync, steps: int) -> float:
    """Median wall milliseconds of a synchronized step, without the profiler."""
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(one_train())
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def profile_flax(config, batch: int, bf16: bool, steps: int, keep: Path | None,
                 devices: int = 1) -> dict:
    import jax

    from train.bench import flax_steps

    one_train, _, sync = flax_steps(config, batch, bf16, devices=devices)
    for _ in range(3):
        sync(one_train())
    wall = wall_ms(one_train, sync, steps)
    with tempfile.TemporaryDirectory() as tmp:
        jax.profiler.start_trace(tmp, create_perfetto_trace=True)
        for _ in range(steps):
            sync(one_train())
        jax.profiler.stop_trace()
        trace_path = next(Path(tmp).rglob("*.trace.json.gz"))
        trace = json.load(gzip.open(trace_path))
        hlo = one_train.hlo_text()
        if keep is not None:  # the raw material, to look at it again elsewhere
            keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(trace_path, keep / "flax.trace.json.gz")
            (keep / "flax.hlo.txt.gz").write_bytes(gzip.compress(hlo.encode()))
    return {**analyze_flax(trace, hlo, steps, wall), "devices": devices}


def analyze_flax(trace: dict, hlo: str, steps: int, wall: float | None) -> dict:
    classes = hlo_classes(hlo)  # names each traced kernel
    per_op = kernel_times(trace, steps)
    phases = collections.Counter()
    for name, ms in per_op.items():
        phases[classify_kernel(name, classes)[1]] += ms
    return {**summarize("flax", per_op, lambda name: classify_kernel(name, classes)[0]),
            "phases": [{"phase": k, "ms": v} for k, v in phases.most_common()], "wall_ms": wall,
            "busy_ms": busy_ms(trace, steps)}


def busy_ms(trace: dict, steps: int) -> float:
    """ms per step in which at least one of kernel_events' kernels runs (the union of their
    intervals): on XLA:CPU, where thunks run side by side on several threads (and devices),
    the kernels' sum can pass the wall time; what the union leaves of the wall, no kernel ran."""
    spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in kernel_events(trace) if "ts" in e)
    busy, start, end = 0.0, None, None
    for s, e in spans:
        if end is None or s > end:
            busy += 0 if end is None else end - start
            start, end = s, e
        else:
            end = max(end, e)
    busy += 0 if end is None else end - start
    return busy / 1000 / steps


def kernel_events(trace: dict) -> list[dict]:
    """The trace events that name an HLO instruction (`args.hlo_op`), on the devices'
    timelines where there are any (GPU kernels: only the streams' own lines, not the "XLA Ops"
    summary lines that repeat them), else on the host's (XLA:CPU thunks)."""
    events = trace["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e["args"]["name"] for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    ops = [e for e in events if e.get("ph") == "X" and "hlo_op" in e.get("args", {})]
    on_device = [e for e in ops if procs.get(e["pid"], "").startswith("/device:")]
    streams = [e for e in on_device if "stream" in threads.get((e["pid"], e.get("tid")), "").lower()]
    return streams or on_device or ops


def kernel_times(trace: dict, steps: int) -> collections.Counter:
    """ms per step of each HLO instruction, over kernel_events."""
    per_op = collections.Counter()
    for e in kernel_events(trace):
        # inside a command buffer (a CUDA graph) every kernel names the buffer as its hlo_op;
        # the kernel's own name is then the instruction's
        op = e["args"]["hlo_op"]
        per_op[e["name"] if op.startswith("command_buffer") else op] += e["dur"] / 1000 / steps
    return per_op


# ---- PyTorch -------------------------------------------------------------------------------
TORCH_FRAMEWORKS = ("torch", "torch-compile", "timm", "timm-compile")


def profile_torch(config, batch: int, bf16: bool, steps: int, keep: Path | None = None,
                  framework: str = "torch") -> dict:
    import torch

    from train.bench import torch_steps

    one_train, _, sync = torch_steps(config, batch, bf16, compiled=framework.endswith("-compile"),
                                     timm=framework.startswith("timm"))
    for _ in range(3):
        sync(one_train())
    wall = wall_ms(one_train, sync, steps)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            sync(one_train())
    if keep is not None:
        keep.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory() as tmp:
            prof.export_chrome_trace(f"{tmp}/t.json")
            (keep / f"{framework}.trace.json.gz").write_bytes(
                gzip.compress(Path(f"{tmp}/t.json").read_bytes()))
    per_op, per_kernel = collections.Counter(), collections.Counter()
    cpu = torch.autograd.DeviceType.CPU
    for ev in prof.key_averages():
        if torch.cuda.is_available():
            # the operators (host events) carry the GPU time of the kernels each launched
            # itself, and the kernels are also listed on their own, by name: those are counted
            if ev.device_type == cpu:
                per_op[ev.key] += ev.self_device_time_total / 1000 / steps
            else:
                per_kernel[ev.key] += ev.self_device_time_total / 1000 / steps
        else:  # self time: each millisecond counted once, in the operator that spent it
            per_op[ev.key] += ev.self_cpu_time_total / 1000 / steps
    if per_kernel:
        return {**summarize(framework, per_kernel, kernel_class), "wall_ms": wall,
                "top_host_ops": [{"op": k, "class": torch_class(k), "ms": v}
                                 for k, v in per_op.most_common(25)]}
    return {**summarize(framework, per_op, torch_class), "wall_ms": wall}


def torch_class(name: str) -> str:
    if "attention" in name or "bmm" in name or "baddbmm" in name:
        return "matmul, batched (attention)"
    if name in ("aten::addmm", "aten::mm", "aten::matmul", "aten::linear"):
        return "matmul (dense layers)"
    if "norm" in name or name in ("aten::sum", "aten::mean"):
        return "reductions (softmax, LayerNorm, bias grads)"
    if name.startswith(("aten::t", "aten::transpose", "aten::permute")):
        return "transposes (with what XLA fused into them)"
    if name.startswith(("aten::copy_", "aten::clone", "aten::contiguous", "aten::cat",
                        "aten::expand")):
        return "layout (copy, pad, slice, broadcast)"
    if name.startswith("aten::_foreach") or "adam" in name.lower():
        return "optimizer (AdamW)"
    if name.startswith("aten::"):
        return "elementwise fusions" if name not in ("aten::empty", "aten::view") else "other"
    if "CompiledFxGraph" in name:  # a torch.compile graph's own fused C++ kernels, on a CPU
        return "fused kernels of a compiled graph"
    return "other"


# the classes of PyTorch's other GPU kernels by what their names contain, the first match wins
KERNEL_NAMES = (
    (r"flash|fmha|sdpa|attention|attn", "matmul, batched (attention)"),
    (r"gemm|nvjet|xmma|cutlass|cublas|splitk|triton_tem", "matmul (dense layers)"),
    (r"adam|multi_tensor_apply", "optimizer (AdamW)"),
    (r"layer_norm|layernorm|gammabeta|softmax|reduce_kernel", "reductions (softmax, LayerNorm, bias grads)"),
    (r"memcpy|memset|catarray|copy_kernel|fill", "layout (copy, pad, slice, broadcast)"),
    (r"transpose|permute", "transposes (with what XLA fused into them)"),
    (r"elementwise|gelu", "elementwise fusions"),
)


def kernel_class(name: str) -> str:
    """A PyTorch GPU kernel's class, from its name alone: cuBLAS/CUTLASS GEMMs, the attention
    kernels, Triton's fused kernels (torch.compile names them after the operators they fuse:
    `triton_per_fused_native_layer_norm_0`; `per`/`red` ones reduce), ATen's own kernels."""
    low = name.lower()
    triton = re.match(r"triton_(poi|per|red)_fused_(.*?)(?:_\d+)?$", low)
    if triton:
        kind, fused = triton.groups()
        if kind != "poi" or re.search(r"layer_norm|softmax|sum|mean", fused):
            return "reductions (softmax, LayerNorm, bias grads)"
        if re.fullmatch(r"(?:_*(?:to_copy|clone|cat|permute|transpose|view|unsafe_view|expand|"
                        r"slice|select|unsqueeze|squeeze|copy|constant_pad_nd|\d+))+", fused):
            return "layout (copy, pad, slice, broadcast)"
        return "elementwise fusions"
    return next((cls for pattern, cls in KERNEL_NAMES if re.search(pattern, low)), "other")


# ---- report --------------------------------------------------------------------------------
def summarize(framework: str, per_op: collections.Counter, classify) -> dict:
    by_class = collections.Counter()
    for name, ms in per_op.items():
        by_class[classify(name)] += ms
    total = sum(by_class.values())
    return {"framework": framework, "total_ms": total,
            "classes": [{"class": k, "ms": v, "share": v / total} for k, v in by_class.most_common()],
            "top_ops": [{"op": k, "class": classify(k), "ms": v} for k, v in per_op.most_common(25)]}


def shown(name: str, width: int = 60) -> str:
    """A kernel's name short enough for a table: a C++ template's namespaces, arguments and
    parameters go (`void at::native::reduce_kernel<512, 1, ...>(...)` -> `reduce_kernel<…>`)."""
    if len(name) <= width:
        return name
    short = re.sub(r"^void |\(anonymous namespace\)::", "", name)
    while (inner := re.sub(r"<[^<>]*>", "", short)) != short:
        short = inner
    short = re.sub(r"\([^()]*\)$", "", short).split("::")[-1]
    return (short + ("<…>" if "<" in name else ""))[:width]


def markdown(results: list[dict], args) -> str:
    from train.bench import model_name

    split = (f"; Flax's batch split over {args.cpu_devices} XLA CPU devices, its kernels' ms summed "
             f"over them" if args.cpu_devices > 1 else "")
    lines = [f"Train step (forward, backward, AdamW), preset `{model_name(args)}`, batch {args.batch_size}, "
             f"{'bf16' if args.bf16 else 'fp32'}, {args.steps} profiled steps{split}; ms per step.", ""]
    names = [r["framework"] for r in results]
    lines += ["| class | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    classes = []
    for r in results:
        classes += [c["class"] for c in r["classes"] if c["class"] not in classes]
    for cls in classes:
        cells = []
        for r in results:
            row = next((c for c in r["classes"] if c["class"] == cls), None)
            cells.append(f"{row['ms']:.1f} ({row['share']:.0%})" if row else "-")
        lines.append(f"| {cls} | " + " | ".join(cells) + " |")
    lines.append("| **total (kernels)** | " + " | ".join(f"**{r['total_ms']:.1f}**" for r in results) + " |")
    lines.append("| wall per step, no profiler (median) | " +
                 " | ".join(f"{r['wall_ms']:.1f}" if "wall_ms" in r else "-" for r in results) + " |")
    if any("busy_ms" in r for r in results):
        lines.append("| some kernel running (union of the kernels' spans, profiled) | " +
                     " | ".join(f"{r['busy_ms']:.1f}" if "busy_ms" in r else "-" for r in results) + " |")
    for r in results:
        if r.get("phases"):
            lines += ["", f"By phase, {r['framework']}:", "", "| phase | ms/step |", "|---|---|"]
            lines += [f"| {p['phase']} | {p['ms']:.2f} |" for p in r["phases"]]
    for r in results:
        lines += ["", f"Top operations, {r['framework']}:", "", "| op | class | ms/step |", "|---|---|---|"]
        lines += [f"| `{shown(o['op'])}` | {o['class']} | {o['ms']:.2f} |" for o in r["top_ops"][:12]]
        if r.get("top_host_ops"):  # a GPU's PyTorch kernels above; the operators that launched them
            lines += ["", f"Top operators by the GPU time of the kernels they launched, {r['framework']}:",
                      "", "| operator | class | ms/step |", "|---|---|---|"]
            lines += [f"| `{o['op'][:60]}` | {o['class']} | {o['ms']:.2f} |" for o in r["top_host_ops"][:12]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/profile_step.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="profiled steps (after 3 untimed ones)")
    p.add_argument("--bf16", action="store_true", help="bf16 compute (Flax dtype, torch autocast)")
    p.add_argument("--frameworks", default="flax,torch",
                   help="comma-separated: flax, " + ", ".join(TORCH_FRAMEWORKS) +
                        " (timm-*: timm's ViT, when timm is installed)")
    p.add_argument("--out", default="runs/profile")
    p.add_argument("--keep-trace", action="store_true",
                   help="also keep the raw traces (and Flax's compiled HLO) under --out, gzipped")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="Flax on a CPU: split the batch over this many XLA CPU devices, as the "
                        "trainer does (--cpu-devices there); the kernels' ms are then summed over them")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_config_options(p)
    args = p.parse_args(argv)
    if args.batch_size < 1 or args.steps < 1:
        print("error: --batch-size and --steps must be >= 1", file=sys.stderr)
        return 2
    if args.cpu_devices < 1 or args.batch_size % args.cpu_devices:
        print(f"error: --cpu-devices must be >= 1 and divide --batch-size ({args.batch_size}), "
              f"got {args.cpu_devices}", file=sys.stderr)
        return 2
    try:
        config = config_from_options(args.preset, args)  # refuses a bad config before any work
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.worker == "flax":
        xla_flags.apply()  # as the trainer does, before JAX creates its backend
        if args.cpu_devices > 1:
            import jax

            jax.config.update("jax_num_cpu_devices", args.cpu_devices)  # the CPU backend only
        keep = Path(args.out) if args.keep_trace else None
        print(json.dumps(profile_flax(config, args.batch_size, args.bf16, args.steps, keep,
                                      args.cpu_devices)))
        return 0
    if args.worker in TORCH_FRAMEWORKS:
        keep = Path(args.out) if args.keep_trace else None
        print(json.dumps(profile_torch(config, args.batch_size, args.bf16, args.steps, keep,
                                       args.worker)))
        return 0
    frameworks = [f for f in args.frameworks.split(",") if f]
    unknown = [f for f in frameworks if f not in ("flax", *TORCH_FRAMEWORKS)]
    if unknown or not frameworks:
        print(f"error: unknown framework(s) {unknown}; choose from flax, "
              f"{', '.join(TORCH_FRAMEWORKS)}", file=sys.stderr)
        return 2
    if any(f.startswith("timm") for f in frameworks) and importlib.util.find_spec("timm") is None:
        print("error: the timm frameworks profile timm's ViT, and timm is not installed "
              "(pip install timm)", file=sys.stderr)
        return 2
    results = []
    for fw in frameworks:
        print(f"profiling {fw} ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", fw]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        if proc.returncode != 0:
            print(f"error: profiling {fw} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
            return 1
        results.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "profile.json").write_text(json.dumps(results, indent=1))
    table = markdown(results, args)
    (out / "profile.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
