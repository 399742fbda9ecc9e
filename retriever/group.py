"""RetrieverGroup: the page corpus sharded contiguously over N retriever actors (driver side).

Queries fan out to every shard in batches and the per-shard top-k lists are merged exactly: the
shards hold contiguous slices of the index's page order, in order, so `merge_topk` reproduces the
unsharded ranking, ties included. Persistence: each actor writes its own segment file in parallel
and the group writes the manifest once (format in `retriever/index.py`).
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import ray

from common.ray_helpers import get_with_timeout
from docvqa.sample import Page
from retriever.actor import RetrieverActor
from retriever.config import RetrieverConfig
from retriever.index import IndexLoadError, Manifest, next_segment_name, read_manifest, write_manifest
from retriever.maxsim import merge_topk

log = logging.getLogger(__name__)


def contiguous_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into `parts` contiguous [lo, hi) ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    ranges, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


class RetrieverGroup:
    def __init__(self, model_path: str, cfg: RetrieverConfig, timeout_s: float = 600.0, scheduling: Sequence | None = None):
        """`scheduling[i]`, when given, is a Ray scheduling strategy for actor i (placement group bundle)."""
        self.cfg, self.timeout_s = cfg, timeout_s
        self.actors = [
            RetrieverActor.options(num_cpus=cfg.num_cpus_per_actor, num_gpus=cfg.num_gpus_per_actor,
                                   scheduling_strategy=scheduling[i] if scheduling else None).remote(model_path, cfg)
            for i in range(cfg.num_actors)
        ]
        self.shard_sizes = [0] * len(self.actors)
        self.index_dir: Path | None = None
        self.manifest: Manifest | None = None
        self.skipped: list[str] = []

    def _get(self, refs, what: str):
        return get_with_timeout(refs, self.timeout_s, f"retriever group: {what}")

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def ready(self) -> dict:
        """Wait until every actor has loaded its model; returns the embedding settings."""
        return self._get([a.settings.remote() for a in self.actors], "starting the retriever actors")[0]

    def build(self, pages: Sequence[Page], index_dir: str | Path | None = None) -> dict:
        """Embed a corpus from scratch across the shards; with `index_dir`, persist it there."""
        if index_dir is not None:
            index_dir = Path(index_dir)
            if (index_dir / "manifest.json").exists():
                raise FileExistsError(f"{index_dir} already holds a page index: load it, or build into an empty directory")
        self._get([a.clear.remote() for a in self.actors], "clearing the shards")
        ranges = contiguous_ranges(len(pages), len(self.actors))
        refs = [actor.add_pages.remote(list(pages[lo:hi]), str(index_dir) if index_dir else None, f"segment-{i:05d}.safetensors")
                for i, (actor, (lo, hi)) in enumerate(zip(self.actors, ranges))]
        reports = self._get(refs, f"embedding {len(pages)} pages")
        self.shard_sizes = [r["added"] for r in reports]
        self.skipped = [s for r in reports for s in r["skipped"]]
        if index_dir is not None:
            settings = self._get(self.actors[0].settings.remote(), "settings")
            self.manifest = Manifest(settings, [r["segment"] for r in reports if r["segment"]],
                                     {pid: m for r in reports for pid, m in r["meta"].items()})
            write_manifest(index_dir, self.manifest)
            self.index_dir = index_dir
        return {"indexed": len(self), "skipped": self.skipped}

    def open(self, pages: Sequence[Page], index_dir: str | Path, owned: bool) -> None:
        """Load the index of exactly these pages from `index_dir`, or build it there. The index
        records a fingerprint of the pages it was built from (`docrl_corpus.json`). An index the
        caller `owned` (a run's own `<output_dir>/index`) is a cache: rebuilt, with a warning saying
        why, when the pages changed. Anyone else's is refused with the difference named."""
        from docvqa.data import corpus_fingerprint

        index_dir = Path(index_dir)
        stamp = index_dir / "docrl_corpus.json"
        fingerprint = corpus_fingerprint(pages)
        if (index_dir / "manifest.json").exists():
            built_from = json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else None
            if built_from == fingerprint:
                self.load(index_dir)
                return
            indexed, wanted = set(read_manifest(index_dir).live_page_ids()), {p.page_id for p in pages}
            if indexed != wanted:
                why = (f"{len(indexed - wanted)} indexed pages are not in the corpus (e.g. {sorted(indexed - wanted)[:3]}) "
                       f"and {len(wanted - indexed)} corpus pages are not indexed (e.g. {sorted(wanted - indexed)[:3]})")
            elif built_from is None:
                why = "it records no fingerprint of the pages it was built from"
            else:
                why = "the images of the corpus pages changed since it was built"
            if not owned:
                raise IndexLoadError(f"the page index at {index_dir} does not match the corpus: {why}. Rebuild it "
                                     "with `docrl index`, or let the run build its own (unset retriever.index_dir)")
            log.warning("rebuilding the page index %s: %s", index_dir, why)
            shutil.rmtree(index_dir)
        self.build(pages, index_dir)
        stamp.write_text(json.dumps({"fingerprint": fingerprint, "pages": len(pages)}))

    def load(self, index_dir: str | Path) -> int:
        """Load a saved index, each actor its contiguous slice; refuses an index of another model."""
        index_dir = Path(index_dir)
        self.manifest = read_manifest(index_dir)
        ranges = contiguous_ranges(len(self.manifest.live_page_ids()), len(self.actors))
        self.shard_sizes = self._get([a.load_shard.remote(str(index_dir), r) for a, r in zip(self.actors, ranges)],
                                     f"loading {index_dir}")
        self.index_dir = index_dir
        return len(self)

    def add(self, pages: Sequence[Page]) -> dict:
        """Append pages (to the last shard, so the shards stay contiguous) and persist a new segment."""
        name = next_segment_name(self.index_dir) if self.index_dir else None
        report = self._get(self.actors[-1].add_pages.remote(list(pages), str(self.index_dir) if self.index_dir else None, name),
                           f"adding {len(pages)} pages")
        self.shard_sizes[-1] += report["added"]
        self.skipped += report["skipped"]
        if self.index_dir is not None and report["segment"]:
            self.manifest.add_segment(report["segment"], report["meta"])
            write_manifest(self.index_dir, self.manifest)
        return {"added": report["added"], "skipped": report["skipped"]}

    def delete(self, page_ids: Sequence[str]) -> list[str]:
        removed_per_shard = self._get([a.delete_pages.remote(list(page_ids)) for a in self.actors], "deleting pages")
        for i, removed in enumerate(removed_per_shard):
            self.shard_sizes[i] -= len(removed)
        removed = sorted(p for r in removed_per_shard for p in r)
        if self.index_dir is not None and removed:
            self.manifest.delete(set(removed))
            write_manifest(self.index_dir, self.manifest)
        return removed

    def search(self, queries: Sequence[str], k: int) -> list[list[tuple[str, float]]]:
        """Top-k (page id, score) per query over the whole corpus; k > corpus size gives the corpus."""
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"query #{i} is empty: a retrieval query needs text")
        live = [a for a, n in zip(self.actors, self.shard_sizes) if n > 0]
        if not live:
            raise ValueError("the page index is empty")
        results: list[list[tuple[str, float]]] = []
        bs = self.cfg.query_batch_size
        for i in range(0, len(queries), bs):
            batch = list(queries[i:i + bs])
            per_shard = self._get([a.search.remote(batch, k) for a in live], f"searching {len(batch)} queries")
            results += merge_topk(per_shard, k)
        return results

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
