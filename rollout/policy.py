"""A servable policy: what a checkpoint's `policy/` folder holds, written by the trainer and read by
Serve (and by anyone who continues from it), so that neither imports the other."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from rollout.weights import write_model_copy

POLICY_SPEC = "docrl_policy.json"


def write_policy(out_dir: str | Path, base_model: str, exported, step: int, version_base: int = 0,
                 parent: str | None = None) -> Path:
    """Write the policy of `exported` (learner.types.ExportedWeights) as something a server loads:

        <out_dir>/docrl_policy.json   {"kind", "base_model", "weights_version", "step", "parent"}
        <out_dir>/adapter/            kind "lora": a peft adapter directory, served on `base_model`
        <out_dir>/model/              kind "full": a complete HF model directory (configs, processor,
                                      tokenizer, chat template, model.safetensors)
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if exported.kind == "lora":
        shutil.copytree(exported.adapter_dir, out / "adapter", dirs_exist_ok=True)
    else:
        write_model_copy(base_model, exported.named_tensors(), out / "model")
    # a run continued from a checkpoint counts on from its parent's version (common/lineage.py)
    spec = {"kind": exported.kind, "base_model": str(base_model), "weights_version": version_base + exported.version,
            "step": step, "parent": parent}
    (out / POLICY_SPEC).write_text(json.dumps(spec, indent=2, sort_keys=True))
    return out


def resolve_policy(path: str | Path) -> dict:
    """What to serve for `path`: a run checkpoint (step-N/), its policy/ folder, or a plain HF model
    directory. Returns {"kind": "full"|"lora", "model": HF dir or hub id, "adapter": dir or None,
    "weights_version": int|None, "step": int|None, "parent": the checkpoint its run continued from, or None}."""
    p = Path(path)
    if (p / "policy" / POLICY_SPEC).exists():
        p = p / "policy"
    if (p / POLICY_SPEC).exists():
        spec = json.loads((p / POLICY_SPEC).read_text())
        if spec["kind"] == "lora":
            if not (p / "adapter" / "adapter_config.json").exists():
                raise FileNotFoundError(f"{p}: {POLICY_SPEC} says kind 'lora' but adapter/adapter_config.json is missing")
            return {"kind": "lora", "model": spec["base_model"], "adapter": str(p / "adapter"),
                    "weights_version": spec.get("weights_version"), "step": spec.get("step"), "parent": spec.get("parent")}
        if not (p / "model" / "config.json").exists():
            raise FileNotFoundError(f"{p}: {POLICY_SPEC} says kind 'full' but model/config.json is missing")
        return {"kind": "full", "model": str(p / "model"), "adapter": None,
                "weights_version": spec.get("weights_version"), "step": spec.get("step"), "parent": spec.get("parent")}
    if (p / "config.json").exists():
        return {"kind": "full", "model": str(p), "adapter": None, "weights_version": None, "step": None, "parent": None}
    raise FileNotFoundError(f"{path} is neither a docrl checkpoint (policy/{POLICY_SPEC}) nor a model directory (config.json)")


def materialize_policy(path: str | Path, out_dir: str | Path) -> Path:
    """A complete model directory at `out_dir` holding the weights of the policy at `path` (a run
    checkpoint, its policy/ folder, or a model directory): a LoRA adapter is merged into its base.
    What training continues from: it becomes the rollout's start, the learner's policy and the KL
    reference, and it lives in the new run's directory, so pruning the old run's checkpoints
    cannot pull it away. Reused while the source is unchanged (`docrl_source.json`)."""
    from docvqa.data import files_fingerprint

    spec = resolve_policy(path)
    out = Path(out_dir)
    sources = [spec["model"]] + ([spec["adapter"]] if spec["adapter"] else [])
    stamp = {"source": str(Path(path).resolve()), "kind": spec["kind"],
             "files": [files_fingerprint(src) for src in sources], "weights_version": spec["weights_version"],
             "step": spec["step"]}
    if (out / "docrl_source.json").exists() and json.loads((out / "docrl_source.json").read_text()) == stamp:
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if spec["kind"] == "full":
        shutil.copytree(spec["model"], tmp)
    else:
        from peft import PeftModel
        from transformers import AutoProcessor

        from common.policy_family import load_policy_model

        base = load_policy_model(spec["model"], dtype="auto")
        merged = PeftModel.from_pretrained(base, spec["adapter"]).merge_and_unload()
        merged.save_pretrained(tmp)
        AutoProcessor.from_pretrained(spec["model"]).save_pretrained(tmp)
    (tmp / "docrl_source.json").write_text(json.dumps(stamp, indent=2, sort_keys=True))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
