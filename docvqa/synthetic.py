"""Deterministic synthetic DocVQA-style corpus: document pages rendered with PIL, plus questions
whose answers are printed on a known page.

No model or data set can be downloaded here, so tests, the embedded default and the "does RL help
a tiny model" demo train on this corpus instead of DocVQA.

On-disk layout (the official DocVQA annotation layout, so the DocVQA JSON loader reads it as is):

    OUT/documents/<ucsf_document_id>_<page_no>.png      one image per page, page_no = 1..n
    OUT/train_v1.0.json
    OUT/val_v1.0.json                                   split by document: no document in both

    {"dataset_name": "docrl-synthetic", "dataset_version": "1.0", "dataset_split": "train",
     "data": [{"questionId": 1, "question": "What is the invoice number?",
               "question_types": ["form"], "image": "documents/qhtz0000_1.png", "docId": 1,
               "ucsf_document_id": "qhtz0000", "ucsf_document_page_no": "1",
               "answers": ["INV-20431", "20431"], "data_split": "train"}, ...],
     "pages": [{"docId": 1, "image": "documents/qhtz0000_1.png",
                "ucsf_document_id": "qhtz0000", "ucsf_document_page_no": "1"}, ...]}

One record is one question about one page, the page its answer is printed on. As in DocVQA,
`docId` identifies a page image (unique across the corpus) and `ucsf_document_id` a document;
`questionId` is unique across both splits. The extra top-level "pages" key lists every page of
the split's documents, so pages that no question points at still reach the retrieval corpus.
`answers[0]` is always the exact string drawn on the gold page; the rest are DocVQA-style
variants (a money amount printed "$1,250.00" answers ["$1,250.00", "1,250.00", "1250.00"]).

Levels:
  "realistic"  invoices, letters, forms, tables (price lists, schedules) and receipts of 1-3 pages
               on US letter pages at 72 dpi (612x792 px) with headers, key:value fields, ruled
               tables and totals.
  "easy"       one 224x224 page per document showing one big colour word from EASY_VOCAB on a
               large plate of that colour, and one question "what word is printed?": learnable by
               a tiny model (the plate's colour is a cue a random vision tower picks up in
               minutes), so a short run on 2 CPU cores can show its reward going up. It tests the
               plumbing (page -> answer -> reward -> update), not reading.
  "sections"   documents of SECTION_PAGES 224x224 pages, each a section of another kind (invoice,
               letter, receipt, form, table: the kind's name on a banner of its own colour) with
               its own colour word on a plate. A question names a section ("What word is printed on
               the letter page?"), so only one page of the document answers it: the level where
               retrieval decides what the policy reads (configs/tiny-retrieval.yaml). Searched
               within the question's document (retriever.scope: document), as in MP-DocVQA.

Determinism: the same arguments give byte-identical files on any machine with the same Pillow and
zlib. Every document draws from its own `random.Random` seeded with a string (string seeds hash
with SHA-512, unaffected by PYTHONHASHSEED), so document i does not depend on how many documents
follow it. Text uses Pillow's built-in scalable font (`ImageFont.load_default(size=...)`), never a
system font. PNGs carry no timestamp and JSON is written with sorted keys and fixed indentation.

`plan_documents` returns what `generate_corpus` draws (every text string with its page), so tests
can check that each answer really is printed on its gold page without OCR.

The parts live in flat modules, imported one way only: word lists and value makers in
`synthetic_words`, colours, fonts, draw ops, plans and the page-flowing `Layout` in
`synthetic_layout`, the document kinds in `synthetic_kinds`; this module plans documents and writes
the corpus.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Sequence

from PIL import Image, ImageDraw

from docvqa.synthetic_kinds import BUILDERS, select
from docvqa.synthetic_layout import (
    WHITE, Color, DocumentPlan, Layout, LineOp, Op, PagePlan, PolylineOp, QuestionPlan, RectOp, TextOp,
    finish, font, text_width,
)

__all__ = [
    "DATASET_NAME",
    "DEFAULT_PAGE_SIZE",
    "DocumentPlan",
    "EASY_QUESTIONS",
    "EASY_VOCAB",
    "LEVELS",
    "LineOp",
    "PagePlan",
    "PolylineOp",
    "QuestionPlan",
    "REALISTIC_KINDS",
    "RectOp",
    "SECTION_KINDS",
    "SECTION_PAGES",
    "TextOp",
    "generate_corpus",
    "generate_pdf",
    "plan_documents",
    "render_document",
    "render_page",
]

DATASET_NAME = "docrl-synthetic"
DATASET_VERSION = "1.0"
SPLITS = ("train", "val")
LEVELS = ("realistic", "easy", "sections")
REALISTIC_KINDS = ("invoice", "letter", "form", "table", "receipt")
DEFAULT_PAGE_SIZE = {"realistic": (612, 792), "easy": (224, 224), "sections": (224, 224)}

# Small on purpose: the easy level exists so a tiny policy can learn it within a short RL run.
EASY_VOCAB = ("red", "blue", "green", "yellow", "black", "pink", "orange", "purple")
# Each word is printed on a large plate of its own colour, in white or black for contrast.
EASY_COLORS: dict[str, Color] = {"red": (205, 30, 30), "blue": (30, 60, 210), "green": (30, 150, 45),
                                 "yellow": (245, 215, 20), "black": (15, 15, 15), "pink": (250, 150, 190),
                                 "orange": (245, 130, 20), "purple": (135, 40, 165)}
EASY_QUESTIONS = (
    "What word is printed on the page?",
    "What is the word shown in large letters?",
    "Which word is written in the middle of the page?",
    "What does the large text on the page say?",
)
# Small-print clutter on easy pages; disjoint from EASY_VOCAB so the answer stays unambiguous.
_EASY_DISTRACTORS = ("draft", "copy", "file", "memo", "ref.", "no.", "rev.", "page", "scan", "form")
# The sections level: a document's pages are sections of these kinds (words the tiny models'
# tokenizer holds whole), each under a banner of its own colour, none of them a plate colour.
SECTION_KINDS = ("invoice", "letter", "receipt", "form", "table")
SECTION_COLORS: dict[str, Color] = {"invoice": (0, 118, 118), "letter": (125, 80, 40), "receipt": (100, 100, 100),
                                    "form": (105, 115, 20), "table": (120, 20, 60)}
SECTION_PAGES = 4
SECTION_QUESTIONS = (
    "What word is printed on the {kind} page?",
    "Which word is shown in large letters on the {kind} page?",
    "What does the large text on the {kind} page say?",
)
# PDF metadata dates are pinned so PDFs made from the same pages are byte-identical too.
_PDF_DATE = time.struct_time((2000, 1, 1, 0, 0, 0, 5, 1, 0))


# ----------------------------------------------------------------------------------------------
# Planning: which documents of which kinds, and which questions about them.


def _doc_id(rng: random.Random, index: int) -> str:
    # DocVQA ids look like "xnbl0037"; the digits are the index, which makes ids unique by construction.
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(4)) + f"{index:04d}"


def _plan_realistic(rng: random.Random, index: int, kind: str, page_size: tuple[int, int],
                    k: int) -> DocumentPlan:
    doc_id = _doc_id(rng, index)
    L = Layout(page_size)
    cands = BUILDERS[kind](rng, L)
    pages = [PagePlan(i + 1, ops) for i, ops in enumerate(finish(L, rng))]
    return DocumentPlan(doc_id, kind, "realistic", page_size, pages, select(rng, cands, k))


def _specks(rng: random.Random, W: int, H: int) -> list[Op]:
    """Grey dots, like a scanned page."""
    ops: list[Op] = []
    for _ in range(rng.randint(8, 30)):
        x, y, s, g = rng.randrange(W), rng.randrange(H), rng.randint(1, 2), rng.randint(120, 200)
        ops.append(RectOp(x, y, min(W - 1, x + s), min(H - 1, y + s), None, (g, g, g), 1))
    return ops


def _word_plate(rng: random.Random, word: str, W: int, top: int, height: int, scale: int) -> list[Op]:
    """`word` in large letters (17-23% of `scale` pixels) on a plate of its colour, near the middle
    of the band of the page from `top` down `height` pixels (jittered, inside the page)."""
    size = rng.randint(int(scale * 0.17), int(scale * 0.23))
    while size > 8 and text_width(word, size, True) > W * 0.8:
        size -= 1
    bb = font(size).getbbox(word)
    w, h = bb[2] - bb[0] + 1, bb[3] - bb[1]
    jx, jy = int(W * 0.06), int(height * 0.08)
    x = (W - w) // 2 - bb[0] + rng.randint(-jx, jx)
    x = max(2 - bb[0], min(x, W - 2 - w - bb[0]))
    y = top + (height - h) // 2 - bb[1] + rng.randint(-jy, jy)
    plate = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in EASY_COLORS[word])
    padx, pady = max(3, size // 3), max(3, size // 2)
    ink = (255, 255, 255) if sum(plate) < 420 else (0, 0, 0)
    return [RectOp(max(0, x + bb[0] - padx), max(0, y + bb[1] - pady), min(W - 1, x + bb[2] + padx),
                   min(top + height - 1, y + bb[3] + pady), None, plate, 0),
            TextOp(x, y, word, size, rng.random() < 0.5, ink)]


def _plan_easy(rng: random.Random, index: int, page_size: tuple[int, int]) -> DocumentPlan:
    doc_id = _doc_id(rng, index)
    W, H = page_size
    word = rng.choice(EASY_VOCAB)
    ops = _specks(rng, W, H)
    small = max(6, round(min(W, H) * 0.045))
    for corner in rng.sample(range(4), rng.randint(1, 3)):
        t = rng.choice(_EASY_DISTRACTORS) + (f" {rng.randint(1, 99)}" if rng.random() < 0.5 else "")
        tw = text_width(t, small)
        x = 6 if corner in (0, 2) else int(W - 6 - tw)
        y = 5 if corner in (0, 1) else H - small - 8
        ops.append(TextOp(x, y, t, small, False, (130, 130, 130)))
    ops += _word_plate(rng, word, W, 0, H, min(W, H))
    page = PagePlan(1, ops)
    q = QuestionPlan(rng.choice(EASY_QUESTIONS), [word], ["layout"], 0)
    return DocumentPlan(doc_id, "word", "easy", page_size, [page], [q])


def _plan_sections(rng: random.Random, index: int, page_size: tuple[int, int], k: int) -> DocumentPlan:
    """SECTION_PAGES pages, each a section of another kind: a banner in the kind's colour with its
    name (INVOICE, LETTER, ...) above a colour word on its plate, every word another one. Each of
    the `k` questions names a section and asks for its word, so only the named page answers it."""
    doc_id = _doc_id(rng, index)
    W, H = page_size
    kinds = rng.sample(SECTION_KINDS, SECTION_PAGES)
    words = rng.sample(EASY_VOCAB, SECTION_PAGES)
    banner = int(H * 0.22)
    small = max(6, round(min(W, H) * 0.045))
    pages = []
    for page_no, (kind, word) in enumerate(zip(kinds, words), start=1):
        ops = _specks(rng, W, H)
        ops.append(RectOp(0, 0, W - 1, banner, None, SECTION_COLORS[kind], 0))
        title = kind.upper()
        size = int(banner * 0.55)
        while size > 8 and text_width(title, size, True) > W * 0.85:
            size -= 1
        bb = font(size).getbbox(title)
        ops.append(TextOp((W - (bb[2] - bb[0])) // 2 - bb[0], (banner - (bb[3] - bb[1])) // 2 - bb[1], title,
                          size, True, WHITE))
        ops += _word_plate(rng, word, W, banner + 4, H - banner - small - 14, min(W, H))
        footer = f"page {page_no} of {SECTION_PAGES}"
        ops.append(TextOp(int(W - 6 - text_width(footer, small)), H - small - 8, footer, small, False, (130, 130, 130)))
        pages.append(PagePlan(page_no, ops))
    questions = [QuestionPlan(rng.choice(SECTION_QUESTIONS).format(kind=kinds[i]), [words[i]], ["layout"], i)
                 for i in sorted(rng.sample(range(SECTION_PAGES), min(k, SECTION_PAGES)))]
    return DocumentPlan(doc_id, "sections", "sections", page_size, pages, questions)


def _check_bounds(plan: DocumentPlan) -> None:
    W, H = plan.page_size
    for page in plan.pages:
        for op in page.ops:
            if isinstance(op, TextOp):
                # Advance width and ascent+descent bound the ink (this font has no negative bearings).
                ascent, descent = font(op.size).getmetrics()
                x1, y1 = op.x + text_width(op.text, op.size, op.bold), op.y + ascent + descent
                if op.x < 0 or op.y < 0 or x1 > W or y1 > H:
                    raise ValueError(
                        f"page_size {plan.page_size} is too small for {plan.level} documents: "
                        f"{op.text!r} on {plan.doc_id} page {page.page_no} does not fit "
                        f"(use at least (306, 396) for realistic, (96, 96) for easy)")


def plan_documents(num_documents: int, seed: int = 0, level: str = "realistic",
                   page_size: tuple[int, int] | None = None,
                   questions_per_document: int = 3) -> list[DocumentPlan]:
    """The documents `generate_corpus` renders: each page's draw ops and text, each question's page.

    questionId (`QuestionPlan.question_id`) and page image ids (`PagePlan.image_id`, DocVQA's docId)
    are numbered from 1 in document order, so they are unique across splits.
    """
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, got {level!r}")
    if num_documents < 0:
        raise ValueError(f"num_documents must be >= 0, got {num_documents}")
    if questions_per_document < 1:
        raise ValueError(f"questions_per_document must be >= 1, got {questions_per_document}")
    size = tuple(page_size) if page_size is not None else DEFAULT_PAGE_SIZE[level]
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"page_size must be (width, height) in pixels, got {page_size!r}")
    size = (int(size[0]), int(size[1]))
    # Kinds are dealt from shuffled decks of five, so any 5 consecutive documents cover all kinds.
    deck_rng = random.Random(f"docrl-synthetic:kinds:{seed}")
    plans: list[DocumentPlan] = []
    deck: list[str] = []
    qid = image_id = 0
    for i in range(num_documents):
        rng = random.Random(f"docrl-synthetic:{level}:{seed}:{i}")
        if level == "easy":
            plan = _plan_easy(rng, i, size)
        elif level == "sections":
            plan = _plan_sections(rng, i, size, questions_per_document)
        else:
            if not deck:
                deck = list(REALISTIC_KINDS)
                deck_rng.shuffle(deck)
            plan = _plan_realistic(rng, i, deck.pop(), size, questions_per_document)
        _check_bounds(plan)
        for page in plan.pages:
            image_id += 1
            page.image_id = image_id
        for q in plan.questions:
            qid += 1
            q.question_id = qid
        plans.append(plan)
    return plans


# ----------------------------------------------------------------------------------------------
# Rendering and writing.


def render_page(page: PagePlan, page_size: tuple[int, int]) -> Image.Image:
    """Draws one planned page as an RGB image."""
    img = Image.new("RGB", page_size, WHITE)
    d = ImageDraw.Draw(img)
    for op in page.ops:
        if isinstance(op, TextOp):
            f = font(op.size)
            d.text((op.x, op.y), op.text, font=f, fill=op.color)
            if op.bold:  # the built-in font has no bold face; a 1 px double strike reads as bold
                d.text((op.x + 1, op.y), op.text, font=f, fill=op.color)
        elif isinstance(op, LineOp):
            d.line((op.x0, op.y0, op.x1, op.y1), fill=op.color, width=op.width)
        elif isinstance(op, RectOp):
            d.rectangle((op.x0, op.y0, op.x1, op.y1), outline=op.outline, fill=op.fill, width=op.width)
        elif isinstance(op, PolylineOp):
            d.line(op.points, fill=op.color, width=op.width, joint="curve")
    return img


def render_document(plan: DocumentPlan) -> list[Image.Image]:
    return [render_page(p, plan.page_size) for p in plan.pages]


def _split_of(num_documents: int, seed: int, level: str, val_fraction: float) -> list[str]:
    n_val = int(round(num_documents * val_fraction))
    if num_documents >= 2 and 0 < val_fraction < 1:
        n_val = min(max(n_val, 1), num_documents - 1)  # both splits non-empty when both are asked for
    order = list(range(num_documents))
    random.Random(f"docrl-synthetic:split:{level}:{seed}").shuffle(order)
    val = set(order[:n_val])
    return ["val" if i in val else "train" for i in range(num_documents)]


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=True) + "\n", encoding="utf-8")


def generate_corpus(out_dir: str | Path, num_documents: int = 20, seed: int = 0, level: str = "realistic",
                    val_fraction: float = 0.2, page_size: tuple[int, int] | None = None,
                    questions_per_document: int = 3) -> dict[str, Path]:
    """Writes page PNGs and DocVQA-layout train/val JSON under `out_dir`; returns split -> JSON path.

    Both JSON files are always written (a split can be empty). Files already in `out_dir` with other
    names are left alone; same-named files are overwritten. The easy level writes one question per
    document whatever `questions_per_document` says: all its phrasings ask the same thing. The
    sections level asks about at most SECTION_PAGES pages, each once.
    """
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be in [0, 1], got {val_fraction}")
    plans = plan_documents(num_documents, seed, level, page_size, questions_per_document)
    out = Path(out_dir)
    (out / "documents").mkdir(parents=True, exist_ok=True)
    splits = _split_of(num_documents, seed, level, val_fraction)
    data: dict[str, list[dict]] = {s: [] for s in SPLITS}
    pages: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for plan, split in zip(plans, splits):
        for i, page in enumerate(plan.pages):
            name = plan.image_name(i)
            render_page(page, plan.page_size).save(out / name, format="PNG", optimize=False)
            pages[split].append({"docId": page.image_id, "image": name, "ucsf_document_id": plan.doc_id,
                                 "ucsf_document_page_no": str(page.page_no)})
        for q in plan.questions:
            page = plan.pages[q.page_index]
            data[split].append({
                "questionId": q.question_id,
                "question": q.question,
                "question_types": list(q.question_types),
                "image": plan.image_name(q.page_index),
                "docId": page.image_id,
                "ucsf_document_id": plan.doc_id,
                "ucsf_document_page_no": str(page.page_no),
                "answers": list(q.answers),
                "data_split": split,
            })
    paths: dict[str, Path] = {}
    for split in SPLITS:
        paths[split] = out / f"{split}_v1.0.json"
        _write_json(paths[split], {"dataset_name": DATASET_NAME, "dataset_version": DATASET_VERSION,
                                   "dataset_split": split, "data": data[split], "pages": pages[split]})
    return paths


def generate_pdf(out_path: str | Path, pages: Sequence[Image.Image]) -> Path:
    """Writes page images as one multi-page PDF at 72 dpi (a 612x792 page is US letter).

    Creation and modification dates are pinned, so the same pages give the same bytes.
    """
    if not pages:
        raise ValueError("generate_pdf needs at least one page")
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    rgb = [p.convert("RGB") for p in pages]
    rgb[0].save(out, format="PDF", save_all=True, append_images=rgb[1:], resolution=72.0,
                creationDate=_PDF_DATE, modDate=_PDF_DATE)
    return out
