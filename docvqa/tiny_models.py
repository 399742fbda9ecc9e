"""Tiny random models for tests, the embedded default and benchmarks, built offline in seconds.

`build_tiny_models(out_dir)` writes:

    out_dir/policy/     a Qwen2-VL policy (config, safetensors, tokenizer, processor, chat template)
    out_dir/retriever/  a ColQwen2 retriever in the colpali-engine format (same tokenizer)

Both share one byte-level BPE tokenizer trained here with the `tokenizers` library on a fixed text,
carrying every Qwen2-VL special token; the model configs take their token ids from that tokenizer,
so ids can never drift. Weights come from a seeded generator: the same arguments give the same
bytes. The real preset loads hub ids through exactly the same code paths.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

# Qwen2-VL's special tokens, in the order of the real tokenizer (ids follow the trained vocab).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]

# The standard Qwen2-VL chat template (system default, images/videos as vision blocks, generation
# prompt). Kept here so the tiny policy formats prompts exactly as the real one does.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@dataclass(frozen=True)
class TinySize:
    """Dimensions of a tiny Qwen2-VL. head_dim 32+ because vLLM's CPU attention needs it."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vision_embed_dim: int
    vision_depth: int
    vision_heads: int
    vocab_size: int  # BPE merges budget, before special tokens


SIZES = {
    "tiny": TinySize(128, 2, 4, 2, 256, 64, 2, 2, 2048),
    # about 100M parameters: for throughput benchmarks (vLLM vs transformers, learner tokens/s)
    "100m": TinySize(768, 12, 12, 4, 3072, 128, 2, 2, 8192),
}

# Image resolution bounds for the tiny processor: 28x28 pixels per merged visual token, so a
# 224x224 page becomes 64 tokens and a letter page at most 256: fast, and enough to read big text.
TINY_MIN_PIXELS = 28 * 28 * 4
TINY_MAX_PIXELS = 28 * 28 * 256


def _tokenizer_training_text() -> list[str]:
    """A fixed, varied text: document words, digits, punctuation, and the prompt words we use."""
    words = (
        "the of and to in is for on that with as by at from this be are or an it total amount "
        "invoice number date name address company receipt letter form table price quantity item "
        "answer question page document what who when where which how much many is was the a "
        "system user assistant you are a helpful assistant read the page and answer briefly "
        "dear sincerely regards subject reference phone email street road avenue city state zip "
        "january february march april may june july august september october november december "
        "monday tuesday wednesday thursday friday red blue green yellow black white orange purple pink"
    ).split()
    lines = [" ".join(words[i:i + 12]) for i in range(0, len(words), 7)]
    # Each word also alone on a line, twice: like a real vocabulary, the tokenizer then holds common
    # words whole at the start of a text too (an answer follows "assistant\n" without a space), so
    # a one-word answer is one token rather than a few word pieces.
    lines += words + words
    lines += [f"{i} {i * 37 % 1000}.{i % 100:02d} ${i * 13:,}.00 {i}/{i % 12 + 1}/20{i % 30:02d}" for i in range(400)]
    lines += ["".join(chr(c) for c in range(32, 127))]
    return lines


def train_tokenizer(vocab_size: int):
    """Train a byte-level BPE (the Qwen2 family's kind) deterministically; specials get ids too."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        show_progress=False,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_tokenizer_training_text(), trainer=trainer)
    tok.add_special_tokens(SPECIAL_TOKENS)
    return tok


def _save_tokenizer(tok, out: Path) -> dict[str, int]:
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=SPECIAL_TOKENS,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    fast.save_pretrained(out)
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}


def _qwen2vl_config(size: TinySize, special_ids: dict[str, int], vocab_size: int):
    from transformers import Qwen2VLConfig

    head_dim = size.hidden_size // size.num_heads
    # mrope splits the rotary half-dimension into (temporal, height, width) sections, in
    # Qwen2-VL's 2:3:3 proportion ([16, 24, 24] for head_dim 128).
    quarter = head_dim // 2 // 8
    mrope_section = [2 * quarter, 3 * quarter, 3 * quarter]
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=vocab_size,
            hidden_size=size.hidden_size,
            intermediate_size=size.intermediate_size,
            num_hidden_layers=size.num_layers,
            num_attention_heads=size.num_heads,
            num_key_value_heads=size.num_kv_heads,
            max_position_embeddings=4096,
            rms_norm_eps=1e-6,
            rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section},
            bos_token_id=special_ids["<|endoftext|>"],
            eos_token_id=special_ids["<|im_end|>"],
            pad_token_id=special_ids["<|endoftext|>"],
            tie_word_embeddings=False,
        ),
        vision_config=dict(
            depth=size.vision_depth,
            embed_dim=size.vision_embed_dim,
            hidden_size=size.hidden_size,
            num_heads=size.vision_heads,
            mlp_ratio=2,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        image_token_id=special_ids["<|image_pad|>"],
        video_token_id=special_ids["<|video_pad|>"],
        vision_start_token_id=special_ids["<|vision_start|>"],
        vision_end_token_id=special_ids["<|vision_end|>"],
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _save_processor(out: Path, processor_cls) -> None:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    image_processor = Qwen2VLImageProcessor(min_pixels=TINY_MIN_PIXELS, max_pixels=TINY_MAX_PIXELS)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(out),
        video_processor=Qwen2VLVideoProcessor(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def _seeded_init(model: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Initialize every parameter from one seeded generator, in name order: bit-reproducible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1 and name.endswith("weight"):  # norm scales start at identity
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * std)


def build_policy(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """A random Qwen2-VL policy with processor files and chat template, loadable by transformers and vLLM."""
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    special_ids = _save_tokenizer(tok, out)
    vocab = -(-tok.get_vocab_size() // 64) * 64  # pad the embedding like real checkpoints do
    config = _qwen2vl_config(spec, special_ids, vocab)
    model = Qwen2VLForConditionalGeneration(config).to(torch.float32)
    _seeded_init(model, seed)
    model.generation_config.eos_token_id = [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = special_ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(out, Qwen2VLProcessor)
    _write_manifest(out, {"kind": "policy", "size": size, "seed": seed, "architecture": "Qwen2VLForConditionalGeneration"})
    return out


def build_retriever(out_dir: str | Path, seed: int = 1) -> Path:
    """A random ColQwen2 retriever (colpali-engine format: ColQwen2 weights + ColQwen2Processor)."""
    from colpali_engine.models import ColQwen2, ColQwen2Processor

    spec = SIZES["tiny"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    special_ids = _save_tokenizer(tok, out)
    vocab = -(-tok.get_vocab_size() // 64) * 64
    model = ColQwen2(_qwen2vl_config(spec, special_ids, vocab)).to(torch.float32)
    _seeded_init(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(out, ColQwen2Processor)
    _write_manifest(out, {"kind": "retriever", "size": "tiny", "seed": seed, "architecture": "ColQwen2"})
    return out


# What a build writes, versioned: bumped whenever a change here changes the files of a build (2:
# the tokenizer holds whole words), so a cached build of an older version is rebuilt, not reused.
TINY_FORMAT = 2


def _write_manifest(out: Path, info: dict) -> None:
    (out / "docrl_tiny.json").write_text(json.dumps({**info, "format": TINY_FORMAT}, indent=2, sort_keys=True) + "\n")


def build_tiny_models(out_dir: str | Path, size: str = "tiny", seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the tiny policy and retriever under `out_dir`. Returns {"policy", "retriever"}."""
    out = Path(out_dir)
    paths = {"policy": out / "policy" if size == "tiny" else out / f"policy-{size}", "retriever": out / "retriever"}
    expected = {"policy": {"kind": "policy", "size": size, "seed": seed, "format": TINY_FORMAT},
                "retriever": {"kind": "retriever", "seed": seed + 1, "format": TINY_FORMAT}}
    for role, path in paths.items():
        manifest = path / "docrl_tiny.json"
        if not force and manifest.exists():
            info = json.loads(manifest.read_text())
            if all(info.get(k) == v for k, v in expected[role].items()):
                continue
        if path.exists():
            shutil.rmtree(path)
        tmp = path.with_name(path.name + ".tmp")
        if tmp.exists():
            shutil.rmtree(tmp)
        # build next to the target, then rename: a crash never leaves a half-written model behind
        if role == "policy":
            build_policy(tmp, size=size, seed=seed)
        else:
            build_retriever(tmp, seed=seed + 1)
        tmp.rename(path)
    return paths


def resolve_model(name: str, role: str, models_dir: str | Path) -> str:
    """'tiny' -> the locally built tiny model for `role` ('policy' or 'retriever'); else unchanged
    (a local path or a hub id, which transformers/vLLM/colpali-engine resolve themselves)."""
    if name != "tiny":
        return name
    return str(build_tiny_models(models_dir)[role])
