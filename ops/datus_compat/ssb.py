"""A small Star Schema Benchmark database in SQLite, for Datus-agent's model tests.

Datus's tests point the ``ssb_sqlite`` namespace at ``tests/data/SSB.db``, a file its source
snapshot ships empty. This builds the five SSB tables (``customer``, ``supplier``, ``part``,
``date``, ``lineorder``) with the benchmark's column names and a few thousand deterministic
rows: enough that every query the tests ask for (revenue by region, by year, discounts,
top customers) returns rows, small enough to build in well under a second.

    python ops/datus_compat/ssb.py PATH      # (re)creates PATH
"""

from __future__ import annotations

import datetime as dt
import random
import sqlite3
import sys
from pathlib import Path

__all__ = ["build_ssb"]

_REGIONS = {
    "AMERICA": ["UNITED STATES", "CANADA", "BRAZIL", "ARGENTINA", "PERU"],
    "ASIA": ["CHINA", "JAPAN", "INDIA", "VIETNAM", "INDONESIA"],
    "EUROPE": ["GERMANY", "FRANCE", "UNITED KINGDOM", "RUSSIA", "ROMANIA"],
    "AFRICA": ["ALGERIA", "ETHIOPIA", "KENYA", "MOROCCO", "MOZAMBIQUE"],
    "MIDDLE EAST": ["EGYPT", "IRAN", "IRAQ", "JORDAN", "SAUDI ARABIA"],
}
_SEGMENTS = ["AUTOMOBILE", "BUILDING", "FURNITURE", "HOUSEHOLD", "MACHINERY"]
_PRIORITIES = ["1-URGENT", "2-HIGH", "3-MEDIUM", "4-NOT SPECI", "5-LOW"]
_SHIPMODES = ["AIR", "FOB", "MAIL", "RAIL", "REG AIR", "SHIP", "TRUCK"]
_COLORS = ["almond", "blue", "coral", "forest", "ivory", "khaki", "lime", "navy", "plum", "tan"]
_CONTAINERS = ["SM CASE", "SM BOX", "MED BAG", "MED PACK", "LG CASE", "LG DRUM", "JUMBO PKG", "WRAP JAR"]
_TYPES = ["ECONOMY ANODIZED STEEL", "STANDARD POLISHED BRASS", "PROMO BURNISHED COPPER",
          "LARGE BRUSHED TIN", "MEDIUM PLATED NICKEL", "SMALL ANODIZED STEEL"]
_SEASONS = {12: "Christmas", 1: "Winter", 2: "Winter", 6: "Summer", 7: "Summer", 8: "Summer", 9: "Fall",
            10: "Fall", 11: "Fall", 3: "Spring", 4: "Spring", 5: "Spring"}

_SCHEMA = """
CREATE TABLE customer (
    c_custkey INTEGER PRIMARY KEY, c_name TEXT NOT NULL, c_address TEXT NOT NULL, c_city TEXT NOT NULL,
    c_nation TEXT NOT NULL, c_region TEXT NOT NULL, c_phone TEXT NOT NULL, c_mktsegment TEXT NOT NULL
);
CREATE TABLE supplier (
    s_suppkey INTEGER PRIMARY KEY, s_name TEXT NOT NULL, s_address TEXT NOT NULL, s_city TEXT NOT NULL,
    s_nation TEXT NOT NULL, s_region TEXT NOT NULL, s_phone TEXT NOT NULL
);
CREATE TABLE part (
    p_partkey INTEGER PRIMARY KEY, p_name TEXT NOT NULL, p_mfgr TEXT NOT NULL, p_category TEXT NOT NULL,
    p_brand1 TEXT NOT NULL, p_color TEXT NOT NULL, p_type TEXT NOT NULL, p_size INTEGER NOT NULL,
    p_container TEXT NOT NULL
);
CREATE TABLE date (
    d_datekey INTEGER PRIMARY KEY, d_date TEXT NOT NULL, d_dayofweek TEXT NOT NULL, d_month TEXT NOT NULL,
    d_year INTEGER NOT NULL, d_yearmonthnum INTEGER NOT NULL, d_yearmonth TEXT NOT NULL,
    d_daynuminweek INTEGER NOT NULL, d_daynuminmonth INTEGER NOT NULL, d_daynuminyear INTEGER NOT NULL,
    d_monthnuminyear INTEGER NOT NULL, d_weeknuminyear INTEGER NOT NULL, d_sellingseason TEXT NOT NULL,
    d_lastdayinweekfl INTEGER NOT NULL, d_lastdayinmonthfl INTEGER NOT NULL, d_holidayfl INTEGER NOT NULL,
    d_weekdayfl INTEGER NOT NULL
);
CREATE TABLE lineorder (
    lo_orderkey INTEGER NOT NULL, lo_linenumber INTEGER NOT NULL,
    lo_custkey INTEGER NOT NULL REFERENCES customer(c_custkey),
    lo_partkey INTEGER NOT NULL REFERENCES part(p_partkey),
    lo_suppkey INTEGER NOT NULL REFERENCES supplier(s_suppkey),
    lo_orderdate INTEGER NOT NULL REFERENCES date(d_datekey),
    lo_orderpriority TEXT NOT NULL, lo_shippriority INTEGER NOT NULL, lo_quantity INTEGER NOT NULL,
    lo_extendedprice INTEGER NOT NULL, lo_ordtotalprice INTEGER NOT NULL, lo_discount INTEGER NOT NULL,
    lo_revenue INTEGER NOT NULL, lo_supplycost INTEGER NOT NULL, lo_tax INTEGER NOT NULL,
    lo_commitdate INTEGER NOT NULL, lo_shipmode TEXT NOT NULL,
    PRIMARY KEY (lo_orderkey, lo_linenumber)
);
"""


def _place(rng: random.Random) -> tuple[str, str, str]:
    region = rng.choice(sorted(_REGIONS))
    nation = rng.choice(_REGIONS[region])
    return f"{nation[:9]:<9}{rng.randint(0, 9)}", nation, region


def _dates() -> list[tuple[object, ...]]:
    rows = []
    day = dt.date(1992, 1, 1)
    while day <= dt.date(1998, 12, 31):
        next_day = day + dt.timedelta(days=1)
        rows.append((
            int(day.strftime("%Y%m%d")), day.strftime("%B %d, %Y"), day.strftime("%A"), day.strftime("%B"),
            day.year, day.year * 100 + day.month, day.strftime("%b%Y"), day.isoweekday() % 7 + 1, day.day,
            day.timetuple().tm_yday, day.month, day.isocalendar()[1], _SEASONS[day.month],
            int(day.isoweekday() == 7), int(next_day.month != day.month), int((day.month, day.day) in
                                                                            {(1, 1), (7, 4), (12, 25)}),
            int(day.isoweekday() <= 5),
        ))
        day = next_day
    return rows


def build_ssb(path: str | Path, *, customers: int = 60, suppliers: int = 20, parts: int = 80,
              orders: int = 1500, seed: int = 1992) -> Path:
    """(Re)create an SSB database at ``path``; the same arguments give the same rows."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    target.unlink(missing_ok=True)
    rng = random.Random(seed)
    dates = _dates()
    with sqlite3.connect(target) as db:
        db.executescript(_SCHEMA)
        db.executemany("INSERT INTO customer VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
            (key, f"Customer#{key:09d}", f"addr-{rng.randint(1000, 9999)}", *_place(rng),
             f"{rng.randint(10, 34)}-{rng.randint(100, 999)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}",
             rng.choice(_SEGMENTS))
            for key in range(1, customers + 1)])
        db.executemany("INSERT INTO supplier VALUES (?, ?, ?, ?, ?, ?, ?)", [
            (key, f"Supplier#{key:09d}", f"addr-{rng.randint(1000, 9999)}", *_place(rng),
             f"{rng.randint(10, 34)}-{rng.randint(100, 999)}-{rng.randint(100, 999)}-{rng.randint(1000, 9999)}")
            for key in range(1, suppliers + 1)])
        part_rows = []
        for key in range(1, parts + 1):
            mfgr, category = rng.randint(1, 5), rng.randint(1, 5)
            part_rows.append((key, f"{rng.choice(_COLORS)} {rng.choice(_COLORS)}", f"MFGR#{mfgr}",
                              f"MFGR#{mfgr}{category}", f"MFGR#{mfgr}{category}{rng.randint(1, 40)}",
                              rng.choice(_COLORS), rng.choice(_TYPES), rng.randint(1, 50), rng.choice(_CONTAINERS)))
        db.executemany("INSERT INTO part VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", part_rows)
        db.executemany(f"INSERT INTO date VALUES ({', '.join('?' * 17)})", dates)
        lines = []
        for order in range(1, orders + 1):
            customer, orderdate = rng.randint(1, customers), rng.choice(dates)[0]
            priority, count = rng.choice(_PRIORITIES), rng.randint(1, 4)
            prices = [rng.randint(90_000, 10_000_000) for _ in range(count)]
            for number, price in enumerate(prices, start=1):
                discount = rng.randint(0, 10)
                lines.append((order, number, customer, rng.randint(1, parts), rng.randint(1, suppliers), orderdate,
                               priority, 0, rng.randint(1, 50), price, sum(prices), discount,
                               price * (100 - discount) // 100, price * 6 // 10, rng.randint(0, 8),
                               orderdate, rng.choice(_SHIPMODES)))
        db.executemany(f"INSERT INTO lineorder VALUES ({', '.join('?' * 17)})", lines)
    return target


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: ssb.py PATH")
    print(build_ssb(sys.argv[1]))
