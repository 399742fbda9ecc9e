"""The one sample type of docrl: a DocVQA question with its document and gold page.

Everything downstream (retriever, rollout, reward, learner, serve) speaks these types. They are
plain frozen dataclasses so they pickle cheaply through the Ray object store.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field

from PIL import Image


def make_page_id(doc_id: str, page_no: int) -> str:
    """Page ids are stable across loaders: the document id and the 1-based page number."""
    return f"{doc_id}/p{page_no}"


@dataclass(frozen=True)
class Page:
    """One page image of the retrieval corpus.

    Exactly one of `image_path` (a file on disk) and `image_bytes` (an encoded image, as the Hugging
    Face dataset layout stores it) is set.
    """

    page_id: str
    doc_id: str
    page_no: int
    image_path: str | None = None
    image_bytes: bytes | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if (self.image_path is None) == (self.image_bytes is None):
            raise ValueError(f"page {self.page_id}: exactly one of image_path and image_bytes must be set")

    def load_image(self) -> Image.Image:
        """Decode the page as RGB. Raises `OSError`/`ValueError` naming the page on a bad image."""
        try:
            if self.image_path is not None:
                with Image.open(self.image_path) as im:
                    return im.convert("RGB")
            with Image.open(io.BytesIO(self.image_bytes)) as im:  # type: ignore[arg-type]
                return im.convert("RGB")
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            where = self.image_path or "<embedded bytes>"
            raise OSError(f"page {self.page_id}: cannot read image {where}: {e}") from e

    @property
    def source(self) -> str:
        return self.image_path if self.image_path is not None else f"<bytes:{self.page_id}>"


@dataclass(frozen=True)
class DocVQASample:
    """A question about one document; the answer is printed on `gold_page`.

    `answers` is empty only for unlabelled splits (the DocVQA test split) and for feedback that
    only rejects an answer; loaders refuse or skip other labelled samples with no answers, as the
    config's data policy says. `rejected_answers` are answers users down-voted (from a feedback
    export): the reward is 0 for reproducing one.
    """

    question_id: str
    question: str
    answers: tuple[str, ...]
    doc_id: str
    gold_page: str
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

