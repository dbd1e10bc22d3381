"""Benchmark attncc against fla and FlashAttention: `python benchmarks/bench.py --help`.

The same as `attncc bench`; see BENCHMARKS.md for the measured table.
"""

from attncc.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
