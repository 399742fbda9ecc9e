"""Where training metrics go: a JSONL log, TensorBoard event files, Ray metrics (Prometheus, the
Ray dashboard), and a PNG report of the curves at the end.

One `MetricsLogger.log(step, {...})` call feeds all of them. Names are dotted
(`reward/mean`, `time/rollout_s`); for Ray/Prometheus they become `docrl_reward_mean`, etc.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path


def prometheus_name(name: str) -> str:
    return "docrl_" + re.sub(r"[^a-zA-Z0-9_]", "_", name).strip("_")


class MetricsLogger:
    def __init__(self, log_dir: str | Path, tensorboard: bool = True, ray_metrics: bool = True,
                 tags: Mapping[str, str] | None = None, append: bool = False):
        """`append`: continue the JSONL log (a resumed run); otherwise start it afresh."""
        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.jsonl_path = self.dir / "metrics.jsonl"
        self._jsonl = self.jsonl_path.open("a" if append else "w")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.dir / "tensorboard"))
        self._ray = ray_metrics
        self._tags = dict(tags or {})
        self._gauges: dict[str, object] = {}

    def truncate_after(self, step: int) -> None:
        """Forget what was logged after `step` (a resumed run continues from the checkpoint of
        `step`; a killed driver may have logged later steps, and perhaps half a line): the JSONL
        log keeps its complete rows up to `step`, and TensorBoard hides its later events."""
        self._jsonl.close()
        kept = []
        for line in self.jsonl_path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line a killed process was writing
                continue
            if row.get("step", 0) <= step:
                kept.append(line)
        tmp = self.jsonl_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept))
        os.replace(tmp, self.jsonl_path)
        self._jsonl = self.jsonl_path.open("a")
        if self._tb is not None:
            from torch.utils.tensorboard import SummaryWriter

            self._tb.close()
            self._tb = SummaryWriter(str(self.dir / "tensorboard"), purge_step=step + 1)

    def _gauge(self, name: str):
        from ray.util.metrics import Gauge

        if name not in self._gauges:
            self._gauges[name] = Gauge(prometheus_name(name), description=f"docrl {name}", tag_keys=tuple(self._tags))
        return self._gauges[name]

    def log(self, step: int, metrics: Mapping[str, float]) -> None:
        clean = {k: float(v) for k, v in metrics.items() if v is not None}
        self._jsonl.write(json.dumps({"step": step, **{k: (v if math.isfinite(v) else None) for k, v in clean.items()}}) + "\n")
        self._jsonl.flush()
        for name, value in clean.items():
            if not math.isfinite(value):
                continue
            if self._tb is not None:
                self._tb.add_scalar(name, value, step)
            if self._ray:
                self._gauge(name).set(value, tags=self._tags or None)
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def training_summary(rows: Sequence[Mapping]) -> dict:
    """The headline of a run from its metric rows: held-out evaluation before RL (after any warm
    start) and at the end, the RL gain between them, and the warm starts' own before/after (the
    policy's and the retriever's), so a reader can tell what the warm starts did from what RL did."""
    evals = [r for r in rows if r.get("eval/anls") is not None]
    steps = [r for r in rows if r.get("reward/mean") is not None]
    out: dict = {"train_steps": max((r["step"] for r in steps), default=0)}
    for prefix in ("warm_start", "retriever_warm_start"):  # the policy's, the retriever's
        row = next((r for r in rows if r.get(f"{prefix}/loss_last") is not None), {})
        if row:
            out[prefix] = {k.split("/", 1)[1]: v for k, v in row.items() if k.startswith(f"{prefix}/")}
    warm = out.get("warm_start", {})
    if warm.get("eval_anls_after") is not None and warm.get("eval_anls_before") is not None:
        out["anls_warm_start_gain"] = warm["eval_anls_after"] - warm["eval_anls_before"]
    if evals:
        first, last = evals[0], evals[-1]
        # recall before and after: what RL was shown, and with retriever.learn what RL taught the retriever
        for key in sorted(k for k in first if k.startswith("eval/retrieval_recall@")):
            if last.get(key) is not None:
                name = key.split("/", 1)[1]
                out[f"{name}_before_rl"], out[f"{name}_after_rl"] = first[key], last[key]
        for key in ("eval/anls", "eval/exact_match"):
            if first.get(key) is not None and last.get(key) is not None:
                name = key.split("/", 1)[1]
                out[f"{name}_before_rl"], out[f"{name}_after_rl"] = first[key], last[key]
                out[f"{name}_rl_gain"] = last[key] - first[key]
        out["eval_steps"] = [r["step"] for r in evals]
    if steps:
        k = max(1, len(steps) // 5)  # the train reward of the first and last fifth of the steps
        out["train_reward_first_steps"] = sum(r["reward/mean"] for r in steps[:k]) / k
        out["train_reward_last_steps"] = sum(r["reward/mean"] for r in steps[-k:]) / k
    return out


# The report's panels: (title, metric keys or key prefixes ending in "@"), in reading order. A
# panel whose metrics a run never logged is left out.
ANSWERS_PANEL, RETRIEVAL_PANEL = "held-out answers (greedy)", "held-out retrieval"
NO_RETRIEVAL = "retrieval not exercised: the gold page is given (retriever.use_gold_page)"
REPORT_PANELS = (
    ("train reward (mean over answers)", ("reward/mean",)),
    (ANSWERS_PANEL, ("eval/anls", "eval/exact_match")),
    (RETRIEVAL_PANEL, ("eval/retrieval_recall@",)),
    # retriever.learn: how spread its page distribution is (ln of the candidates: uniform) and
    # the page-policy loss; held-out recall above says whether it learned the right pages
    ("the retriever's page policy (retriever.learn)", ("retriever/entropy", "retriever/loss")),
    ("KL(policy || reference) per token", ("learner/kl_to_ref",)),
    ("entropy per token", ("learner/entropy", "learner/entropy_estimate")),
    ("rollout vs learner logprob gap", ("learner/logprob_mismatch_mean", "learner/logprob_mismatch_max")),
)


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _headline(summary: Mapping) -> str:
    parts = []
    for name, label in (("anls", "held-out ANLS"), ("exact_match", "exact match")):
        if f"{name}_rl_gain" in summary:
            parts.append(f"{label} {summary[f'{name}_before_rl']:.3f} -> {summary[f'{name}_after_rl']:.3f} "
                         f"({summary[f'{name}_rl_gain']:+.3f})")
    headline = "RL: " + ", ".join(parts) if parts else ""
    warm = summary.get("warm_start", {})
    if warm.get("eval_anls_before") is not None and warm.get("eval_anls_after") is not None:
        # what the supervised warm start did, apart from what RL did after it
        ws = f"warm start: held-out ANLS {warm['eval_anls_before']:.3f} -> {warm['eval_anls_after']:.3f}"
        headline = f"{ws}\n{headline}" if headline else ws
    return headline


def report_panels(logged: Sequence[str]) -> list[tuple[str, tuple[str, ...]]]:
    """The `REPORT_PANELS` that `logged` metric names fill, each with the names it plots."""
    panels = []
    for panel_title, wanted in REPORT_PANELS:
        found = [k for w in wanted for k in sorted(logged) if (k.startswith(w) if w.endswith("@") else k == w)]
        if found:
            panels.append((panel_title, tuple(found)))
    return panels


def plot_report(jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None, title: str = "docrl",
                gold_page_given: bool = False) -> Path:
    """The run at a glance: one panel per `REPORT_PANELS` entry the run logged, step on the x axis,
    and the RL gain on held-out questions in the title (step 0 is the start of RL, after any warm
    start). With `keys`: one panel per listed metric instead (the trainer's report_all.png: every one).
    `gold_page_given`: the run handed the policy the gold page (retriever.use_gold_page), so its
    logged recall says nothing about retrieval; the retrieval panel says so instead of plotting it."""
    import matplotlib.pyplot as plt

    try:
        fig = build_report(read_jsonl(jsonl_path), keys=keys, title=title, gold_page_given=gold_page_given)
    except ValueError as e:
        raise ValueError(f"{jsonl_path}: {e}") from None
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return Path(png_path)


# Several lines in one panel: the first listed is drawn on top, thin, with small filled markers;
# each later one below it, wider, dashed, with larger hollow markers, so that where the values
# coincide (ANLS and exact match of all-exact or all-wrong answers) every line still shows.
_LINE_STYLES = (("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"))


def _line_style(i: int, n: int) -> dict:
    linestyle, marker = _LINE_STYLES[i % len(_LINE_STYLES)]
    style = {"linestyle": linestyle, "marker": marker, "zorder": 2 + n - i, "linewidth": 1.5 + 1.0 * i,
             "markersize": 3 + 2.5 * i}
    return style | ({"markerfacecolor": "none"} if i else {})


def _warm_start_note(ax, summary: Mapping) -> None:
    """The supervised warm start's held-out ANLS, before -> after, at step 0 of the ANLS panel
    (its 'after' is where RL starts)."""
    warm = summary.get("warm_start", {})
    before, after = warm.get("eval_anls_before"), warm.get("eval_anls_after")
    if before is None or after is None:
        return
    ax.plot([0], [before], linestyle="none", marker="v", markersize=7, color="grey", zorder=5,
            label="held-out ANLS before the warm start")
    if after != before:
        ax.annotate("", xy=(0, after), xytext=(0, before), arrowprops={"arrowstyle": "->", "color": "grey"})
    ax.annotate(f"warm start: {before:.3f} -> {after:.3f}", xy=(0, (before + after) / 2), xytext=(8, 0),
                textcoords="offset points", fontsize=7, color="dimgrey", ha="left", va="center",
                bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8})


def build_report(rows: Sequence[Mapping], keys: Sequence[str] | None = None, title: str = "docrl",
                 gold_page_given: bool = False):
    """The report's matplotlib figure for metric rows (what `plot_report` saves; see there)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logged = sorted({k for r in rows for k in r if k != "step"})
    summary = training_summary(rows)
    panels = [(k, (k,)) for k in keys] if keys is not None else report_panels(logged)
    if not panels:
        raise ValueError("no metrics to plot")
    cols = min(3, len(panels))
    nrows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, (panel_title, panel_keys) in zip(axes.flat, panels):
        ax.set_title(panel_title, fontsize=10)
        if keys is None and gold_page_given and panel_title == RETRIEVAL_PANEL:
            ax.text(0.5, 0.5, textwrap.fill(NO_RETRIEVAL, 40), transform=ax.transAxes, ha="center", va="center",
                    fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        for i, key in enumerate(panel_keys):
            x, y = _series(rows, key)
            ax.plot(x, y, label=key, **_line_style(i, len(panel_keys)))
        if keys is None and panel_title == ANSWERS_PANEL:
            _warm_start_note(ax, summary)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize=7)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    headline = _headline(summary) if keys is None else ""
    fig.suptitle(f"{title}\n{headline}" if headline else title)
    fig.tight_layout()
    return fig
