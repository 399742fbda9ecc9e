"""Where training metrics go: a JSONL log, TensorBoard event files, Ray metrics (Prometheus, the
Ray dashboard), and a PNG report of the curves at the end.

One `MetricsLogger.log(step, {...})` call feeds all of them. Names are dotted
(`reward/mean`, `time/rollout_s`); for Ray/Prometheus they become `docrl_reward_mean`, etc.
"""

from __future__ import annotations

import json
import math
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
    start) and at the end, the RL gain between them, and the warm start's own before/after, so a
    reader can tell what the supervised warm start did from what RL did."""
    evals = [r for r in rows if r.get("eval/anls") is not None]
    steps = [r for r in rows if r.get("reward/mean") is not None]
    warm = next((r for r in rows if r.get("warm_start/loss_last") is not None), {})
    out: dict = {"train_steps": max((r["step"] for r in steps), default=0)}
    if warm:
        out["warm_start"] = {k.split("/", 1)[1]: warm[k] for k in warm if k.startswith("warm_start/")}
    if evals:
        first, last = evals[0], evals[-1]
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


def plot_report(jsonl_path: str | Path, png_path: str | Path, keys: Sequence[str] | None = None, title: str = "docrl") -> Path:
    """One panel per metric (all logged metrics, or `keys`), step on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_jsonl(jsonl_path)
    keys = list(keys) if keys else sorted({k for r in rows for k in r if k != "step"})
    if not keys:
        raise ValueError(f"{jsonl_path}: no metrics to plot")
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=3)
        ax.set_title(key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(png_path, dpi=90)
    plt.close(fig)
    return Path(png_path)
