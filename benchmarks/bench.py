"""Benchmark attncc against fla and FlashAttention: `python benchmarks/bench.py --help`.

The same as `attncc bench` without a SPEC (the built-in four-decay table); see BENCHMARKS.md
for the measured table. `attncc bench SPEC --shape B,T,H,D[,E]` times a spec of your own.
"""

from attncc.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
