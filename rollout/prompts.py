"""Prompt building, in one place for the rollout workers, the learner and the Serve endpoint.

The chat text carries exactly ONE `<|image_pad|>` per image: vLLM expands it itself, and an
already-expanded prompt gets its placeholders added a second time, silently (12 image tokens became 23). The
learner rebuilds the same input by passing this text and the same images through the model's own
processor, which expands each pad to the image's token count.
"""

from __future__ import annotations

import math

from PIL import Image

from rollout.config import DEFAULT_INSTRUCTION, DEFAULT_SYSTEM_PROMPT


def build_messages(question: str, num_images: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                   instruction: str = DEFAULT_INSTRUCTION) -> list[dict]:
    """Chat messages in the transformers multimodal format: system, then images, then the question."""
    user_text = question.strip() if not instruction else f"{question.strip()}\n{instruction}"
    messages = [{"role": "system", "content": [{"type": "text", "text": system_prompt}]}] if system_prompt else []
    content = [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": user_text}]
    return messages + [{"role": "user", "content": content}]


def build_chat_text(processor, question: str, num_images: int, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                    instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The model's own chat template applied to `build_messages`, with the generation prompt."""
    return build_conversation_text(processor, build_messages(question, num_images, system_prompt, instruction))


def build_conversation_text(processor, messages: list[dict]) -> str:
    """The model's own chat template applied to any conversation in the transformers multimodal
    format (content parts `{"type": "text", "text": ...}` and `{"type": "image"}`), with the
    generation prompt: one `<|image_pad|>` per image part. The question-about-pages prompt above is
    one case of it; the Serve chat endpoint passes whole multi-turn conversations."""
    return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)


def count_image_parts(messages: list[dict]) -> int:
    """Image parts in a conversation (string contents hold none)."""
    return sum(1 for m in messages if not isinstance(m.get("content"), str)
               for part in m.get("content") or () if part.get("type") == "image")


def fit_image(image: Image.Image, max_pixels: int | None) -> Image.Image:
    """Downscale (keeping aspect) so that width*height <= max_pixels; never upscale."""
    size = fitted_size(image.width, image.height, max_pixels)
    return image if size == image.size else image.resize(size, Image.Resampling.BICUBIC)


def fitted_size(width: int, height: int, max_pixels: int | None) -> tuple[int, int]:
    """(width, height) of a page fitted to `max_pixels` by `fit_image`."""
    if max_pixels is None or width * height <= max_pixels:
        return width, height
    scale = (max_pixels / (width * height)) ** 0.5
    return max(28, int(width * scale)), max(28, int(height * scale))


# The Qwen2-VL-family processors refuse pages whose sides differ by more than this factor.
MAX_ASPECT_RATIO = 200


def processor_pixel_cap(max_image_pixels: int | None, processor_max_pixels: int | None) -> int | None:
    """The smallest `max_pixels` for the model's image processor that leaves every page fitted to
    `max_image_pixels` (`fit_image`) exactly as the processor's own bound does, or None where
    there is nothing to lower. The processor rounds each side to the nearest multiple of 28 (at
    most 14 pixels up) and shrinks again only above max_pixels, so a page of area A <= cap
    comes out at most (h + 14)(w + 14) <= cap + 14(h + w) + 196; h + w is largest at the widest
    aspect ratio the processor accepts. vLLM sizes its profiling image from this bound: the
    processor's default (12,845,056 pixels, 16,384 visual tokens) would reserve encoder and
    activation memory for pages docrl never sends."""
    if max_image_pixels is None:
        return None
    widest = math.sqrt(MAX_ASPECT_RATIO) + 1 / math.sqrt(MAX_ASPECT_RATIO)
    bound = max_image_pixels + 14 * math.ceil(math.sqrt(max_image_pixels) * widest) + 14 * 14
    if processor_max_pixels is not None and bound >= processor_max_pixels:
        return None
    return bound


def pixel_bounds(image_processor) -> tuple[int | None, int | None]:
    """(min_pixels, max_pixels) of a Qwen2-VL-style image processor (older versions keep them as
    attributes, transformers 5 in `size` as shortest_edge/longest_edge)."""
    size = getattr(image_processor, "size", None) or {}
    lo = getattr(image_processor, "min_pixels", None) or size.get("shortest_edge")
    hi = getattr(image_processor, "max_pixels", None) or size.get("longest_edge")
    return lo, hi


def vision_token_ids(model_config) -> tuple[int, ...]:
    """The vision placeholder tokens of a Qwen2-VL-family config (image and video pads, vision
    start and end). An answer must never contain one: the model counts image tokens over the whole
    sequence (a sampled pad would ask for image features that do not exist) and derives its 3-D
    positions from vision starts. The rollout bans them at sampling and the learner scores the
    same banned distribution."""
    names = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return tuple(sorted({int(getattr(model_config, n)) for n in names if getattr(model_config, n, None) is not None}))


class VLLMPrompts:
    """Requests as vLLM prompts for one policy: the chat text with one pad per image, the images
    fitted to `rollout.max_image_pixels`, and the prompt's length once vLLM expands the images
    (checked against the context before the engine sees it). Rollout workers and the Serve
    policy build their prompts here."""

    def __init__(self, processor, cfg):
        self.processor, self.tokenizer, self.cfg = processor, processor.tokenizer, cfg
        # the image processor's bound for the pages this engine gets (vLLM profiles for it)
        self.image_max_pixels = processor_pixel_cap(cfg.max_image_pixels, pixel_bounds(processor.image_processor)[1])

    def image_tokens(self, image) -> int:
        """Visual tokens the model's own image processor gives an image (its resize rule counts the
        patches, then merge_size x merge_size patches become one token), in every family."""
        ip = self.processor.image_processor
        min_pixels, max_pixels = pixel_bounds(ip)
        patches = ip.get_number_of_image_patches(image.height, image.width,
                                                 {"min_pixels": min_pixels, "max_pixels": max_pixels})
        return patches // ip.merge_size ** 2

    def prepare(self, req) -> tuple[dict, str, tuple, tuple, int]:
        """A `RolloutRequest` as (vLLM prompt, chat text, page ids read, image sizes, expanded length)."""
        pages = req.pages
        if len(pages) > self.cfg.max_images_per_prompt:
            if self.cfg.on_too_many_images == "refuse":
                raise ValueError(f"request {req.request_id}: {len(pages)} pages exceed rollout.max_images_per_prompt="
                                 f"{self.cfg.max_images_per_prompt}")
            pages = pages[: self.cfg.max_images_per_prompt]
        images = [fit_image(p.load_image(), self.cfg.max_image_pixels) for p in pages]
        text = build_chat_text(self.processor, req.question, len(images), self.cfg.system_prompt, self.cfg.instruction)
        prompt, length = self.vllm_prompt(text, images)
        return prompt, text, tuple(p.page_id for p in pages), tuple(im.size for im in images), length

    def prepare_chat(self, messages: list[dict], images) -> tuple[dict, str, int]:
        """A whole conversation as a vLLM prompt: `messages` in the transformers multimodal format
        with one {"type": "image"} part per image of `images` (PIL, in order). The images are fitted
        to rollout.max_image_pixels like pages. Returns (prompt, chat text, expanded length)."""
        if count_image_parts(messages) != len(images):
            raise ValueError(f"the messages have {count_image_parts(messages)} image parts but {len(images)} images were given")
        if len(images) > self.cfg.max_images_per_prompt:
            raise ValueError(f"{len(images)} images exceed the engine's limit of {self.cfg.max_images_per_prompt} per prompt")
        images = [fit_image(im, self.cfg.max_image_pixels) for im in images]
        text = build_conversation_text(self.processor, messages)
        prompt, length = self.vllm_prompt(text, images)
        return prompt, text, length

    def vllm_prompt(self, text: str, images: list) -> tuple[dict, int]:
        """The prompt dict vLLM takes (one pad per image, which it expands) and its expanded length."""
        length = len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + sum(self.image_tokens(im) - 1 for im in images)
        prompt = {"prompt": text, "multi_modal_data": {"image": images}} if images else {"prompt": text}
        return prompt, length
