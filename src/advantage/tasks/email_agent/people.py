"""A company, its people (with roles) and its outside contacts, drawn from a seed.

Everything here is a plain record; `make_company(rng)` is the only function with randomness, and it takes
the generator, so the inbox that calls it stays deterministic.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

FIRST = [
    "Alice", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Irene", "Jonas", "Kara", "Liam",
    "Maya", "Nikhil", "Olivia", "Pedro", "Quinn", "Rosa", "Samir", "Tara", "Umar", "Vera", "Wes", "Xenia",
    "Yusuf", "Zoe", "Priya", "Marco", "Hannah", "Tomas", "Leah", "Oscar", "Nadia", "Victor", "Sofia", "Ravi",
    "Ingrid", "Felix", "Chloe", "Mateo", "Aisha", "Daniel", "Emma", "Kenji", "Lucia", "Noah", "Freya", "Omar",
]  # fmt: skip
LAST = [
    "Anderson", "Brooks", "Castillo", "Dubois", "Eriksen", "Fischer", "Garcia", "Hoffman", "Iyer", "Jensen",
    "Kowalski", "Larsen", "Moreau", "Nakamura", "Okafor", "Patel", "Quintero", "Rossi", "Schmidt", "Tanaka",
    "Ueda", "Varga", "Walsh", "Xu", "Yilmaz", "Zimmer", "Bianchi", "Costa", "Novak", "Haddad", "Lindqvist",
    "Mendes", "Oyelaran", "Petrov", "Sato", "Turner", "Weber", "Kim", "Murphy", "Silva",
]  # fmt: skip
ROLES = [
    "CEO", "CFO", "Head of Finance", "Accounts Payable Specialist", "Controller", "VP Sales",
    "Account Executive", "Sales Operations Manager", "Head of Engineering", "Software Engineer",
    "Product Manager", "Designer", "Office Manager", "HR Business Partner", "Recruiter", "Legal Counsel",
    "Procurement Lead", "Operations Manager", "Marketing Manager", "Data Analyst", "Customer Success Lead",
    "IT Administrator", "Executive Assistant", "Travel Coordinator",
]  # fmt: skip
COMPANY_STEMS = [
    "Halcyon", "Brightwater", "Northgate", "Ironwood", "Bluepeak", "Silverline", "Redfern", "Oakridge",
    "Cedarpoint", "Stonebridge", "Clearview", "Harborlight", "Windmere", "Goldcrest", "Pinehurst", "Lakeshore",
]  # fmt: skip
COMPANY_KINDS = ["Energy", "Logistics", "Analytics", "Foods", "Robotics", "Health", "Capital", "Systems"]
VENDORS = [
    "Acme Supplies", "Northwind Traders", "Globex Services", "Initech Consulting", "Umbrella Facilities",
    "Stark Hardware", "Wayne Printing", "Soylent Catering", "Vandelay Imports", "Hooli Cloud",
    "Pied Piper Storage", "Cyberdyne Security", "Tyrell Office Furniture", "Wonka Events", "Gringotts Payroll",
    "Monarch Freight", "Sterling Legal", "Blue Sun Telecom", "Oscorp Labs", "Dunder Paper",
]  # fmt: skip
CITIES = [
    "Denver", "Boston", "Chicago", "Seattle", "Austin", "Toronto", "London", "Berlin", "Madrid", "Lisbon",
    "Dublin", "Amsterdam", "Zurich", "Vienna", "Prague", "Tokyo", "Singapore", "Sydney", "Houston", "Atlanta",
    "Miami", "Phoenix", "Montreal", "Oslo", "Stockholm", "Copenhagen", "Milan", "Paris", "Warsaw", "Helsinki",
]  # fmt: skip
AIRLINES = ["United", "Delta", "Lufthansa", "KLM", "Air Canada", "British Airways", "Iberia", "SAS"]
AIRLINE_CODES = {"United": "UA", "Delta": "DL", "Lufthansa": "LH", "KLM": "KL", "Air Canada": "AC",
                 "British Airways": "BA", "Iberia": "IB", "SAS": "SK"}  # fmt: skip
HOTELS = ["Marriott", "Hilton", "Hyatt Regency", "Radisson Blu", "Novotel", "Sheraton", "Westin", "Kimpton"]


@dataclass(frozen=True)
class Person:
    name: str
    email: str
    role: str
    org: str

    @property
    def first(self) -> str:
        return self.name.split()[0]


@dataclass(frozen=True)
class Company:
    name: str
    domain: str
    owner: Person  # whose inbox this is
    staff: tuple[Person, ...]  # colleagues (the owner excluded)
    vendors: tuple[Person, ...]  # one contact per vendor; `org` is the vendor's name


def _slug(text: str) -> str:
    return "".join(ch for ch in text.lower() if ch.isalnum())


def make_company(rng: random.Random, n_staff: int = 30, n_vendors: int = 10) -> Company:
    """A company with `n_staff` colleagues of distinct names and `n_vendors` vendor contacts."""
    name = f"{rng.choice(COMPANY_STEMS)} {rng.choice(COMPANY_KINDS)}"
    domain = f"{_slug(name)}.com"
    names = rng.sample([f"{f} {la}" for f in FIRST for la in LAST], n_staff + 1 + n_vendors)
    roles = ["Operations Manager", *rng.choices(ROLES, k=n_staff)]  # the owner runs operations

    def person(full: str, role: str, org: str, dom: str) -> Person:
        first, last = full.split()
        return Person(full, f"{first.lower()}.{last.lower()}@{dom}", role, org)

    people = [person(n, r, name, domain) for n, r in zip(names[: n_staff + 1], roles, strict=True)]
    vendor_orgs = rng.sample(VENDORS, n_vendors)
    vendors = [
        person(n, "Account Manager", org, f"{_slug(org)}.com")
        for n, org in zip(names[n_staff + 1 :], vendor_orgs, strict=True)
    ]
    return Company(name, domain, people[0], tuple(people[1:]), tuple(vendors))
