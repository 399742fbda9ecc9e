"""One config schema for the whole system, validated before any work starts.

A run's config is a YAML file (see `configs/`) plus dotted command-line overrides such as
`trainer.total_steps=20`. Each role folder owns its section (`docvqa.config.DataConfig`,
`retriever.config.RetrieverConfig`, ...); this module composes them, adds the cross-section rules
(impossible combinations), and turns every validation failure into a message that names the full
key path.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from common.schema import Section
from deploy.config import ServeConfig
from docvqa.config import DataConfig
from feedback.config import FeedbackConfig
from learner.config import AlgorithmConfig, LearnerConfig
from retriever.config import RetrieverConfig
from reward.config import RewardConfig
from rollout.config import RolloutConfig


class ConfigError(ValueError):
    """A config that cannot run. The message lists every offending key with its full path."""


class RunConfig(Section):
    name: str = "docrl"
    output_dir: str = "runs/docrl"
    # where the run is kept for a fresh head to continue or serve it (checkpoints, the page index,
    # logs): an object store URI (s3://bucket/prefix, gs://...) or a path on another disk. Null: the
    # driver's run.output_dir only (hosts share no disk: roles on other hosts never read it)
    storage: str | None = None
    seed: int = 0
    models_dir: str = "artifacts/tiny-models"  # where "tiny" models are built (once, then reused)


class RayConfig(Section):
    address: str | None = None  # None: RAY_ADDRESS if set, else a local cluster on 127.0.0.1
    num_cpus: int | None = Field(None, ge=1)  # local cluster only
    num_gpus: int | None = Field(None, ge=0)  # local cluster only; may be fake (scheduling only)
    include_dashboard: bool = False
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    actor_start_timeout_s: float = Field(600.0, gt=0.0)
    # a role's placement group still pending after this fails the run naming the role (the
    # resources exist, checked at start, but other work holds them)
    placement_timeout_s: float = Field(60.0, gt=0.0)
    # memory of one GPU, for the memory plan checked at load where roles share a GPU (80: an H100
    # or A100 80GB)
    gpu_memory_gb: float = Field(80.0, gt=0.0)
    # custom Ray resources each actor of a role asks for besides its CPUs and GPUs, to choose its
    # nodes: e.g. {rollout: {"inference_node": 1}} with `ray start --resources='{"inference_node": 4}'`
    # on the nodes meant for it
    role_resources: dict[Literal["retriever", "rollout", "reward", "learner"], dict[str, float]] = {}

    @model_validator(mode="after")
    def _custom_resources_only(self) -> RayConfig:
        for role, resources in self.role_resources.items():
            for name, amount in resources.items():
                if name in ("CPU", "GPU", "memory", "object_store_memory"):
                    raise ValueError(f"role_resources.{role}.{name}: set CPUs and GPUs with the role's own "
                                     f"num_cpus/num_gpus keys; role_resources holds custom resources only")
                if amount <= 0:
                    raise ValueError(f"role_resources.{role}.{name} must be > 0 (got {amount})")
        return self


class WarmStartConfig(Section):
    """Supervised warm start before RL (learner/sft.py) on gold answers of the first `fraction` of
    the (shuffled) training questions, where the learner runs and as it trains (`learner.dtype`,
    `learner.lora`, `learner.freeze_vision_tower`); evaluation questions are never used."""

    steps: int = Field(0, ge=0)  # 0: no warm start, RL starts from learner.policy
    fraction: float = Field(0.5, gt=0.0, le=1.0)
    learning_rate: float = Field(1e-5, gt=0.0)  # for a pretrained policy; the tiny preset sets its own
    batch_size: int = Field(16, ge=1)
    max_eval_questions: int = Field(64, ge=0)  # held-out questions for its before/after greedy ANLS


class TrainerConfig(Section):
    total_steps: int = Field(10, ge=0)
    prompts_per_step: int = Field(8, ge=1)
    mode: Literal["sync", "async"] = "sync"
    eval_every: int = Field(5, ge=0)  # 0: only before and after training
    save_every: int = Field(5, ge=0)
    keep_last: int = Field(2, ge=1)
    num_eval_examples_logged: int = Field(8, ge=0)
    # Where training starts: a run checkpoint (step-N/), its policy/ folder, or a model directory,
    # e.g. the checkpoint `docrl serve` serves. Its weights (a LoRA adapter merged into its base)
    # become the policy, the rollout's start and the KL reference, in place of `learner.policy`.
    # Null: start from `learner.policy`.
    init_from: str | None = None
    warm_start: WarmStartConfig = WarmStartConfig()


class DocRLConfig(Section):
    run: RunConfig = RunConfig()
    ray: RayConfig = RayConfig()
    data: DataConfig = DataConfig()
    retriever: RetrieverConfig = RetrieverConfig()
    rollout: RolloutConfig = RolloutConfig()
    reward: RewardConfig = RewardConfig()
    learner: LearnerConfig = LearnerConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    trainer: TrainerConfig = TrainerConfig()
    serve: ServeConfig = ServeConfig()
    feedback: FeedbackConfig = FeedbackConfig()

    @property
    def requests_per_step(self) -> int:
        """Rollout requests of a training step: one per question, or with retriever.learn one per
        drawn page."""
        learn = self.retriever.learn
        return self.trainer.prompts_per_step * (learn.pages_per_question if learn.enabled else 1)

    @model_validator(mode="after")
    def _cross_section_rules(self) -> DocRLConfig:
        errors = []
        n = self.rollout.sampling.n
        if self.algorithm.advantage in ("grpo", "rloo") and n < 2:
            errors.append(
                f"algorithm.advantage={self.algorithm.advantage!r} compares answers within a group: "
                f"rollout.sampling.n must be >= 2 (got {n})"
            )
        if self.algorithm.advantage == "gae" and self.learner.value_model == "none":
            errors.append("algorithm.advantage='gae' needs a critic: learner.value_model must be 'head' or 'separate'")
        batch = self.requests_per_step * n
        mb = self.algorithm.minibatch_size
        if mb % self.learner.num_ranks:
            errors.append(f"algorithm.minibatch_size={mb} must be divisible by learner.num_ranks={self.learner.num_ranks}")
        if batch % mb:
            errors.append(
                f"algorithm.minibatch_size={mb} must divide the step batch "
                f"trainer.prompts_per_step * rollout.sampling.n"
                + (" * retriever.learn.pages_per_question" if self.retriever.learn.enabled else "") + f" = {batch}"
            )
        if self.retriever.learn.enabled and self.retriever.use_gold_page:
            errors.append("retriever.learn.enabled trains the retriever, but retriever.use_gold_page=true skips "
                          "retrieval: set one of them off")
        if self.retriever.learn.enabled and self.retriever.top_k != 1:
            errors.append(f"retriever.learn.enabled draws one page per answer, but retriever.top_k={self.retriever.top_k}: "
                          "set retriever.top_k=1, so that evaluation reads one page as training does")
        if self.retriever.top_k > self.rollout.max_images_per_prompt and self.rollout.on_too_many_images == "refuse":
            errors.append(
                f"retriever.top_k={self.retriever.top_k} pages exceed rollout.max_images_per_prompt="
                f"{self.rollout.max_images_per_prompt} and rollout.on_too_many_images is 'refuse'"
            )
        if self.retriever.use_gold_page and self.retriever.warm_start.steps:
            errors.append("retriever.warm_start.steps trains the retriever, but retriever.use_gold_page=true skips "
                          "retrieval: set one of them off")
        for key, name, role in (("learner.policy", self.learner.policy, "policy"),
                                ("retriever.model", self.retriever.model, "retriever")):
            if name.startswith("tiny-"):
                from docvqa.tiny_models import check_tiny_name

                try:
                    check_tiny_name(name, role)
                except ValueError as e:
                    errors.append(f"{key}={e}")
        if self.ray.address is None and self.ray.num_gpus is not None:
            wanted = {
                "rollout": self.rollout.num_workers * self.rollout.num_gpus_per_worker,
                "learner": self.learner.num_ranks * self.learner.num_gpus_per_rank,
                "retriever": self.retriever.num_actors * self.retriever.num_gpus_per_actor,
            }
            for role, gpus in wanted.items():
                if gpus > self.ray.num_gpus:
                    errors.append(f"{role} needs {gpus:g} GPUs but the local cluster has ray.num_gpus={self.ray.num_gpus}")
            total = sum(wanted.values())
            if total > self.ray.num_gpus and all(g <= self.ray.num_gpus for g in wanted.values()):
                # every role's bundles are reserved before any model loads: they must fit together
                errors.append(f"the roles need {total:g} GPUs together ({', '.join(f'{r} {g:g}' for r, g in wanted.items())}) "
                              f"but the local cluster has ray.num_gpus={self.ray.num_gpus}")
        errors.extend(full_finetune_memory_errors(self))
        if errors:
            raise ValueError("; ".join(errors))
        return self


def rollout_shares_gpus(cfg: DocRLConfig) -> bool:
    """Whether another role may compute on a GPU that a rollout worker holds. Ray gives each whole
    GPU to one actor, and fractions of one GPU to several (the 1-GPU preset puts every role on its
    one GPU). vLLM sizes its KV cache from the device's free memory during its profile run, so a
    role that shares its GPU must not start before the rollout workers are ready."""
    others = [cfg.learner.num_gpus_per_rank] + ([] if cfg.retriever.use_gold_page else [cfg.retriever.num_gpus_per_actor])
    others = [g for g in others if g > 0]
    rollout = cfg.rollout.num_gpus_per_worker
    return rollout > 0 and bool(others) and any(g % 1 for g in (rollout, *others))


def full_finetune_memory_errors(cfg: DocRLConfig) -> list[str]:
    """Full fine-tuning on a GPU that vLLM shares (learner.memory): refused when the learner's
    model state, the retriever's weights and a tenth for activations exceed what vLLM leaves."""
    from learner.memory import ACTIVATION_RESERVE, full_finetune_bytes, parameter_count

    learner = cfg.learner
    if learner.lora.enabled or learner.num_gpus_per_rank <= 0 or not rollout_shares_gpus(cfg):
        return []
    parameters = parameter_count(learner.policy)
    if parameters is None:
        return []
    with_reference = cfg.algorithm.kl_coef > 0 or learner.log_kl_to_ref
    need = full_finetune_bytes(parameters, learner.dtype, learner.zero_stage, learner.num_ranks, with_reference) / 1e9
    parts = [f"{need:.1f} GB of model state (weights, gradients, fp32 master weights and Adam moments"
             f"{', a frozen reference' if with_reference else ''})"]
    retriever = parameter_count(cfg.retriever.model) if not cfg.retriever.use_gold_page and cfg.retriever.num_gpus_per_actor > 0 else None
    if retriever:
        retriever_gb = retriever * (2 if cfg.retriever.dtype == "bfloat16" else 4) / 1e9
        need += retriever_gb
        parts.append(f"{retriever_gb:.1f} GB of retriever weights")
    left = cfg.ray.gpu_memory_gb * (1 - cfg.rollout.gpu_memory_utilization) * (1 - ACTIVATION_RESERVE)
    if need <= left:
        return []
    return [f"learner.lora.enabled=false: full fine-tuning of {learner.policy} ({parameters / 1e9:.2f}B parameters) on "
            f"a GPU shared with vLLM needs about {need:.1f} GB ({' + '.join(parts)}), but "
            f"rollout.gpu_memory_utilization={cfg.rollout.gpu_memory_utilization:g} of ray.gpu_memory_gb="
            f"{cfg.ray.gpu_memory_gb:g} leaves {left:.1f} GB after a tenth for activations. Train LoRA "
            "(learner.lora.enabled=true), or give the learner GPUs of its own (learner.num_gpus_per_rank=1 on a "
            "cluster with more GPUs; learner.num_ranks > 1 with learner.zero_stage=3 shards the state)"]


# ---------------------------------------------------------------------------------------------
# Loading: YAML + overrides -> validated config, with messages that name the key path


def parse_override(text: str) -> tuple[list[str], Any]:
    """`trainer.total_steps=20` -> (["trainer", "total_steps"], 20). Values are parsed as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected KEY=VALUE with a dotted key, e.g. trainer.total_steps=20")
    key, _, raw = text.partition("=")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r}: empty component in key {key!r}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: value is not valid YAML: {e}") from e
    return parts, value


def apply_override(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {'.'.join(parts)}: {'.'.join(parts[: i + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _known_keys(model: type[Section], loc: tuple) -> list[str]:
    """Field names of the section at `loc` (for 'did you mean' hints)."""
    for part in loc:
        field = model.model_fields.get(str(part))
        ann = getattr(field, "annotation", None) if field else None
        if not (isinstance(ann, type) and issubclass(ann, Section)):
            return []
        model = ann
    return list(model.model_fields)


def format_validation_error(err: ValidationError, source: str) -> str:
    lines = [f"invalid config ({source}):"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            known = _known_keys(DocRLConfig, tuple(e["loc"][:-1]))
            hint = difflib.get_close_matches(str(e["loc"][-1]), known, n=1)
            msg = "unknown key" + (f" (did you mean {'.'.join([*map(str, e['loc'][:-1]), hint[0]])}?)" if hint else "")
            if known:
                msg += f"; known keys here: {', '.join(known)}"
        elif "input" in e and e["type"] not in ("missing",) and not isinstance(e["input"], dict):
            msg += f" (got {e['input']!r})"
        lines.append(f"  {path}: {msg}" if path else f"  {msg}")
    return "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DocRLConfig:
    """Read a YAML config (or the defaults when `path` is None), apply overrides, validate."""
    tree: dict = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path} is not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"config file {path}: the top level must be a mapping of sections")
        tree = loaded or {}
    for text in overrides:
        apply_override(tree, *parse_override(text))
    if overrides:
        source += " + overrides " + " ".join(overrides)
    try:
        return DocRLConfig.model_validate(tree)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def dump_config(config: DocRLConfig) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
