"""Fake-world word lists and the small random value makers that fill synthetic documents: people,
companies, addresses, phone numbers, dates, times and money, each printed form with the DocVQA-style
answer variants a question about it accepts."""

from __future__ import annotations

import datetime as _dt
import random
from dataclasses import dataclass
from typing import Callable, Sequence


# ----------------------------------------------------------------------------------------------
# Fake-world word lists. Small and built in: no external faker package, same output everywhere.

FIRST_F = ("Mary", "Linda", "Susan", "Karen", "Nancy", "Helen", "Carol", "Janet", "Ruth", "Joan",
           "Diane", "Alice", "Judith", "Ellen", "Martha", "Laura", "Anne", "Irene", "Gloria", "Sarah")
FIRST_M = ("James", "Robert", "John", "Michael", "William", "David", "Richard", "Thomas", "Charles",
           "Joseph", "Donald", "Kenneth", "Steven", "Edward", "Brian", "Ronald", "George", "Paul",
           "Frank", "Walter")
_LAST = ("Smith", "Johnson", "Williams", "Brown", "Jones", "Miller", "Davis", "Wilson", "Anderson",
         "Taylor", "Thomas", "Moore", "Martin", "Jackson", "Thompson", "White", "Harris", "Clark",
         "Lewis", "Robinson", "Walker", "Young", "Allen", "King", "Wright", "Scott", "Green",
         "Baker", "Adams", "Nelson", "Hill", "Campbell", "Mitchell", "Roberts", "Carter",
         "Phillips", "Evans", "Turner", "Parker", "Collins", "Edwards", "Stewart", "Morris",
         "Murphy", "Cook", "Rogers", "Morgan", "Cooper", "Peterson", "Reed", "Bailey", "Kelly")
CO_FIRST = ("Northwind", "Bluefield", "Harbor Point", "Meridian", "Crestview", "Summit", "Pinecrest",
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
CITIES = (("Richmond", "VA"), ("Denver", "CO"), ("Portland", "OR"), ("Raleigh", "NC"),
          ("Columbus", "OH"), ("Madison", "WI"), ("Austin", "TX"), ("Albany", "NY"),
          ("Sacramento", "CA"), ("Hartford", "CT"), ("Nashville", "TN"), ("Omaha", "NE"),
          ("Tucson", "AZ"), ("Louisville", "KY"), ("Baltimore", "MD"), ("Atlanta", "GA"),
          ("Boston", "MA"), ("Chicago", "IL"), ("Seattle", "WA"), ("San Francisco", "CA"),
          ("Winston-Salem", "NC"), ("Minneapolis", "MN"), ("St. Louis", "MO"), ("Charlotte", "NC"))
JOB_TITLES = ("Director of Research", "Vice President, Marketing", "Purchasing Manager",
              "Senior Scientist", "Chief Financial Officer", "Project Coordinator",
              "Director of Operations", "Regional Sales Manager", "Associate Director",
              "Laboratory Supervisor", "General Counsel", "Program Manager")
DEPARTMENTS = ("Research & Development", "Accounting", "Marketing", "Purchasing", "Quality Control",
               "Human Resources", "Legal", "Public Affairs", "Engineering", "Sales", "Operations",
               "Scientific Affairs")
MATERIALS = ("Stainless Steel", "Aluminum", "Polyethylene", "Glass", "Copper", "Nylon", "Ceramic",
             "Rubber", "Brass", "Acrylic", "Cotton", "Vinyl")
ITEMS = ("Clamp", "Beaker", "Tubing, 10 ft", "Filter Cartridge", "Storage Bin", "Gasket Set",
         "Sample Vial", "Mounting Bracket", "Valve Assembly", "Shelf Unit", "Cable Reel",
         "Funnel", "Spray Nozzle", "Pressure Gauge", "Hose Fitting", "Tray")
GROCERIES = ("Whole Milk 1 gal", "Wheat Bread", "Large Eggs 12ct", "Bananas", "Coffee 12 oz",
             "Orange Juice", "Cheddar Cheese", "Paper Towels", "Chicken Breast", "Ground Beef",
             "Apples 3 lb", "Pasta 16 oz", "Tomato Sauce", "Butter", "Yogurt", "Rice 5 lb",
             "Dish Soap", "Cereal", "Peanut Butter", "Lettuce")
STORE_KIND = ("Market", "Grocery", "Food Store", "Pharmacy", "Hardware", "General Store")
UNITS = ("Each", "Box of 12", "Case of 24", "Pack of 50", "Dozen", "Roll", "Set", "Pair")
TOPIC_LEAD = ("Advances in", "Update on", "Perspectives on", "New Methods in", "Case Studies in",
              "Regulatory Issues in", "Panel: The Future of", "Workshop on", "Review of",
              "Findings in")
TOPICS = ("Respiratory Research", "Product Testing", "Consumer Surveys", "Quality Assurance",
          "Toxicology", "Market Analysis", "Packaging Design", "Clinical Studies", "Data Systems",
          "Flavor Chemistry", "Public Policy", "Field Trials", "Sensory Evaluation",
          "Supply Planning", "Epidemiology")
ROOMS = ("Ballroom A", "Ballroom B", "Salon 1", "Salon 2", "Room 204", "Room 210", "Auditorium",
         "Board Room", "Garden Room")
HOTELS = ("Hyatt Regency", "Marriott Center", "Hilton Plaza", "Sheraton Hotel", "Radisson Inn",
          "Omni Hotel")
FORM_TITLES = ("EXPENSE REIMBURSEMENT REQUEST", "PURCHASE REQUISITION", "TRAVEL AUTHORIZATION REQUEST",
               "CHECK REQUEST FORM", "MATERIAL REQUEST FORM", "SERVICE REQUEST FORM")
PROJECTS = ("Horizon", "Apex", "Sentinel", "Cobalt", "Northstar", "Keystone", "Vanguard", "Mercury",
            "Trident", "Aurora")
SUBJECTS = ("Proposed research agreement", "Quarterly supply contract", "Annual review meeting",
            "Revised budget for the study", "Request for samples", "Renewal of services",
            "Report on field results", "Invitation to the program committee")
_MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September",
           "October", "November", "December")
DATE_STYLES = ("long", "us", "dmy", "abbr")
FILLER = (
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
TERMS = (
    "All goods remain the property of the seller until payment has been received in full.",
    "Claims for damaged or missing goods must be made within ten days of delivery.",
    "Returned merchandise is subject to a restocking fee and requires prior authorization.",
    "Prices are subject to change without notice; quoted prices are valid for thirty days.",
    "The seller is not liable for delays caused by circumstances beyond its control.",
    "Any dispute arising from this invoice shall be governed by the laws of the seller's state.",
)
INSTRUCTIONS = (
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


def money(cents: int, dollar: bool = True) -> str:
    s = f"{cents // 100:,}.{cents % 100:02d}"
    return "$" + s if dollar else s


def money_answers(printed: str) -> list[str]:
    bare = printed.lstrip("$")
    return _dedupe([printed, bare, bare.replace(",", "")])


def rand_date(rng: random.Random) -> _dt.date:
    lo, hi = _dt.date(1988, 1, 1).toordinal(), _dt.date(2012, 12, 28).toordinal()
    return _dt.date.fromordinal(rng.randint(lo, hi))


def fmt_date(d: _dt.date, style: str) -> str:
    month = _MONTHS[d.month - 1]
    if style == "us":
        return f"{d.month:02d}/{d.day:02d}/{d.year}"
    if style == "dmy":
        return f"{d.day} {month} {d.year}"
    if style == "abbr" and len(month) > 4:
        return f"{month[:3]}. {d.day}, {d.year}"
    return f"{month} {d.day}, {d.year}"


def date_answers(d: _dt.date, style: str) -> list[str]:
    # Printed form first, then the two spellings annotators most often wrote.
    return _dedupe([fmt_date(d, style), fmt_date(d, "long"), fmt_date(d, "us")])


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


def person(rng: random.Random) -> _Person:
    female = rng.random() < 0.5
    first = rng.choice(FIRST_F if female else FIRST_M)
    title = "Dr." if rng.random() < 0.3 else ("Ms." if female else "Mr.")
    middle = rng.choice("ABCDEFGHJKLMNPRSTW") + "." if rng.random() < 0.35 else ""
    return _Person(title, first, middle, rng.choice(_LAST))


def company_name(rng: random.Random, avoid: str = "") -> str:
    while True:
        if rng.random() < 0.3:
            a, b = rng.sample(_LAST, 2)
            name = f"{a} & {b}, Inc."
        else:
            suffix = rng.choice(_CO_SUFFIX)
            name = f"{rng.choice(CO_FIRST)} {rng.choice(_CO_FIELD)}" + (f" {suffix}" if suffix else "")
        if name != avoid:
            return name


def address(rng: random.Random) -> tuple[str, str, str]:
    city, state = rng.choice(CITIES)
    street = f"{rng.randint(10, 9899)} {rng.choice(_STREETS)} {rng.choice(_STREET_KIND)}"
    return street, f"{city}, {state} {rng.randint(10000, 99999)}", city


def phone_number(rng: random.Random) -> tuple[str, list[str]]:
    area, line = rng.randint(201, 989), rng.randint(100, 9999)
    printed = f"({area}) 555-{line:04d}"
    return printed, [printed, f"{area}-555-{line:04d}"]


def unique(rng: random.Random, make: Callable[[random.Random], str], used: set[str]) -> str:
    # Questions name table rows by their text, so row keys must not repeat inside a document.
    for _ in range(200):
        v = make(rng)
        if v not in used:
            used.add(v)
            return v
    raise RuntimeError("synthetic word lists exhausted")  # pragma: no cover - lists are large enough


def hhmm(minutes: int) -> tuple[str, list[str]]:
    h, m = divmod(minutes, 60)
    suffix = "a.m." if h < 12 else "p.m."
    h12 = h % 12 or 12
    printed = f"{h12}:{m:02d} {suffix}"
    return printed, [printed, f"{h12}:{m:02d}"]
