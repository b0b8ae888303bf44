"""ShapeWorld: the checker must equal the scene graph's truth. Run: python -m pytest tests/test_shapes.py"""
import io
import math
import random
import time

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFilter

import shapes as S


def _cases(n, seed, size=64):
    # half matching, half deliberately mismatching (prompt, scene) pairs over all categories
    rng = random.Random(seed)
    out = []
    for i in range(n):
        p = S.sample_prompt(rng, S.CATEGORIES[i % len(S.CATEGORIES)])
        out.append((p, S.sample_scene(rng, size, p, match=i % 2 == 0)))
    return out


def test_checker_equals_truth_on_2000_scenes():
    cases = _cases(2000, seed=1)
    assert sum(not S.truth(sc, p).verdict for p, sc in cases) == 1000  # the mismatches really are
    for p, sc in cases:
        got, want = S.check(S.render(sc), p), S.truth(sc, p)
        assert (got.holds, got.score, got.reason) == (want.holds, want.score, want.reason), (p.text, sc)


def test_checker_equals_truth_tiny_size():
    for p, sc in _cases(300, seed=2, size=32):
        assert S.check(S.render(sc), p).holds == S.truth(sc, p).holds, (p.text, sc)


def test_grid_world_one_object_per_cell_and_checker_exact():
    """The toy's grid world: every object is one size, centred in its own cell (so one VQ patch
    holds exactly one object), broken scenes and edits stay on the grid, and the checker is exact."""
    rng, W, g = random.Random(3), 64, 4
    c = W // g
    scenes = []
    for i in range(700):
        p = S.sample_prompt(rng, S.CATEGORIES[i % len(S.CATEGORIES)])
        sc = S.sample_scene(rng, W, p, match=i % 2 == 0, grid=g)
        assert S.truth(sc, p).verdict == (i % 2 == 0) and sc.grid == g
        got, want = S.check(S.render(sc), p), S.truth(sc, p)
        assert (got.holds, got.reason) == (want.holds, want.reason), (p.text, sc)
        scenes.append(sc)
    for _ in range(100):
        src, e, dst = S.sample_edit(rng, W, grid=g)
        scenes += [src, dst]
    for sc in scenes:
        cells = [(o.x // c, o.y // c) for o in sc.objects]
        assert len(set(cells)) == len(cells)
        for o, (i, j) in zip(sc.objects, cells):
            assert o.s == round(S.GRID_FILL * c) and (o.x, o.y) == (i * c + (c - o.s) // 2, j * c + (c - o.s) // 2)


def test_sample_scene_most_caps_the_distractors():
    """most= caps a matching scene's objects (distractors fill up to it): most=1 on a one-object
    prompt gives the asked object alone; the default lets distractors reach MAX_OBJECTS."""
    rng = random.Random(5)
    p = S.parse_prompt("a red circle")
    alone = [S.sample_scene(rng, 64, p, grid=4, most=1) for _ in range(50)]
    assert all(len(sc.objects) == 1 and S.truth(sc, p).verdict for sc in alone)
    busy = [len(S.sample_scene(rng, 64, p, grid=4).objects) for _ in range(200)]
    assert max(busy) == S.MAX_OBJECTS and min(busy) == 1


def test_relations_aligned_by_hand_and_aligned_scenes():
    """relations_aligned: "left of" in one row (centres within REL_T * W vertically), "above" in one
    column; sample_scene(aligned=True) gives matching scenes that are: in the grid world for every
    prompt, with free placement for one relation (two among four free objects may not fit)."""
    c, q = S.parse_prompt("a circle to the left of a square"), S.parse_prompt("a circle above a square")
    row = S.Scene(64, [S.Obj("circle", "red", 2, 2, 12), S.Obj("square", "blue", 34, 10, 12)])  # dy 8 < 9.6
    diag = S.Scene(64, [S.Obj("circle", "red", 2, 2, 12), S.Obj("square", "blue", 34, 14, 12)])  # dy 12
    col = S.Scene(64, [S.Obj("circle", "red", 2, 2, 12), S.Obj("square", "blue", 8, 40, 12)])  # dx 6
    assert S.truth(diag, c).verdict and S.truth(col, q).verdict and S.truth(diag, q).verdict
    assert S.relations_aligned(row, c) and not S.relations_aligned(diag, c)
    assert S.relations_aligned(col, q) and not S.relations_aligned(diag, q) and not S.relations_aligned(row, q)
    assert S.relations_aligned(diag, S.parse_prompt("two circles"))  # no relation: nothing to align
    rng = random.Random(3)
    for g, cats in ((4, ("position", "compositional")), (0, ("position",))):
        for _ in range(40):
            p = S.sample_prompt(rng, rng.choice(cats))
            sc = S.sample_scene(rng, 64, p, grid=g, most=1, aligned=True)
            assert S.truth(sc, p).verdict and S.relations_aligned(sc, p)
            assert len(sc.objects) == len(S._required(rng, p.facts))


def _noise(im, rng=np.random.default_rng(0)):
    return np.clip(im + rng.normal(0, 8, im.shape), 0, 255).round().astype(np.uint8)


def _blur(im):
    return np.asarray(Image.fromarray(im).filter(ImageFilter.GaussianBlur(0.7)))


def _jpeg(im):
    buf = io.BytesIO()
    Image.fromarray(im).save(buf, "JPEG", quality=75)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.mark.parametrize("corrupt", [_noise, _blur, _jpeg], ids=["noise8", "blur", "jpeg75"])
def test_checker_robust_to_degradation(corrupt):
    cases = _cases(700, seed=3)
    agree = np.mean([S.check(corrupt(S.render(sc)), p).verdict == S.truth(sc, p).verdict for p, sc in cases])
    assert agree >= 0.99, agree


def _drawn_another_way(scene, rng, up=4):
    """The scene graph drawn independently of S.render, the way a generator's images are messier:
    each object drawn at `up`x resolution, squares and triangles tilted by a random angle in
    [-10, 10] degrees about their box centre, each colour jittered by +-20 per channel (inside its
    name, see test below), a grey background in 230-255, then a box downsample (anti-aliasing) and
    a slight Gaussian blur."""
    grey = rng.randint(230, 255)
    img = Image.new("RGB", (scene.size * up,) * 2, (grey,) * 3)
    d = ImageDraw.Draw(img)
    for o in scene.objects:
        fill = tuple(min(255, max(0, v + rng.randint(-20, 20))) for v in S.COLOURS[o.colour])
        # the box covers pixels x..x+s-1, i.e. [x, x+s) in continuous units; PIL's pixel centres
        # sit on integers, hence the -0.5 (sub-pixel at `up`x, kept for honesty)
        cx, cy, h = (o.x + o.s / 2) * up - 0.5, (o.y + o.s / 2) * up - 0.5, o.s * up / 2
        if o.shape == "circle":
            d.ellipse([cx - h, cy - h, cx + h, cy + h], fill=fill)
            continue
        corners = [(-h, -h), (h, -h), (h, h), (-h, h)] if o.shape == "square" else [(-h, h), (h, h), (0, -h)]
        t = math.radians(rng.uniform(-10, 10))
        c, s = math.cos(t), math.sin(t)
        d.polygon([(cx + x * c - y * s, cy + x * s + y * c) for x, y in corners], fill=fill)
    img = img.resize((scene.size,) * 2, Image.BOX).filter(ImageFilter.GaussianBlur(0.5))
    return np.asarray(img)


def _accuracy_drawn_another_way(size, n, seed):
    # verdict accuracy against the scene graph's truth, on true and on false prompts separately
    rng = random.Random(seed)
    right = {True: [], False: []}
    for i in range(n):
        match = i % 2 == 0
        p = S.sample_prompt(rng, S.CATEGORIES[(i // 2) % len(S.CATEGORIES)])
        sc = S.sample_scene(rng, size, p, match=match)
        right[match].append(S.check(_drawn_another_way(sc, rng), p).verdict == S.truth(sc, p).verdict)
    return {m: float(np.mean(r)) for m, r in right.items()}


def test_colour_jitter_stays_inside_names():
    # the corners of every colour's +-20 jitter cube still read as that colour, on a grey background
    for name, rgb in S.COLOURS.items():
        for corner in np.ndindex(2, 2, 2):
            col = np.clip(np.array(rgb) + 40 * np.array(corner) - 20, 0, 255)
            im = np.full((32, 32, 3), 230, np.uint8)
            im[8:24, 8:24] = col
            assert [o.colour for o in S.detect(im)] == [name], (name, col)


def test_squares_read_at_any_tilt_and_ovals_as_circles():
    # hand-made: the moment feature is affine invariant, so neither a tilt nor a stretch moves it
    def draw(shape, pts):
        img = Image.new("RGB", (64, 64), S.BACKGROUND)
        getattr(ImageDraw.Draw(img), shape)(pts, fill=S.COLOURS["blue"])
        return [o.shape for o in S.detect(np.asarray(img))]
    for deg in (0, 5, 10, 20, 30, 45):
        c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
        corners = [(-9, -9), (9, -9), (9, 9), (-9, 9)]
        assert draw("polygon", [(32 + x * c - y * s, 32 + x * s + y * c) for x, y in corners]) == ["square"], deg
    for w, h in ((18, 18), (22, 16), (15, 21)):  # aspect up to 1.4
        assert draw("ellipse", [10, 10, 10 + w, 10 + h]) == ["circle"], (w, h)


@pytest.mark.parametrize("size", [64, 32])
def test_checker_robust_to_scenes_drawn_another_way(size):
    # DESIGN.md: >= 99% right on true and on false prompts for tilted, anti-aliased, jittered scenes.
    # Measured: 100% / 100% at 64 px; 99.3% / 100% at 32 px, where every miss is two tilted objects
    # blurred into one blob (GAP is 1.9 px there, a 10 px square tilted 10 degrees grows 0.8 px a side)
    acc = _accuracy_drawn_another_way(size, 1400, seed=8)
    assert acc[True] >= 0.99 and acc[False] >= 0.99, acc


def test_hand_made_scene():
    # a red circle on the left, a blue square on the right, vertically level: hand-checked facts
    sc = S.Scene(64, [S.Obj("circle", "red", 4, 20, 16), S.Obj("square", "blue", 40, 22, 16)])
    im = S.render(sc)
    assert im[28, 12].tolist() == list(S.COLOURS["red"]) and im[0, 0].tolist() == [255, 255, 255]
    c = S.check(im, "a red circle to the left of a blue square")
    assert c.verdict and c.score == 1.0 and c.reason == "Yes, the image shows a red circle to the left of a blue square."
    c = S.check(im, "a circle to the right of a square")
    assert c.reason == "No, the circle is to the left of the square, not to the right of it."
    c = S.check(im, "a circle above a square")  # level: the dominant relation is "left of"
    assert c.reason == "No, the circle is to the left of the square, not above it."
    c = S.check(im, "a green circle and a blue square")
    assert (c.verdict, c.score, c.reason) == (False, 0.5, "No, the circle is red, not green.")
    assert S.check(im, "two squares").reason == "No, there is one square, not two."
    assert S.check(im, "a triangle").reason == "No, there is no triangle."


def test_more_objects_than_a_scene_holds_fail():
    # five small shapes on a 64 px grid: every prompt fact holds, but no ShapeWorld scene has five
    # objects (a generator strewing coloured blobs must not "show a circle" by luck)
    objs = [S.Obj(s, "red", x, y, 10) for s, (x, y) in zip(["circle", "square", "triangle", "circle", "square"],
                                                       [(4, 4), (26, 4), (48, 4), (4, 40), (40, 40)])]
    im = S.render(S.Scene(64, objs))
    assert len(S.detect(im)) == 5
    c = S.check(im, "a red circle and a square")
    assert (c.verdict, c.score, c.reason, c.holds) == (False, 2 / 3, "No, there are too many shapes.", [True, True])
    assert S.check(S.render(S.Scene(64, objs[:4])), "a red circle and a square").verdict  # four are fine
    assert S.truth(S.Scene(64, objs), "a circle").reason == "No, there are too many shapes."


FAILURES = {  # failure kind -> (a category that shows it plainly, the reason it must give)
    "colour": ("colour", r"No, (the (circle|square|triangle) is \w+, not \w+|none of the \w+ is \w+)\."),
    "count": ("counting", r"No, there (is one|are (no|two|three|four|many)) \w+, not (two|three|four)\."),
    "missing": ("single", r"No, there is no (circle|square|triangle)\."),
    "relation": ("position", r"No, the \w+ is (to the left of|to the right of|above|below) the \w+, not "
                             r"(to the left of|to the right of|above|below) it\."),
}


@pytest.mark.parametrize("kind", list(FAILURES))
def test_each_failure_names_itself(kind):
    import re
    rng = random.Random(4)
    cat, pattern = FAILURES[kind]
    for _ in range(100):
        p = S.sample_prompt(rng, cat)
        sc = S.sample_scene(rng, 64, p, match=False, kind=kind)
        c = S.check(S.render(sc), p)
        assert not c.verdict and re.fullmatch(pattern, c.reason), (p.text, c.reason)


def test_broken_scenes_keep_their_objects():
    # a negative that loses objects has less ink than a positive, and a judge can then answer from
    # the amount of colour alone; broken scenes keep every object box (one more may add one), so
    # the mean ink is the same (per scene it is not: a shape fills more or less of its box)
    rng = random.Random(6)
    ink = {True: [], False: []}
    for _ in range(400):
        p = S.sample_prompt(rng)
        good = S.sample_scene(rng, 64, p)
        kind = rng.choice(S.failure_kinds(p))
        bad = S.corrupt(rng, good, p, kind)
        if bad is None:
            continue
        assert not S.truth(bad, p).verdict
        boxes = lambda sc: sorted((o.x, o.y, o.s) for o in sc.objects)
        if kind in ("colour", "missing"):
            assert boxes(bad) == boxes(good), (p.text, kind)
        elif kind == "count":
            assert set(boxes(good)) <= set(boxes(bad)) and len(bad.objects) - len(good.objects) in (0, 1)
        assert len(bad.objects) <= 4
        for sc, label in ((good, True), (bad, False)):
            ink[label].append((S.render(sc) != 255).any(-1).mean())
    assert len(ink[False]) > 300
    assert abs(np.mean(ink[False]) / np.mean(ink[True]) - 1) < 0.05, (np.mean(ink[True]), np.mean(ink[False]))


def test_prompts_parse_back_and_words_are_known():
    rng = random.Random(5)
    for _ in range(2000):
        p = S.sample_prompt(rng)
        q = S.parse_prompt(p.text)
        assert (q.category, q.facts, q.text) == (p.category, p.facts, p.text)
        sc = S.sample_scene(rng, 64, p, match=rng.random() < 0.5)
        for text in (p.text, S.truth(sc, p).reason, S.describe(sc)):
            words = text.replace(",", " ").replace(".", " ").split()
            assert all(w in S.WORDS or w in ("Yes", "No") for w in words), text
        if sc.objects:  # a caption is true of its scene
            assert S.truth(sc, S.parse_prompt(S.describe(sc))).verdict
    assert S.parse_prompt("  Three SQUARES. ").facts == (S.Fact("count", "square", None, 3),)


@pytest.mark.parametrize("text,msg", [
    ("a giraffe", "unknown word 'giraffe'"),
    ("", "empty prompt"),
    ("   ", "empty prompt"),
    ("red circle", "outside the grammar"),
    ("a circle and", "outside the grammar"),
    ("two circle", "outside the grammar"),
    ("a circles", "outside the grammar"),
    ("a circle to the left of", "outside the grammar"),
    ("two circles above a square", "outside the grammar"),
    ("a circle next a square", "unknown word 'next'"),
])
def test_bad_prompts_raise(text, msg):
    with pytest.raises(ValueError, match=msg):
        S.parse_prompt(text)


def test_image_inputs_converted_or_rejected():
    p = S.parse_prompt("a red circle")
    im = S.render(S.Scene(64, [S.Obj("circle", "red", 10, 10, 18)]))
    rgba = Image.fromarray(im).convert("RGBA")
    assert S.check(rgba, p).verdict and S.check(np.asarray(rgba), p).verdict
    big = np.asarray(Image.fromarray(im).resize((128, 128), Image.NEAREST))
    assert S.check(big, p).verdict  # the checker reads geometry relative to the image side
    with pytest.raises(ValueError, match="grayscale"):
        S.check(Image.fromarray(im).convert("L"), p)
    with pytest.raises(ValueError, match="grayscale"):
        S.check(im[..., 0], p)
    with pytest.raises(ValueError, match="square"):
        S.check(im[:, :40], p)
    with pytest.raises(ValueError, match="uint8"):
        S.check(im.astype(np.float32), p)


def test_load_image_errors(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image"):
        S.load_image(str(bad))


def test_components_match_flood_fill():
    rng = np.random.default_rng(0)
    for _ in range(50):
        mask = rng.random((20, 20)) < 0.45
        labels = S._components(mask)
        # reference: breadth-first flood fill, 4-connected
        ref, k = np.zeros_like(labels), 0
        for y, x in zip(*np.nonzero(mask)):
            if ref[y, x]:
                continue
            k += 1
            stack = [(y, x)]
            ref[y, x] = k
            while stack:
                a, b = stack.pop()
                for c, d in ((a + 1, b), (a - 1, b), (a, b + 1), (a, b - 1)):
                    if 0 <= c < 20 and 0 <= d < 20 and mask[c, d] and not ref[c, d]:
                        ref[c, d] = k
                        stack.append((c, d))
        # same partition: a one-to-one map between the two labelings
        pairs = set(zip(labels[mask].tolist(), ref[mask].tolist()))
        assert len(pairs) == len({a for a, _ in pairs}) == len({b for _, b in pairs}) == k


def test_splits_disjoint_stable_and_ood_held_out():
    a, b = S.make_splits(seed=0), S.make_splits(seed=0)
    assert {k: [p.text for p in v] for k, v in a.items()} == {k: [p.text for p in v] for k, v in b.items()}
    c = S.make_splits(seed=1)
    assert [p.text for p in a["test"]] != [p.text for p in c["test"]]
    for cat in S.CATEGORIES:
        test = [p for p in a["test"] if p.category == cat]
        assert len(test) >= 100 and all(p.category == cat for p in test)
    texts = {k: {p.text for p in v} for k, v in a.items()}
    for cat in S.OPEN_CATEGORIES:
        per = {k: {p.text for p in v if p.category == cat} for k, v in a.items()}
        assert not (per["train"] & per["test"]) and not (per["train"] & per["val"]) and not (per["val"] & per["test"])
        assert len(per["test"]) >= 30
    assert texts["ood"] and not texts["ood"] & (texts["train"] | texts["val"] | texts["test"])
    for split in ("train", "val", "test"):
        for p in a[split]:
            assert not S.is_ood(p) and not S.text_mentions_ood(p.text), p.text
    for p in a["ood"]:
        assert S.is_ood(p) and S.text_mentions_ood(p.text)
    assert S.text_mentions_ood("No, the triangle is purple, not red.")
    assert S.text_mentions_ood("two orange circles") and S.text_mentions_ood("none of the squares is green")
    assert not S.text_mentions_ood("No, the triangle is red, not blue.")
    assert not S.text_mentions_ood("a yellow circle below an orange square")


@pytest.mark.parametrize("grid", [0, 4])
def test_edits_follow_and_preserve(grid):
    rng = random.Random(6)
    for kind in ("recolour", "remove", "add", "move"):
        for _ in range(30):
            src, e, dst = S.sample_edit(rng, 64, kind, grid)
            a = S.render(src)
            assert S.parse_edit(e.text) == e
            assert S.score_edit(a, S.render(dst), e.text) == (1.0, 1.0)
            # doing nothing: nothing else changed, but the edit did not happen
            assert S.score_edit(a, a, e) == (0.0, 1.0)
            # the edit done, plus an unrelated object removed or added: preserve drops
            untouched = {(o.shape, o.colour, o.x, o.y) for o in src.objects if (o.shape, o.colour) != (e.shape, e.colour)}
            others = [o for o in dst.objects if (o.shape, o.colour, o.x, o.y) in untouched]
            if others:
                spoiled = S.Scene(64, [o for o in dst.objects if o is not others[0]])
                f, p = S.score_edit(a, S.render(spoiled), e)
                assert f == 1.0 and p < 1.0
            else:
                extra = S._random_obj(rng, 64, "square", "blue" if e.colour != "blue" else "red", grid)
                if S._place(rng, [extra], 64, fixed=dst.objects, grid=grid):
                    f, p = S.score_edit(a, S.render(S.Scene(64, dst.objects + [extra])), e)
                    assert f == 1.0 and p < 1.0
    # wrong variants of each kind: follow drops
    src = S.Scene(64, [S.Obj("circle", "red", 6, 6, 16), S.Obj("square", "blue", 40, 40, 16)])
    a = S.render(src)
    wrong_colour = S.Scene(64, [S.Obj("circle", "green", 6, 6, 16), src.objects[1]])
    assert S.score_edit(a, S.render(wrong_colour), "make the red circle yellow")[0] == 0.0
    wrong_object = S.Scene(64, [src.objects[0], S.Obj("square", "yellow", 40, 40, 16)])
    assert S.score_edit(a, S.render(wrong_object), "make the red circle yellow") == (0.0, 0.0)
    assert S.score_edit(a, S.render(S.Scene(64, [src.objects[0]])), "remove the red circle") == (0.0, 0.0)
    moved_down = S.Scene(64, [S.Obj("circle", "red", 6, 25, 16), src.objects[1]])
    assert S.score_edit(a, S.render(moved_down), "move the red circle right") == (0.0, 1.0)
    assert S.score_edit(a, S.render(moved_down), "move the red circle down") == (1.0, 1.0)
    added_wrong = S.Scene(64, src.objects + [S.Obj("triangle", "green", 40, 4, 16)])
    assert S.score_edit(a, S.render(added_wrong), "add a green circle")[0] == 0.0
    with pytest.raises(ValueError, match="outside the grammar"):
        S.parse_edit("make the red circle")
    with pytest.raises(ValueError, match="unknown word 'bigger'"):
        S.parse_edit("make the red circle bigger")


def test_checker_speed():
    # >= 500 checks/s on one core was measured (see the README); here a loose floor that still
    # catches an accidental slow path (e.g. a per-pixel Python loop)
    rng = random.Random(7)
    cases = [(S.render(S.sample_scene(rng, 64, p)), p) for p in (S.sample_prompt(rng) for _ in range(300))]
    t = time.perf_counter()
    for im, p in cases:
        S.check(im, p)
    assert len(cases) / (time.perf_counter() - t) > 200


def test_prompts_a_scene_cannot_hold_and_exactly_one():
    with pytest.raises(ValueError, match="asks for 5 objects"):
        S.parse_prompt("two circles and three squares")
    with pytest.raises(ValueError, match="asks for 6 objects"):
        S.parse_prompt("a circle to the left of a square and four triangles")
    # "one circle" means exactly one: its text keeps the word, and two circles do not satisfy it
    p = S.parse_prompt("one circle")
    assert p.text == "one circle" and S.parse_prompt(p.text) == p
    two = S.Scene(64, [S.Obj("circle", "red", 4, 4, 16), S.Obj("circle", "blue", 40, 40, 16)])
    assert S.check(S.render(two), p).verdict is False and S.check(S.render(two), "a circle").verdict is True


def _grid_scene(*objs, grid=4, W=64):
    # objects as (shape, colour, column, row) in the grid world, centred in their cells
    c, s = W // grid, round(S.GRID_FILL * W / grid)
    return S.Scene(W, [S.Obj(sh, col, i * c + (c - s) // 2, j * c + (c - s) // 2, s) for sh, col, i, j in objs], grid)


def _cells(scene):
    return sorted((o.shape, o.colour, o.x // 16, o.y // 16) for o in scene.objects)


def test_repair_by_hand():
    # the fewest edits, the other objects where they were: a wrong colour recoloured in place, a
    # missing counted object added in the first free cell (raster order), a relation read the wrong
    # way round traded, one object too many removed; a scene that matches comes back as it is
    other = ("triangle", "green", 3, 3)
    cases = [("a red circle", [("circle", "blue", 1, 1), other], [("circle", "red", 1, 1), other]),
             ("three circles", [("circle", "blue", 0, 0), ("circle", "red", 2, 0)],
              [("circle", "blue", 0, 0), ("circle", "red", 1, 0), ("circle", "red", 2, 0)]),
             ("three circles", [("circle", "blue", 0, 0), ("circle", "red", 2, 0), other],  # reshaped before added
              [("circle", "blue", 0, 0), ("circle", "red", 2, 0), ("circle", "green", 3, 3)]),
             ("one circle", [("circle", "blue", 0, 0), ("circle", "red", 2, 0), ("circle", "red", 3, 0)],
              [("circle", "red", 3, 0)]),
             ("a square to the right of a circle", [("square", "red", 0, 1), ("circle", "blue", 3, 1)],
              [("circle", "blue", 0, 1), ("square", "red", 3, 1)]),
             ("two squares", [("square", "red", 0, 0), ("square", "red", 1, 0), ("square", "red", 2, 0)],
              [("square", "red", 1, 0), ("square", "red", 2, 0)]),
             ("a red circle", [("circle", "red", 2, 2), other], [("circle", "red", 2, 2), other])]
    for text, before, after in cases:
        fixed = S.repair(_grid_scene(*before), text)
        assert fixed is not None and _cells(fixed) == sorted(after), (text, fixed)
        assert S.check(S.render(fixed), text).verdict
    assert S.repair(_grid_scene(), "four squares", steps=3) is None  # four objects to add, three edits allowed
    assert _cells(S.repair(_grid_scene(), "four squares")) == [("square", "red", i, 0) for i in range(4)]


def test_repair_mends_every_broken_scene_and_reads_images_back():
    # near-misses of every category and failure kind (corrupt: one fact broken in a matching
    # scene): read back from pixels exactly (and repaired alike from there), repaired into a matching scene, and with no more
    # objects changed than undoing the break would change (greedy: at most 1% of them more)
    rng = random.Random(7)
    cells = lambda sc: set(_cells(sc))
    worse = n = 0
    for i in range(700):
        p = S.sample_prompt(rng, S.CATEGORIES[i % len(S.CATEGORIES)])
        good = S.sample_scene(rng, 64, p, grid=4)
        bad = S.corrupt(rng, good, p)
        if bad is None:
            continue
        back = S.scene_from_image(S.render(bad), 4)
        assert _cells(back) == _cells(bad)
        fixed = S.repair(bad, p)
        assert fixed is not None and S.truth(fixed, p).verdict and S.check(S.render(fixed), p).verdict, p.text
        assert _cells(S.repair(back, p)) == _cells(fixed)  # the same repair from the pixels (own images' path)
        worse += len(cells(bad) ^ cells(fixed)) > len(cells(bad) ^ cells(good))
        n += 1
    assert n > 600 and worse <= 0.01 * n, (worse, n)
    # a blob (two objects run together) is no object: read back without it
    im = S.render(_grid_scene(("circle", "red", 0, 0))).copy()
    im[40:44, 8:60] = S.COLOURS["blue"]
    assert _cells(S.scene_from_image(im, 4)) == [("circle", "red", 0, 0)]
