"""Scenes for the demo dataset: drawn images plus question/answer pairs derived from how they were drawn.

Each scene kind (chart, shapes, document, landscape photo, text-only) has three parts:
`make_*` picks the generating parameters with a `random.Random`, `render_*` draws them with PIL (pixel
noise from a numpy Generator), and `qa_*` turns the same parameters into `QA` items. Because the answers
are computed from the parameters, every answer is correct for its image.

Answers come in two styles that `core.demo` chooses per sample: a short LLaVA-style answer (the question
then ends with "Answer the question using a single word or phrase.") or one full sentence. Templates vary
the wording but stay regular, so a tiny LM trained on clean samples learns them.
"""

from __future__ import annotations

import importlib.util
import math
import os
import random
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

SHORT_SUFFIX = "Answer the question using a single word or phrase."


@dataclass(frozen=True)
class QA:
    """One question with its short answer and its one-sentence answer (both correct for the scene)."""

    question: str
    short: str
    sentence: str
    short_ok: bool = True  # False when the answer cannot be a single word or phrase (descriptions)


@dataclass
class Scene:
    """A generated image scene: its source name and generating parameters."""

    source: str
    params: dict


# ---- fonts ----------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def font(size: int, kind: str = "sans") -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """DejaVu from matplotlib's data folder (a pinned dependency, found without importing matplotlib),
    else Pillow's bundled default font at that size."""
    names = {"sans": "DejaVuSans.ttf", "bold": "DejaVuSans-Bold.ttf", "mono": "DejaVuSansMono.ttf",
             "serif": "DejaVuSerif.ttf"}
    spec = importlib.util.find_spec("matplotlib")
    if spec and spec.submodule_search_locations:
        path = os.path.join(list(spec.submodule_search_locations)[0], "mpl-data", "fonts", "ttf", names[kind])
        if os.path.exists(path):
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


def _text_w(draw: ImageDraw.ImageDraw, text: str, fnt) -> int:
    box = draw.textbbox((0, 0), text, font=fnt)
    return box[2] - box[0]


def _finish(img: Image.Image, nrng: np.random.Generator, sigma: float) -> Image.Image:
    """Add mild Gaussian pixel noise so images look scanned/photographed and are never flat."""
    arr = np.asarray(img, dtype=np.float32)
    noise = nrng.standard_normal(arr.shape, dtype=np.float32)
    noise *= sigma
    noise += arr
    np.clip(noise, 0, 255, out=noise)
    return Image.fromarray(noise.astype(np.uint8), "RGB")


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _is_are(n: int) -> str:
    return "is" if n == 1 else "are"


ORDINALS = ["first", "second", "third"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# ---- charts (chartqa_like) -------------------------------------------------------------------------

MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
WEEKDAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
CHART_TOPICS = [
    # (title, category word, categories, y label)
    ("Monthly sales of {store}", "month", MONTHS, "Units sold"),
    ("Favorite fruit of students", "fruit", ["Apple", "Banana", "Cherry", "Grape", "Mango", "Orange", "Pear"],
     "Number of students"),
    ("Visitors to the {place}", "day", ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"], "Visitors"),
    ("Population of towns", "town", ["Ashford", "Brook", "Clayton", "Dover", "Elmwood", "Fairview"],
     "Population (thousands)"),
    ("Ways students travel to school", "mode", ["Car", "Bus", "Bike", "Walk", "Train"], "Students"),
    ("Books borrowed from the {place}", "genre", ["Fiction", "History", "Science", "Poetry", "Travel", "Art"],
     "Books"),
]
LINE_TOPICS = [
    ("Annual rainfall in {city}", "Rainfall (mm)"),
    ("Yearly revenue of {store}", "Revenue (million $)"),
    ("Average temperature in {city}", "Temperature (F)"),
    ("Number of members of the {place}", "Members"),
]
STORES = ["Store A", "Store B", "Green Valley Market", "Corner Bakery", "City Hardware"]
PLACES = ["museum", "library", "zoo", "aquarium", "park", "sports club"]
CITIES = ["Springfield", "Riverton", "Lakeside", "Hillview", "Maple Town", "Oakdale"]
PALETTE = [(66, 114, 196), (230, 126, 34), (46, 160, 90), (200, 60, 60), (142, 90, 180), (40, 170, 180),
           (220, 180, 40), (120, 120, 120)]


def _fill_title(rng: random.Random, tpl: str) -> str:
    return tpl.format(store=rng.choice(STORES), place=rng.choice(PLACES), city=rng.choice(CITIES))


def make_chart(rng: random.Random) -> Scene:
    kind = rng.choice(["bar", "bar", "line", "pie"])
    size = rng.choice([(320, 240), (352, 264), (384, 288)])
    bg = tuple(rng.randint(212, 255) for _ in range(3))
    p: dict = {"kind": kind, "size": size, "bg": bg}
    if kind == "line":
        title, ylabel = rng.choice(LINE_TOPICS)
        n = rng.randint(4, 7)
        start = rng.randint(2008, 2016)
        cats = [str(start + i) for i in range(n)]
        p.update(title=_fill_title(rng, title), catword="year", cats=cats, ylabel=ylabel, xlabel="Year",
                 values=rng.sample(range(10, 96), n), color=rng.choice(PALETTE))
    elif kind == "bar":
        title, catword, pool, ylabel = rng.choice(CHART_TOPICS)
        n = rng.randint(3, min(6, len(pool)))
        start = rng.randint(0, len(pool) - n)
        p.update(title=_fill_title(rng, title), catword=catword, cats=pool[start:start + n], ylabel=ylabel,
                 xlabel=catword.capitalize(), values=rng.sample(range(5, 96), n),
                 colors=[rng.choice(PALETTE)] * n if rng.random() < 0.5 else rng.sample(PALETTE, n))
    else:
        title, catword, pool, _ = rng.choice(CHART_TOPICS)
        n = rng.randint(3, 5)
        while True:  # distinct percentages, each at least 6, summing to 100
            cuts = sorted(rng.sample(range(6, 95), n - 1))
            vals = [b - a for a, b in zip([0] + cuts, cuts + [100], strict=True)]
            if min(vals) >= 6 and len(set(vals)) == n:
                break
        p.update(title="Share of " + _fill_title(rng, title).lower().replace("number of ", ""), catword=catword,
                 cats=rng.sample(pool, n), values=vals, colors=rng.sample(PALETTE, n))
    return Scene("chartqa_like", p)


def _rotated_text(img: Image.Image, xy: tuple[int, int], text: str, fnt, fill) -> None:
    d = ImageDraw.Draw(img)
    w = _text_w(d, text, fnt) + 4
    layer = Image.new("L", (w, fnt.size + 6), 0)
    ImageDraw.Draw(layer).text((2, 1), text, font=fnt, fill=255)
    layer = layer.rotate(90, expand=True)
    img.paste(Image.new("RGB", layer.size, fill), (xy[0], xy[1] - layer.size[1] // 2), layer)


def render_chart(s: Scene, nrng: np.random.Generator) -> Image.Image:
    p = s.params
    W, H = p["size"]
    img = Image.new("RGB", (W, H), p["bg"])
    d = ImageDraw.Draw(img)
    ftitle, fsmall = font(13, "bold"), font(10)
    d.text(((W - _text_w(d, p["title"], ftitle)) // 2, 5), p["title"], font=ftitle, fill=(30, 30, 30))
    if p["kind"] == "pie":
        r = min(W // 2 - 20, H - 50) // 2 + 10
        cx, cy = 20 + r, 28 + (H - 28) // 2
        ang = -90.0
        for v, col in zip(p["values"], p["colors"], strict=True):
            span = 360.0 * v / 100
            d.pieslice([cx - r, cy - r, cx + r, cy + r], ang, ang + span, fill=col, outline=(255, 255, 255))
            mid = math.radians(ang + span / 2)
            lab = f"{v}%"
            tx, ty = cx + 0.62 * r * math.cos(mid), cy + 0.62 * r * math.sin(mid)
            d.text((tx - _text_w(d, lab, fsmall) / 2, ty - 6), lab, font=fsmall, fill=(255, 255, 255))
            ang += span
        lx, ly = cx + r + 18, cy - 9 * len(p["cats"])
        for i, (c, col) in enumerate(zip(p["cats"], p["colors"], strict=True)):
            d.rectangle([lx, ly + 18 * i, lx + 10, ly + 18 * i + 10], fill=col)
            d.text((lx + 15, ly + 18 * i - 1), c, font=fsmall, fill=(30, 30, 30))
        return img
    left, right, top, bottom = 46, W - 12, 30, H - 36
    vmax = max(p["values"])
    step = 20 if vmax > 50 else 10
    ymax = step * math.ceil(vmax / step)
    y_of = lambda v: bottom - (bottom - top) * v / ymax  # noqa: E731
    for t in range(0, ymax + 1, step):
        y = y_of(t)
        d.line([left, y, right, y], fill=(215, 215, 215))
        d.text((left - 6 - _text_w(d, str(t), fsmall), y - 6), str(t), font=fsmall, fill=(60, 60, 60))
    d.line([left, top, left, bottom], fill=(40, 40, 40))
    d.line([left, bottom, right, bottom], fill=(40, 40, 40))
    _rotated_text(img, (2, (top + bottom) // 2), p["ylabel"], fsmall, (40, 40, 40))
    d.text(((left + right - _text_w(d, p["xlabel"], fsmall)) // 2, H - 14), p["xlabel"], font=fsmall,
           fill=(40, 40, 40))
    n = len(p["cats"])
    slot = (right - left) / n
    pts = []
    for i, (c, v) in enumerate(zip(p["cats"], p["values"], strict=True)):
        cx = left + slot * (i + 0.5)
        d.text((cx - _text_w(d, c, fsmall) / 2, bottom + 4), c, font=fsmall, fill=(40, 40, 40))
        if p["kind"] == "bar":
            bw = slot * 0.6
            d.rectangle([cx - bw / 2, y_of(v), cx + bw / 2, bottom], fill=p["colors"][i])
        pts.append((cx, y_of(v)))
    if p["kind"] == "line":
        d.line(pts, fill=p["color"], width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=p["color"])
    for (x, y), v in zip(pts, p["values"], strict=True):
        lab = str(v)
        d.text((x - _text_w(d, lab, fsmall) / 2, y - 14), lab, font=fsmall, fill=(20, 20, 20))
    return img  # charts are clean renders (PNG), like ChartQA's


def qa_chart(s: Scene, rng: random.Random) -> list[QA]:
    p = s.params
    cats, vals, cw = p["cats"], p["values"], p["catword"]
    imax, imin = vals.index(max(vals)), vals.index(min(vals))
    i, j = rng.sample(range(len(cats)), 2)
    out = [
        QA("What is the title of the chart?", p["title"], f'The title of the chart is "{p["title"]}".'),
        QA(f"Which {cw} has the {'largest share' if p['kind'] == 'pie' else 'highest value'}?", cats[imax],
           f"{cats[imax]} has the {'largest share' if p['kind'] == 'pie' else 'highest value'}, "
           f"with {vals[imax]}{'%' if p['kind'] == 'pie' else ''}."),
        QA(f"Which {cw} has the {'smallest share' if p['kind'] == 'pie' else 'lowest value'}?", cats[imin],
           f"{cats[imin]} has the {'smallest share' if p['kind'] == 'pie' else 'lowest value'}, "
           f"with {vals[imin]}{'%' if p['kind'] == 'pie' else ''}."),
    ]
    if p["kind"] == "pie":
        out += [
            QA(rng.choice([f"What percentage does {cats[i]} account for?",
                           f"What share of the total does {cats[i]} have?"]),
               f"{vals[i]}%", f"{cats[i]} accounts for {vals[i]}% of the total."),
            QA("How many categories are shown in the pie chart?", str(len(cats)),
               f"The pie chart shows {len(cats)} categories."),
            QA(f"What is the combined share of {cats[i]} and {cats[j]}?", f"{vals[i] + vals[j]}%",
               f"Together, {cats[i]} ({vals[i]}%) and {cats[j]} ({vals[j]}%) account for {vals[i] + vals[j]}%."),
        ]
        return out
    d = vals[imax] - vals[imin]
    out += [
        QA(rng.choice([f"What is the value for {cats[i]}?", f"What value does the chart show for {cats[i]}?",
                       f"According to the chart, what is the value for {cats[i]}?"]),
           str(vals[i]), f"The value for {cats[i]} is {vals[i]}."),
        QA("What is the difference between the highest and the lowest values?", str(d),
           f"The difference between the highest value ({vals[imax]}) and the lowest value ({vals[imin]}) is {d}."),
        QA(f"What is the sum of the values for {cats[i]} and {cats[j]}?", str(vals[i] + vals[j]),
           f"The sum of {cats[i]} ({vals[i]}) and {cats[j]} ({vals[j]}) is {vals[i] + vals[j]}."),
        QA(rng.choice(["What does the y-axis show?", "What is the label of the y-axis?"]), p["ylabel"],
           f"The y-axis shows {p['ylabel'][0].lower() + p['ylabel'][1:]}."),
    ]
    if p["kind"] == "bar":
        out.append(QA("How many bars are in the chart?", str(len(cats)), f"There are {len(cats)} bars in the chart."))
    else:
        a, b = sorted((i, j))
        word = "increase" if vals[b] > vals[a] else "decrease"
        out.append(QA(f"Did the value increase or decrease from {cats[a]} to {cats[b]}?", word.capitalize(),
                      f"The value {word}d from {vals[a]} in {cats[a]} to {vals[b]} in {cats[b]}."))
    return out


# ---- shapes (count_like) ----------------------------------------------------------------------------

SHAPES = ["circle", "square", "triangle", "star"]
COLORS = {"red": (215, 45, 45), "blue": (45, 85, 215), "green": (40, 150, 60), "yellow": (235, 195, 30),
          "purple": (135, 60, 175), "orange": (240, 130, 30)}


def make_shapes(rng: random.Random) -> Scene:
    size = rng.choice([(256, 256), (320, 240), (288, 288), (352, 264)])
    types = rng.sample(SHAPES, rng.randint(2, 3))
    colors = rng.sample(sorted(COLORS), rng.randint(2, 3))
    W, H = size
    items: list[dict] = []
    for t in types:
        for _ in range(rng.randint(1, 6)):
            for _attempt in range(200):
                r = rng.randint(10, 18)
                cx, cy = rng.randint(r + 3, W - r - 3), rng.randint(r + 3, H - r - 3)
                if all((cx - o["x"]) ** 2 + (cy - o["y"]) ** 2 > (r + o["r"] + 4) ** 2 for o in items):
                    items.append({"type": t, "color": rng.choice(colors), "x": cx, "y": cy, "r": r})
                    break
    bg_top = tuple(rng.randint(200, 250) for _ in range(3))
    bg_bot = tuple(max(0, c - rng.randint(10, 60)) for c in bg_top)
    return Scene("count_like", {"size": size, "items": items, "bg": [bg_top, bg_bot], "types": types})


def _gradient(W: int, H: int, top, bottom) -> np.ndarray:
    t = np.linspace(0.0, 1.0, H, dtype=np.float32)[:, None, None]
    return (np.asarray(top, np.float32) * (1 - t) + np.asarray(bottom, np.float32) * t) * np.ones((1, W, 1))


def _star(x: float, y: float, r: float) -> list[tuple[float, float]]:
    return [(x + (r if k % 2 == 0 else r * 0.45) * math.cos(math.pi / 5 * k - math.pi / 2),
             y + (r if k % 2 == 0 else r * 0.45) * math.sin(math.pi / 5 * k - math.pi / 2)) for k in range(10)]


def render_shapes(s: Scene, nrng: np.random.Generator) -> Image.Image:
    p = s.params
    W, H = p["size"]
    img = Image.fromarray(_gradient(W, H, *p["bg"]).astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    for it in p["items"]:
        x, y, r, col = it["x"], it["y"], it["r"], COLORS[it["color"]]
        edge = tuple(int(c * 0.6) for c in col)
        if it["type"] == "circle":
            d.ellipse([x - r, y - r, x + r, y + r], fill=col, outline=edge, width=2)
        elif it["type"] == "square":
            d.rectangle([x - r * 0.85, y - r * 0.85, x + r * 0.85, y + r * 0.85], fill=col, outline=edge, width=2)
        elif it["type"] == "triangle":
            d.polygon([(x, y - r), (x - r * 0.95, y + r * 0.75), (x + r * 0.95, y + r * 0.75)], fill=col,
                      outline=edge, width=2)
        else:
            d.polygon(_star(x, y, r * 1.1), fill=col, outline=edge, width=2)
    return _finish(img, nrng, 5.0)


def _counts(items: list[dict]) -> dict[str, int]:
    c = dict.fromkeys(SHAPES, 0)
    for it in items:
        c[it["type"]] += 1
    return c


def qa_shapes(s: Scene, rng: random.Random) -> list[QA]:
    items = s.params["items"]
    cnt = _counts(items)
    present = [t for t in SHAPES if cnt[t]]
    t = rng.choice(present)
    absent = [x for x in SHAPES if not cnt[x]]
    out = [
        QA(rng.choice([f"How many {t}s are there in the image?", f"How many {t}s can you see?",
                       f"Count the {t}s in the image."]),
           str(cnt[t]), f"There {_is_are(cnt[t])} {_plural(cnt[t], t)} in the image."),
        QA(rng.choice(["How many shapes are there in total?", "How many shapes are in the image?"]),
           str(len(items)), f"There {_is_are(len(items))} {_plural(len(items), 'shape')} in total."),
    ]
    col = rng.choice([it["color"] for it in items])
    tt = rng.choice([it["type"] for it in items if it["color"] == col])
    k = sum(1 for it in items if it["color"] == col and it["type"] == tt)
    out.append(QA(f"How many {col} {tt}s are there?", str(k), f"There {_is_are(k)} {_plural(k, col + ' ' + tt)}."))
    if absent:
        a = rng.choice(absent)
        out.append(QA(f"How many {a}s are there in the image?", "0", f"There are no {a}s in the image."))
    top = sorted(present, key=lambda x: -cnt[x])
    if len(top) == 1 or cnt[top[0]] > cnt[top[1]]:
        out.append(QA("Which shape appears most often?", top[0],
                      f"{top[0].capitalize()}s appear most often, with {cnt[top[0]]} of them."))
    if len(present) >= 2:
        a, b = rng.sample(present, 2)
        if cnt[a] != cnt[b]:
            yes = cnt[a] > cnt[b]
            out.append(QA(f"Are there more {a}s than {b}s?", "Yes" if yes else "No",
                          f"{'Yes' if yes else 'No'}, there {_is_are(cnt[a])} {_plural(cnt[a], a)} and "
                          f"{_plural(cnt[b], b)}."))
    return out


# ---- documents (doc_like) ---------------------------------------------------------------------------

FIRST = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Grace", "Henry", "Irene", "Jonas", "Laura", "Omar"]
LAST = ["Miller", "Garcia", "Chen", "Novak", "Schmidt", "Okafor", "Rossi", "Larsen", "Dubois", "Tanaka"]
JOBS = ["teacher", "nurse", "engineer", "baker", "designer", "electrician", "librarian", "pharmacist"]
SHOPS = {
    "Green Valley Market": ["Apples", "Bread", "Milk", "Eggs", "Cheese", "Tomatoes", "Coffee", "Rice"],
    "Corner Bakery": ["Croissant", "Bagel", "Muffin", "Baguette", "Cookie", "Tea", "Cake slice"],
    "City Hardware": ["Hammer", "Nails", "Screwdriver", "Tape", "Paint brush", "Light bulb", "Glue"],
    "Blue Lake Pharmacy": ["Vitamins", "Bandages", "Toothpaste", "Shampoo", "Sunscreen", "Tissues"],
}
EVENTS = ["team meeting", "safety training", "budget review", "staff lunch", "project kickoff"]
ROOMS = ["Room 101", "Room 204", "the main hall", "the library", "Room 310"]


def _date(rng: random.Random) -> str:
    return f"{rng.randint(2019, 2024)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _birth_date(rng: random.Random) -> str:
    return f"{rng.randint(1950, 2004)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def _person(rng: random.Random) -> str:
    return f"{rng.choice(FIRST)} {rng.choice(LAST)}"


PAPERS = [(250, 248, 240), (244, 245, 250), (252, 243, 228), (240, 248, 240), (250, 240, 244), (236, 236, 232)]
DESKS = [(70, 60, 50), (120, 110, 95), (60, 70, 85), (150, 150, 150), (95, 80, 70), (40, 70, 50),
         (200, 190, 170), (30, 30, 35)]


def make_doc(rng: random.Random) -> Scene:
    kind = rng.choice(["receipt", "form", "memo"])
    paper = tuple(min(255, c + rng.randint(-6, 5)) for c in rng.choice(PAPERS))
    accent = tuple(int(c * rng.uniform(0.6, 0.9)) for c in rng.choice(PALETTE))
    p: dict = {"kind": kind, "bg": paper, "accent": accent, "desk": rng.choice(DESKS),
               "angle": round(rng.uniform(-3.5, 3.5), 2), "margins": [rng.randint(6, 30) for _ in range(4)]}
    if kind == "receipt":
        shop = rng.choice(sorted(SHOPS))
        names = rng.sample(SHOPS[shop], rng.randint(3, 6))
        cents = [rng.randint(99, 1999) for _ in names]
        total = sum(cents)
        p.update(shop=shop, date=_date(rng), number=str(rng.randint(10000, 99999)),
                 items=[[n, f"{c / 100:.2f}"] for n, c in zip(names, cents, strict=True)], total=f"{total / 100:.2f}")
        p["size"] = (rng.choice([240, 256, 272]), 130 + 18 * len(names) + 50)
    elif kind == "form":
        p.update(fields=[["Name", _person(rng)], ["Date of birth", _birth_date(rng)], ["City", rng.choice(CITIES)],
                         ["Phone", f"{rng.randint(200, 989)}-{rng.randint(1000, 9999)}"],
                         ["ID number", str(rng.randint(1000000, 9999999))], ["Occupation", rng.choice(JOBS)]],
                 size=(rng.choice([296, 312]), 296))
    else:
        p.update(to=_person(rng), sender=_person(rng), date=_date(rng), event=rng.choice(EVENTS),
                 day=rng.choice(WEEKDAYS), time=f"{rng.randint(9, 16)}:{rng.choice(['00', '15', '30', '45'])}",
                 room=rng.choice(ROOMS), size=(rng.choice([312, 320]), 240))
    return Scene("doc_like", p)


def render_doc(s: Scene, nrng: np.random.Generator) -> Image.Image:
    """A page (tinted paper, colored header) photographed slightly rotated on a desk."""
    p = s.params
    W, H = p["size"]
    m = 0
    img = Image.new("RGB", (W, H), p["bg"])
    d = ImageDraw.Draw(img)
    ink, white = (25, 25, 35), (255, 255, 255)
    x0, x1 = m + 8, W - m - 8
    if p["kind"] == "receipt":
        fm, fb = font(12, "mono"), font(14, "bold")
        d.rectangle([m, m, W - m, m + 28], fill=p["accent"])
        d.text(((W - _text_w(d, p["shop"], fb)) // 2, m + 6), p["shop"], font=fb, fill=white)
        d.text((x0, m + 36), f"Date: {p['date']}", font=fm, fill=ink)
        d.text((x0, m + 54), f"Receipt No. {p['number']}", font=fm, fill=ink)
        y = m + 82
        d.line([x0 - 4, y - 6, x1 + 4, y - 6], fill=ink)
        for name, price in p["items"]:
            d.text((x0, y), name, font=fm, fill=ink)
            d.text((x1 - _text_w(d, "$" + price, fm), y), "$" + price, font=fm, fill=ink)
            y += 18
        d.line([x0 - 4, y + 2, x1 + 4, y + 2], fill=ink)
        d.text((x0, y + 10), "TOTAL", font=fb, fill=ink)
        d.text((x1 - _text_w(d, "$" + p["total"], fb), y + 10), "$" + p["total"], font=fb, fill=ink)
        d.text((x0, y + 34), "Thank you for shopping!", font=fm, fill=ink)
    elif p["kind"] == "form":
        fb, fs = font(15, "bold"), font(12)
        d.rectangle([m, m, W - m, m + 30], fill=p["accent"])
        d.text(((W - _text_w(d, "APPLICATION FORM", fb)) // 2, m + 6), "APPLICATION FORM", font=fb, fill=white)
        for k, (label, value) in enumerate(p["fields"]):
            y = m + 42 + 36 * k
            d.text((x0, y + 4), label + ":", font=fs, fill=ink)
            d.rectangle([x0 + 104, y, x1, y + 24], outline=p["accent"], fill=white)
            d.text((x0 + 110, y + 4), value, font=fs, fill=(20, 40, 120))
    else:
        fb, fs = font(16, "bold"), font(12, "serif")
        d.rectangle([m, m, m + 10, H - m], fill=p["accent"])
        x0 += 10
        d.text((x0, m + 8), "MEMO", font=fb, fill=p["accent"])
        rows = [("To:", p["to"]), ("From:", p["sender"]), ("Date:", p["date"]),
                ("Subject:", p["event"].capitalize())]
        for k, (a, b) in enumerate(rows):
            d.text((x0, m + 38 + 18 * k), a, font=fs, fill=ink)
            d.text((x0 + 66, m + 38 + 18 * k), b, font=fs, fill=ink)
        d.line([x0 - 4, m + 114, x1, m + 114], fill=ink)
        body = [f"The {p['event']} will take place on", f"{p['day']} at {p['time']} in {p['room']}.",
                "Please let me know if you cannot attend.", f"Best regards, {p['sender'].split()[0]}"]
        for k, line in enumerate(body):
            d.text((x0, m + 126 + 20 * k), line, font=fs, fill=ink)
    ml, mt, mr, mb = p["margins"]
    photo = Image.new("RGB", (W + ml + mr, H + mt + mb), p["desk"])
    photo.paste(img, (ml, mt))
    photo = photo.rotate(p["angle"], resample=Image.Resampling.BILINEAR, fillcolor=p["desk"])
    return _finish(photo, nrng, 4.0)


def qa_doc(s: Scene, rng: random.Random) -> list[QA]:
    p = s.params
    if p["kind"] == "receipt":
        name, price = rng.choice(p["items"])
        return [
            QA(rng.choice(["What is the name of the store?", "Which store issued this receipt?"]), p["shop"],
               f"The receipt is from {p['shop']}."),
            QA(rng.choice(["What is the total amount on the receipt?", "How much is the total?"]), f"${p['total']}",
               f"The total amount is ${p['total']}."),
            QA(f"How much did the {name.lower()} cost?", f"${price}", f"The {name.lower()} cost ${price}."),
            QA("What is the date on the receipt?", p["date"], f"The receipt is dated {p['date']}."),
            QA("How many items are listed on the receipt?", str(len(p["items"])),
               f"There are {len(p['items'])} items listed on the receipt."),
            QA("What is the receipt number?", p["number"], f"The receipt number is {p['number']}."),
        ]
    if p["kind"] == "form":
        f = dict(p["fields"])
        return [
            QA(rng.choice(["What is the name written on the form?", "Whose form is this?"]), f["Name"],
               f"The name on the form is {f['Name']}."),
            QA("What city is listed on the form?", f["City"], f"The city listed on the form is {f['City']}."),
            QA("What is the phone number on the form?", f["Phone"], f"The phone number is {f['Phone']}."),
            QA("What is the applicant's occupation?", f["Occupation"], f"The applicant is {'an' if f['Occupation'][0] in 'aeiou' else 'a'} {f['Occupation']}."),
            QA("What is the ID number on the form?", f["ID number"], f"The ID number is {f['ID number']}."),
            QA("What is the date of birth on the form?", f["Date of birth"],
               f"The date of birth is {f['Date of birth']}."),
        ]
    return [
        QA(rng.choice(["Who is the memo addressed to?", "To whom is the memo sent?"]), p["to"],
           f"The memo is addressed to {p['to']}."),
        QA(rng.choice(["Who wrote the memo?", "Who is the sender of the memo?"]), p["sender"],
           f"The memo was written by {p['sender']}."),
        QA("What is the subject of the memo?", p["event"].capitalize(), f"The subject of the memo is the {p['event']}."),
        QA(f"When will the {p['event']} take place?", f"{p['day']} at {p['time']}",
           f"The {p['event']} will take place on {p['day']} at {p['time']}."),
        QA(f"Where will the {p['event']} take place?", p["room"], f"The {p['event']} will take place in {p['room']}."),
        QA("What is the date of the memo?", p["date"], f"The memo is dated {p['date']}."),
    ]


# ---- landscape photos (photo_like) ------------------------------------------------------------------

SKIES = {"day": ((90, 150, 230), (190, 220, 250)), "sunset": ((70, 60, 130), (250, 150, 80)),
         "night": ((5, 10, 35), (30, 40, 80))}
GROUNDS = {"grass": ((70, 150, 60), (30, 90, 30)), "desert": ((225, 195, 130), (190, 150, 90)),
           "snow": ((240, 242, 250), (200, 205, 220)), "sea": ((40, 100, 160), (15, 50, 100))}
TIME_PHRASE = {"day": "on a sunny day", "sunset": "at sunset", "night": "at night"}
GROUND_PHRASE = {"grass": "a green meadow", "desert": "a sandy desert", "snow": "a snowy field",
                 "sea": "a calm sea"}
GROUND_SHORT = {"grass": "A meadow", "desert": "A desert", "snow": "A snowy field", "sea": "The sea"}


def _spread(rng: random.Random, n: int, min_dx: float, draw) -> list[list[float]]:
    """Up to n items from `draw()` whose x positions are at least `min_dx` apart."""
    out: list[list[float]] = []
    for _ in range(20 * n):
        if len(out) == n:
            break
        c = draw()
        if all(abs(c[0] - o[0]) >= min_dx for o in out):
            out.append(c)
    return out


def make_photo(rng: random.Random) -> Scene:
    size = rng.choice([(320, 240), (384, 256), (288, 216), (256, 192)])
    time = rng.choice(sorted(SKIES))
    ground = rng.choice(sorted(GROUNDS))
    W, H = size
    hy = int(H * rng.uniform(0.5, 0.68))
    mountains = rng.random() < 0.5
    peaks = [[rng.uniform(-0.1, 1.1) * W, hy - rng.uniform(0.15, 0.35) * H] for _ in range(rng.randint(2, 4))]
    # trees and clouds never overlap one another, so their counts in the answers are visible counts
    trees = [] if ground == "sea" else _spread(rng, rng.randint(0, 4), 44, lambda: [
        rng.uniform(0.05, 0.95) * W, rng.uniform(hy + 8, H - 10), rng.uniform(10, 20)])
    clouds = [] if time == "night" else _spread(rng, rng.randint(0, 3), 80, lambda: [
        rng.uniform(0.1, 0.9) * W, rng.uniform(0.08, 0.3) * H, rng.uniform(18, 34)])
    light = [rng.uniform(0.15, 0.85) * W, (0.12 if time != "sunset" else 0.42) * hy, rng.uniform(12, 20)]
    return Scene("photo_like", {"size": size, "time": time, "ground": ground, "horizon": hy,
                                "mountains": peaks if mountains else [], "trees": trees, "clouds": clouds,
                                "light": light})


def render_photo(s: Scene, nrng: np.random.Generator) -> Image.Image:
    p = s.params
    W, H = p["size"]
    hy = p["horizon"]
    arr = np.zeros((H, W, 3), np.float32)
    arr[:hy] = _gradient(W, hy, *SKIES[p["time"]])
    arr[hy:] = _gradient(W, H - hy, *GROUNDS[p["ground"]])
    img = Image.fromarray(arr.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(img)
    lx, ly, lr = p["light"]
    if p["time"] == "night":
        for x, y in nrng.uniform(0, 1, size=(40, 2)) * (W, hy * 0.9):
            d.point((float(x), float(y)), fill=(255, 255, 230))
        d.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], fill=(235, 235, 210))
    else:
        d.ellipse([lx - lr, ly - lr, lx + lr, ly + lr], fill=(255, 230, 120) if p["time"] == "day" else (255, 120, 60))
    for px, py in p["mountains"]:
        shade = (110, 115, 140) if p["ground"] != "snow" else (150, 155, 175)
        d.polygon([(px - 0.28 * W, hy + 1), (px, py), (px + 0.28 * W, hy + 1)], fill=shade)
        d.polygon([(px - 0.05 * W, py + 0.18 * (hy - py)), (px, py), (px + 0.05 * W, py + 0.18 * (hy - py))],
                  fill=(245, 245, 250))
    img = img.filter(ImageFilter.GaussianBlur(1.2))
    d = ImageDraw.Draw(img)
    for cx, cy, cr in p["clouds"]:
        for dx, dy, f in ((-0.7, 0.1, 0.6), (0.0, -0.15, 0.8), (0.7, 0.1, 0.6)):
            r = cr * f
            d.ellipse([cx + dx * cr - r, cy + dy * cr - r * 0.7, cx + dx * cr + r, cy + dy * cr + r * 0.7],
                      fill=(250, 250, 252))
    for tx, ty, tr in sorted(p["trees"], key=lambda t: t[1]):
        d.rectangle([tx - tr * 0.15, ty - tr * 0.4, tx + tr * 0.15, ty + tr * 0.6], fill=(90, 60, 30))
        green = (25, 90, 40) if p["ground"] != "snow" else (20, 70, 45)
        d.polygon([(tx, ty - tr * 1.8), (tx - tr * 0.8, ty - tr * 0.2), (tx + tr * 0.8, ty - tr * 0.2)], fill=green)
    img = img.filter(ImageFilter.GaussianBlur(0.8))
    return _finish(img, nrng, 6.0)


def describe_photo(p: dict) -> str:
    """The scene description (one to three sentences) computed from the photo's parameters."""
    out = f"The image shows {GROUND_PHRASE[p['ground']]} {TIME_PHRASE[p['time']]}"
    out += ", with mountains in the distance." if p["mountains"] else "."
    nt, nc = len(p["trees"]), len(p["clouds"])
    extra = []
    if nt:
        extra.append(f"{NUMBER_WORDS[nt]} {'tree' if nt == 1 else 'trees'} on the ground")
    if nc:
        extra.append(f"{NUMBER_WORDS[nc]} {'cloud' if nc == 1 else 'clouds'} in the sky")
    if extra:
        out += f" There {'is' if (nt or nc) == 1 else 'are'} " + " and ".join(extra) + "."
    if p["time"] == "night":
        out += " The moon and stars shine in the sky."
    return out


def qa_photo(s: Scene, rng: random.Random) -> list[QA]:
    p = s.params
    desc = describe_photo(p)
    nt = len(p["trees"])
    out = [
        QA(rng.choice(["Describe the image.", "What is shown in this picture?", "Write a short description of "
                       "this scene.", "Describe this photo in one or two sentences."]), desc, desc, short_ok=False),
        QA("What time of day is shown in the image?", {"day": "Day", "sunset": "Sunset", "night": "Night"}[p["time"]],
           f"The image shows the scene {TIME_PHRASE[p['time']]}."),
        QA("What kind of landscape is shown?", GROUND_SHORT[p["ground"]],
           f"The landscape is {GROUND_PHRASE[p['ground']]}."),
        QA("Are there mountains in the image?", "Yes" if p["mountains"] else "No",
           "Yes, there are mountains in the distance." if p["mountains"] else "No, there are no mountains."),
    ]
    if p["ground"] != "sea":
        out.append(QA("How many trees are in the image?", str(nt),
                      f"There {_is_are(nt)} {_plural(nt, 'tree')} in the image." if nt else
                      "There are no trees in the image."))
    return out


# ---- text-only (text_only) --------------------------------------------------------------------------

WORDS = ["garden", "window", "river", "pencil", "mountain", "orange", "bicycle", "planet", "butter", "candle"]
CAPITALS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Canada", "Ottawa"), ("Egypt", "Cairo"),
            ("Kenya", "Nairobi"), ("Peru", "Lima"), ("Norway", "Oslo"), ("Spain", "Madrid"), ("India", "New Delhi")]


def qa_text(rng: random.Random) -> QA:
    """One text-only question with a computed (or well-known) answer."""
    kind = rng.randrange(8)
    a, b = rng.randint(2, 60), rng.randint(2, 60)
    if kind == 0:
        return QA(f"What is {a} plus {b}?", str(a + b), f"{a} plus {b} equals {a + b}.")
    if kind == 1:
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return QA(f"What is {a} times {b}?", str(a * b), f"{a} times {b} equals {a * b}.")
    if kind == 2:
        while a == b:
            b = rng.randint(2, 60)
        return QA(f"Which number is larger, {a} or {b}?", str(max(a, b)), f"{max(a, b)} is larger than {min(a, b)}.")
    if kind == 3:
        w = rng.choice(WORDS)
        return QA(f'How many letters are in the word "{w}"?', str(len(w)), f'The word "{w}" has {len(w)} letters.')
    if kind == 4:
        nums = rng.sample(range(1, 50), rng.randint(3, 5))
        s = ", ".join(map(str, sorted(nums)))
        return QA(f"Sort these numbers from smallest to largest: {', '.join(map(str, nums))}.", s,
                  f"From smallest to largest, the numbers are {s}.")
    if kind == 5:
        h = rng.randint(2, 9)
        return QA(f"How many minutes are in {h} hours?", str(60 * h), f"There are {60 * h} minutes in {h} hours.")
    if kind == 6:
        i = rng.randrange(7)
        return QA(f"What day comes after {WEEKDAYS[i]}?", WEEKDAYS[(i + 1) % 7],
                  f"The day after {WEEKDAYS[i]} is {WEEKDAYS[(i + 1) % 7]}.")
    country, city = rng.choice(CAPITALS)
    return QA(f"What is the capital of {country}?", city, f"The capital of {country} is {city}.")


# ---- multi-image questions --------------------------------------------------------------------------


def qa_multi(scenes: list[Scene], rng: random.Random) -> list[QA]:
    """Questions that need two or three images of the same source at once."""
    src = scenes[0].source
    n = len(scenes)
    k = rng.randrange(n)
    out: list[QA] = []
    if src == "count_like":
        counts = [_counts(s.params["items"]) for s in scenes]
        t = rng.choice([x for x in SHAPES if any(c[x] for c in counts)])
        tot = sum(c[t] for c in counts)
        out.append(QA(f"How many {t}s are there in all the images combined?", str(tot),
                      f"There {_is_are(tot)} {_plural(tot, t)} in all the images combined."))
        m = len(scenes[k].params["items"])
        out.append(QA(f"How many shapes are in the {ORDINALS[k]} image?", str(m),
                      f"There {_is_are(m)} {_plural(m, 'shape')} in the {ORDINALS[k]} image."))
        a, b = counts[0][t], counts[1][t]
        if a != b:
            w = "first" if a > b else "second"
            out.append(QA(f"Which image has more {t}s, the first or the second?", f"The {w} image",
                          f"The {w} image has more {t}s ({max(a, b)} versus {min(a, b)})."))
    elif src == "chartqa_like":
        out.append(QA(f"What is the title of the {ORDINALS[k]} chart?", scenes[k].params["title"],
                      f'The title of the {ORDINALS[k]} chart is "{scenes[k].params["title"]}".'))
        m = [max(s.params["values"]) for s in scenes]
        if n == 2 and m[0] != m[1]:
            w = "first" if m[0] > m[1] else "second"
            out.append(QA("Which chart has the higher maximum value, the first or the second?", f"The {w} chart",
                          f"The {w} chart has the higher maximum value ({max(m)} versus {min(m)})."))
    elif src == "photo_like":
        desc = describe_photo(scenes[k].params)
        out.append(QA(f"Describe the {ORDINALS[k]} image.", desc, desc, short_ok=False))
        tp = scenes[k].params["time"]
        out.append(QA(f"What time of day is shown in the {ORDINALS[k]} image?",
                      {"day": "Day", "sunset": "Sunset", "night": "Night"}[tp],
                      f"The {ORDINALS[k]} image shows the scene {TIME_PHRASE[tp]}."))
    else:
        kind = scenes[k].params["kind"]
        out.append(QA(f"What type of document is shown in the {ORDINALS[k]} image?", kind.capitalize(),
                      f"The {ORDINALS[k]} image shows a {kind}."))
        for q in qa_doc(scenes[k], rng)[:2]:  # name the image: two documents may be of the same kind
            out.append(QA(f"In the {ORDINALS[k]} image, {q.question[0].lower()}{q.question[1:]}", q.short,
                          q.sentence))
    return out


MAKERS = {"chartqa_like": make_chart, "count_like": make_shapes, "doc_like": make_doc, "photo_like": make_photo}
RENDERERS = {"chartqa_like": render_chart, "count_like": render_shapes, "doc_like": render_doc,
             "photo_like": render_photo}
QAS = {"chartqa_like": qa_chart, "count_like": qa_shapes, "doc_like": qa_doc, "photo_like": qa_photo}


def render(s: Scene, nrng: np.random.Generator) -> Image.Image:
    """Draw a scene as an RGB PIL image."""
    return RENDERERS[s.source](s, nrng)


def questions(s: Scene, rng: random.Random) -> list[QA]:
    """All questions this scene can answer, with correct answers."""
    return QAS[s.source](s, rng)
