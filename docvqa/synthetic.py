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

Determinism: the same arguments give byte-identical files on any machine with the same Pillow and
zlib. Every document draws from its own `random.Random` seeded with a string (string seeds hash
with SHA-512, unaffected by PYTHONHASHSEED), so document i does not depend on how many documents
follow it. Text uses Pillow's built-in scalable font (`ImageFont.load_default(size=...)`), never a
system font. PNGs carry no timestamp and JSON is written with sorted keys and fixed indentation.

`plan_documents` returns what `generate_corpus` draws (every text string with its page), so tests
can check that each answer really is printed on its gold page without OCR.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import random
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Sequence, Union

from PIL import Image, ImageDraw, ImageFont

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
LEVELS = ("realistic", "easy")
REALISTIC_KINDS = ("invoice", "letter", "form", "table", "receipt")
DEFAULT_PAGE_SIZE = {"realistic": (612, 792), "easy": (224, 224)}

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

Color = tuple[int, int, int]
INK: Color = (25, 25, 25)
GREY: Color = (110, 110, 110)
LIGHT: Color = (228, 228, 228)
WHITE: Color = (255, 255, 255)
_ACCENTS: tuple[Color, ...] = ((22, 48, 110), (120, 24, 30), (20, 80, 50), (40, 40, 40), (70, 40, 100))
# PDF metadata dates are pinned so PDFs made from the same pages are byte-identical too.
_PDF_DATE = time.struct_time((2000, 1, 1, 0, 0, 0, 5, 1, 0))


# ----------------------------------------------------------------------------------------------
# Plans: what is drawn where. Rendering is a pure function of these.


@dataclass(frozen=True)
class TextOp:
    x: int
    y: int  # top of the ascender (PIL's default "la" anchor)
    text: str
    size: int  # font size in pixels
    bold: bool = False
    color: Color = INK


@dataclass(frozen=True)
class LineOp:
    x0: int
    y0: int
    x1: int
    y1: int
    width: int = 1
    color: Color = INK


@dataclass(frozen=True)
class RectOp:
    x0: int
    y0: int
    x1: int
    y1: int
    outline: Color | None = INK
    fill: Color | None = None
    width: int = 1


@dataclass(frozen=True)
class PolylineOp:
    points: tuple[tuple[int, int], ...]
    width: int = 1
    color: Color = INK


Op = Union[TextOp, LineOp, RectOp, PolylineOp]


@dataclass
class PagePlan:
    page_no: int  # 1-based
    ops: list[Op]
    image_id: int = 0  # DocVQA "docId": unique per page image across the corpus

    @property
    def lines(self) -> list[str]:
        """Every string drawn on the page, in drawing order."""
        return [op.text for op in self.ops if isinstance(op, TextOp)]


@dataclass
class QuestionPlan:
    question: str
    answers: list[str]  # answers[0] is exactly the string drawn on the gold page
    question_types: list[str]
    page_index: int  # 0-based index into DocumentPlan.pages
    question_id: int = 0


@dataclass
class DocumentPlan:
    doc_id: str  # ucsf_document_id
    kind: str
    level: str
    page_size: tuple[int, int]
    pages: list[PagePlan]
    questions: list[QuestionPlan] = field(default_factory=list)

    def image_name(self, page_index: int) -> str:
        return f"documents/{self.doc_id}_{self.pages[page_index].page_no}.png"


# ----------------------------------------------------------------------------------------------
# Fake-world word lists. Small and built in: no external faker package, same output everywhere.

_FIRST_F = ("Mary", "Linda", "Susan", "Karen", "Nancy", "Helen", "Carol", "Janet", "Ruth", "Joan",
            "Diane", "Alice", "Judith", "Ellen", "Martha", "Laura", "Anne", "Irene", "Gloria", "Sarah")
_FIRST_M = ("James", "Robert", "John", "Michael", "William", "David", "Richard", "Thomas", "Charles",
            "Joseph", "Donald", "Kenneth", "Steven", "Edward", "Brian", "Ronald", "George", "Paul",
            "Frank", "Walter")
_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson",
         "Taylor", "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark",
         "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Green",
         "Baker", "Adams", "Nelson", "Hill", "Campbell", "Mitchell", "Roberts", "Carter",
         "Phillips", "Evans", "Turner", "Parker", "Collins", "Edwards", "Stewart", "Morris",
         "Murphy", "Cook", "Rogers", "Morgan", "Cooper", "Peterson", "Reed", "Bailey", "Kelly")
_CO_FIRST = ("Northwind", "Bluefield", "Harbor Point", "Meridian", "Crestview", "Summit", "Pinecrest",
             "Riverside", "Lakeshore", "Granite", "Westbrook", "Oakridge", "Silverline", "Keystone",
             "Redwood", "Fairmont", "Brookside", "Atlas", "Pioneer", "Beacon")
_CO_FIELD = ("Laboratories", "Supply", "Medical Group", "Research", "Industries", "Trading",
             "Consulting", "Printing", "Foods", "Chemical", "Packaging", "Instruments",
             "Distributors", "Paper Products", "Health Systems", "Analytics")
_CO_SUFFIX = ("Inc.", "Co.", "Corp.", "LLC", "Ltd.", "")
_STREETS = ("Maple", "Oak", "Cedar", "Elm", "Washington", "Lincoln", "Park", "Lake", "Hill",
            "Main", "Church", "Madison", "Jefferson", "Franklin", "Highland", "Chestnut", "Walnut",
            "Spring", "Market", "Commerce")
_STREET_KIND = ("Street", "Avenue", "Road", "Boulevard", "Drive", "Lane", "Parkway", "Court")
_CITIES = (("Richmond", "VA"), ("Denver", "CO"), ("Portland", "OR"), ("Raleigh", "NC"),
           ("Columbus", "OH"), ("Madison", "WI"), ("Austin", "TX"), ("Albany", "NY"),
           ("Sacramento", "CA"), ("Hartford", "CT"), ("Nashville", "TN"), ("Omaha", "NE"),
           ("Tucson", "AZ"), ("Louisville", "KY"), ("Baltimore", "MD"), ("Atlanta", "GA"),
           ("Boston", "MA"), ("Chicago", "IL"), ("Seattle", "WA"), ("San Francisco", "CA"),
           ("Winston-Salem", "NC"), ("Minneapolis", "MN"), ("St. Louis", "MO"), ("Charlotte", "NC"))
_JOB_TITLES = ("Director of Research", "Vice President, Marketing", "Purchasing Manager",
               "Senior Scientist", "Chief Financial Officer", "Project Coordinator",
               "Director of Operations", "Regional Sales Manager", "Associate Director",
               "Laboratory Supervisor", "General Counsel", "Program Manager")
_DEPARTMENTS = ("Research & Development", "Accounting", "Marketing", "Purchasing", "Quality Control",
                "Human Resources", "Legal", "Public Affairs", "Engineering", "Sales", "Operations",
                "Scientific Affairs")
_MATERIALS = ("Stainless Steel", "Aluminum", "Polyethylene", "Glass", "Copper", "Nylon", "Ceramic",
              "Rubber", "Brass", "Acrylic", "Cotton", "Vinyl")
_ITEMS = ("Clamp", "Beaker", "Tubing, 10 ft", "Filter Cartridge", "Storage Bin", "Gasket Set",
          "Sample Vial", "Mounting Bracket", "Valve Assembly", "Shelf Unit", "Cable Reel",
          "Funnel", "Spray Nozzle", "Pressure Gauge", "Hose Fitting", "Tray")
_GROCERIES = ("Whole Milk 1 gal", "Wheat Bread", "Large Eggs 12ct", "Bananas", "Coffee 12 oz",
              "Orange Juice", "Cheddar Cheese", "Paper Towels", "Chicken Breast", "Ground Beef",
              "Apples 3 lb", "Pasta 16 oz", "Tomato Sauce", "Butter", "Yogurt", "Rice 5 lb",
              "Dish Soap", "Cereal", "Peanut Butter", "Lettuce")
_STORE_KIND = ("Market", "Grocery", "Food Store", "Pharmacy", "Hardware", "General Store")
_UNITS = ("Each", "Box of 12", "Case of 24", "Pack of 50", "Dozen", "Roll", "Set", "Pair")
_TOPIC_LEAD = ("Advances in", "Update on", "Perspectives on", "New Methods in", "Case Studies in",
               "Regulatory Issues in", "Panel: The Future of", "Workshop on", "Review of",
               "Findings in")
_TOPICS = ("Respiratory Research", "Product Testing", "Consumer Surveys", "Quality Assurance",
           "Toxicology", "Market Analysis", "Packaging Design", "Clinical Studies", "Data Systems",
           "Flavor Chemistry", "Public Policy", "Field Trials", "Sensory Evaluation",
           "Supply Planning", "Epidemiology")
_ROOMS = ("Ballroom A", "Ballroom B", "Salon 1", "Salon 2", "Room 204", "Room 210", "Auditorium",
          "Board Room", "Garden Room")
_HOTELS = ("Hyatt Regency", "Marriott Center", "Hilton Plaza", "Sheraton Hotel", "Radisson Inn",
           "Omni Hotel")
_FORM_TITLES = ("EXPENSE REIMBURSEMENT REQUEST", "PURCHASE REQUISITION", "TRAVEL AUTHORIZATION REQUEST",
                "CHECK REQUEST FORM", "MATERIAL REQUEST FORM", "SERVICE REQUEST FORM")
_PROJECTS = ("Horizon", "Apex", "Sentinel", "Cobalt", "Northstar", "Keystone", "Vanguard", "Mercury",
             "Trident", "Aurora")
_SUBJECTS = ("Proposed research agreement", "Quarterly supply contract", "Annual review meeting",
             "Revised budget for the study", "Request for samples", "Renewal of services",
             "Report on field results", "Invitation to the program committee")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
_DATE_STYLES = ("long", "us", "dmy", "abbr")
_FILLER = (
    "We appreciate the cooperation your staff has shown throughout this process.",
    "Our records indicate that all prior correspondence has been received and filed.",
    "The committee will review the enclosed material before making a final decision.",
    "Please let us know if any of the terms described here require clarification.",
    "A copy of this letter has been forwarded to the appropriate department for review.",
    "We believe this arrangement will serve the interests of both organizations.",
    "Additional documentation may be requested as the review proceeds.",
    "The schedule outlined above is subject to change with reasonable notice.",
    "Your prompt attention to this matter would be greatly appreciated.",
    "Any questions regarding the technical details may be directed to our office.",
    "The results will be summarized in a report to be circulated next quarter.",
    "We look forward to continuing our work together in the coming year.",
)
_TERMS = (
    "All goods remain the property of the seller until payment has been received in full.",
    "Claims for damaged or missing goods must be made within ten days of delivery.",
    "Returned merchandise is subject to a restocking fee and requires prior authorization.",
    "Prices are subject to change without notice; quoted prices are valid for thirty days.",
    "The seller is not liable for delays caused by circumstances beyond its control.",
    "Any dispute arising from this invoice shall be governed by the laws of the seller's state.",
)
_INSTRUCTIONS = (
    "Complete all sections of this form in ink or type. Incomplete forms will be returned.",
    "Attach original receipts for every item claimed. Photocopies are not accepted.",
    "The request must be approved by the department head before it is submitted.",
    "Submit the completed form to the Accounting department within thirty days.",
    "Questions about this form should be directed to the office of the controller.",
    "Keep a copy of the completed form for your own records.",
)


def _dedupe(xs: Sequence[str]) -> list[str]:
    out: list[str] = []
    for x in xs:
        if x and x not in out:
            out.append(x)
    return out


def _money(cents: int, dollar: bool = True) -> str:
    s = f"{cents // 100:,}.{cents % 100:02d}"
    return "$" + s if dollar else s


def _money_answers(printed: str) -> list[str]:
    bare = printed.lstrip("$")
    return _dedupe([printed, bare, bare.replace(",", "")])


def _rand_date(rng: random.Random) -> _dt.date:
    lo, hi = _dt.date(1988, 1, 1).toordinal(), _dt.date(2012, 12, 28).toordinal()
    return _dt.date.fromordinal(rng.randint(lo, hi))


def _fmt_date(d: _dt.date, style: str) -> str:
    month = _MONTHS[d.month - 1]
    if style == "us":
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    if style == "dmy":
        return f"{d.day} {month} {d.year}"
    if style == "abbr" and len(month) > 4:
        return f"{month[:3]}. {d.day}, {d.year}"
    return f"{month} {d.day}, {d.year}"


def _date_answers(d: _dt.date, style: str) -> list[str]:
    # Printed form first, then the two spellings annotators most often wrote.
    return _dedupe([_fmt_date(d, style), _fmt_date(d, "long"), _fmt_date(d, "us")])


@dataclass(frozen=True)
class _Person:
    title: str
    first: str
    middle: str
    last: str

    @property
    def plain(self) -> str:
        return f"{self.first} {self.middle + ' ' if self.middle else ''}{self.last}"

    @property
    def full(self) -> str:
        return f"{self.title} {self.plain}"

    @property
    def answers_full(self) -> list[str]:
        return _dedupe([self.full, self.plain, f"{self.first} {self.last}"])

    @property
    def answers_plain(self) -> list[str]:
        return _dedupe([self.plain, f"{self.first} {self.last}"])


def _person(rng: random.Random) -> _Person:
    female = rng.random() < 0.5
    first = rng.choice(_FIRST_F if female else _FIRST_M)
    title = "Dr." if rng.random() < 0.3 else ("Ms." if female else "Mr.")
    middle = rng.choice("ABCDEFGHJKLMNPRSTW") + "." if rng.random() < 0.35 else ""
    return _Person(title, first, middle, rng.choice(_LAST))


def _company(rng: random.Random, avoid: str = "") -> str:
    while True:
        if rng.random() < 0.3:
            a, b = rng.sample(_LAST, 2)
            name = f"{a} & {b}, Inc."
        else:
            suffix = rng.choice(_CO_SUFFIX)
            name = f"{rng.choice(_CO_FIRST)} {rng.choice(_CO_FIELD)}" + (f" {suffix}" if suffix else "")
        if name != avoid:
            return name


def _address(rng: random.Random) -> tuple[str, str, str]:
    city, state = rng.choice(_CITIES)
    street = f"{rng.randint(10, 9899)} {rng.choice(_STREETS)} {rng.choice(_STREET_KIND)}"
    return street, f"{city}, {state} {rng.randint(10000, 99999)}", city


def _phone(rng: random.Random) -> tuple[str, list[str]]:
    area, line = rng.randint(201, 989), rng.randint(100, 9999)
    printed = f"({area}) 555-{line:04d}"
    return printed, [printed, f"{area}-555-{line:04d}"]


def _unique(rng: random.Random, make: Callable[[random.Random], str], used: set[str]) -> str:
    # Questions name table rows by their text, so row keys must not repeat inside a document.
    for _ in range(200):
        v = make(rng)
        if v not in used:
            used.add(v)
            return v
    raise RuntimeError("synthetic word lists exhausted")  # pragma: no cover - lists are large enough


# ----------------------------------------------------------------------------------------------
# Layout: a cursor that flows content down pages and records draw ops.


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


@lru_cache(maxsize=65536)
def _plain_width(text: str, size: int) -> float:
    return _font(size).getlength(text)


def _text_width(text: str, size: int, bold: bool = False) -> float:
    return _plain_width(text, size) + (1 if bold else 0)


def _line_width(words: Sequence[str], size: int) -> float:
    # FreeType measures are additive across word boundaries for this font (no kerning on spaces),
    # so wrapping sums cached word widths instead of re-measuring every candidate line.
    return sum(_plain_width(w, size) for w in words) + _plain_width(" ", size) * (len(words) - 1)


class _Layout:
    """Flows content down pages laid out for US letter and scaled to the requested page size."""

    def __init__(self, page_size: tuple[int, int]) -> None:
        self.W, self.H = page_size
        self.s = min(self.W / 612, self.H / 792)
        self.left = self.px(54)
        self.right = self.W - self.px(54)
        self.top = self.px(46)
        self.bottom = self.H - self.px(52)  # room for the footer
        self.pages: list[list[Op]] = []
        self.y = self.top
        self.on_new_page: Callable[[], None] | None = None
        self.new_page()

    # geometry
    def px(self, v: float) -> int:
        return int(round(v * self.s))

    def fs(self, size: float) -> int:
        return max(6, int(round(size * self.s)))

    def lh(self, size: float) -> int:
        return int(round(self.fs(size) * 1.38))

    @property
    def page(self) -> int:
        return len(self.pages) - 1

    @property
    def width(self) -> int:
        return self.right - self.left

    def new_page(self) -> None:
        self.pages.append([])
        self.y = self.top
        if self.on_new_page is not None and len(self.pages) > 1:
            self.on_new_page()

    def fits(self, h: float) -> bool:
        return self.y + h <= self.bottom

    def ensure(self, h: float) -> None:
        if not self.fits(h) and self.y > self.top:
            self.new_page()

    def down(self, h: float) -> None:
        self.y += int(round(h))

    # drawing
    def text(self, x: float, text: str, size: float, *, bold: bool = False, color: Color = INK,
             align: str = "left", max_w: float | None = None, y: int | None = None) -> int:
        f = self.fs(size)
        if max_w is not None:
            # Shrink rather than clip: the full string must be on the page for answers to be true.
            while f > 6 and _text_width(text, f, bold) > max_w:
                f -= 1
        w = _text_width(text, f, bold)
        if align == "right":
            x -= w
        elif align == "center":
            x -= w / 2
        self.pages[-1].append(TextOp(int(round(x)), self.y if y is None else y, text, f, bold, color))
        return self.page

    def line(self, x0: float, y0: float, x1: float, y1: float, width: int = 1, color: Color = INK) -> None:
        self.pages[-1].append(LineOp(int(x0), int(y0), int(x1), int(y1), max(1, width), color))

    def rect(self, x0: float, y0: float, x1: float, y1: float, outline: Color | None = INK,
             fill: Color | None = None, width: int = 1) -> None:
        self.pages[-1].append(RectOp(int(x0), int(y0), int(x1), int(y1), outline, fill, max(1, width)))

    def rule(self, width: int = 1, color: Color = INK, gap: float = 6) -> None:
        self.down(self.px(gap))
        self.line(self.left, self.y, self.right, self.y, width, color)
        self.down(self.px(gap))

    def heading_bar(self, text: str, color: Color, size: float = 9) -> int:
        h = self.lh(size) + self.px(4)
        self.ensure(h + self.lh(10) * 2)
        self.rect(self.left, self.y, self.right, self.y + h, outline=None, fill=color)
        p = self.text(self.left + self.px(6), text, size, bold=True, color=WHITE, y=self.y + self.px(3))
        self.down(h + self.px(6))
        return p

    def kv(self, x: float, label: str, value: str, size: float, label_w: float,
           max_w: float | None = None) -> int:
        p = self.text(x, label, size, bold=True)
        if value:
            p = self.text(x + label_w, value, size, max_w=max_w)
        self.down(self.lh(size))
        return p

    def paragraph(self, segments: Sequence[str | tuple[str, str]], size: float,
                  facts: dict[str, int] | None = None, indent: float = 0) -> None:
        """Word-wraps text; a (text, key) segment is never split, and facts[key] gets its page."""
        units: list[tuple[str, list[str]]] = []  # unbreakable units and the fact keys inside them
        glue_next = False
        for seg in segments:
            if isinstance(seg, tuple):
                words, keys = [seg[0]], [seg[1]]
                lead_space, trail_space = False, False
            else:
                words, keys = seg.split(), []
                lead_space, trail_space = seg[:1].isspace(), seg[-1:].isspace()
            for j, w in enumerate(words):
                # Punctuation right after a fact ("Denver,") stays attached to it.
                if j == 0 and units and glue_next and not lead_space:
                    units[-1] = (units[-1][0] + w, units[-1][1] + keys)
                else:
                    units.append((w, list(keys)))
            glue_next = not trail_space
        f = self.fs(size)
        x0 = self.left + self.px(indent)
        lines: list[tuple[str, list[str]]] = []
        cur: list[str] = []
        cur_keys: list[str] = []
        for w, keys in units:
            if cur and _line_width(cur + [w], f) > self.right - x0:
                lines.append((" ".join(cur), cur_keys))
                cur, cur_keys = [w], list(keys)
            else:
                cur, cur_keys = cur + [w], cur_keys + keys
        if cur:
            lines.append((" ".join(cur), cur_keys))
        for text, keys in lines:
            self.ensure(self.lh(size))
            p = self.text(x0, text, size, max_w=self.right - x0)
            for k in keys:
                if facts is not None:
                    facts[k] = p
            self.down(self.lh(size))


class _Table:
    """A ruled table whose rows flow onto following pages, repeating the header row there."""

    def __init__(self, L: _Layout, columns: Sequence[tuple[str, float, str]], size: float = 9,
                 header_fill: Color = LIGHT) -> None:
        self.L, self.size, self.header_fill = L, size, header_fill
        total = sum(c[1] for c in columns)
        xs = [float(L.left)]
        for _, frac, _ in columns:
            xs.append(xs[-1] + L.width * frac / total)
        self.xs = [int(round(x)) for x in xs]
        self.columns = columns
        self.row_h = L.lh(size) + L.px(5)
        self.pad = L.px(4)
        self.top = L.y
        L.ensure(self.row_h * 3)
        self._header()

    def _header(self) -> None:
        L = self.L
        self.top = L.y
        L.rect(self.xs[0], L.y, self.xs[-1], L.y + self.row_h, outline=None, fill=self.header_fill)
        self._cells([c[0] for c in self.columns], bold=True)
        L.down(self.row_h)
        L.line(self.xs[0], L.y, self.xs[-1], L.y)

    def _cells(self, cells: Sequence[str], bold: bool = False) -> int:
        L, p = self.L, self.L.page
        ty = L.y + (self.row_h - L.fs(self.size)) // 2 - L.px(1)
        for i, (cell, (_, _, align)) in enumerate(zip(cells, self.columns)):
            if not cell:
                continue
            x0, x1 = self.xs[i] + self.pad, self.xs[i + 1] - self.pad
            x = {"left": x0, "right": x1, "center": (x0 + x1) / 2}[align]
            L.text(x, cell, self.size, bold=bold, align=align, max_w=x1 - x0, y=ty)
        return p

    def fits_row(self, extra: float = 0) -> bool:
        return self.L.fits(self.row_h + extra)

    def row(self, cells: Sequence[str], bold: bool = False) -> int:
        if not self.fits_row():
            self.page_break()
        p = self._cells(cells, bold)
        self.L.down(self.row_h)
        self.L.line(self.xs[0], self.L.y, self.xs[-1], self.L.y, color=(150, 150, 150))
        return p

    def close(self) -> None:
        L = self.L
        L.rect(self.xs[0], self.top, self.xs[-1], L.y)
        for x in self.xs[1:-1]:
            L.line(x, self.top, x, L.y)

    def page_break(self) -> None:
        self.close()
        self.L.new_page()
        self._header()


def _bates(rng: random.Random) -> int:
    # Industry-archive pages carry a production number in a corner; it makes pages look scanned-in.
    return rng.randint(1_000_000_000, 2_099_999_999)


def _finish(L: _Layout, rng: random.Random) -> list[list[Op]]:
    """Adds footers: "Page i of n" on multi-page documents, and a production number on every page."""
    n = len(L.pages)
    base = _bates(rng)
    for i, ops in enumerate(L.pages):
        f = L.fs(7)
        y = L.H - L.px(34)
        if n > 1:
            t = f"Page {i + 1} of {n}"
            ops.append(TextOp(int(round(L.W / 2 - _text_width(t, f) / 2)), y, t, f, False, GREY))
        t = str(base + i)
        ops.append(TextOp(int(round(L.right - _text_width(t, f))), y + L.px(12), t, f, False, GREY))
    return L.pages


# ----------------------------------------------------------------------------------------------
# Document kinds. Each returns the pages' ops and the candidate questions (page known for each).


_Cand = QuestionPlan


def _n_pages(rng: random.Random) -> int:
    return rng.choices((1, 2, 3), weights=(5, 3, 2))[0]


def _letterhead(L: _Layout, company: str, addr: tuple[str, str, str], phone: str, accent: Color,
                centered: bool) -> int:
    x, align = (L.W / 2, "center") if centered else (L.left, "left")
    p = L.text(x, company, 17, bold=True, color=accent, align=align, max_w=L.width)
    L.down(L.lh(17))
    L.text(x, f"{addr[0]}  |  {addr[1]}", 8, color=GREY, align=align)
    L.down(L.lh(8))
    L.text(x, f"Telephone {phone}", 8, color=GREY, align=align)
    L.down(L.lh(8))
    L.rule(2, accent, gap=5)
    return p


def _build_invoice(rng: random.Random, L: _Layout) -> list[_Cand]:
    n_pages = min(_n_pages(rng), 3)
    accent = rng.choice(_ACCENTS)
    seller = _company(rng)
    s_addr, (s_phone, _) = _address(rng), _phone(rng)
    buyer, buyer_co, b_addr = _person(rng), _company(rng, avoid=seller), _address(rng)
    style = rng.choice(_DATE_STYLES)
    issued = _rand_date(rng)
    days = rng.choice((15, 30, 45, 60))
    due = issued + _dt.timedelta(days=days)
    num = rng.randint(10000, 99999)
    inv_no, inv_ans = rng.choice(((f"INV-{num}", [f"INV-{num}", str(num)]),
                                  (f"{num}", [str(num)]), (f"A-{num}", [f"A-{num}", str(num)])))
    po = f"PO-{rng.randint(100000, 999999)}"
    cust = f"C{rng.randint(1000, 99999)}"
    terms = f"Net {days}"
    Q: list[_Cand] = []

    p0 = L.page
    L.text(L.right, "INVOICE", 24, bold=True, color=accent, align="right")
    L.text(L.left, seller, 16, bold=True, color=accent, max_w=L.width * 0.6)
    L.down(L.lh(16) + L.px(4))
    for t in (s_addr[0], s_addr[1], f"Tel. {s_phone}"):
        L.text(L.left, t, 9, color=GREY)
        L.down(L.lh(9))
    L.rule(2, accent, gap=7)
    L.down(L.px(4))
    y0 = L.y
    L.text(L.left, "BILL TO:", 9, bold=True)
    L.down(L.lh(9))
    for t in (buyer.full, buyer_co, b_addr[0], b_addr[1]):
        L.text(L.left, t, 10, max_w=L.width * 0.5)
        L.down(L.lh(10))
    y_left = L.y
    L.y = y0
    kx = L.left + L.width * 0.56
    fields = (("Invoice No.:", inv_no), ("Invoice Date:", _fmt_date(issued, style)),
              ("Due Date:", _fmt_date(due, style)), ("Customer ID:", cust), ("P.O. Number:", po),
              ("Terms:", terms))
    lw = max(_text_width(f[0], L.fs(9), True) for f in fields) + L.px(10)
    for label, value in fields:
        L.kv(kx, label, value, 9, lw, max_w=L.right - kx - lw)
    L.y = max(L.y, y_left) + L.px(16)
    Q += [
        _Cand("What is the invoice number?", inv_ans, ["form"], p0),
        _Cand("What is the invoice date?", _date_answers(issued, style), ["form"], p0),
        _Cand("What is the due date of the invoice?", _date_answers(due, style), ["form"], p0),
        _Cand("What is the P.O. number?", [po, po[3:]], ["form"], p0),
        _Cand("What is the customer ID?", [cust], ["form"], p0),
        _Cand("What are the payment terms?", [terms], ["form"], p0),
        _Cand("Which company issued the invoice?", [seller], ["layout"], p0),
        _Cand("To which company is the invoice billed?", [buyer_co], ["layout"], p0),
        _Cand("Who is the invoice addressed to?", buyer.answers_full, ["layout"], p0),
    ]

    table = _Table(L, (("Item No.", 0.13, "left"), ("Description", 0.43, "left"), ("Qty", 0.1, "right"),
                       ("Unit Price", 0.17, "right"), ("Amount", 0.17, "right")))
    used: set[str] = set()
    subtotal = 0
    rows: list[tuple[int, str, str, str]] = []  # page, description, qty, amount

    def add_row() -> None:
        nonlocal subtotal
        desc = _unique(rng, lambda r: f"{r.choice(_MATERIALS)} {r.choice(_ITEMS)}", used)
        qty = rng.choice((1, 1, 2, 3, 4, 5, 6, 10, 12, 20, 24, 50))
        unit = rng.randint(150, 60000)
        amount = qty * unit
        subtotal += amount
        page = table.row((f"{rng.randint(1000, 9999)}-{rng.randint(10, 99)}", desc, str(qty),
                          _money(unit, False), _money(amount, False)))
        rows.append((page, desc, str(qty), _money(amount, False)))

    totals_h = L.lh(10) * 5 + L.px(30)
    if n_pages == 1:
        for _ in range(rng.randint(3, 8)):
            add_row()
    else:
        # Fill the first page so the items really continue overleaf, then a few more rows.
        while L.page == p0 and table.fits_row(table.row_h):
            add_row()
        table.page_break()
        for _ in range(rng.randint(2, 6)):
            add_row()
    table.close()

    tax_rate = rng.choice((0.0, 5.0, 6.0, 6.25, 7.5, 8.25))
    tax = int(round(subtotal * tax_rate / 100))
    shipping = rng.choice((0, 0, rng.randint(500, 9500)))
    total = subtotal + tax + shipping
    L.down(L.px(10))
    L.ensure(totals_h)
    lx, vx = L.left + L.width * 0.55, L.right - L.px(4)
    tot_lines = [("Subtotal", _money(subtotal)), (f"Sales Tax ({tax_rate:g}%)", _money(tax)),
                 ("Shipping & Handling", _money(shipping))]
    tot_page = L.page
    for label, value in tot_lines:
        L.text(lx, label, 10)
        L.text(vx, value, 10, align="right")
        L.down(L.lh(10))
    L.line(lx, L.y + L.px(2), L.right, L.y + L.px(2), 1)
    L.down(L.px(6))
    L.text(lx, "TOTAL AMOUNT DUE", 11, bold=True)
    L.text(vx, _money(total), 11, bold=True, align="right")
    L.down(L.lh(11) + L.px(14))
    L.ensure(L.lh(9) * 2)
    L.text(L.left, "Please include the invoice number with your payment.", 9, max_w=L.width)
    L.down(L.lh(9))
    L.text(L.left, "Thank you for your business!", 9, bold=True)
    L.down(L.lh(9))
    Q += [
        _Cand("What is the total amount due?", _money_answers(_money(total)), ["table/list"], tot_page),
        _Cand("What is the subtotal?", _money_answers(_money(subtotal)), ["table/list"], tot_page),
        _Cand("How much is the sales tax?", _money_answers(_money(tax)), ["table/list"], tot_page),
        _Cand("What is the sales tax rate?", [f"{tax_rate:g}%"], ["table/list"], tot_page),
    ]
    # One row question per page the table spans keeps every page answerable without flooding.
    for page in sorted({r[0] for r in rows}):
        page_rows = [r for r in rows if r[0] == page]
        _, desc, qty, amount = rng.choice(page_rows)
        Q.append(_Cand(f"What is the amount for {desc}?", _money_answers(amount), ["table/list"], page))
        _, desc, qty, amount = rng.choice(page_rows)
        Q.append(_Cand(f"What is the quantity of {desc}?", [qty], ["table/list"], page))

    if n_pages == 3:
        L.new_page()
        p3 = L.page
        L.text(L.left, "TERMS AND CONDITIONS", 13, bold=True, color=accent)
        L.down(L.lh(13) + L.px(6))
        rate = rng.choice(("1%", "1.5%", "2%"))
        facts: dict[str, int] = {}
        L.paragraph([f"1. Payment is due within {days} days of the invoice date. A finance charge of ",
                     (rate, "rate"), " per month will be applied to past-due balances."], 9, facts)
        L.down(L.px(4))
        for i, t in enumerate(rng.sample(_TERMS, 4)):
            L.paragraph([f"{i + 2}. {t}"], 9)
            L.down(L.px(4))
        L.down(L.px(14))
        L.ensure(L.px(120))
        L.line(L.left, L.y, L.right, L.y, 1, GREY)
        L.down(L.px(8))
        L.text(L.left, "REMITTANCE ADVICE - please return this portion with your payment", 9, bold=True,
               max_w=L.width)
        L.down(L.lh(9) + L.px(8))
        for label in ("Amount Enclosed:", "Check No.:", "Customer Signature:"):
            L.text(L.left, label, 9)
            L.line(L.left + L.px(120), L.y + L.fs(9), L.left + L.px(330), L.y + L.fs(9), 1, GREY)
            L.down(L.lh(9) + L.px(8))
        Q.append(_Cand("What is the monthly finance charge on past-due balances?", [rate], ["free_text"],
                       facts.get("rate", p3)))
    return Q


def _signature(L: _Layout, rng: random.Random, x: float, y: float) -> None:
    # A drifting circle traces cursive-looking loops; a signed page reads as a real letter or form.
    length = L.px(rng.randint(90, 150))
    loops = rng.randint(7, 12)
    r, amp = rng.uniform(3.0, 4.5) * L.s, rng.uniform(2, 6) * L.s
    tall = [rng.uniform(1.0, 2.6) for _ in range(loops + 1)]  # letters of different heights
    phase = rng.uniform(0, 6.28)
    n = 10 * loops
    pts = []
    for i in range(n + 1):
        t = i / n
        a = 6.2832 * loops * t
        px = x + length * t - r * math.sin(a)
        py = y + amp * math.sin(phase + 6.2832 * t) - r * tall[int(loops * t)] * math.cos(a)
        pts.append((int(round(px)), int(round(py))))
    L.pages[-1].append(PolylineOp(tuple(pts), max(1, L.px(1.3)), (20, 30, 90)))


def _build_letter(rng: random.Random, L: _Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(_ACCENTS)
    company = _company(rng)
    addr, (phone, _) = _address(rng), _phone(rng)
    to, to_title = _person(rng), rng.choice(_JOB_TITLES)
    to_co, to_addr = _company(rng, company), _address(rng)
    sender, sender_title = _person(rng), rng.choice(_JOB_TITLES)
    style = rng.choice(_DATE_STYLES)
    date = _rand_date(rng)
    subject = rng.choice(_SUBJECTS)
    Q: list[_Cand] = []

    p0 = _letterhead(L, company, addr, phone, accent, centered=rng.random() < 0.5)
    L.down(L.px(14))
    L.text(L.left, _fmt_date(date, style), 10)
    L.down(L.lh(10) * 2)
    for t in (to.full, to_title, to_co, to_addr[0], to_addr[1]):
        L.text(L.left, t, 10, max_w=L.width)
        L.down(L.lh(10))
    L.down(L.lh(10))
    L.text(L.left, f"Re: {subject}", 10, bold=True, max_w=L.width)
    L.down(L.lh(10) * 2)
    L.text(L.left, f"Dear {to.title} {to.last}:", 10)
    L.down(L.lh(10) * 1.5)
    Q += [
        _Cand("Who is the letter addressed to?", to.answers_full, ["layout"], p0),
        _Cand("What is the date of the letter?", _date_answers(date, style), ["layout"], p0),
        _Cand("What is the subject of the letter?", [subject], ["layout"], p0),
        _Cand("Which company is the letter from?", [company], ["layout"], p0),
        _Cand(f"What is the designation of {to.full}?", [to_title], ["layout"], p0),
        _Cand("To which company is the letter addressed?", [to_co], ["layout"], p0),
    ]

    city = rng.choice(_CITIES)[0]
    meet = _rand_date(rng)
    budget = _money(rng.randint(20, 900) * 12500)
    project = rng.choice(_PROJECTS)
    ref = f"{rng.choice('ABCDKRST')}{rng.randint(100, 999)}-{rng.randint(10, 99)}"
    people = str(rng.randint(12, 240))
    fact_paras: list[tuple[list[str | tuple[str, str]], _Cand]] = [
        (["As discussed, the next meeting of the working group will be held in ", (city, "city"),
          f" on {_fmt_date(meet, 'long')}. Please confirm your attendance at your earliest convenience."],
         _Cand("In which city will the meeting be held?", [city], ["free_text"], 0)),
        (["The proposed budget for the ", (f"{project} project", "project"), " is ", (budget, "budget"),
          ", which covers personnel, materials and travel for the coming year."],
         _Cand(f"What is the proposed budget for the {project} project?", _money_answers(budget),
               ["free_text"], 0)),
        (["For your records, our reference number for this matter is ", (ref, "ref"),
          "; please include it in all further correspondence."],
         _Cand("What is the reference number mentioned in the letter?", [ref], ["free_text"], 0)),
        (["We expect approximately ", (people, "people"),
          " participants to take part in the program, drawn from several regional offices."],
         _Cand("How many participants are expected to take part in the program?", [people],
               ["free_text"], 0)),
    ]
    rng.shuffle(fact_paras)
    fillers = list(_FILLER)
    rng.shuffle(fillers)
    facts: dict[str, int] = {}

    def filler_para() -> list[str | tuple[str, str]]:
        k = rng.randint(2, 4)
        out = " ".join(fillers[:k])
        fillers[:] = fillers[k:] + fillers[:k]
        return [out]

    paras: list[list[str | tuple[str, str]]] = []
    used_cands: list[tuple[str, _Cand]] = []

    def next_para() -> list[str | tuple[str, str]]:
        # Spread facts over the pages of longer letters, so later pages have questions too.
        if fact_paras and (not paras or rng.random() < (0.6 if n_pages == 1 else 0.3)):
            segs, cand = fact_paras.pop()
            key = next(s[1] for s in segs if isinstance(s, tuple) and s[1] != "project")
            used_cands.append((key, cand))
            para = segs + [" "] + filler_para()
        else:
            para = filler_para()
        paras.append(para)
        return para

    closing_h = L.lh(10) * 6 + L.px(40)
    if n_pages == 1:
        for _ in range(rng.randint(2, 3)):
            L.paragraph(next_para(), 10, facts)
            L.down(L.lh(10) * 0.6)
    else:
        # Body pages run full; the last page gets one or two paragraphs and the closing.
        while L.page < n_pages - 1:
            L.paragraph(next_para(), 10, facts)
            L.down(L.lh(10) * 0.6)
        for _ in range(rng.randint(0, 1)):
            L.paragraph(next_para(), 10, facts)
            L.down(L.lh(10) * 0.6)
    L.ensure(closing_h)
    L.down(L.lh(10) * 0.5)
    L.text(L.left, rng.choice(("Sincerely,", "Sincerely yours,", "Very truly yours,", "Best regards,")), 10)
    L.down(L.lh(10) * 1.3)
    _signature(L, rng, L.left + L.px(4), L.y + L.px(8))
    L.down(L.px(26))
    pl = L.text(L.left, sender.plain, 10)
    L.down(L.lh(10))
    L.text(L.left, sender_title, 10)
    L.down(L.lh(10) * 2)
    cc = _person(rng)
    L.text(L.left, f"cc: {cc.plain}", 8, color=GREY)
    Q += [
        _Cand("Who signed the letter?", sender.answers_plain, ["layout"], pl),
        _Cand(f"What is the designation of {sender.plain}?", [sender_title], ["layout"], pl),
    ]
    for key, cand in used_cands:
        if key in facts:
            cand.page_index = facts[key]
            Q.append(cand)
    return Q


def _build_form(rng: random.Random, L: _Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(_ACCENTS)
    company = _company(rng)
    title = rng.choice(_FORM_TITLES)
    requester, supervisor, approver = _person(rng), _person(rng), _person(rng)
    style = rng.choice(_DATE_STYLES)
    date = _rand_date(rng)
    emp_no = f"{rng.randint(10000, 99999)}"
    dept = rng.choice(_DEPARTMENTS)
    phone, phone_ans = _phone(rng)
    city, state = rng.choice(_CITIES)
    cost_center = f"{rng.randint(1000, 9999)}"
    account = f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}-{rng.randint(10, 99)}"
    amount = _money(rng.randint(50, 25000) * 100 + rng.choice((0, 0, 50, 25, 99)))
    purpose = rng.choice(("Attend annual scientific conference", "Replace laboratory equipment",
                          "Purchase office supplies for the quarter", "Site visit to regional facility",
                          "Printing of survey materials", "Consultant fees for data review"))
    priority = rng.choice(("Routine", "Urgent", "Rush"))
    Q: list[_Cand] = []

    p0 = L.page
    L.text(L.left, company, 10, bold=True, color=accent)
    L.text(L.right, f"Form {rng.choice('ABFGPR')}-{rng.randint(10, 999)} (Rev. {rng.randint(1, 12):02d}/"
                     f"{date.year % 100:02d})", 7, color=GREY, align="right")
    L.down(L.lh(10) + L.px(6))
    L.text(L.W / 2, title, 15, bold=True, align="center", max_w=L.width)
    L.down(L.lh(15) + L.px(10))
    Q.append(_Cand("What is the title of the form?", [title, title.title()], ["layout"], p0))

    box_h = L.px(34)

    def boxes(fields: Sequence[tuple[str, str, float]]) -> int:
        # One row of labelled boxes: small caption top-left, value underneath, like a printed form.
        L.ensure(box_h)
        x = float(L.left)
        for label, value, frac in fields:
            w = L.width * frac
            L.rect(x, L.y, x + w, L.y + box_h, outline=(90, 90, 90))
            L.text(x + L.px(4), label, 7, color=GREY, y=L.y + L.px(3))
            L.text(x + L.px(6), value, 10.5, y=L.y + L.px(16), max_w=w - L.px(10))
            x += w
        p = L.page
        L.down(box_h)
        return p

    L.heading_bar("SECTION A - REQUESTER INFORMATION", accent)
    boxes((("NAME OF EMPLOYEE", requester.plain, 0.5), ("EMPLOYEE NO.", emp_no, 0.22),
           ("DATE OF REQUEST", _fmt_date(date, style), 0.28)))
    boxes((("DEPARTMENT", dept, 0.5), ("TELEPHONE", phone, 0.28), ("COST CENTER", cost_center, 0.22)))
    boxes((("SUPERVISOR", supervisor.plain, 0.5), ("LOCATION", f"{city}, {state}", 0.5)))
    L.down(L.px(12))
    L.heading_bar("SECTION B - REQUEST DETAILS", accent)
    boxes((("PURPOSE OF REQUEST", purpose, 1.0),))
    boxes((("AMOUNT REQUESTED", amount, 0.34), ("ACCOUNT NO.", account, 0.33),
           ("PAYMENT METHOD", rng.choice(("Check", "Direct Deposit", "Wire Transfer")), 0.33)))
    L.down(L.px(10))
    L.text(L.left, "PRIORITY:", 9, bold=True)
    x = L.left + L.px(70)
    cb = L.fs(9)
    for opt in ("Routine", "Urgent", "Rush"):
        L.rect(x, L.y, x + cb, L.y + cb, outline=INK)
        if opt == priority:
            L.line(x + 2, L.y + 2, x + cb - 2, L.y + cb - 2, 2)
            L.line(x + cb - 2, L.y + 2, x + 2, L.y + cb - 2, 2)
        L.text(x + cb + L.px(5), opt, 9)
        x += L.px(90)
    L.down(L.lh(9) + L.px(12))
    L.text(L.left, "Requester's signature:", 9)
    _signature(L, rng, L.left + L.px(130), L.y + L.px(4))
    L.line(L.left + L.px(125), L.y + L.fs(9) + 2, L.left + L.px(330), L.y + L.fs(9) + 2, 1, GREY)
    L.down(L.lh(9) + L.px(10))
    Q += [
        _Cand("What is the name of the employee?", requester.answers_plain, ["form"], p0),
        _Cand("What is the employee number?", [emp_no], ["form"], p0),
        _Cand("What is the date of request?", _date_answers(date, style), ["form"], p0),
        _Cand("Which department is mentioned in the form?", [dept], ["form"], p0),
        _Cand("What is the telephone number given in the form?", phone_ans, ["form"], p0),
        _Cand("What is the cost center?", [cost_center], ["form"], p0),
        _Cand("Who is the supervisor?", supervisor.answers_plain, ["form"], p0),
        _Cand("What is the purpose of the request?", [purpose], ["form"], p0),
        _Cand("What is the amount requested?", _money_answers(amount), ["form"], p0),
        _Cand("What is the account number?", [account], ["form"], p0),
        _Cand("Which priority is checked on the form?", [priority], ["form"], p0),
    ]

    if n_pages >= 2:
        L.new_page()
        L.heading_bar("SECTION C - ITEMIZED DETAILS", accent)
        table = _Table(L, (("Date", 0.22, "left"), ("Description", 0.56, "left"), ("Amount", 0.22, "right")))
        used: set[str] = set()
        total = 0
        day = date - _dt.timedelta(days=rng.randint(10, 40))
        row_cands = []
        for _ in range(rng.randint(3, 8)):
            day += _dt.timedelta(days=rng.randint(0, 3))
            desc = _unique(rng, lambda r: r.choice(("Airfare", "Hotel", "Taxi", "Meals", "Registration fee",
                                                    "Parking", "Car rental", "Supplies", "Postage",
                                                    "Copying", "Telephone", "Mileage")), used)
            cents = rng.randint(800, 90000)
            total += cents
            p = table.row((_fmt_date(day, "us"), desc, _money(cents)))
            row_cands.append(_Cand(f"What is the amount for {desc.lower()}?", _money_answers(_money(cents)),
                                   ["table/list"], p))
        tp = table.row(("", "TOTAL", _money(total)), bold=True)
        table.close()
        Q.append(_Cand("What is the total of the itemized details?", _money_answers(_money(total)),
                       ["table/list"], tp))
        Q.append(rng.choice(row_cands))
        L.down(L.px(18))
        L.heading_bar("SECTION D - APPROVALS", accent)
        L.ensure(L.lh(10) * 5)
        lw = L.px(110)
        ap = L.kv(L.left, "Approved by:", approver.plain, 10, lw)
        L.kv(L.left, "Title:", rng.choice(_JOB_TITLES), 10, lw)
        approved = date + _dt.timedelta(days=rng.randint(1, 14))
        dp = L.kv(L.left, "Date approved:", _fmt_date(approved, style), 10, lw)
        L.down(L.px(6))
        L.text(L.left, "Signature:", 10, bold=True)
        _signature(L, rng, L.left + lw + L.px(4), L.y + L.px(4))
        L.down(L.lh(10) * 2)
        Q += [
            _Cand("Who approved the request?", approver.answers_plain, ["form"], ap),
            _Cand("On what date was the request approved?", _date_answers(approved, style), ["form"], dp),
        ]
    if n_pages == 3:
        L.new_page()
        L.text(L.left, "INSTRUCTIONS", 13, bold=True, color=accent)
        L.down(L.lh(13) + L.px(6))
        for i, t in enumerate(rng.sample(_INSTRUCTIONS, 5)):
            L.paragraph([f"{i + 1}. {t}"], 10)
            L.down(L.px(5))
        L.down(L.px(20))
        L.ensure(L.px(90))
        y0 = L.y
        ctrl = f"{rng.randint(10, 99)}-{rng.randint(100000, 999999)}"
        L.down(L.px(8))
        L.text(L.left + L.px(10), "FOR OFFICE USE ONLY", 9, bold=True)
        L.down(L.lh(9) + L.px(4))
        cp = L.kv(L.left + L.px(10), "Control No.:", ctrl, 10, L.px(100))
        L.kv(L.left + L.px(10), "Received by:", "", 10, L.px(100))
        L.kv(L.left + L.px(10), "Date entered:", "", 10, L.px(100))
        L.rect(L.left, y0, L.left + L.width * 0.6, L.y + L.px(6), outline=GREY)
        L.down(L.px(12))
        Q.append(_Cand("What is the control number?", [ctrl], ["form"], cp))
    return Q


def _hhmm(minutes: int) -> tuple[str, list[str]]:
    h, m = divmod(minutes, 60)
    suffix = "a.m." if h < 12 else "p.m."
    h12 = h % 12 or 12
    printed = f"{h12}:{m:02d} {suffix}"
    return printed, [printed, f"{h12}:{m:02d}"]


def _build_table(rng: random.Random, L: _Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(_ACCENTS)
    company = _company(rng)
    addr, (phone, _) = _address(rng), _phone(rng)
    style = rng.choice(_DATE_STYLES)
    date = _rand_date(rng)
    Q: list[_Cand] = []
    p0 = L.page
    rows: list[tuple[int, list[_Cand]]] = []

    if rng.random() < 0.5:  # price list
        _letterhead(L, company, addr, phone, accent, centered=True)
        title = rng.choice(("PRICE LIST", "SCHEDULE OF PRICES", "CATALOG PRICE LIST"))
        L.down(L.px(6))
        L.text(L.W / 2, title, 16, bold=True, align="center")
        L.down(L.lh(16))
        eff = f"Effective {_fmt_date(date, style)}"
        L.text(L.W / 2, eff, 10, align="center")
        L.down(L.lh(10) + L.px(4))
        L.text(L.W / 2, "All prices in U.S. dollars. F.O.B. shipping point.", 8, color=GREY, align="center")
        L.down(L.lh(8) + L.px(10))
        Q += [
            _Cand("What is the title of the document?", [title, title.title()], ["layout"], p0),
            _Cand("From which date are the prices effective?", _date_answers(date, style), ["layout"], p0),
            _Cand("Which company issued the price list?", [company], ["layout"], p0),
        ]
        table = _Table(L, (("Cat. No.", 0.16, "left"), ("Description", 0.46, "left"), ("Unit", 0.2, "left"),
                           ("Price", 0.18, "right")), header_fill=LIGHT)
        used: set[str] = set()
        prefix = rng.choice(("PL", "CT", "LX", "MS", "HB"))

        def add_row() -> None:
            desc = _unique(rng, lambda r: f"{r.choice(_MATERIALS)} {r.choice(_ITEMS)}", used)
            cat = f"{prefix}-{rng.randint(1000, 9999)}"
            unit = rng.choice(_UNITS)
            price = _money(rng.choice((rng.randint(150, 9900), rng.randint(10000, 250000))))
            p = table.row((cat, desc, unit, price))
            rows.append((p, [
                _Cand(f"What is the price of {desc}?", _money_answers(price), ["table/list"], p),
                _Cand(f"What is the catalog number of {desc}?", [cat], ["table/list"], p),
                _Cand(f"What is the unit for {desc}?", [unit], ["table/list"], p),
            ]))

        if n_pages == 1:
            for _ in range(rng.randint(6, 16)):
                add_row()
        else:
            while L.page < n_pages - 1:
                add_row()
            for _ in range(rng.randint(3, 10)):
                add_row()
        table.close()
        L.down(L.px(10))
        L.ensure(L.lh(8) * 2)
        L.text(L.left, f"Orders: {phone}. Prices subject to change without notice.", 8, color=GREY)
    else:  # meeting schedule: one page per day
        org = f"{rng.choice(_CO_FIRST)} {rng.choice(('Society', 'Association', 'Institute', 'Council'))}"
        event = rng.choice(("Annual Meeting", "Scientific Conference", "Technical Symposium",
                            "Sales Conference"))
        hotel, city = rng.choice(_HOTELS), rng.choice(_CITIES)
        venue = f"{hotel}, {city[0]}, {city[1]}"
        L.text(L.W / 2, org, 12, bold=True, color=accent, align="center")
        L.down(L.lh(12))
        title = f"{date.year} {event}"
        L.text(L.W / 2, title, 16, bold=True, align="center", max_w=L.width)
        L.down(L.lh(16))
        L.text(L.W / 2, "PROGRAM SCHEDULE", 11, bold=True, color=GREY, align="center")
        L.down(L.lh(11) + L.px(2))
        L.text(L.W / 2, venue, 9, align="center", max_w=L.width)
        L.down(L.lh(9))
        L.rule(1, accent, gap=6)
        Q += [
            _Cand("Where is the meeting held?", [venue, hotel], ["layout"], p0),
            _Cand("Which organization's program schedule is this?", [org], ["layout"], p0),
            _Cand("What is the name of the event?", [title, event], ["layout"], p0),
        ]
        used = set()
        for day in range(n_pages):
            if day:
                L.new_page()
            d = date + _dt.timedelta(days=day)
            dp = L.text(L.left, f"Day {day + 1} - {_fmt_date(d, style)}", 11, bold=True, color=accent)
            L.down(L.lh(11) + L.px(4))
            Q.append(_Cand(f"What is the date of day {day + 1}?", _date_answers(d, style), ["table/list"],
                           dp))
            table = _Table(L, (("Time", 0.15, "left"), ("Session", 0.45, "left"), ("Speaker", 0.25, "left"),
                               ("Room", 0.15, "left")))
            t = rng.choice((8 * 60, 8 * 60 + 30, 9 * 60))
            start_page = L.page
            n_rows = rng.randint(5, 9) if n_pages == 1 else 99
            i = 0
            while i < n_rows and t < 17 * 60 + 30 and table.fits_row() and L.page == start_page:
                printed, t_ans = _hhmm(t)
                if i and rng.random() < 0.12:
                    table.row((printed, rng.choice(("Coffee Break", "Lunch", "Break")), "", ""))
                else:
                    session = _unique(rng, lambda r: f"{r.choice(_TOPIC_LEAD)} {r.choice(_TOPICS)}", used)
                    speaker = _person(rng)
                    room = rng.choice(_ROOMS)
                    p = table.row((printed, session, speaker.full, room))
                    rows.append((p, [
                        _Cand(f'Who is the speaker for the session "{session}"?', speaker.answers_full,
                              ["table/list"], p),
                        _Cand(f'At what time does the session "{session}" begin?', t_ans, ["table/list"], p),
                        _Cand(f'In which room is the session "{session}" held?', [room], ["table/list"], p),
                    ]))
                t += rng.choice((20, 30, 30, 45, 60))
                i += 1
            table.close()
    for page in sorted({p for p, _ in rows}):
        Q += rng.choice([c for p, c in rows if p == page])[:2]
    return Q


def _build_receipt(rng: random.Random, L: _Layout) -> list[_Cand]:
    store = f"{rng.choice(_CO_FIRST)} {rng.choice(_STORE_KIND)}"
    addr, (phone, _) = _address(rng), _phone(rng)
    style = rng.choice(("us", "us", "long", "abbr"))
    date = _rand_date(rng)
    tm = f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    rno = f"{rng.randint(1, 99):04d}-{rng.randint(1000, 9999)}"
    cashier = rng.choice(_FIRST_F + _FIRST_M)
    card = f"{rng.randint(0, 9999):04d}"
    Q: list[_Cand] = []
    p0 = L.page

    w = L.px(270)
    x0 = (L.W - w) / 2 + L.px(rng.randint(-60, 60))
    x1 = x0 + w
    pad = L.px(14)
    lx, rx = x0 + pad, x1 - pad
    top = L.y = L.px(rng.randint(40, 160))
    L.down(pad)
    L.text(L.W / 2, store.upper(), 13, bold=True, align="center", max_w=w - 2 * pad)
    L.down(L.lh(13))
    for t in (addr[0], addr[1], phone):
        L.text(L.W / 2, t, 8.5, align="center")
        L.down(L.lh(8.5))
    L.down(L.px(8))
    L.text(lx, f"Date: {_fmt_date(date, style)}", 8.5)
    L.text(rx, f"Time: {tm}", 8.5, align="right")
    L.down(L.lh(8.5))
    L.text(lx, f"Receipt #: {rno}", 8.5)
    L.text(rx, f"Cashier: {cashier}", 8.5, align="right")
    L.down(L.lh(8.5))

    def dashes() -> None:
        L.down(L.px(4))
        x = lx
        while x < rx:
            L.line(x, L.y, min(x + L.px(4), rx), L.y, 1, GREY)
            x += L.px(7)
        L.down(L.px(6))

    dashes()
    items = rng.sample(_GROCERIES, rng.randint(3, 9))
    subtotal = 0
    item_cands = []
    for it in items:
        qty = rng.choice((1, 1, 1, 2, 3))
        unit = rng.randint(79, 1599)
        amt = qty * unit
        subtotal += amt
        L.text(lx, it if qty == 1 else f"{it} x{qty}", 8.5)
        L.text(rx, _money(amt, False), 8.5, align="right")
        L.down(L.lh(8.5))
        q = f"What is the price of {it}?" if qty == 1 else f"What is the amount charged for {it}?"
        item_cands.append(_Cand(q, _money_answers(_money(amt, False)), ["table/list"], p0))
    dashes()
    rate = rng.choice((4.0, 5.5, 6.0, 7.25, 8.25, 8.875))
    tax = int(round(subtotal * rate / 100))
    total = subtotal + tax
    for label, value, bold, size in (("SUBTOTAL", _money(subtotal), False, 8.5),
                                     (f"TAX {rate:g}%", _money(tax), False, 8.5),
                                     ("TOTAL", _money(total), True, 11)):
        L.text(lx, label, size, bold=bold)
        L.text(rx, value, size, bold=bold, align="right")
        L.down(L.lh(size))
    L.down(L.px(4))
    paid_card = rng.random() < 0.6
    if paid_card:
        brand = rng.choice(("VISA", "MASTERCARD", "AMEX"))
        L.text(lx, f"{brand} ************{card}", 8.5)
        L.text(rx, _money(total), 8.5, align="right")
        L.down(L.lh(8.5))
    else:
        tendered = ((total // 2000) + 1) * 2000
        L.text(lx, "CASH", 8.5)
        L.text(rx, _money(tendered), 8.5, align="right")
        L.down(L.lh(8.5))
        L.text(lx, "CHANGE", 8.5)
        L.text(rx, _money(tendered - total), 8.5, align="right")
        L.down(L.lh(8.5))
    dashes()
    L.text(L.W / 2, "THANK YOU FOR SHOPPING WITH US", 8.5, bold=True, align="center")
    L.down(L.lh(8.5))
    L.text(L.W / 2, "Returns accepted within 30 days with receipt", 7, color=GREY, align="center")
    L.down(L.lh(7) + pad)
    # Paper first, so everything above draws on top of it.
    L.pages[-1].insert(0, RectOp(int(x0), int(top), int(x1), int(L.y), (170, 170, 170), (252, 251, 246), 1))

    Q += [
        _Cand("What is the date of the receipt?", _date_answers(date, style), ["form"], p0),
        _Cand("What is the total amount?", _money_answers(_money(total)), ["table/list"], p0),
        _Cand("What is the name of the store?", [store.upper(), store], ["layout"], p0),
        _Cand("What is the receipt number?", [rno], ["form"], p0),
        _Cand("How much tax was charged?", _money_answers(_money(tax)), ["table/list"], p0),
        _Cand("What is the name of the cashier?", [cashier], ["form"], p0),
        _Cand("At what time was the purchase made?", [tm], ["form"], p0),
        _Cand("What is the subtotal?", _money_answers(_money(subtotal)), ["table/list"], p0),
        rng.choice(item_cands),
    ]
    if paid_card:
        Q.append(_Cand("What are the last four digits of the card used?", [card], ["form"], p0))
    return Q


_BUILDERS: dict[str, Callable[[random.Random, _Layout], list[_Cand]]] = {
    "invoice": _build_invoice,
    "letter": _build_letter,
    "form": _build_form,
    "table": _build_table,
    "receipt": _build_receipt,
}


def _select(rng: random.Random, cands: list[_Cand], k: int) -> list[_Cand]:
    """Picks k distinct questions, covering as many pages as possible before repeating a page."""
    order = list(cands)
    rng.shuffle(order)
    chosen: list[_Cand] = []
    seen: set[str] = set()
    covered: set[int] = set()
    for first_pass in (True, False):
        for c in order:
            if len(chosen) == k:
                break
            if c.question in seen or (first_pass and c.page_index in covered):
                continue
            chosen.append(c)
            seen.add(c.question)
            covered.add(c.page_index)
    return chosen


def _doc_id(rng: random.Random, index: int) -> str:
    # DocVQA ids look like "xnbl0037"; the digits are the index, which makes ids unique by construction.
    return "".join(rng.choice("bcdfghjklmnpqrstvwxz") for _ in range(4)) + f"{index:04d}"


def _plan_realistic(rng: random.Random, index: int, kind: str, page_size: tuple[int, int],
                    k: int) -> DocumentPlan:
    doc_id = _doc_id(rng, index)
    L = _Layout(page_size)
    cands = _BUILDERS[kind](rng, L)
    pages = [PagePlan(i + 1, ops) for i, ops in enumerate(_finish(L, rng))]
    return DocumentPlan(doc_id, kind, "realistic", page_size, pages, _select(rng, cands, k))


def _plan_easy(rng: random.Random, index: int, page_size: tuple[int, int]) -> DocumentPlan:
    doc_id = _doc_id(rng, index)
    W, H = page_size
    word = rng.choice(EASY_VOCAB)
    ops: list[Op] = []
    for _ in range(rng.randint(8, 30)):  # specks, like a scanned page
        x, y, s, g = rng.randrange(W), rng.randrange(H), rng.randint(1, 2), rng.randint(120, 200)
        ops.append(RectOp(x, y, min(W - 1, x + s), min(H - 1, y + s), None, (g, g, g), 1))
    small = max(6, round(min(W, H) * 0.045))
    for corner in rng.sample(range(4), rng.randint(1, 3)):
        t = rng.choice(_EASY_DISTRACTORS) + (f" {rng.randint(1, 99)}" if rng.random() < 0.5 else "")
        tw = _text_width(t, small)
        x = 6 if corner in (0, 2) else int(W - 6 - tw)
        y = 5 if corner in (0, 1) else H - small - 8
        ops.append(TextOp(x, y, t, small, False, (130, 130, 130)))
    size = rng.randint(int(min(W, H) * 0.17), int(min(W, H) * 0.23))
    while size > 8 and _text_width(word, size, True) > W * 0.8:
        size -= 1
    bb = _font(size).getbbox(word)
    w, h = bb[2] - bb[0] + 1, bb[3] - bb[1]
    jx, jy = int(W * 0.06), int(H * 0.08)
    x = (W - w) // 2 - bb[0] + rng.randint(-jx, jx)
    x = max(2 - bb[0], min(x, W - 2 - w - bb[0]))
    y = (H - h) // 2 - bb[1] + rng.randint(-jy, jy)
    plate = tuple(max(0, min(255, c + rng.randint(-12, 12))) for c in EASY_COLORS[word])
    padx, pady = max(3, size // 3), max(3, size // 2)
    ops.append(RectOp(max(0, x + bb[0] - padx), max(0, y + bb[1] - pady), min(W - 1, x + bb[2] + padx),
                      min(H - 1, y + bb[3] + pady), None, plate, 0))
    ink = (255, 255, 255) if sum(plate) < 420 else (0, 0, 0)
    ops.append(TextOp(x, y, word, size, rng.random() < 0.5, ink))
    page = PagePlan(1, ops)
    q = QuestionPlan(rng.choice(EASY_QUESTIONS), [word], ["layout"], 0)
    return DocumentPlan(doc_id, "word", "easy", page_size, [page], [q])


def _check_bounds(plan: DocumentPlan) -> None:
    W, H = plan.page_size
    for page in plan.pages:
        for op in page.ops:
            if isinstance(op, TextOp):
                # Advance width and ascent+descent bound the ink (this font has no negative bearings).
                ascent, descent = _font(op.size).getmetrics()
                x1, y1 = op.x + _text_width(op.text, op.size, op.bold), op.y + ascent + descent
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
            f = _font(op.size)
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
    document whatever `questions_per_document` says: all its phrasings ask the same thing.
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
