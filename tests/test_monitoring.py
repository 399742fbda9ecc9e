"""The Grafana dashboard (cluster/launch/grafana-docrl.json) charts only metrics docrl emits.

The emitted names are not written down here: the trainer's own `train_step` and `evaluate`, the
learner group's `update` and the feedback stats run on stand-ins for the Ray parts (rollout
workers, reward actors, learner ranks), and their keys go through `prometheus_name`, as
`MetricsLogger` does. A renamed metric then breaks this test instead of leaving an empty panel.
No Ray cluster, no model: a few seconds.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

DASHBOARD = Path(__file__).resolve().parents[1] / "cluster" / "launch" / "grafana-docrl.json"
METRIC = re.compile(r"\bray_docrl_[A-Za-z0-9_]+\b")
NAME_REGEX = re.compile(r'__name__\s*=~\s*"([^"]+)"')


# -- stand-ins for the Ray parts of a step -------------------------------------------------------


class _Rollout:
    """Two answers per request, each token with a made-up rollout logprob."""

    version = 0

    def generate(self, requests, sampling):
        from rollout.types import GenerateOutput, RolloutResult, SampledAnswer

        answers = [SampledAnswer([5, 6, 7], [-0.5, -1.0, -1.5], "red", "stop"),
                   SampledAnswer([8, 9], [-2.0, -0.1], "blue", "stop")]
        return GenerateOutput([RolloutResult(r.request_id, "prompt", [1, 2, 3], tuple(p.page_id for p in r.pages),
                                             tuple((28, 28) for _ in r.pages), answers) for r in requests])


class _Rewards:
    """The reward actors' pool, scoring in-process with the real scoring code."""

    def __init__(self, cfg):
        self.cfg = cfg

    def submit(self, requests):
        return requests

    def collect(self, requests, timeout_s):
        from reward.scoring import score_batch

        return score_batch(requests, self.cfg)


class _LearnerWorker:
    """learner.worker.LearnerWorker's outputs without a model: made-up logprobs, the real loss
    and micro-batch statistics, and the per-minibatch bookkeeping the group combines."""

    def __init__(self, algo, use_reference):
        self.algo, self.use_reference = algo, use_reference

    def score(self, experiences, micro_batches):
        return {i: {"old": torch.full((len(experiences[i].response_ids),), -1.1),
                    "ref": torch.full((len(experiences[i].response_ids),), -1.2) if self.use_reference else None,
                    "values": None}
                for micro in micro_batches for i in micro.real}

    def train(self, experiences, targets, schedule):
        from learner import update as U

        results, first = [], None
        for epoch_index, epoch in enumerate(schedule):
            for mb_index, (micro_batches, mb_sequences, mb_tokens) in enumerate(epoch):
                micro_stats = []
                for micro in micro_batches:
                    target = U.gather_targets(targets, micro.indices)
                    rollout_rows = [experiences[i].rollout_logprobs for i in micro.indices]
                    logprobs, mask = U.pad_right([torch.tensor(r, dtype=torch.float32) - 0.05 for r in rollout_rows])
                    on_policy_stats = {}
                    if target["old_logprobs"] is None:  # no scoring pass: the worker takes its own
                        taken, on_policy_stats = U.on_policy_targets(logprobs, rollout_rows, mask, self.algo)
                        target.update(taken)
                        if self.use_reference:
                            target["ref_logprobs"] = logprobs - 0.1
                    share = U.micro_batch_share(self.algo.loss_aggregation, mask, mb_sequences, mb_tokens, 1)
                    _, stats = U.micro_batch_loss(logprobs, None, None, mask, target, self.algo, share)
                    stats.update(on_policy_stats)
                    stats["tokens"] = int(mask.sum())
                    first = first or dict(stats)
                    micro_stats.append(stats)
                stats = U.combine_micro_stats(micro_stats)
                stats.update(grad_norm=1.0, applied=1.0, seconds=0.1, input_tokens=float(stats["tokens"]),
                             epoch=float(epoch_index), minibatch=float(mb_index))
                results.append(stats)
        results[0]["first_micro_batch"] = first
        return results

    def learning_rates(self):
        return {"policy": 1e-5}


def _learner(cfg):
    from learner.group import LearnerGroup

    group = object.__new__(LearnerGroup)  # __init__ would start the ranks
    group.cfg, group.algo, group.seed, group.local, group.num_ranks = cfg.learner, cfg.algorithm, 0, True, 1
    group.version, group.update_calls, group.last_skips = 0, 0, []
    group.worker = _LearnerWorker(cfg.algorithm, cfg.algorithm.kl_coef > 0 or cfg.learner.log_kl_to_ref)
    return group


def _trainer(tmp_path):
    from cluster.config import load_config
    from cluster.train import QuestionSampler, Trainer
    from docvqa.sample import DocVQASample, Page

    cfg = load_config(None, ["learner.log_kl_to_ref=true"])  # the dashboard charts it when it is on
    questions = [DocVQASample(f"q{i}", "What word is printed?", ("red",), f"d{i}", f"d{i}/p1", (f"d{i}/p1",))
                 for i in range(cfg.trainer.prompts_per_step)]
    trainer = Trainer(cfg)  # only what setup() would start (Ray, the roles) is replaced below
    trainer.out, trainer.retriever = tmp_path, None
    trainer.corpus = SimpleNamespace(pages={q.gold_page: Page(q.gold_page, q.doc_id, 1, image_path="unused.png")
                                            for q in questions})
    trainer.sampler = QuestionSampler(questions, seed=0)
    trainer.eval_set = SimpleNamespace(samples=questions[:4])
    trainer.rollout, trainer.rewards, trainer.learner = _Rollout(), _Rewards(cfg.reward), _learner(cfg)
    trainer.push_weights = lambda: 0.0  # would export the learner's weights to the rollout workers
    (tmp_path / "logs").mkdir()
    return trainer


@pytest.fixture(scope="module")
def emitted(tmp_path_factory) -> set[str]:
    """Every `ray_docrl_*` name a training run and the feedback loop export."""
    from cluster.metrics import prometheus_name
    from feedback.recorder import RecorderStats
    from feedback.store import VersionStats

    trainer = _trainer(tmp_path_factory.mktemp("run"))
    keys = set(trainer.train_step(1)) | set(trainer.evaluate("step-0"))
    names = {"ray_" + prometheus_name(k) for k in keys}
    # deploy/feedback_api.py publishes these under their own names, already prefixed `docrl_`
    names |= {"ray_" + k for k in VersionStats("m", None, 1, answers=3, up=2, down=1, corrections=0).as_metrics()}
    names |= {"ray_" + k for k in RecorderStats(1, 0, 0, 0, 0, True, None).as_metrics()}
    return names


def _panels(dashboard: dict) -> list[dict]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # collapsed rows keep their panels inside
    return out


def _expressions(dashboard: dict) -> list[str]:
    exprs = [t["expr"] for p in _panels(dashboard) for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            q = var["query"]
            exprs.append(q["query"] if isinstance(q, dict) else q)
    return exprs


@pytest.fixture(scope="module")
def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def test_the_emitted_names_include_the_headline_metrics(emitted):
    # a stand-in that stopped exercising a code path would shrink the set the dashboard is checked against
    assert {"ray_docrl_reward_mean", "ray_docrl_reward_anls", "ray_docrl_eval_anls", "ray_docrl_learner_kl_to_ref",
            "ray_docrl_learner_entropy_estimate", "ray_docrl_learner_logprob_mismatch_max", "ray_docrl_time_step_s",
            "ray_docrl_throughput_rollout_tokens_per_s", "ray_docrl_weights_staleness",
            "ray_docrl_feedback_up_rate"} <= emitted, sorted(emitted)


def test_every_metric_the_dashboard_queries_is_emitted(dashboard, emitted):
    exprs = _expressions(dashboard)
    assert exprs
    for expr in exprs:
        named = METRIC.findall(NAME_REGEX.sub("", expr))
        patterns = NAME_REGEX.findall(expr)
        assert named or patterns, f"no docrl metric in {expr!r}"
        missing = sorted(set(named) - emitted)
        assert not missing, f"{expr!r}: docrl emits no {missing}"
        for pattern in patterns:
            assert any(re.fullmatch(pattern, n) for n in emitted), f"{expr!r}: no emitted name matches {pattern!r}"


def test_dashboard_shape(dashboard):
    assert dashboard["schemaVersion"] >= 39 and dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["run"]["type"] == "query" and "run" in json.dumps(variables["run"]["query"])
    for panel in _panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel.get("title"), panel
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["fieldConfig"]["defaults"].get("unit"), f"panel {panel['title']!r} has no unit"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]
    ids = [p["id"] for p in _panels(dashboard)]
    assert len(ids) == len(set(ids))


LISTENERS_OF_A_LOCAL_CLUSTER = r"""
import json, sys, time
import psutil
sys.path.insert(0, sys.argv[1])
from cluster.ray_setup import init_ray, monitoring_addresses
init_ray(num_cpus=1, include_dashboard=True)
import ray
ray.get(ray.remote(lambda: 1).remote())  # a worker too
addresses = monitoring_addresses()
time.sleep(2)  # the agents open their ports after start
me = psutil.Process()
found = []
for p in [me] + me.children(recursive=True):
    try:
        found += [(p.name(), c.laddr.ip, c.laddr.port) for c in p.net_connections(kind="tcp") if c.status == "LISTEN"]
    except psutil.Error:
        pass
print(json.dumps({"addresses": addresses, "listening": found}))
ray.shutdown()
"""


@pytest.mark.slow
def test_a_local_cluster_listens_on_loopback_only():
    """What `docrl` starts when no RAY_ADDRESS is given: the GCS, the raylet, the workers, the
    metrics endpoint and the dashboard all listen on 127.0.0.1, never on every interface."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", LISTENERS_OF_A_LOCAL_CLUSTER, str(root)], capture_output=True, text=True,
                          timeout=180, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    listening = report["listening"]
    assert len(listening) >= 5, listening  # the check saw the cluster's servers
    assert {ip for _, ip, _ in listening} <= {"127.0.0.1", "::ffff:127.0.0.1"}, listening
    ports = {port for _, _, port in listening}
    for url in (report["addresses"]["dashboard"], report["addresses"]["metrics"]):
        assert url.startswith("http://127.0.0.1:") and int(url.split(":")[2].split("/")[0]) in ports, (url, listening)
