"""Synthetic experiences for tests and benchmarks: real chat prompts with real page images (as the
rollout builds them), random answer tokens, chosen rewards. No vLLM needed.

The prompt ids come from the policy's own processor, exactly as a rollout record would carry them;
`rollout_logprobs` are filled with a constant (tests that measure the rollout-vs-learner mismatch
use a real vLLM worker instead).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from docvqa.sample import Page
from learner.types import Experience


def make_pages(out_dir: str | Path, sizes: Sequence[tuple[int, int]] = ((224, 280), (308, 196), (252, 252))) -> list[Page]:
    """PNG pages with a little text, one per size, written under `out_dir`."""
    from PIL import Image, ImageDraw

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pages = []
    for i, (w, h) in enumerate(sizes):
        image = Image.new("RGB", (w, h), "white")
        draw = ImageDraw.Draw(image)
        draw.text((20, 30), f"INVOICE {1000 + 37 * i}", fill="black")
        draw.text((20, 60), f"TOTAL ${i * 13 + 7}.50", fill="black")
        path = out / f"page{i}.png"
        image.save(path)
        pages.append(Page(f"synthetic/p{i + 1}", "synthetic", i + 1, image_path=str(path)))
    return pages


def synthetic_experiences(policy_path: str | Path, pages: Sequence[Page | None], answers_per_question: int = 2,
                          response_lengths: tuple[int, int] = (2, 8), rewards: Sequence[float] | None = None,
                          seed: int = 0, max_image_pixels: int | None = None, processor=None) -> list[Experience]:
    """One question per entry of `pages` (None = a text-only prompt), `answers_per_question`
    random answers each. `rewards` (one per experience, question-major) defaults to alternating
    1.0 / 0.0 so every GRPO group has a spread."""
    from transformers import AutoProcessor

    from rollout.prompts import build_chat_text, fit_image

    processor = processor or AutoProcessor.from_pretrained(str(policy_path))
    tokenizer = processor.tokenizer
    # Answer tokens from the ordinary BPE range: special tokens (image pad, ...) get the highest ids.
    first_special = min(tokenizer.convert_tokens_to_ids(t) for t in tokenizer.all_special_tokens)
    gen = torch.Generator().manual_seed(seed)
    out: list[Experience] = []
    for q, page in enumerate(pages):
        images = [fit_image(page.load_image(), max_image_pixels)] if page is not None else []
        text = build_chat_text(processor, f"What is the total on page {q}?", len(images))
        ids = processor(text=[text], images=images or None)["input_ids"][0]
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)
        for a in range(answers_per_question):
            n = int(torch.randint(response_lengths[0], response_lengths[1] + 1, (1,), generator=gen))
            response = torch.randint(0, first_special, (n,), generator=gen).tolist()
            k = len(out)
            reward = float(rewards[k]) if rewards is not None else float((q + a) % 2)
            out.append(Experience(
                sample_id=f"q{q}#{a}", request_id=f"q{q}", group_id=q, prompt_text=text, prompt_ids=tuple(ids),
                pages=(page,) if page is not None else (), image_sizes=tuple(im.size for im in images),
                response_ids=tuple(response), rollout_logprobs=tuple([-1.0] * n), reward=reward,
                max_image_pixels=max_image_pixels))
    return out
