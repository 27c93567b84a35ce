"""`python -m parity`: the parity suite as a table; exit status 1 on any failure.

    python -m parity                                   # every config of the matrix
    python -m parity --config p4-cls-learned-28x28-w48 # one (or several, comma-separated)
"""

from __future__ import annotations

import os
import sys
import time

from parity.cli import OneLineParser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # float32 parity is defined on the CPU
    from parity.suite import CONFIGS, all_rows

    p = OneLineParser(prog="python -m parity", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=None, metavar="NAME[,NAME...]",
                   help=f"check only these configs of the matrix: {', '.join(CONFIGS)}")
    args = p.parse_args(argv)
    names = args.config.split(",") if args.config else list(CONFIGS)
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        print(f"error: unknown --config {', '.join(unknown)}; the matrix has {', '.join(CONFIGS)}",
              file=sys.stderr)
        return 2

    start = time.perf_counter()
    print("| stage | config | max abs diff | tolerance | result |")
    print("|---|---|---|---|---|")
    failures = total = 0
    for row in all_rows(names):
        total += 1
        failures += not row.ok
        note = f" ({row.note})" if row.note and not row.ok else ""
        print(f"| {row.stage} | {row.config} | {row.diff:.3g} | {row.tol:.2g} | "
              f"{'pass' if row.ok else 'FAIL'}{note} |", flush=True)
    print(f"\n{total - failures} passed, {failures} failed "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
