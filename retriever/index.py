"""The page index: multi-vectors per page, persisted as segments, memory-mapped, searched with MaxSim.

On-disk format (a directory; every file is written to a temp name and renamed into place):

    manifest.json
        {"format": "docrl-page-index", "version": 1,
         "settings": {"model": ..., "family": ..., "dim": 128, "max_pixels": ..., ...},
         "segments": [{"file": "segment-00000.safetensors", "page_ids": [...],
                       "deleted": [ids of this segment removed after it was written]}, ...],
         "pages": {page_id: {"doc_id": ..., "page_no": ..., "source": ...}}}
    segment-NNNNN.safetensors
        "vectors": [total_tokens, dim] float32 or float16 (the segment's pages, concatenated)
        "offsets": [num_pages + 1] int64     (page i is vectors[offsets[i]:offsets[i + 1]])
        "pooled", "pooled_offsets"           (optional, same layout: each page's few pooled
                                              float16 vectors, the first stage of two-stage search)
    ingest.jsonl                             (only while `RetrieverGroup.build` writes the index,
                                              or after it was interrupted: see `read_journal`)

The page order of the index is the segments' order, then the order inside each segment, without
deleted pages. Adding pages appends a segment (the existing ones are never rewritten); deleting
records ids in their segment's "deleted" list (so a page deleted and then re-added lives in the new
segment only) until `compact_index` rewrites the segments that hold deleted pages. Retriever actors
write their own segments in parallel and the driver writes the manifest once. `settings` records
the embedding model and resolution: `check_compatible` refuses to search with another model.

Memory: a loaded segment is memory-mapped (`map_segment`), and searching reads its vectors in
place, chunk by chunk (`retriever.maxsim.maxsim_packed`): the process never holds a copy of the
corpus, and the OS page cache keeps what fits. Only the pooled first stage of a two-stage search
is read into memory (float16; at most 128 vectors x 128 dims = 32 KiB a page, 3.2 GB at 100,000
pages; measured 1.7 GB with the pooling's defaults on benchmarks/bench_index_scale.py), and
only when a two-stage search first needs it. Search methods (`PageIndex.search`): "exact" scores
every page; "two_stage" scores the pooled vectors, keeps each query's `shortlist` best pages and
re-scores those exactly, so returned scores are always exact MaxSim.

Single-vector families (BiQwen2, GME: settings "single_vector") use the same index: a page is a
multi-vector of one vector, and MaxSim of a one-vector query against it is their inner product,
so persistence, sharding and the top-k tie rules are the multi-vector ones. Such an index stores
no pooled vectors and is always searched exactly (pooling one vector gives it back).
"""

from __future__ import annotations

import json
import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from retriever.maxsim import maxsim_packed, maxsim_scores, pack_pages, rerank_shortlist, topk_pages
from retriever.pooling import Pooling, pool_tokens

FORMAT = "docrl-page-index"
VERSION = 1
JOURNAL = "ingest.jsonl"
# Settings that must agree between the index and the encoder searching it.
# "model_identity" (retriever.encoder.model_identity) tells models apart by their files; "model",
# the path or hub id, is only compared for indexes built before it was recorded.
COMPATIBILITY_KEYS = ("model_identity", "family", "dim", "max_pixels", "min_pixels")
# A bf16 exact search re-scores this many best pages per query in fp32 (bf16 rounding only swaps
# near-ties: benchmarks/RESULTS.md, "MaxSim search").
BF16_RESCORED_PAGES = 32
SEARCH_METHODS = ("exact", "two_stage")
DEFAULT_POOLING = Pooling()  # the defaults of retriever.pooled_vectors and retriever.pooling_similarity


class IndexLoadError(ValueError):
    """A page index that cannot be loaded or used (the message says what is missing or different)."""


# ----------------------------------------------------------------------------------------------
# Segment files

# safetensors dtype -> numpy dtype it is mapped as (bf16 is mapped as uint16 and viewed as bf16)
_MAPPED_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "I64": np.int64}
_STORED_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def map_segment(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a segment file, memory-mapped: nothing is read until it is used."""
    return {name: tensor for name, (tensor, _) in _map_arrays(path).items()}


def _map_arrays(path: str | Path) -> dict[str, tuple[Tensor, np.ndarray]]:
    """Each tensor of a segment file with the numpy memory map under it.

    A safetensors file is an 8-byte header length, a JSON header naming each tensor's dtype,
    shape and byte range, then the data; the ranges are mapped directly (copy-on-write, so the
    tensors are writable for torch but the file is never changed)."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(header_len))
            size = os.fstat(f.fileno()).st_size
        tensors = {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            dtype = np.dtype(_MAPPED_DTYPES[info["dtype"]])
            begin, end = info["data_offsets"]
            shape = tuple(int(n) for n in info["shape"])
            if end - begin != int(np.prod(shape)) * dtype.itemsize or 8 + header_len + end > size:
                raise ValueError(f"tensor {name!r} does not fit the file (truncated?)")
            array = (np.memmap(path, dtype=dtype, mode="c", offset=8 + header_len + begin, shape=shape)
                     if end > begin else np.zeros(shape, dtype))
            tensor = torch.from_numpy(array)
            tensors[name] = (tensor.view(torch.bfloat16) if info["dtype"] == "BF16" else tensor, array)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise IndexLoadError(f"segment {path} is unreadable: {e!r}") from None
    return tensors


def write_segment(directory: str | Path, name: str, page_ids: Sequence[str], vectors: Sequence[Tensor],
                  dtype: str = "float32", pooling: Pooling | None = None) -> dict:
    """Write one segment file (vectors stored in `dtype`; with `pooling`, the pooled first stage
    too); returns its manifest entry."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if (directory / name).exists():
        raise FileExistsError(f"segment {directory / name} exists already")
    vectors = [v.detach().float().cpu() for v in vectors]
    if vectors:
        flat, offsets = pack_pages(vectors)
    else:
        flat, offsets = torch.zeros(0, 0), torch.zeros(1, dtype=torch.int64)
    tensors = {"vectors": flat.to(_STORED_DTYPES[dtype]).contiguous(), "offsets": offsets}
    single_vector = len(vectors) == len(flat)  # every page one vector: pooling would copy them
    if pooling is not None and vectors and not single_vector:
        pooled, pooled_offsets = pack_pages(pool_tokens(vectors, pooling))
        tensors.update(pooled=pooled.half().contiguous(), pooled_offsets=pooled_offsets)
    tmp = directory / f".{name}.tmp"
    save_file(tensors, str(tmp))
    os.replace(tmp, directory / name)
    return {"file": name, "page_ids": list(page_ids)}


def put_segment_file(directory: str | Path, name: str, data: bytes) -> None:
    """Persist a segment an actor wrote on its own host and sent as bytes."""
    path = Path(directory) / name
    if path.exists():
        raise FileExistsError(f"segment {path} exists already")
    _atomic_write(path, data)


def shard_files(directory: str | Path, manifest: Manifest, page_range: tuple[int, int]) -> tuple[dict[str, bytes], tuple[int, int]]:
    """What one shard needs of an index, to send it to a process on another host: a manifest of
    only the segments holding live pages [lo, hi) of the index's page order, those segment files,
    and the range re-based on that manifest's page order."""
    directory = Path(directory)
    lo, hi = page_range
    files: dict[str, bytes] = {}
    segments, before, seen = [], None, 0
    for seg in manifest.segments:
        live = len(Manifest._live(seg))
        if live and seen < hi and seen + live > lo:
            before = seen if before is None else before
            segments.append(seg)
            files[seg["file"]] = (directory / seg["file"]).read_bytes()
        seen += live
    kept = {p for s in segments for p in Manifest._live(s)}
    part = Manifest(manifest.settings, segments, {p: m for p, m in manifest.pages.items() if p in kept})
    files["manifest.json"] = json.dumps(part.to_json(), indent=1, sort_keys=True).encode()
    offset = before or 0
    return files, (lo - offset, hi - offset) if segments else (0, 0)


def segment_name(number: int) -> str:
    return f"segment-{number:05d}.safetensors"


def next_segment_name(directory: str | Path, taken: Sequence[str] = ()) -> str:
    """Segment numbers only grow, so a file that an older manifest names is never overwritten."""
    names = [p.name for p in Path(directory).glob("segment-*.safetensors")] + list(taken)
    numbers = [int(n.split("-")[1].split(".")[0]) for n in names]
    return segment_name(max(numbers, default=-1) + 1)


# ----------------------------------------------------------------------------------------------
# In memory


@dataclass
class _Block:
    """Pages stored packed: a memory-mapped segment (or the rows of one that a shard holds), or
    pages added in memory. `live` is False for deleted pages (and those outside a shard's range)."""

    page_ids: list[str]
    tokens: Tensor  # [T, D]
    offsets: Tensor  # [n + 1] int64, from 0
    live: np.ndarray  # bool [n]
    source: Path | None = None  # the segment file, which may hold the pooled vectors
    first_row: int = 0  # the row of page_ids[0] in that file
    mapped: np.ndarray | None = field(default=None, repr=False)  # the file's memory map of all its vectors
    first_token: int = 0  # the row of tokens[0] in `mapped`
    pooled: tuple[Tensor, Tensor] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self._starts = self.offsets.numpy()  # plain ints index faster than tensor elements

    def page(self, row: int) -> Tensor:
        return self.tokens[self._starts[row]:self._starts[row + 1]]

    def prefetch(self, rows: Sequence[int]) -> None:
        """Ask the OS to read these pages' vectors now, all at once and only them: otherwise each
        is read when first touched, one page fault after another, and each fault's readahead reads
        far past a scattered page (measured at 10,000 pages, cold cache: a two-stage query read
        1,167 MiB and took 2.3 s without this, 140 MiB and 1.1 s with it)."""
        memmap = getattr(self.mapped, "_mmap", None)
        if memmap is None or not hasattr(mmap, "MADV_WILLNEED"):
            return
        base = self.mapped.offset % mmap.ALLOCATIONGRANULARITY  # where the array starts in the map
        row_bytes = self.mapped.strides[0]
        for row in rows:
            lo = base + (self.first_token + int(self._starts[row])) * row_bytes
            hi = base + (self.first_token + int(self._starts[row + 1])) * row_bytes
            lo -= lo % mmap.PAGESIZE
            memmap.madvise(mmap.MADV_WILLNEED, lo, hi - lo)

    def pooled_vectors(self, pooling: Pooling) -> tuple[Tensor, Tensor]:
        """The pooled first stage (packed float16), read from the segment or computed, then kept."""
        if self.pooled is None:
            stored = map_segment(self.source) if self.source is not None else {}
            if "pooled" in stored:
                offs = stored["pooled_offsets"].numpy()
                lo, hi = self.first_row, self.first_row + len(self.page_ids)
                if hi >= len(offs):
                    raise IndexLoadError(f"segment {self.source}: pooled vectors for {len(offs) - 1} pages, "
                                         f"the segment holds more")
                # copied into memory: the first stage is read by every query
                self.pooled = (stored["pooled"][offs[lo]:offs[hi]].clone(), torch.from_numpy(offs[lo:hi + 1] - offs[lo]))
            else:  # an index written before pooling, or pages added in memory
                tokens, offsets = pack_pages(pool_tokens([self.page(r) for r in range(len(self.page_ids))], pooling))
                self.pooled = (tokens.half(), offsets)
        return self.pooled


def _map_block(path: Path, page_ids: Sequence[str], rows: Sequence[int], dim: int | None) -> _Block:
    """Rows `rows` (ascending) of a segment file, memory-mapped."""
    arrays = _map_arrays(path)
    if "vectors" not in arrays or "offsets" not in arrays:
        raise IndexLoadError(f"segment {path} lacks its 'vectors' or 'offsets' tensor")
    (vectors, mapped), offs = arrays["vectors"], arrays["offsets"][0].numpy()
    if len(offs) != len(page_ids) + 1:
        raise IndexLoadError(f"segment {path} holds {len(offs) - 1} pages, the manifest names {len(page_ids)}")
    if offs[0] != 0 or offs[-1] != vectors.shape[0] or (np.diff(offs) <= 0).any():
        raise IndexLoadError(f"segment {path}: its offsets do not cut its {vectors.shape[0]} vectors into non-empty pages")
    if dim is not None and vectors.shape[1] != dim:
        raise IndexLoadError(f"segment {path}: vectors of dim {vectors.shape[1]}, the index's dim is {dim}")
    lo, hi = rows[0], rows[-1] + 1
    live = np.zeros(hi - lo, dtype=bool)
    live[np.asarray(rows) - lo] = True
    return _Block(list(page_ids[lo:hi]), vectors[offs[lo]:offs[hi]], torch.from_numpy(offs[lo:hi + 1] - offs[lo]),
                  live, source=path, first_row=lo, mapped=mapped, first_token=int(offs[lo]))


class _PageVectors(Sequence):
    """Each live page's [tokens, dim] vectors, in page order: views into the blocks, made on access."""

    def __init__(self, index: PageIndex):
        self.index = index

    def __len__(self) -> int:
        return len(self.index.page_ids)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        block, row = self.index._rows[i]
        return self.index._blocks[block].page(row)


class PageIndex:
    """Page ids, their metadata and multi-vectors (`vectors[i]` is page i's [tokens, dim] tensor)."""

    def __init__(self, settings: dict, pooling: Pooling = DEFAULT_POOLING):
        self.settings = dict(settings)
        self.pooling = pooling  # for pages whose segment stores no pooled vectors
        self.page_ids: list[str] = []
        self.meta: dict[str, dict] = {}
        self._blocks: list[_Block] = []
        self._rows: list[tuple[int, int]] = []  # (block, row) of each live page, in page order
        self._position: dict[str, int] = {}  # page id -> its index in page_ids

    def __len__(self) -> int:
        return len(self.page_ids)

    def __contains__(self, page_id: str) -> bool:
        return page_id in self.meta

    @property
    def vectors(self) -> Sequence[Tensor]:
        return _PageVectors(self)

    def page_vectors(self, page_id: str) -> Tensor:
        """One page's vectors [tokens, dim], a copy (the index's may be a mapped file)."""
        if page_id not in self._position:
            raise KeyError(f"page {page_id!r} is not in this index")
        return self.vectors[self._position[page_id]].clone()

    @property
    def single_vector(self) -> bool:
        return bool(self.settings.get("single_vector"))

    def add(self, page_ids: Sequence[str], vectors: Sequence[Tensor], meta: Sequence[dict] | None = None) -> None:
        """Add pages held in memory (their vectors are copied into one packed float32 block)."""
        if len(page_ids) != len(vectors):
            raise ValueError(f"{len(page_ids)} page ids but {len(vectors)} embeddings")
        dim = self.settings.get("dim")
        self.refuse_present(page_ids)
        for pid, v in zip(page_ids, vectors):
            if v.ndim != 2 or v.shape[0] == 0:
                raise ValueError(f"page {pid}: embedding has shape {tuple(v.shape)}; a page needs at least one token")
            if dim is not None and v.shape[1] != dim:
                raise ValueError(f"page {pid}: embedding dim {v.shape[1]} != index dim {dim}")
        if not page_ids:
            return
        tokens, offsets = pack_pages([v.detach().float().cpu() for v in vectors])
        self._append(_Block(list(page_ids), tokens, offsets, np.ones(len(page_ids), dtype=bool)),
                     list(meta) if meta is not None else [{}] * len(page_ids))

    def add_segment(self, directory: str | Path, entry: dict, meta: dict[str, dict]) -> None:
        """Add the pages of a written segment (`write_segment`'s entry), memory-mapped."""
        self.refuse_present(entry["page_ids"])
        rows = range(len(entry["page_ids"]))
        block = _map_block(Path(directory) / entry["file"], entry["page_ids"], rows, self.settings.get("dim"))
        self._append(block, [meta.get(pid, {}) for pid in entry["page_ids"]])

    def refuse_present(self, page_ids: Sequence[str]) -> None:
        seen: set[str] = set()
        for pid in page_ids:
            if pid in self.meta or pid in seen:
                raise ValueError(f"page {pid} is already in the index (delete it first to re-embed)")
            seen.add(pid)

    def _append(self, block: _Block, live_meta: Sequence[dict]) -> None:
        """`live_meta`: the metadata of the block's live pages, in order."""
        number = len(self._blocks)
        self._blocks.append(block)
        for row, m in zip(np.flatnonzero(block.live).tolist(), live_meta):
            pid = block.page_ids[row]
            self._position[pid] = len(self.page_ids)
            self.page_ids.append(pid)
            self._rows.append((number, row))
            self.meta[pid] = dict(m)

    def delete(self, page_ids: Sequence[str]) -> list[str]:
        """Remove pages; returns the ids that were present."""
        drop = set(page_ids) & set(self.meta)
        if drop:
            for block in self._blocks:
                for row, pid in enumerate(block.page_ids):
                    if pid in drop:
                        block.live[row] = False
            self.page_ids, self._rows = [], []
            for number, block in enumerate(self._blocks):
                for row in np.flatnonzero(block.live).tolist():
                    self.page_ids.append(block.page_ids[row])
                    self._rows.append((number, row))
            for pid in drop:
                del self.meta[pid]
            self._position = {pid: i for i, pid in enumerate(self.page_ids)}
        return sorted(drop)

    def check_compatible(self, encoder_settings: dict, where: str = "") -> None:
        # an index built before model_identity was recorded can only compare the path or hub id
        keys = COMPATIBILITY_KEYS if "model_identity" in self.settings else ("model", *COMPATIBILITY_KEYS[1:])
        diffs = [f"{k}: index {self.settings.get(k)!r} vs encoder {encoder_settings.get(k)!r}"
                 for k in keys if self.settings.get(k) != encoder_settings.get(k)]
        ours, theirs = self.settings.get("family"), encoder_settings.get("family")
        if ours != theirs:
            raise IndexLoadError(f"the page index{' at ' + where if where else ''} holds {ours} page vectors and "
                                 f"cannot be searched with a {theirs} query model ({encoder_settings.get('model')!r}): "
                                 f"search it with its own {ours} model ({self.settings.get('model')!r}), or rebuild "
                                 f"it with `docrl index` ({'; '.join(diffs)})")
        if diffs:
            raise IndexLoadError(f"the page index{' at ' + where if where else ''} was built with other embedding "
                                 f"settings (model {self.settings.get('model')!r}, searched with "
                                 f"{encoder_settings.get('model')!r}); rebuild it with `docrl index` or search it with "
                                 f"its own model ({'; '.join(diffs)})")

    def search(self, queries: Sequence[Tensor], k: int, dtype: torch.dtype = torch.float32,
               method: str = "exact", shortlist: int = 1024,
               candidates: Sequence[Sequence[str]] | None = None) -> list[list[tuple[str, float]]]:
        """Top-k (page id, score) per query; scores and order are always exact fp32 MaxSim's.

        `candidates[i]`: search query i among these page ids only (the pages of its document,
        `retriever.scope: document`), scored exactly; ids this index does not hold are ignored, so
        every shard of a sharded index can be handed the same lists. Otherwise every page is searched:

        "exact" scores every page in `dtype`; in bf16 each query's best max(32, k) pages are then
        re-scored in fp32. "two_stage" scores the pooled vectors in `dtype` and re-scores each
        query's best max(shortlist, k) pages in fp32: it returns exact search's answer whenever
        exact search's top k are among them (recall: benchmarks/RESULTS.md, "Index at scale").
        A single-vector index is searched exactly whatever `method` says."""
        if not self.page_ids:
            raise ValueError("the page index is empty")
        if method not in SEARCH_METHODS:
            raise ValueError(f"search method must be one of {SEARCH_METHODS}, got {method!r}")
        queries = list(queries)
        if candidates is not None:
            return self._search_among(queries, k, candidates)
        if method == "two_stage" and not self.single_vector:
            first = self._scan(queries, dtype, pooled=True)
            shortlist = max(shortlist, k)
            self._prefetch(torch.topk(first, min(shortlist, first.shape[1]), dim=1).indices.unique().tolist())
            scores = rerank_shortlist(first, queries, self.vectors, shortlist)
        else:
            scores = self._scan(queries, dtype, pooled=False)
            if dtype != torch.float32:
                scores = rerank_shortlist(scores, queries, self.vectors, max(BF16_RESCORED_PAGES, k))
        return topk_pages(scores, self.page_ids, min(k, len(self.page_ids)))

    def _search_among(self, queries: list[Tensor], k: int,
                      candidates: Sequence[Sequence[str]]) -> list[list[tuple[str, float]]]:
        if len(candidates) != len(queries):
            raise ValueError(f"{len(candidates)} candidate lists for {len(queries)} queries")
        results = []
        for query, ids in zip(queries, candidates):
            # in page order, so ties break as in a search of every page (and across shards)
            rows = sorted({self._position[pid] for pid in ids if pid in self._position})
            if not rows:
                results.append([])
                continue
            scores = maxsim_scores([query], None, [self.vectors[r] for r in rows], None)
            results += topk_pages(scores, [self.page_ids[r] for r in rows], min(k, len(rows)))
        return results

    def _prefetch(self, pages: Sequence[int]) -> None:
        by_block: dict[int, list[int]] = {}
        for i in pages:
            block, row = self._rows[i]
            by_block.setdefault(block, []).append(row)
        for block, rows in by_block.items():
            self._blocks[block].prefetch(rows)

    def _scan(self, queries: list[Tensor], dtype: torch.dtype, pooled: bool) -> Tensor:
        """MaxSim of every live page (or of its pooled vectors), [num_queries, num_pages] in page order."""
        parts = []
        for block in self._blocks:
            if not block.live.any():
                continue
            tokens, offsets = block.pooled_vectors(self.pooling) if pooled else (block.tokens, block.offsets)
            scores = maxsim_packed(queries, tokens, offsets, dtype=dtype)
            parts.append(scores if block.live.all() else scores[:, torch.from_numpy(np.flatnonzero(block.live))])
        return torch.cat(parts, dim=1)


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


def write_manifest(directory: str | Path, manifest: Manifest) -> None:
    _atomic_write(Path(directory) / "manifest.json", json.dumps(manifest.to_json(), indent=1, sort_keys=True).encode())


def read_manifest(directory: str | Path) -> Manifest:
    directory = Path(directory)
    path = directory / "manifest.json"
    if not path.exists():
        raise IndexLoadError(f"{directory} is not a page index: manifest.json is missing"
                             + (f" (an interrupted `docrl index` left {JOURNAL}: run it again to finish)"
                                if (directory / JOURNAL).exists() else ""))
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


def load_index(directory: str | Path, page_range: tuple[int, int] | None = None,
               pooling: Pooling = DEFAULT_POOLING) -> PageIndex:
    """Map a whole index, or only pages [lo, hi) of its page order (one shard of a retriever
    group). Segments are memory-mapped, not read."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    order = manifest.live_page_ids()
    lo, hi = page_range if page_range is not None else (0, len(order))
    wanted = set(order[lo:hi])
    index = PageIndex(manifest.settings, pooling)
    for seg in manifest.segments:
        live = set(Manifest._live(seg))
        rows = [i for i, pid in enumerate(seg["page_ids"]) if pid in wanted and pid in live]
        if rows:
            block = _map_block(directory / seg["file"], seg["page_ids"], rows, manifest.settings.get("dim"))
            index._append(block, [manifest.pages[seg["page_ids"][i]] for i in rows])
    return index


def save_index(index: PageIndex, directory: str | Path) -> Path:
    """Write an in-memory index as a new index directory (one segment)."""
    directory = Path(directory)
    if (directory / "manifest.json").exists():
        raise FileExistsError(f"{directory} already holds a page index; append to it, or choose another directory")
    seg = write_segment(directory, next_segment_name(directory), index.page_ids, index.vectors)
    write_manifest(directory, Manifest(index.settings, [seg], dict(index.meta)))
    return directory


def compact_index(directory: str | Path, pooling: Pooling = DEFAULT_POOLING) -> None:
    """Rewrite each segment that holds deleted pages without them (in its place in the page
    order; one segment in memory at a time; pooled again with `pooling` if it was pooled), then
    remove the old files."""
    directory = Path(directory)
    manifest = read_manifest(directory)
    segments, replaced = [], []
    for seg in manifest.segments:
        if not seg.get("deleted"):
            segments.append(seg)
            continue
        live = Manifest._live(seg)
        if live:
            stored = map_segment(directory / seg["file"])
            block = _map_block(directory / seg["file"], seg["page_ids"], range(len(seg["page_ids"])), None)
            keep = set(live)
            vectors = [block.page(r) for r, pid in enumerate(seg["page_ids"]) if pid in keep]
            dtype = "float16" if stored["vectors"].dtype == torch.float16 else "float32"
            pooled = pooling if "pooled" in stored else None
            name = next_segment_name(directory, [s["file"] for s in segments])
            segments.append(write_segment(directory, name, live, vectors, dtype=dtype, pooling=pooled))
        replaced.append(seg["file"])
    write_manifest(directory, Manifest(manifest.settings, segments, manifest.pages))
    for old in replaced:
        (directory / old).unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# The build journal: what an interrupted `RetrieverGroup.build` had finished


def read_journal(directory: str | Path) -> tuple[dict | None, dict[int, dict]]:
    """(header, {batch number: record}) of the journal in `directory`, (None, {}) without one.

    Line 1 is the header (the corpus fingerprint, batch size, embedding settings); every further
    line is one finished batch: {"batch", "segment" (manifest entry or null), "meta", "skipped"}.
    A last line cut short by the interruption is dropped."""
    path = Path(directory) / JOURNAL
    if not path.exists():
        return None, {}
    lines = path.read_text().splitlines()
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise IndexLoadError(f"{path}: line {i + 1} is not valid JSON; remove {path.parent} to index again") from None
    if not records:
        return None, {}
    return records[0], {int(r["batch"]): r for r in records[1:]}


def write_journal(directory: str | Path, header: dict, records: Sequence[dict] = ()) -> None:
    """Start (or rewrite, dropping a cut-short line) the journal."""
    _atomic_write(Path(directory) / JOURNAL, "".join(json.dumps(r) + "\n" for r in (header, *records)).encode())


def append_journal(directory: str | Path, record: dict) -> None:
    with (Path(directory) / JOURNAL).open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())
