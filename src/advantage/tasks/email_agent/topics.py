"""Threads that carry facts: meetings, invoices, travel, deadlines and orders. Each generator writes its
emails through the `Writer` and returns the `Fact`s (questions) it planted, unanswerable ones included.

The wording of a question reuses the words of the email that answers it ("confirmation code", "tracking
number", the meeting's topic), as a person asking about their own inbox would; that is what lets a keyword
search find the source (tested: >= 90% of answerable questions).
"""

from __future__ import annotations

import datetime as dt
import string

from .mail import END, START, Fact, Writer, fmt_date, fmt_money, fmt_time, signature
from .people import AIRLINE_CODES, AIRLINES, CITIES, HOTELS

MEETING_TOPICS = [
    "Q3 budget review", "vendor onboarding", "hiring plan", "warehouse audit", "pricing committee",
    "data migration kickoff", "quarterly business review", "security training", "office move planning",
    "customer renewal strategy", "product roadmap", "insurance renewal", "board deck preparation",
    "supplier scorecard", "fleet maintenance", "inventory reconciliation", "annual kickoff",
    "compliance checklist", "payroll system cutover", "marketing launch", "website redesign",
    "contract negotiation prep", "partner summit", "safety inspection", "capacity planning",
    "sales forecast", "procurement policy", "holiday party planning", "tax filing prep", "facilities review",
    "cloud cost review", "logistics retro", "training curriculum", "customer advisory board",
]  # fmt: skip
ROOMS = ["Atlas", "Borealis", "Cascade", "Delta", "Everest", "Fjord", "Granite", "Horizon", "Juniper",
         "Kestrel", "Lumen", "Meridian", "Nimbus", "Orchid", "Summit", "Tundra"]  # fmt: skip
SERVICES = ["office supplies", "cleaning services", "cloud hosting", "freight handling", "consulting hours",
            "printing", "catering", "security monitoring", "equipment lease", "telecom services"]  # fmt: skip
DELIVERABLES = [
    "headcount forecast", "expense report", "vendor security questionnaire", "Q2 sales summary",
    "inventory count sheet", "travel policy draft", "customer survey results", "audit evidence pack",
    "budget variance analysis", "training attendance list", "insurance certificate", "capex request",
    "shipping cost breakdown", "onboarding checklist", "risk register update", "marketing brief",
]  # fmt: skip
ITEMS = ["laptops", "monitors", "office chairs", "standing desks", "pallets of printer paper", "headsets",
         "label printers", "safety vests", "forklift batteries", "webcams", "docking stations", "whiteboards",
         "shipping scanners", "toner cartridges", "conference phones", "hand trucks", "storage racks",
         "first aid kits", "desk lamps", "keyboards"]  # fmt: skip
CARRIERS = ["UPS", "FedEx", "DHL", "USPS"]
MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December"]  # fmt: skip


def _code(w: Writer, n: int, alphabet: str = string.ascii_uppercase + string.digits) -> str:
    return "".join(w.rng.choice(alphabet) for _ in range(n))


def _meeting_time(w: Writer) -> tuple[int, int]:
    return w.rng.randint(8, 16), w.rng.choice([0, 15, 30, 45])


def meetings(w: Writer, n: int = 28) -> list[Fact]:
    """Invites with a room and a time; a third get moved in a reply (a question that needs the thread)."""
    topics = w.rng.sample(MEETING_TOPICS, n + 3)
    facts: list[Fact] = []
    for topic in topics[:n]:
        organizer = w.colleague()
        others = w.colleagues(3, organizer)
        sent = w.business_time(START, END - dt.timedelta(days=10))
        day = (sent + dt.timedelta(days=w.rng.randint(2, 9))).date()
        room, (h, m) = w.rng.choice(ROOMS), _meeting_time(w)
        invite = w.send(
            organizer, [w.owner, *others[:2]], f"{topic.capitalize()} meeting",
            f"Hi all,\n\nI'd like to set up the {topic} meeting on {fmt_date(day)} at {fmt_time(h, m)} in the "
            f"{room} room. Please bring your notes; the agenda will follow.{signature(organizer)}",
            sent, cc=[others[2]],
        )  # fmt: skip
        facts.append(
            Fact(f"Which room is the {topic} meeting in?", room, "text", (invite.message_id,), "search")
        )
        if w.rng.random() < 0.35:
            ask = w.reply(invite, others[0], f"I have a conflict at {fmt_time(h, m)}. Could we move it?")
            h2, m2 = _meeting_time(w)
            while (h2, m2) == (h, m):
                h2, m2 = _meeting_time(w)
            moved = w.reply(
                ask, organizer,
                f"No problem. I've moved the {topic} meeting to {fmt_time(h2, m2)} on {fmt_date(day)}. "
                "Same room.",
            )  # fmt: skip
            facts.append(
                Fact(
                    f"What time was the {topic} meeting moved to?",
                    fmt_time(h2, m2),
                    "time",
                    (moved.message_id,),
                    "thread",
                )  # fmt: skip
            )
        else:
            if w.rng.random() < 0.5:
                w.reply(invite, others[1], "Works for me, see you there.")
            facts.append(
                Fact(
                    f"What time is the {topic} meeting?",
                    fmt_time(h, m),
                    "time",
                    (invite.message_id,),
                    "search",
                )
            )
    for topic in topics[n:]:  # topics this inbox never mentions
        facts.append(Fact(f"Which room is the {topic} meeting in?", None, "text", (), "unanswerable"))
    return facts


def invoices(w: Writer, n_vendors: int = 6) -> list[Fact]:
    """Monthly invoices from a few vendors (the same vendor every month: a question names the month and
    needs a date filter), some forwarded to accounts payable."""
    facts: list[Fact] = []
    used: set[str] = set()
    ap = w.colleague()
    for vendor in w.rng.sample(list(w.company.vendors), n_vendors):
        service = w.rng.choice(SERVICES)
        for month in sorted(w.rng.sample(range(1, 13), w.rng.randint(7, 11))):
            sent = w.business_time(dt.datetime(2024, month, 1), dt.datetime(2024, month, 26))
            inv = f"INV-{w.rng.randint(10000, 99999)}"
            used.add(inv)
            amount = round(w.rng.uniform(150, 25000), 2)
            due = (sent + dt.timedelta(days=30)).date()
            msg = w.send(
                vendor, [w.owner], f"{vendor.org} invoice {inv}",
                f"Hello {w.owner.first},\n\nPlease find attached invoice {inv} from {vendor.org} for "
                f"{service}.\n\nAmount due: {fmt_money(amount)}\nPayment due "
                f"date: {fmt_date(due)}\n\nThank you for your business.{signature(vendor)}",
                sent,
            )  # fmt: skip
            if w.rng.random() < 0.3:
                w.forward(msg, w.owner, [ap], "Can you process this one this week?")
            roll = w.rng.random()
            if roll < 0.4:
                q = f"What is the amount due on invoice {inv}?"
                facts.append(Fact(q, fmt_money(amount), "money", (msg.message_id,), "search"))
            elif roll < 0.6:
                q = f"When is payment for invoice {inv} due?"
                facts.append(Fact(q, fmt_date(due), "date", (msg.message_id,), "search"))
            else:
                q = f"What was the amount due on the {vendor.org} invoice I received in {MONTHS[month - 1]} {sent.year}?"
                nxt = dt.date(2024 + month // 12, month % 12 + 1, 1)
                filters = {"from_addr": vendor.email, "sent_after": f"2024-{month:02d}-01",
                           "sent_before": nxt.isoformat()}  # fmt: skip
                facts.append(Fact(q, fmt_money(amount), "money", (msg.message_id,), "date_filter", filters))
    for _ in range(4):
        inv = f"INV-{w.rng.randint(10000, 99999)}"
        if inv not in used:
            q = f"What is the amount due on invoice {inv}?"
            facts.append(Fact(q, None, "money", (), "unanswerable"))
    return facts


def travel(w: Writer, n: int = 12) -> list[Fact]:
    """Booking confirmations from the travel coordinator, sometimes forwarded; some flights change later."""
    coordinator = next((p for p in w.company.staff if p.role == "Travel Coordinator"), w.colleague())
    cities = w.rng.sample(CITIES, n + 3)
    facts: list[Fact] = []
    for city in cities[:n]:
        sent = w.business_time(START, END - dt.timedelta(days=20))
        dep = (sent + dt.timedelta(days=w.rng.randint(5, 18))).date()
        airline = w.rng.choice(AIRLINES)
        flight = f"{AIRLINE_CODES[airline]} {w.rng.randint(100, 2999)}"
        h, m = w.rng.randint(6, 20), w.rng.choice(range(0, 60, 5))
        conf, hotel = _code(w, 6), w.rng.choice(HOTELS)
        msg = w.send(
            coordinator, [w.owner], f"Trip to {city}: booking confirmation",
            f"Hi {w.owner.first},\n\nYour trip to {city} is booked.\n\nFlight number: {flight} ({airline}), "
            f"{fmt_date(dep)}. The flight departs at {fmt_time(h, m)}.\nConfirmation code: {conf}\nHotel: "
            f"{hotel} {city}, {w.rng.randint(1, 4)} nights from {fmt_date(dep)}.\n\nSafe travels!"
            f"{signature(coordinator)}",
            sent,
        )  # fmt: skip
        if w.rng.random() < 0.3:
            w.forward(msg, w.owner, [w.colleague(coordinator)], f"FYI, my {city} travel details.")
        facts.append(
            Fact(
                f"What is the confirmation code for my trip to {city}?",
                conf,
                "text",
                (msg.message_id,),
                "search",
            )
        )
        facts.append(
            Fact(f"Which hotel is booked for my trip to {city}?", hotel, "text", (msg.message_id,), "search")
        )
        if w.rng.random() < 0.3:
            h2, m2 = (h + w.rng.randint(1, 3)) % 24, w.rng.choice(range(0, 60, 5))
            change = w.reply(
                msg, coordinator,
                f"Schedule change: the airline changed your flight to {city}. It now departs at {fmt_time(h2, m2)} on the "
                "same day; everything else is unchanged.", reply_all=False,
            )  # fmt: skip
            q = f"After the schedule change, what time does my flight to {city} depart?"
            facts.append(Fact(q, fmt_time(h2, m2), "time", (change.message_id,), "thread"))
        else:
            q = f"What time does my flight to {city} depart?"
            facts.append(Fact(q, fmt_time(h, m), "time", (msg.message_id,), "search"))
    for city in cities[n:]:
        facts.append(
            Fact(f"What is the confirmation code for my trip to {city}?", None, "text", (), "unanswerable")
        )
    return facts


def deadlines(w: Writer, n: int = 14) -> list[Fact]:
    """Colleagues asking for deliverables by a date; some deliverables are asked for by two people, so the
    question names the person (a sender filter)."""
    facts: list[Fact] = []
    for deliverable in w.rng.sample(DELIVERABLES, n):
        askers = w.colleagues(2 if w.rng.random() < 0.4 else 1)
        for asker in askers:
            sent = w.business_time(START, END - dt.timedelta(days=15))
            due = (sent + dt.timedelta(days=w.rng.randint(3, 14))).date()
            msg = w.send(
                asker, [w.owner], f"Request: {deliverable}",
                f"Hi {w.owner.first},\n\nCould you send me the {deliverable} by {fmt_date(due)}? I need it "
                f"for the {w.rng.choice(MEETING_TOPICS)} discussion.\n\nThanks!{signature(asker)}",
                sent,
            )  # fmt: skip
            if len(askers) == 1:
                q = f"When do I have to send the {deliverable} by?"
                facts.append(Fact(q, fmt_date(due), "date", (msg.message_id,), "search"))
            else:
                q = f"By what date does {asker.name} want the {deliverable}?"
                facts.append(
                    Fact(
                        q,
                        fmt_date(due),
                        "date",
                        (msg.message_id,),
                        "sender_filter",
                        {"from_addr": asker.email},
                    )
                )
    return facts


def orders(w: Writer, n: int = 14) -> list[Fact]:
    """Order confirmations from vendors, each answered later in its thread by a shipping notice."""
    items = w.rng.sample(ITEMS, n + 2)
    facts: list[Fact] = []
    for item in items[:n]:
        vendor = w.rng.choice(w.company.vendors)
        sent = w.business_time(START, END - dt.timedelta(days=10))
        po, qty = f"PO-{w.rng.randint(1000, 9999)}", w.rng.randint(2, 60)
        total = round(qty * w.rng.uniform(15, 900), 2)
        confirm = w.send(
            vendor, [w.owner], f"Order confirmation {po}",
            f"Hello {w.owner.first},\n\nThank you for your order {po} with {vendor.org}: {qty} {item}.\nOrder "
            f"total: {fmt_money(total)}\nExpected delivery: {fmt_date((sent + dt.timedelta(days=7)).date())}"
            f"{signature(vendor)}",
            sent,
        )  # fmt: skip
        carrier, tracking = (
            w.rng.choice(CARRIERS),
            _code(w, 2, string.ascii_uppercase) + _code(w, 10, string.digits),
        )
        shipped = w.reply(
            confirm, vendor, f"Good news: your order {po} has shipped with {carrier}. Tracking number: {tracking}",
            w.later(sent, 24 * 60, 96), reply_all=False,
        )  # fmt: skip
        facts.append(
            Fact(
                f"How many {item} did I order from {vendor.org}?",
                str(qty),
                "number",
                (confirm.message_id,),
                "search",
            )
        )
        facts.append(Fact(f"What is the tracking number for my {item} order?", tracking, "text",
                          (shipped.message_id,), "thread"))  # fmt: skip
        if w.rng.random() < 0.5:
            facts.append(Fact(f"What was the order total for {po}?", fmt_money(total), "money",
                              (confirm.message_id,), "search"))  # fmt: skip
    for item in items[n:]:
        facts.append(
            Fact(f"What is the tracking number for my {item} order?", None, "text", (), "unanswerable")
        )
    return facts


TOPICS = (meetings, invoices, travel, deadlines, orders)
