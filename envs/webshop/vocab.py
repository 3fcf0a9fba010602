"""Word lists the offline WebShop catalog is generated from.

The layout follows WebShop's scraped catalog: five top-level categories (beauty, fashion, food, electronics,
furniture), each product with a breadcrumb `product_category` ("Beauty & Personal Care › Hair Care › Hair
Extensions"), a search `query` shared by its product type (WebShop's products were scraped per query), a
title, attributes ("natural looking", "long lasting"), buying options (size, color, flavor, ...) and a price.

`NOUNS` stands in for spaCy's part-of-speech tagger in the type reward: WebShop counts the nouns and proper
nouns of the purchased and the goal titles; here the generator knows which of its own words are nouns.
"""

from __future__ import annotations

from typing import Any

SEP = " › "

# One product type: (name, breadcrumb sub-category, leaf label, type attributes, options, (min, max) price).
# Option value lists are drawn from per product; "size" is matched exactly by the reward, others fuzzily.
_SIZES_CLOTHES = ["x-small", "small", "medium", "large", "x-large", "xx-large"]
_COLORS = [
    "black",
    "white",
    "red",
    "navy blue",
    "sky blue",
    "green",
    "olive green",
    "grey",
    "pink",
    "purple",
    "beige",
    "brown",
    "yellow",
    "orange",
    "burgundy",
    "gold",
    "silver",
]
_HAIR_COLORS = [
    "jet black",
    "natural black",
    "dark brown",
    "light brown",
    "ash blonde",
    "honey blonde",
    "auburn",
]
_SHOE_SIZES = ["6", "6.5", "7", "7.5", "8", "8.5", "9", "9.5", "10", "10.5", "11", "12"]
_FLAVORS = [
    "original",
    "vanilla",
    "chocolate",
    "strawberry",
    "sea salt",
    "honey",
    "cinnamon",
    "lemon",
    "mint",
]
_SCENTS = ["unscented", "lavender", "coconut", "rose", "citrus", "eucalyptus", "sandalwood"]
_PACKS = ["pack of 1", "pack of 2", "pack of 3", "pack of 4", "pack of 6", "pack of 12"]
_OUNCES = ["2 ounce", "4 ounce", "6 ounce", "8 ounce", "12 ounce", "16 ounce", "32 ounce"]
_INCHES = ["12 inch", "14 inch", "16 inch", "18 inch", "20 inch", "22 inch", "24 inch"]
_CAPACITY = ["32gb", "64gb", "128gb", "256gb", "512gb", "1tb"]
_FURN_SIZES = ["twin", "full", "queen", "king", "california king"]
_FINISH = ["walnut", "oak", "espresso", "white wash", "natural wood", "black metal", "grey fabric"]

CATEGORIES: dict[str, dict[str, Any]] = {
    "beauty": {
        "label": "Beauty & Personal Care",
        "attributes": [
            "paraben free",
            "cruelty free",
            "long lasting",
            "easy to use",
            "travel size",
            "sensitive skin",
            "natural ingredients",
            "high quality",
        ],
        "types": [
            (
                "hair extension",
                "Hair Care",
                "Hair Extensions",
                ["natural looking", "clip in", "heat resistant", "tangle free"],
                {"color": _HAIR_COLORS, "size": _INCHES},
                (12, 60),
            ),
            (
                "wig",
                "Hair Care",
                "Wigs",
                ["natural looking", "heat resistant", "lace front", "pre plucked"],
                {"color": _HAIR_COLORS, "size": _INCHES},
                (20, 90),
            ),
            (
                "shampoo",
                "Hair Care",
                "Shampoos",
                ["sulfate free", "dry hair", "hair growth", "damaged hair"],
                {"scent": _SCENTS, "size": _OUNCES},
                (5, 30),
            ),
            (
                "lipstick",
                "Makeup",
                "Lipsticks",
                ["matte finish", "waterproof", "highly pigmented", "nourishing"],
                {"color": ["ruby red", "nude pink", "berry", "coral", "plum", "mauve", "crimson"]},
                (5, 25),
            ),
            (
                "nail polish",
                "Makeup",
                "Nail Polish",
                ["quick dry", "chip resistant", "non toxic", "glossy finish"],
                {
                    "color": [
                        "ruby red",
                        "nude pink",
                        "coral",
                        "lilac",
                        "mint green",
                        "midnight blue",
                        "glitter gold",
                    ],
                    "size": _PACKS[:4],
                },
                (4, 20),
            ),
            (
                "face serum",
                "Skin Care",
                "Serums",
                ["anti aging", "vitamin c", "hyaluronic acid", "dark spots"],
                {"size": _OUNCES[:4]},
                (10, 55),
            ),
            (
                "body lotion",
                "Skin Care",
                "Lotions",
                ["dry skin", "fast absorbing", "shea butter", "non greasy"],
                {"scent": _SCENTS, "size": _OUNCES},
                (6, 30),
            ),
            (
                "toothbrush",
                "Oral Care",
                "Toothbrushes",
                ["soft bristles", "rechargeable", "deep clean", "gum care"],
                {"color": _COLORS[:8], "size": _PACKS[:4]},
                (4, 70),
            ),
        ],
    },
    "fashion": {
        "label": "Clothing, Shoes & Jewelry",
        "attributes": [
            "machine wash",
            "hand wash",
            "comfortable fit",
            "daily wear",
            "quality material",
            "lightweight",
            "breathable",
            "soft material",
        ],
        "types": [
            (
                "t-shirt",
                "Men's Clothing",
                "Shirts",
                ["short sleeve", "cotton spandex", "regular fit", "crew neck"],
                {"color": _COLORS, "size": _SIZES_CLOTHES},
                (8, 35),
            ),
            (
                "hoodie",
                "Men's Clothing",
                "Hoodies",
                ["long sleeve", "drawstring closure", "fleece lined", "relaxed fit"],
                {"color": _COLORS, "size": _SIZES_CLOTHES},
                (18, 60),
            ),
            (
                "dress",
                "Women's Clothing",
                "Dresses",
                ["elastic waist", "high waist", "short sleeve", "v neck"],
                {"color": _COLORS, "size": _SIZES_CLOTHES},
                (15, 70),
            ),
            (
                "leggings",
                "Women's Clothing",
                "Leggings",
                ["high waist", "tummy control", "butt lifting", "moisture wicking"],
                {"color": _COLORS, "size": _SIZES_CLOTHES},
                (10, 40),
            ),
            (
                "running shoe",
                "Shoes",
                "Athletic Shoes",
                ["rubber sole", "non slip", "arch support", "memory foam"],
                {"color": _COLORS, "size": _SHOE_SIZES},
                (25, 120),
            ),
            (
                "sandal",
                "Shoes",
                "Sandals",
                ["open toe", "ankle strap", "rubber sole", "arch support"],
                {"color": _COLORS, "size": _SHOE_SIZES},
                (12, 60),
            ),
            (
                "watch",
                "Jewelry & Watches",
                "Wrist Watches",
                ["stainless steel", "water resistant", "quartz movement", "easy to read"],
                {"color": ["black", "silver", "gold", "rose gold", "blue", "brown"]},
                (20, 150),
            ),
            (
                "necklace",
                "Jewelry & Watches",
                "Necklaces",
                ["sterling silver", "hypoallergenic", "gift box", "adjustable chain"],
                {"color": ["gold", "silver", "rose gold"], "size": ["16 inch", "18 inch", "20 inch"]},
                (10, 80),
            ),
        ],
    },
    "food": {
        "label": "Grocery & Gourmet Food",
        "attributes": [
            "gluten free",
            "non gmo",
            "low sugar",
            "high protein",
            "keto friendly",
            "ready to eat",
            "individually wrapped",
            "natural ingredients",
        ],
        "types": [
            (
                "protein bar",
                "Snacks",
                "Nutrition Bars",
                ["plant based", "low carb", "chewy", "no artificial"],
                {"flavor": _FLAVORS, "size": _PACKS},
                (12, 45),
            ),
            (
                "potato chips",
                "Snacks",
                "Chips & Crisps",
                ["kettle cooked", "low fat", "crunchy", "family size"],
                {
                    "flavor": [
                        "sea salt",
                        "barbecue",
                        "sour cream",
                        "salt and vinegar",
                        "jalapeno",
                        "cheddar",
                    ],
                    "size": _PACKS,
                },
                (5, 30),
            ),
            (
                "coffee beans",
                "Beverages",
                "Coffee",
                ["medium roast", "dark roast", "single origin", "fair trade"],
                {"flavor": ["original", "vanilla", "hazelnut", "caramel", "mocha"], "size": _OUNCES[2:]},
                (9, 40),
            ),
            (
                "green tea",
                "Beverages",
                "Tea",
                ["caffeine free", "organic", "antioxidant", "loose leaf"],
                {"flavor": ["original", "jasmine", "mint", "lemon", "honey", "ginger"], "size": _PACKS[:4]},
                (5, 25),
            ),
            (
                "olive oil",
                "Pantry",
                "Oils",
                ["extra virgin", "cold pressed", "first press", "glass bottle"],
                {"size": _OUNCES[3:]},
                (8, 45),
            ),
            (
                "pasta",
                "Pantry",
                "Pasta",
                ["whole wheat", "durum wheat", "quick cooking", "bronze cut"],
                {"size": _PACKS},
                (4, 30),
            ),
            (
                "dog treats",
                "Pet Food",
                "Dog Treats",
                ["grain free", "real meat", "small breed", "dental care"],
                {"flavor": ["chicken", "beef", "salmon", "peanut butter", "duck"], "size": _OUNCES[2:]},
                (6, 40),
            ),
        ],
    },
    "electronics": {
        "label": "Electronics",
        "attributes": [
            "easy install",
            "high speed",
            "fast charging",
            "long battery life",
            "plug and play",
            "high definition",
            "noise cancelling",
            "usb c",
        ],
        "types": [
            (
                "wireless earbuds",
                "Headphones",
                "Earbud Headphones",
                ["bluetooth 5.0", "charging case", "touch control", "sweat proof"],
                {"color": ["black", "white", "navy blue", "pink", "grey"]},
                (15, 150),
            ),
            (
                "headphones",
                "Headphones",
                "Over-Ear Headphones",
                ["over ear", "foldable design", "built in microphone", "deep bass"],
                {"color": ["black", "white", "silver", "blue", "red"]},
                (20, 200),
            ),
            (
                "phone case",
                "Cell Phone Accessories",
                "Cases",
                ["shockproof", "slim fit", "wireless charging", "raised edges"],
                {
                    "color": _COLORS[:10],
                    "size": ["iphone 13", "iphone 14", "iphone 15", "galaxy s23", "pixel 8"],
                },
                (6, 35),
            ),
            (
                "usb flash drive",
                "Computer Accessories",
                "Flash Drives",
                ["usb 3.0", "metal casing", "keychain design", "data backup"],
                {"size": _CAPACITY, "color": ["black", "silver", "blue", "red"]},
                (6, 60),
            ),
            (
                "wireless mouse",
                "Computer Accessories",
                "Mice",
                ["ergonomic design", "silent click", "adjustable dpi", "rechargeable"],
                {"color": ["black", "white", "grey", "pink", "blue"]},
                (8, 50),
            ),
            (
                "hdmi cable",
                "Television & Video",
                "HDMI Cables",
                ["4k hdr", "gold plated", "braided cord", "high speed"],
                {"size": ["3 feet", "6 feet", "10 feet", "15 feet", "25 feet"], "color": ["black", "grey"]},
                (5, 30),
            ),
            (
                "security camera",
                "Camera & Photo",
                "Surveillance Cameras",
                ["night vision", "motion detection", "two way audio", "weatherproof"],
                {"size": _PACKS[:4], "color": ["white", "black"]},
                (25, 180),
            ),
            (
                "power bank",
                "Cell Phone Accessories",
                "Portable Chargers",
                ["fast charging", "dual usb", "led display", "compact size"],
                {"size": ["10000mah", "20000mah", "26800mah"], "color": ["black", "white", "blue"]},
                (15, 70),
            ),
        ],
    },
    "furniture": {
        "label": "Home & Kitchen",
        "attributes": [
            "easy assemble",
            "space saving",
            "living room",
            "bedroom",
            "solid wood",
            "storage space",
            "heavy duty",
            "modern style",
        ],
        "types": [
            (
                "coffee table",
                "Living Room Furniture",
                "Tables",
                ["tempered glass", "lift top", "open shelf", "mid century"],
                {"color": _FINISH},
                (50, 300),
            ),
            (
                "bookshelf",
                "Living Room Furniture",
                "Bookcases",
                ["5 tier", "industrial style", "metal frame", "wall mounted"],
                {"color": _FINISH},
                (40, 250),
            ),
            (
                "sofa",
                "Living Room Furniture",
                "Sofas & Couches",
                ["memory foam", "removable cushions", "faux leather", "high density"],
                {"color": ["grey fabric", "beige linen", "navy velvet", "green velvet", "brown leather"]},
                (150, 800),
            ),
            (
                "bed frame",
                "Bedroom Furniture",
                "Beds & Frames",
                ["wooden slats", "no box spring", "upholstered headboard", "under bed storage"],
                {"size": _FURN_SIZES, "color": _FINISH},
                (90, 600),
            ),
            (
                "nightstand",
                "Bedroom Furniture",
                "Nightstands",
                ["two drawers", "charging station", "open storage", "rustic style"],
                {"color": _FINISH, "size": _PACKS[:2]},
                (30, 160),
            ),
            (
                "office chair",
                "Office Furniture",
                "Chairs",
                ["lumbar support", "adjustable height", "swivel", "mesh back"],
                {"color": ["black", "grey", "white", "blue", "pink"]},
                (50, 350),
            ),
            (
                "throw pillow",
                "Home Decor",
                "Throw Pillows",
                ["decorative", "hidden zipper", "double sided", "farmhouse"],
                {"color": _COLORS[:12], "size": ["16x16 inch", "18x18 inch", "20x20 inch"]},
                (8, 40),
            ),
            (
                "blackout curtains",
                "Home Decor",
                "Window Treatments",
                ["thermal insulated", "noise reducing", "grommet top", "room darkening"],
                {"color": _COLORS[:12], "size": ["52x63 inch", "52x84 inch", "52x95 inch"]},
                (15, 70),
            ),
        ],
    },
}

BRANDS = [
    "Lumina",
    "Verano",
    "Kestrel",
    "Auralis",
    "Brightwell",
    "Cobalt",
    "Dunmore",
    "Elara",
    "Fennick",
    "Glenrock",
    "Halvard",
    "Ivoria",
    "Juniper",
    "Kaldor",
    "Larkspur",
    "Meridian",
    "Northvale",
    "Orland",
    "Pinecrest",
    "Quillon",
    "Rosewood",
    "Sablewood",
    "Tamsin",
    "Umbra",
    "Vesper",
    "Wexford",
    "Yarrow",
    "Zephyra",
    "Altamira",
    "Bramble",
    "Corvid",
    "Delmar",
    "Everly",
    "Foxglove",
    "Galloway",
    "Harlow",
    "Indigo",
    "Jasperly",
    "Kinsley",
    "Lockwood",
    "Marlowe",
    "Nimbus",
    "Oakhurst",
    "Prescott",
    "Redfern",
    "Solstice",
    "Thornbury",
    "Valora",
]

AUDIENCES = ["women", "men", "kids", "adults", "home", "office", "travel", "family", "girls", "boys"]

TITLE_NOUN_SUFFIXES = ["set", "kit", "collection", "edition", "bundle", "series"]

# Adjective-like words in type names: they are not nouns for the type reward.
_NON_NOUNS = {
    "wireless",
    "green",
    "running",
    "blackout",
    "usb",
    "flash",
    "face",
    "body",
    "office",
    "olive",
    "security",
    "power",
    "throw",
    "coffee",
    "nail",
    "phone",
    "potato",
    "dog",
    "protein",
    "hdmi",
}

PRODUCT_TYPES: list[dict[str, Any]] = []
for _category, _spec in CATEGORIES.items():
    for _name, _sub, _leaf, _type_attrs, _options, _prices in _spec["types"]:
        PRODUCT_TYPES.append(
            {
                "type": _name,
                "category": _category,
                "product_category": SEP.join([_spec["label"], _sub, _leaf]),
                "attributes": list(_type_attrs) + list(_spec["attributes"]),
                "options": _options,
                "price_range": _prices,
            }
        )

NOUNS: set[str] = set()
for _t in PRODUCT_TYPES:
    NOUNS.update(w for w in _t["type"].replace("-", " ").split() if w not in _NON_NOUNS)
NOUNS.update(b.lower() for b in BRANDS)
NOUNS.update(AUDIENCES)
NOUNS.update(TITLE_NOUN_SUFFIXES)
NOUNS.update(
    {
        "shirt",
        "tee",
        "shoe",
        "shoes",
        "drive",
        "mouse",
        "cable",
        "camera",
        "bank",
        "chips",
        "beans",
        "tea",
        "oil",
        "treats",
        "pillow",
        "curtains",
        "polish",
        "toothbrush",
        "chair",
        "table",
    }
)

# Base colours for `normalize_color` (WebShop folds colour names onto a base colour set before matching).
COLOR_SET = [
    "black",
    "white",
    "red",
    "blue",
    "green",
    "grey",
    "gray",
    "pink",
    "purple",
    "beige",
    "brown",
    "yellow",
    "orange",
    "burgundy",
    "gold",
    "silver",
    "navy",
    "olive",
    "blonde",
    "auburn",
    "coral",
    "plum",
    "mauve",
]

DESCRIPTION_TEMPLATES = [
    "This {type} from {brand} is made for {audience}. It is {attrs}.",
    "Meet the {brand} {type}: {attrs}, designed for everyday use by {audience}.",
    "{brand} built this {type} to be {attrs}. A great pick for {audience}.",
    "Designed for {audience}, this {type} is {attrs}. Backed by {brand} customer support.",
]

FEATURE_TEMPLATES = [
    "{Attr}: {brand} quality you can feel",
    "{Attr} - tested for daily use",
    "Why {attr}? Because it matters for a {type}",
    "{Attr} design that lasts",
]

REVIEW_TEXTS = [
    ("Great value", 5, "Exactly as described, would buy again."),
    ("Works well", 4, "Does the job, shipping was quick."),
    ("Okay", 3, "It is fine for the price."),
    ("Not for me", 2, "Quality was lower than I expected."),
    ("Love it", 5, "My family uses it every day."),
    ("Decent", 4, "Good overall, minor issues."),
]

INSTRUCTION_TEMPLATES = [
    "i need {a} {attrs} {type}{opts}",
    "i am looking for {a} {attrs} {type}{opts}",
    "i want {a} {type} that is {attrs}{opts}",
    "find me {a} {attrs} {type}{opts}",
    "i'm looking for {a} {type} which is {attrs}{opts}",
    "i would like {a} {type} that is {attrs}{opts}",
]
