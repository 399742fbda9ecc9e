"""Page layout for synthetic documents: colours, the built-in font and text measuring, the draw ops
and plan dataclasses that rendering consumes, and `Layout`/`Table`, which flow content down pages
and record the draw ops."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Sequence, Union

from PIL import ImageFont


Color = tuple[int, int, int]
INK: Color = (25, 25, 25)
GREY: Color = (110, 110, 110)
LIGHT: Color = (228, 228, 228)
WHITE: Color = (255, 255, 255)
ACCENTS: tuple[Color, ...] = ((22, 48, 110), (120, 24, 30), (20, 80, 50), (40, 40, 40), (70, 40, 100))


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
# Layout: a cursor that flows content down pages and records draw ops.


@lru_cache(maxsize=None)
def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)  # type: ignore[return-value]


@lru_cache(maxsize=65536)
def _plain_width(text: str, size: int) -> float:
    return font(size).getlength(text)


def text_width(text: str, size: int, bold: bool = False) -> float:
    return _plain_width(text, size) + (1 if bold else 0)


def _line_width(words: Sequence[str], size: int) -> float:
    # FreeType measures are additive across word boundaries for this font (no kerning on spaces),
    # so wrapping sums cached word widths instead of re-measuring every candidate line.
    return sum(_plain_width(w, size) for w in words) + _plain_width(" ", size) * (len(words) - 1)


class Layout:
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
            while f > 6 and text_width(text, f, bold) > max_w:
                f -= 1
        w = text_width(text, f, bold)
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


class Table:
    """A ruled table whose rows flow onto following pages, repeating the header row there."""

    def __init__(self, L: Layout, columns: Sequence[tuple[str, float, str]], size: float = 9,
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


def finish(L: Layout, rng: random.Random) -> list[list[Op]]:
    """Adds footers: "Page i of n" on multi-page documents, and a production number on every page."""
    n = len(L.pages)
    base = _bates(rng)
    for i, ops in enumerate(L.pages):
        f = L.fs(7)
        y = L.H - L.px(34)
        if n > 1:
            t = f"Page {i + 1} of {n}"
            ops.append(TextOp(int(round(L.W / 2 - text_width(t, f) / 2)), y, t, f, False, GREY))
        t = str(base + i)
        ops.append(TextOp(int(round(L.right - text_width(t, f))), y + L.px(12), t, f, False, GREY))
    return L.pages
