"""Command line: ``python -m selfforcing_core.parity DIR``."""
import sys
from pathlib import Path

from . import run_parity


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m selfforcing_core.parity FIXTURE_DIR")
        return 2
    comparisons = run_parity(Path(argv[0]))
    for comparison in comparisons:
        print(comparison.line())
    failed = sum(not c.passed for c in comparisons)
    print(f"{len(comparisons) - failed} passed, {failed} failed")
    return 1 if failed or not comparisons else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
