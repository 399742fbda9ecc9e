"""GME (Alibaba-NLP/gme-Qwen2-VL-2B-Instruct and its 7B sibling): a single-vector embedder on a
Qwen2-VL backbone, behind the same processor/model interface as colpali-engine's models.

How GME embeds, as its published inference code (gme_inference.py on the model's hub page) does:

* every input is one chat turn, ``<|im_start|>system\\n{instruction}<|im_end|>\\n<|im_start|>user\\n
  {content}<|im_end|>\\n<|im_start|>assistant\\n<|endoftext|>``, padded on the right;
* a page's content is the image placeholder alone, under the default instruction ("You are a
  helpful assistant."); a query's content is its text, under the task's instruction (for document
  screenshots, the one MTEB/ViDoRe give GME: `QUERY_INSTRUCTION`);
* the embedding is the last hidden state at the last real token (that trailing <|endoftext|>),
  L2-normalised;
* the backbone runs with plain sequential positions (0, 1, 2, ... on all three rope sections):
  the reference code calls the Qwen2-VL text model itself, which gives those, not Qwen2-VL's 3-D
  multimodal positions;
* images between `min_image_tokens` and `max_image_tokens` merged 28x28-pixel tokens (256 and 1280
  unless the checkpoint's config.json says otherwise); text cut at 1800 tokens. (The reference also
  rounds each image to a multiple of 28 pixels before its processor does the same: one resize
  here, to the same size.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

QUERY_INSTRUCTION = "Find a screenshot that relevant to the user's question."
DOCUMENT_INSTRUCTION = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
MAX_LENGTH = 1800
MIN_IMAGE_TOKENS, MAX_IMAGE_TOKENS = 256, 1280
PIXELS_PER_TOKEN = 28 * 28


def gme_prompt(instruction: str, content: str) -> str:
    return (f"<|im_start|>system\n{instruction}<|im_end|>\n<|im_start|>user\n{content}<|im_end|>\n"
            "<|im_start|>assistant\n<|endoftext|>")


class GmeProcessor:
    """GME's input formatting over the checkpoint's own Qwen2-VL processor."""

    def __init__(self, processor, query_instruction: str = QUERY_INSTRUCTION):
        self.processor = processor
        processor.tokenizer.padding_side = "right"  # the pooled token is found by counting the mask
        self.image_processor = processor.image_processor
        self.image_token_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.query_instruction = query_instruction

    def process_images(self, images: Sequence):
        texts = [gme_prompt(DOCUMENT_INSTRUCTION, IMAGE_PLACEHOLDER)] * len(images)
        return self.processor(text=texts, images=list(images), padding=True, return_tensors="pt")

    def process_queries(self, texts: Sequence[str]):
        prompts = [gme_prompt(self.query_instruction, t) for t in texts]
        return self.processor(text=prompts, padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


class GmeModel(torch.nn.Module):
    """A Qwen2-VL backbone (`Qwen2VLModel`) -> one unit vector per input, [batch, hidden_size]."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.dim = int(backbone.config.text_config.hidden_size)

    def forward(self, input_ids, attention_mask, pixel_values=None, image_grid_thw=None, **_unused):
        # _unused: what else a processor returns (e.g. mm_token_type_ids) only feeds the 3-D positions GME does not use
        batch, length = input_ids.shape
        positions = torch.arange(length, device=input_ids.device).expand(batch, length)
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
                               image_grid_thw=image_grid_thw, position_ids=positions, use_cache=False).last_hidden_state
        last = attention_mask.sum(dim=1) - 1  # right padding: each row's last real token
        pooled = hidden[torch.arange(batch, device=hidden.device), last]
        return torch.nn.functional.normalize(pooled.float(), dim=-1)


def load_gme(model: str, dtype: torch.dtype, max_visual_tokens: int | None = None) -> tuple[GmeProcessor, GmeModel]:
    """GME's processor and model from a checkpoint directory or hub id (a Qwen2-VL checkpoint:
    transformers' own loader, as the reference code uses; its LM head is dropped)."""
    from transformers import AutoConfig, AutoProcessor, Qwen2VLForConditionalGeneration

    config = AutoConfig.from_pretrained(model).to_dict()
    min_tokens = config.get("min_image_tokens", MIN_IMAGE_TOKENS)
    max_tokens = max_visual_tokens or config.get("max_image_tokens", MAX_IMAGE_TOKENS)
    min_tokens = min(min_tokens, max_tokens)  # a small retriever.max_visual_tokens lowers both bounds
    processor = AutoProcessor.from_pretrained(model, size={"shortest_edge": min_tokens * PIXELS_PER_TOKEN,
                                                           "longest_edge": max_tokens * PIXELS_PER_TOKEN})
    backbone = Qwen2VLForConditionalGeneration.from_pretrained(model, dtype=dtype).model
    return GmeProcessor(processor), GmeModel(backbone)
