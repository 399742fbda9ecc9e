"""Rollout-vs-reference logprob parity: the check that weights really reached vLLM and that the
learner scores exactly what vLLM sampled.

`reference_logprobs` is the plain-transformers computation (teacher forcing with the family's
3-D mrope positions, which need `mm_token_type_ids`: without them transformers silently falls
back to 1-D positions), in the model's family's class (`common.policy_family`). `run_doctor`
measures max |Δlogprob| between a rollout worker and the reference for the base weights, after a
full push of perturbed weights, and after a LoRA push, plus whether greedy decoding picks the same
tokens; and, on the base weights, for answers sampled at a temperature other than 1
(`sampled_parity`): the logprobs vLLM returns must be those of the temperature-scaled distribution
it sampled from, which is what the learner trains on.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch


@torch.no_grad()
def reference_logprobs(model, processor, prompt_text: str, images: Sequence, response_ids: Sequence[int],
                       expect_prompt_ids: Sequence[int] | None = None, temperature: float = 1.0) -> torch.Tensor:
    """Logprob of each response token under `model` (of a supported policy family, possibly
    peft-wrapped), in the distribution softmax(logits / temperature) (float32 logits divided, as
    vLLM's sampler does) over the tokens an answer may hold (the vision placeholders are banned, as
    in the rollout)."""
    from rollout.prompts import vision_token_ids

    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    inputs = processor(text=[prompt_text], images=list(images) or None, return_tensors="pt")
    prompt_ids = inputs["input_ids"][0].tolist()
    if expect_prompt_ids is not None and prompt_ids != list(expect_prompt_ids):
        raise ValueError(f"the processor's prompt ({len(prompt_ids)} tokens) differs from the rollout's "
                         f"({len(expect_prompt_ids)} tokens): image placeholders were expanded differently")
    ids = torch.tensor([prompt_ids + list(response_ids)])
    image_token_id = model.config.image_token_id
    mm = (ids == image_token_id).long()
    kwargs = {k: inputs[k] for k in ("pixel_values", "image_grid_thw") if k in inputs}
    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=mm, **kwargs).logits
    p = len(prompt_ids)
    response_logits = logits[0, p - 1:-1].float()
    response_logits[:, list(vision_token_ids(model.config))] = float("-inf")
    logp = torch.log_softmax(response_logits / temperature, dim=-1)
    return logp.gather(-1, torch.tensor(list(response_ids))[:, None])[:, 0]


def perturbed_state_dict(model_dir: str | Path, scale: float = 0.5, seed: int = 0) -> dict[str, torch.Tensor]:
    """Checkpoint tensors (HF names) plus seeded noise of `scale` times each tensor's std."""
    from safetensors.torch import load_file

    from rollout.weights import checkpoint_shapes

    shapes = checkpoint_shapes(model_dir)
    files = sorted({p for p in Path(model_dir).glob("model*.safetensors")})
    tensors = {k: v for f in files for k, v in load_file(str(f)).items() if k in shapes}
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in sorted(tensors):
        t = tensors[name].float()
        std = float(t.std()) if t.numel() > 1 and float(t.std()) > 0 else 0.02
        out[name] = (t + scale * std * torch.randn(t.shape, generator=gen)).to(tensors[name].dtype)
    return out


def random_lora_adapter(model, out_dir: str | Path, r: int = 8, seed: int = 0, target_modules=("q_proj", "v_proj"),
                        relative_scale: float = 1.0):
    """A peft LoRA on the language model with non-zero random A and B (a fresh LoRA is a no-op),
    drawn so that each layer's update scaling * B @ A has entries of `relative_scale` times the
    standard deviation of the layer's weight: a change as large as the weights, in the same
    numerical range as the base. (A fixed scale of 0.3 for A and B made the update 25 times the
    weights at rank 8 and 70 times at rank 64; on a Qwen2.5-VL-3B-sized model in bf16, vLLM and
    transformers then disagreed by up to 4.9 nats after the LoRA push, against 0.03 on the base.)"""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=r"model\.language_model\.layers\.\d+\.self_attn\.(" +
                     "|".join(target_modules) + ")", lora_dropout=0.0)
    peft_model = get_peft_model(model, cfg)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in sorted(peft_model.named_modules(), key=lambda kv: kv[0]):
            if not isinstance(layer, LoraLayer):
                continue
            for adapter in layer.lora_A:
                # entries of B @ A with A, B ~ N(0, s^2) have std r^0.5 * s^2
                target = relative_scale * float(layer.base_layer.weight.float().std())
                s = (target / (layer.scaling[adapter] * layer.r[adapter] ** 0.5)) ** 0.5
                for p in (layer.lora_A[adapter].weight, layer.lora_B[adapter].weight):
                    p.copy_(torch.randn(p.shape, generator=gen) * s)
    peft_model.save_pretrained(str(out_dir))
    return peft_model.eval()


def sampled_parity(group, request, images: Sequence, reference, processor, temperature: float, n: int = 4,
                   max_tokens: int = 16, seed: int = 0) -> dict:
    """Sample `n` answers at `temperature` (seeded) from the rollout `group` and compare the logprob
    vLLM returns for each sampled token with `reference`'s logprob of that token under the same
    temperature-scaled distribution. Returns max/mean |Δlogprob| over all sampled tokens."""
    from rollout.config import SamplingConfig

    sampling = SamplingConfig(n=n, temperature=temperature, max_tokens=max_tokens, seed=seed)
    (res,) = group.generate([request], sampling).results
    deltas = []
    for ans in res.answers:
        ref = reference_logprobs(reference, processor, res.prompt_text, images, ans.token_ids, res.prompt_ids,
                                 temperature=temperature)
        deltas.append((ref - torch.tensor(ans.logprobs, dtype=torch.float32)).abs())
    delta = torch.cat(deltas)
    return {"max_abs_dlogprob": float(delta.max()), "mean_abs_dlogprob": float(delta.mean()),
            "tokens": int(delta.numel()), "temperature": temperature, "weights_version": res.weights_version}


def run_doctor(policy_path: str, rollout_cfg, lora_rank: int = 8, timeout_s: float = 600.0,
               sample_temperature: float = 0.7, page_size: tuple[int, int] | None = None,
               full_push: bool = True) -> dict:
    """Start one rollout worker and measure parity: greedy on the base weights, after a full push
    and after a LoRA push ("base", "full_push", "lora_push"), and answers sampled at
    `sample_temperature` on the base weights ("base_sampled"). Returns a report dict (with the
    policy's "family").

    The probe is one synthetic page of `page_size` (width, height; default the synthetic letter
    page). Beside the rollout worker's copy of the weights this process holds one copy (the
    reference model) and, during the full push, a second (the perturbed weights, also put once in
    the object store): three copies at the peak, so `full_push=False` skips that measurement
    where three do not fit (a 3B policy in bf16 on a 24 GiB machine)."""
    from transformers import AutoProcessor

    from common.policy_family import load_policy_model, policy_family
    from docvqa.sample import Page
    from docvqa.synthetic import generate_corpus
    from rollout.config import SamplingConfig
    from rollout.group import RolloutGroup
    from rollout.prompts import fit_image
    from rollout.types import RolloutRequest
    from rollout.weights import write_model_copy

    report: dict = {"family": policy_family(policy_path)}  # an unsupported family fails here, before vLLM starts
    work = Path(tempfile.mkdtemp(prefix="docrl-doctor-"))
    generate_corpus(work / "data", num_documents=2, seed=0, level="realistic", val_fraction=0.5, page_size=page_size)
    page_file = sorted((work / "data" / "documents").glob("*.png"))[0]
    page = Page("probe/p1", "probe", 1, image_path=str(page_file))
    image = fit_image(page.load_image(), rollout_cfg.max_image_pixels)
    request = RolloutRequest("probe", "What is the date on this page?", (page,))

    cfg = rollout_cfg.model_copy(update={"num_workers": 1})
    group = RolloutGroup(policy_path, cfg, max_lora_rank=lora_rank)
    group.ready()
    processor = AutoProcessor.from_pretrained(policy_path)
    dtype = getattr(torch, cfg.dtype)
    model = load_policy_model(policy_path, dtype=dtype).eval()
    greedy = SamplingConfig(n=1, temperature=0.0, max_tokens=16)

    def measure(label: str, reference) -> None:
        (res,) = group.generate([request], greedy).results
        ans = res.answers[0]
        ref = reference_logprobs(reference, processor, res.prompt_text, [image], ans.token_ids, res.prompt_ids)
        delta = (ref - torch.tensor(ans.logprobs)).abs()
        inputs = processor(text=[res.prompt_text], images=[image], return_tensors="pt")  # has mm_token_type_ids
        with torch.no_grad():
            hf = reference.generate(**inputs, max_new_tokens=len(ans.token_ids), do_sample=False)
        hf_tokens = hf[0, inputs["input_ids"].shape[1]:].tolist()
        report[label] = {"max_abs_dlogprob": float(delta.max()), "mean_abs_dlogprob": float(delta.mean()),
                         "tokens": len(ans.token_ids), "greedy_tokens_identical": hf_tokens == ans.token_ids,
                         "weights_version": res.weights_version}

    measure("base", model)
    report["base_sampled"] = sampled_parity(group, request, [image], model, processor, sample_temperature)
    if full_push:
        del model  # the perturbed copy takes its place: never two reference copies at once
        gc.collect()
        perturbed = perturbed_state_dict(policy_path)
        t0 = time.perf_counter()
        group.push_full(perturbed, version=1)
        report["full_push_seconds"] = time.perf_counter() - t0
        reference_dir = write_model_copy(policy_path, perturbed, work / "perturbed")
        del perturbed
        gc.collect()
        model = load_policy_model(reference_dir, dtype=dtype).eval()
        measure("full_push", model)
    adapter = random_lora_adapter(model, work / "adapter", r=lora_rank)
    t0 = time.perf_counter()
    group.push_lora(str(work / "adapter"), version=2)
    report["lora_push_seconds"] = time.perf_counter() - t0
    measure("lora_push", adapter)
    group.shutdown()
    shutil.rmtree(work, ignore_errors=True)  # the perturbed copy is as large as the model
    return report
