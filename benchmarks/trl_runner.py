"""The TRL side of benchmarks/bench_vs_trl.py: TRL's `GRPOTrainer` (transformers `generate`, no
vLLM) on the work that bench_vs_trl.py wrote to a JSON file, timed per optimizer step.

    benchmarks/.venv-trl/bin/python benchmarks/trl_runner.py WORK.json OUT.json

Runs in its own virtual environment (benchmarks/.venv-trl: trl plus the torch, transformers and
peft versions of docrl's .venv) and imports nothing of docrl: the prompts (chat messages), page
image paths, gold answers and the prompt token ids docrl's processor gives come from WORK.json,
and this script refuses to run if TRL tokenizes any prompt differently.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from datasets import Image as ImageFeature  # noqa: E402
from peft import LoraConfig  # noqa: E402
from transformers import AutoProcessor, Qwen2VLForConditionalGeneration, TrainerCallback  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.data_utils import prepare_multimodal_messages  # noqa: E402


def levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def anls(prediction: str, answers: list[str], threshold: float = 0.5) -> float:
    """The official DocVQA ANLS of one prediction: best 1 - normalized edit distance over the gold
    answers (case-insensitive, whitespace-trimmed), 0 below the threshold."""
    pred = " ".join(prediction.strip().lower().split())
    best = 0.0
    for gold in answers:
        gold = " ".join(gold.strip().lower().split())
        longest = max(len(pred), len(gold))
        similarity = 1.0 - levenshtein(pred, gold) / longest if longest else 1.0
        best = max(best, similarity if similarity >= threshold else 0.0)
    return best


def anls_reward(completions, answers, **_):
    """TRL reward function: conversational completions are [{"role": "assistant", "content": ...}]."""
    texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
    return [anls(text, gold) for text, gold in zip(texts, answers)]


class StepTimer(TrainerCallback):
    """Seconds of each optimizer step: on_step_begin is called before the step's generation
    (GRPOTrainer generates inside training_step), on_step_end after the optimizer step."""

    def __init__(self) -> None:
        self.begin = self.cpu_begin = 0.0
        self.step_s: list[float] = []  # begin -> end: generation, reward, loss, backward, optimizer
        self.ends: list[float] = []  # wall clock at each step end (intervals include data loading, logging)
        self.cpu_s: list[float] = []  # CPU seconds of all this process's threads in the step

    def on_step_begin(self, args, state, control, **kwargs):
        self.begin, self.cpu_begin = time.perf_counter(), time.process_time()

    def on_step_end(self, args, state, control, **kwargs):
        now = time.perf_counter()
        self.step_s.append(now - self.begin)
        self.cpu_s.append(time.process_time() - self.cpu_begin)
        self.ends.append(now)


def check_prompt_ids(trainer: GRPOTrainer, work: dict, dataset: Dataset) -> dict:
    """Tokenize every prompt the way GRPOTrainer does (its own `_tokenize_prompts` on the messages
    with the image filled in) and require docrl's token ids exactly."""
    for i, sample in enumerate(work["samples"]):
        row = dataset[i]
        prompt = prepare_multimodal_messages(row["prompt"], images=[row["image"]])
        ids, _, _ = trainer._tokenize_prompts([prompt])
        ids = list(ids[0])
        if ids != sample["prompt_ids"]:
            raise SystemExit(f"prompt {i}: TRL tokenizes {len(ids)} tokens, docrl {len(sample['prompt_ids'])}: "
                             "the two sides would not see the same prompt")
    first = work["samples"][0]["prompt_ids"]
    image_token = trainer.model.config.image_token_id if hasattr(trainer.model.config, "image_token_id") else None
    lengths = [len(s["prompt_ids"]) for s in work["samples"]]
    return {"checked": len(work["samples"]), "first_len": len(first), "first_image_tokens": first.count(image_token),
            "min_len": min(lengths), "max_len": max(lengths)}


def main() -> None:
    work_path, out_path = sys.argv[1], sys.argv[2]
    work = json.loads(open(work_path).read())
    torch.set_num_threads(work["threads"])
    torch.manual_seed(work["seed"])

    processor = AutoProcessor.from_pretrained(work["policy"])
    model = Qwen2VLForConditionalGeneration.from_pretrained(work["policy"], dtype=torch.float32, attn_implementation="sdpa")
    # The prompt as plain-string messages: TRL puts the page image before the first user text,
    # which is docrl's layout (system, then image, then question + instruction).
    dataset = Dataset.from_list([{"prompt": s["messages"], "image": s["image"], "answers": s["answers"]}
                                 for s in work["samples"]]).cast_column("image", ImageFeature())
    lora = work["lora"]
    peft_config = LoraConfig(r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
                             target_modules=lora["target_regex"], bias="none")
    batch = work["prompts_per_step"] * work["n"]
    with tempfile.TemporaryDirectory(prefix="trl-grpo-") as tmp:
        args = GRPOConfig(
            output_dir=tmp, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True,
            use_cpu=True, bf16=False, fp16=False, gradient_checkpointing=False, seed=work["seed"],
            max_steps=work["steps"], per_device_train_batch_size=batch, gradient_accumulation_steps=1,
            steps_per_generation=1, num_iterations=1, num_generations=work["n"],
            max_completion_length=work["max_tokens"], temperature=work["temperature"], top_p=1.0, top_k=0,
            beta=0.0, epsilon=0.2, loss_type="dapo", scale_rewards="group",
            learning_rate=work["learning_rate"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
            max_grad_norm=1.0, optim="adamw_torch",
            # docrl draws the questions in its sampler's order; TRL takes the same list in order
            shuffle_dataset=False, dataloader_num_workers=0, log_completions=False,
        )
        timer = StepTimer()
        trainer = GRPOTrainer(model=model, reward_funcs=anls_reward, args=args, train_dataset=dataset,
                              processing_class=processor, peft_config=peft_config, callbacks=[timer])
        prompt_check = check_prompt_ids(trainer, work, dataset)
        print(f"trl_runner: TRL tokenizes all {prompt_check['checked']} prompts to docrl's ids "
              f"({prompt_check['min_len']}-{prompt_check['max_len']} tokens; the first: {prompt_check['first_len']} "
              f"tokens, {prompt_check['first_image_tokens']} visual)", flush=True)
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
        trainer.train()
    logs = [h for h in trainer.state.log_history if "completions/mean_length" in h]
    result = {
        "step_s": timer.step_s,
        "cpu_s": timer.cpu_s,
        "interval_s": [b - a for a, b in zip(timer.ends, timer.ends[1:])],
        "completion_mean_length": [h["completions/mean_length"] for h in logs],
        "reward": [h.get("reward") for h in logs],
        "trainable_params": trainable,
        "prompt_check": prompt_check,
        "threads": torch.get_num_threads(),
    }
    with open(out_path, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
