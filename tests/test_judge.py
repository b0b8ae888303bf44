"""The model as a judge (judge.py): the CLI's JSON line, P(yes) equal to what the introspective loop
records for the same image in the same context, one-line errors, --eval's metrics, the reason match.
A randomly initialised tiny model is enough: these are properties of the plumbing, not of training.
Run: OMP_NUM_THREADS=1 python -m pytest tests/test_judge.py"""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import judge
import sample as S
import shapes
from common import save_checkpoint
from model import PRESETS, Janus, JanusConfig
from tokenizer import VQ_PRESETS, TextTokenizer, VQModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a red circle to the left of a blue square"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny random checkpoint, a matching and a mismatching scene of PROMPT at 64 px (the tiny
    model reads 32 px: the CLI resizes), and files that are not good input."""
    w = tmp_path_factory.mktemp("judge")
    torch.manual_seed(0)
    model, vq, tok = Janus(JanusConfig(**PRESETS["tiny"])).eval(), VQModel(VQ_PRESETS["tiny"]).eval(), TextTokenizer(shapes.WORDS)
    save_checkpoint(S.janus_checkpoint(model, vq, tok), str(w / "tiny.pt"))
    rng = random.Random(0)
    for name, match in (("match", True), ("miss", False)):
        scene = shapes.sample_scene(rng, 64, PROMPT, match=match)
        assert shapes.check(shapes.render(scene), PROMPT).verdict == match
        Image.fromarray(shapes.render(scene)).save(w / f"{name}.png")
    Image.fromarray(np.full((64, 48, 3), 255, np.uint8)).save(w / "wide.png")
    (w / "notes.png").write_text("not an image")
    return w, model, vq, tok


def _check_line(line):
    out = json.loads(line)
    assert set(out) == {"verdict", "p_yes", "reason"}
    assert out["verdict"] in ("yes", "no") and isinstance(out["p_yes"], float) and isinstance(out["reason"], str)
    assert 0.0 <= out["p_yes"] <= 1.0
    assert out["verdict"] == ("yes" if out["p_yes"] >= 0.5 else "no")
    assert out["reason"].startswith("Yes" if out["verdict"] == "yes" else "No")
    return out


def test_cli_prints_one_json_line(world, capsys):
    w, model, vq, tok = world
    # as a user runs it: a subprocess, stdout is exactly one JSON line
    cmd = [sys.executable, os.path.join(ROOT, "judge.py"), "--ckpt", str(w / "tiny.pt"), "--image", str(w / "match.png"),
           "--prompt", PROMPT]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("\n") == 1
    _check_line(r.stdout)
    # in-process, on the mismatching scene: the same numbers as judge_images on the resized image
    judge.main(["--ckpt", str(w / "tiny.pt"), "--image", str(w / "miss.png"), "--prompt", PROMPT])
    out = _check_line(capsys.readouterr().out)
    image = judge.to_model_size(shapes.load_image(str(w / "miss.png")), model.cfg.image_size)
    verdicts, p, reasons = judge.judge_images(model, tok, [image], [PROMPT])
    assert (out["verdict"], out["reason"]) == (verdicts[0], reasons[0]) and out["p_yes"] == pytest.approx(p[0], abs=1e-6)


def test_p_yes_is_what_the_loop_records(world):
    # chain.p_yes[0]: image 1 judged right after the prompt, the same layout as selfcheck_seq. Judged
    # again here on the very image the loop drew, batched with prompts of other lengths (left pads)
    _, model, vq, tok = world
    prompts = ["a red circle", PROMPT, "three squares"]
    chains = S.introspect(model, vq, tok, prompts, [3, 4, 5], S.Options(rounds=1))
    images = [c.images[0] for c in chains]
    verdicts, p, reasons = judge.judge_images(model, tok, images, prompts)
    want = [c.p_yes[0] for c in chains]
    assert p == pytest.approx(want, abs=1e-5)
    assert judge.p_yes(model, tok, images, prompts).tolist() == pytest.approx(want, abs=1e-5)
    # greedy on both sides: the same verdicts and the same reasons, word for word
    assert verdicts == [c.verdicts[0] for c in chains] and reasons == [c.reasons[0] for c in chains]
    # and P(yes) is P(Yes) / (P(Yes) + P(No)) of a plain forward of the layout, computed by hand
    seq = S.selfcheck_seq(tok, prompts[0], images[0], model.cfg.image_tokens)
    with torch.no_grad():
        b = S.collate([seq], tok)
        logits = model.text_logits(model(S.embed_batch(model, b))[:, -1])[0]
    py, pn = logits[tok.yes].exp(), logits[tok.no].exp()
    assert p[0] == pytest.approx((py / (py + pn)).item(), abs=1e-5)


@pytest.mark.parametrize("argv, words", [
    (["--image", "{w}/notes.png", "--prompt", PROMPT], ["cannot read image", "notes.png"]),
    (["--image", "{w}/wide.png", "--prompt", PROMPT], ["48x64", "square"]),
    (["--image", "{w}/match.png", "--prompt", "a red dog"], ["dog"]),
    (["--image", "{w}/match.png"], ["--prompt"]),
    (["--eval", "--prompt", PROMPT], ["either"]),
    (["--image", "{w}/match.png", "--prompt", PROMPT, "--out", "{w}/x.json"], ["--out"]),
])
def test_bad_input_is_one_line(world, argv, words):
    w = world[0]
    with pytest.raises(SystemExit) as e:
        judge.main(["--ckpt", str(w / "tiny.pt")] + [a.replace("{w}", str(w)) for a in argv])
    msg = str(e.value.code)
    assert msg.startswith("error: ") and "\n" not in msg and all(x in msg for x in words), msg
    assert not (w / "x.json").exists()


def test_eval_reports_every_metric(world, capsys):
    w = world[0]
    judge.main(["--ckpt", str(w / "tiny.pt"), "--eval", "--n", "1", "--out", str(w / "eval.json")])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.load(open(w / "eval.json"))
    keys = {"agreement", "balanced_accuracy", "auc", "auc_within_category", "reason_exact", "reason_loose", "n",
            "n_checker_no", "yes_rate", "checker_yes_rate"}
    assert keys <= set(printed) and keys <= set(printed["rendered"]) and keys <= set(printed["drawn"])
    # rendered: one matching and one near miss per category, so every metric is defined
    r = printed["rendered"]
    assert r["n"] == 2 * len(shapes.CATEGORIES) and r["checker_yes_rate"] == 0.5
    assert all(r[k] is not None for k in keys)
    # drawn: balanced per category, from a pool of up to draws x 2n images (here one batch holds them all)
    d = printed["drawn"]
    assert d["n"] % 2 == 0 and d["n"] <= 2 * len(shapes.CATEGORIES) and d["pool"] <= 4 * 2 * len(shapes.CATEGORIES)
    assert d["n"] == 0 or d["checker_yes_rate"] == 0.5
    assert printed["n"] == r["n"] + d["n"]


def test_reason_match_exact_and_loose():
    # the checker says "No, the circle is green, not red." (first failed fact: a red circle)
    p = shapes.parse_prompt("a red circle and a blue square")
    scene = shapes.Scene(64, [shapes.Obj("circle", "green", 8, 8, 18), shapes.Obj("square", "blue", 38, 38, 18)])
    c = shapes.check(shapes.render(scene), p)
    assert c.reason == "No, the circle is green, not red." and judge.failed_pairs(p, c) == [("red", "circle")]
    answers = [c.reason, "No, there is no red circle.", "No, there is no blue square.", "Yes, there is a red circle."]
    said = [False, False, False, True]
    m = judge.judge_metrics(said, [0.1, 0.2, 0.3, 0.9], [False] * 4, ["colour_attr"] * 4, answers, [c] * 4, [p] * 4)
    assert m["reason_exact"] == 0.25 and m["reason_loose"] == 0.5  # a Yes never names the failed fact
    assert m["agreement"] == 0.75 and m["n_checker_no"] == 4


def test_drawn_set_stops_once_both_classes_are_full(monkeypatch):
    # a stand-in generator: even seeds draw the prompt's scene, odd seeds a near miss, so the first
    # batch of 64 already holds n = 3 of each class; no second batch is drawn, and what is kept is
    # the first 3 checker-Yes and the first 3 checker-No (alternating: the first 6 draws)
    calls, prompts = [], shapes.make_splits(seed=0)["test"]
    ps = {p.text: p for p in prompts}

    def fake_generate(model, vq, tok, texts, seeds):
        calls.append(len(texts))
        rng = random.Random(0)
        return np.stack([shapes.render(shapes.sample_scene(rng, 32, ps[t], match=s % 2 == 0)) for t, s in zip(texts, seeds)]), None

    monkeypatch.setattr(judge, "generate", fake_generate)
    kept, drawn = judge.drawn_set(None, None, None, prompts, n=3, seed=0, draws=40)
    cats = len({p.category for p in prompts})
    assert calls == [judge.BATCH] * cats and drawn == judge.BATCH * cats
    assert len(kept) == 6 * cats
    assert all(shapes.check(im, p).verdict == (k % 2 == 0) for k, (im, p) in enumerate(kept))


def test_every_judge_on_the_same_images(world, monkeypatch):
    # first_images: the loop's image 1 with geneval's seeds (seed + i, across batches), then a second
    # draw of other seeds; batches of 4 here, so the offsets of later batches count
    _, model, vq, tok = world
    monkeypatch.setattr(judge, "BATCH", 4)
    prompts = shapes.per_category(shapes.make_splits(seed=0)["test"], 1)
    images, ps = judge.first_images(model, vq, tok, prompts, draws=2, seed=3)
    assert ps == prompts + prompts
    loop = S.introspect(model, vq, tok, [p.text for p in prompts], [3 + i for i in range(len(prompts))], S.Options())
    assert all((a == c.images[0]).all() for a, c in zip(images, loop))
    assert any((a != b).any() for a, b in zip(images[:len(prompts)], images[len(prompts):]))
    # same_images on rendered matches and near misses (both classes in every category): the AUC
    # within category counted pair by pair, and balanced accuracy of judge_images' verdicts
    pairs = judge.rendered_set(prompts, 2, model.cfg.image_size, 0, model.cfg.scene_grid)
    ims, pp = [im for im, _ in pairs], [p for _, p in pairs]
    other = Janus(JanusConfig(**PRESETS["tiny"])).eval()  # a second judge: other random weights
    got = judge.same_images({"a": (model, tok), "b": (other, tok)}, {"rendered": (ims, pp), "drawn": (images, ps)})
    assert set(got) == {"a", "b"} and all(set(r) == {"rendered", "drawn"} for r in got.values())
    labels = np.array([shapes.check(im, p).verdict for im, p in pairs])
    for name, m in (("a", model), ("b", other)):
        verdicts, probs, _ = judge.judge_images(m, tok, ims, [p.text for p in pp])
        per = []
        for c in dict.fromkeys(p.category for p in pp):
            pos = [q for q, l, p in zip(probs, labels, pp) if l and p.category == c]
            neg = [q for q, l, p in zip(probs, labels, pp) if not l and p.category == c]
            per.append(np.mean([(a > b) + 0.5 * (a == b) for a in pos for b in neg]))
        r = got[name]["rendered"]
        assert r["auc_within_category"] == pytest.approx(np.mean(per), abs=1e-6)
        said = np.array(verdicts) == "yes"
        want = (said[labels].mean() + (~said[~labels]).mean()) / 2
        assert r["balanced_accuracy"] == pytest.approx(want) and r["right"] == 0.5 and r["n"] == len(pairs)
    assert got["a"]["rendered"] != got["b"]["rendered"]  # other weights, other numbers


def test_same_images_by_hand(monkeypatch):
    # a stand-in judge with chosen P(yes) on two matches and two near misses of one prompt: the
    # verdict is Yes from 0.5 up (the loop's rule: the larger of P(Yes), P(No), Yes on a tie)
    p = shapes.per_category(shapes.make_splits(seed=0)["test"], 1)[0]
    pairs = judge.rendered_set([p], 2, 32, 0)  # match, miss, match, miss
    ims, ps = [im for im, _ in pairs], [q for _, q in pairs]
    monkeypatch.setattr(judge, "p_yes", lambda model, tok, images, prompts: torch.tensor([0.5, 0.6, 0.9, 0.1]))
    got = judge.same_images({"j": (None, None)}, {"s": (ims, ps)})["j"]["s"]
    # pairs (match, miss): (0.5, 0.6) lost, (0.5, 0.1), (0.9, 0.6), (0.9, 0.1) won: AUC 3/4; Yes rate on
    # matches 2/2, No rate on misses 1/2: balanced accuracy 3/4
    assert got == {"auc_within_category": 0.75, "balanced_accuracy": 0.75, "right": 0.5, "n": 4}
