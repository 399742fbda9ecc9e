"""Page and query embedding with a retriever family: colpali-engine's models, or GME (`retriever.gme`).

Multi-vector families (ColQwen2, ColQwen2.5, ColPali) give one vector per token; single-vector
families (BiQwen2, GME) one pooled vector per page or query. Both leave this module as one
[num_vectors, dim] tensor per item (a single vector is [1, dim]), so the page index scores both
with MaxSim, which for one vector against one vector is their inner product.

Multi-vector embeddings have their padding removed: the processors pad on the left and SDPA on
CPU writes NaN at padded positions, so padded rows are dropped by the attention mask before
anything else sees them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image

from docvqa.tiny_models import TINY_MANIFEST  # a tiny build's manifest names its family

# model_class -> (colpali-engine model class, processor class); "gme" is loaded by retriever.gme
MODEL_CLASSES = {
    "colqwen2": ("ColQwen2", "ColQwen2Processor"),
    "colqwen2_5": ("ColQwen2_5", "ColQwen2_5_Processor"),
    "colpali": ("ColPali", "ColPaliProcessor"),
    "biqwen2": ("BiQwen2", "BiQwen2Processor"),
    "biqwen2_5": ("BiQwen2_5", "BiQwen2_5_Processor"),
}
FAMILIES = (*MODEL_CLASSES, "gme")
SINGLE_VECTOR_FAMILIES = frozenset({"biqwen2", "biqwen2_5", "gme"})
_MODEL_TYPE_TO_CLASS = {"qwen2_vl": "colqwen2", "qwen2_5_vl": "colqwen2_5", "paligemma": "colpali"}


def infer_model_class(model: str) -> str:
    """The family of a local checkpoint directory or hub id; the first rule that answers wins:

    1. a tiny model's docrl_tiny.json names its family;
    2. the name's last part (the directory's name, or the hub repository's) has the word "gme"
       (-> gme) or contains biqwen2_5 (or biqwen2.5) or biqwen2: their config.json says qwen2_vl or
       qwen2_5_vl like ColQwen2's and ColQwen2.5's, so only the name tells them apart;
    3. an adapter-only checkpoint (adapter_config.json, no config.json): its base model's family;
    4. config.json's model_type: qwen2_vl -> colqwen2, qwen2_5_vl -> colqwen2_5, paligemma -> colpali;
    5. the name contains colqwen2_5 (or colqwen2.5), colqwen2 or colpali.
    Otherwise a ValueError asks for retriever.model_class."""
    root = Path(model)
    marker = root / TINY_MANIFEST
    family = json.loads(marker.read_text()).get("family") if marker.exists() else None
    if family in FAMILIES:
        return family
    last = root.name.lower()
    if "gme" in re.split(r"[^a-z0-9]+", last):
        return "gme"
    last = last.replace(".", "_").replace("-", "_")
    for key in ("biqwen2_5", "biqwen2"):
        if key in last:
            return key
    config = root / "config.json"
    adapter = root / "adapter_config.json"
    if not config.exists() and adapter.exists():
        base = json.loads(adapter.read_text()).get("base_model_name_or_path")
        if base:
            try:
                return infer_model_class(base)
            except ValueError:
                pass  # fall back to this checkpoint's own name
    if config.exists():
        model_type = json.loads(config.read_text()).get("model_type", "")
        if model_type in _MODEL_TYPE_TO_CLASS:
            return _MODEL_TYPE_TO_CLASS[model_type]
    name = model.lower().replace(".", "_").replace("-", "_")
    for key in ("colqwen2_5", "colqwen2", "colpali"):
        if key in name:
            return key
    raise ValueError(f"retriever.model={model!r}: cannot tell the model family; set retriever.model_class "
                     f"to one of {', '.join(FAMILIES)}")


def model_identity(model: str) -> str:
    """What the model IS, not where it lies: for a local directory, a hash of every file's name,
    size and content (small files whole; large weight files by their safetensors header, which
    names every tensor's shape and offsets, plus their first and last MiB), so the same files at
    another path are the same model and an edited or re-trained one is not; for a hub id, the id at
    the cached snapshot's revision when one is cached, else the id. An adapter-only directory's
    identity includes its base model's: the same adapter over another base embeds differently."""
    import hashlib

    root = Path(model)
    if not root.is_dir():
        try:
            from huggingface_hub import snapshot_download

            return f"{model}@{Path(snapshot_download(model, local_files_only=True)).name}"
        except Exception:  # noqa: BLE001 - not cached, offline, not a hub id: the id is all we know
            return model
    digest = hashlib.sha256()
    chunk = 1 << 20
    for f in sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith(".")):
        size = f.stat().st_size
        digest.update(f"{f.relative_to(root)}\0{size}\n".encode())
        with f.open("rb") as fh:
            if size <= 4 * chunk:
                digest.update(fh.read())
                continue
            if f.suffix == ".safetensors":
                header_len = int.from_bytes(fh.read(8), "little")
                digest.update(fh.read(min(header_len, 64 * chunk)))
            fh.seek(0)
            digest.update(fh.read(chunk))
            fh.seek(size - chunk)
            digest.update(fh.read(chunk))
    adapter = root / "adapter_config.json"
    base = json.loads(adapter.read_text()).get("base_model_name_or_path") if adapter.exists() else None
    if base and Path(base).resolve() != root.resolve():
        digest.update(f"base\0{model_identity(base)}\n".encode())
    return digest.hexdigest()


def _embedding_dim(model) -> int:
    """Multi-vector models project to `dim`; single-vector ones pool the language model's hidden state."""
    dim = getattr(model, "dim", None)
    if dim is None:
        config = model.config
        dim = getattr(config, "text_config", config).hidden_size
    return int(dim)


class PageEncoder:
    """Embeds page images and query texts as L2-normalized [num_vectors, dim] tensors (one vector
    per token, or a single pooled one: `single_vector`)."""

    def __init__(self, model: str, model_class: str = "auto", dtype: str = "float32", device: str = "cpu",
                 max_visual_tokens: int | None = None, name: str | None = None):
        """`name`: what an index records as the model (default `model`), e.g. the path on the
        driver's host of a model this process loads from its own copy."""
        family = infer_model_class(model) if model_class == "auto" else model_class
        if family not in FAMILIES:
            raise ValueError(f"retriever.model_class={family!r}: expected auto or one of {', '.join(FAMILIES)}")
        self.model_id, self.family, self.device = name or model, family, torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.single_vector = family in SINGLE_VECTOR_FAMILIES
        if family == "gme":
            from retriever.gme import load_gme

            self.processor, self.model = load_gme(model, self.dtype, max_visual_tokens)
        else:
            import colpali_engine.models as cem

            model_cls, proc_cls = (getattr(cem, name) for name in MODEL_CLASSES[family])
            proc_kwargs = {"max_num_visual_tokens": max_visual_tokens} if max_visual_tokens else {}
            self.processor = proc_cls.from_pretrained(model, **proc_kwargs)
            # BiQwen2(.5).from_pretrained reads its weight-name mapping from an attribute transformers 5
            # dropped (AttributeError): hand it ColQwen2's mapping of transformers-4 names instead
            biqwen = family in ("biqwen2", "biqwen2_5")
            load_kwargs = {"key_mapping": dict(cem.ColQwen2._checkpoint_conversion_mapping)} if biqwen else {}
            self.model = model_cls.from_pretrained(model, dtype=self.dtype, **load_kwargs)
        self.model = self.model.to(self.device).eval()
        self.dim = _embedding_dim(self.model)
        self.identity = model_identity(model)

    def settings(self) -> dict:
        """What an index records so that searching it with another model is refused."""
        from rollout.prompts import pixel_bounds

        min_pixels, max_pixels = pixel_bounds(self.processor.image_processor)
        return {"model": self.model_id, "model_identity": self.identity, "family": self.family, "dim": self.dim,
                "single_vector": self.single_vector, "dtype": str(self.dtype).removeprefix("torch."),
                "max_pixels": max_pixels, "min_pixels": min_pixels}

    @torch.inference_mode()
    def _embed(self, batch) -> list[torch.Tensor]:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        out = self.model(**batch)
        if self.single_vector:  # [batch, dim]: one pooled vector per item
            return [row[None].float().cpu() for row in out]
        mask = batch["attention_mask"].bool()
        return [row[m].float().cpu() for row, m in zip(out, mask)]

    def embed_images(self, images: Sequence[Image.Image], batch_size: int = 8, names: Sequence[str] | None = None,
                     progress: bool = True) -> list[torch.Tensor]:
        """One [num_vectors, dim] tensor per page. A page whose input holds no image token is refused by name."""
        from tqdm.auto import tqdm

        names = list(names) if names is not None else [f"image #{i}" for i in range(len(images))]
        image_token_id = getattr(self.processor, "image_token_id", None)
        vectors: list[torch.Tensor] = []
        bar = tqdm(total=len(images), desc="embedding pages", unit="page", disable=not progress or len(images) < 2 * batch_size)
        for i in range(0, len(images), batch_size):
            batch = self.processor.process_images(list(images[i:i + batch_size]))
            if image_token_id is not None:
                counts = (batch["input_ids"] == image_token_id).sum(dim=1).tolist()
                empty = [names[i + j] for j, c in enumerate(counts) if c == 0]
                if empty:
                    raise ValueError(f"page(s) {', '.join(empty)} produced no image tokens: refusing to index them")
            vectors += self._embed(batch)
            bar.update(len(batch["input_ids"]))
        bar.close()
        return vectors

    def embed_queries(self, queries: Sequence[str], batch_size: int = 32) -> list[torch.Tensor]:
        """One tensor per query, in the family's query format (`process_queries`): for colpali-engine's
        models the processor's query prefix, the text and 10 query-augmentation tokens, as their
        training collator builds queries; GME's retrieval instruction (retriever.gme)."""
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"query #{i} is empty: a retrieval query needs text")
        vectors: list[torch.Tensor] = []
        for i in range(0, len(queries), batch_size):
            vectors += self._embed(self.processor.process_queries(list(queries[i:i + batch_size])))
        return vectors
