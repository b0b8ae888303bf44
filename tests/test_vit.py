"""The ViT's pretraining (our SigLIP stand-in): per-patch labels by hand, resume == uninterrupted,
it learns, and the base stage refuses a missing or mismatched ViT. Run: python -m pytest tests/test_vit.py"""
import json
import os

import pytest
import torch

import shapes
import vit
from common import load_checkpoint
from model import PRESETS, Janus, JanusConfig

SQUARE, RED, BLUE = shapes.SHAPES.index("square"), shapes.COLOUR_NAMES.index("red"), shapes.COLOUR_NAMES.index("blue")
BG_S, BG_C = len(shapes.SHAPES), len(shapes.COLOUR_NAMES)


def test_patch_labels_hand_computed():
    """32 px, 8 px patches (4 x 4). A red square on pixels 6..14 covers patch 0 with 2x2 = 4 of 64
    pixels (below COVER = 15%), patches 1 and 4 with 2x7 = 14 (22%), patch 5 with 7x7; its centre
    (10, 10) is in patch 5. A blue square on x 20..26, y 17..23 covers patch 10 with 4x7 = 28 and
    patch 11 with 3x7 = 21; its centre (23, 20) is in patch 10."""
    scene = shapes.Scene(32, [shapes.Obj("square", "red", 6, 6, 9), shapes.Obj("square", "blue", 20, 17, 7)])
    shape, colour, centre = vit.patch_labels(scene, 8)
    owned = {1: RED, 4: RED, 5: RED, 10: BLUE, 11: BLUE}
    assert shape.tolist() == [SQUARE if i in owned else BG_S for i in range(16)]
    assert colour.tolist() == [owned.get(i, BG_C) for i in range(16)]
    assert centre.tolist() == [int(i in (5, 10)) for i in range(16)]


def test_resume_after_interruption_equals_uninterrupted(tmp_path, monkeypatch):
    args = ["--config", "tiny", "--steps", "6", "--dtype", "fp32"]
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    vit.main(args + ["--out", full])
    real, calls = vit.losses, []

    def dying(*a, **k):  # killed during step 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(vit, "losses", dying)
    with pytest.raises(KeyboardInterrupt):
        vit.main(args + ["--out", cut, "--ckpt-every", "2"])
    assert load_checkpoint(os.path.join(cut, "vit_state.pt"))["step"] == 4
    assert not os.path.exists(os.path.join(cut, "vit.pt"))  # nothing half-done looks finished
    monkeypatch.setattr(vit, "losses", real)
    vit.main(args + ["--out", cut, "--ckpt-every", "2"])
    a, b = (load_checkpoint(os.path.join(d, "vit.pt"))["model"] for d in (full, cut))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pretraining_learns_colours_and_shapes(tmp_path):
    """The tiny run (150 steps, 2 seconds) against its own initialisation, on held-out scenes:
    colour 0.07 -> 0.99, shape 0.18 -> 0.51 when written."""
    cfg = JanusConfig(**PRESETS["tiny"])
    torch.manual_seed(0)
    before = vit.patch_metrics(vit.VisionTransformer(cfg), vit.PatchHead(cfg.vit_width), 64, 32, 8, "cpu")
    vit.main(["--config", "tiny", "--out", str(tmp_path)])
    after = json.load(open(tmp_path / "vit_eval.json"))
    assert after["colour"] > 0.9 > before["colour"] and after["shape"] > before["shape"] + 0.1


def test_a_vit_of_another_shape_is_refused(tmp_path):
    toy = JanusConfig(**PRESETS["toy"])
    torch.save({"kind": "vit", "config": vit.vit_config(toy), "model": {}}, tmp_path / "vit.pt")
    with pytest.raises(ValueError, match="another shape"):
        vit.load_vit(str(tmp_path / "vit.pt"), Janus(JanusConfig(**PRESETS["tiny"])))
