"""Run every benchmark in turn (`make bench`); each prints its own markdown table.

Pass --quick to use each benchmark's small size where it has one.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
QUICK_CAPABLE = {"bench_maxsim.py", "bench_rollout.py", "bench_learner.py", "bench_serve.py", "bench_serve_vs_vllm.py", "bench_train.py"}
# run on their own (docs/guides/benchmarks.md): root, an hour or more, or a library to install
NOT_IN_MAKE_BENCH = {"bench_multihost.py", "bench_real_size.py", "bench_policy_memory.py", "bench_retrieval_rl.py"}


def main() -> int:
    quick = "--quick" in sys.argv[1:]
    failed = []
    for script in sorted(p for p in HERE.glob("bench_*.py") if p.name not in NOT_IN_MAKE_BENCH):
        args = [sys.executable, str(script)] + (["--quick"] if quick and script.name in QUICK_CAPABLE else [])
        print(f"\n## {script.name}\n", flush=True)
        if subprocess.run(args, cwd=HERE.parent).returncode:
            failed.append(script.name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
