"""The `docrl` command line.

    docrl config show --config configs/tiny.yaml trainer.total_steps=20
    docrl make-tiny-models artifacts/tiny-models [--size 100m]
    docrl make-synthetic OUT [--num-documents 40 --seed 0 --level easy]
    docrl demo --config configs/tiny.yaml [KEY=VALUE ...]

Every command that takes a config validates it (with the overrides) before doing any work.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None, help="YAML config (default: built-in defaults = the tiny preset)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.total_steps=20")


def _load(args):
    from cluster.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> int:
    from cluster.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_make_tiny_models(args) -> int:
    from docvqa.tiny_models import build_tiny_models

    paths = build_tiny_models(args.out_dir, size=args.size, seed=args.seed, force=args.force)
    for role, path in paths.items():
        print(f"{role}: {path}")
    return 0


def cmd_make_synthetic(args) -> int:
    from docvqa.synthetic import generate_corpus

    files = generate_corpus(args.out_dir, num_documents=args.num_documents, seed=args.seed, level=args.level)
    for split, path in files.items():
        print(f"{split}: {path}")
    return 0


def cmd_demo(args) -> int:
    from cluster.demo import run_demo

    run_demo(_load(args), num_questions=args.num_questions)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docrl", description="RL fine-tuning for retrieval-augmented document QA on Ray")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("config", help="validate and print a config")
    p.add_argument("action", choices=["show"])
    _add_config_args(p)
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("make-tiny-models", help="build the tiny random policy and retriever (offline, seconds)")
    p.add_argument("out_dir")
    p.add_argument("--size", default="tiny", choices=["tiny", "100m"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the models exist")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("make-synthetic", help="render a synthetic DocVQA-layout corpus")
    p.add_argument("out_dir")
    p.add_argument("--num-documents", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", default="realistic", choices=["realistic", "easy"])
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("demo", help="retrieve pages and answer a few questions with vLLM on Ray")
    _add_config_args(p)
    p.add_argument("--num-questions", type=int, default=4)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    from cluster.config import ConfigError
    from docvqa.loaders import DataError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, DataError) as e:
        print(f"docrl: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
