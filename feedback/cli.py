"""`docrl feedback export|stats|migrate`: registered by `cluster.cli`.

    docrl feedback export --config C [--since 2026-01-01T00:00Z] [--until ...] [--index DIR] [--overwrite] OUT [KEY=VALUE ...]
    docrl feedback stats --config C [--since ...] [--json]
    docrl feedback migrate --config C
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; without a zone it is UTC."""
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or time (e.g. 2026-01-31 or "
                                         "2026-01-31T12:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=timezone.utc)


def _store(cfg):
    from feedback.store import FeedbackStore

    return FeedbackStore.from_config(cfg.feedback, cfg.run.output_dir)


def _page_source(cfg, index_dir: str | None):
    """The index's page files first; the config's data corpus (loaded only if needed) after."""
    from feedback.export import chain_sources, page_images_from_dataset, page_images_from_index

    corpus = {}

    def from_data(page_id: str):
        if "lookup" not in corpus:
            from docvqa.data import load_train_eval

            corpus["lookup"] = page_images_from_dataset(load_train_eval(cfg.data, cfg.run.output_dir)[2])
        return corpus["lookup"](page_id)

    return chain_sources(page_images_from_index(index_dir), from_data) if index_dir else from_data


def cmd_export(args, cfg) -> int:
    from feedback.export import export_feedback

    store = _store(cfg)
    try:
        summary = export_feedback(store, args.out_dir, since=args.since, until=args.until,
                                  page_image=_page_source(cfg, args.index), overwrite=args.overwrite)
    finally:
        store.close()
    print(f"exported {summary.exported} questions to {args.out_dir}/train.json and {summary.negative} "
          f"down-votes without a correction to {args.out_dir}/negative.json ({summary.pages_written} page images) "
          f"from {summary.rated} rated answers")
    for line in summary.problems:
        print(f"skipped: {line}")
    if summary.skipped:
        print(f"skipped by reason: {summary.skipped}")
    return 0


def format_stats(rows) -> str:
    header = ("model", "checkpoint", "weights", "answers", "rated", "up", "down", "corrections", "up rate")
    table = [header] + [(r.model or "-", r.checkpoint or "-", "-" if r.weights_version is None else str(r.weights_version),
                         str(r.answers), str(r.rated), str(r.up), str(r.down), str(r.corrections),
                         "-" if r.up_rate is None else f"{r.up_rate:.1%}") for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table)


def cmd_stats(args, cfg) -> int:
    store = _store(cfg)
    try:
        rows = store.stats(since=args.since)
    finally:
        store.close()
    if args.json:
        print(json.dumps([{**r.__dict__, "rated": r.rated, "up_rate": r.up_rate} for r in rows], indent=2))
    else:
        print(format_stats(rows) if rows else f"no answers recorded in {store.where}")
    return 0


def cmd_migrate(args, cfg) -> int:
    from feedback.migrations import LATEST

    store = _store(cfg)
    try:
        applied = store.migrate()
    finally:
        store.close()
    print(f"{store.where}: schema version {LATEST}" + (f" (applied {applied})" if applied else " (up to date)"))
    return 0


def run(args, cfg) -> int:
    """`cfg` is the whole docrl config (the caller loads it: the feedback role does not know the
    other roles' sections)."""
    from feedback.store import FeedbackError

    try:
        return {"export": cmd_export, "stats": cmd_stats, "migrate": cmd_migrate}[args.feedback_command](args, cfg)
    except FeedbackError as e:
        print(f"docrl feedback: {e.message}", file=sys.stderr)
        return 2


def add_parser(sub, add_config_args, load_config) -> None:
    """Register `docrl feedback ...` on the main parser's subparsers; `load_config(args)` gives the
    docrl config of the parsed arguments."""
    p = sub.add_parser("feedback", help="the human feedback loop: export rated answers as training data, stats")
    fsub = p.add_subparsers(dest="feedback_command", required=True)

    e = fsub.add_parser("export", help="write rated answers as DocVQA-layout training data (train.json, negative.json)")
    e.add_argument("out_dir", metavar="OUT")
    e.add_argument("--since", type=parse_time, help="feedback given or changed at or after this ISO 8601 time")
    e.add_argument("--until", type=parse_time, help="... and before this one")
    e.add_argument("--index", help="a retriever index whose manifest names the page image files (checked first; "
                                   "then the config's data corpus)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace the export OUT already holds (refused without it: a training run may read OUT)")
    add_config_args(e)

    s = fsub.add_parser("stats", help="answers, up/down votes and corrections per model version")
    s.add_argument("--since", type=parse_time, help="answers given at or after this ISO 8601 time")
    s.add_argument("--json", action="store_true")
    add_config_args(s)

    m = fsub.add_parser("migrate", help="bring the feedback database's schema to the latest version")
    add_config_args(m)
    for parser in (e, s, m):
        parser.set_defaults(func=lambda args: run(args, load_config(args)))
