"""The policy model families docrl runs, and the one place that tells a checkpoint's family from
its config.json. The learner, the parity check (`docrl doctor`), merging a LoRA checkpoint and the
tiny builds all load policies through here; vLLM picks its own implementation from the same
config.json.

Every family listed shares the layout the rest of docrl relies on: `model.language_model.*` and
`model.visual.*` module names, 3-D mrope positions from `get_rope_index(input_ids,
mm_token_type_ids, image_grid_thw, attention_mask=...)`, and a Qwen2-VL-style image processor
(smart_resize, 2x2 merge) with `<|image_pad|>` placeholders.
"""

from __future__ import annotations

from pathlib import Path

# config.json model_type -> (transformers model class, processor class)
POLICY_FAMILIES = {
    "qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
    "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
    "qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor"),
}


def policy_family(model: str | Path) -> str:
    """The family of a policy checkpoint (a local directory or a hub id), from its config.json."""
    from transformers import PretrainedConfig

    config, _ = PretrainedConfig.get_config_dict(str(model))
    family = config.get("model_type")
    if family not in POLICY_FAMILIES:
        raise ValueError(f"policy {model}: config.json has model_type {family!r} (architectures "
                         f"{config.get('architectures')}), not a supported policy family; supported: "
                         f"{', '.join(POLICY_FAMILIES)}")
    return family


def policy_classes(family: str) -> tuple[type, type]:
    """(model class, processor class) of a family."""
    import transformers

    if family not in POLICY_FAMILIES:
        raise ValueError(f"unknown policy family {family!r}; supported: {', '.join(POLICY_FAMILIES)}")
    model_cls, processor_cls = POLICY_FAMILIES[family]
    return getattr(transformers, model_cls), getattr(transformers, processor_cls)


def load_policy_model(model: str | Path, **kwargs):
    """The policy at `model` as transformers loads it, in its family's class (`kwargs` go to
    from_pretrained: dtype, attn_implementation, ...)."""
    model_cls, _ = policy_classes(policy_family(model))
    return model_cls.from_pretrained(str(model), **kwargs)
