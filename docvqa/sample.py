"""The one sample type of docrl: a DocVQA question with its document and gold page.

Everything downstream (retriever, rollout, reward, learner, serve) speaks these types. They are
plain frozen dataclasses so they pickle cheaply through the Ray object store.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image


def make_page_id(doc_id: str, page_no: int) -> str:
    """Page ids are stable across loaders: the document id and the 1-based page number."""
    return f"{doc_id}/p{page_no}"


# PDF pages are rendered at this resolution (a US letter page: 1224 x 1584 pixels), then fitted to
# each model's pixel budget by its processor.
PDF_DPI = 144


@dataclass(frozen=True)
class Page:
    """One page image of the retrieval corpus.

    Exactly one of `image_path` (a file on disk) and `image_bytes` (an encoded image, as the Hugging
    Face dataset layout stores it) is set. With `pdf_page`, `image_path` is a PDF and the page is
    its `pdf_page`-th page (1-based), rendered when the image is loaded: a page of a PDF is a few
    bytes of reference until someone needs its pixels.
    """

    page_id: str
    doc_id: str
    page_no: int
    image_path: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)
    pdf_page: int | None = None
    origin: str | None = None  # a `portable()` copy's source: the file it was read from

    def __post_init__(self) -> None:
        if (self.image_path is None) == (self.image_bytes is None):
            raise ValueError(f"page {self.page_id}: exactly one of image_path and image_bytes must be set")
        if self.pdf_page is not None and (self.image_path is None or self.pdf_page < 1):
            raise ValueError(f"page {self.page_id}: pdf_page={self.pdf_page} needs image_path (the PDF) and must be >= 1")

    def load_image(self) -> Image.Image:
        """Decode the page as RGB. Raises `OSError`/`ValueError` naming the page on a bad image."""
        try:
            if self.pdf_page is not None:
                return render_pdf_page(self.image_path, self.pdf_page)  # type: ignore[arg-type]
            if self.image_path is not None:
                with Image.open(self.image_path) as im:
                    return im.convert("RGB")
            with Image.open(io.BytesIO(self.image_bytes)) as im:  # type: ignore[arg-type]
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            raise OSError(f"page {self.page_id}: cannot read image {self.source}: {e}") from e

    def portable(self) -> Page:
        """The page with its image as bytes, for a process that may run on another host (it cannot
        open this host's files). An image file travels as its own bytes; a PDF page, rendered here,
        as PNG. Raises `OSError` naming the page when its file cannot be read."""
        if self.image_bytes is not None:
            return self
        if self.pdf_page is not None:
            buffer = io.BytesIO()
            self.load_image().save(buffer, format="PNG")
            data = buffer.getvalue()
        else:
            try:
                data = Path(self.image_path).read_bytes()  # type: ignore[arg-type]
            except OSError as e:
                raise OSError(f"page {self.page_id}: cannot read image {self.source}: {e}") from e
        return Page(self.page_id, self.doc_id, self.page_no, image_bytes=data, origin=self.source)

    @property
    def source(self) -> str:
        """Where the image comes from: a file, `file.pdf#page=N`, or `<bytes:page id>`."""
        if self.origin is not None:
            return self.origin
        if self.pdf_page is not None:
            return f"{self.image_path}#page={self.pdf_page}"
        return self.image_path if self.image_path is not None else f"<bytes:{self.page_id}>"


def portable(pages: Iterable[Page]) -> list[Page]:
    """`Page.portable()` of each page, for roles that may run on another host. A page whose file
    cannot be read here goes as it is: the role fails to read it too and names it as skipped, as
    for any unreadable page."""
    out = []
    for page in pages:
        try:
            out.append(page.portable())
        except OSError:
            out.append(page)
    return out


def pdf_page_count(path: str | Path) -> int:
    """Pages of a PDF, without rendering any. Raises ValueError naming the file when unreadable."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        raise ValueError(f"{path}: not a readable PDF ({e})") from None
    try:
        return len(pdf)
    finally:
        pdf.close()


def render_pdf_page(path: str | Path, page_no: int, dpi: int = PDF_DPI) -> Image.Image:
    """Page `page_no` (1-based) of a PDF as an RGB image; only that page is rendered."""
    import pypdfium2 as pdfium

    try:
        pdf = pdfium.PdfDocument(str(path))
    except pdfium.PdfiumError as e:
        raise ValueError(f"not a readable PDF ({e})") from None
    try:
        if not 1 <= page_no <= len(pdf):
            raise ValueError(f"the PDF has {len(pdf)} pages, not a page {page_no}")
        page = pdf[page_no - 1]
        try:
            # A page's size is whatever the file says: check the pixels it would render to against
            # PIL's decompression-bomb limit (what an image file of that size gets) before allocating.
            width_pt, height_pt = page.get_size()
            width, height = round(width_pt * dpi / 72), round(height_pt * dpi / 72)
            if Image.MAX_IMAGE_PIXELS and width * height > Image.MAX_IMAGE_PIXELS:
                raise ValueError(f"page {page_no} is {width_pt / 72:.0f}x{height_pt / 72:.0f} inches: {width}x{height} pixels "
                                 f"at {dpi} dpi exceed the limit of {Image.MAX_IMAGE_PIXELS:,} (PIL.Image.MAX_IMAGE_PIXELS)")
            return page.render(scale=dpi / 72).to_pil().convert("RGB")
        finally:
            page.close()
    except pdfium.PdfiumError as e:
        raise ValueError(f"page {page_no} does not render ({e})") from None
    finally:
        pdf.close()


@dataclass(frozen=True)
class DocVQASample:
    """A question about one document; the answer is printed on `gold_page`.

    `gold_page` is None where the data does not say which page holds the answer: the question
    comes with its document only (`doc_id`, whose pages are `doc_pages`), or with nothing (`doc_id`
    None, `doc_pages` empty: the question is asked of the whole corpus). Such questions train from
    the reward alone (the retriever with retriever.learn); what needs a gold page (the policy's and
    the retriever's supervised warm starts, recall@k) leaves them out.

    `answers` is empty only for unlabelled splits (the DocVQA test split) and for feedback that
    only rejects an answer; loaders refuse or skip other labelled samples with no answers, as the
    config's data policy says. `rejected_answers` are answers users down-voted (from a feedback
    export): the reward is 0 for reproducing one.
    """

    question_id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str | None
    gold_page: str | None
    doc_pages: tuple[str, ...]
    question_types: tuple[str, ...] = ()
    split: str = "train"
    rejected_answers: tuple[str, ...] = ()


@dataclass
class DocVQADataset:
    """Samples plus the page corpus they draw from, and an account of what the loader skipped."""

    samples: list[DocVQASample]
    pages: dict[str, Page]
    source: str
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_examples: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.samples)

    def documents(self) -> dict[str, tuple[str, ...]]:
        """doc_id -> its page ids, in page order."""
        return documents_of(self.pages.values())


def documents_of(pages) -> dict[str, tuple[str, ...]]:
    """Group pages into documents: doc_id -> page ids in page order."""
    docs: dict[str, list[Page]] = {}
    for page in pages:
        docs.setdefault(page.doc_id, []).append(page)
    return {d: tuple(p.page_id for p in sorted(ps, key=lambda p: p.page_no)) for d, ps in docs.items()}

