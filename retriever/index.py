"""The page index: multi-vectors per page, searched with exact masked MaxSim, persisted on disk.

On-disk format (a directory; every file is written to a temp name and renamed into place):

    manifest.json
        {"format": "docrl-page-index", "version": 1,
         "settings": {"model": ..., "family": ..., "dim": 128, "max_pixels": ..., ...},
         "segments": [{"file": "segment-00000.safetensors", "page_ids": [...],
                       "deleted": [ids of this segment removed after it was written]}, ...],
         "pages": {page_id: {"doc_id": ..., "page_no": ..., "source": ...}}}
    segment-NNNNN.safetensors
        "vectors": [total_tokens, dim] float32 (the segment's pages, concatenated)
        "offsets": [num_pages + 1] int64     (page i is vectors[offsets[i]:offsets[i + 1]])

The page order of the index is the segments' order, then the order inside each segment, without
deleted pages. Adding pages appends a segment (the existing ones are never rewritten); deleting
records ids in their segment's "deleted" list (so a page deleted and then re-added lives in the new
segment only) until `compact_index` rewrites one segment. Retriever actors can write
their own segments in parallel and the driver writes the manifest once. `settings` records the
embedding model and resolution: `check_compatible` refuses to search with another model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from retriever.maxsim import maxsim_scores, prepare_pages, rerank_shortlist, topk_pages

FORMAT = "docrl-page-index"
VERSION = 1
# Settings that must agree between the index and the encoder searching it.
# "model_identity" (retriever.encoder.model_identity) tells models apart by their files; "model",
# the path or hub id, is only compared for indexes built before it was recorded.
COMPATIBILITY_KEYS = ("model_identity", "family", "dim", "max_pixels", "min_pixels")


class IndexLoadError(ValueError):
    """A page index that cannot be loaded or used (the message says what is missing or different)."""


# ----------------------------------------------------------------------------------------------
# In memory


class PageIndex:
    """Page ids, their metadata and multi-vectors (one [tokens, dim] float32 tensor per page)."""

    def __init__(self, settings: dict):
        self.settings = dict(settings)
        self.page_ids: list[str] = []
        self.vectors: list[torch.Tensor] = []
        self.meta: dict[str, dict] = {}
        self._prepared: dict[torch.dtype, object] = {}

    def __len__(self) -> int:
        return len(self.page_ids)

    def __contains__(self, page_id: str) -> bool:
        return page_id in self.meta

    def add(self, page_ids: Sequence[str], vectors: Sequence[torch.Tensor], meta: Sequence[dict] | None = None) -> None:
        if len(page_ids) != len(vectors):
            raise ValueError(f"{len(page_ids)} page ids but {len(vectors)} embeddings")
        dim = self.settings.get("dim")
        seen: set[str] = set()
        for pid, v in zip(page_ids, vectors):
            if pid in self.meta or pid in seen:
                raise ValueError(f"page {pid} is already in the index (delete it first to re-embed)")
            if v.ndim != 2 or v.shape[0] == 0:
                raise ValueError(f"page {pid}: embedding has shape {tuple(v.shape)}; a page needs at least one token")
            if dim is not None and v.shape[1] != dim:
                raise ValueError(f"page {pid}: embedding dim {v.shape[1]} != index dim {dim}")
            seen.add(pid)
        for pid, v, m in zip(page_ids, vectors, meta if meta is not None else [{}] * len(page_ids)):
            self.page_ids.append(pid)
            self.vectors.append(v.detach().float().cpu().contiguous())
            self.meta[pid] = dict(m)
        self._prepared.clear()

    def delete(self, page_ids: Sequence[str]) -> list[str]:
        """Remove pages; returns the ids that were present."""
        drop = set(page_ids) & set(self.meta)
        keep = [i for i, p in enumerate(self.page_ids) if p not in drop]
        self.page_ids = [self.page_ids[i] for i in keep]
        self.vectors = [self.vectors[i] for i in keep]
        for pid in drop:
            del self.meta[pid]
        self._prepared.clear()
        return sorted(drop)

    def check_compatible(self, encoder_settings: dict, where: str = "") -> None:
        # an index built before model_identity was recorded can only compare the path or hub id
        keys = COMPATIBILITY_KEYS if "model_identity" in self.settings else ("model", *COMPATIBILITY_KEYS[1:])
        diffs = [f"{k}: index {self.settings.get(k)!r} vs encoder {encoder_settings.get(k)!r}"
                 for k in keys if self.settings.get(k) != encoder_settings.get(k)]
        if diffs:
            raise IndexLoadError(f"the page index{' at ' + where if where else ''} was built with other embedding "
                                 f"settings (model {self.settings.get('model')!r}, searched with "
                                 f"{encoder_settings.get('model')!r}); rebuild it with `docrl index` or search it with "
                                 f"its own model ({'; '.join(diffs)})")

    def search(self, queries: Sequence[torch.Tensor], k: int, dtype: torch.dtype = torch.float32,
               shortlist: int = 32) -> list[list[tuple[str, float]]]:
        """Top-k by exact MaxSim. In bf16 the whole corpus is scored fast and each query's best
        max(shortlist, k) pages are re-scored in fp32, so returned scores and order are fp32's."""
        if not self.page_ids:
            raise ValueError("the page index is empty")
        if dtype not in self._prepared:  # sanitised, cast and length-sorted once per dtype
            self._prepared[dtype] = prepare_pages(self.vectors, dtype=dtype)
        queries = list(queries)
        scores = maxsim_scores(queries, None, self._prepared[dtype], None)
        if dtype != torch.float32:
            scores = rerank_shortlist(scores, queries, self.vectors, max(shortlist, k))
        return topk_pages(scores, self.page_ids, min(k, len(self.page_ids)))


# ----------------------------------------------------------------------------------------------
# On disk


@dataclass
class Manifest:
    settings: dict
    segments: list[dict] = field(default_factory=list)
    pages: dict[str, dict] = field(default_factory=dict)

    @staticmethod
    def _live(segment: dict) -> list[str]:
        deleted = set(segment.get("deleted", ()))
        return [p for p in segment["page_ids"] if p not in deleted]

    def live_page_ids(self) -> list[str]:
        return [p for s in self.segments for p in self._live(s)]

    def add_segment(self, segment: dict, meta: dict[str, dict]) -> None:
        self.segments.append(segment)
        self.pages.update(meta)

    def delete(self, page_ids: set[str]) -> None:
        for seg in self.segments:
            hit = page_ids.intersection(seg["page_ids"])
            if hit:
                seg["deleted"] = sorted(set(seg.get("deleted", ())) | hit)
        for pid in page_ids:
            self.pages.pop(pid, None)

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "settings": self.settings, "segments": self.segments,
                "pages": self.pages}


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)  # an index of no readable page has no segment
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def next_segment_name(directory: str | Path, taken: Sequence[str] = ()) -> str:
    """Segment numbers only grow, so a file that an older manifest names is never overwritten."""
    names = [p.name for p in Path(directory).glob("segment-*.safetensors")] + list(taken)
    numbers = [int(n.split("-")[1].split(".")[0]) for n in names]
    return f"segment-{max(numbers, default=-1) + 1:05d}.safetensors"


def write_segment(directory: str | Path, name: str, page_ids: Sequence[str], vectors: Sequence[torch.Tensor]) -> dict:
    """Write one segment file; returns its manifest entry."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / name).exists():
        raise FileExistsError(f"segment {directory / name} exists already")
    offsets = torch.zeros(len(vectors) + 1, dtype=torch.int64)
    offsets[1:] = torch.cumsum(torch.tensor([v.shape[0] for v in vectors], dtype=torch.int64), 0)
    flat = torch.cat([v.float() for v in vectors]) if vectors else torch.zeros(0, 0)
    tmp = directory / f".{name}.tmp"
    save_file({"vectors": flat.contiguous(), "offsets": offsets}, str(tmp))
    os.replace(tmp, directory / name)
    return {"file": name, "page_ids": list(page_ids)}


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    _atomic_write(Path(directory) / "manifest.json", json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode())


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        raise IndexLoadError(f"{directory} is not a page index: manifest.json is missing")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise IndexLoadError(f"{path}: not valid JSON: {e}") from None
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise IndexLoadError(f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}; "
                             f"expected {FORMAT!r} version {VERSION}")
    missing = [f"manifest key {k!r}" for k in ("settings", "segments", "pages") if k not in raw]
    missing += [f"segment file {s['file']}" for s in raw.get("segments", []) if not (directory / s["file"]).exists()]
    manifest = Manifest(raw.get("settings", {}), raw.get("segments", []), raw.get("pages", {}))
    missing += [f"metadata of page {p}" for p in manifest.live_page_ids() if p not in manifest.pages][:10]
    if missing:
        raise IndexLoadError(f"page index {directory} is missing pieces: {', '.join(missing)}")
    return manifest


def load_index(directory: str | Path, page_range: tuple[int, int] | None = None) -> PageIndex:
    """Load a whole index, or only pages [lo, hi) of its page order (one shard of a retriever group)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    manifest = read_manifest(directory)
    order = manifest.live_page_ids()
    lo, hi = page_range if page_range is not None else (0, len(order))
    wanted = set(order[lo:hi])
    index = PageIndex(manifest.settings)
    for seg in manifest.segments:
        if not wanted.intersection(seg["page_ids"]):
            continue
        try:
            tensors = load_file(str(directory / seg["file"]))
        except (SafetensorError, OSError) as e:
            raise IndexLoadError(f"page index {directory}: segment {seg['file']} is unreadable: {e}") from None
        offsets = tensors["offsets"].tolist()
        if len(offsets) != len(seg["page_ids"]) + 1:
            raise IndexLoadError(f"page index {directory}: segment {seg['file']} holds {len(offsets) - 1} pages, "
                                 f"the manifest names {len(seg['page_ids'])}")
        live = set(Manifest._live(seg))
        keep = [(pid, i) for i, pid in enumerate(seg["page_ids"]) if pid in wanted and pid in live]
        index.add([pid for pid, _ in keep], [tensors["vectors"][offsets[i]:offsets[i + 1]] for _, i in keep],
                  [manifest.pages[pid] for pid, _ in keep])
    return index


def save_index(index: PageIndex, directory: str | Path) -> Path:
    """Write an in-memory index as a new index directory (one segment)."""
    directory = Path(directory)
    if (directory / "manifest.json").exists():
        raise FileExistsError(f"{directory} already holds a page index; append to it, or choose another directory")
    seg = write_segment(directory, next_segment_name(directory), index.page_ids, index.vectors)
    write_manifest(directory, Manifest(index.settings, [seg], dict(index.meta)))
    return directory


def compact_index(directory: str | Path) -> None:
    """Rewrite an index as one segment without its deleted pages, then remove the old segments."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    index = load_index(directory)
    seg = write_segment(directory, next_segment_name(directory), index.page_ids, index.vectors)
    write_manifest(directory, Manifest(manifest.settings, [seg], dict(index.meta)))
    for old in manifest.segments:
        (directory / old["file"]).unlink(missing_ok=True)
