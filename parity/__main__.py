"""`python -m parity`: the parity suite as a table; exit status 1 on any failure."""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")  # float32 parity is defined on the CPU
    from parity.suite import all_rows

    start = time.perf_counter()
    print("| stage | config | max abs diff | tolerance | result |")
    print("|---|---|---|---|---|")
    failures = total = 0
    for row in all_rows():
        total += 1
        failures += not row.ok
        note = f" ({row.note})" if row.note and not row.ok else ""
        print(f"| {row.stage} | {row.config} | {row.diff:.3g} | {row.tol:.0e} | "
              f"{'pass' if row.ok else 'FAIL'}{note} |", flush=True)
    print(f"\n{total - failures} passed, {failures} failed "
          f"in {time.perf_counter() - start:.1f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
