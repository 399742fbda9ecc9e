"""Rollout throughput: vLLM (the RolloutEngine) against transformers `generate`, same model, same
batch, same machine, same run; and weight push time, full weights against a LoRA adapter.

    .venv/bin/python benchmarks/bench_rollout.py            # tiny and ~100M, fp32 and bf16
    .venv/bin/python benchmarks/bench_rollout.py --quick    # tiny only

Each case runs in its own subprocess: in-process vLLM changes the thread settings of its process,
which would skew a transformers run after it. Generated tokens are forced to the
same count on both sides (ignore EOS / min_new_tokens). Reported: median of the repeats, tokens/s
and the ratio vLLM / transformers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _requests(num_prompts: int, work: Path):
    from docvqa.loaders import load_docvqa_json
    from docvqa.synthetic import generate_corpus
    from rollout.types import RolloutRequest

    files = generate_corpus(work / "data", num_documents=max(4, num_prompts // 2), seed=0, level="realistic")
    ds = load_docvqa_json(files["train"])
    return [RolloutRequest(s.question_id, s.question, (ds.pages[s.gold_page],)) for s in ds.samples[:num_prompts]]


def case_generate(engine: str, model_dir: str, dtype: str, num_prompts: int, n: int, tokens: int, repeats: int) -> dict:
    import torch

    work = Path(tempfile.mkdtemp())
    requests = _requests(num_prompts, work)
    times = []
    if engine == "vllm":
        os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "2",
                           "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "ERROR"})
        from vllm import SamplingParams

        from rollout.config import RolloutConfig
        from rollout.engine import RolloutEngine

        eng = RolloutEngine(model_dir, RolloutConfig(dtype=dtype, max_model_len=2048))
        params = SamplingParams(n=n, temperature=1.0, max_tokens=tokens, ignore_eos=True, seed=0)
        prompts = [eng.prepare(r)[0] for r in requests]
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            outs = eng.llm.generate(prompts, params, use_tqdm=False)
            if i:  # the first run warms up
                times.append(time.perf_counter() - t0)
        produced = sum(len(c.token_ids) for o in outs for c in o.outputs)
    else:
        from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

        from rollout.prompts import build_chat_text

        torch.set_num_threads(os.cpu_count())
        proc = AutoProcessor.from_pretrained(model_dir)
        proc.tokenizer.padding_side = "left"
        model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir, dtype=getattr(torch, dtype)).eval()
        texts = [build_chat_text(proc, r.question, 1) for r in requests]
        images = [r.pages[0].load_image() for r in requests]
        inputs = proc(text=texts, images=images, return_tensors="pt", padding=True)
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            with torch.no_grad():
                out = model.generate(**inputs, do_sample=True, num_return_sequences=n, max_new_tokens=tokens,
                                     min_new_tokens=tokens, temperature=1.0)
            if i:
                times.append(time.perf_counter() - t0)
        produced = (out.shape[1] - inputs["input_ids"].shape[1]) * out.shape[0]
    med = statistics.median(times)
    return {"seconds": med, "tokens": produced, "tokens_per_s": produced / med}


def case_push(model_dir: str, repeats: int) -> dict:
    os.environ.update({"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
                       "VLLM_CPU_OMP_THREADS_BIND": "nobind", "VLLM_LOGGING_LEVEL": "ERROR"})
    from transformers import Qwen2VLForConditionalGeneration

    from rollout.config import RolloutConfig
    from rollout.engine import RolloutEngine
    from rollout.parity import perturbed_state_dict, random_lora_adapter

    eng = RolloutEngine(model_dir, RolloutConfig(max_model_len=2048), max_lora_rank=16)
    work = Path(tempfile.mkdtemp())
    full, lora, version = [], [], 0
    tensors = perturbed_state_dict(model_dir, scale=0.1)
    nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
    model = Qwen2VLForConditionalGeneration.from_pretrained(model_dir)
    random_lora_adapter(model, work / "adapter", r=16)
    adapter_bytes = sum(f.stat().st_size for f in (work / "adapter").glob("adapter_model.*"))
    for _ in range(repeats):
        version += 1
        t0 = time.perf_counter()
        eng.load_full_weights(tensors, version)
        full.append(time.perf_counter() - t0)
        version += 1
        t0 = time.perf_counter()
        eng.load_lora(str(work / "adapter"), version)
        lora.append(time.perf_counter() - t0)
    return {"full_s": statistics.median(full), "lora_s": statistics.median(lora), "full_mib": nbytes / 2**20,
            "lora_mib": adapter_bytes / 2**20}


def _run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, cwd=ROOT)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        raise RuntimeError(f"case {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--case", nargs="*")  # internal: run one case in this process
    args = ap.parse_args()
    if args.case:
        kind, *rest = args.case
        res = case_push(rest[0], args.repeats) if kind == "push" else \
            case_generate(kind, rest[0], rest[1], args.prompts, args.n, args.tokens, args.repeats)
        print("RESULT " + json.dumps(res))
        return

    from docvqa.tiny_models import build_tiny_models

    models = ROOT / "artifacts" / "tiny-models"
    sizes = ["tiny"] if args.quick else ["tiny", "100m"]
    common = ["--prompts", str(args.prompts), "--n", str(args.n), "--tokens", str(args.tokens), "--repeats", str(args.repeats)]
    print(f"batch: {args.prompts} prompts x n={args.n} x {args.tokens} tokens, one synthetic page each; "
          f"median of {args.repeats} after a warm-up\n")
    print("| model | dtype | transformers tok/s | vLLM tok/s | vLLM / transformers |")
    print("|---|---|---:|---:|---:|")
    pushes = {}
    for size in sizes:
        model_dir = str(build_tiny_models(models, size=size)["policy"])
        for dtype in ("float32", "bfloat16"):
            hf = _run(["--case", "hf", model_dir, dtype, *common])
            vl = _run(["--case", "vllm", model_dir, dtype, *common])
            print(f"| {size} | {dtype} | {hf['tokens_per_s']:.0f} | {vl['tokens_per_s']:.0f} | "
                  f"{vl['tokens_per_s'] / hf['tokens_per_s']:.2f}x |", flush=True)
        pushes[size] = _run(["--case", "push", model_dir, "--repeats", str(args.repeats)])
    print("\n| model | full push (MiB, s) | LoRA r=16 push (MiB, s) | full / LoRA time |")
    print("|---|---:|---:|---:|")
    for size, p in pushes.items():
        print(f"| {size} | {p['full_mib']:.1f} MiB, {p['full_s']:.3f} s | {p['lora_mib']:.2f} MiB, {p['lora_s']:.3f} s | "
              f"{p['full_s'] / p['lora_s']:.1f}x |")


if __name__ == "__main__":
    main()
