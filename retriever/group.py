"""RetrieverGroup: the page corpus sharded contiguously over N retriever actors (driver side).

Queries fan out to every shard in batches and the per-shard top-k lists are merged exactly: the
shards hold contiguous slices of the index's page order, in order, so `merge_topk` reproduces the
unsharded ranking, ties included. Persistence: actors write segment files in parallel, batch by
batch, and the group journals each finished one, then writes the manifest once (format in
`retriever/index.py`); an interrupted build resumes from its journal.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from pathlib import Path

import ray

from common.ray_helpers import get_with_timeout
from common.shipping import ShippedFiles, pack_files
from docvqa.sample import Page, portable
from retriever.actor import RetrieverActor
from retriever.config import RetrieverConfig
from retriever.index import (
    COMPATIBILITY_KEYS,
    JOURNAL,
    IndexLoadError,
    Manifest,
    append_journal,
    next_segment_name,
    put_segment_file,
    read_journal,
    read_manifest,
    segment_name,
    shard_files,
    write_journal,
    write_manifest,
)
from retriever.maxsim import merge_topk

log = logging.getLogger(__name__)
CORPUS_STAMP = "docrl_corpus.json"  # the fingerprint of the pages an index was built from


def contiguous_ranges(n: int, parts: int) -> list[tuple[int, int]]:
    """Split range(n) into `parts` contiguous [lo, hi) ranges whose sizes differ by at most one."""
    base, extra = divmod(n, parts)
    ranges, lo = [], 0
    for i in range(parts):
        hi = lo + base + (1 if i < extra else 0)
        ranges.append((lo, hi))
        lo = hi
    return ranges


def _fingerprint(pages: Sequence[Page]) -> str:
    """`corpus_fingerprint`, also for pages whose file is missing (the build skips and names them)."""
    import hashlib
    import os

    from docvqa.data import corpus_fingerprint

    try:
        return corpus_fingerprint(pages)
    except OSError:
        missing = [p for p in pages if p.image_path is not None and not os.path.exists(p.image_path)]
        gone = {p.page_id for p in missing}
        names = hashlib.sha256("\n".join(sorted(gone)).encode()).hexdigest()
        return f"{corpus_fingerprint([p for p in pages if p.page_id not in gone])}+missing:{names}"


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class BuildProgress:
    """Logs an index build's progress, pages/s and ETA (at most every `every_s` seconds, and at
    the end); the rate counts only pages embedded by this run, not resumed ones."""

    def __init__(self, total: int, resumed: int, callback: Callable[[int, int], None] | None = None,
                 every_s: float = 10.0):
        self.total, self.resumed, self.callback, self.every_s = total, resumed, callback, every_s
        self.start = self.last = time.monotonic()

    def update(self, done: int) -> None:
        now = time.monotonic()
        if done >= self.total or now - self.last >= self.every_s:
            self.last = now
            rate = (done - self.resumed) / max(now - self.start, 1e-9)
            eta = _duration((self.total - done) / rate) if rate > 0 else "unknown"
            log.info("indexed %d/%d pages (%.1f%%), %.1f pages/s, ETA %s", done, self.total,
                     100.0 * done / max(self.total, 1), rate, eta)
        if self.callback is not None:
            self.callback(done, self.total)


class RetrieverShardLost(RuntimeError):
    """A retriever actor died and its shard could not be restored (no saved index, or it died again)."""


class RetrieverGroup:
    def __init__(self, model: str | ShippedFiles, cfg: RetrieverConfig, timeout_s: float = 600.0, scheduling: Sequence | None = None):
        """`scheduling[i]`, when given, is a Ray scheduling strategy for actor i (placement group bundle)."""
        self.cfg, self.timeout_s = cfg, timeout_s
        # a model from the driver's disk goes into the object store once, for every actor
        self._model = ray.put(model) if isinstance(model, ShippedFiles) else model
        self._scheduling = scheduling
        self.actors = [self._start_actor(i) for i in range(cfg.num_actors)]
        self.shard_sizes = [0] * len(self.actors)
        self.index_dir: Path | None = None
        self.manifest: Manifest | None = None
        self.skipped: list[str] = []
        self.restarts = 0  # actors replaced after dying, their shards reloaded from the saved index
        # retriever.learn: the query adapter's learner state (weights, optimizer, version) after the
        # last update, None before any; every actor searches with its adapter
        self.learner_state: dict | None = None

    def _start_actor(self, i: int):
        return RetrieverActor.options(num_cpus=self.cfg.num_cpus_per_actor, num_gpus=self.cfg.num_gpus_per_actor,
                                      scheduling_strategy=self._scheduling[i] if self._scheduling else None,
                                      ).remote(self._model, self.cfg)

    def _get(self, refs, what: str):
        return get_with_timeout(refs, self.timeout_s, f"retriever group: {what}")

    def __len__(self) -> int:
        return sum(self.shard_sizes)

    def ready(self) -> dict:
        """Wait until every actor has loaded its model; returns the embedding settings."""
        return self._get([a.settings.remote() for a in self.actors], "starting the retriever actors")[0]

    def build(self, pages: Sequence[Page], index_dir: str | Path | None = None,
              progress: Callable[[int, int], None] | None = None, restart_if_changed: bool = False) -> dict:
        """Embed a corpus from scratch across the shards; with `index_dir`, stream it there.

        In memory (no `index_dir`), each actor embeds and keeps its contiguous slice. On disk, the
        pages are embedded `retriever.segment_pages` at a time, each batch by the next free actor,
        into its own segment file, recorded in the journal (`ingest.jsonl`) once written: memory
        stays bounded by the batches in flight (two per actor), whatever the corpus. A build that
        was interrupted (Ctrl-C, a crash, a lost node) resumes from its journal when run again on
        the same corpus and model; another corpus or model is refused with the difference named
        (or, with `restart_if_changed`, the directory is cleared and the build starts over). The
        finished index is then mapped, each actor its slice. `progress(done, total)` is called
        after each finished batch (pages, resumed ones included).
        Returns {"indexed", "skipped", "resumed": how many of the indexed pages an earlier run embedded}.
        """
        if index_dir is None:
            return self._build_in_memory(pages)
        index_dir = Path(index_dir)
        if (index_dir / "manifest.json").exists():
            raise FileExistsError(f"{index_dir} already holds a page index: load it, or build into an empty directory")
        repeated = sorted(pid for pid, n in Counter(p.page_id for p in pages).items() if n > 1)
        if repeated:
            raise ValueError(f"{len(repeated)} page id(s) appear more than once among the pages (e.g. {repeated[:3]})")
        settings = self.ready()
        header = {"format": "docrl-ingest", "corpus": _fingerprint(pages), "pages": len(pages),
                  "settings": {k: settings.get(k) for k in COMPATIBILITY_KEYS}, "vector_dtype": self.cfg.vector_dtype,
                  "segment_pages": min(self.cfg.segment_pages, max(1, -(-len(pages) // len(self.actors))))}
        header, done = self._resume(index_dir, header, restart_if_changed)
        size = header["segment_pages"]
        batches = [list(pages[i:i + size]) for i in range(0, len(pages), size)]
        finished = sum(len(batches[b]) for b in done)
        if finished:
            log.info("resuming the index build in %s: an earlier run went through %d of its %d pages",
                     index_dir, finished, len(pages))
        resumed = sum(len(r["meta"]) for r in done.values())  # pages it indexed (not skipped)
        progress_log = BuildProgress(len(pages), finished, progress)
        self._stream(batches, [b for b in range(len(batches)) if b not in done], index_dir, done, progress_log)
        records = [done[b] for b in sorted(done)]
        self.manifest = Manifest(settings, [r["segment"] for r in records if r["segment"]],
                                 {pid: m for r in records for pid, m in r["meta"].items()})
        write_manifest(index_dir, self.manifest)
        (index_dir / CORPUS_STAMP).write_text(json.dumps({"fingerprint": header["corpus"], "pages": len(pages)}))
        (index_dir / JOURNAL).unlink()
        self.load(index_dir)
        self.skipped = [s for r in records for s in r["skipped"]]
        return {"indexed": len(self), "skipped": self.skipped, "resumed": resumed}

    def _build_in_memory(self, pages: Sequence[Page]) -> dict:
        self._get([a.clear.remote() for a in self.actors], "clearing the shards")
        ranges = contiguous_ranges(len(pages), len(self.actors))
        pages = portable(pages)
        reports = self._get([actor.add_pages.remote(list(pages[lo:hi])) for actor, (lo, hi) in zip(self.actors, ranges)],
                            f"embedding {len(pages)} pages")
        self.shard_sizes = [r["added"] for r in reports]
        self.skipped = [s for r in reports for s in r["skipped"]]
        self.index_dir = self.manifest = None
        return {"indexed": len(self), "skipped": self.skipped, "resumed": 0}

    def _resume(self, index_dir: Path, header: dict, restart_if_changed: bool) -> tuple[dict, dict[int, dict]]:
        """The header and finished batches to continue from (a fresh journal when there is none).
        Segment files no journal line names (cut off by the interruption) are removed."""
        before, done = read_journal(index_dir)
        if before is not None:
            changed = [k for k in ("corpus", "pages", "settings", "vector_dtype") if before.get(k) != header[k]]
            if not changed:
                header = {**header, "segment_pages": before["segment_pages"]}  # the same batches as before
            else:
                why = "; ".join("the pages or their images" if k == "corpus" else
                                f"{k}: {before.get(k)!r} then, {header[k]!r} now" for k in changed)
                if not restart_if_changed:
                    raise IndexLoadError(f"{index_dir} holds an interrupted index build of another corpus or model "
                                         f"({why} differ): remove {index_dir} to start over, or index into another "
                                         "directory")
                log.warning("restarting the index build in %s: the interrupted one was of another corpus or "
                            "model (%s differ)", index_dir, why)
                shutil.rmtree(index_dir)
                done = {}
        # a journaled segment whose file is gone (removed by hand) is embedded again
        done = {b: r for b, r in done.items() if not r["segment"] or (index_dir / r["segment"]["file"]).exists()}
        index_dir.mkdir(parents=True, exist_ok=True)
        write_journal(index_dir, header, [done[b] for b in sorted(done)])
        journaled = {r["segment"]["file"] for r in done.values() if r["segment"]}
        for stray in [*index_dir.glob("segment-*.safetensors"), *index_dir.glob(".segment-*.tmp")]:
            if stray.name not in journaled:
                stray.unlink()
        return header, done

    def _stream(self, batches: list[list[Page]], todo: list[int], index_dir: Path, done: dict[int, dict],
                progress: BuildProgress) -> None:
        """Embed batches `todo`, at most two in flight per actor, journaling each as it finishes."""
        queue, in_flight, busy = deque(todo), {}, [0] * len(self.actors)

        def submit() -> None:
            while queue:
                a = min(range(len(self.actors)), key=busy.__getitem__)
                if busy[a] >= 2:
                    return
                b = queue.popleft()
                in_flight[self.actors[a].add_pages.remote(portable(batches[b]), segment_name(b), False)] = (b, a)
                busy[a] += 1

        def finish(ref) -> None:
            b, a = in_flight.pop(ref)
            busy[a] -= 1
            result = self._get(ref, f"embedding pages {batches[b][0].page_id} .. {batches[b][-1].page_id}")
            if result["segment"]:
                put_segment_file(index_dir, result["segment"]["file"], result["segment_bytes"])
            done[b] = {"batch": b, "segment": result["segment"], "meta": result["meta"], "skipped": result["skipped"]}
            append_journal(index_dir, done[b])

        submit()
        try:
            while in_flight:
                ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=self.timeout_s)
                if not ready:
                    raise TimeoutError(f"retriever group: no segment of {index_dir} finished within "
                                       f"{self.timeout_s:g}s ({len(in_flight)} in flight)")
                finish(ready[0])
                progress.update(sum(len(batches[b]) for b in done))
                submit()
        except Exception:
            # Segments already being written are let finish and journaled, so that a retry in this
            # process neither redoes them nor races their writes. (Ctrl-C does not wait: a rerun
            # removes what they left.)
            queue.clear()
            for ref in list(in_flight):
                try:
                    finish(ref)
                except Exception:  # noqa: BLE001 - the first error is the one to report
                    in_flight.pop(ref, None)
            raise

    def open(self, pages: Sequence[Page], index_dir: str | Path, owned: bool) -> None:
        """Load the index of exactly these pages from `index_dir`, or build it there (resuming an
        interrupted build of them). The index records a fingerprint of the pages it was built from
        (`docrl_corpus.json`). An index the caller `owned` (a run's own `<output_dir>/index`) is a
        cache: rebuilt, with a warning saying why, when the pages changed. Anyone else's is
        refused with the difference named."""
        from docvqa.data import corpus_fingerprint

        index_dir = Path(index_dir)
        stamp = index_dir / CORPUS_STAMP
        if (index_dir / "manifest.json").exists():
            built_from = json.loads(stamp.read_text())["fingerprint"] if stamp.exists() else None
            if built_from == corpus_fingerprint(pages):
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
        self.build(pages, index_dir, restart_if_changed=owned)

    def load(self, index_dir: str | Path) -> int:
        """Load a saved index, each actor its contiguous slice; refuses an index of another model."""
        index_dir = Path(index_dir)
        self.manifest = read_manifest(index_dir)
        ranges = contiguous_ranges(len(self.manifest.live_page_ids()), len(self.actors))
        refs = []
        for i, (actor, page_range) in enumerate(zip(self.actors, ranges)):
            files, shard_range = shard_files(index_dir, self.manifest, page_range)
            refs.append(actor.load_shard.remote(pack_files(files, f"{index_dir}#shard{i}"), shard_range))
        self.shard_sizes = self._get(refs, f"loading {index_dir}")
        self.index_dir = index_dir
        return len(self)

    def add(self, pages: Sequence[Page]) -> dict:
        """Append pages (to the last shard, so the shards stay contiguous) and persist a new segment."""
        name = next_segment_name(self.index_dir) if self.index_dir else None
        report = self._get(self.actors[-1].add_pages.remote(portable(pages), name), f"adding {len(pages)} pages")
        self.shard_sizes[-1] += report["added"]
        self.skipped += report["skipped"]
        if self.index_dir is not None and report["segment"]:
            put_segment_file(self.index_dir, report["segment"]["file"], report["segment_bytes"])
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

    def search(self, queries: Sequence[str], k: int,
               candidates: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (page id, score) per query over the whole corpus, or over `candidates[i]` for query
        i (its document's pages: `retriever.scope: document`); k > the pages searched gives them all."""
        for i, q in enumerate(queries):
            if not isinstance(q, str) or not q.strip():
                raise ValueError(f"query #{i} is empty: a retrieval query needs text")
        if candidates is not None and len(candidates) != len(queries):
            raise ValueError(f"{len(candidates)} candidate lists for {len(queries)} queries")
        if not any(self.shard_sizes):
            raise ValueError("the page index is empty")
        results: list[list[tuple[str, float]]] = []
        bs = self.cfg.query_batch_size
        for i in range(0, len(queries), bs):
            batch = list(queries[i:i + bs])
            among = None if candidates is None else [list(c) for c in candidates[i:i + bs]]
            results += merge_topk(self._search_shards(batch, k, among), k)
        return results

    def _search_shards(self, batch: list[str], k: int, among, restored: bool = False) -> list:
        """Every non-empty shard's top-k for `batch`. An actor that died (killed, out of memory)
        is replaced and the shards reloaded from the saved index, then the batch is searched again,
        once; without a saved index, or when it dies again, the error names the shard."""
        shards = [i for i, n in enumerate(self.shard_sizes) if n > 0]
        refs = {i: self.actors[i].search.remote(batch, k, among) for i in shards}
        per_shard, dead = {}, {}
        for i, ref in refs.items():
            try:
                per_shard[i] = self._get(ref, f"searching {len(batch)} queries on shard {i}")
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                dead[i] = e
        if not dead:
            return [per_shard[i] for i in shards]
        first = min(dead)
        what = (f"retriever group: shard {first} of {len(self.actors)} ({self.shard_sizes[first]} pages) lost its actor "
                f"while searching {len(batch)} queries (first: {batch[0][:80]!r})")
        if restored:
            raise RetrieverShardLost(f"{what}, again after it was restored from {self.index_dir}: {dead[first]}")
        if self.index_dir is None:
            raise RetrieverShardLost(f"{what}; the index is held in memory only (not saved to an index directory), "
                                     f"so the shard cannot be restored: {dead[first]}")
        log.warning("%s; starting a new actor and reloading the shards from %s", what, self.index_dir)
        for i in dead:
            ray.kill(self.actors[i], no_restart=True)
            self.actors[i] = self._start_actor(i)
            self.restarts += 1
        self.load(self.index_dir)  # every shard: their split follows the saved index, adds and deletes included
        if self.learner_state is not None:  # the new actors search (and the first learns) with the adapter
            if 0 in dead:
                self._get(self.actors[0].load_learner_state.remote(self.learner_state), "restoring the query adapter")
            self._push_adapter([self.actors[i] for i in dead if i != 0])
        return self._search_shards(batch, k, among, restored=True)

    @property
    def adapter_version(self) -> int:
        return self.learner_state["version"] if self.learner_state else 0

    def learn(self, batch) -> dict[str, float]:
        """One update of the query adapter (retriever.learn) on a PageUpdateBatch: the candidates'
        vectors come from the shards that hold them, the first actor updates, and every actor then
        searches with the new version."""
        wanted = sorted({pid for cands in batch.candidates for pid in cands})
        vectors: dict = {}
        for held in self._get([a.page_vectors.remote(wanted) for a in self.actors], "gathering candidate page vectors"):
            vectors.update(held)
        metrics, self.learner_state = self._get(self.actors[0].learn_pages.remote(batch, vectors),
                                                f"updating the query adapter on {len(batch.queries)} draws")
        self._push_adapter(self.actors[1:])
        return metrics

    def load_learner_state(self, state: dict) -> None:
        """Continue from a checkpoint's learner state (from `learner_state`)."""
        self.learner_state = state
        self._get(self.actors[0].load_learner_state.remote(state), "restoring the query adapter")
        self._push_adapter(self.actors[1:])

    def _push_adapter(self, actors: list) -> None:
        if self.learner_state is not None and actors:
            self._get([a.set_query_adapter.remote(self.learner_state["adapter"], self.adapter_version) for a in actors],
                      f"pushing query adapter version {self.adapter_version}")

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor)
