"""Tiny random models for tests, the embedded default and benchmarks, built offline in seconds.

`build_tiny_models(out_dir)` writes:

    out_dir/policy/     a Qwen2-VL policy (config, safetensors, tokenizer, processor, chat template)
    out_dir/retriever/  a ColQwen2 retriever in the colpali-engine format (same tokenizer)

and `build_tiny_family(out_dir, family)` (`docrl make-tiny-models --family`, or a model named
`tiny-<family>` in a config) the model of one family at out_dir/<role>-<family>: a policy of
POLICY_FAMILIES (Qwen2-VL, Qwen2.5-VL, Qwen3-VL) or a retriever of RETRIEVER_FAMILIES.

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


def _vision_token_ids(special_ids: dict[str, int]) -> dict[str, int]:
    """The image/video placeholder and vision-block ids every family's config takes from the tokenizer."""
    return {"image_token_id": special_ids["<|image_pad|>"], "video_token_id": special_ids["<|video_pad|>"],
            "vision_start_token_id": special_ids["<|vision_start|>"],
            "vision_end_token_id": special_ids["<|vision_end|>"]}


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
        **_vision_token_ids(special_ids),
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"],
        tie_word_embeddings=False,
    )


def _qwen2_5_vl_config(size: TinySize, special_ids: dict[str, int], vocab_size: int):
    """A tiny Qwen2.5-VL: Qwen2-VL's language model and special tokens, and its own vision tower
    (RMSNorm + SwiGLU blocks, windowed attention with full attention on `fullatt_block_indexes`,
    a merger projecting to the language model's width)."""
    from transformers import Qwen2_5_VLConfig

    qwen2 = _qwen2vl_config(size, special_ids, vocab_size).to_dict()
    text = {k: qwen2["text_config"][k] for k in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "bos_token_id",
        "eos_token_id", "pad_token_id")}
    # Tied word embeddings (the output head is the input embedding), as in Qwen2.5-VL-3B and
    # Qwen2-VL-2B: the checkpoint holds no lm_head, and every push must reach the head through the
    # embedding. The default tiny Qwen2-VL keeps them untied, as in the 7B models.
    text["tie_word_embeddings"] = True
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_embed_dim,
            intermediate_size=2 * size.vision_embed_dim,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden_size,
            # one windowed block then one full-attention block: both code paths run
            fullatt_block_indexes=[size.vision_depth - 1],
            window_size=112,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        **_vision_token_ids(special_ids),
        bos_token_id=special_ids["<|endoftext|>"],
        eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"],
        tie_word_embeddings=True,
    )


def _qwen3_vl_config(size: TinySize, special_ids: dict[str, int], vocab_size: int):
    """A tiny Qwen3-VL: a Qwen3 language model (q/k norms, interleaved mrope in Qwen3-VL's 24:20:20
    proportion), and its vision tower (16-pixel patches, learned position embeddings, deepstack
    features from the first block into the language model)."""
    from transformers import Qwen3VLConfig

    head_dim = size.hidden_size // size.num_heads
    side = head_dim // 2 * 5 // 16
    text = dict(
        vocab_size=vocab_size, hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads, num_key_value_heads=size.num_kv_heads,
        head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 5000000.0, "mrope_interleaved": True,
                         "mrope_section": [head_dim // 2 - 2 * side, side, side]},
        bos_token_id=special_ids["<|endoftext|>"], eos_token_id=special_ids["<|im_end|>"],
        pad_token_id=special_ids["<|endoftext|>"], tie_word_embeddings=False,
    )
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(
            depth=size.vision_depth,
            hidden_size=size.vision_embed_dim,
            intermediate_size=2 * size.vision_embed_dim,
            num_heads=size.vision_heads,
            out_hidden_size=size.hidden_size,
            num_position_embeddings=256,  # a 16x16 grid, interpolated to each image's patch grid
            deepstack_visual_indexes=[0],
            patch_size=16,
            spatial_merge_size=2,
            temporal_patch_size=2,
            in_channels=3,
        ),
        **_vision_token_ids(special_ids),
        tie_word_embeddings=False,
    )


def _save_processor(out: Path, processor_cls, patch_size: int = 14, video_processor_cls=None) -> None:
    from transformers import AutoTokenizer
    from transformers.models.qwen2_vl import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    # the same visual-token budget at any patch size (Qwen3-VL's patches are 16 pixels, not 14)
    image_processor = Qwen2VLImageProcessor(patch_size=patch_size,
                                            min_pixels=TINY_MIN_PIXELS * patch_size ** 2 // 14 ** 2,
                                            max_pixels=TINY_MAX_PIXELS * patch_size ** 2 // 14 ** 2)
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=AutoTokenizer.from_pretrained(out),
        video_processor=(video_processor_cls or Qwen2VLVideoProcessor)(),
        chat_template=QWEN2_VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)


def _seeded_init(model: torch.nn.Module, seed: int, std: float = 0.02, device: str = "cpu") -> None:
    """Initialize every parameter from one seeded generator, in name order: bit-reproducible. On a
    GPU (`device`, where the model lives) from that device's generator: the CPU's serial one draws
    about 250M numbers a second, 15 s for a 3B model."""
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
            if p.dim() == 1 and name.endswith("weight"):  # norm scales start at identity
                p.fill_(1.0)
            elif name.endswith("bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32, device=device) * std)


# policy family (common.policy_family) -> its tiny config
_POLICY_CONFIGS = {"qwen2_vl": _qwen2vl_config, "qwen2_5_vl": _qwen2_5_vl_config, "qwen3_vl": _qwen3_vl_config}
POLICY_FAMILIES = tuple(_POLICY_CONFIGS)


def build_policy(out_dir: str | Path, size: str = "tiny", seed: int = 0, family: str = "qwen2_vl") -> Path:
    """A random policy of `family` (see POLICY_FAMILIES) with processor files and chat template,
    loadable by transformers and vLLM."""
    from common.policy_family import policy_classes

    if family not in _POLICY_CONFIGS:
        raise ValueError(f"no tiny policy of family {family!r}; tiny policy families: {', '.join(POLICY_FAMILIES)}")
    model_cls, processor_cls = policy_classes(family)
    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    special_ids = _save_tokenizer(tok, out)
    vocab = -(-tok.get_vocab_size() // 64) * 64  # pad the embedding like real checkpoints do
    config = _POLICY_CONFIGS[family](spec, special_ids, vocab)
    model = model_cls(config).to(torch.float32)
    _seeded_init(model, seed)
    model.generation_config.eos_token_id = [special_ids["<|im_end|>"], special_ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = special_ids["<|endoftext|>"]
    model.generation_config.do_sample = False
    model.save_pretrained(out, safe_serialization=True)
    video_processor_cls = None
    if family == "qwen3_vl":  # its processor takes its own video processor (timestamps between frames)
        from transformers.models.qwen3_vl import Qwen3VLVideoProcessor as video_processor_cls
    _save_processor(out, processor_cls, config.vision_config.patch_size, video_processor_cls)
    _write_manifest(out, {"kind": "policy", "family": family, "size": size, "seed": seed,
                          "architecture": model_cls.__name__})
    return out


def build_retriever(out_dir: str | Path, seed: int = 1, family: str = "colqwen2") -> Path:
    """A random retriever of `family` (RETRIEVER_FAMILIES) in its real checkpoint format; returns
    the directory to load (`out_dir`):

    colqwen2, colqwen2_5   colpali-engine ColQwen2 / ColQwen2.5 weights and processor
    colqwen2_5_adapter     ColQwen2.5 shipped as Metric-AI/ColQwen2.5-3b-multilingual-v1.0 is: an
                           adapter-only directory over a ColQwen2.5 base directory (`_build_adapter`)
    biqwen2, biqwen2_5     colpali-engine BiQwen2 / BiQwen2.5 (single vector: last token, normalised)
    gme                    a Qwen2-VL checkpoint as Alibaba-NLP/gme-Qwen2-VL-2B-Instruct ships (config
                           model_type qwen2_vl, Qwen2VLForConditionalGeneration weights, Qwen2-VL
                           processor) plus GME's image token bounds in config.json

    docrl_tiny.json names the family: retriever.encoder.infer_model_class reads it (a GME or
    BiQwen2 config.json says qwen2_vl like a ColQwen2's)."""
    if family not in RETRIEVER_FAMILIES:
        raise ValueError(f"no tiny retriever of family {family!r}; tiny retriever families: {', '.join(RETRIEVER_FAMILIES)}")
    if family == "colqwen2_5_adapter":
        return _build_adapter(Path(out_dir), seed)
    model_cls, processor_cls = _retriever_classes(family)
    spec = SIZES["tiny"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(spec.vocab_size)
    special_ids = _save_tokenizer(tok, out)
    vocab = -(-tok.get_vocab_size() // 64) * 64
    make_config = _qwen2_5_vl_config if family in ("colqwen2_5", "biqwen2_5") else _qwen2vl_config
    config = make_config(spec, special_ids, vocab)
    if family == "gme":  # GME reads its page resolution bounds (merged 28x28 tokens) from config.json
        config.min_image_tokens, config.max_image_tokens = TINY_MIN_PIXELS // (28 * 28), TINY_MAX_PIXELS // (28 * 28)
    model = model_cls(config).to(torch.float32)
    _seeded_init(model, seed)
    model.save_pretrained(out, safe_serialization=True)
    _save_processor(out, processor_cls)
    _write_manifest(out, {"kind": "retriever", "family": family, "size": "tiny", "seed": seed,
                          "architecture": model_cls.__name__})
    return out


def _retriever_classes(family: str):
    """(model class, processor class) of a tiny retriever family."""
    import colpali_engine.models as cem
    from transformers import Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    return {
        "colqwen2": (cem.ColQwen2, cem.ColQwen2Processor),
        "colqwen2_5": (cem.ColQwen2_5, cem.ColQwen2_5_Processor),
        "biqwen2": (cem.BiQwen2, cem.BiQwen2Processor),
        "biqwen2_5": (cem.BiQwen2_5, cem.BiQwen2_5_Processor),
        "gme": (Qwen2VLForConditionalGeneration, Qwen2VLProcessor),
    }[family]


# colpali-engine's LoRA targets for ColQwen2.5 training: the language model's linear layers (the
# vision tower's module names hold no "model") and the custom_text_proj head
_COLPALI_LORA_TARGETS = r"(.*(model).*(down_proj|gate_proj|up_proj|k_proj|q_proj|v_proj|o_proj).*$|.*(custom_text_proj).*$)"


def _build_adapter(out: Path, seed: int) -> Path:
    """ColQwen2.5 as Metric-AI ships it: `out` holds only the peft LoRA adapter (adapter_config.json
    naming the base, adapter_model.safetensors with the language model's and custom_text_proj's
    LoRA weights) and the processor and tokenizer files; the base is a ColQwen2.5 checkpoint
    (there Metric-AI/colqwen2.5-3b-base, a hub id; here a directory, by absolute path).

    The base goes beside `out`, not inside it, at a name of its own (colqwen2_5-base-seed<seed>): a
    build made in a temporary directory and then renamed keeps a valid base path. The adapter's
    tensor names are those of the real adapters, trained with transformers 4 (`base_model.model.
    model.layers.N...`, where transformers 5 says `language_model.layers.N`): loading must map them."""
    from colpali_engine.models import ColQwen2_5
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    base = out.resolve().parent / f"colqwen2_5-base-seed{seed}"
    if base.exists():
        shutil.rmtree(base)
    build_retriever(base, seed=seed, family="colqwen2_5")
    model = ColQwen2_5.from_pretrained(str(base), dtype=torch.float32)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=_COLPALI_LORA_TARGETS, task_type="FEATURE_EXTRACTION")
    peft_model = get_peft_model(model, lora)
    gen = torch.Generator().manual_seed(seed + 1)  # peft draws lora_A from the global generator: redraw both
    with torch.no_grad():
        for name, p in sorted(peft_model.named_parameters(), key=lambda kv: kv[0]):
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * 0.1)
    peft_model.save_pretrained(out, safe_serialization=True)
    weights = out / "adapter_model.safetensors"
    tensors = load_file(weights)
    save_file({k.replace("base_model.model.language_model.", "base_model.model.model."): v for k, v in tensors.items()},
              str(weights), metadata={"format": "pt"})
    for f in sorted(base.iterdir()):  # the processor and tokenizer travel with the adapter, as on the hub
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "generation_config.json",
                                                                          TINY_MANIFEST):
            shutil.copy(f, out / f.name)
    _write_manifest(out, {"kind": "retriever", "family": "colqwen2_5_adapter", "size": "tiny", "seed": seed,
                          "architecture": "ColQwen2_5 LoRA adapter", "base": base.name})
    return out


# What a build writes, versioned: bumped whenever a change here changes the files of a build (2:
# the tokenizer holds whole words; 3: Qwen2.5-VL builds tie their word embeddings), so a cached
# build of an older version is rebuilt, not reused.
TINY_FORMAT = 3
# Each build's manifest: kind, family, size, seed, format (retriever.encoder reads the family).
TINY_MANIFEST = "docrl_tiny.json"


def _write_manifest(out: Path, info: dict) -> None:
    (out / TINY_MANIFEST).write_text(json.dumps({**info, "format": TINY_FORMAT}, indent=2, sort_keys=True) + "\n")


# The retriever families build_retriever makes (its `family` keyword).
RETRIEVER_FAMILIES = ("colqwen2", "colqwen2_5", "colqwen2_5_adapter", "biqwen2", "biqwen2_5", "gme")


def _build_once(path: Path, expected: dict, build, force: bool = False) -> Path:
    """`build(tmp)` into `path`, unless `path`'s manifest already holds the `expected` entries."""
    manifest = path / TINY_MANIFEST
    expected = {**expected, "format": TINY_FORMAT}
    if not force and manifest.exists():
        info = json.loads(manifest.read_text())
        if all(info.get(k) == v for k, v in expected.items()):
            return path
    if path.exists():
        shutil.rmtree(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    # build next to the target, then rename: a crash never leaves a half-written model behind
    build(tmp)
    tmp.rename(path)
    return path


def build_tiny_models(out_dir: str | Path, size: str = "tiny", seed: int = 0, force: bool = False) -> dict[str, Path]:
    """Build (or reuse) the default tiny policy (Qwen2-VL) and retriever (ColQwen2) under `out_dir`.
    Returns {"policy", "retriever"}."""
    out = Path(out_dir)
    policy = out / "policy" if size == "tiny" else out / f"policy-{size}"
    return {
        "policy": _build_once(policy, {"kind": "policy", "size": size, "seed": seed},
                              lambda tmp: build_policy(tmp, size=size, seed=seed), force),
        "retriever": _build_once(out / "retriever", {"kind": "retriever", "seed": seed + 1},
                                 lambda tmp: build_retriever(tmp, seed=seed + 1), force),
    }


def tiny_family_role(family: str) -> str:
    """"policy" or "retriever": which role a family name belongs to."""
    if family in POLICY_FAMILIES:
        return "policy"
    if family in RETRIEVER_FAMILIES:
        return "retriever"
    raise ValueError(f"no tiny model of family {family!r}; policy families: {', '.join(POLICY_FAMILIES)}; "
                     f"retriever families: {', '.join(RETRIEVER_FAMILIES)}")


def build_tiny_family(out_dir: str | Path, family: str, size: str = "tiny", seed: int = 0, force: bool = False) -> Path:
    """Build (or reuse) the tiny model of one family at `out_dir`/<role>-<family> (-<size> unless
    tiny): a policy family (POLICY_FAMILIES, any size) or a retriever family (RETRIEVER_FAMILIES,
    size tiny). Seeds as in build_tiny_models: `seed` for a policy, `seed + 1` for a retriever."""
    role = tiny_family_role(family)
    path = Path(out_dir) / (f"{role}-{family}" if size == "tiny" else f"{role}-{family}-{size}")
    if role == "policy":
        return _build_once(path, {"kind": "policy", "family": family, "size": size, "seed": seed},
                           lambda tmp: build_policy(tmp, size=size, seed=seed, family=family), force)
    if size != "tiny":
        raise ValueError(f"tiny retrievers come in size 'tiny' only, not {size!r}")
    return _build_once(path, {"kind": "retriever", "family": family, "seed": seed + 1},
                       lambda tmp: build_retriever(tmp, seed=seed + 1, family=family), force)


def check_tiny_name(name: str, role: str) -> None:
    """Refuse a 'tiny-<family>' `name` of no tiny `role` family ('policy' or 'retriever'), naming
    the ones there are; any other name passes."""
    if not name.startswith("tiny-"):
        return
    families = POLICY_FAMILIES if role == "policy" else RETRIEVER_FAMILIES
    if name[len("tiny-"):] not in families:
        raise ValueError(f"{name!r} names no tiny {role} family: use 'tiny' or one of "
                         f"{', '.join('tiny-' + f for f in families)}")


def resolve_model(name: str, role: str, models_dir: str | Path) -> str:
    """'tiny' -> the default tiny model for `role` ('policy' or 'retriever'); 'tiny-<family>' ->
    the tiny model of that family, built once under `models_dir`; else unchanged (a local path or
    a hub id, which transformers/vLLM/colpali-engine resolve themselves)."""
    if name == "tiny":
        return str(build_tiny_models(models_dir)[role])
    if not name.startswith("tiny-"):
        return name
    check_tiny_name(name, role)
    return str(build_tiny_family(models_dir, name[len("tiny-"):]))
