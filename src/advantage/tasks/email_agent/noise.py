"""The rest of a real inbox: newsletters, notifications, announcements, vendor marketing and small talk.

None of it carries a planted fact, but it shares the facts' vocabulary (meetings, invoices, orders, flights),
so a search has to be specific to find the right message.
"""

from __future__ import annotations

from collections.abc import Callable

from .mail import Writer, fmt_date, fmt_money, signature
from .people import CITIES

NEWSLETTERS = [
    ("news@supplychaindive.example", "Supply Chain Weekly"),
    ("digest@financeinsider.example", "Finance Insider Digest"),
    ("hello@opsbrief.example", "The Ops Brief"),
]
HEADLINES = [
    "Freight rates fall for the third month", "Why invoices get paid late, and what to do about it",
    "Five ways to run shorter meetings", "Airlines add routes for the summer season",
    "Warehouse automation: a buyer's guide", "The hidden cost of rush orders", "Hotel prices climb in Europe",
    "How finance teams close the books faster", "Supplier risk is back on the agenda",
    "What the new travel rules mean for business trips", "Inventory levels normalise after the holidays",
    "Procurement teams bet on fewer, bigger vendors", "A short history of the purchase order",
]  # fmt: skip
CHAT = [
    ("Lunch today?", "Anyone up for lunch at the Thai place around noon?", ["I'm in!", "Can't today, sorry."]),
    ("Cake in the kitchen", "There's leftover birthday cake in the kitchen, help yourselves.", ["Thank you!"]),
    ("Parking garage closed Friday", "Heads up: the garage is closed on Friday for cleaning.", ["Thanks."]),
    ("Lost charger", "Has anyone seen a white laptop charger in the Atlas room?", ["I think reception has it."]),
    ("Coffee machine", "The coffee machine on 3 is broken again. I've reported it.", ["Noooo.", "Thanks!"]),
    ("Offsite photos", "I uploaded the offsite photos to the shared drive.", ["These are great!"]),
    ("Book club", "Next book club pick is up for vote, reply with your favourite.", ["Count me in."]),
    ("Quick question", "Do you know who handles badge access now?", ["IT does, open a ticket."]),
]  # fmt: skip
NOTIFY = "notifications@{domain}"


def newsletter(w: Writer) -> None:
    addr, name = w.rng.choice(NEWSLETTERS)
    picks = w.rng.sample(HEADLINES, 3)
    body = f"{name}\n\n" + "\n".join(f"* {h}. Read more on our site." for h in picks)
    body += "\n\nYou are receiving this because you subscribed. Unsubscribe any time."
    w.send(addr, [w.owner], f"{name}: {picks[0]}", body, w.business_time())


def notification(w: Writer) -> None:
    rng, sender, when = w.rng, NOTIFY.format(domain=w.company.domain), w.business_time()
    kind = rng.randrange(6)
    if kind == 0:
        subject, body = "Your password expires soon", f"Your password expires in {rng.randint(2, 14)} days."
    elif kind == 1:
        er = f"ER-{rng.randint(1000, 9999)}"
        subject = f"Expense report {er} approved"
        body = (
            f"Expense report {er} for {fmt_money(rng.uniform(20, 900))} was approved and will be reimbursed."
        )
    elif kind == 2:
        who = w.colleague()
        subject = f"{who.name} shared a document with you"
        body = f"{who.name} shared 'Notes {fmt_date(when.date())}' with you. Open it in the document editor."
    elif kind == 3:
        ticket = f"HELP-{rng.randint(100, 9999)}"
        subject, body = f"Ticket {ticket} updated", f"Your IT ticket {ticket} has a new comment from support."
    elif kind == 4:
        who = w.colleague()
        subject, body = (
            f"Reminder: 1:1 with {who.name}",
            f"Reminder: your 1:1 with {who.name} starts in 15 minutes.",
        )
    else:
        city = rng.choice(CITIES)
        subject = f"Price alert: flights to {city}"
        body = f"Fares to {city} dropped this week. Book early to get the best price."
        sender = "alerts@farewatch.example"
    w.send(sender, [w.owner], subject, body + "\n\nThis is an automated message.", when)


def announcement(w: Writer) -> None:
    who = w.colleague()
    topic = w.rng.choice(["All-hands next week", "Benefits enrollment is open", "New expense policy",
                          "Office closed for the holiday", "Welcome our new hires", "Quarterly results"])  # fmt: skip
    body = (
        f"Hi everyone,\n\n{topic}. Details are on the intranet; reach out with any questions.{signature(who)}"
    )
    w.send(who, [f"all@{w.company.domain}"], topic, body, w.business_time())


def marketing(w: Writer) -> None:
    vendor = w.rng.choice(w.company.vendors)
    pct = w.rng.choice([10, 15, 20, 25, 30])
    body = (f"Hello {w.owner.first},\n\nFor a limited time, {vendor.org} customers get {pct}% off their next "
            f"order. Reply to this email to learn more.{signature(vendor)}")  # fmt: skip
    w.send(vendor, [w.owner], f"{vendor.org}: {pct}% off your next order", body, w.business_time())


def chat(w: Writer) -> None:
    subject, text, answers = w.rng.choice(CHAT)
    sender = w.colleague()
    first = w.send(
        sender, w.colleagues(3, sender) + [w.owner], subject, text + signature(sender), w.business_time()
    )
    msg = first
    for answer in answers[: w.rng.randint(0, len(answers))]:
        msg = w.reply(msg, w.colleague(sender), answer, w.later(msg.date, 5, 3))


KINDS: list[tuple[Callable[[Writer], None], float]] = [
    (newsletter, 0.15), (notification, 0.35), (announcement, 0.08), (marketing, 0.12), (chat, 0.30),
]  # fmt: skip


def fill(w: Writer, n_emails: int) -> None:
    """Add noise until the inbox holds at least `n_emails` messages."""
    fns, weights = zip(*KINDS, strict=True)
    while len(w.emails) < n_emails:
        w.rng.choices(fns, weights)[0](w)
