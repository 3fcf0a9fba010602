"""The offline WebShop catalog: generated from a seed, stored in SQLite with an FTS5 (bm25) search index.

`Catalog.open(num_products, seed)` builds the database once under `cache_dir()/webshop/` (written to a
temporary file, then renamed into place, so concurrent builders never see half a file) and loads the
products into memory; every instance over the same file shares one in-memory copy.

Goals follow WebShop's synthetic goals (`get_synthetic_goals`): a target product, some of its attributes, one
value for each of its options, and a price bound drawn from the next multiples of ten above its price
(`PRICE_RANGE`), written out as an instruction ("i need a natural looking hair extension with color: dark
brown, and size: 20 inch, and price lower than 40.00 dollars").
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import sqlite3
import tempfile
import threading
from pathlib import Path
from typing import Any

from leap_dspy.envs.webshop import vocab

GENERATOR_VERSION = 1
SEARCH_RETURN_N = 50
"""WebShop returns the top 50 search hits, 10 per page."""
PRODUCT_WINDOW = 10
PRICE_RANGE = [10.0 * i for i in range(1, 100)]
UNSEEN_TYPE_FRACTION = 0.25

_STOP = {
    "i",
    "a",
    "an",
    "the",
    "and",
    "or",
    "for",
    "with",
    "of",
    "to",
    "in",
    "is",
    "am",
    "that",
    "which",
    "me",
    "need",
    "want",
    "looking",
    "find",
    "would",
    "like",
    "im",
    "i'm",
    "it",
    "be",
    "price",
    "lower",
    "than",
    "dollars",
    "size",
    "color",
    "flavor",
    "scent",
    "please",
    "some",
    "my",
}
_WORD = re.compile(r"[a-z0-9][a-z0-9.\-]*")


def cache_root() -> Path:
    from leap_dspy.lm.models import cache_dir

    path = cache_dir() / "webshop"
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------- generation


def _asin(rng: random.Random, taken: set[str]) -> str:
    alphabet = "ABCDEFGHJKLMNPQRSTUVWXYZ0123456789"
    while True:
        asin = "B0" + "".join(rng.choice(alphabet) for _ in range(8))
        if asin not in taken:
            taken.add(asin)
            return asin


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def generate_product(rng: random.Random, ptype: dict[str, Any], asin: str) -> dict[str, Any]:
    brand = rng.choice(vocab.BRANDS)
    pool = list(dict.fromkeys(ptype["attributes"]))
    attributes = rng.sample(pool, rng.randint(2, 4))
    audience = rng.choice(vocab.AUDIENCES)
    shown = attributes[: rng.randint(1, 2)]
    title_words = [brand] + [a.title() for a in shown] + [ptype["type"].title()]
    if rng.random() < 0.5:
        title_words.append(rng.choice(vocab.TITLE_NOUN_SUFFIXES).title())
    title = " ".join(title_words) + f" for {audience.title()}"
    description = rng.choice(vocab.DESCRIPTION_TEMPLATES).format(
        type=ptype["type"], brand=brand, audience=audience, attrs=_join(attributes)
    )
    features = [
        rng.choice(vocab.FEATURE_TEMPLATES).format(
            Attr=a.capitalize(), attr=a, brand=brand, type=ptype["type"]
        )
        for a in attributes
    ]
    text = " ".join([title.lower(), description.lower(), " ".join(features).lower()])
    options: dict[str, list[str]] = {}
    for name, values in ptype["options"].items():
        # A value that also occurs in the product's text would match any goal (WebShop's text fallback).
        usable = [v for v in values if v not in text]
        if len(usable) >= 2:
            k = rng.randint(2, min(6, len(usable)))
            chosen = set(rng.sample(usable, k))
            options[name] = [v for v in values if v in chosen]
    lo, hi = ptype["price_range"]
    price = round(rng.uniform(lo, hi), 2)
    reviews = [
        {"title": t, "score": s, "body": b} for t, s, b in rng.sample(vocab.REVIEW_TEXTS, rng.randint(1, 3))
    ]
    rating = round(sum(r["score"] for r in reviews) / len(reviews), 1)
    return {
        "asin": asin,
        "title": title,
        "brand": brand,
        "type": ptype["type"],
        "category": ptype["category"],
        "product_category": ptype["product_category"],
        "query": ptype["type"],
        "attributes": attributes,
        "options": options,
        "price": price,
        "description": description,
        "features": features,
        "reviews": reviews,
        "rating": rating,
    }


def generate_catalog(num_products: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(f"webshop-catalog-{seed}")
    taken: set[str] = set()
    types = vocab.PRODUCT_TYPES
    products = []
    for i in range(num_products):
        ptype = types[i % len(types)] if i < len(types) else rng.choice(types)
        products.append(generate_product(rng, ptype, _asin(rng, taken)))
    rng.shuffle(products)
    return products


def unseen_types(seed: int) -> set[str]:
    """Held-out product types (at least one per top-level category): only `unseen` goals target them."""
    rng = random.Random(f"webshop-split-{seed}")
    held: set[str] = set()
    for category in vocab.CATEGORIES:
        names = sorted(t["type"] for t in vocab.PRODUCT_TYPES if t["category"] == category)
        k = max(1, round(len(names) * UNSEEN_TYPE_FRACTION))
        held.update(rng.sample(names, k))
    return held


def price_upper_for(price: float, rng: random.Random) -> float:
    above = [p for p in PRICE_RANGE if p > price][:4]
    if len(above) >= 2:
        return sorted(rng.sample(above, 2))[1]
    return 1_000_000.0


def make_goal(product: dict[str, Any], rng: random.Random) -> dict[str, Any]:
    attrs = rng.sample(product["attributes"], rng.randint(1, min(3, len(product["attributes"]))))
    goal_options = {name: rng.choice(values) for name, values in sorted(product["options"].items())}
    price_upper = price_upper_for(product["price"], rng)
    article = "an" if product["type"][0] in "aeiou" else "a"
    if product["type"].endswith("s") or product["type"] in {"leggings", "pasta"}:
        article = "some"
    opts = ", and ".join(f"{k}: {v}" for k, v in goal_options.items())
    opts = f" with {opts}" if opts else ""
    text = rng.choice(vocab.INSTRUCTION_TEMPLATES).format(
        a=article, attrs=_join(attrs), type=product["type"], opts=opts
    )
    if price_upper < 1_000_000:
        text += f", and price lower than {price_upper:.2f} dollars"
    return {
        "asin": product["asin"],
        "name": product["title"],
        "query": product["query"],
        "category": product["category"],
        "product_category": product["product_category"],
        "attributes": attrs,
        "goal_options": goal_options,
        "price_upper": price_upper,
        "instruction_text": text,
    }


# ------------------------------------------------------------------------------------------------ storage


def catalog_key(num_products: int, seed: int) -> str:
    raw = json.dumps({"n": num_products, "seed": seed, "v": GENERATOR_VERSION}, sort_keys=True)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


def _index_text(p: dict[str, Any]) -> tuple[str, str, str]:
    body = " ".join(
        [p["description"], " ".join(p["features"]), " ".join(p["attributes"]), p["product_category"]]
    )
    options = " ".join(v for values in p["options"].values() for v in values)
    return p["title"], body, options


def build_database(path: Path, products: list[dict[str, Any]]) -> None:
    """Write products and their FTS5 index to `path` atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        con = sqlite3.connect(tmp)
        con.executescript(
            """
            PRAGMA journal_mode=OFF; PRAGMA synchronous=OFF;
            CREATE TABLE products (rowid INTEGER PRIMARY KEY, asin TEXT UNIQUE, data TEXT);
            CREATE VIRTUAL TABLE search USING fts5(title, body, options, tokenize='porter unicode61');
            """
        )
        con.executemany(
            "INSERT INTO products (rowid, asin, data) VALUES (?, ?, ?)",
            [(i + 1, p["asin"], json.dumps(p)) for i, p in enumerate(products)],
        )
        con.executemany(
            "INSERT INTO search (rowid, title, body, options) VALUES (?, ?, ?, ?)",
            [(i + 1, *_index_text(p)) for i, p in enumerate(products)],
        )
        con.execute("INSERT INTO search(search) VALUES ('optimize')")
        con.commit()
        con.close()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fts_query(text: str) -> str | None:
    """A bag-of-words OR query (Lucene's default for WebShop) with stop words dropped; None when empty."""
    words = [w.strip(".-") for w in _WORD.findall(text.lower())]
    terms = list(dict.fromkeys(w for w in words if w and w not in _STOP))
    if not terms:
        terms = list(dict.fromkeys(w for w in words if w))
    if not terms:
        return None
    return " OR ".join('"' + t.replace('"', "") + '"' for t in terms[:32])


class Catalog:
    """Products in memory plus a ranked full-text search over them."""

    _shared: dict[str, tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]] = {}
    _lock = threading.Lock()

    def __init__(self, path: Path, products: list[dict[str, Any]], by_asin: dict[str, dict[str, Any]]):
        self.path = path
        self.products = products
        self.by_asin = by_asin
        self._con: sqlite3.Connection | None = None
        self._con_lock = threading.Lock()

    @classmethod
    def open(cls, num_products: int, seed: int, cache_dir: str | os.PathLike[str] | None = None) -> Catalog:
        root = Path(cache_dir) if cache_dir is not None else cache_root()
        path = root / f"catalog-{num_products}-{seed}-{catalog_key(num_products, seed)}.sqlite"
        key = str(path)
        with cls._lock:
            if key not in cls._shared:
                if not path.exists():
                    build_database(path, generate_catalog(num_products, seed))
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
                rows = con.execute("SELECT data FROM products ORDER BY rowid").fetchall()
                con.close()
                products = [json.loads(r[0]) for r in rows]
                cls._shared[key] = (products, {p["asin"]: p for p in products})
            products, by_asin = cls._shared[key]
        return cls(path, products, by_asin)

    def _connection(self) -> sqlite3.Connection:
        if self._con is None:
            self._con = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        return self._con

    def search(self, text: str, limit: int = SEARCH_RETURN_N) -> list[dict[str, Any]]:
        """Top `limit` products for a keyword query, ranked by bm25 (title weighted 3x)."""
        query = fts_query(text)
        if query is None:
            return []
        with self._con_lock:
            rows = (
                self._connection()
                .execute(
                    "SELECT rowid FROM search WHERE search MATCH ? "
                    "ORDER BY bm25(search, 3.0, 1.0, 1.0) LIMIT ?",
                    (query, limit),
                )
                .fetchall()
            )
        return [self.products[r[0] - 1] for r in rows]

    def close(self) -> None:
        if self._con is not None:
            self._con.close()
            self._con = None
