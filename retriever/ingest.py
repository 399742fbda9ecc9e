"""Turning a folder of page images and PDFs into `Page`s for the index, without rendering anything.

An image file is a page; a PDF contributes one `Page(image_path=pdf, pdf_page=n)` per page, which
only counts the PDF's pages here: each page is rendered by whoever loads its image (the retriever
actor embedding it, pypdfium2, pip-installable), one page at a time, so listing a folder of
100,000 pages holds 100,000 small references, never their pixels. A corrupt image or PDF is
skipped and counted by file name, never a crash mid-index; a PDF page that fails to render is
skipped by name when it is embedded.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from docvqa.sample import Page, make_page_id, pdf_page_count

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}
# More pages than this in one PDF is refused by name (a page-count bomb, or a scan of a whole
# archive better split into its documents); raise it here for a corpus that needs more.
MAX_PDF_PAGES = 10_000


@dataclass
class IngestReport:
    pages: list[Page] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file: reason"


def ingest_folder(folder: str | Path) -> IngestReport:
    """Pages from every image and PDF under `folder` (recursively, in sorted path order).

    Document id = the file's path relative to `folder` without suffix; an image is page 1 of its
    own document, a PDF's pages are numbered from 1. Images are checked by their header only.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"not a folder: {folder}")
    report = IngestReport()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        suffix = path.suffix.lower()
        doc_id = str(path.relative_to(folder).with_suffix(""))
        if suffix in IMAGE_SUFFIXES:
            try:
                with Image.open(path) as im:
                    im.size  # noqa: B018 - forces the header parse, decodes nothing
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                report.skipped.append(f"{path}: unreadable image ({e})")
                continue
            report.pages.append(Page(make_page_id(doc_id, 1), doc_id, 1, image_path=str(path)))
        elif suffix == ".pdf":
            try:
                count = pdf_page_count(path)
            except ValueError as e:
                report.skipped.append(str(e))
                continue
            if not count:
                report.skipped.append(f"{path}: PDF has no pages")
            if count > MAX_PDF_PAGES:
                report.skipped.append(f"{path}: {count} pages exceed the limit of {MAX_PDF_PAGES} per PDF "
                                      f"(retriever.ingest.MAX_PDF_PAGES); split it")
                continue
            report.pages += [Page(make_page_id(doc_id, no), doc_id, no, image_path=str(path), pdf_page=no)
                             for no in range(1, count + 1)]
    return report
