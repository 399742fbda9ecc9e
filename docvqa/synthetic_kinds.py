"""The realistic document kinds (invoice, letter, form, table, receipt): each builder lays out one
document on a `Layout` and returns candidate questions whose answers it drew; `select` picks the
ones a document is asked."""

from __future__ import annotations

import datetime as _dt
import math
import random
from typing import Callable, Sequence

from docvqa.synthetic_layout import (
    ACCENTS, GREY, INK, LIGHT, Color, Layout, PolylineOp, QuestionPlan, RectOp, Table, text_width,
)
from docvqa.synthetic_words import (
    CITIES, CO_FIRST, DATE_STYLES, DEPARTMENTS, FILLER, FIRST_F, FIRST_M, FORM_TITLES, GROCERIES, HOTELS,
    INSTRUCTIONS, ITEMS, JOB_TITLES, MATERIALS, PROJECTS, ROOMS, STORE_KIND, SUBJECTS, TERMS, TOPICS,
    TOPIC_LEAD, UNITS, address, company_name, date_answers, fmt_date, hhmm, money, money_answers, person,
    phone_number, rand_date, unique,
)


# ----------------------------------------------------------------------------------------------
# Document kinds. Each returns the pages' ops and the candidate questions (page known for each).


_Cand = QuestionPlan


def _n_pages(rng: random.Random) -> int:
    return rng.choices((1, 2, 3), weights=(5, 3, 2))[0]


def _letterhead(L: Layout, company: str, addr: tuple[str, str, str], phone: str, accent: Color,
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


def _build_invoice(rng: random.Random, L: Layout) -> list[_Cand]:
    n_pages = min(_n_pages(rng), 3)
    accent = rng.choice(ACCENTS)
    seller = company_name(rng)
    s_addr, (s_phone, _) = address(rng), phone_number(rng)
    buyer, buyer_co, b_addr = person(rng), company_name(rng, avoid=seller), address(rng)
    style = rng.choice(DATE_STYLES)
    issued = rand_date(rng)
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
    fields = (("Invoice No.:", inv_no), ("Invoice Date:", fmt_date(issued, style)),
              ("Due Date:", fmt_date(due, style)), ("Customer ID:", cust), ("P.O. Number:", po),
              ("Terms:", terms))
    lw = max(text_width(f[0], L.fs(9), True) for f in fields) + L.px(10)
    for label, value in fields:
        L.kv(kx, label, value, 9, lw, max_w=L.right - kx - lw)
    L.y = max(L.y, y_left) + L.px(16)
    Q += [
        _Cand("What is the invoice number?", inv_ans, ["form"], p0),
        _Cand("What is the invoice date?", date_answers(issued, style), ["form"], p0),
        _Cand("What is the due date of the invoice?", date_answers(due, style), ["form"], p0),
        _Cand("What is the P.O. number?", [po, po[3:]], ["form"], p0),
        _Cand("What is the customer ID?", [cust], ["form"], p0),
        _Cand("What are the payment terms?", [terms], ["form"], p0),
        _Cand("Which company issued the invoice?", [seller], ["layout"], p0),
        _Cand("To which company is the invoice billed?", [buyer_co], ["layout"], p0),
        _Cand("Who is the invoice addressed to?", buyer.answers_full, ["layout"], p0),
    ]

    table = Table(L, (("Item No.", 0.13, "left"), ("Description", 0.43, "left"), ("Qty", 0.1, "right"),
                      ("Unit Price", 0.17, "right"), ("Amount", 0.17, "right")))
    used: set[str] = set()
    subtotal = 0
    rows: list[tuple[int, str, str, str]] = []  # page, description, qty, amount

    def add_row() -> None:
        nonlocal subtotal
        desc = unique(rng, lambda r: f"{r.choice(MATERIALS)} {r.choice(ITEMS)}", used)
        qty = rng.choice((1, 1, 2, 3, 4, 5, 6, 10, 12, 20, 24, 50))
        unit = rng.randint(150, 60000)
        amount = qty * unit
        subtotal += amount
        page = table.row((f"{rng.randint(1000, 9999)}-{rng.randint(10, 99)}", desc, str(qty),
                          money(unit, False), money(amount, False)))
        rows.append((page, desc, str(qty), money(amount, False)))

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
    tot_lines = [("Subtotal", money(subtotal)), (f"Sales Tax ({tax_rate:g}%)", money(tax)),
                 ("Shipping & Handling", money(shipping))]
    tot_page = L.page
    for label, value in tot_lines:
        L.text(lx, label, 10)
        L.text(vx, value, 10, align="right")
        L.down(L.lh(10))
    L.line(lx, L.y + L.px(2), L.right, L.y + L.px(2), 1)
    L.down(L.px(6))
    L.text(lx, "TOTAL AMOUNT DUE", 11, bold=True)
    L.text(vx, money(total), 11, bold=True, align="right")
    L.down(L.lh(11) + L.px(14))
    L.ensure(L.lh(9) * 2)
    L.text(L.left, "Please include the invoice number with your payment.", 9, max_w=L.width)
    L.down(L.lh(9))
    L.text(L.left, "Thank you for your business!", 9, bold=True)
    L.down(L.lh(9))
    Q += [
        _Cand("What is the total amount due?", money_answers(money(total)), ["table/list"], tot_page),
        _Cand("What is the subtotal?", money_answers(money(subtotal)), ["table/list"], tot_page),
        _Cand("How much is the sales tax?", money_answers(money(tax)), ["table/list"], tot_page),
        _Cand("What is the sales tax rate?", [f"{tax_rate:g}%"], ["table/list"], tot_page),
    ]
    # One row question per page the table spans keeps every page answerable without flooding.
    for page in sorted({r[0] for r in rows}):
        page_rows = [r for r in rows if r[0] == page]
        _, desc, qty, amount = rng.choice(page_rows)
        Q.append(_Cand(f"What is the amount for {desc}?", money_answers(amount), ["table/list"], page))
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
        for i, t in enumerate(rng.sample(TERMS, 4)):
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


def _signature(L: Layout, rng: random.Random, x: float, y: float) -> None:
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


def _build_letter(rng: random.Random, L: Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(ACCENTS)
    company = company_name(rng)
    addr, (phone, _) = address(rng), phone_number(rng)
    to, to_title = person(rng), rng.choice(JOB_TITLES)
    to_co, to_addr = company_name(rng, company), address(rng)
    sender, sender_title = person(rng), rng.choice(JOB_TITLES)
    style = rng.choice(DATE_STYLES)
    date = rand_date(rng)
    subject = rng.choice(SUBJECTS)
    Q: list[_Cand] = []

    p0 = _letterhead(L, company, addr, phone, accent, centered=rng.random() < 0.5)
    L.down(L.px(14))
    L.text(L.left, fmt_date(date, style), 10)
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
        _Cand("What is the date of the letter?", date_answers(date, style), ["layout"], p0),
        _Cand("What is the subject of the letter?", [subject], ["layout"], p0),
        _Cand("Which company is the letter from?", [company], ["layout"], p0),
        _Cand(f"What is the designation of {to.full}?", [to_title], ["layout"], p0),
        _Cand("To which company is the letter addressed?", [to_co], ["layout"], p0),
    ]

    city = rng.choice(CITIES)[0]
    meet = rand_date(rng)
    budget = money(rng.randint(20, 900) * 12500)
    project = rng.choice(PROJECTS)
    ref = f"{rng.choice('ABCDKRST')}{rng.randint(100, 999)}-{rng.randint(10, 99)}"
    people = str(rng.randint(12, 240))
    fact_paras: list[tuple[list[str | tuple[str, str]], _Cand]] = [
        (["As discussed, the next meeting of the working group will be held in ", (city, "city"),
          f" on {fmt_date(meet, 'long')}. Please confirm your attendance at your earliest convenience."],
         _Cand("In which city will the meeting be held?", [city], ["free_text"], 0)),
        (["The proposed budget for the ", (f"{project} project", "project"), " is ", (budget, "budget"),
          ", which covers personnel, materials and travel for the coming year."],
         _Cand(f"What is the proposed budget for the {project} project?", money_answers(budget),
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
    fillers = list(FILLER)
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
    cc = person(rng)
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


def _build_form(rng: random.Random, L: Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(ACCENTS)
    company = company_name(rng)
    title = rng.choice(FORM_TITLES)
    requester, supervisor, approver = person(rng), person(rng), person(rng)
    style = rng.choice(DATE_STYLES)
    date = rand_date(rng)
    emp_no = f"{rng.randint(10000, 99999)}"
    dept = rng.choice(DEPARTMENTS)
    phone, phone_ans = phone_number(rng)
    city, state = rng.choice(CITIES)
    cost_center = f"{rng.randint(1000, 9999)}"
    account = f"{rng.randint(100, 999)}-{rng.randint(1000, 9999)}-{rng.randint(10, 99)}"
    amount = money(rng.randint(50, 25000) * 100 + rng.choice((0, 0, 50, 25, 99)))
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
           ("DATE OF REQUEST", fmt_date(date, style), 0.28)))
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
        _Cand("What is the date of request?", date_answers(date, style), ["form"], p0),
        _Cand("Which department is mentioned in the form?", [dept], ["form"], p0),
        _Cand("What is the telephone number given in the form?", phone_ans, ["form"], p0),
        _Cand("What is the cost center?", [cost_center], ["form"], p0),
        _Cand("Who is the supervisor?", supervisor.answers_plain, ["form"], p0),
        _Cand("What is the purpose of the request?", [purpose], ["form"], p0),
        _Cand("What is the amount requested?", money_answers(amount), ["form"], p0),
        _Cand("What is the account number?", [account], ["form"], p0),
        _Cand("Which priority is checked on the form?", [priority], ["form"], p0),
    ]

    if n_pages >= 2:
        L.new_page()
        L.heading_bar("SECTION C - ITEMIZED DETAILS", accent)
        table = Table(L, (("Date", 0.22, "left"), ("Description", 0.56, "left"), ("Amount", 0.22, "right")))
        used: set[str] = set()
        total = 0
        day = date - _dt.timedelta(days=rng.randint(10, 40))
        row_cands = []
        for _ in range(rng.randint(3, 8)):
            day += _dt.timedelta(days=rng.randint(0, 3))
            desc = unique(rng, lambda r: r.choice(("Airfare", "Hotel", "Taxi", "Meals", "Registration fee",
                                                   "Parking", "Car rental", "Supplies", "Postage",
                                                   "Copying", "Telephone", "Mileage")), used)
            cents = rng.randint(800, 90000)
            total += cents
            p = table.row((fmt_date(day, "us"), desc, money(cents)))
            row_cands.append(_Cand(f"What is the amount for {desc.lower()}?", money_answers(money(cents)),
                                   ["table/list"], p))
        tp = table.row(("", "TOTAL", money(total)), bold=True)
        table.close()
        Q.append(_Cand("What is the total of the itemized details?", money_answers(money(total)),
                       ["table/list"], tp))
        Q.append(rng.choice(row_cands))
        L.down(L.px(18))
        L.heading_bar("SECTION D - APPROVALS", accent)
        L.ensure(L.lh(10) * 5)
        lw = L.px(110)
        ap = L.kv(L.left, "Approved by:", approver.plain, 10, lw)
        L.kv(L.left, "Title:", rng.choice(JOB_TITLES), 10, lw)
        approved = date + _dt.timedelta(days=rng.randint(1, 14))
        dp = L.kv(L.left, "Date approved:", fmt_date(approved, style), 10, lw)
        L.down(L.px(6))
        L.text(L.left, "Signature:", 10, bold=True)
        _signature(L, rng, L.left + lw + L.px(4), L.y + L.px(4))
        L.down(L.lh(10) * 2)
        Q += [
            _Cand("Who approved the request?", approver.answers_plain, ["form"], ap),
            _Cand("On what date was the request approved?", date_answers(approved, style), ["form"], dp),
        ]
    if n_pages == 3:
        L.new_page()
        L.text(L.left, "INSTRUCTIONS", 13, bold=True, color=accent)
        L.down(L.lh(13) + L.px(6))
        for i, t in enumerate(rng.sample(INSTRUCTIONS, 5)):
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


def _build_table(rng: random.Random, L: Layout) -> list[_Cand]:
    n_pages = _n_pages(rng)
    accent = rng.choice(ACCENTS)
    company = company_name(rng)
    addr, (phone, _) = address(rng), phone_number(rng)
    style = rng.choice(DATE_STYLES)
    date = rand_date(rng)
    Q: list[_Cand] = []
    p0 = L.page
    rows: list[tuple[int, list[_Cand]]] = []

    if rng.random() < 0.5:  # price list
        _letterhead(L, company, addr, phone, accent, centered=True)
        title = rng.choice(("PRICE LIST", "SCHEDULE OF PRICES", "CATALOG PRICE LIST"))
        L.down(L.px(6))
        L.text(L.W / 2, title, 16, bold=True, align="center")
        L.down(L.lh(16))
        eff = f"Effective {fmt_date(date, style)}"
        L.text(L.W / 2, eff, 10, align="center")
        L.down(L.lh(10) + L.px(4))
        L.text(L.W / 2, "All prices in U.S. dollars. F.O.B. shipping point.", 8, color=GREY, align="center")
        L.down(L.lh(8) + L.px(10))
        Q += [
            _Cand("What is the title of the document?", [title, title.title()], ["layout"], p0),
            _Cand("From which date are the prices effective?", date_answers(date, style), ["layout"], p0),
            _Cand("Which company issued the price list?", [company], ["layout"], p0),
        ]
        table = Table(L, (("Cat. No.", 0.16, "left"), ("Description", 0.46, "left"), ("Unit", 0.2, "left"),
                          ("Price", 0.18, "right")), header_fill=LIGHT)
        used: set[str] = set()
        prefix = rng.choice(("PL", "CT", "LX", "MS", "HB"))

        def add_row() -> None:
            desc = unique(rng, lambda r: f"{r.choice(MATERIALS)} {r.choice(ITEMS)}", used)
            cat = f"{prefix}-{rng.randint(1000, 9999)}"
            unit = rng.choice(UNITS)
            price = money(rng.choice((rng.randint(150, 9900), rng.randint(10000, 250000))))
            p = table.row((cat, desc, unit, price))
            rows.append((p, [
                _Cand(f"What is the price of {desc}?", money_answers(price), ["table/list"], p),
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
        org = f"{rng.choice(CO_FIRST)} {rng.choice(('Society', 'Association', 'Institute', 'Council'))}"
        event = rng.choice(("Annual Meeting", "Scientific Conference", "Technical Symposium",
                            "Sales Conference"))
        hotel, city = rng.choice(HOTELS), rng.choice(CITIES)
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
            dp = L.text(L.left, f"Day {day + 1} - {fmt_date(d, style)}", 11, bold=True, color=accent)
            L.down(L.lh(11) + L.px(4))
            Q.append(_Cand(f"What is the date of day {day + 1}?", date_answers(d, style), ["table/list"],
                           dp))
            table = Table(L, (("Time", 0.15, "left"), ("Session", 0.45, "left"), ("Speaker", 0.25, "left"),
                              ("Room", 0.15, "left")))
            t = rng.choice((8 * 60, 8 * 60 + 30, 9 * 60))
            start_page = L.page
            n_rows = rng.randint(5, 9) if n_pages == 1 else 99
            i = 0
            while i < n_rows and t < 17 * 60 + 30 and table.fits_row() and L.page == start_page:
                printed, t_ans = hhmm(t)
                if i and rng.random() < 0.12:
                    table.row((printed, rng.choice(("Coffee Break", "Lunch", "Break")), "", ""))
                else:
                    session = unique(rng, lambda r: f"{r.choice(TOPIC_LEAD)} {r.choice(TOPICS)}", used)
                    speaker = person(rng)
                    room = rng.choice(ROOMS)
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


def _build_receipt(rng: random.Random, L: Layout) -> list[_Cand]:
    store = f"{rng.choice(CO_FIRST)} {rng.choice(STORE_KIND)}"
    addr, (phone, _) = address(rng), phone_number(rng)
    style = rng.choice(("us", "us", "long", "abbr"))
    date = rand_date(rng)
    tm = f"{rng.randint(7, 21):02d}:{rng.randint(0, 59):02d}"
    rno = f"{rng.randint(1, 99):04d}-{rng.randint(1000, 9999)}"
    cashier = rng.choice(FIRST_F + FIRST_M)
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
    L.text(lx, f"Date: {fmt_date(date, style)}", 8.5)
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
    items = rng.sample(GROCERIES, rng.randint(3, 9))
    subtotal = 0
    item_cands = []
    for it in items:
        qty = rng.choice((1, 1, 1, 2, 3))
        unit = rng.randint(79, 1599)
        amt = qty * unit
        subtotal += amt
        L.text(lx, it if qty == 1 else f"{it} x{qty}", 8.5)
        L.text(rx, money(amt, False), 8.5, align="right")
        L.down(L.lh(8.5))
        q = f"What is the price of {it}?" if qty == 1 else f"What is the amount charged for {it}?"
        item_cands.append(_Cand(q, money_answers(money(amt, False)), ["table/list"], p0))
    dashes()
    rate = rng.choice((4.0, 5.5, 6.0, 7.25, 8.25, 8.875))
    tax = int(round(subtotal * rate / 100))
    total = subtotal + tax
    for label, value, bold, size in (("SUBTOTAL", money(subtotal), False, 8.5),
                                     (f"TAX {rate:g}%", money(tax), False, 8.5),
                                     ("TOTAL", money(total), True, 11)):
        L.text(lx, label, size, bold=bold)
        L.text(rx, value, size, bold=bold, align="right")
        L.down(L.lh(size))
    L.down(L.px(4))
    paid_card = rng.random() < 0.6
    if paid_card:
        brand = rng.choice(("VISA", "MASTERCARD", "AMEX"))
        L.text(lx, f"{brand} ************{card}", 8.5)
        L.text(rx, money(total), 8.5, align="right")
        L.down(L.lh(8.5))
    else:
        tendered = ((total // 2000) + 1) * 2000
        L.text(lx, "CASH", 8.5)
        L.text(rx, money(tendered), 8.5, align="right")
        L.down(L.lh(8.5))
        L.text(lx, "CHANGE", 8.5)
        L.text(rx, money(tendered - total), 8.5, align="right")
        L.down(L.lh(8.5))
    dashes()
    L.text(L.W / 2, "THANK YOU FOR SHOPPING WITH US", 8.5, bold=True, align="center")
    L.down(L.lh(8.5))
    L.text(L.W / 2, "Returns accepted within 30 days with receipt", 7, color=GREY, align="center")
    L.down(L.lh(7) + pad)
    # Paper first, so everything above draws on top of it.
    L.pages[-1].insert(0, RectOp(int(x0), int(top), int(x1), int(L.y), (170, 170, 170), (252, 251, 246), 1))

    Q += [
        _Cand("What is the date of the receipt?", date_answers(date, style), ["form"], p0),
        _Cand("What is the total amount?", money_answers(money(total)), ["table/list"], p0),
        _Cand("What is the name of the store?", [store.upper(), store], ["layout"], p0),
        _Cand("What is the receipt number?", [rno], ["form"], p0),
        _Cand("How much tax was charged?", money_answers(money(tax)), ["table/list"], p0),
        _Cand("What is the name of the cashier?", [cashier], ["form"], p0),
        _Cand("At what time was the purchase made?", [tm], ["form"], p0),
        _Cand("What is the subtotal?", money_answers(money(subtotal)), ["table/list"], p0),
        rng.choice(item_cands),
    ]
    if paid_card:
        Q.append(_Cand("What are the last four digits of the card used?", [card], ["form"], p0))
    return Q


BUILDERS: dict[str, Callable[[random.Random, Layout], list[_Cand]]] = {
    "invoice": _build_invoice,
    "letter": _build_letter,
    "form": _build_form,
    "table": _build_table,
    "receipt": _build_receipt,
}


def select(rng: random.Random, cands: list[_Cand], k: int) -> list[_Cand]:
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
