"""The `serve deploy` entry point: reads the whole docrl config (every role's section), so it lives
with the driver, and builds the Serve application of `deploy.app`."""

from __future__ import annotations

from cluster.config import load_config
from deploy.app import build_application

BUILD_ARGS = {"checkpoint", "index", "config", "overrides", "base_dir"}


def build_app(args: dict):
    """`serve deploy` / `serve run` entry point (import path `cluster.serve_entry:build_app`). Args:
    checkpoint, index (required); config (a docrl YAML), overrides (a list of KEY=VALUE), base_dir."""
    problems = [f"unknown {', '.join(sorted(set(args) - BUILD_ARGS))}"] if set(args) - BUILD_ARGS else []
    problems += [f"missing {', '.join(sorted({'checkpoint', 'index'} - set(args)))}"] if {"checkpoint", "index"} - set(args) else []
    if problems:
        raise ValueError(f"cluster.serve_entry:build_app args: {'; '.join(problems)} (known: {', '.join(sorted(BUILD_ARGS))})")
    cfg = load_config(args.get("config"), list(args.get("overrides") or []))
    return build_application(cfg, args["checkpoint"], args["index"], args.get("base_dir"))
