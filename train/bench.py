"""Framework speed comparison: the same ViT, the same batch, Flax against PyTorch.

    python train/bench.py --preset base --batch-size 1024 --steps 50 --out bench_out
    python train/bench.py --preset small --spt true --lsa true   # any ViTConfig field, as the trainers take
    python train/bench.py --preset small --modes flax-fp32,torch-eager-fp32 --rounds 5  # in turn, 5 times

For each mode (Flax jitted fp32/bf16, PyTorch eager fp32/bf16, torch.compile fp32/bf16) it
times the train step (forward + backward + AdamW update) and inference, after warm-up,
synchronizing the device before every clock read; the first (compiling) call is reported
apart. It also times patchify, the naive loop against the vectorized reshape, after checking
that they agree. Writes bench.json (one row per measurement), bench.md and bench.png.
On a machine whose speed drifts from minute to minute (a shared CPU), --rounds N times the
modes in turn N times and compares each mode with the first one round by round.
With timm installed, the modes timm-eager-fp32, timm-eager-bf16, timm-compile-fp32 and
timm-compile-bf16 time timm's VisionTransformer at the same config the same way: the speed
issue's reference, measured beside the twins.

"fp32" means float32 matmuls on both sides (JAX precision 'highest', torch 'highest', no
TF32); "bf16" means bfloat16 compute with float32 weights (Flax: module dtype; PyTorch:
autocast).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

if __name__ == "__main__":  # restart with glibc keeping XLA's step buffers (train/malloc.py)
    from train import malloc

    malloc.restart()

import numpy as np

from jaxvit import xla_flags
from parity.config import PRESETS, ViTConfig, preset
from train.common import OneLineParser, UsageError, add_config_options, config_from_options, prepare_out

MODES = ["flax-fp32", "flax-bf16", "torch-eager-fp32", "torch-eager-bf16",
         "torch-compile-fp32", "torch-compile-bf16"]
# timm's VisionTransformer at the same config, the speed issue's reference (PyTorch, fp32 or bf16);
# asked for by name only: timm is not a dependency of this project.
REFERENCE_MODES = ["timm-eager-fp32", "timm-eager-bf16", "timm-compile-fp32", "timm-compile-bf16"]
# Dense peak TFLOP/s by device name fragment: (fp32 non-tensor-core, bf16 tensor core).
PEAKS = {"H100 80GB HBM3": (66.9, 989.4), "H100 PCIe": (51.2, 756.0), "H200": (66.9, 989.4),
         "A100": (19.5, 312.0)}


def flops_per_image(c: ViTConfig) -> float:
    """Forward matmul FLOPs of one image (2 per multiply-add); a train step is ~3x this."""
    t, d, m = c.num_tokens, c.width, c.mlp_dim
    per_block = 2 * t * d * (3 * d) + 2 * t * d * d + 2 * 2 * t * d * m + 2 * 2 * t * t * d
    return float(2 * c.num_patches * c.stem_dim * d + c.depth * per_block + 2 * d * c.num_classes)


def summarize(times: list[float]) -> dict:
    q = np.percentile(times, [10, 50, 90])
    return {"median_s": float(q[1]), "p10_s": float(q[0]), "p90_s": float(q[2]), "n": len(times)}


def run_timed(step, sync, warmup: int, steps: int) -> tuple[float, list[float]]:
    """-> (first call seconds, per-step seconds after warm-up)."""
    t0 = time.perf_counter()
    sync(step())
    first = time.perf_counter() - t0
    for _ in range(warmup):
        sync(step())
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        sync(step())
        times.append(time.perf_counter() - t0)
    return first, times


# ---- Flax ----------------------------------------------------------------------------------
def flax_steps(config: ViTConfig, batch: int, bf16: bool, seed: int = 0, devices: int = 1,
               attention: str | None = None):
    """-> (one_train, one_infer, sync): a jitted train step (forward, backward, AdamW) and an
    inference call on one fixed batch, and the function that waits for their result.
    devices > 1: the batch is split over that many devices, weights replicated, as the
    trainer does (train/flax_main.py, --cpu-devices)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import NamedSharding, PartitionSpec

    from jaxvit import train as jt
    from jaxvit.model import ViT
    from train.common import Recipe

    dtype = jnp.bfloat16 if bf16 else jnp.float32
    model = ViT(config, dtype=dtype, attention_impl=attention)
    tx = jt.make_optimizer(Recipe(epochs=10), steps_per_epoch=1000)
    state = jt.create_state(config, Recipe(), tx, seed)
    mesh = jt.data_mesh(jax.devices()[:devices]) if devices > 1 else None
    split = NamedSharding(mesh, PartitionSpec("data")) if mesh else None
    holder = {"state": jt.replicate({"params": state["params"], "opt_state": state["opt_state"]}, mesh)}
    rng = np.random.default_rng(seed)
    x = jax.device_put(rng.standard_normal((batch, config.image_height, config.image_width,
                                            config.channels), dtype=np.float32), split)
    y = jax.device_put(rng.integers(0, config.num_classes, batch).astype(np.int32), split)
    key = jax.random.PRNGKey(0)

    def train_step(state, x, y):
        def loss_fn(params):
            logits = model.apply({"params": params}, x, train=True, rngs={"dropout": key})
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = jax.value_and_grad(loss_fn)(state["params"])
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

    precision = "highest" if not bf16 else "default"  # fp32 means fp32 matmuls (no TF32)
    replicated = NamedSharding(mesh, PartitionSpec()) if mesh else None
    train = jax.jit(train_step, donate_argnums=0,
                    **({"out_shardings": (replicated, replicated)} if mesh else {}))
    infer = jax.jit(lambda p, x: model.apply({"params": p}, x))

    def one_train():
        with jax.default_matmul_precision(precision):
            holder["state"], loss = train(holder["state"], x, y)
        return loss

    def one_infer():
        with jax.default_matmul_precision(precision):
            return infer(holder["state"]["params"], x)

    def train_hlo() -> str:  # the optimized module XLA runs for one_train (train/profile_step.py)
        with jax.default_matmul_precision(precision):
            return train.lower(holder["state"], x, y).compile().as_text()

    one_train.hlo_text = train_hlo
    return one_train, one_infer, lambda r: r.block_until_ready()


def bench_flax(config: ViTConfig, batch: int, bf16: bool, warmup: int, steps: int, seed: int = 0,
               devices: int = 1, attention: str | None = None):
    one_train, one_infer, sync = flax_steps(config, batch, bf16, seed, devices, attention)
    return run_timed(one_train, sync, warmup, steps), run_timed(one_infer, sync, warmup, steps)


# ---- PyTorch -------------------------------------------------------------------------------
def timm_vit(config: ViTConfig):
    """timm's VisionTransformer built to the same config (class token, learned position table,
    pre-norm blocks): what the issue's reference numbers were measured on."""
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=(config.image_height, config.image_width),
                             patch_size=config.patch_size, in_chans=config.channels,
                             num_classes=config.num_classes, embed_dim=config.width,
                             depth=config.depth, num_heads=config.num_heads,
                             mlp_ratio=config.mlp_ratio, drop_path_rate=config.drop_path)


def torch_steps(config: ViTConfig, batch: int, bf16: bool, compiled: bool, seed: int = 0,
                timm: bool = False):
    """-> (one_train, one_infer, sync), the twin of flax_steps. timm: time timm's ViT instead of
    ours, with AdamW decaying its matrices as ours does."""
    import torch
    import torch.nn.functional as F

    from torchvit import train as tt
    from torchvit.model import ViT
    from train.common import Recipe

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_float32_matmul_precision("highest")
    torch.manual_seed(seed)
    model = (timm_vit(config) if timm else ViT(config)).to(device)
    if timm:  # timm's position table and class token are 3-D: only its linear layers decay
        params = list(model.parameters())
        opt = torch.optim.AdamW([{"params": [p for p in params if p.ndim == 2],
                                  "weight_decay": Recipe().weight_decay},
                                 {"params": [p for p in params if p.ndim != 2], "weight_decay": 0.0}],
                                lr=0.0, betas=(0.9, 0.999), eps=1e-8)
    else:
        opt = tt.make_optimizer(model, Recipe())
    for g in opt.param_groups:
        g["lr"] = 1e-4
    forward = torch.compile(model) if compiled else model
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.standard_normal((batch, config.channels, config.image_height,
                                              config.image_width), dtype=np.float32)).to(device)
    y = torch.from_numpy(rng.integers(0, config.num_classes, batch)).to(device)

    def autocast():
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=bf16)

    def sync(_):
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_train():
        model.train()
        with autocast():
            logits = forward(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    def one_infer():
        model.eval()
        with torch.inference_mode(), autocast():
            return forward(x)

    return one_train, one_infer, sync


def bench_torch(config: ViTConfig, batch: int, bf16: bool, compiled: bool, warmup: int,
                steps: int, seed: int = 0, timm: bool = False):
    one_train, one_infer, sync = torch_steps(config, batch, bf16, compiled, seed, timm)
    return run_timed(one_train, sync, warmup, steps), run_timed(one_infer, sync, warmup, steps)


# ---- patchify ------------------------------------------------------------------------------
def bench_patchify(framework: str, batches: list[int], patch: int, steps: int) -> list[dict]:
    """Naive loop vs vectorized reshape in one framework, after checking they agree exactly
    (with each other and with the NumPy reference)."""
    from parity import reference

    rows = []
    for b in batches:
        x = np.random.default_rng(0).random((b, 28, 28, 1), dtype=np.float32)
        ref = reference.patchify(x, patch)
        if framework == "flax":
            import jax

            from jaxvit import model as jm

            xj = jax.device_put(x)
            fast, jit_naive = jax.jit(jm.patchify, static_argnums=1), jax.jit(jm.patchify_naive,
                                                                             static_argnums=1)
            outs = [fast(xj, patch), jm.patchify_naive(xj, patch), jit_naive(xj, patch),
                    jm.patchify(xj, patch)]
            agree = all(np.array_equal(np.asarray(o), ref) for o in outs)

            def sync(r):
                return r.block_until_ready()

            cases = {"naive (eager Python loop)": lambda: jm.patchify_naive(xj, patch),
                     "naive (jitted)": lambda: jit_naive(xj, patch),
                     "vectorized (eager)": lambda: jm.patchify(xj, patch),
                     "vectorized (jitted)": lambda: fast(xj, patch)}
        else:
            import torch

            from torchvit import model as tm

            dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous().to(dev)
            agree = all(np.array_equal(o.cpu().numpy(), ref)
                        for o in (tm.patchify(xt, patch), tm.patchify_naive(xt, patch)))

            def sync(_):
                if dev.type == "cuda":
                    torch.cuda.synchronize()

            cases = {"naive (eager Python loop)": lambda: tm.patchify_naive(xt, patch),
                     "vectorized (eager)": lambda: tm.patchify(xt, patch)}
        if not agree:
            raise SystemExit(f"{framework} patchify implementations disagree at batch {b}")
        for impl, fn in cases.items():
            _, times = run_timed(fn, sync, 3, steps)
            rows.append({"kind": "patchify", "framework": framework, "mode": impl, "batch": b,
                         "patch": patch, **summarize(times)})
    return rows


# ---- report --------------------------------------------------------------------------------
def environment(framework: str) -> dict:
    """Device and versions. Only the measured framework is initialized: JAX's CPU client alone
    (its thread pool) slows PyTorch's CPU kernels in the same process ~50x (seen here)."""
    from importlib.metadata import version

    device = f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    backend = "cpu"
    if framework == "flax":
        import jax

        xla = os.environ.get("XLA_FLAGS", "")

        backend = jax.default_backend()
        if backend == "gpu":
            device = jax.devices()[0].device_kind
    else:
        import torch

        if torch.cuda.is_available():
            device, backend = torch.cuda.get_device_name(0), "gpu"
    return {"device": device, "backend": backend, "jax": version("jax"), "flax": version("flax"),
            "optax": version("optax"), "torch": version("torch"),
            "python": platform.python_version(),
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),  # train/malloc.py
            **({"xla_flags": xla} if framework == "flax" else {})}


def peak_for(device: str, bf16: bool) -> float | None:
    for frag, (fp32, bf) in PEAKS.items():
        if frag in device:
            return bf if bf16 else fp32
    return None


ENV_KEYS = ("device", "backend", "jax", "flax", "optax", "torch", "python")


def worker(args) -> list[dict]:
    """One measurement (a mode, or patchify in one framework), in its own process."""
    config = config_from_options(args.preset, args)
    if "flax" in args.worker:
        xla_flags.apply()  # as the trainer does, before JAX creates its backend
        if args.cpu_devices > 1:
            import jax

            jax.config.update("jax_num_cpu_devices", args.cpu_devices)
    env = environment("flax" if args.worker.split("-")[-1] == "flax" or
                      args.worker.startswith("flax") else "torch")
    if args.worker.startswith("patchify-"):
        rows = bench_patchify(args.worker.split("-", 1)[1],
                              args.patchify_batches,
                              config.patch_size, max(args.steps, 5))
        return [{**r, **env} for r in rows]
    mode = args.worker
    bf16 = mode.endswith("bf16")
    if mode.startswith("flax") and args.flax_attention == "cudnn" and env["backend"] != "gpu":
        raise UsageError(f"--flax-attention cudnn needs a GPU; JAX runs on {env['backend']} here")
    devices = args.cpu_devices if mode.startswith("flax") and env["backend"] == "cpu" else 1
    if mode.startswith("flax"):
        train, infer = bench_flax(config, args.batch_size, bf16, args.warmup, args.steps,
                                  devices=devices, attention=args.flax_attention)
    else:
        train, infer = bench_torch(config, args.batch_size, bf16, "compile" in mode,
                                   args.warmup, args.steps, timm=mode.startswith("timm"))
        if mode.startswith("timm"):
            from importlib.metadata import version

            env["timm"] = version("timm")
    fpi = flops_per_image(config)
    rows = []
    for kind, (first, times), flops in (("train", train, 3 * fpi), ("inference", infer, fpi)):
        rows.append(with_rates({"kind": kind, "framework": mode.split("-")[0], "mode": mode,
                                "devices": devices, "preset": args.preset,
                                "config": config.to_dict(),
                                "attention": args.flax_attention if mode.startswith("flax") else "sdpa",
                                "batch": args.batch_size, "flops_per_image": flops,
                                "first_call_s": first, "times_s": times, **env}))
    return rows


def with_rates(row: dict) -> dict:
    """The row with its statistics from row["times_s"] (one entry per timed step): the median
    and p10/p90 step time, img/s, achieved TFLOP/s and MFU where the device's peak is known."""
    s = summarize(row["times_s"])
    ips = row["batch"] / s["median_s"]
    tflops = ips * row["flops_per_image"] / 1e12
    peak = peak_for(row["device"], row["mode"].endswith("bf16"))
    return {**row, **s, "img_per_s": ips,
            "img_per_s_p10_p90": [row["batch"] / s["p90_s"], row["batch"] / s["p10_s"]],
            "tflops": tflops, "mfu": tflops / peak if peak else None}


def pool_rounds(rounds: list[list[dict]]) -> list[dict]:
    """One row per (mode, kind) from several rounds of the same measurements: the statistics
    over every round's timed steps together; "rounds" keeps each round's median img/s and first
    call, and "round_ratio" the median over rounds of this mode's img/s over the first mode's
    in the same round (a ratio of neighbours in time, which the machine's drift between rounds
    does not move)."""
    by_key: dict[tuple[str, str], list[dict]] = {}
    for rows in rounds:
        for r in rows:
            by_key.setdefault((r["mode"], r["kind"]), []).append(with_rates(r))
    first_mode = rounds[0][0]["mode"]
    pooled = []
    for (_, kind), rs in by_key.items():
        row = with_rates({**rs[0], "times_s": [t for r in rs for t in r["times_s"]]})
        row["rounds"] = [{"img_per_s": r["img_per_s"], "first_call_s": r["first_call_s"]} for r in rs]
        ref = by_key[(first_mode, kind)]
        row["round_ratio"] = float(np.median([r["img_per_s"] / f["img_per_s"]
                                              for r, f in zip(rs, ref, strict=True)]))
        pooled.append(row)
    return pooled


def batch_list(text: str) -> list[int]:
    """--patchify-batches: comma-separated batch sizes, each >= 1 ('' for none)."""
    try:
        batches = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        batches = [0]
    if any(b < 1 for b in batches):
        raise argparse.ArgumentTypeError(f"expected comma-separated whole numbers >= 1, got {text!r}")
    return batches


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python train/bench.py", description=__doc__.split("\n\n")[0],
                      formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="small", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after the first call")
    p.add_argument("--rounds", type=int, default=1,
                   help="time the modes in turn this many times, each time in fresh processes, "
                        "and pool the rounds (a machine whose speed drifts between runs: each "
                        "mode's img/s per round, and its median ratio to the first mode's)")
    p.add_argument("--modes", default=",".join(MODES),
                   help="comma-separated subset of " + ",".join(MODES + REFERENCE_MODES))
    p.add_argument("--patchify-batches", type=batch_list, default="64,1024,8192",
                   help="batch sizes of the patchify timings ('' for none)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "gpu"],
                   help="cpu forces both frameworks onto the CPU")
    p.add_argument("--cpu-devices", type=int, default=1,
                   help="Flax modes on a CPU: split the batch over N XLA CPU devices, as "
                        "train/flax_main.py does by default (2 on 2+ cores)")
    p.add_argument("--flax-attention", default=None, choices=["xla", "cudnn"],
                   help="Flax modes: jax.nn.dot_product_attention's implementation (default: "
                        "JAX's choice, XLA); cudnn needs a GPU and bf16")
    p.add_argument("--out", default="bench_out")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    add_config_options(p)
    args = p.parse_args(argv)
    try:
        config = config_from_options(args.preset, args)  # refuses a bad config before any work
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    modes = [m for m in args.modes.split(",") if m]
    if config.crop and any(m in REFERENCE_MODES for m in modes):
        print("error: timm's ViT takes the whole image: the timm-* modes need --crop 0", file=sys.stderr)
        return 2
    if config.stride != config.patch_size and any(m in REFERENCE_MODES for m in modes):
        print("error: timm's ViT takes disjoint patches: the timm-* modes need --patch-stride 0",
              file=sys.stderr)
        return 2
    unknown = [m for m in modes if m not in MODES + REFERENCE_MODES]
    if any(m in REFERENCE_MODES for m in modes) and importlib.util.find_spec("timm") is None:
        print("error: the timm-* modes time timm's ViT, and timm is not installed "
              "(pip install timm)", file=sys.stderr)
        return 2
    if unknown or args.batch_size < 1 or args.steps < 1 or args.cpu_devices < 1 or \
            args.rounds < 1 or args.warmup < 0 or args.batch_size % args.cpu_devices:
        print(f"error: unknown mode(s) {unknown}; choose from {MODES + REFERENCE_MODES}" if unknown
              else "error: --batch-size, --steps, --rounds and --cpu-devices must be >= 1, "
                   "--warmup >= 0, and the batch must split evenly over the CPU devices",
              file=sys.stderr)
        return 2
    if args.device == "cpu" and args.flax_attention == "cudnn" and any(m.startswith("flax") for m in modes):
        print("error: --flax-attention cudnn needs a GPU, and --device cpu forbids one", file=sys.stderr)
        return 2
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    if args.worker:
        try:
            print(json.dumps(worker(args)))
        except UsageError as e:  # the parent passes this one line on
            print(f"error: {e}", file=sys.stderr)
            return 2
        return 0
    if not modes and not args.patchify_batches:
        print("error: nothing to time: give --modes or --patchify-batches", file=sys.stderr)
        return 2
    out = Path(args.out)
    try:
        prepare_out(out)
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    rounds: list[list[dict]] = []
    for n in range(args.rounds):  # the modes in turn, again and again: each sees the same drift
        rounds.append([])
        for job in modes:
            print(f"timing {job}" + (f", round {n + 1} of {args.rounds}" if args.rounds > 1 else "")
                  + " ...", file=sys.stderr, flush=True)
            got = run_worker(job, argv)
            if not isinstance(got, list):
                return got
            rounds[-1] += got
    rows = pool_rounds(rounds) if args.rounds > 1 and modes else rounds[0]
    for job in [f"patchify-{fw}" for fw in ("flax", "torch")] if args.patchify_batches else []:
        print(f"timing {job} ...", file=sys.stderr, flush=True)
        got = run_worker(job, argv)
        if not isinstance(got, list):
            return got
        rows += got
    env = {k: rows[0][k] for k in ENV_KEYS} if rows else {}
    (out / "bench.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows, env, args)
    (out / "bench.md").write_text(table)
    print(table)
    plot(rows, out / "bench.png", env["device"], args)
    return 0


def run_worker(job: str, argv: list[str] | None) -> list[dict] | int:
    """One measurement in its own process: JAX's and PyTorch's CPU thread pools in one process
    slow each other down (seen here: PyTorch 50x slower after JAX had run). If it failed, the
    exit status: 2 with the worker's one line for bad input, 1 with its last words otherwise."""
    cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", job]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
    last = proc.stderr.strip().splitlines()[-1:]
    if proc.returncode == 2 and last and last[0].startswith("error: "):
        print(last[0], file=sys.stderr)
        return 2
    if proc.returncode != 0:
        print(f"error: {job} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
        return 1
    return json.loads(proc.stdout.strip().splitlines()[-1])


def model_name(args) -> str:
    """The preset, and each config field the command line changed: "small (spt=True)"."""
    base, config = preset(args.preset).to_dict(), config_from_options(args.preset, args).to_dict()
    changed = ", ".join(f"{k}={v}" for k, v in config.items() if base[k] != v)
    return f"{args.preset} ({changed})" if changed else args.preset


def markdown(rows: list[dict], env: dict, args) -> str:
    lines = [f"Device: {env['device']}; jax {env['jax']}, flax {env['flax']}, "
             f"torch {env['torch']}; preset `{model_name(args)}`, batch {args.batch_size}, "
             f"median of " + (f"{args.rounds} rounds x " if args.rounds > 1 else "")
             + f"{args.steps} timed steps", "",
             "| mode | train img/s | train p10-p90 | train TFLOP/s | train MFU | first train call (s) "
             "| inference img/s | first inference call (s) |",
             "|---|---|---|---|---|---|---|---|"]
    by_mode: dict[str, dict] = {}
    for r in rows:
        if r["kind"] in ("train", "inference"):
            by_mode.setdefault(r["mode"], {})[r["kind"]] = r
    for d in by_mode.values():
        t, i = d["train"], d["inference"]
        mfu = f"{t['mfu']:.1%}" if t["mfu"] is not None else "n/a"
        lines.append(f"| {_label(t)} | {t['img_per_s']:,.0f} | {t['img_per_s_p10_p90'][0]:,.0f}-"
                     f"{t['img_per_s_p10_p90'][1]:,.0f} | {t['tflops']:.2f} | {mfu} | "
                     f"{t['first_call_s']:.2f} | {i['img_per_s']:,.0f} | {i['first_call_s']:.2f} |")
    if args.rounds > 1:  # each round's medians, and the ratio to the first mode in each round
        first = next(iter(by_mode.values()))["train"]["mode"]
        lines += ["", f"| mode | train img/s by round | train / {first} | inference img/s by round "
                      f"| inference / {first} |", "|---|---|---|---|---|"]
        for d in by_mode.values():
            t, i = d["train"], d["inference"]
            lines.append(f"| {_label(t)} | {_by_round(t)} | {t['round_ratio']:.2f} | {_by_round(i)} "
                         f"| {i['round_ratio']:.2f} |")
    patch = [r for r in rows if r["kind"] == "patchify"]
    if patch:
        lines += ["", f"| patchify (28x28x1, patch {patch[0]['patch']}) | batch | median | p10-p90 |",
                  "|---|---|---|---|"]
        for r in patch:
            lines.append(f"| {r['framework']} {r['mode']} | {r['batch']} | {_t(r['median_s'])} | "
                         f"{_t(r['p10_s'])}-{_t(r['p90_s'])} |")
    return "\n".join(lines) + "\n"


def _by_round(row: dict) -> str:
    return ", ".join(f"{r['img_per_s']:,.0f}" for r in row["rounds"])


def _label(row: dict) -> str:
    attention = row.get("attention")
    return (row["mode"] + (f" ({row['devices']} CPU devices)" if row.get("devices", 1) > 1 else "")
            + (f", {attention} attention" if attention not in (None, "sdpa") else ""))


def _t(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} µs" if seconds < 1e-3 else f"{seconds * 1e3:.2f} ms"


def plot(rows: list[dict], path: Path, device: str, args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [_label(r) for r in rows if r["kind"] == "train"]
    if not modes:
        return
    train = [r["img_per_s"] for r in rows if r["kind"] == "train"]
    infer = [r["img_per_s"] for r in rows if r["kind"] == "inference"]
    fig, ax = plt.subplots(figsize=(9, 4.5))
    pos = np.arange(len(modes))
    ax.bar(pos - 0.2, train, 0.4, label="train step (fwd+bwd+AdamW)")
    ax.bar(pos + 0.2, infer, 0.4, label="inference")
    ax.set_xticks(pos, modes, rotation=20, ha="right")
    ax.set_ylabel("images / second (median)")
    ax.set_title(f"ViT preset '{model_name(args)}', batch {args.batch_size} on {device}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
