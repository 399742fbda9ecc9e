"""Turning a folder of page images and PDFs into `Page`s for the index.

PDF pages are rendered with pypdfium2 (pip-installable, no system dependency) and kept as PNG
bytes. A corrupt image or PDF is skipped and counted by file name, never a crash mid-index.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from docvqa.sample import Page, make_page_id

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".webp", ".bmp"}


@dataclass
class IngestReport:
    pages: list[Page] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # "file: reason"


def render_pdf(path: str | Path, dpi: int = 144) -> list[Image.Image]:
    """Every page of a PDF as an RGB image at `dpi`. Raises ValueError naming the file when corrupt."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        raise ValueError(f"{path}: not a readable PDF ({e})") from None
    try:
        return [pdf[i].render(scale=dpi / 72).to_pil().convert("RGB") for i in range(len(pdf))]
    finally:
        pdf.close()


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def ingest_folder(folder: str | Path, pdf_dpi: int = 144) -> IngestReport:
    """Pages from every image and PDF under `folder` (recursively, in sorted path order).

    Document id = the file's path relative to `folder` without suffix; an image is page 1 of its
    own document, a PDF's pages are numbered from 1.
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
                    im.load()
            except (OSError, ValueError, Image.DecompressionBombError) as e:
                report.skipped.append(f"{path}: unreadable image ({e})")
                continue
            report.pages.append(Page(make_page_id(doc_id, 1), doc_id, 1, image_path=str(path)))
        elif suffix == ".pdf":
            try:
                images = render_pdf(path, pdf_dpi)
            except ValueError as e:
                report.skipped.append(str(e))
                continue
            if not images:
                report.skipped.append(f"{path}: PDF has no pages")
            for no, image in enumerate(images, start=1):
                report.pages.append(Page(make_page_id(doc_id, no), doc_id, no, image_bytes=_png_bytes(image)))
    return report
