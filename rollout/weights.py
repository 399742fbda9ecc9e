"""Checking a weight push against the policy checkpoint before anything in the engine changes."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def local_model_dir(model: str) -> Path:
    """A local directory for `model`: the path itself, or the hub snapshot vLLM already cached."""
    path = Path(model)
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors"]))


def checkpoint_shapes(model_dir: str | Path) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape, read from the safetensors headers only (no weights loaded)."""
    from safetensors import safe_open

    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    shapes: dict[str, tuple[int, ...]] = {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            for key in f.keys():
                shapes[key] = tuple(f.get_slice(key).get_shape())
    return shapes


def check_full_weights(named: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], who: str) -> None:
    """Refuse a push with missing, extra or misshaped tensors, naming them (first 10 of each).
    Finiteness is checked once, by the learner before its export (`LearnerWorker.full_state_dict`),
    not again in every rollout worker: that pass read every weight of every push once more."""
    missing = sorted(set(expected) - set(named))
    extra = sorted(set(named) - set(expected))
    misshaped = sorted(f"{k} {tuple(named[k].shape)} != {expected[k]}" for k in set(named) & set(expected)
                       if tuple(named[k].shape) != expected[k])
    problems = []
    for label, items in (("missing", missing), ("unexpected", extra), ("misshaped", misshaped)):
        if items:
            problems.append(f"{len(items)} {label}: {', '.join(items[:10])}{', ...' if len(items) > 10 else ''}")
    if problems:
        raise ValueError(f"{who}: weight push refused, engine unchanged ({'; '.join(problems)})")


def check_lora_adapter(adapter_dir: str | Path, max_rank: int | None, who: str) -> dict:
    """The adapter directory must hold a peft config with a rank <= the engine's limit and readable
    safetensors weights; a malformed one is refused here, naming its file, before vLLM sees it."""
    from safetensors import safe_open

    adapter_dir = Path(adapter_dir)
    cfg_path = adapter_dir / "adapter_config.json"
    if max_rank is None:
        raise ValueError(f"{who}: LoRA push refused: the engine was started without LoRA (train with learner.lora.enabled)")
    if not cfg_path.exists() or not any(adapter_dir.glob("adapter_model.*")):
        raise ValueError(f"{who}: LoRA push refused: {adapter_dir} lacks adapter_config.json or adapter_model.*")
    try:
        cfg = json.loads(cfg_path.read_text())
        rank = int(cfg["r"])
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{who}: LoRA push refused: {cfg_path} is not a peft adapter config "
                         f"({type(e).__name__}: {e})") from None
    if rank > max_rank:
        raise ValueError(f"{who}: LoRA push refused: {adapter_dir}: adapter rank {rank} > the engine's max_lora_rank {max_rank}")
    for weights in adapter_dir.glob("adapter_model.safetensors"):
        try:
            with safe_open(str(weights), "pt") as f:
                if not list(f.keys()):
                    raise ValueError("it holds no tensors")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for a bad header
            raise ValueError(f"{who}: LoRA push refused: {weights} is not a readable safetensors file ({e})") from None
    return cfg


def write_model_copy(model_dir: str | Path, tensors: dict[str, torch.Tensor], out_dir: str | Path) -> Path:
    """A copy of a checkpoint directory with its weights replaced (same names, one safetensors file)."""
    import shutil

    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in Path(model_dir).iterdir():  # configs, tokenizer, processor, chat template; not the weights
        if f.is_file() and f.suffix in (".json", ".jinja", ".txt") and f.name != "model.safetensors.index.json":
            shutil.copy2(f, out / f.name)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out
