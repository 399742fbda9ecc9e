"""The real-size CPU benchmark's model configurations (benchmarks/bench_real_size.py) and the
doctor's page-size option. The benchmark itself is opt-in (hours on 2 cores, not in CI); here its
configurations are checked against the published parameter counts, on the meta device (no memory)."""

from __future__ import annotations

import argparse

import pytest
import torch

from benchmarks.bench_real_size import PAIRS, QWEN2_5_VL_3B, QWEN2_VL_2B, VOCAB, _config, shrunk
from docvqa.tiny_models import SPECIAL_TOKENS

SPECIAL_IDS = {t: VOCAB - len(SPECIAL_TOKENS) - 300 + i for i, t in enumerate(SPECIAL_TOKENS)}


def _parameters(model_cls, config) -> int:
    with torch.device("meta"):
        model = model_cls._from_config(config)
    # parameters() yields a tensor shared by a tied lm_head and the embedding once, as the hub counts it
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family, dims, published", [
    ("qwen2_vl", QWEN2_VL_2B, 2.21e9),      # Qwen/Qwen2-VL-2B-Instruct: "2.21B params"
    ("qwen2_5_vl", QWEN2_5_VL_3B, 3.75e9),  # Qwen/Qwen2.5-VL-3B-Instruct: "3.75B params"
])
def test_real_configs_have_the_published_parameter_counts(family, dims, published):
    from common.policy_family import policy_classes

    config = _config(family, dims, SPECIAL_IDS)
    model_cls, _ = policy_classes(family)
    n = _parameters(model_cls, config)
    assert abs(n - published) / published < 0.005, f"{family}: {n:,} parameters, published {published:,.0f}"
    assert config.get_text_config().vocab_size == VOCAB and config.tie_word_embeddings
    assert config.image_token_id == SPECIAL_IDS["<|image_pad|>"]


def test_colqwen2_5_head_on_the_real_base():
    """ColQwen2.5-3B: the Qwen2.5-VL-3B trunk without the language-model head, plus a 128-d
    projection of each token (2048 x 128 + bias)."""
    from colpali_engine.models import ColQwen2_5
    from transformers import Qwen2_5_VLForConditionalGeneration

    config = _config("qwen2_5_vl", QWEN2_5_VL_3B, SPECIAL_IDS)
    policy = _parameters(Qwen2_5_VLForConditionalGeneration, config)
    colqwen = _parameters(ColQwen2_5, config)
    assert colqwen == policy + 2048 * 128 + 128  # the tied head adds no parameters of its own
    assert PAIRS["qwen2_5_vl"]["retriever"] == "colqwen2_5" and PAIRS["qwen2_vl"]["retriever"] == "gme"


def test_smoke_dims_keep_widths_and_the_full_attention_block():
    small = shrunk(QWEN2_5_VL_3B)
    assert small["text"]["num_hidden_layers"] == 2 and small["vision"]["depth"] == 2
    assert small["vision"]["fullatt_block_indexes"] == [1]
    assert small["text"]["hidden_size"] == QWEN2_5_VL_3B["text"]["hidden_size"]
    assert QWEN2_5_VL_3B["vision"]["depth"] == 32  # the real dims are untouched


def test_doctor_page_size_argument():
    from cluster.cli import _page_size, build_parser

    assert _page_size("1000x1300") == (1000, 1300)
    args = build_parser().parse_args(["doctor", "--page-size", "800X600", "--skip-full-push"])
    assert args.page_size == (800, 600) and args.skip_full_push
    for bad in ("1000", "ax1300", "0x5"):
        with pytest.raises(argparse.ArgumentTypeError, match="1000x1300|positive"):
            _page_size(bad)
