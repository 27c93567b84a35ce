"""`python -m parity.mutants`: would the parity checks notice if one twin computed something else?

Each mutant is one plausible bug, a small edit to one side only: PyTorch's default LayerNorm
epsilon, GELU's tanh approximation, the attention scaled by the whole width, a patch's pixels in
the other order, RoPE's other pairing convention, a converter that transposes only the kernels
whose shape demands it, ... For each, the source is copied into a temporary folder, the edit is
made there, and the check that must catch it runs on the copy: the parity suite (`python -m
parity`, stopped at its first failing row) or, for what the suite does not run (training-mode
randomness, initializers, the trainers' optimizers), the named test. The unmutated copy must
pass every check first. The working tree is never touched.

    python -m parity.mutants                          # every mutant (about 10 min on 2 cores)
    python -m parity.mutants --only gelu-tanh,ln-eps  # some
    python -m parity.mutants --config p4-cls-learned-28x28-w48  # the suite on one config only

Prints a table (mutant, the bug, the check, caught or ESCAPED, the first failing row) and exits
1 if any mutant escaped; `--out FILE` also writes it as JSON.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from parity.cli import OneLineParser

ROOT = Path(__file__).resolve().parent.parent
COPIED = ("parity", "jaxvit", "torchvit", "train", "tests", "pyproject.toml")
PARITY = "parity"  # the check `python -m parity`; any other check is a pytest node id


@dataclass(frozen=True)
class Mutant:
    name: str
    path: str  # relative to the repository root
    old: str  # must occur exactly once in the file
    new: str
    bug: str
    check: str = PARITY


MUTANTS = (
    # ---- the PyTorch twin's forward pass, checked by the parity suite ----
    Mutant("ln-eps", "torchvit/model.py",
           "self.norm1 = nn.LayerNorm(c.width, eps=c.ln_eps)",
           "self.norm1 = nn.LayerNorm(c.width, eps=1e-5)",
           "each block's first LayerNorm with PyTorch's default epsilon, 1e-5, not the config's ln_eps"),
    Mutant("gelu-tanh", "torchvit/model.py",
           'approximate="none" if self.config.gelu_exact else "tanh"', 'approximate="tanh"',
           "GELU's tanh approximation where the config asks for the exact one"),
    Mutant("attn-scale", "torchvit/model.py",
           "scale, mask = c.head_dim ** -0.5, None", "scale, mask = c.width ** -0.5, None",
           "attention logits scaled by 1/sqrt(width), not 1/sqrt(head dim)"),
    Mutant("patch-pixel-order", "torchvit/model.py",
           "x = x.permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p1, p2, C)",
           "x = x.permute(0, 2, 4, 5, 3, 1)  # (B, h, w, p1, p2, C)",
           "a patch's pixels flattened column by column (p2 p1 c) instead of row by row"),
    Mutant("sincos2d-axes", "torchvit/model.py",
           "return torch.cat([torch.sin(x), torch.cos(x), torch.sin(y), torch.cos(y)], dim=1)",
           "return torch.cat([torch.sin(y), torch.cos(y), torch.sin(x), torch.cos(x)], dim=1)",
           "the 2-D sin-cos table with rows and columns swapped"),
    Mutant("sincos2d-cls-row", "torchvit/model.py",
           "table = torch.cat([torch.zeros(1, config.width), table], dim=0)",
           "table = torch.cat([table[:1], table], dim=0)",
           "the class token given the first patch's 2-D position instead of none"),
    Mutant("rope-halves", "torchvit/model.py",
           "pairs = x.float().reshape(*x.shape[:-1], -1, 2)",
           "pairs = x.float().reshape(*x.shape[:-1], 2, -1).transpose(-1, -2)",
           "RoPE turning the pairs (x_i, x_i+hd/2) (the rotate-half convention), not (x_2i, x_2i+1)"),
    Mutant("lsa-diagonal", "torchvit/model.py",
           "scale, mask = 1.0, ~torch.eye(t, dtype=torch.bool, device=x.device)",
           "scale, mask = 1.0, torch.ones(t, t, dtype=torch.bool, device=x.device)",
           "Locality Self-Attention that lets a token attend to itself"),
    Mutant("spt-shift-order", "torchvit/model.py",
           "for dy, dx in ((-s, -s), (-s, s), (s, -s), (s, s))]",
           "for dy, dx in ((-s, -s), (s, -s), (-s, s), (s, s))]",
           "shifted patches with the up-right and down-left copies in each other's channels"),
    Mutant("gap-skips-first", "torchvit/model.py",
           'x = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)  # (B, D)',
           'x = x[:, 0] if self.config.pool == "cls" else x[:, 1:].mean(dim=1)  # (B, D)',
           "average pooling that skips the first token, as if there were a class token"),
    Mutant("norm-after-pooling", "torchvit/model.py",
           'x = self.norm(x)  # (B, T, D)\n'
           '        out["encoded"] = x\n'
           '        x = x[:, 0] if self.config.pool == "cls" else x.mean(dim=1)  # (B, D)',
           'out["encoded"] = self.norm(x)  # (B, T, D)\n'
           '        x = self.norm(x[:, 0] if self.config.pool == "cls" else x.mean(dim=1))  # (B, D)',
           "the final LayerNorm (eq. 4) after the pooling, not before: the same function with a "
           "class token, another with average pooling"),
    # ---- the converters and the optimizer's groups, PyTorch side ----
    Mutant("square-kernels-untransposed", "parity/weights.py",
           'state[name[: -len("kernel")] + "weight"] = torch.from_numpy(np.ascontiguousarray(value.T))',
           'state[name[: -len("kernel")] + "weight"] = torch.from_numpy(np.ascontiguousarray(\n'
           '                value.T if value.shape[0] != value.shape[1] else value))',
           "a converter that transposes a kernel only when its shape demands it (square ones pass as they are)"),
    Mutant("bias-decay", "parity/weights.py",
           'return [{"params": [p for n, p in named if decays(n)], "weight_decay": weight_decay},\n'
           '            {"params": [p for n, p in named if not decays(n)], "weight_decay": 0.0}]',
           'return [{"params": [p for n, p in named if p.ndim > 0], "weight_decay": weight_decay},\n'
           '            {"params": [p for n, p in named if p.ndim == 0], "weight_decay": 0.0}]',
           "PyTorch's AdamW decaying every tensor (biases, norms, positions), not only the kernels"),
    # ---- the Flax twin, checked by the same suite ----
    Mutant("flax-ln-eps", "jaxvit/model.py",
           "self.norm2 = nn.LayerNorm(epsilon=c.ln_eps, dtype=jnp.float32)",
           "self.norm2 = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32)",
           "each block's second LayerNorm in Flax with epsilon 1e-5, not the config's ln_eps"),
    Mutant("flax-sincos1d-halves", "jaxvit/model.py",
           "table = jnp.stack([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # (T, D/2, 2)",
           "table = jnp.concatenate([jnp.sin(angle), jnp.cos(angle)], axis=-1)  # (T, D/2, 2)",
           "Flax's 1-D sin-cos table as [all sines, all cosines], not interleaved"),
    Mutant("flax-gelu-tanh", "jaxvit/model.py",
           "return 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))",
           "return nn.gelu(x, approximate=True)",
           "Flax's GELU always the tanh approximation"),
    Mutant("flax-patch-pixel-order", "jaxvit/model.py",
           "x = x.transpose(0, 1, 3, 2, 4, 5)  # (B, h, w, p1, p2, C)",
           "x = x.transpose(0, 1, 3, 4, 2, 5)  # (B, h, w, p1, p2, C)",
           "Flax's patches flattened column by column (p2 p1 c)"),
    Mutant("flax-overlap-column-step", "jaxvit/model.py",
           "cols = np.arange((w - p) // s + 1)[:, None] * s + np.arange(p)",
           "cols = np.arange((w - p) // s + 1)[:, None] * p + np.arange(p)",
           "Flax's overlapping patches a patch apart across, not a stride: JAX clamps the gather's "
           "indices past the edge, so nothing fails, only the last columns' pixels are wrong"),
    # ---- what the parity suite does not run: each has its own test ----
    Mutant("drop-path-in-eval", "torchvit/model.py",
           "if not self.training or self.rate == 0.0:", "if self.rate == 0.0:",
           "stochastic depth still dropping paths in eval mode",
           "tests/test_models.py::test_the_twins_drop_paths_by_the_same_law"),
    Mutant("init-xavier-normal", "torchvit/model.py",
           "nn.init.xavier_uniform_(module.weight)", "nn.init.xavier_normal_(module.weight)",
           "PyTorch's kernels drawn xavier-normal, Flax's xavier-uniform (the same sd, another law)",
           "tests/test_models.py::test_fresh_inits_draw_each_tensor_from_the_same_law_in_both_frameworks"),
    Mutant("drop-rate", "torchvit/model.py",
           "keep = 1.0 - self.rate", "keep = 1.0 - 0.9 * self.rate",
           "stochastic depth dropping at 90% of its rate",
           "tests/test_models.py::test_the_twins_drop_paths_by_the_same_law"),
    Mutant("mlp-bias-sd", "torchvit/model.py",
           "nn.init.normal_(module.bias, std=1e-6)", "nn.init.normal_(module.bias, std=1.1e-6)",
           "PyTorch's MLP biases drawn with a 10% larger sd",
           "tests/test_models.py::test_fresh_inits_draw_each_tensor_from_the_same_law_in_both_frameworks"),
    Mutant("posemb-uniform", "torchvit/model.py",
           "self.pos_embed = nn.Parameter(torch.randn(1, c.num_tokens, c.width) * 0.02)",
           "self.pos_embed = nn.Parameter((torch.rand(1, c.num_tokens, c.width) * 2 - 1) * 0.02 * 3 ** 0.5)",
           "PyTorch's learned position table drawn uniform with the normal's sd, 0.02",
           "tests/test_models.py::test_fresh_inits_draw_each_tensor_from_the_same_law_in_both_frameworks"),
    Mutant("shear-half", "torchvit/train.py",
           'shear, shift = uniform(bound=full("shear")), uniform(2, bound=full("translate"))',
           'shear, shift = uniform(bound=0.5 * full("shear")), uniform(2, bound=full("translate"))',
           "the PyTorch trainer's shear drawn within half the recipe's bound",
           "tests/test_train_step_parity.py::test_both_trainers_draw_their_warps_from_the_same_laws"),
    Mutant("translate-bound", "torchvit/train.py",
           'shear, shift = uniform(bound=full("shear")), uniform(2, bound=full("translate"))',
           'shear, shift = uniform(bound=full("shear")), uniform(2, bound=0.9 * full("translate"))',
           "the PyTorch trainer's random shifts drawn within 90% of the recipe's bound",
           "tests/test_train_step_parity.py::test_both_trainers_draw_their_warps_from_the_same_laws"),
    Mutant("mixup-beta", "torchvit/train.py",
           "return torch.distributions.Beta(a, a).sample((n,))",
           "return torch.distributions.Beta(a, 1.3 * a).sample((n,))",
           "the PyTorch trainer's mixup and CutMix drawn from Beta(a, 1.3a), not Beta(a, a)",
           "tests/test_train_step_parity.py::test_both_trainers_draw_mixup_and_cutmix_from_the_same_laws"),
    Mutant("ema-warmup", "torchvit/train.py",
           "return min(decay, (1.0 + step) / (10.0 + step))",
           "return min(decay, (1.0 + step) / (5.0 + step))",
           "the PyTorch trainer's weight average warmed up as (1 + t) / (5 + t), not (1 + t) / (10 + t)",
           "tests/test_train_step_parity.py::test_ten_training_steps_agree_between_the_trainers"),
    Mutant("flax-adam-b2", "jaxvit/train.py",
           "steps.append(optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8,",
           "steps.append(optax.adamw(schedule, b1=0.9, b2=0.99, eps=1e-8,",
           "the Flax trainer's AdamW with beta2 0.99 against PyTorch's 0.999 (ten steps cannot see it)",
           "tests/test_train_step_parity.py::test_the_trainers_optimizers_agree_over_a_whole_schedule"),
    Mutant("tta-two-pixels", "torchvit/train.py",
           "TTA_SHIFTS = ((0, 0), (1, 0), (-1, 0), (0, 1), (0, -1))",
           "TTA_SHIFTS = ((0, 0), (2, 0), (-2, 0), (0, 2), (0, -2))",
           "the PyTorch trainer's test-time views shifted by 2 pixels, not 1",
           "tests/test_train.py::test_flax_weights_scored_by_either_trainer_give_identical_submissions"),
    Mutant("adam-eps", "torchvit/train.py",
           "lr=0.0, betas=(0.9, 0.999), eps=1e-8)", "lr=0.0, betas=(0.9, 0.999), eps=1e-6)",
           "the PyTorch trainer's AdamW with epsilon 1e-6 against optax's 1e-8",
           "tests/test_train_step_parity.py::test_ten_training_steps_agree_between_the_trainers"),
    Mutant("no-label-smoothing", "torchvit/train.py",
           "label_smoothing=recipe.label_smoothing)", "label_smoothing=0.0)",
           "the PyTorch trainer's loss without the recipe's label smoothing",
           "tests/test_train_step_parity.py::test_ten_training_steps_agree_between_the_trainers"),
    Mutant("distill-hard-soft", "torchvit/train.py",
           "taught = (F.one_hot(said.argmax(-1), classes).float() if recipe.distill_hard",
           "taught = (said.softmax(-1) if recipe.distill_hard",
           "the PyTorch trainer's hard-label distillation teaching the teacher's probabilities, "
           "not its top class",
           "tests/test_train_step_parity.py::test_distilled_targets_mix_the_label_and_the_teachers_answer_in_both_trainers"),
    Mutant("clip-twice-the-norm", "torchvit/train.py",
           "torch.nn.utils.clip_grad_norm_(self.model.parameters(), recipe.grad_clip)",
           "torch.nn.utils.clip_grad_norm_(self.model.parameters(), 2 * recipe.grad_clip)",
           "the PyTorch trainer clipping the gradient norm at twice the recipe's bound",
           "tests/test_train_step_parity.py::test_ten_training_steps_agree_between_the_trainers"),
)


def stale(mutant: Mutant, tree: Path = ROOT) -> str | None:
    """Why the mutant no longer applies to the source at `tree`, or None if it does."""
    count = (tree / mutant.path).read_text().count(mutant.old)
    if count != 1:
        return (f"mutant {mutant.name}: its text occurs {count} times in {mutant.path}, not once "
                f"(the source moved on; update parity/mutants.py)")
    return None


def mutate(tree: Path, mutant: Mutant) -> None:
    """Apply one mutant to the copy at `tree`."""
    path = tree / mutant.path
    path.write_text(path.read_text().replace(mutant.old, mutant.new))


def copy_tree(dest: Path) -> Path:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def run_check(tree: Path, check: str, configs: str | None) -> tuple[bool, str]:
    """Run one check on the copy at `tree` -> (passed, what failed first)."""
    env = dict(os.environ, PYTHONPATH=str(tree), JAX_PLATFORMS="cpu", PYTHONUNBUFFERED="1")
    if check == PARITY:
        cmd = [sys.executable, "-m", "parity", *(["--config", configs] if configs else [])]
        proc = subprocess.Popen(cmd, cwd=tree, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:  # the first failing row is enough
            if line.rstrip().endswith("|") and "| FAIL" in line:
                proc.kill()
                proc.communicate()
                cells = [c.strip() for c in line.strip().strip("|").split("|")]
                return False, f"{cells[0]} ({cells[1]}): {cells[2]} > {cells[3]}"
        err = proc.communicate()[1]
        if proc.returncode == 0:
            return True, ""
        return False, f"exit {proc.returncode}: {(err.strip().splitlines() or [''])[-1][:160]}"
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-n", "0", check]
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if proc.returncode == 0:
        return True, ""
    lines = proc.stdout.splitlines()  # the failed test's id (-ra's summary) and its first E lines
    node = next((ln.split()[1].split("::")[-1] for ln in lines if ln.startswith("FAILED ")),
                f"pytest exit {proc.returncode}")
    said = " ".join(ln[1:].strip() for ln in lines if ln.startswith("E ") and ln[1:].strip())
    return False, " ".join(f"{node}: {said}".split())[:200]


def main(argv: list[str] | None = None) -> int:
    p = OneLineParser(prog="python -m parity.mutants", description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, metavar="NAME[,NAME...]",
                   help=f"run only these mutants: {', '.join(m.name for m in MUTANTS)}")
    p.add_argument("--config", default=None, metavar="NAME[,NAME...]",
                   help="run the parity suite on these configs of its matrix only (python -m parity --config)")
    p.add_argument("--out", default=None, metavar="FILE", help="also write the results as JSON")
    args = p.parse_args(argv)
    names = args.only.split(",") if args.only else [m.name for m in MUTANTS]
    unknown = sorted(set(names) - {m.name for m in MUTANTS})
    if unknown:
        p.error(f"unknown mutant(s) {', '.join(unknown)}")
    if args.config:
        from parity.suite import CONFIGS  # imports neither jax nor torch

        if bad := sorted(set(args.config.split(",")) - set(CONFIGS)):
            p.error(f"unknown --config {', '.join(bad)}; the matrix has {', '.join(CONFIGS)}")
    chosen = [m for m in MUTANTS if m.name in names]
    for m in chosen:  # every mutant must still apply, before anything runs
        if why := stale(m):
            print(f"error: {why}", file=sys.stderr)
            return 2

    start = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="vit-mutants-") as work:
        base = copy_tree(Path(work) / "base")
        for check in dict.fromkeys(m.check for m in chosen):  # the unmutated copy passes first
            ok, what = run_check(base, check, args.config)
            if not ok:
                print(f"error: the unmutated source fails {check}: {what}", file=sys.stderr)
                return 2
        print("| mutant | the bug | checked by | result | first failure |")
        print("|---|---|---|---|---|")
        for m in chosen:
            tree = copy_tree(Path(work) / m.name)
            mutate(tree, m)
            t0 = time.perf_counter()
            ok, what = run_check(tree, m.check, args.config)
            rows.append({"mutant": m.name, "path": m.path, "bug": m.bug, "check": m.check,
                         "caught": not ok, "first_failure": what,
                         "seconds": round(time.perf_counter() - t0, 1)})
            shutil.rmtree(tree)
            check = "`python -m parity`" if m.check == PARITY else f"`{m.check.split('::')[-1]}`"
            print(f"| `{m.name}` | {m.bug} | {check} | {'caught' if not ok else '**ESCAPED**'} | "
                  f"{what.replace('|', '/')} |", flush=True)
    escaped = [r["mutant"] for r in rows if not r["caught"]]
    print(f"\n{len(rows) - len(escaped)} of {len(rows)} mutants caught"
          f"{' (escaped: ' + ', '.join(escaped) + ')' if escaped else ''} "
          f"in {time.perf_counter() - start:.0f} s")
    if args.out:
        Path(args.out).write_text(json.dumps({"configs": args.config or "all", "rows": rows}, indent=1))
    return 1 if escaped else 0


if __name__ == "__main__":
    sys.exit(main())
