"""
ShapeWorld: the toy world of this project and its exact judge.

The paper needs two outside services: a strong judge (InternVL, answering "does this image match the
description?") for rewards and SFT labels, and a benchmark with an automatic checker (GenEval and
its object detector). At toy scale both become this one exact program over synthetic scenes:

- scenes: a plain white background with 1-4 flat objects (3 shapes x 6 colours), rendered by PIL;
- prompts: GenEval's six categories plus long "compositional" prompts, each a list of atomic facts
  with one canonical English rendering, and a parser that reads that English back;
- the checker: image + prompt -> verdict, soft score (fraction of facts that hold: our stand-in for
  the judge's P(yes), SPEC.md section 5) and a reason sentence ("No, the circle is green, not red.");
  an image with more than four objects is no scene and fails ("No, there are too many shapes.");
- edit instructions (recolour, remove, add, move) with follow / preserve scores;
- repair: the fewest edits that make a grid-world scene (or an image read back into one) match a
  prompt, its other objects kept: what SFT's Task III teaches a redraw after "No, <reason>" to do;
- seeded train / val / test / ood prompt splits.

The checker never looks at the scene graph: it parses pixels (chroma mask, hue classes, connected
components, fill ratio of the bounding box, bounding-box centres) into objects, then evaluates the
facts with the very same function that evaluates them on the true scene graph. So "checker == truth"
reduces to "perception is exact", which the tests measure on thousands of scenes.

Run `python shapes.py --out out/shapes` to see the world: example grids per category, checker
verdicts on deliberately wrong images, and edits.
"""

import argparse
import json
import math
import os
import random
import sys
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# -----------------------------------------------------------------------------
# The vocabulary of the world

SHAPES = ("circle", "square", "triangle")
# Saturated colours with well separated hues (red 0, orange 28, yellow 56, green 136, blue 225,
# purple 281 degrees). Blending any of them with the white background (anti-aliasing, blur, JPEG,
# a VQ decoder) keeps the hue and only lowers the chroma, which is what makes the checker robust.
COLOURS = {
    "red": (220, 30, 30),
    "orange": (255, 120, 0),
    "yellow": (240, 225, 0),
    "green": (20, 170, 60),
    "blue": (30, 80, 230),
    "purple": (150, 40, 200),
}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUND = (255, 255, 255)
CATEGORIES = ("single", "two", "counting", "colour", "position", "colour_attr", "compositional")
RELATIONS = ("left of", "right of", "above", "below")
REL_TEXT = {"left of": "to the left of", "right of": "to the right of", "above": "above", "below": "below"}
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
MAX_OBJECTS = 4  # a scene holds 1-4 objects; an image with more is not a ShapeWorld scene
DIRECTIONS = ("left", "right", "up", "down")
# Colour-shape pairings that never appear in training text: the `ood` split tests whether a model
# generalises to them (the paper's "SFT memorises, RL generalises").
OOD_PAIRS = (("purple", "triangle"), ("orange", "circle"), ("green", "square"))

# Geometry, as fractions of the image side W, so any square size works (64 toy, 32 tiny).
SIZE_RANGE = (0.22, 0.32)  # object side (bounding box) range
GAP = 0.06                 # min empty space between two objects' boxes: blur must not merge them
REL_T = 0.15               # "A left of B" <=> centre_x(B) - centre_x(A) > REL_T * W (same for y)
BAND = (0.10, 0.20)        # scenes never place two centres at a distance in this band on either
                           # axis, so relations are unambiguous even if a centre moves by ~3 px
MOVE = 0.30                # how far an edit "move" shifts an object
# The grid world (the toy preset): objects of one size sit centred in the cells of a grid x grid
# raster whose cells are the VQ's patches (64 px / 4 = 16 px), so one object is one image token and
# its colour and shape live in one code. grid 0 is the free world above. Relations stay unambiguous:
# two centres are 0 or >= one cell (W / 4 > REL_T * W) apart, never in BAND.
GRID_FILL = 0.75           # object side / cell side (12 px in a 16 px cell: a 4 px gap, > GAP * W)


def plural(shape, n):
    return shape if n == 1 else shape + "s"


def article(word):
    return "an" if word[0] in "aeiou" else "a"


# Every lowercase word that prompts, reasons and edit instructions can contain (reasons also use the
# capitalised "Yes"/"No" and the punctuation "," and "."). The text tokenizer is built from this.
WORDS = sorted(set(
    "a an and one two three four many no none not of the there is are image shows it"
    " to left right above below make remove add move up down too shapes".split()
    + list(COLOURS) + list(SHAPES) + [s + "s" for s in SHAPES]))

# -----------------------------------------------------------------------------
# Prompts: lists of atomic facts


@dataclass(frozen=True)
class Fact:
    """One checkable statement. kind 'exists': at least one (colour, shape); 'count': exactly n of
    them; 'rel': some (colour, shape) object stands `rel` of some other (colour2, shape2) object.
    colour None means any colour."""
    kind: str
    shape: str
    colour: str | None = None
    n: int = 1
    rel: str | None = None
    shape2: str | None = None
    colour2: str | None = None


@dataclass(frozen=True)
class Prompt:
    category: str
    facts: tuple
    text: str


def _np(colour, shape, n=1, counted=False):
    # noun phrase: "a red circle", "an orange square", "three squares", "a triangle"; counted: "one
    # circle" (exactly one), which "a circle" (at least one) is not
    words = ([colour] if colour else []) + [plural(shape, n)]
    det = article(words[0]) if n == 1 and not counted else NUMBERS[n]
    return " ".join([det] + words)


def fact_text(f):
    if f.kind == "exists":
        return _np(f.colour, f.shape)
    if f.kind == "count":
        return _np(f.colour, f.shape, f.n, counted=True)
    return f"{_np(f.colour, f.shape)} {REL_TEXT[f.rel]} {_np(f.colour2, f.shape2)}"


def infer_category(facts):
    kinds = [f.kind for f in facts]
    coloured = [f.colour is not None or f.colour2 is not None for f in facts]
    if kinds == ["exists"]:
        return "colour" if coloured[0] else "single"
    if kinds == ["count"] and not coloured[0]:
        return "counting"
    if kinds == ["rel"] and not coloured[0]:
        return "position"
    if kinds == ["exists", "exists"] and facts[0] != facts[1]:
        if not any(coloured) and facts[0].shape != facts[1].shape:
            return "two"
        if all(coloured):
            return "colour_attr"
    return "compositional"


def make_prompt(facts, category=None):
    facts = tuple(facts)
    return Prompt(category or infer_category(facts), facts, " and ".join(fact_text(f) for f in facts))


def parse_prompt(text):
    """English -> Prompt; the inverse of make_prompt. Raises ValueError naming the problem.

    >>> parse_prompt("a red circle to the left of two squares")  # doctest: +SKIP
    ValueError: prompt outside the grammar: ... (a relation's objects take "a"/"an")
    >>> parse_prompt("three squares").facts
    (Fact(kind='count', shape='square', colour=None, n=3, ...),)
    """
    words = _words(text, "prompt")
    facts = []
    for clause in _split_and(words, text):
        n, colour, shape, rest = _read_np(clause, text)
        if not rest:
            facts.append(Fact("count", shape, colour, n) if n > 1 or clause[0] == "one"
                         else Fact("exists", shape, colour))
            continue
        rel, rest = _read_rel(rest, text)
        n2, colour2, shape2, rest = _read_np(rest, text)
        if n != 1 or n2 != 1 or clause[0] == "one" or rest:
            raise ValueError(f"prompt outside the grammar: {text!r} (write relations as "
                             "'a circle to the left of a square')")
        facts.append(Fact("rel", shape, colour, 1, rel, shape2, colour2))
    # the objects the facts name, as the scene sampler places them: a scene holds at most 4
    n_objects = sum(f.n if f.kind == "count" else 2 if f.kind == "rel" else 1 for f in facts)
    if n_objects > MAX_OBJECTS:
        raise ValueError(f"prompt asks for {n_objects} objects, a ShapeWorld scene holds at most {MAX_OBJECTS}: {text!r}")
    return make_prompt(facts)


def _words(text, what):
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"empty {what}")
    words = text.strip().rstrip(".").lower().split()
    for w in words:
        if w not in WORDS:
            raise ValueError(f"unknown word {w!r} in {what} {text!r}")
    return words


def _split_and(words, text):
    clauses, cur = [], []
    for w in words + ["and"]:
        if w == "and":
            if not cur:
                raise ValueError(f"prompt outside the grammar: {text!r} (empty clause around 'and')")
            clauses.append(cur)
            cur = []
        else:
            cur.append(w)
    return clauses


def _read_np(ws, text):
    # det [colour] shape  ->  (n, colour, shape, remaining words)
    nums = {v: k for k, v in NUMBERS.items()}
    if len(ws) < 2 or (ws[0] not in ("a", "an") and ws[0] not in nums):
        raise ValueError(f"prompt outside the grammar: {text!r} (each object starts with a/an or a "
                         "number, e.g. 'a red circle', 'three squares')")
    n = nums.get(ws[0], 1)
    i = 1
    colour = None
    if ws[i] in COLOURS:
        colour, i = ws[i], i + 1
    if i >= len(ws) or ws[i] != plural(ws[i].rstrip("s"), n) or ws[i].rstrip("s") not in SHAPES:
        raise ValueError(f"prompt outside the grammar: {text!r} (expected a shape"
                         f"{'' if n == 1 else ' in the plural'} after {' '.join(ws[:i])!r})")
    return n, colour, ws[i].rstrip("s"), ws[i + 1:]


def _read_rel(ws, text):
    for rel, phrase in REL_TEXT.items():
        p = phrase.split()
        if ws[:len(p)] == p:
            return rel, ws[len(p):]
    raise ValueError(f"prompt outside the grammar: {text!r} (unexpected {' '.join(ws)!r}; "
                     "relations are: to the left of, to the right of, above, below)")


def is_ood(prompt):
    """True if the prompt names one of the held-out colour-shape pairings."""
    pairs = set()
    for f in prompt.facts:
        pairs |= {(f.colour, f.shape), (f.colour2, f.shape2)}
    return any(p in pairs for p in OOD_PAIRS)


def text_mentions_ood(text):
    """For any text (prompts, reasons, captions): does it pair a held-out colour with its shape,
    either as "purple triangle(s)" or as "triangle(s) is/are purple"?"""
    ws = [w.rstrip("s") if w.rstrip("s") in SHAPES else w
          for w in text.lower().replace(".", " ").replace(",", " ").split()]
    pairs = set(zip(ws, ws[1:])) | {(c, s) for s, v, c in zip(ws, ws[1:], ws[2:]) if v in ("is", "are")}
    return any(p in pairs for p in OOD_PAIRS)


# -----------------------------------------------------------------------------
# Scenes and rendering


@dataclass
class Obj:
    shape: str
    colour: str
    x: int  # top-left corner of the bounding box, pixels
    y: int
    s: int  # side of the (square) bounding box, pixels

    @property
    def cx(self):  # centre of the drawn pixels' bounding box (PIL draws both ends inclusive)
        return self.x + (self.s - 1) / 2

    @property
    def cy(self):
        return self.y + (self.s - 1) / 2


@dataclass
class Scene:
    size: int
    objects: list = field(default_factory=list)
    grid: int = 0  # cells per side in the grid world, 0 = free placement


def _draw(d, o, fill):
    x1, y1 = o.x + o.s - 1, o.y + o.s - 1
    if o.shape == "circle":
        d.ellipse([o.x, o.y, x1, y1], fill=fill)
    elif o.shape == "square":
        d.rectangle([o.x, o.y, x1, y1], fill=fill)
    else:  # isosceles triangle pointing up, base = bounding-box width
        d.polygon([(o.x, y1), (x1, y1), (o.x + (o.s - 1) / 2, o.y)], fill=fill)


def render(scene):
    """Scene -> uint8 array (size, size, 3). Hard edges (no anti-aliasing): the colours stay exact."""
    img = Image.new("RGB", (scene.size, scene.size), BACKGROUND)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        _draw(d, o, COLOURS[o.colour])
    return np.asarray(img)


def object_map(scene):
    """Scene -> uint8 (size, size): which object each pixel shows, 1 + its index (0 = background),
    drawn exactly as `render` draws the objects."""
    img = Image.new("L", (scene.size, scene.size), 0)
    d = ImageDraw.Draw(img)
    for i, o in enumerate(scene.objects):
        _draw(d, o, i + 1)
    return np.asarray(img)


def _fits(o, others, W):
    # inside the image, separated from every other box by GAP, and no centre distance in BAND
    m = max(1, round(0.03 * W))
    if o.x < m or o.y < m or o.x + o.s > W - m or o.y + o.s > W - m:
        return False
    g, lo, hi = GAP * W, BAND[0] * W, BAND[1] * W
    for p in others:
        if not (o.x >= p.x + p.s + g or p.x >= o.x + o.s + g or o.y >= p.y + p.s + g or p.y >= o.y + o.s + g):
            return False
        if lo < abs(o.cx - p.cx) < hi or lo < abs(o.cy - p.cy) < hi:
            return False
    return True


def _random_obj(rng, W, shape=None, colour=None, grid=0):
    s = round(GRID_FILL * W / grid) if grid else rng.randint(round(SIZE_RANGE[0] * W), round(SIZE_RANGE[1] * W))
    return Obj(shape or rng.choice(SHAPES), colour or rng.choice(COLOUR_NAMES),
               rng.randint(0, W - s), rng.randint(0, W - s), s)


def _place(rng, objs, W, fixed=(), tries=50, grid=0):
    """Give objs random positions that fit next to the already placed `fixed` objects; None if the
    random search fails (callers retry with a new draw). grid: random free cells, object centred."""
    if grid:
        c = W // grid
        taken = {(o.x // c, o.y // c) for o in fixed}
        free = [(i, j) for j in range(grid) for i in range(grid) if (i, j) not in taken]
        if len(free) < len(objs):
            return None
        for o, (i, j) in zip(objs, rng.sample(free, len(objs))):
            o.x, o.y = i * c + (c - o.s) // 2, j * c + (c - o.s) // 2
        return objs
    for _ in range(tries):
        placed = list(fixed)
        for o in objs:
            for _ in range(40):
                o.x, o.y = rng.randint(0, W - o.s), rng.randint(0, W - o.s)
                if _fits(o, placed, W):
                    placed.append(o)
                    break
            else:
                break
        else:
            return placed[len(fixed):]
    return None


def random_scene(rng, size=64, n=None, grid=0):
    while True:
        objs = [_random_obj(rng, size, grid=grid) for _ in range(n or rng.randint(1, MAX_OBJECTS))]
        if _place(rng, objs, size, grid=grid) is not None:
            return Scene(size, objs, grid)


def random_images(rng, n, size=64, grid=0, most=MAX_OBJECTS):
    """A batch of random scenes of 1 to `most` objects, rendered: uint8 (n, size, size, 3). Used to
    train the VQ (which may see busier images than scenes: every object patch teaches it)."""
    return np.stack([render(random_scene(rng, size, rng.randint(1, most), grid)) for _ in range(n)])


def _needed(facts):
    # the objects a scene needs to make the facts true, as (shape, colour or None for any colour)
    need = []
    for f in facts:
        if f.kind == "exists":
            need.append((f.shape, f.colour))
        elif f.kind == "count":
            need += [(f.shape, f.colour)] * f.n
        else:
            need += [(f.shape, f.colour), (f.shape2, f.colour2)]
    return need


def _required(rng, facts):
    # the objects a scene needs (before distractors), each colour None made a random one
    return [(s, c or rng.choice(COLOUR_NAMES)) for s, c in _needed(facts)]


def sample_scene(rng, size=64, prompt=None, match=True, kind=None, grid=0, most=MAX_OBJECTS, aligned=False):
    """A scene for `prompt`: one where every fact holds (match=True) or one that violates it
    (match=False) in one deliberate way: kind in ("colour", "count", "missing", "relation"), or any
    that applies to the prompt when kind is None. Without a prompt: a random scene. grid: the grid
    world (see GRID_FILL), 0 = free placement. most: random distractors fill the scene up to this
    many objects (uniformly 0 to most - needed of them); 1 = the asked objects alone. aligned: the
    matching scene has every relation between two objects in one row or column (`relations_aligned`)."""
    if prompt is None:
        return random_scene(rng, size, grid=grid)
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    for _ in range(1000):
        need = _required(rng, prompt.facts)
        if len(need) > MAX_OBJECTS:
            raise ValueError(f"prompt needs {len(need)} objects, scenes hold at most {MAX_OBJECTS}: {prompt.text!r}")
        extra = rng.randint(0, max(0, most - len(need)))
        objs = [_random_obj(rng, size, s, c, grid) for s, c in need] + [_random_obj(rng, size, grid=grid) for _ in range(extra)]
        if _place(rng, objs, size, tries=5, grid=grid) is None:
            continue
        scene = Scene(size, objs, grid)
        if not all(truth(scene, prompt).holds) or (aligned and not relations_aligned(scene, prompt)):
            continue
        if match:
            return scene
        bad = corrupt(rng, scene, prompt, kind)
        if bad is not None:
            return bad
    raise RuntimeError(f"could not sample a {'matching' if match else kind or 'mismatching'} scene "
                       f"{'with aligned relations ' if aligned else ''}for {prompt.text!r}")


def relations_aligned(scene, prompt):
    """Whether each relation of the prompt holds between two objects in one row ("left of", "right
    of": centres at most REL_T * W apart vertically) or one column ("above", "below"). In raster
    order such a pair reads "one object, then the other further along its row or column", the
    drawing target a small model learns relations from (docs/experiments.md, "Relations: drawing
    targets in one row or column")."""
    W = scene.size
    for f in prompt.facts:
        if f.kind != "rel":
            continue
        across = (lambda a, b: abs(a.cy - b.cy)) if f.rel in ("left of", "right of") else (lambda a, b: abs(a.cx - b.cx))
        if not any(_rel_holds(a, b, f.rel, W) and across(a, b) <= REL_T * W
                   for a in scene.objects if _match(a, f.colour, f.shape)
                   for b in scene.objects if b is not a and _match(b, f.colour2, f.shape2)):
            return False
    return True


def failure_kinds(prompt):
    """The deliberate failures that make sense for a prompt."""
    kinds = ["missing"]
    if any(f.colour or f.colour2 for f in prompt.facts):
        kinds.append("colour")
    if any(f.kind == "count" for f in prompt.facts):
        kinds.append("count")
    if any(f.kind == "rel" for f in prompt.facts):
        kinds.append("relation")
    return kinds


def corrupt(rng, scene, prompt, kind=None):
    """Break one fact of a matching scene in a chosen way; None if this scene can't be broken so.

    Broken scenes keep the matching scene's objects wherever they can: an object that must go
    becomes another shape in the same box rather than being deleted, and "one more" turns a spare
    object into one more of the counted kind before it adds one. Negatives made by deleting had
    less ink than positives (fewer objects), and a judge could answer from the amount of colour
    without reading the prompt (evaluate.by_ink measures that). Ink is now equal on average, not per
    scene: a square fills its box, a circle ~0.79 of it, a triangle ~half."""
    kind = kind or rng.choice(failure_kinds(prompt))
    W, grid = scene.size, scene.grid
    objs = [replace(o) for o in scene.objects]
    i = rng.choice([i for i, f in enumerate(prompt.facts) if _can_fail(f, kind)] or [None])
    if i is None:
        raise ValueError(f"failure kind {kind!r} does not apply to {prompt.text!r}")
    f = prompt.facts[i]
    side = rng.randint(0, 1) if f.kind == "rel" else 0
    shape, colour = (f.shape2, f.colour2) if side else (f.shape, f.colour)
    targets = [o for o in objs if _match(o, colour, shape)]
    if kind == "colour":  # every object of the named colour+shape turns another colour
        for o in targets:
            o.colour = rng.choice([c for c in COLOUR_NAMES if c != colour])
    elif kind == "missing":  # every object of the named shape (any colour) becomes another shape
        for o in objs:
            if o.shape == shape:
                o.shape = rng.choice([s for s in SHAPES if s != shape])
    elif kind == "count":  # one too few or one too many, changing one object where possible
        fewer = f.n > 1 and rng.random() < 0.5
        if fewer:  # a counted object becomes another shape (same box and colour)
            edits = [(o, s, o.colour) for o in targets for s in SHAPES if s != o.shape]
        else:  # a spare object becomes one more of the counted kind
            edits = [(o, f.shape, f.colour or o.colour) for o in objs if o not in targets]
        rng.shuffle(edits)
        for o, s, c in edits:  # the first edit that breaks this fact and no other
            was = (o.shape, o.colour)
            o.shape, o.colour = s, c
            if _only_fails(Scene(W, objs, grid), prompt, i):
                return Scene(W, objs, grid)
            o.shape, o.colour = was
        if fewer or len(objs) == MAX_OBJECTS:
            return None
        new = _random_obj(rng, W, f.shape, f.colour, grid)
        if _place(rng, [new], W, fixed=objs, grid=grid) is None:
            return None
        objs.append(new)
    else:  # relation: mirror the scene so left<->right or above<->below swaps for every pair
        horizontal = f.rel in ("left of", "right of")
        for o in objs:
            o.x, o.y = (W - o.x - o.s, o.y) if horizontal else (o.x, W - o.y - o.s)
    bad = Scene(W, objs, grid)
    return bad if not all(truth(bad, prompt).holds) else None


def _only_fails(scene, prompt, i):
    holds = truth(scene, prompt).holds
    return not holds[i] and all(h for j, h in enumerate(holds) if j != i)


def _can_fail(f, kind):
    return {"colour": bool(f.colour or f.colour2), "count": f.kind == "count",
            "relation": f.kind == "rel", "missing": True}[kind]


def in_cell(o, cell, W, grid):
    """o moved to grid cell (column, row), centred in it: where the grid world puts every object."""
    c = W // grid
    return replace(o, x=cell[0] * c + (c - o.s) // 2, y=cell[1] * c + (c - o.s) // 2)


def scene_from_image(image, grid):
    """A grid-world image (a render or a model's drawing) read back into a Scene: each detected
    circle, square or triangle centred in the cell its centre falls in (the larger one where two
    share a cell); blobs, which are no ShapeWorld object, left out."""
    a = to_rgb_array(image)
    W = a.shape[0]
    c = W // grid
    s = round(GRID_FILL * W / grid)
    cells = {}
    for d in sorted(detect(a), key=lambda d: -d.area):
        cell = (min(int(d.cx // c), grid - 1), min(int(d.cy // c), grid - 1))
        if d.shape != "blob" and cell not in cells:
            cells[cell] = in_cell(Obj(d.shape, d.colour, 0, 0, s), cell, W, grid)
    return Scene(W, [cells[k] for k in sorted(cells, key=lambda k: (k[1], k[0]))], grid)


def repair(scene, prompt, steps=6):
    """The fewest edits that make a grid-world scene match the prompt, the other objects kept where
    they are: what a redraw after "No, <reason>" should change. Greedy: each step takes the edit that
    makes the most facts hold (a scene with more than MAX_OBJECTS objects counts each extra one as a
    failed fact), then puts in the most of the objects the prompt needs; on ties the first of
    recolour < reshape < move < trade places < add < remove, objects and cells in raster order.
    Edits only ever put in an object the prompt names. None when `steps` edits cannot make it match."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    W, grid = scene.size, scene.grid
    c = W // grid
    s = round(GRID_FILL * W / grid)
    named = [(f.shape, f.colour) for f in prompt.facts] + [(f.shape2, f.colour2) for f in prompt.facts if f.kind == "rel"]
    named = list(dict.fromkeys(named))

    need = sorted(_needed(prompt.facts), key=lambda sc: sc[1] is None)  # the coloured ones matched first

    def score(objs):  # (facts that hold less objects over MAX_OBJECTS, needed objects there, -counts' excess)
        left, there = list(objs), 0
        for shape, colour in need:
            o = next((o for o in left if _match(o, colour, shape)), None)
            if o is not None:
                left.remove(o)
                there += 1
        over = sum(max(0, sum(_match(o, f.colour, f.shape) for o in objs) - f.n) for f in prompt.facts if f.kind == "count")
        return sum(evaluate(objs, prompt, W).holds) - max(0, len(objs) - MAX_OBJECTS), there, -over

    at = lambda o, cell: in_cell(o, cell, W, grid)

    def edits(objs):  # every single edit, cheapest kind first
        taken = {(o.x // c, o.y // c) for o in objs}
        free = [(i, j) for j in range(grid) for i in range(grid) if (i, j) not in taken]
        swap = lambda k, o: objs[:k] + [o] + objs[k + 1:]
        for k, o in enumerate(objs):
            yield from (swap(k, replace(o, colour=col)) for sh, col in named if col and sh == o.shape and col != o.colour)
        for k, o in enumerate(objs):
            yield from (swap(k, replace(o, shape=sh, colour=col or o.colour)) for sh, col in named if sh != o.shape)
        for k, o in enumerate(objs):
            yield from (swap(k, at(o, cell)) for cell in free)
        for k, o in enumerate(objs):  # two objects trade places: a relation read the wrong way round
            for m in range(k + 1, len(objs)):
                p, q = at(o, (objs[m].x // c, objs[m].y // c)), at(objs[m], (o.x // c, o.y // c))
                yield objs[:k] + [p] + objs[k + 1:m] + [q] + objs[m + 1:]
        for cell in free:
            yield from (objs + [at(Obj(sh, col or COLOUR_NAMES[0], 0, 0, s), cell)] for sh, col in named)
        for k in range(len(objs)):
            yield objs[:k] + objs[k + 1:]

    objs, goal = sorted(scene.objects, key=lambda o: (o.y, o.x)), len(prompt.facts)  # ties: raster order
    for _ in range(steps):
        if score(objs)[0] == goal and len(objs) <= MAX_OBJECTS:
            break
        best = max(edits(objs), key=score, default=None)  # max keeps the first of equals
        if best is None or score(best) <= score(objs):
            return None
        objs = best
    out = Scene(W, objs, grid)
    return out if truth(out, prompt).verdict else None


def describe(scene):
    """The canonical caption of a scene: every object, grouped, e.g. 'a red circle and two blue
    squares'. A valid prompt (it parses back), used to teach understanding."""
    groups = {}
    for o in sorted(scene.objects, key=lambda o: (SHAPES.index(o.shape), COLOUR_NAMES.index(o.colour))):
        groups[(o.colour, o.shape)] = groups.get((o.colour, o.shape), 0) + 1
    return " and ".join(_np(c, s, n) for (c, s), n in groups.items())


# -----------------------------------------------------------------------------
# Evaluating facts on a list of objects (true scene graph or detected objects)


@dataclass
class Check:
    verdict: bool  # every fact holds, and the image holds at most MAX_OBJECTS objects
    score: float   # fraction of the prompt's facts that hold: our P(yes); with too many objects,
                   # the scene rule counts as one more (failed) condition
    reason: str    # "Yes, ..." or "No, <the first failed fact in plain words>." ("No, there are too
                   # many shapes." first when the image holds too many objects)
    holds: list    # one bool per fact (all True is possible with too many objects)


def _match(o, colour, shape):
    return o.shape == shape and (colour is None or o.colour == colour)


def _rel_holds(a, b, rel, W):
    dx, dy, t = b.cx - a.cx, b.cy - a.cy, REL_T * W
    return {"left of": dx > t, "right of": -dx > t, "above": dy > t, "below": -dy > t}[rel]


def _the(colour, shape):
    return "the " + (f"{colour} " if colour else "") + shape


def _count_words(k, colour, shape):
    word = "no" if k == 0 else NUMBERS.get(k, "many")
    return ("there is " if k == 1 else "there are ") + " ".join([word] + ([colour] if colour else []) + [plural(shape, k)])


def _exists_reason(objs, colour, shape):
    # why no (colour, shape) object exists: a wrong colour, or the shape is missing altogether
    same_shape = [o for o in objs if o.shape == shape]
    if colour and len(same_shape) == 1:
        return f"the {shape} is {same_shape[0].colour}, not {colour}"
    if colour and same_shape:
        return f"none of the {shape}s is {colour}"
    return "there is no " + (f"{colour} " if colour else "") + shape


def evaluate(objs, prompt, W):
    """Facts of `prompt` on objects with .shape .colour .cx .cy -> Check."""
    objs = sorted(objs, key=lambda o: (o.cy, o.cx))  # reasons must not depend on the list's order
    holds, reason = [], None
    for f in prompt.facts:
        ok, why = _eval_fact(f, objs, W)
        holds.append(ok)
        reason = reason or why
    if len(objs) > MAX_OBJECTS:
        # Not a ShapeWorld scene: without this rule an image strewn with coloured blobs "shows a
        # triangle" by luck (docs/experiments.md, "Checker: too many shapes"). The scene rule
        # counts as one more condition in the soft score.
        return Check(False, sum(holds) / (len(holds) + 1), "No, there are too many shapes.", holds)
    if all(holds):
        return Check(True, 1.0, f"Yes, the image shows {prompt.text}.", holds)
    return Check(False, sum(holds) / len(holds), f"No, {reason}.", holds)


def _eval_fact(f, objs, W):
    A = [o for o in objs if _match(o, f.colour, f.shape)]
    if f.kind == "exists":
        return (True, None) if A else (False, _exists_reason(objs, f.colour, f.shape))
    if f.kind == "count":
        if len(A) == f.n:
            return True, None
        return False, f"{_count_words(len(A), f.colour, f.shape)}, not {NUMBERS[f.n]}"
    B = [o for o in objs if _match(o, f.colour2, f.shape2)]
    if not A:
        return False, _exists_reason(objs, f.colour, f.shape)
    if not B:
        return False, _exists_reason(objs, f.colour2, f.shape2)
    if any(_rel_holds(a, b, f.rel, W) for a in A for b in B if a is not b):
        return True, None
    # Describe the pair that came closest (by the signed distance along the wanted axis).
    axis = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}[f.rel]
    a, b = max(((a, b) for a in A for b in B if a is not b),
               key=lambda p: axis[0] * (p[1].cx - p[0].cx) + axis[1] * (p[1].cy - p[0].cy),
               default=(A[0], A[0]))
    dx, dy = b.cx - a.cx, b.cy - a.cy
    actual = (("left of" if dx > 0 else "right of") if abs(dx) >= abs(dy) else ("above" if dy > 0 else "below"))
    wanted, ta, tb = REL_TEXT[f.rel], _the(f.colour, f.shape), _the(f.colour2, f.shape2)
    if a is b or actual == f.rel:
        return False, f"{ta} is not {wanted} {tb}"
    return False, f"{ta} is {REL_TEXT[actual]} {tb}, not {wanted} it"


def truth(scene, prompt):
    """The facts evaluated on the scene graph itself (what the checker must reproduce from pixels)."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    return evaluate(scene.objects, prompt, scene.size)


# -----------------------------------------------------------------------------
# The checker: pixels -> objects -> facts

CHROMA_MIN = 60  # max(rgb) - min(rgb) threshold: background ~0 (+noise), weakest colour (green) 150
_HUES = np.array([0.0, 28.2, 56.2, 136.0, 225.0, 281.2])  # hues of COLOURS, in order, degrees
MIN_AREA = 0.3 * 0.5 * SIZE_RANGE[0] ** 2  # 30% of the smallest triangle, as a fraction of W*W
# sqrt(det cov) / area is 1 / (4 pi) = 0.0796 for every ellipse and 1/12 = 0.0833 for every square
# or rectangle, at any tilt. Measured: <= 0.0811 on circles (a 7 px disk is a bit square), >= 0.0823 on
# squares tilted up to 10 degrees, anti-aliased and blurred (8 px ones, tests/test_shapes.py).
SQUARE_MOMENT = 0.0817


@dataclass
class Detected:
    shape: str  # circle / square / triangle, or "blob" when it is none of them
    colour: str
    cx: float
    cy: float
    area: int


def to_rgb_array(image):
    """PIL image or uint8 array -> uint8 (W, W, 3). RGBA is composited on the white background;
    grayscale and non-square images are rejected (colours / geometry could not be read right)."""
    if isinstance(image, Image.Image):
        if image.mode in ("L", "LA", "1", "I", "F", "I;16"):
            raise ValueError(f"grayscale image (mode {image.mode}): ShapeWorld colours cannot be read from it")
        if image.mode in ("RGBA", "LA", "P", "PA"):
            image = image.convert("RGBA")
            bg = Image.new("RGBA", image.size, BACKGROUND + (255,))
            image = Image.alpha_composite(bg, image)
        image = np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got dtype {a.dtype}")
    if a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 1):
        raise ValueError("grayscale image: ShapeWorld colours cannot be read from it")
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an image of shape (H, W, 3), got {a.shape}")
    if a.shape[2] == 4:  # composite RGBA on the background
        alpha = a[..., 3:].astype(np.float32) / 255
        a = (a[..., :3] * alpha + np.array(BACKGROUND) * (1 - alpha)).round().astype(np.uint8)
    if a.shape[0] != a.shape[1] or a.shape[0] < 16:
        raise ValueError(f"expected a square image of at least 16x16 pixels, got {a.shape[1]}x{a.shape[0]}")
    return a


def _components(mask):
    """4-connected components of a boolean mask, by union-find over horizontal runs (fast: a scene
    has ~100 runs, so the Python loop is short). Returns a label image, 0 = background."""
    H, W = mask.shape
    padded = np.zeros((H, W + 2), np.int8)
    padded[:, 1:-1] = mask
    d = np.diff(padded, axis=1)  # +1 where a run starts, -1 one past where it ends
    ys, xs = np.nonzero(d)
    runs = []  # (y, x0, x1)
    for i in range(0, len(ys), 2):
        runs.append((ys[i], xs[i], xs[i + 1]))
    parent = list(range(len(runs)))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    prev_start = prev_end = 0  # runs of the previous row are runs[prev_start:prev_end]
    i = 0
    while i < len(runs):
        y = runs[i][0]
        j = i
        while j < len(runs) and runs[j][0] == y:
            j += 1
        if prev_end > prev_start and runs[prev_start][0] == y - 1:
            for r in range(i, j):
                for p in range(prev_start, prev_end):
                    if runs[p][1] < runs[r][2] and runs[r][1] < runs[p][2]:  # overlapping columns
                        parent[find(r)] = find(p)
        prev_start, prev_end, i = i, j, j
    labels = np.zeros((H, W), np.int32)
    for k, (y, x0, x1) in enumerate(runs):
        labels[y, x0:x1] = find(k) + 1
    return labels


def detect(image):
    """Pixels -> list of Detected objects."""
    a = to_rgb_array(image).astype(np.int16)
    W = a.shape[0]
    mx, mn = a.max(2), a.min(2)
    chroma = mx - mn
    mask = chroma >= CHROMA_MIN
    if not mask.any():
        return []
    # Hue in degrees (HSV formula), then the nearest palette hue on the circle.
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    c = np.maximum(chroma, 1).astype(np.float32)
    h = np.where(mx == r, ((g - b) / c) % 6, np.where(mx == g, (b - r) / c + 2, (r - g) / c + 4)) * 60
    dist = np.abs(h[..., None] - _HUES)
    hue_cls = np.minimum(dist, 360 - dist).argmin(-1)  # (W, W) index into COLOUR_NAMES
    labels = _components(mask)
    n = labels.max() + 1
    area = np.bincount(labels.ravel(), minlength=n)
    votes = np.bincount((labels * 6 + hue_cls).ravel(), minlength=6 * n).reshape(n, 6)
    out = []
    for k in np.nonzero(area >= MIN_AREA * W * W)[0]:
        if k == 0:
            continue
        yy, xx = np.nonzero(labels == k)
        # Re-threshold the object at half its own chroma ("half maximum"): blur, JPEG's chroma
        # subsampling and VQ decoders smear edges into a faint halo that would round the corners of
        # the fixed-threshold mask; the half-maximum contour stays where the true edge was.
        y0, y1, x0, x1 = max(yy.min() - 1, 0), yy.max() + 2, max(xx.min() - 1, 0), xx.max() + 2
        core = chroma[y0:y1, x0:x1] >= 0.5 * np.median(chroma[yy, xx])
        core &= (labels[y0:y1, x0:x1] == k) | (labels[y0:y1, x0:x1] == 0)
        cy, cx = np.nonzero(core)
        w, hgt = cx.max() - cx.min() + 1, cy.max() - cy.min() + 1
        # Three features that smearing barely moves. Taper: mean width of the rows at 15-35% of the
        # height over that at 65-85% (triangle pointing up ~0.33, <= 0.6 tilted 10 degrees; circle
        # and square 1). Fill ratio of the bounding box: an upright square 1.0, even with rounded
        # corners, a circle pi/4 = 0.785; but a square tilted 10 degrees fills only ~0.75 of its box.
        widths = core[cy.min():cy.max() + 1].sum(1)
        taper = widths[int(0.15 * hgt):int(0.35 * hgt) + 1].mean() / widths[int(0.65 * hgt):int(0.85 * hgt) + 1].mean()
        fill = len(cy) / (w * hgt)
        # So also an affine moment invariant, which no tilt (or stretch) changes: sqrt(det cov) / area,
        # pixels counted as unit squares (hence the 1/12 on each variance). From integer sums: 4x
        # faster than numpy means on a few hundred pixels.
        n, sx, sy = len(cx), int(cx.sum()), int(cy.sum())
        vx = (int(cx @ cx) - sx * sx / n) / n + 1 / 12
        vy = (int(cy @ cy) - sy * sy / n) / n + 1 / 12
        vxy = (int(cx @ cy) - sx * sy / n) / n
        moment = (vx * vy - vxy * vxy) ** 0.5 / n
        square = fill > 0.89 or moment > SQUARE_MOMENT
        shape = "triangle" if taper < 0.65 else "square" if square else "circle"
        if max(w, hgt) > 1.6 * min(w, hgt):  # merged or smeared objects are no shape at all
            shape = "blob"
        out.append(Detected(shape, COLOUR_NAMES[votes[k].argmax()], x0 + (cx.min() + cx.max()) / 2,
                            y0 + (cy.min() + cy.max()) / 2, int(area[k])))
    return out


def check(image, prompt):
    """The judge: image + prompt (Prompt or text) -> Check(verdict, score, reason, holds)."""
    if isinstance(prompt, str):
        prompt = parse_prompt(prompt)
    a = to_rgb_array(image)
    return evaluate(detect(a), prompt, a.shape[0])


# -----------------------------------------------------------------------------
# Sampling prompts


def _coloured_fact(rng, kind, used):
    # a fact whose (colour, shape) descriptors are all new to the prompt (so facts can't interfere)
    for _ in range(100):
        pairs = [(rng.choice(COLOUR_NAMES), rng.choice(SHAPES)) for _ in range(2 if kind == "rel" else 1)]
        if len(set(pairs)) == len(pairs) and not any(p in used or (None, p[1]) in used for p in pairs):
            used.update(pairs)
            (c, s), (c2, s2) = pairs[0], pairs[-1]
            if kind == "exists":
                return Fact("exists", s, c)
            if kind == "count":
                return Fact("count", s, c, rng.choice((2, 3)))
            return Fact("rel", s, c, 1, rng.choice(RELATIONS), s2, c2)
    return None


def sample_prompt(rng, category=None):
    """A random prompt of a category (random category when None)."""
    cat = category or rng.choice(CATEGORIES)
    if cat == "single":
        facts = [Fact("exists", rng.choice(SHAPES))]
    elif cat == "two":
        facts = [Fact("exists", s) for s in rng.sample(SHAPES, 2)]
    elif cat == "counting":
        facts = [Fact("count", rng.choice(SHAPES), None, rng.choice((2, 3, 4)))]
    elif cat == "colour":
        facts = [Fact("exists", rng.choice(SHAPES), rng.choice(COLOUR_NAMES))]
    elif cat == "position":
        s1, s2 = rng.sample(SHAPES, 2)
        facts = [Fact("rel", s1, None, 1, rng.choice(RELATIONS), s2)]
    elif cat == "colour_attr":
        a, b = rng.sample([(c, s) for s in SHAPES for c in COLOUR_NAMES], 2)
        facts = [Fact("exists", a[1], a[0]), Fact("exists", b[1], b[0])]
    elif cat == "compositional":
        while True:  # 2-3 coloured facts, at least one relation or count, at most 4 objects
            kinds = [rng.choice(("rel", "count")), *rng.choices(("exists", "count", "rel"), k=rng.randint(1, 2))]
            used = set()
            facts = [_coloured_fact(rng, k, used) for k in kinds]
            if None not in facts and len(_required(rng, facts)) <= MAX_OBJECTS:
                break
    else:
        raise ValueError(f"unknown category {cat!r}; choose from {', '.join(CATEGORIES)}")
    return make_prompt(facts, cat)


# -----------------------------------------------------------------------------
# Splits

OPEN_CATEGORIES = ("colour_attr", "compositional")  # big enough to hold texts out of training


def _all_texts(cat, rng):
    """Every prompt of a small category, or a large fixed pool of a big one, as unique Prompts."""
    if cat == "compositional":
        pool = {}
        for _ in range(20000):
            p = sample_prompt(rng, cat)
            pool.setdefault(p.text, p)
        return [pool[t] for t in sorted(pool)]
    if cat == "single":
        facts = [[Fact("exists", s)] for s in SHAPES]
    elif cat == "two":
        facts = [[Fact("exists", a), Fact("exists", b)] for i, a in enumerate(SHAPES) for b in SHAPES[i + 1:]]
    elif cat == "counting":
        facts = [[Fact("count", s, None, n)] for s in SHAPES for n in (2, 3, 4)]
    elif cat == "colour":
        facts = [[Fact("exists", s, c)] for s in SHAPES for c in COLOUR_NAMES]
    elif cat == "position":
        facts = [[Fact("rel", a, None, 1, r, b)] for a in SHAPES for b in SHAPES if a != b for r in RELATIONS]
    else:
        pairs = [(c, s) for s in SHAPES for c in COLOUR_NAMES]
        facts = [[Fact("exists", a[1], a[0]), Fact("exists", b[1], b[0])]
                 for i, a in enumerate(pairs) for b in pairs[i + 1:]]
    return [make_prompt(f, cat) for f in facts]


def per_category(prompts, n=None):
    """The first n prompts of each category (all when n is None), in CATEGORIES order."""
    return [p for c in CATEGORIES for p in [q for q in prompts if q.category == c][:n]]


def make_splits(seed=0, n_test=100, n_val=20):
    """Seeded prompt splits: {"train": [...], "val": [...], "test": [...], "ood": [...]}.

    - `ood`: every prompt naming a held-out colour-shape pairing (OOD_PAIRS); no other split has one.
    - open categories (colour_attr, compositional): texts are disjoint between train, val and test.
    - closed categories (single, two, counting, colour, position) have only 3 to 24 possible texts
      in this world, all of which train sees; val/test then measure fresh images, not new texts.
    - `train` lists each text once; val/test/ood list n_val/n_test items per category, cycling
      through the split's texts when a category has fewer (e.g. test "single": 3 texts x ~33).
    """
    rng = random.Random(seed)
    out = {"train": [], "val": [], "test": [], "ood": []}
    for cat in CATEGORIES:
        texts = _all_texts(cat, rng)
        rng.shuffle(texts)
        ood = [p for p in texts if is_ood(p)]
        ind = [p for p in texts if not is_ood(p)]
        if cat in OPEN_CATEGORIES:
            k_test, k_val = min(n_test, len(ind) * 3 // 10), min(n_val, len(ind) // 10)
            test, val, train = ind[:k_test], ind[k_test:k_test + k_val], ind[k_test + k_val:]
        else:
            test = val = train = ind
        out["train"] += train
        out["val"] += _cycle(val, n_val)
        out["test"] += _cycle(test, n_test)
        if ood:
            out["ood"] += _cycle(ood, n_test)
    return out


def _cycle(items, n):
    return [items[i % len(items)] for i in range(n)]


# -----------------------------------------------------------------------------
# Edits: recolour, remove, add, move


@dataclass(frozen=True)
class Edit:
    kind: str             # recolour | remove | add | move
    shape: str
    colour: str
    colour2: str | None = None    # recolour: the new colour
    direction: str | None = None  # move: left | right | up | down

    @property
    def text(self):
        if self.kind == "recolour":
            return f"make the {self.colour} {self.shape} {self.colour2}"
        if self.kind == "add":
            return f"add {article(self.colour)} {self.colour} {self.shape}"
        if self.kind == "move":
            return f"move the {self.colour} {self.shape} {self.direction}"
        return f"remove the {self.colour} {self.shape}"


def parse_edit(text):
    ws = _words(text, "edit instruction")
    bad = ValueError(f"edit instruction outside the grammar: {text!r} (use: make the red circle blue / "
                     "remove the red circle / add a red circle / move the red circle left)")
    verb, rest = ws[0], ws[1:]
    if len(rest) < 3 or rest[0] not in (("a", "an") if verb == "add" else ("the",)) \
            or rest[1] not in COLOURS or rest[2] not in SHAPES:
        raise bad
    colour, shape, tail = rest[1], rest[2], rest[3:]
    if verb == "make" and len(tail) == 1 and tail[0] in COLOURS:
        return Edit("recolour", shape, colour, colour2=tail[0])
    if verb == "move" and len(tail) == 1 and tail[0] in DIRECTIONS:
        return Edit("move", shape, colour, direction=tail[0])
    if verb in ("remove", "add") and not tail:
        return Edit(verb, shape, colour)
    raise bad


_STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}


def apply_edit(rng, scene, edit):
    """The correctly edited scene, or None when the edit can't be done in this scene."""
    W, grid = scene.size, scene.grid
    objs = [replace(o) for o in scene.objects]
    target = [o for o in objs if o.colour == edit.colour and o.shape == edit.shape]
    others = [o for o in objs if not (o.colour == edit.colour and o.shape == edit.shape)]
    if edit.kind == "add":
        if target or len(objs) >= MAX_OBJECTS:
            return None
        new = _random_obj(rng, W, edit.shape, edit.colour, grid)
        return Scene(W, objs + [new], grid) if _place(rng, [new], W, fixed=objs, grid=grid) else None
    if len(target) != 1:  # the instruction must name exactly one object
        return None
    t = target[0]
    if edit.kind == "remove":
        return Scene(W, others, grid)
    if edit.kind == "recolour":
        t.colour = edit.colour2
        return Scene(W, objs, grid) if edit.colour2 != edit.colour else None
    dx, dy = _STEP[edit.direction]
    step = W // grid if grid else round(MOVE * W)  # one cell in the grid world (score_edit allows both)
    t.x, t.y = t.x + dx * step, t.y + dy * step
    return Scene(W, objs, grid) if _fits(t, others, W) else None


def sample_edit(rng, size=64, kind=None, grid=0):
    """(source scene, Edit, correctly edited scene), for a random or given edit kind."""
    while True:
        scene = random_scene(rng, size, rng.randint(1, 3), grid)
        k = kind or rng.choice(("recolour", "remove", "add", "move"))
        if k == "add":
            e = Edit("add", rng.choice(SHAPES), rng.choice(COLOUR_NAMES))
        else:
            o = rng.choice(scene.objects)
            e = Edit(k, o.shape, o.colour,
                     colour2=rng.choice([c for c in COLOUR_NAMES if c != o.colour]) if k == "recolour" else None,
                     direction=rng.choice(DIRECTIONS) if k == "move" else None)
        out = apply_edit(rng, scene, e)
        if out is not None:
            return scene, e, out


def score_edit(src_image, out_image, edit):
    """Checker for edits: (follow, preserve) in [0, 1].
    follow: the asked change happened (1) or not (0).
    preserve: fraction of the other objects that are unchanged (same shape, colour, place), counting
    any object that appeared or vanished besides the edited one against it."""
    if isinstance(edit, str):
        edit = parse_edit(edit)
    S, O = detect(src_image), detect(out_image)
    W = to_rgb_array(src_image).shape[0]
    tol = 0.1 * W
    near = lambda a, b: abs(a.cx - b.cx) <= tol and abs(a.cy - b.cy) <= tol
    same = lambda a, b: a.shape == b.shape and a.colour == b.colour and near(a, b)
    named = lambda o: o.shape == edit.shape and o.colour == edit.colour
    tgt = [o for o in S if named(o)]
    t = tgt[0] if len(tgt) == 1 else None
    others = [o for o in S if o is not t]
    result = None  # the object of O that the edit produced, excluded from the preserve count
    if edit.kind == "add":
        new = [o for o in O if named(o) and not any(same(o, s) for s in S)]
        follow = float(sum(map(named, O)) == sum(map(named, S)) + 1 and bool(new))
        result = new[0] if new else None
    elif t is None:
        follow = 0.0  # the source doesn't have exactly one such object: nothing well-defined to edit
    elif edit.kind == "remove":
        follow = float(not any(named(o) for o in O))
    elif edit.kind == "recolour":
        cand = [o for o in O if o.shape == t.shape and o.colour == edit.colour2 and near(o, t)]
        follow = float(bool(cand) and not any(named(o) for o in O))
        result = cand[0] if cand else None
    else:
        dx, dy = _STEP[edit.direction]
        want_x, want_y = t.cx + dx * MOVE * W, t.cy + dy * MOVE * W
        cand = [o for o in O if named(o)]
        moved = [o for o in cand if abs(o.cx - want_x) <= 1.5 * tol and abs(o.cy - want_y) <= 1.5 * tol]
        follow = float(len(moved) == 1 and len(cand) == 1)
        result = cand[0] if len(cand) == 1 else None
    # The target itself, edited or left as it was, is follow's business, not preserve's.
    rest = [o for o in O if o is not result and not (t is not None and same(o, t))]
    matched, used = 0, set()
    for s in others:
        for i, o in enumerate(rest):
            if i not in used and same(s, o):
                used.add(i)
                matched += 1
                break
    denom = max(len(others), len(rest))
    return follow, (matched / denom if denom else 1.0)


# -----------------------------------------------------------------------------
# A look at the world: PNG grids


def _font():
    try:
        return ImageFont.load_default(size=11)
    except TypeError:  # Pillow without FreeType
        return ImageFont.load_default()


def _wrap(text, width):
    lines, cur = [], ""
    for w in text.split():
        if cur and len(cur) + 1 + len(w) > width:
            lines.append(cur)
            cur = w
        else:
            cur = f"{cur} {w}".strip()
    return lines + [cur] if cur else lines


def save_grid(cells, path, scale=2, cols=None, text_lines=4):
    """cells: list of rows, each a list of (uint8 image, caption, colour). Writes one PNG (atomically)."""
    font = _font()
    cols = cols or max(len(r) for r in cells)
    img_w = max(c[0].shape[1] for r in cells for c in r) * scale
    cw, ch = max(img_w, 140) + 8, img_w + 8 + 13 * text_lines
    sheet = Image.new("RGB", (cols * cw, len(cells) * ch), (250, 250, 250))
    d = ImageDraw.Draw(sheet)
    for i, row in enumerate(cells):
        for j, (im, caption, colour) in enumerate(row):
            tile = Image.fromarray(im).resize((im.shape[1] * scale, im.shape[0] * scale), Image.NEAREST)
            sheet.paste(tile, (j * cw + 4, i * ch + 4))
            d.rectangle([j * cw + 3, i * ch + 3, j * cw + 4 + tile.width, i * ch + 4 + tile.height], outline=(160, 160, 160))
            for k, line in enumerate(_wrap(caption, cw // 6)[:text_lines]):
                d.text((j * cw + 4, i * ch + img_w + 6 + 13 * k), line, fill=colour, font=font)
    tmp = path + ".tmp.png"
    sheet.save(tmp)
    os.replace(tmp, path)


def _verdict_colour(ok):
    return (20, 120, 20) if ok else (190, 20, 20)


def demo(out, size=64, seed=0, n=6, grid=0):
    rng = random.Random(seed)
    os.makedirs(out, exist_ok=True)
    rows = []
    for cat in CATEGORIES:
        row = []
        for _ in range(n):
            p = sample_prompt(rng, cat)
            im = render(sample_scene(rng, size, p, grid=grid))
            c = check(im, p)
            row.append((im, f"[{cat}] {p.text} -> {c.reason}", _verdict_colour(c.verdict)))
        rows.append(row)
    save_grid(rows, os.path.join(out, "examples.png"), text_lines=5)
    rows = []
    for kind in ("colour", "count", "missing", "relation"):
        row = []
        while len(row) < n:
            p = sample_prompt(rng)
            if kind not in failure_kinds(p):
                continue
            im = render(sample_scene(rng, size, p, match=False, kind=kind, grid=grid))
            c = check(im, p)
            row.append((im, f"[wrong {kind}] {p.text} -> {c.reason}", _verdict_colour(c.verdict)))
        rows.append(row)
    save_grid(rows, os.path.join(out, "wrong.png"), text_lines=5)
    rows = []
    for kind in ("recolour", "remove", "add", "move"):
        row = []
        for _ in range(n // 2):
            src, e, dst = sample_edit(rng, size, kind, grid)
            a, b = render(src), render(dst)
            f, p = score_edit(a, b, e)
            row += [(a, f"source; {e.text}", (0, 0, 0)), (b, f"edited: follow {f:.1f} preserve {p:.2f}", _verdict_colour(f == p == 1))]
        rows.append(row)
    save_grid(rows, os.path.join(out, "edits.png"), text_lines=3)
    return [os.path.join(out, f) for f in ("examples.png", "wrong.png", "edits.png")]


def load_image(path):
    """Read an image file for the checker; one clear error if it can't be read."""
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_array(im)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


# -----------------------------------------------------------------------------
# Command lines: one-line errors, numeric flags checked when they are parsed (every script's CLI;
# here, at the bottom of the import order, so that shapes.py needs nothing above it)


class Parser(argparse.ArgumentParser):
    """argparse, but a bad flag is ONE line on stderr (no usage block) and exit status 2."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def bounded(kind, low=None, high=None, low_open=False):
    """An argparse type: a finite int/float within [low, high] (or (low, high] when low_open)."""
    def parse(text):
        try:
            x = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if not math.isfinite(x):
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if low is not None and (x <= low if low_open else x < low):
            raise argparse.ArgumentTypeError(f"must be {'above' if low_open else 'at least'} {low}, got {text}")
        if high is not None and x > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {text}")
        return x
    parse.__name__ = kind.__name__  # argparse names the type in its messages
    return parse


pos_int = bounded(int, 1)                   # counts: steps, batch sizes, prompts
nonneg_int = bounded(int, 0)                # 0 means "none" / "off" where the help says so
pos_float = bounded(float, 0, low_open=True)  # learning rates
nonneg_float = bounded(float, 0)            # guidance weight, temperature (0 = greedy)
fraction = bounded(float, 0, 1, low_open=True)  # top-p: (0, 1]


def weights_list(text, n, flag):
    """'0.5,1.0' -> [0.5, 1.0]: n finite non-negative numbers, not all zero (a --mix, --edit-weights)."""
    try:
        vals = [float(v) for v in text.split(",")]
    except ValueError:
        vals = []
    if len(vals) != n or not all(math.isfinite(v) and v >= 0 for v in vals) or sum(vals) <= 0:
        raise ValueError(f"{flag} needs {n} non-negative numbers separated by commas, got {text!r}")
    return vals



def main(argv=None):
    ap = Parser(description="ShapeWorld: look at the toy world, draw one scene, or check one image.")
    ap.add_argument("--out", help="write example grids (examples.png, wrong.png, edits.png) to this folder")
    ap.add_argument("--size", type=bounded(int, 16, 1024), default=64, help="image side in pixels, 16-1024 (toy 64, tiny 32)")
    ap.add_argument("--grid", type=bounded(int, 0, 8), default=0, help="0: objects anywhere (the free world); N: "
                    "objects of one size centred in an N x N grid (the toy preset's world: 4)")
    ap.add_argument("--seed", type=int, default=0, help="random seed for the examples and --scene")
    ap.add_argument("--n", type=bounded(int, 1, 100), default=6, help="examples per row, 1-100")
    ap.add_argument("--check", metavar="PNG", help="check this image against --prompt and print JSON")
    ap.add_argument("--prompt", help="the prompt for --check")
    ap.add_argument("--scene", metavar="PROMPT", help="draw one random scene that matches PROMPT into --png "
                    "(e.g. a source image for sample.py --edit)")
    ap.add_argument("--png", help="the PNG file --scene writes")
    args = ap.parse_args(argv)
    try:
        if args.check:
            if not args.prompt:
                raise ValueError("--check needs --prompt")
            c = check(load_image(args.check), args.prompt)
            print(json.dumps({"verdict": "yes" if c.verdict else "no", "score": c.score, "reason": c.reason}))
        elif args.scene:
            if not args.png:
                raise ValueError("--scene needs --png FILE")
            if os.path.isdir(args.png):
                raise ValueError(f"--png {args.png} is a folder, not a file name")
            prompt = parse_prompt(args.scene)
            image = Image.fromarray(render(sample_scene(random.Random(args.seed), args.size, prompt, grid=args.grid)))
            tmp = f"{args.png}.tmp{os.getpid()}.png"
            try:
                image.save(tmp)
            except OSError as e:
                raise ValueError(f"cannot write --png {args.png}: {e.strerror}") from None
            os.replace(tmp, args.png)
            print(f"wrote {args.png} ({prompt.text})")
        elif args.out:
            if os.path.exists(args.out) and not os.path.isdir(args.out):
                raise ValueError(f"--out {args.out} is a file, not a folder")
            for path in demo(args.out, args.size, args.seed, args.n, args.grid):
                print("wrote", path)
        else:
            ap.error("give --out DIR (example grids), --scene PROMPT --png FILE, or --check PNG --prompt TEXT")
    except ValueError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
