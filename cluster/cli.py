"""The `docrl` command line.

    docrl config show --config configs/tiny.yaml trainer.total_steps=20
    docrl make-tiny-models artifacts/tiny-models [--size 100m] [--family qwen2_5_vl]
    docrl make-synthetic OUT [--num-documents 40 --seed 0 --level easy]
    docrl demo --config configs/tiny.yaml [KEY=VALUE ...]
    docrl index --config configs/tiny.yaml [--folder DIR | --split train|eval|all] [--out DIR]
    docrl search --config configs/tiny.yaml [--index DIR] [-k 3] -q "question" [-q ...]
    docrl retrieval-eval --config configs/tiny.yaml [--index DIR] [--split eval] [--ks 1 3 5]
    docrl doctor --config configs/tiny.yaml      (rollout-vs-reference logprob parity)
    docrl train --config configs/tiny.yaml [--resume] [KEY=VALUE ...]
    docrl serve --config configs/tiny.yaml [--checkpoint DIR] [--index DIR] [KEY=VALUE ...]
    docrl push-retriever --config configs/tiny-retrieval.yaml [--checkpoint DIR] [--app docrl]
    docrl feedback export|stats|migrate --config configs/tiny.yaml ...   (see feedback/cli.py)

Every command that takes a config validates it (with the overrides) before doing any work.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
from pathlib import Path


class CLIError(Exception):
    """An expected failure of a command (bad input, a port in use): printed as one message, no traceback."""


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default=None,
                   help="YAML config (default: the built-in defaults of cluster/config.py: tiny random models, the "
                        "realistic synthetic level, a local cluster; `make demo` uses configs/tiny.yaml)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted overrides, e.g. trainer.total_steps=20")


def _load(args):
    from cluster.config import load_config

    return load_config(args.config, args.overrides)


def cmd_config_show(args) -> int:
    from cluster.config import dump_config

    print(dump_config(_load(args)), end="")
    return 0


def cmd_make_tiny_models(args) -> int:
    from docvqa.tiny_models import build_tiny_family, build_tiny_models, tiny_family_role

    if args.family:
        try:
            role = tiny_family_role(args.family)
        except ValueError as e:
            raise CLIError(f"--family: {e}") from None
        paths = {role: build_tiny_family(args.out_dir, args.family, size=args.size, seed=args.seed, force=args.force)}
    else:
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


def _index_dir(cfg, args) -> str:
    return args.index or cfg.retriever.index_dir or str(Path(cfg.run.output_dir) / "index")


def _require_path(path: str | None, flag: str) -> None:
    """A path given on the command line must exist: checked before Ray starts, so that a typo costs
    a second, not a cluster start and then a message about something else."""
    if path is not None and not Path(path).exists():
        raise CLIError(f"{flag}: {path} does not exist")


def _require_index(cfg, args) -> str:
    """The index directory a command reads, checked before Ray starts."""
    _require_path(args.index, "--index")
    index_dir = _index_dir(cfg, args)
    if not (Path(index_dir) / "manifest.json").exists():
        raise CLIError(f"no page index at {index_dir} (build one with `docrl index`, or pass --index)")
    return index_dir


def _retriever_group(cfg, checkpoint: str | None = None, searches: bool = True):
    """The run's retriever: its warm-started model if it has one, and for a group that `searches`
    the query adapter of `checkpoint` (default: the run's newest checkpoint) where retriever.learn
    trained one (pages never pass through it: indexing needs none)."""
    from cluster.checkpoint import CheckpointManager
    from cluster.ray_setup import init_ray
    from common.shipping import ship_if_local
    from retriever.finetune import run_retriever
    from retriever.group import RetrieverGroup
    from retriever.page_policy import read_adapter_state

    if searches:
        checkpoint = checkpoint or CheckpointManager(Path(cfg.run.output_dir) / "checkpoints").latest()
    adapter = read_adapter_state(checkpoint) if searches and checkpoint else None
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
    model = run_retriever(cfg.retriever, cfg.run.output_dir, cfg.run.models_dir)
    group = RetrieverGroup(ship_if_local(model), cfg.retriever, timeout_s=cfg.ray.actor_start_timeout_s)
    if adapter is not None:
        group.load_learner_state(adapter)
        print(f"searching through the query adapter of {checkpoint} (version {adapter['version']})", file=sys.stderr)
    return group


def cmd_index(args) -> int:
    """Stream the pages into an index: segment by segment, with progress (pages/s, ETA) logged;
    an interrupted run resumes when the same command runs again."""
    import time

    from docvqa.data import load_train_eval
    from retriever.ingest import ingest_folder

    cfg = _load(args)
    out = _index_dir(cfg, args)
    if (Path(out) / "manifest.json").exists():
        raise CLIError(f"{out} already holds a page index: remove it to rebuild, or index into another --out")
    if args.folder:
        if not Path(args.folder).is_dir():
            raise CLIError(f"--folder {args.folder}: no such folder")
        report = ingest_folder(args.folder)  # lists pages; PDF pages are rendered one by one as they are embedded
        pages, skipped = report.pages, report.skipped
        if not pages:
            for line in skipped:
                print(f"skipped: {line}")
            raise CLIError(f"--folder {args.folder}: no readable image or PDF page among {len(skipped)} file(s) "
                           "(each is named above); nothing was indexed")
    else:
        train, evaluation, corpus = load_train_eval(cfg.data, cfg.run.output_dir)
        chosen = {"train": train, "eval": evaluation, "all": corpus}[args.split]
        wanted = {pid for s in chosen.samples for pid in s.doc_pages} if args.split != "all" else set(corpus.pages)
        pages, skipped = [p for pid, p in corpus.pages.items() if pid in wanted], []
    group = _retriever_group(cfg, searches=False)
    group.ready()  # model loading is not indexing time
    t0 = time.time()
    try:
        result = group.build(pages, out)
    except KeyboardInterrupt:
        print(f"docrl index: interrupted; the segments written so far are kept in {out}: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    elapsed = time.time() - t0
    for line in skipped + result["skipped"]:
        print(f"skipped: {line}")
    embedded = result["indexed"] - result["resumed"]
    resumed = f", {result['resumed']} of them indexed by an earlier run" if result["resumed"] else ""
    print(f"indexed {result['indexed']} pages into {out}{resumed}; embedded {embedded} in {elapsed:.1f}s "
          f"({embedded / max(elapsed, 1e-9):.1f} pages/s), skipped {len(skipped) + len(result['skipped'])}")
    return 0


def cmd_search(args) -> int:
    cfg = _load(args)
    index_dir = _require_index(cfg, args)
    _require_path(args.checkpoint, "--checkpoint")
    group = _retriever_group(cfg, args.checkpoint)
    group.load(index_dir)
    for question, hits in zip(args.question, group.search(args.question, args.k)):
        print(f"{question}")
        for rank, (pid, score) in enumerate(hits, start=1):
            print(f"  {rank}. {pid}  {score:.4f}")
    return 0


def cmd_retrieval_eval(args) -> int:
    from docvqa.data import load_train_eval
    from retriever.evaluate import evaluate_retrieval

    cfg = _load(args)
    index_dir = _require_index(cfg, args)
    _require_path(args.checkpoint, "--checkpoint")
    train, evaluation, _ = load_train_eval(cfg.data, cfg.run.output_dir)
    group = _retriever_group(cfg, args.checkpoint)
    group.load(index_dir)
    report = evaluate_retrieval(group, (train if args.split == "train" else evaluation).samples, args.ks,
                                scope=cfg.retriever.scope)
    print(json.dumps(report, indent=2))
    return 0


def cmd_push_retriever(args) -> int:
    """A checkpoint's query adapter (retriever.learn) to the retriever of a running `docrl serve`."""
    from cluster.checkpoint import CheckpointManager
    from retriever.page_policy import ADAPTER_FILE, read_adapter_state

    cfg = _load(args)
    _require_path(args.checkpoint, "--checkpoint")
    checkpoint = args.checkpoint or CheckpointManager(Path(cfg.run.output_dir) / "checkpoints").latest()
    if checkpoint is None:
        raise CLIError(f"no --checkpoint given and no checkpoint in {cfg.run.output_dir}/checkpoints")
    if read_adapter_state(checkpoint) is None:
        raise CLIError(f"{checkpoint} holds no {ADAPTER_FILE}: its run did not train the retriever (retriever.learn.enabled)")
    import ray

    from deploy.app import push_retriever_adapter

    ray.init(address=cfg.ray.address or os.environ.get("RAY_ADDRESS") or "auto", logging_level="ERROR")
    version = push_retriever_adapter(args.app, str(checkpoint))
    print(f"docrl push-retriever: application {args.app!r} searches with query adapter version {version} ({checkpoint})")
    return 0


def ray_job_package_dir() -> Path | None:
    """The working directory when it is Ray's unpacked copy of a job's `--working-dir` (under
    .../runtime_resources/working_dir_files/_ray_pkg_...), which is deleted with the cluster."""
    cwd = Path.cwd()
    return cwd if any(part.startswith("_ray_pkg_") for part in cwd.parts) else None


def cmd_train(args) -> int:
    from cluster.train import Trainer

    cfg = _load(args)
    package = ray_job_package_dir()
    if package is not None and not Path(cfg.run.output_dir).is_absolute():
        raise CLIError(f"run.output_dir={cfg.run.output_dir} is relative, and this job runs in Ray's temporary copy "
                       f"of the working dir ({package}), deleted with the cluster: give an absolute path on storage "
                       "that outlives the job (shared by every node on a multi-node cluster), e.g. "
                       f"run.output_dir=/home/ray/docrl-runs/{Path(cfg.run.output_dir).name}")
    print(f"docrl train: run directory {Path(cfg.run.output_dir).resolve()} (checkpoints, logs)", flush=True)
    trainer = Trainer(cfg)
    try:
        final = trainer.run(resume=args.resume)
    except KeyboardInterrupt as stop:
        print(f"docrl train: {stop or 'interrupted'}", file=sys.stderr)
        return 130
    finally:
        trainer.shutdown()
    print(json.dumps(final, indent=2))
    logs = Path(cfg.run.output_dir) / "logs"
    summary = json.loads((logs / "summary.json").read_text())
    ws = summary.get("warm_start", {})
    if ws.get("eval_anls_after") is not None:
        print(f"warm start: held-out ANLS {ws['eval_anls_before']:.3f} -> {ws['eval_anls_after']:.3f} "
              f"({ws['seconds']:.0f}s)")
    if "anls_before_rl" in summary:
        print(f"RL ({summary['train_steps']} steps): held-out ANLS {summary['anls_before_rl']:.3f} -> "
              f"{summary['anls_after_rl']:.3f} (gain {summary['anls_rl_gain']:+.3f}); exact match "
              f"{summary['exact_match_before_rl']:.3f} -> {summary['exact_match_after_rl']:.3f}")
    print(f"logs, report.png, TensorBoard: {logs.resolve()}   checkpoints: {(logs.parent / 'checkpoints').resolve()}")
    return 0


def cmd_doctor(args) -> int:
    """Rollout-vs-reference logprob parity: base weights (greedy, and sampled at temperature 0.7),
    after a full push, after a LoRA push."""
    from cluster.ray_setup import init_ray
    from docvqa.tiny_models import resolve_model
    from rollout.parity import run_doctor

    cfg = _load(args)
    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
    policy = resolve_model(cfg.learner.policy, "policy", cfg.run.models_dir)
    report = run_doctor(policy, cfg.rollout, lora_rank=cfg.learner.lora.r, timeout_s=cfg.ray.actor_start_timeout_s,
                        page_size=args.page_size, full_push=not args.skip_full_push)
    ok = True
    print(f"docrl doctor: {policy} ({report['family']}, {cfg.rollout.dtype})")
    for label in ("base", "full_push", "lora_push"):
        if label not in report:
            print(f"  {label:10s} skipped (--skip-full-push)")
            continue
        r = report[label]
        ok &= r["max_abs_dlogprob"] < args.tolerance and r["greedy_tokens_identical"]
        print(f"  {label:10s} max |dlogprob| {r['max_abs_dlogprob']:.2e}  mean {r['mean_abs_dlogprob']:.2e}  "
              f"over {r['tokens']} tokens  greedy tokens identical: {r['greedy_tokens_identical']}  "
              f"(weights v{r['weights_version']})")
    sampled = report["base_sampled"]
    ok &= sampled["max_abs_dlogprob"] < args.tolerance
    print(f"  {'sampled':10s} max |dlogprob| {sampled['max_abs_dlogprob']:.2e}  mean {sampled['mean_abs_dlogprob']:.2e}  "
          f"over {sampled['tokens']} sampled tokens at temperature {sampled['temperature']:g} (the learner scores "
          f"softmax(logits / T), vLLM returns the sampled distribution's logprobs)")
    full_s = f"{report['full_push_seconds']:.2f}s" if "full_push_seconds" in report else "skipped"
    print(f"  push time: full {full_s}, LoRA {report['lora_push_seconds']:.2f}s")
    print("  PASS" if ok else f"  FAIL: a figure exceeds {args.tolerance:g} or greedy tokens differ")
    return 0 if ok else 1


def _check_port_free(host: str, port: int) -> None:
    """Bind serve.host:serve.port as Serve's proxy will (SO_REUSEADDR, as uvicorn does: a port
    still in TIME_WAIT is free), before Ray starts."""
    import errno
    import socket

    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as e:
        raise CLIError(f"serve.host={host}: not a host name or address ({e.strerror}); set serve.host=...") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            why = ("another program uses the port; choose another with serve.port=PORT" if e.errno == errno.EADDRINUSE
                   else "choose another address with serve.host=... or another port with serve.port=PORT")
            raise CLIError(f"cannot listen on {host}:{port} ({e.strerror}): {why}") from None


def serve_banner(cfg, checkpoint: str, url: str) -> str:
    """What `docrl serve` prints once the application runs: where each of its parts is."""
    feedback = "off (feedback.enabled is false)"
    if cfg.feedback.enabled:
        from sqlalchemy.engine import make_url

        where = make_url(cfg.feedback.url(cfg.run.output_dir)).render_as_string(hide_password=True)
        feedback = f"POST {url}/v1/feedback, GET {url}/v1/feedback/stats (answers recorded in {where})"
    # The ingress always serves the page (deploy/app.py, /ui); without feedback its questions
    # still work but its ratings, queue and chart are refused.
    notes = [f"asks for the key in ${cfg.serve.api_key_env}"] if cfg.serve.api_key_env else []
    if not cfg.feedback.enabled:
        notes.append("asking only: rating needs feedback.enabled=true")
    rater = f"{url}/ui" + "".join(f" ({n})" for n in notes)
    return (f"docrl serve: {checkpoint} on {url}\n  OpenAI-compatible: {url}/v1 (chat/completions, models)\n"
            f"  document QA: POST {url}/v1/docqa\n  feedback: {feedback}\n  rater page: {rater}\n"
            f"  health: {url}/healthz\n  Ctrl-C stops")


def cmd_serve(args) -> int:
    """Serve retrieval + the trained policy over HTTP (OpenAI-compatible) until Ctrl-C."""
    import signal
    import time

    from cluster.checkpoint import CheckpointManager

    cfg = _load(args)
    _require_path(args.checkpoint, "--checkpoint")
    if cfg.run.storage:  # a head that lacks the run's checkpoints or index gets them from run.storage
        from cluster.run_storage import RunStorage

        stored = RunStorage(cfg.run.storage, cfg.run.output_dir)
        if not args.checkpoint:
            (Path(cfg.run.output_dir) / "checkpoints").mkdir(parents=True, exist_ok=True)
            stored.restore_checkpoints(CheckpointManager(Path(cfg.run.output_dir) / "checkpoints"))
        if not args.index and cfg.retriever.index_dir is None:
            stored.restore_index(Path(cfg.run.output_dir) / "index")
    checkpoint = args.checkpoint or CheckpointManager(Path(cfg.run.output_dir) / "checkpoints").latest()
    if checkpoint is None:
        raise CLIError(f"no --checkpoint given and no checkpoint in {cfg.run.output_dir}/checkpoints")
    index_dir = _require_index(cfg, args)
    _check_port_free(cfg.serve.host, cfg.serve.port)
    # Ray, Serve and the application (torch among them) take ~10 s to import: only once the checks
    # above have passed, so that a wrong argument or a busy port is reported at once.
    from ray import serve

    from cluster.ray_setup import init_ray
    from deploy.app import serve_app

    init_ray(cfg.ray.address, cfg.ray.num_cpus, cfg.ray.num_gpus, cfg.ray.include_dashboard)
    try:
        url = serve_app(cfg, str(checkpoint), index_dir)
    except (FileNotFoundError, ValueError, RuntimeError, TimeoutError) as e:
        print(f"docrl serve: {e}", file=sys.stderr)
        return 2
    print(serve_banner(cfg, str(checkpoint), url), flush=True)
    def stop(signum, frame):
        raise KeyboardInterrupt

    # SIGTERM (process managers) and SIGINT (also when started in the background, where it is
    # ignored by default) both shut Serve down and let Ray clean up the local cluster.
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("docrl serve: stopping", flush=True)
    finally:
        serve.shutdown()
    return 0


def _page_size(text: str) -> tuple[int, int]:
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected WIDTHxHEIGHT in pixels, e.g. 1000x1300, got {text!r}") from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"page size must be positive, got {text!r}")
    return width, height


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="docrl", description="RL fine-tuning for retrieval-augmented document QA on Ray")
    parser.add_argument("--debug", action="store_true", help="print the traceback of expected errors too")
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
    p.add_argument("--family", help="build only the model of this family, at OUT_DIR/<role>-<family> (a policy "
                                    "family such as qwen2_5_vl, or a retriever family; configs name it "
                                    "tiny-<family>); default: the default policy and retriever")
    p.set_defaults(func=cmd_make_tiny_models)

    p = sub.add_parser("make-synthetic", help="render a synthetic DocVQA-layout corpus")
    p.add_argument("out_dir")
    p.add_argument("--num-documents", type=int, default=40)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--level", default="realistic", choices=["realistic", "easy", "sections"])
    p.set_defaults(func=cmd_make_synthetic)

    p = sub.add_parser("demo", help="retrieve pages and answer a few questions with vLLM on Ray")
    _add_config_args(p)
    p.add_argument("--num-questions", type=int, default=4)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("index", help="embed pages (a data split or a folder of images/PDFs) into a page index")
    _add_config_args(p)
    p.add_argument("--folder", help="index every image and PDF under this folder instead of the config's data")
    p.add_argument("--split", default="all", choices=["train", "eval", "all"], help="which documents of the data to index")
    p.add_argument("--out", dest="index", help="index directory (default: retriever.index_dir or <run.output_dir>/index)")
    p.set_defaults(func=cmd_index)

    p = sub.add_parser("search", help="search a page index from the command line")
    _add_config_args(p)
    p.add_argument("--index", help="index directory (default: retriever.index_dir or <run.output_dir>/index)")
    p.add_argument("-k", type=int, default=3)
    p.add_argument("--question", "-q", action="append", required=True, help="a question (repeatable)")
    p.add_argument("--checkpoint", help="search through this checkpoint's query adapter (retriever.learn; default: "
                                        "the run's newest checkpoint, where it holds one)")
    p.set_defaults(func=cmd_search)

    p = sub.add_parser("retrieval-eval", help="recall@k, MRR and NDCG@k of an index against a split's gold pages")
    _add_config_args(p)
    p.add_argument("--index", help="index directory (default: retriever.index_dir or <run.output_dir>/index)")
    p.add_argument("--split", default="eval", choices=["train", "eval"])
    p.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    p.add_argument("--checkpoint", help="search through this checkpoint's query adapter (retriever.learn; default: "
                                        "the run's newest checkpoint, where it holds one)")
    p.set_defaults(func=cmd_retrieval_eval)

    p = sub.add_parser("train", help="run PPO/GRPO training (trainer.mode: sync or async) on the configured cluster")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in run.output_dir")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("doctor", help="measure rollout-vs-reference logprob parity (base, full push, LoRA push)")
    _add_config_args(p)
    p.add_argument("--tolerance", type=float, default=1e-3, help="max |dlogprob| to pass (fp32 target: 1e-3)")
    p.add_argument("--page-size", type=_page_size, help="the probe page's WIDTHxHEIGHT in pixels, e.g. 1000x1300 for "
                                                        "a scanned page (default: a 612x792 letter page)")
    p.add_argument("--skip-full-push", action="store_true",
                   help="skip the full-push measurement, which holds three copies of the weights at its peak")
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("serve", help="serve document QA and chat over the trained policy with Ray Serve (OpenAI-compatible)")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="a training checkpoint (step-N/) or a model directory (default: the newest "
                                        "checkpoint in <run.output_dir>/checkpoints)")
    p.add_argument("--index", help="index directory (default: retriever.index_dir or <run.output_dir>/index)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("push-retriever", help="a checkpoint's query adapter (retriever.learn) to a running docrl serve, "
                                              "without a restart")
    _add_config_args(p)
    p.add_argument("--checkpoint", help="a training checkpoint (default: the newest in <run.output_dir>/checkpoints)")
    p.add_argument("--app", default="docrl", help="the Serve application (default: docrl, as docrl serve names it)")
    p.set_defaults(func=cmd_push_retriever)

    from feedback.cli import add_parser as add_feedback_parser

    add_feedback_parser(sub, _add_config_args, _load)
    return parser


# The expected error types outside this module, as (module, class name). They are looked up only in
# modules already imported: an exception of a module nobody imported cannot have been raised, and
# importing cluster.train (torch) and Ray just to answer "no" took ~10 s before each message.
_EXPECTED_ELSEWHERE = (("cluster.config", "ConfigError"), ("docvqa.loaders", "DataError"),
                       ("retriever.index", "IndexLoadError"), ("common.ray_helpers", "PlacementError"),
                       ("cluster.train", "RunDirectoryInUse"), ("cluster.train", "NodeLost"),
                       ("cluster.checkpoint", "CheckpointSpaceError"), ("learner.group", "LearnerRankLost"),
                       ("retriever.group", "RetrieverShardLost"))


def expected_error(e: BaseException) -> BaseException | None:
    """The user-facing cause of an expected failure (bad config, data, index, run directory, CLI
    input), also when it was raised inside a Ray actor; None for anything else (a bug)."""
    ray_exceptions = sys.modules.get("ray.exceptions")
    if ray_exceptions is not None:
        while isinstance(e, ray_exceptions.RayTaskError) and e.cause is not None:
            e = e.cause
    expected = (CLIError, *(getattr(sys.modules[module], name) for module, name in _EXPECTED_ELSEWHERE
                            if module in sys.modules))
    return e if isinstance(e, expected) else None


def overrides_last(argv: list[str]) -> list[str]:
    """`argv` with the config overrides (`section.key=value`) moved to the end. argparse fills
    positionals from the first stretch of plain words: an override before `--index I OUT` would
    otherwise be taken for OUT, and OUT refused as unrecognized."""
    from cluster.config import DocRLConfig

    sections = "|".join(DocRLConfig.model_fields)
    is_override = re.compile(rf"^({sections})(\.\w+|\[\d+\])*=").match
    return [a for a in argv if not is_override(a)] + [a for a in argv if is_override(a)]


def main(argv: list[str] | None = None) -> int:

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    from common.quiet import quiet_known_library_messages

    quiet_known_library_messages()  # the driver drops what every docrl process drops (common/quiet.py)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the processors' tokenizers in forked workers
    parser = build_parser()
    # Overrides may come before or after options (`demo a.b=1 --config x`): argparse leaves the
    # ones after an option unparsed, so collect every KEY=VALUE left over.
    args, rest = parser.parse_known_args(overrides_last(sys.argv[1:] if argv is None else argv))
    extra = [r for r in rest if "=" in r and not r.startswith("-")]
    if len(extra) != len(rest) or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(r for r in rest if r not in extra) or ' '.join(extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print(f"docrl {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - expected failures get one message; anything else is a bug
        cause = expected_error(e)
        if cause is None or args.debug:
            raise
        print(f"docrl {args.command}: {cause}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
