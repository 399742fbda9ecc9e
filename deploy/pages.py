"""The page images behind a saved index: the only files the server reads on a request's behalf.

A page id resolves to the source the index recorded for it when it was built (`source` in its
manifest: an image file, or `file.pdf#page=N` for a PDF page; relative paths are taken from the
index's own directory when it carries its pages (`PageStore.pack_with_index`), else from the
directory the server was started in, where `docrl index` ran). Requests name page ids found by
retrieval, never paths. Pages of an index built before PDF pages were recorded by file (their
source is `<bytes:...>`) are looked up in `serve.pages_folder` by document id.

Starting a replica reads no image and renders no PDF: it only checks that each source file
exists (one stat per file, however many pages it holds). A page is read, or its PDF page
rendered, when a request needs it, and kept encoded in a cache bounded in bytes (least recently
used first out), so a popular page is rendered once.
"""

from __future__ import annotations

import io
import logging
import threading
from collections import OrderedDict
from pathlib import Path

from common.shipping import ShippedFiles, pack_dir, pack_files
from docvqa.sample import Page

log = logging.getLogger(__name__)

CACHE_BYTES = 256 * 1024 * 1024  # encoded page images kept per replica
_PDF_PAGE = ".pdf#page="


class PageUnavailable(LookupError):
    """A page of the index whose image this server cannot read."""


def _page_from_source(pid: str, meta: dict, path: Path) -> Page:
    """A page whose `path` may carry a PDF page fragment (`file.pdf#page=N`)."""
    doc_id, page_no = meta.get("doc_id", ""), int(meta.get("page_no", 1))
    name = str(path)
    if _PDF_PAGE in name.lower():
        cut = name.lower().rindex(_PDF_PAGE) + len(".pdf")
        return Page(pid, doc_id, page_no, image_path=name[:cut], pdf_page=int(name[cut + len("#page="):]))
    return Page(pid, doc_id, page_no, image_path=name)


class PageStore:
    def __init__(self, pages: dict[str, Page], unavailable: dict[str, str], cache_bytes: int = CACHE_BYTES):
        self.pages = pages
        self.unavailable = unavailable  # page id -> why
        self.cache_bytes = cache_bytes
        self._cache: OrderedDict[str, bytes] = OrderedDict()  # page id -> encoded image, oldest use first
        self._cached_bytes = 0
        self._lock = threading.Lock()  # pages are loaded from worker threads

    @classmethod
    def from_index(cls, index_dir: str | Path, base_dir: str | Path | None = None,
                   pages_folder: str | Path | None = None, cache_bytes: int = CACHE_BYTES) -> PageStore:
        from retriever.index import read_manifest

        manifest = read_manifest(index_dir)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        folder = Path(pages_folder) if pages_folder is not None else None
        exists: dict[Path, bool] = {}  # one stat per file, however many pages it holds

        def is_file(path: Path) -> bool:
            if path not in exists:
                exists[path] = path.is_file()
            return exists[path]

        pages: dict[str, Page] = {}
        unavailable: dict[str, str] = {}
        for pid in manifest.live_page_ids():
            meta = manifest.pages[pid]
            source = str(meta.get("source", ""))
            if not source or source.startswith("<bytes:"):
                found = cls._in_folder(folder, meta, is_file) if folder is not None else None
                if found is None:
                    unavailable[pid] = ("indexed from image bytes, not a file (start the server with serve.pages_folder)"
                                        if folder is None else f"indexed from image bytes, and {folder} holds no file "
                                        f"of its document {meta.get('doc_id')!r}")
                    continue
                pages[pid] = _page_from_source(pid, meta, found)
                continue
            path = Path(source)
            if not path.is_absolute():
                # an index that carries its pages (`pack_with_index`) names them relative to itself
                inside = Path(index_dir) / source
                path = inside if is_file(Path(_page_from_source(pid, meta, inside).image_path)) else base / source
            page = _page_from_source(pid, meta, path)
            if not is_file(Path(page.image_path)):
                unavailable[pid] = f"its image file {page.image_path} does not exist"
                continue
            pages[pid] = page
        shown = "; ".join(f"{pid}: {why}" for pid, why in list(unavailable.items())[:5])
        if not pages:
            raise PageUnavailable(f"none of the pages of the index {index_dir} has a readable image"
                                  + (f": {shown}" if shown else " (the index is empty)"))
        if unavailable:
            log.warning("%d of %d pages of %s have no readable image and cannot be read to answer (%s)",
                        len(unavailable), len(unavailable) + len(pages), index_dir, shown)
        return cls(pages, unavailable, cache_bytes)

    def pack_with_index(self, index_dir: str | Path) -> ShippedFiles:
        """The index and the image files of its readable pages, as files for a replica on any host:
        the manifest's sources are rewritten to the copies' paths inside the bundle (relative,
        so the replica resolves them against its own copy). A PDF goes once, however many of its
        pages the index holds."""
        import json

        files = {rel: data for rel, data in pack_dir(index_dir).files.items() if rel != "manifest.json"}
        manifest = json.loads((Path(index_dir) / "manifest.json").read_text())
        names: dict[str, str] = {}
        for pid, page in self.pages.items():
            if page.image_path not in names:
                names[page.image_path] = f"pages/{len(names):06d}{Path(page.image_path).suffix.lower()}"
                files[names[page.image_path]] = Path(page.image_path).read_bytes()
            fragment = f"#page={page.pdf_page}" if page.pdf_page is not None else ""
            manifest["pages"][pid] = {**manifest["pages"][pid], "source": names[page.image_path] + fragment}
        files["manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
        return pack_files(files, str(index_dir))

    @staticmethod
    def _in_folder(folder: Path, meta: dict, is_file) -> Path | None:
        """The file of a page's document in `folder` (document id = path without suffix, as
        `docrl index --folder` named it): its PDF page, or the image of a one-page document."""
        from retriever.ingest import IMAGE_SUFFIXES

        doc = folder / str(meta.get("doc_id", ""))
        pdf = doc.with_name(doc.name + ".pdf")
        if is_file(pdf):
            return Path(f"{pdf}#page={int(meta.get('page_no', 1))}")
        return next((doc.with_name(doc.name + s) for s in sorted(IMAGE_SUFFIXES) if is_file(doc.with_name(doc.name + s))), None)

    def __len__(self) -> int:
        return len(self.pages)

    def load(self, page_id: str) -> Page:
        """The page with its image bytes inline, so the replica reading it needs no file access."""
        page = self.pages.get(page_id)
        if page is None:
            raise PageUnavailable(f"page {page_id}: {self.unavailable.get(page_id, 'not in the index')}")
        if page.image_bytes is not None:
            return page
        with self._lock:
            data = self._cache.get(page_id)
            if data is not None:
                self._cache.move_to_end(page_id)
        if data is None:
            data = self._encoded(page)
            self._remember(page_id, data)
        return Page(page.page_id, page.doc_id, page.page_no, image_bytes=data)

    @staticmethod
    def _encoded(page: Page) -> bytes:
        try:
            if page.pdf_page is None:
                return Path(page.image_path).read_bytes()
            buf = io.BytesIO()
            page.load_image().save(buf, format="PNG")  # renders this one PDF page
            return buf.getvalue()
        except OSError as e:
            raise PageUnavailable(f"page {page.page_id}: cannot read {page.source}: {e}") from None

    def _remember(self, page_id: str, data: bytes) -> None:
        if len(data) > self.cache_bytes:
            return
        with self._lock:
            if page_id in self._cache:
                return
            self._cache[page_id] = data
            self._cached_bytes += len(data)
            while self._cached_bytes > self.cache_bytes:
                _, dropped = self._cache.popitem(last=False)
                self._cached_bytes -= len(dropped)
