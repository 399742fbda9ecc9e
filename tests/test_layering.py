"""The layering that docs/concepts.md ("Layout") states, checked with import-linter on the real tree:
each role imports only the layers below it, no role module imports anything at import time that
changes the process, and there are no import cycles."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    done = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml")], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert "2 kept, 0 broken" in done.stdout


def test_importing_any_module_leaves_the_environment_alone():
    """Importing every docrl module changes no environment variable (a local Ray cluster's loopback
    setting is made by `init_ray`, only when it starts one)."""
    probe = (
        "import os, importlib, pkgutil\n"
        "import ray  # Ray sets RAY_CLIENT_MODE on its own import\n"
        "before = dict(os.environ)\n"
        "for pkg in ('common','docvqa','rollout','retriever','reward','learner','feedback','deploy','cluster'):\n"
        "    importlib.import_module(pkg)\n"
        "    for m in pkgutil.iter_modules([pkg]):\n"
        "        importlib.import_module(f'{pkg}.{m.name}')\n"
        "changed = {k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)}\n"
        "print(sorted(changed))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout[-2000:]
