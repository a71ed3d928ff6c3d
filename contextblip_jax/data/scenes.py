"""What the generated image sets show: scene records, the four scene kinds, and what a description means.

A scene is a tuple of `Thing`s (colour, shape, column, height), so a description's truth is decided on the
records, never on pixels. Each kind draws the 10 scenes of a set and lists the queries true of one of them;
`synthetic.py` keeps a query for a target only when `holds` is true of the target and of no other scene in
the set, then words it with `text`.

| kind         | set    | the 10 images                                         | descriptions need                 |
|--------------|--------|-------------------------------------------------------|-----------------------------------|
| `attributes` | static | a column of 1-2 equal shapes; 10 distinct (colour,    | colour, shape, count, position    |
|              |        | shape, position) combinations                         | ("two blue triangles on the left") |
| `motion`     | video  | one step per frame of a snake over (count, position), | count and position                |
|              |        | one colour and shape for the whole clip               |                                   |
| `relation`   | static | two shapes; the others swap or rearrange them, or     | colour, shape, relative position  |
|              |        | recolour or reshape one                               | ("the red square to the left of   |
|              |        |                                                       | the blue circle")                 |
| `timeline`   | video  | shapes of two kinds appear and disappear, one change  | the moment in time ("just after   |
|              |        | per frame, no state seen twice                        | the second red square appears")   |
| `recolour`   | video  | a shape in the middle changes colour now and then (a  | comparing frames: every colour is |
|              |        | colour comes back); a grey clock shape walks the two  | seen in several frames ("the      |
|              |        | side columns, so no frame repeats                     | second time the square turns red")|
| `detail`     | static | one shape each; most share the target's colour and    | a small mark, a thin outline or   |
|              |        | shape and differ only in a detail a few pixels wide   | stripes ("the red circle with a   |
|              |        |                                                       | small dot")                       |

Imports: its own package (`data`) only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {
    "red": (215, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (230, 200, 40),
    "purple": (135, 55, 175),
    "orange": (240, 135, 30),
}
_CLOCK_RGB = (120, 120, 120)
_MARK_RGB = (25, 25, 25)
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "middle", "right")
COUNTS = ("one", "two", "three", "four")
ORDINALS = ("first", "second", "third", "fourth")
RELATIONS = ("left of", "right of", "above", "below")
KINDS = ("attributes", "motion", "relation", "timeline", "recolour", "detail")
VIDEO_KINDS = ("motion", "timeline", "recolour")
DETAILS = ("plain", "dot", "outline", "stripes")
"""What a `detail` shape carries besides its fill: nothing, a dot at its centre, a dark rim, horizontal stripes."""
CLOCK = "grey"
"""The colour of `recolour`'s clock shape, which no description names."""
NUM_FRAMES = 10
_COLUMN_X = (0.2, 0.5, 0.8)
_POSITION_PHRASE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}
_RELATION_PHRASE = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
_SLOTS = [(column, y) for column in range(3) for y in (0.25, 0.5, 0.75)]


@dataclasses.dataclass(frozen=True, order=True)
class Thing:
    """One drawn shape: `column` 0/1/2 is left/middle/right, `y` its centre's height (fraction, 0 = top), `detail`
    one of `DETAILS` or empty (the kinds without details)."""

    colour: str
    shape: str
    column: int
    y: float
    detail: str = ""


Scene = tuple[Thing, ...]  # sorted, so that equal scenes compare equal
Query = tuple  # (name, *arguments); see `holds`


def scene(things: list[Thing]) -> Scene:
    return tuple(sorted(things))


def group(colour: str, shape: str, column: int, count: int) -> Scene:
    """`count` equal shapes stacked evenly in one column."""
    return scene([Thing(colour, shape, column, (i + 1) / (count + 1)) for i in range(count)])


Box = tuple[float, float, float, float]
"""(left, top, right, bottom) in pixels of the rendered image."""


def place(things: Scene, size: int, rng: np.random.Generator) -> list[tuple[Thing, Box]]:
    """Where `render` draws each shape: radius 0.07·size, each column moved sideways and the whole scene
    vertically by a pixel or two (the draws `render` makes, in its order)."""
    radius = 0.07 * size
    jitter = rng.uniform(-0.03, 0.03, size=3) * size
    shift = rng.uniform(-0.02, 0.02) * size
    placed = []
    for thing in things:
        x = _COLUMN_X[thing.column] * size + jitter[thing.column]
        y = thing.y * size + shift
        placed.append((thing, (x - radius, y - radius, x + radius, y + radius)))
    return placed


def draw(placed: list[tuple[Thing, Box]], size: int, background: tuple[int, int, int]) -> Image.Image:
    """The placed shapes on a plain background. Shapes are mirror-symmetric, so a text-aware flip (left ↔ right)
    stays truthful."""
    image = Image.new("RGB", (size, size), background)
    canvas = ImageDraw.Draw(image)
    for thing, box in placed:
        fill = _CLOCK_RGB if thing.colour == CLOCK else COLOURS[thing.colour]
        outline = _MARK_RGB if thing.detail == "outline" else None
        width = max(1, round(size / 64))
        left, top, right, bottom = box
        if thing.shape == "circle":
            canvas.ellipse(box, fill=fill, outline=outline, width=width)
        elif thing.shape == "square":
            canvas.rectangle(box, fill=fill, outline=outline, width=width)
        else:
            corners = [((left + right) / 2, top), (left, bottom), (right, bottom)]
            canvas.polygon(corners, fill=fill, outline=outline, width=width)
        centre = (left + right) / 2
        if thing.detail == "dot":
            y = (top + 2 * bottom) / 3 if thing.shape == "triangle" else (top + bottom) / 2
            r = size / 40
            canvas.ellipse((centre - r, y - r, centre + r, y + r), fill=_MARK_RGB)
        elif thing.detail == "stripes":
            half = (right - left) / 2 - width
            for y in np.arange(top + 2 * width, bottom - width, 3 * width):
                reach = half * (y - top) / (bottom - top) if thing.shape == "triangle" else half
                if reach > width:
                    canvas.line([(centre - reach, y), (centre + reach, y)], fill=(255, 255, 255), width=width)
    return image


def render(things: Scene, size: int, background: tuple[int, int, int], rng: np.random.Generator) -> Image.Image:
    """`things` placed (`place`) and drawn (`draw`)."""
    return draw(place(things, size, rng), size, background)


def count(things: Scene, colour: str, shape: str) -> int:
    return sum(t.colour == colour and t.shape == shape for t in things)


def _related(a: Thing, relation: str, b: Thing) -> bool:
    if relation in ("left of", "right of"):
        return a.column < b.column if relation == "left of" else a.column > b.column
    return a.column == b.column and (a.y < b.y if relation == "above" else a.y > b.y)


def holds(query: Query, scenes: list[Scene], index: int) -> bool:
    """Whether `query` is true of frame `index` of the set (temporal queries look at its neighbours)."""
    name, *args = query
    here = scenes[index]
    if name == "group":  # exactly `count` colour shapes in that column and nothing else
        return here == group(*args)
    if name == "detail":  # the set's one shape of that colour, kind and detail
        return len(here) == 1 and (here[0].colour, here[0].shape, here[0].detail) == tuple(args)
    if name in ("turns", "before_turns"):  # the k-th time the recoloured shape takes that colour (or the frame before)
        _, colour, k = args
        onsets = _onsets(recoloured(scenes), colour)
        return len(onsets) >= k and onsets[k - 1] == (index if name == "turns" else index + 1)
    if name == "relation":
        (colour_a, shape_a), relation, (colour_b, shape_b) = args
        pairs = ((a, b) for a in here for b in here if a is not b)
        return any(
            (a.colour, a.shape, b.colour, b.shape) == (colour_a, shape_a, colour_b, shape_b)
            and _related(a, relation, b)
            for a, b in pairs
        )
    colour, shape, k = args
    counts = [count(s, colour, shape) for s in scenes]
    if name == "appears":  # the k-th one is there now and was not in the frame before
        return index > 0 and counts[index - 1] == k - 1 and counts[index] == k
    if name == "before_appears":
        return index + 1 < len(scenes) and counts[index] == k - 1 and counts[index + 1] == k
    if name == "disappears":  # the last one is gone now
        return index > 0 and counts[index - 1] == 1 and counts[index] == 0
    if name == "last_with":
        return counts[index] == k and all(c != k for c in counts[index + 1 :])
    raise ValueError(f"unknown query {name!r}")


def _onsets(colours: list[str], colour: str) -> list[int]:
    """The frames where `recolour`'s shape takes `colour` after showing another (its first frame never counts)."""
    return [i for i in range(1, len(colours)) if colours[i] == colour and colours[i - 1] != colour]


def recoloured(scenes: list[Scene]) -> list[str]:
    """The colour of `recolour`'s shape (the one not grey) in each frame."""
    return [next(t.colour for t in scene if t.colour != CLOCK) for scene in scenes]


_DETAIL_TEMPLATES = {
    "plain": ("the plain {c} {s}", "the {c} {s} without any marks"),
    "dot": ("the {c} {s} with a small dot", "the {c} {s} with a dot in the middle"),
    "outline": ("the {c} {s} with a thin dark outline", "the {c} {s} drawn with a thin outline"),
    "stripes": ("the striped {c} {s}", "the {c} {s} with white stripes"),
}
_TURN_TEMPLATES = {
    ("turns", True): ("just after the {s} turns {c}", "the moment the {s} becomes {c}"),
    ("turns", False): ("the {o} time the {s} turns {c}", "just after the {s} turns {c} for the {o} time"),
    ("before_turns", True): ("just before the {s} turns {c}", "the last frame before the {s} becomes {c}"),
    ("before_turns", False): ("just before the {s} turns {c} for the {o} time",),
}


def text(query: Query, rng: np.random.Generator) -> str:
    """The query in one of a few ordinary wordings."""
    name, *args = query
    if name == "detail":
        colour, shape, detail = args
        templates = _DETAIL_TEMPLATES[detail]
        return templates[int(rng.integers(len(templates)))].format(c=colour, s=shape)
    if name in ("turns", "before_turns"):
        shape, colour, k = args
        templates = _TURN_TEMPLATES[name, k == 1]
        return templates[int(rng.integers(len(templates)))].format(s=shape, c=colour, o=ORDINALS[k - 1])
    if name == "group":
        colour, shape, column, n = args
        words = dict(n=COUNTS[n - 1], c=colour, s=shape if n == 1 else shape + "s", be="is" if n == 1 else "are")
        words["p"] = _POSITION_PHRASE[POSITIONS[column]]
        templates = (
            "{n} {c} {s} {p}",
            "there {be} {n} {c} {s} {p} of the picture",
            "the picture shows {n} {c} {s} {p}",
            "{n} {c} {s} can be seen {p} and nothing else",
            "in this image {n} {c} {s} {be} {p}",
        )
    elif name == "relation":
        (colour_a, shape_a), relation, (colour_b, shape_b) = args
        words = dict(a=f"{colour_a} {shape_a}", r=_RELATION_PHRASE[relation], b=f"{colour_b} {shape_b}")
        templates = ("the {a} {r} the {b}", "{an_a} is {r} {an_b}", "there is {an_a} {r} the {b}")
        words.update(an_a=_indefinite(words["a"]), an_b=_indefinite(words["b"]))
    else:
        colour, shape, k = args
        words = dict(o=ORDINALS[k - 1] if k else "", c=colour, s=shape, n=COUNTS[k - 1] if k else "")
        words.update(ss=shape if k == 1 else shape + "s", be="is" if k == 1 else "are")
        templates = {
            "appears": ("just after the {o} {c} {s} appears", "the moment the {o} {c} {s} shows up"),
            "before_appears": ("just before the {o} {c} {s} appears", "the frame right before the {o} {c} {s} appears"),
            "disappears": ("just after the {c} {s} disappears", "right after the {c} {s} is gone"),
            "last_with": ("the last frame where there {be} {n} {c} {ss}", "the last moment with {n} {c} {ss}"),
        }[name]
    return templates[int(rng.integers(len(templates)))].format(**words)


def _indefinite(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def _types(rng: np.random.Generator, n: int) -> list[tuple[str, str]]:
    combos = [(c, s) for c in COLOURS for s in SHAPES]
    return [combos[i] for i in rng.choice(len(combos), n, replace=False)]


def attributes(rng: np.random.Generator) -> list[Scene]:
    n = int(rng.integers(1, 3))
    combos = [(c, s, p) for c in COLOURS for s in SHAPES for p in range(3)]
    return [group(*combos[i], n) for i in rng.choice(len(combos), NUM_FRAMES, replace=False)]


def motion(rng: np.random.Generator) -> list[Scene]:
    """A window of 10 consecutive states on a snake path over (count, position): one step per frame."""
    colour = list(COLOURS)[rng.integers(len(COLOURS))]
    shape = SHAPES[rng.integers(len(SHAPES))]
    path = []
    for n in range(1, len(COUNTS) + 1):
        row = range(3) if n % 2 else range(2, -1, -1)
        path += [group(colour, shape, column, n) for column in row]
    if rng.random() < 0.5:
        path.reverse()
    start = int(rng.integers(len(path) - NUM_FRAMES + 1))
    return path[start : start + NUM_FRAMES]


def _pair(a: tuple[str, str], b: tuple[str, str], relation: str, column: int, other: int) -> Scene:
    """`a` and `b` placed so that `a relation b` holds: side by side in two columns, or stacked in one."""
    if relation in ("left of", "right of"):
        left, right = sorted((column, other))
        ca, cb = (left, right) if relation == "left of" else (right, left)
        return scene([Thing(*a, ca, 0.5), Thing(*b, cb, 0.5)])
    ya, yb = (1 / 3, 2 / 3) if relation == "above" else (2 / 3, 1 / 3)
    return scene([Thing(*a, column, ya), Thing(*b, column, yb)])


def relation(rng: np.random.Generator) -> list[Scene]:
    """A target pair and hard negatives: the pair swapped or rearranged, one shape recoloured or reshaped."""
    a, b = _types(rng, 2)
    wanted = ("relation", a, RELATIONS[rng.integers(4)], b)

    def draw(x: tuple[str, str], y: tuple[str, str]) -> Scene:
        column, other = rng.choice(3, 2, replace=False)
        return _pair(x, y, RELATIONS[rng.integers(4)], int(column), int(other))

    def variant(x: tuple[str, str]) -> tuple[str, str]:
        if rng.random() < 0.5:
            return list(COLOURS)[rng.integers(len(COLOURS))], x[1]
        return x[0], SHAPES[rng.integers(len(SHAPES))]

    column, other = map(int, rng.choice(3, 2, replace=False))
    target = _pair(a, b, wanted[2], column, other)
    scenes = [target]
    makers: list[Callable[[], Scene]] = [
        lambda: draw(a, b),
        lambda: draw(b, a),
        lambda: draw(variant(a), b),
        lambda: draw(a, variant(b)),
        lambda: draw(*_types(rng, 2)),
    ]
    while len(scenes) < NUM_FRAMES:
        candidate = makers[rng.integers(len(makers))]()
        distinct = len({(t.colour, t.shape) for t in candidate}) == 2
        if distinct and candidate not in scenes and not holds(wanted, [candidate], 0):
            scenes.append(candidate)
    rng.shuffle(scenes)
    return scenes


def timeline(rng: np.random.Generator) -> list[Scene]:
    """Shapes of two kinds in a 3×3 grid; each frame one appears or disappears; no state repeats."""
    kinds = _types(rng, 2)
    while True:
        state: dict[tuple[int, float], tuple[str, str]] = {}
        for slot in rng.choice(len(_SLOTS), int(rng.integers(0, 3)), replace=False):
            state[_SLOTS[slot]] = kinds[rng.integers(2)]
        frames = [_state_scene(state)]
        while len(frames) < NUM_FRAMES:
            if not state or (len(state) < 5 and rng.random() < 0.65):
                free = [s for s in _SLOTS if s not in state]
                state[free[rng.integers(len(free))]] = kinds[rng.integers(2)]
            else:
                del state[list(state)[rng.integers(len(state))]]
            frames.append(_state_scene(state))
        if len(set(frames)) == NUM_FRAMES:
            return frames


def recolour(rng: np.random.Generator) -> list[Scene]:
    """A shape in the middle whose colour changes now and then among two or three, one colour taken at least
    twice; a grey shape of another kind walks down the left column and up the right one, a step per frame."""
    shape, clock = (SHAPES[i] for i in rng.choice(len(SHAPES), 2, replace=False))
    palette = [list(COLOURS)[i] for i in rng.choice(len(COLOURS), int(rng.integers(2, 4)), replace=False)]
    while True:
        colours = [palette[int(rng.integers(len(palette)))]]
        for _ in range(NUM_FRAMES - 1):
            others = [c for c in palette if c != colours[-1]]
            colours.append(others[int(rng.integers(len(others)))] if rng.random() < 0.45 else colours[-1])
        if any(len(_onsets(colours, c)) >= 2 for c in palette):
            break
    heights = (0.15, 0.325, 0.5, 0.675, 0.85)
    path = [(0, y) for y in heights] + [(2, y) for y in reversed(heights)]
    if rng.random() < 0.5:
        path.reverse()
    return [scene([Thing(c, shape, 1, 0.5), Thing(CLOCK, clock, *slot)]) for c, slot in zip(colours, path, strict=True)]


def detail(rng: np.random.Generator) -> list[Scene]:
    """One shape per image, six of the target's colour and kind with their details and places drawn at random, two
    of another colour and two of another kind: only a detail a few pixels wide tells the first six apart."""
    (colour, shape), (other_colour, other_shape) = _types(rng, 2)
    other_shape = next(s for s in SHAPES if s != shape) if other_shape == shape else other_shape
    other_colour = next(c for c in COLOURS if c != colour) if other_colour == colour else other_colour
    looks = [(colour, shape)] * 6 + [(other_colour, shape)] * 2 + [(colour, other_shape)] * 2
    while True:  # until some image's colour, kind and detail are its own (a set with no such image names nothing)
        scenes: list[Scene] = []
        for c, s in looks:
            while True:
                candidate = scene([Thing(c, s, int(rng.integers(3)), 0.5, DETAILS[int(rng.integers(len(DETAILS)))])])
                if candidate not in scenes:
                    scenes.append(candidate)
                    break
        rng.shuffle(scenes)
        looked = [(t.colour, t.shape, t.detail) for (t,) in scenes]
        if any(looked.count(look) == 1 for look in looked):
            return scenes


def _state_scene(state: dict[tuple[int, float], tuple[str, str]]) -> Scene:
    return scene([Thing(colour, shape, column, y) for (column, y), (colour, shape) in state.items()])


def true_queries(kind: str, scenes: list[Scene], index: int) -> list[Query]:
    """Every query of the kind's vocabulary that is true of frame `index` (unique or not)."""
    here = scenes[index]
    if kind in ("attributes", "motion"):
        first = here[0]
        return [("group", first.colour, first.shape, first.column, len(here))]
    if kind == "relation":
        return [
            ("relation", (a.colour, a.shape), r, (b.colour, b.shape))
            for a in here
            for b in here
            for r in RELATIONS
            if a is not b and _related(a, r, b)
        ]
    if kind == "detail":
        return [("detail", t.colour, t.shape, t.detail) for t in here]
    if kind == "recolour":
        shape = next(t.shape for t in here if t.colour != CLOCK)
        palette = sorted({t.colour for s in scenes for t in s if t.colour != CLOCK})
        queries = [(name, shape, c, k) for name in ("turns", "before_turns") for c in palette for k in range(1, 5)]
        colours = recoloured(scenes)
        if colours.count(colours[index]) < 2:  # a colour seen once would single the frame out without its context
            return []
        return [q for q in queries if holds(q, scenes, index)]
    types = sorted({(t.colour, t.shape) for s in scenes for t in s})
    found = []
    for colour, shape in types:
        found += [("appears", colour, shape, k) for k in range(1, 5)]
        found += [("before_appears", colour, shape, k) for k in range(1, 5)]
        found += [("disappears", colour, shape, 0), *(("last_with", colour, shape, k) for k in range(1, 5))]
    return [q for q in found if holds(q, scenes, index)]


def described(query: Query, things: Scene) -> list[Thing]:
    """The shapes of a frame that a description names: the whole group; both shapes of a relation; the shapes of
    a temporal query's colour and kind present in the frame (none when it names a shape that is gone)."""
    name, *args = query
    if name == "group":
        return list(things)
    if name == "detail":
        return list(things)
    if name in ("turns", "before_turns"):
        return [t for t in things if t.colour != CLOCK]
    if name == "relation":
        named = {tuple(args[0]), tuple(args[2])}
        return [t for t in things if (t.colour, t.shape) in named]
    colour, shape, _ = args
    return [t for t in things if (t.colour, t.shape) == (colour, shape)]


SAMPLERS: dict[str, Callable[[np.random.Generator], list[Scene]]] = {
    "attributes": attributes,
    "motion": motion,
    "relation": relation,
    "timeline": timeline,
    "recolour": recolour,
    "detail": detail,
}
