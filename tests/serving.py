"""What the Serve tests share: a LoRA checkpoint and a page index built as the commands build them,
and one Serve instance per session whose model deployments (retriever and policy) every test
application uses (`build_application(..., share_models_of=SHARED_MODELS)`), so that the suite
starts the tiny policy's vLLM engine and the retriever once rather than once per test module.
Each module deploys its own ingress applications (keys, limits, feedback stores) over them and
deletes them when it ends; the session fixture (`served_models`, tests/conftest.py) shuts Serve
down at the end."""

from __future__ import annotations

import base64
import io

from PIL import Image

API_KEY = "test-key-not-secret"
KEY_ENV = "DOCRL_TEST_SERVE_KEY"
SHARED_MODELS = "models"  # the application holding the shared retriever and policy deployments
# the settings every test application shares with the shared models (the models' own settings)
COMMON_OVERRIDES = ["rollout.max_model_len=1024", "serve.retriever.num_cpus=0.5", "serve.policy.num_cpus=1",
                    "serve.request_timeout_s=60"]


def png_data_url(size=(64, 48), color="white") -> str:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def lora_checkpoint(policy: str, work, version: int = 3):
    """A training checkpoint holding a random LoRA adapter (rank 8) on the tiny policy."""
    import torch
    from transformers import Qwen2VLForConditionalGeneration

    from learner.types import ExportedWeights
    from rollout.parity import random_lora_adapter
    from rollout.policy import write_policy

    model = Qwen2VLForConditionalGeneration.from_pretrained(policy, dtype=torch.float32)
    random_lora_adapter(model, work / "adapter", r=8)
    write_policy(work / "lora-ckpt" / "policy", policy, ExportedWeights(version, "lora", adapter_dir=str(work / "adapter")),
                 step=version)
    return work / "lora-ckpt"


def page_index(retriever_model: str, pages, out):
    """A page index of `pages`, built as `docrl index` does."""
    from retriever.config import RetrieverConfig
    from retriever.group import RetrieverGroup

    group = RetrieverGroup(retriever_model, RetrieverConfig(model=retriever_model, num_cpus_per_actor=0.5))
    group.build(pages, out)
    group.shutdown()
    return out


def replica_pids(*app_names: str) -> dict[int, str]:
    """pid -> deployment of the live Serve replicas of these applications (from the GCS's actor
    table: ray.util.state needs the dashboard, which the test cluster lacks)."""
    from ray._private.state import actors

    found = {}
    for a in actors().values():
        for app in app_names:
            prefix = f"ServeReplica:{app}:"
            if a["ActorClassName"].startswith(prefix) and a["State"] == "ALIVE":
                found[a["Pid"]] = a["ActorClassName"][len(prefix):]
    return found


def delete_apps(*names: str) -> None:
    """Delete this module's applications, leaving the shared models (and Serve) running."""
    from ray import serve

    for name in names:
        serve.delete(name)
