"""Prompt building and image fitting (pure)."""

from __future__ import annotations

from PIL import Image

from rollout.prompts import build_messages, fit_image, pixel_bounds


def test_messages_put_images_before_the_question_and_instruction():
    msgs = build_messages("What is the total?", 2, system_prompt="sys", instruction="Answer briefly.")
    assert msgs[0] == {"role": "system", "content": [{"type": "text", "text": "sys"}]}
    content = msgs[1]["content"]
    assert [c["type"] for c in content] == ["image", "image", "text"]
    assert content[-1]["text"] == "What is the total?\nAnswer briefly."
    assert build_messages("Q", 0, system_prompt="", instruction="")[0]["content"] == [{"type": "text", "text": "Q"}]


def test_fit_image_downscales_to_the_pixel_budget_and_never_upscales():
    big = Image.new("RGB", (1000, 800))
    small = fit_image(big, 100_000)
    assert small.width * small.height <= 100_000
    assert abs(small.width / small.height - 1.25) < 0.02
    assert fit_image(big, None) is big and fit_image(big, 10**7) is big


def test_pixel_bounds_reads_both_processor_layouts():
    class Old:
        min_pixels, max_pixels = 10, 20

    class New:
        size = {"shortest_edge": 30, "longest_edge": 40}

    assert pixel_bounds(Old()) == (10, 20) and pixel_bounds(New()) == (30, 40)
