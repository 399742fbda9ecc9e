"""The page images behind a saved index: the only files the server reads on a request's behalf.

A page id resolves to the image file the index recorded for it when it was built (`source` in
its manifest; relative paths are taken from the directory the server was started in, where
`docrl index` ran). Requests name page ids found by retrieval, never paths. Pages indexed from
bytes (PDF pages rendered by `docrl index --folder`) are rendered again from `serve.pages_folder`
when it is given.
"""

from __future__ import annotations

import logging
from pathlib import Path

from docvqa.sample import Page

log = logging.getLogger(__name__)


class PageUnavailable(LookupError):
    """A page of the index whose image this server cannot read."""


class PageStore:
    def __init__(self, pages: dict[str, Page], unavailable: dict[str, str]):
        self.pages = pages
        self.unavailable = unavailable  # page id -> why

    @classmethod
    def from_index(cls, index_dir: str | Path, base_dir: str | Path | None = None,
                   pages_folder: str | Path | None = None) -> PageStore:
        from retriever.index import read_manifest

        manifest = read_manifest(index_dir)
        base = Path(base_dir) if base_dir is not None else Path.cwd()
        pages: dict[str, Page] = {}
        unavailable: dict[str, str] = {}
        for pid in manifest.live_page_ids():
            meta = manifest.pages[pid]
            source = str(meta.get("source", ""))
            if not source or source.startswith("<bytes:"):
                unavailable[pid] = "indexed from image bytes, not a file (start the server with serve.pages_folder)"
                continue
            path = Path(source) if Path(source).is_absolute() else base / source
            if not path.is_file():
                unavailable[pid] = f"its image file {path} does not exist"
                continue
            pages[pid] = Page(pid, meta.get("doc_id", ""), int(meta.get("page_no", 1)), image_path=str(path))
        if pages_folder is not None:
            from retriever.ingest import ingest_folder

            for page in ingest_folder(pages_folder).pages:
                if page.page_id in unavailable:
                    pages[page.page_id] = page
                    del unavailable[page.page_id]
        shown = "; ".join(f"{pid}: {why}" for pid, why in list(unavailable.items())[:5])
        if not pages:
            raise PageUnavailable(f"none of the pages of the index {index_dir} has a readable image"
                                  + (f": {shown}" if shown else " (the index is empty)"))
        if unavailable:
            log.warning("%d of %d pages of %s have no readable image and cannot be read to answer (%s)",
                        len(unavailable), len(unavailable) + len(pages), index_dir, shown)
        return cls(pages, unavailable)

    def __len__(self) -> int:
        return len(self.pages)

    def load(self, page_id: str) -> Page:
        """The page with its image bytes inline, so the replica reading it needs no file access."""
        page = self.pages.get(page_id)
        if page is None:
            raise PageUnavailable(f"page {page_id}: {self.unavailable.get(page_id, 'not in the index')}")
        if page.image_bytes is not None:
            return page
        try:
            data = Path(page.image_path).read_bytes()
        except OSError as e:
            raise PageUnavailable(f"page {page_id}: cannot read {page.image_path}: {e}") from None
        return Page(page.page_id, page.doc_id, page.page_no, image_bytes=data)
