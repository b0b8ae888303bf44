"""SFT: where the loss falls in each task, prompt dropout, DDP == one process, resume == uninterrupted,
and the tiny config end to end. Run: python -m pytest tests/test_sft.py"""
import argparse
import os
import random
import shutil
import subprocess
import sys

import pytest
import numpy as np
import torch

import model as M
import sample as S
import sft
import shapes
import tokenizer
import train
import vit
from common import load_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOK = tokenizer.TextTokenizer(shapes.WORDS)
N = 16  # tiny: image tokens per image


def _codes(k=0):
    return [(7 * i + k) % 200 for i in range(N)]


def _image():
    return shapes.render(shapes.Scene(32, [shapes.Obj("circle", "red", 4, 4, 9)]))


def _where(b, row=0):
    # positions (of the TARGET token, i.e. index + 1) that carry loss, and their weights
    w = b.weights[row]
    return [i + 1 for i in torch.nonzero(w).flatten().tolist()], w[w > 0].tolist()


def test_task1_loss_only_on_the_image():
    s = sft.build_seq(dict(task="task1", prompt="a red circle", codes=_codes(), drop=False), TOK, N)
    b = S.collate([s], TOK)
    pos, w = _where(b)
    P = len(S.prompt_seq(TOK, "a red circle"))
    assert pos == list(range(P, P + N)) and w == [1.0] * N
    assert (b.text_targets == -1).all() and b.image_targets[0, P - 1:P + N - 1].tolist() == _codes()


def test_base_steps_mix_describe_and_vqa_per_example():
    # a step is text-to-image (every example) or understanding (describe and vqa mixed per example,
    # in proportion 0.2 : 0.3 = 40% describe); the same rng state gives the same batch
    by_cat = {}
    for p in shapes.make_splits(seed=0)["train"]:
        by_cat.setdefault(p.category, []).append(p)
    mix, kinds, mixed = {"t2i": 0.5, "describe": 0.2, "vqa": 0.3}, {"t2i": 0, "und": 0}, 0
    describe, und = 0, 0
    for step in range(40):
        task, exs = sft.base_batch(random.Random(f"t-{step}"), mix, 16, by_cat, 32)
        kinds[task] += 1
        tasks = {e["task"] for e in exs}
        if task == "t2i":
            assert tasks == {"t2i"}
        else:
            assert task == "und" and tasks <= {"describe", "vqa"}
            mixed += tasks == {"describe", "vqa"}
            describe += sum(e["task"] == "describe" for e in exs)
            und += len(exs)
    assert kinds["t2i"] > 10 and kinds["und"] > 10 and mixed >= kinds["und"] - 1
    assert abs(describe / und - 0.4) < 0.08
    a = sft.base_batch(random.Random("same"), mix, 8, by_cat, 32)
    b = sft.base_batch(random.Random("same"), mix, 8, by_cat, 32)
    assert a[0] == b[0] and all((x["image"] == y["image"]).all() for x, y in zip(a[1], b[1]))


def test_task2_answers_are_balanced_per_prompt_and_per_look():
    # own images look unlike rendered scenes, and some prompts the base model always fails: if own
    # images sat mostly behind "No", or a prompt's answer were mostly "No", the judge could answer
    # from the look or from the prompt without reading the image
    rng = random.Random(0)
    always, never, mixed = (shapes.sample_prompt(rng, c) for c in ("single", "two", "colour"))
    own_im = np.zeros((32, 32, 3), np.uint8)  # a marker no renderer draws
    sample = lambda ok: (_codes(), own_im, ok, "Yes." if ok else "No, wrong.")
    pool = {always.text: [sample(True)] * 4, never.text: [sample(False)] * 4,
            mixed.text: [sample(True), sample(True), sample(False), sample(False)]}
    seen = {}
    for _ in range(3000):
        ex = sft.sft_example("task2", rng, sft.group([always, never, mixed]), pool, 32)
        key = (ex["prompt"], ex["answer"].startswith("Yes"), ex["image"] is own_im)
        seen[key] = seen.get(key, 0) + 1
    for p in (always, never, mixed):
        n = {yes: sum(v for (t, y, _), v in seen.items() if t == p.text and y == yes) for yes in (True, False)}
        assert abs(n[True] / (n[True] + n[False]) - 0.5) < 0.05, (p.text, n)
        for yes in (True, False):
            share = seen.get((p.text, yes, True), 0) / n[yes]
            # own images only where the prompt has both kinds, then as often behind Yes as behind No
            assert share == 0 if p is not mixed else abs(share - sft.OWN_SHARE) < 0.07, (p.text, yes, share)


def test_task2_no_shows_a_neighbours_image_answered_against_this_prompt(monkeypatch):
    # "a red circle" and "a blue circle" differ in one word: a "No" for red may show blue's own
    # image (looking as clean as red's right ones), answered by the checker against "a red circle"
    monkeypatch.setattr(sft, "NEIGHBOUR_SHARE", 0.5)  # the preset's 0 shows none
    red, blue = shapes.parse_prompt("a red circle"), shapes.parse_prompt("a blue circle")
    assert sft.neighbours(red, [red, blue, shapes.parse_prompt("a blue square")]) == [blue]
    assert sft.neighbours(shapes.parse_prompt("an orange circle"), [red]) == [red]  # articles aside
    draw = lambda c: shapes.render(shapes.Scene(32, [shapes.Obj("circle", c, 16, 16, 10)]))
    pool = {red.text: [(_codes(), draw("red"), True, "Yes."), (_codes(), draw("green"), False, "No, wrong.")],
            blue.text: [(_codes(), draw("blue"), True, "Yes.")]}
    rng = random.Random(0)
    nos = [ex for ex in (sft.sft_example("task2", rng, sft.group([red, blue]), pool, 32, depth=0) for _ in range(800))
           if ex["prompt"] == red.text and ex["answer"].startswith("No")]
    shown_blue = [ex for ex in nos if ex["image"] is pool[blue.text][0][1]]
    assert abs(len(shown_blue) / len(nos) - sft.NEIGHBOUR_SHARE) < 0.08, (len(shown_blue), len(nos))
    assert shown_blue[0]["answer"] == shapes.check(draw("blue"), red).reason != "No, wrong."


def test_task2_loss_on_the_answer_weighted():
    ex = dict(task="task2", prompt="a red circle", image=_image(), answer="No, the circle is green, not red.")
    s = sft.build_seq(ex, TOK, N)
    b = S.collate([s], TOK)
    pos, w = _where(b)
    ans = TOK.encode(ex["answer"]) + [TOK.eos]
    assert pos == list(range(len(s) - len(ans), len(s)))
    assert w == pytest.approx([0.8] + [0.2 / (len(ans) - 1)] * (len(ans) - 1))
    assert b.text_targets[0, len(s) - len(ans) - 1:len(s) - 1].tolist() == ans and ans[0] == TOK.no
    assert int(b.und_mask.sum()) == N and (b.image_targets == -1).all()


class _TableModel(torch.nn.Module):
    """Stands in for the model in step_loss: its per-token losses are a given (B, T) table."""

    def __init__(self, table):
        super().__init__()
        self.table, self.one = table, torch.nn.Parameter(torch.ones(()))

    def embed(self, idx, **_):
        return torch.zeros(idx.shape)

    def forward(self, x):
        return x

    def token_losses(self, h, text_targets, image_targets):
        return self.table * self.one


def test_task2_loss_is_per_example_verdict_and_rest_means():
    # SPEC.md section 4: per example 0.8 CE(Yes/No) + 0.2 mean CE(rest), then the mean over the
    # batch, whatever the answers' lengths. Two answers of 3 and 11 tokens (EOS included); CE 1 on "Yes", 2 on
    # each of its other tokens; 3 on "No", 0.5 on each of its others; 100 where there is no loss.
    # By hand: (0.8 * 1 + 0.2 * 2 + 0.8 * 3 + 0.2 * 0.5) / 2 = (1.2 + 2.5) / 2 = 1.85. A weighted
    # mean over the batch's tokens with weights 0.8 / 0.2 (the old loss) gives
    # (0.8 * 1 + 0.2 * 2 * 2 + 0.8 * 3 + 0.2 * 0.5 * 10) / (0.8 + 0.2 * 2 + 0.8 + 0.2 * 10) = 5.0 / 4.0 = 1.25.
    exs = [dict(task="task2", prompt="a red circle", image=_image(), answer=a)
           for a in ("Yes.", "No, the circle is green, not red.")]
    b = S.collate([sft.build_seq(ex, TOK, N) for ex in exs], TOK)
    table = torch.full(b.weights.shape, 100.0)
    for row, (first, rest) in enumerate(((1.0, 2.0), (3.0, 0.5))):
        at = torch.nonzero(b.weights[row]).flatten()  # the answer's targets, Yes/No first
        assert b.text_targets[row, at[0]] in (TOK.yes, TOK.no) and len(at) == (3, 11)[row]
        table[row, at[0]], table[row, at[1:]] = first, rest
    assert sft.step_loss(_TableModel(table), [b], 1).item() == pytest.approx(1.85)


def test_batches_grouped_by_length_give_the_one_batch_loss_and_gradient():
    # a Task II step rehearsing the base's reading: VQA conversations beside short answers, and
    # prompts of every length in Task I; collate_groups cuts it into shorter-padded batches whose
    # summed loss and gradient equal one right-padded batch's (the padding saved is real)
    torch.manual_seed(0)
    model = M.Janus(M.JanusConfig(**M.PRESETS["tiny"]))
    rng, by_cat = random.Random(0), sft.group(shapes.make_splits(seed=0)["train"])
    exs = [dict(sft.und_example(rng, sft.UND_MIX, by_cat, 32), unit=True) for _ in range(6)]
    exs += [dict(task="task2", prompt=shapes.sample_prompt(rng).text, image=_image(), answer="Yes.") for _ in range(6)]
    exs += [dict(task="task1", prompt=shapes.sample_prompt(rng).text, codes=_codes(k), drop=k == 0) for k in range(6)]
    seqs = [sft.build_seq(ex, TOK, N) for ex in exs]
    one, groups = S.collate(seqs, TOK), S.collate_groups(seqs, TOK, overhead=8)
    assert len(groups) > 1 and sum(g.idx.shape[0] for g in groups) == len(seqs)
    assert sum(g.idx.numel() for g in groups) < 0.8 * one.idx.numel()
    assert sorted(len(s) for s in seqs) == [int(n) for g in groups for n in g.key_mask.sum(1)]  # shortest first
    grads = []
    for batches in ([one], groups):
        model.zero_grad()
        loss = sft.step_loss(model, batches, 1)
        loss.backward()
        grads.append((loss.item(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    assert len(grads[0][1]) == len(grads[1][1]) and all(torch.allclose(a, b, atol=1e-6, rtol=1e-4)
                                                        for a, b in zip(grads[0][1], grads[1][1]))


def test_collate_groups_covers_every_sequence_once():
    # lengths 5, 40, 6, 41, 5: two groups at a small overhead (the short three, the long two), rows
    # naming each sequence once; grouped=False: one batch in the given order
    seqs = [S.Seq(ids=[7] * n, kind=[S.TEXT] * n, w=[1.0] * n, span=[0] * n) for n in (5, 40, 6, 41, 5)]
    groups = S.collate_groups(seqs, TOK, overhead=8)
    assert [sorted(b.rows) for b in groups] == [[0, 2, 4], [1, 3]]
    assert [tuple(b.idx.shape) for b in groups] == [(3, 6), (2, 41)]
    one = S.collate_groups(seqs, TOK, grouped=False)
    assert len(one) == 1 and list(one[0].rows) == [0, 1, 2, 3, 4] and one[0].idx.shape == (5, 41)


def test_vqa_conversation_loss_on_every_answer():
    """One image, several questions: the first in the self-check layout (prompt, image, cue), the
    others after the image; each answer (+ EOS) carries the loss, 0.8 on its Yes/No and 0.2 on the
    rest; the questions and the image carry none; the image goes in once."""
    qa = [("a red circle", "Yes, there is a red circle."), ("a square", "No, there is no square."),
          ("two circles", "No, there is one circle, not two.")]
    s = sft.build_seq(dict(task="vqa", image=_image(), qa=qa), TOK, N)
    b = S.collate([s], TOK)
    pos, w = _where(b)
    # the opening is exactly the judge's: Task II's sequence up to its answer
    head = sft.build_seq(dict(task="task2", prompt=qa[0][0], image=_image(), answer=qa[0][1]), TOK, N)
    assert s.ids[:len(head)] == head.ids and s.kind[:len(head)] == head.kind
    expect_pos, expect_w, i = [], [], 0
    for j, (q, a) in enumerate(qa):
        turn = TOK.encode("<end_of_image>\nLet me think Does this image match the prompt...") if j == 0 else \
            TOK.encode("<|User|>: " + S.question(q) + "\n\n<|Assistant|>:")
        start = s.ids.index(TOK.img) + N if j == 0 else i
        assert s.ids[start:start + len(turn)] == turn  # the cue, or the question, as written
        ans = TOK.encode(a) + [TOK.eos]
        first = start + len(turn)
        assert s.ids[first:first + len(ans)] == ans
        expect_pos += list(range(first, first + len(ans)))
        expect_w += [0.8] + [0.2] * (len(ans) - 1)
        i = first + len(ans)
    assert s.ids[:s.ids.index(TOK.img)] == [TOK.bos] + TOK.encode("<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>")
    assert i == len(s) and pos == expect_pos and w == pytest.approx(expect_w)
    assert int(b.und_mask.sum()) == N and (b.image_targets == -1).all()


def test_easy_steps_open_conversations_with_easy_prompts():
    by_cat = {}
    for p in shapes.make_splits(seed=0)["train"]:
        by_cat.setdefault(p.category, []).append(p)
    easy = {p.text for c in sft.EASY_CATEGORIES for p in by_cat[c]}
    rng = random.Random(0)
    firsts = [sft.base_example("vqa", rng, by_cat, 32, easy=True)["qa"][0][0] for _ in range(40)]
    assert all(t in easy for t in firsts)
    firsts = [sft.base_example("vqa", rng, by_cat, 32)["qa"][0][0] for _ in range(40)]
    assert sum(t not in easy for t in firsts) > 20  # afterwards every category (5 of 7 are not easy)


def test_sft_und_share_rehearses_the_bases_reading():
    """--und-share: that share of a Task II step's examples are the base's understanding examples
    (describe and VQA on rendered scenes in UND_MIX's proportion, conversations opening on easy
    prompts), each weighing 1 in all as a Task II example does; other steps untouched; at 0 none."""
    by_cat = sft.group(shapes.make_splits(seed=0)["train"])
    pool = {p.text: [] for ps in by_cat.values() for p in ps}  # no own samples: rendered scenes only
    easy = {p.text for c in sft.EASY_CATEGORIES for p in by_cat[c]}
    settings = dict(batch_size=20, edit_share=0.0, und_share=0.5, mix=sft.SFT_MIX, category_weights={}, repair_share=0.0)
    steps = [sft.sft_batch(random.Random(s), settings, by_cat, pool, 32) for s in range(30)]
    for task, exs in steps:
        kinds = [ex["task"] for ex in exs]
        assert set(kinds) <= ({"task2", "describe", "vqa"} if task == "task2" else {task})
    und = [ex for task, exs in steps if task == "task2" for ex in exs if ex["task"] != "task2"]
    n2 = sum(len(exs) for task, exs in steps if task == "task2")
    assert 0.35 * n2 <= len(und) <= 0.65 * n2 and sum(ex["task"] == "vqa" for ex in und) > 0.8 * len(und)
    assert all(ex["qa"][0][0] in easy for ex in und if ex["task"] == "vqa")
    for ex in und:
        s = sft.build_seq(ex, TOK, N)
        assert abs(sum(s.w) - 1) < 1e-6 and sum(sft.build_seq(dict(ex, unit=False), TOK, N).w) > 1.5
    settings["und_share"] = 0.0
    assert all(ex["task"] == task for s in range(30) for task, exs in [sft.sft_batch(random.Random(s), settings, by_cat, pool, 32)]
               for ex in exs)


def test_vqa_answers_are_the_checkers_and_the_first_is_balanced():
    by_cat = {}
    for p in shapes.make_splits(seed=0)["train"]:
        by_cat.setdefault(p.category, []).append(p)
    rng, first_yes = random.Random(0), []
    for _ in range(60):
        ex = sft.base_example("vqa", rng, by_cat, 32)
        assert len(ex["qa"]) == sft.VQA_QUESTIONS
        for q, a in ex["qa"]:
            assert shapes.check(ex["image"], q).reason == a  # the rendered image answers every question
        first_yes.append(ex["qa"][0][1].startswith("Yes"))
    assert 0.3 < np.mean(first_yes) < 0.7


def test_task2_history_is_the_loops_second_judgement():
    # Task II with an earlier failed round must be the context in which the loop judges its second
    # image: its P(yes) by one forward over the training sequence equals the loop's, and the loss
    # stays on the answer only (the earlier image and its reflection carry none)
    torch.manual_seed(0)
    model = M.Janus(M.JanusConfig(**M.PRESETS["tiny"])).eval()
    vq = tokenizer.VQModel(tokenizer.VQ_PRESETS["tiny"]).eval()
    chains = S.introspect(model, vq, TOK, ["a red circle", "three squares"] * 4, list(range(40, 48)),
                          S.Options(rounds=2, text_temperature=1.0, max_reason=6))
    twice = [c for c in chains if len(c.images) == 2]
    assert twice
    for c in twice:
        ex = dict(task="task2", prompt=c.prompt, image=c.images[1], answer="Yes.",
                  history=[(c.codes[0], c.reason_ids[0])])
        s = sft.build_seq(ex, TOK, N)
        b = S.collate([s], TOK)
        ans = TOK.encode("Yes.") + [TOK.eos]
        first = len(s) - len(ans) - 1  # the position that predicts Yes/No
        with torch.no_grad():
            two = model.text_logits(model(S.embed_batch(model, b))[0, first])[[TOK.yes, TOK.no]]
        assert two.softmax(-1)[0].item() == pytest.approx(c.p_yes[1], abs=1e-5)
        assert s.codes == c.codes[0] and int(b.und_mask.sum()) == N
        assert _where(b)[0] == list(range(len(s) - len(ans), len(s))) and (b.image_targets == -1).all()


def test_sft_prompts_are_drawn_category_first():
    # as sft.run picks them: toy's 400 training prompts drawn category first, then each text once.
    # The few single/two texts repeat, compositional ones don't: drawn uniformly over the texts,
    # SFT saw ~38% compositional and ~2% single prompts; category first, each category ~1/7
    by_cat = sft.group(shapes.make_splits(seed=0)["train"])
    rng = random.Random("sft-prompts-0")
    chosen = sft.group([sft.train_prompt(rng, by_cat) for _ in range(400)])
    assert set(chosen) == set(shapes.CATEGORIES) and len(chosen["single"]) < len(chosen["compositional"]) / 5
    cat = {p.text: c for c, ps in chosen.items() for p in ps}
    pool = {t: [] for t in cat}
    rng, n = random.Random(0), 2800
    seen = [cat[sft.sft_example("task1", rng, chosen, pool, 32)["prompt"]] for _ in range(n)]
    shares = {c: seen.count(c) / n for c in shapes.CATEGORIES}
    assert all(abs(v - 1 / 7) < 0.03 for v in shares.values()), shares  # 1/7 = 0.143, sd 0.007
    # --category-weights: compositional=2, single=0 -> compositional 2/7, single none, the others 1/7
    rng = random.Random(0)
    w = sft.category_weights("compositional=2,single=0")
    seen = [cat[sft.sft_example("task1", rng, chosen, pool, 32, weights=w)["prompt"]] for _ in range(n)]
    shares = {c: seen.count(c) / n for c in shapes.CATEGORIES}
    assert shares["single"] == 0 and abs(shares["compositional"] - 2 / 7) < 0.03, shares
    assert all(abs(shares[c] - 1 / 7) < 0.03 for c in ("two", "counting", "colour", "position", "colour_attr")), shares
    for bad in ("compositonal=2", "single=-1", "single=x", ",".join(f"{c}=0" for c in shapes.CATEGORIES)):
        with pytest.raises(argparse.ArgumentTypeError):
            sft.category_weights(bad)
    assert sft.category_weights("") == {}


def test_drawing_targets_of_relations_hold_the_asked_objects_aligned(monkeypatch):
    """Every drawing target (base t2i, Tasks I and III) of a relation prompt holds the two asked
    objects alone in one row; other prompts' targets keep their distractors, and so do relation
    prompts' without ALIGNED_RELATIONS (the targets from which the toy never learned the relation word)."""
    rel, single = shapes.parse_prompt("a circle to the left of a square"), shapes.parse_prompt("a circle")
    by_cat, pool = {"position": [rel]}, {rel.text: []}
    rng = random.Random(0)
    ims = [sft.base_example("t2i", rng, by_cat, 64, grid=4)["image"] for _ in range(20)]
    ims += [sft.sft_example(t, rng, by_cat, pool, 64, grid=4)["image"] for t in ("task1", "task3") for _ in range(20)]
    for im in ims:
        objs = shapes.detect(im)
        assert sorted(o.shape for o in objs) == ["circle", "square"] and shapes.relations_aligned(shapes.Scene(64, objs), rel)
    assert max(len(shapes.detect(sft.target_scene(rng, 64, single, 4))) for _ in range(30)) > 1
    monkeypatch.setattr(sft, "ALIGNED_RELATIONS", False)
    assert max(len(shapes.detect(sft.target_scene(rng, 64, rel, 4))) for _ in range(30)) > 2


def test_drawing_targets_meet_the_asked_objects_in_the_order_the_prompt_names_them(monkeypatch):
    """Raster order (row by row over the 4 x 4 grid, the order image tokens are drawn in) meets a
    non-relation prompt's asked objects first, in the prompt's order, then the distractors; the
    targets still match, and keep their distractors; a relation prompt's objects come fact by fact,
    each relation's two as they stand. Without ORDERED_TARGETS the order is random."""
    p = shapes.parse_prompt("a red circle and a blue square and two green triangles")
    asked = [("red", "circle"), ("blue", "square"), ("green", "triangle"), ("green", "triangle")]

    def raster(im):
        return [(o.colour, o.shape) for o in sorted(shapes.detect(im), key=lambda o: (o.cy // 16, o.cx // 16))]
    rng = random.Random(0)
    ims = [sft.base_example("t2i", rng, {"compositional": [p]}, 64, grid=4)["image"] for _ in range(30)]
    assert all(raster(im)[:4] == asked and shapes.check(im, p).verdict for im in ims)
    two = shapes.parse_prompt("a yellow triangle and a purple circle")
    ims = [sft.target_scene(rng, 64, two, 4) for _ in range(40)]
    assert all(raster(im)[:2] == [("yellow", "triangle"), ("purple", "circle")] for im in ims)
    assert max(len(shapes.detect(im)) for im in ims) > 2  # distractors, after the asked objects
    # a relation's two objects as they stand: "X to the right of Y" reads Y, then X
    rel = shapes.parse_prompt("a red square to the right of a red triangle and a yellow square")
    ims = [sft.target_scene(rng, 64, rel, 4) for _ in range(20)]
    assert all(raster(im) == [("red", "triangle"), ("red", "square"), ("yellow", "square")] for im in ims)
    monkeypatch.setattr(sft, "ORDERED_TARGETS", False)
    assert any(raster(sft.target_scene(rng, 64, two, 4))[:2] != [("yellow", "triangle"), ("purple", "circle")]
               for _ in range(40))
    assert any(raster(sft.target_scene(rng, 64, rel, 4))[0] != ("red", "triangle") for _ in range(40))
    monkeypatch.setattr(sft, "ORDERED_TARGETS", True)  # free placement (grid 0) keeps random order
    assert any(raster(sft.target_scene(rng, 64, two, 0))[:2] != [("yellow", "triangle"), ("purple", "circle")]
               for _ in range(40))
    assert all(shapes.check(sft.target_scene(rng, 64, rel, 0), rel).verdict for _ in range(5))


def test_task2_shows_rendered_scenes_through_the_vq():
    # the judge only ever reads VQ-decoded images at inference: a rendered scene in Task II is shown
    # as its VQ round trip, answered by the checker on what is shown; own images stay as they are
    torch.manual_seed(0)
    vq = tokenizer.VQModel(tokenizer.VQ_PRESETS["tiny"]).eval()
    rng = random.Random(0)
    rendered, own = shapes.sample_prompt(rng, "colour"), shapes.sample_prompt(rng, "single")
    own_im = np.zeros((32, 32, 3), np.uint8)
    pool = {rendered.text: [], own.text: [(_codes(), own_im, True, "Yes."), (_codes(), own_im, False, "No, wrong.")]}
    exs = [sft.sft_example("task2", rng, sft.group([rendered, own]), pool, 32, depth=0) for _ in range(12)]
    before = [ex["image"].copy() for ex in exs]
    sft.finish_examples(exs, vq)
    for ex, im in zip(exs, before):
        if ex["prompt"] == own.text:
            assert ex["image"] is own_im
            continue
        want = tokenizer.reconstruct(vq, im[None])[1][0]
        assert np.array_equal(ex["image"], want) and not np.array_equal(want, im)
        assert ex["answer"] == shapes.check(want, rendered).reason
    assert {ex["prompt"] for ex in exs} == {rendered.text, own.text}


def test_task2_history_has_zero_to_depth_failed_rounds():
    rng = random.Random(0)
    p = shapes.sample_prompt(rng, "single")
    pool = {p.text: [(_codes(), _image(), False, "No, wrong.")]}
    seen = {d: set() for d in (1, 2)}
    for d in (1, 2):
        for _ in range(200):
            ex = sft.sft_example("task2", rng, sft.group([p]), pool, 32, depth=d)
            assert all(reason.startswith("No") for _, reason, _ in ex["history"])
            seen[d].add(len(ex["history"]))
    assert seen == {1: {0, 1}, 2: {0, 1, 2}}


def test_task3_loss_only_on_the_new_image():
    reason = "No, the circle is green, not red."
    ex = dict(task="task3", prompt="a red circle", codes=_codes(1), drop=False, history=[(_codes(2), reason)])
    s = sft.build_seq(ex, TOK, N)
    b = S.collate([s], TOK)
    pos, w = _where(b)
    assert pos == list(range(len(s) - N, len(s))) and w == [1.0] * N
    assert s.codes == _codes(2) + _codes(1)  # the negative (VQ path, no loss), then the positive
    assert TOK.decode(s.ids[:len(s) - N]).endswith(reason + "<eos>\nNext, I will draw a new image<begin_of_image>")
    # the deeper context of the paper: two failed rounds before the positive
    ex["history"] = [(_codes(2), reason), (_codes(3), "No, there is no circle.")]
    s2 = sft.build_seq(ex, TOK, N)
    assert s2.codes == _codes(2) + _codes(3) + _codes(1) and _where(S.collate([s2], TOK))[0] == list(range(len(s2) - N, len(s2)))


def test_prompt_dropout_replaces_exactly_the_prompt_text():
    keep = sft.build_seq(dict(task="t2i", prompt="two red circles", codes=_codes(), drop=False), TOK, N)
    drop = sft.build_seq(dict(task="t2i", prompt="two red circles", codes=_codes(), drop=True), TOK, N)
    P = len(S.prompt_seq(TOK, "two red circles"))
    changed = [i for i, (a, b) in enumerate(zip(keep.ids, drop.ids)) if a != b]
    assert changed == list(range(1, P - 1)) and all(drop.ids[i] == TOK.pad for i in changed)
    assert drop.w == keep.w and drop.codes == keep.codes  # the image and its loss are untouched
    # Task III: only the user's words are padded; the failed image and the reflection stay
    ex = dict(task="task3", prompt="two red circles", codes=_codes(1), history=[(_codes(2), "No, there is one red circle, not two.")])
    keep = sft.build_seq(dict(ex, drop=False), TOK, N)
    drop = sft.build_seq(dict(ex, drop=True), TOK, N)
    changed = [i for i, (a, b) in enumerate(zip(keep.ids, drop.ids)) if a != b]
    assert [keep.ids[i] for i in changed] == TOK.encode("two red circles")


def test_edit_examples_loss_on_the_edited_image_source_in_context():
    """--edit-share: the example is the sequence the sampler builds (sample.edit_seq), loss on the
    edited image only, dropout pads only the instruction; the target is a right edit of the source
    by the checker, the instruction never names an ood pairing, both images are VQ-encoded."""
    ins = "make the red circle blue"
    s = sft.build_seq(dict(task="edit", prompt=ins, src_codes=_codes(1), codes=_codes(2), drop=False), TOK, N)
    assert s.ids == S.edit_seq(TOK, _codes(1), ins).gen_image(TOK, _codes(2)).ids and s.codes == _codes(1) + _codes(2)
    assert _where(S.collate([s], TOK)) == (list(range(len(s) - N, len(s))), [1.0] * N)
    drop = sft.build_seq(dict(task="edit", prompt=ins, src_codes=_codes(1), codes=_codes(2), drop=True), TOK, N)
    changed = [i for i, (a, b) in enumerate(zip(s.ids, drop.ids)) if a != b]
    assert [s.ids[i] for i in changed] == TOK.encode(ins) and drop.w == s.w and drop.codes == s.codes
    rng = random.Random(0)
    exs = [sft.edit_example(rng, 64, grid=4) for _ in range(200)]
    assert {shapes.parse_edit(ex["prompt"]).kind for ex in exs} == {"recolour", "remove", "add", "move"}
    for ex in exs:
        e = shapes.parse_edit(ex["prompt"])
        assert not shapes.text_mentions_ood(ex["prompt"]) and (e.colour2, e.shape) not in shapes.OOD_PAIRS
        assert shapes.score_edit(ex["src_image"], ex["image"], e) == (1.0, 1.0), ex["prompt"]
        if e.kind == "add":  # the grid world's one place for it: the source's first free cell in raster order
            cells = lambda im: {(round(o.cy) // 16, round(o.cx) // 16) for o in shapes.detect(im)}
            added = cells(ex["image"]) - cells(ex["src_image"])
            assert added == {min({(r, c) for r in range(4) for c in range(4)} - cells(ex["src_image"]))}, ex["prompt"]
    torch.manual_seed(0)
    vq = tokenizer.VQModel(tokenizer.VQ_PRESETS["tiny"])
    ex = sft.finish_examples([sft.edit_example(random.Random(1), 32)], vq)[0]
    assert ex["src_codes"] == sft.encode_codes(vq, [ex["src_image"]])[0] and ex["codes"] == sft.encode_codes(vq, [ex["image"]])[0]


# -----------------------------------------------------------------------------
# Training runs on the tiny config (a shared tiny VQ, trained once for this file)


@pytest.fixture(scope="module")
def vq_dir(tmp_path_factory):
    """The stages below the base model, trained once for this file: the VQ and the ViT."""
    d = str(tmp_path_factory.mktemp("vq"))
    tokenizer.main(["--config", "tiny", "--out", d, "--steps", "30", "--eval-prompts", "10"])
    vit.main(["--config", "tiny", "--out", d, "--steps", "10"])
    return d


def _run_dir(vq_dir, tmp_path, name):
    d = str(tmp_path / name)
    os.makedirs(d)
    shutil.copy(os.path.join(vq_dir, "vq.pt"), d)
    shutil.copy(os.path.join(vq_dir, "vit.pt"), d)
    return d


def _params(path):
    return load_checkpoint(path)["model"]


def _same(a, b, atol):
    return all(torch.allclose(a[k].float(), b[k].float(), atol=atol) for k in a)


BASE = ["--stage", "base", "--config", "tiny", "--dtype", "fp32", "--no-final-eval", "--eval-every", "0", "--batch-size", "8",
        "--und-steps", "0"]


def test_resume_after_interruption_equals_uninterrupted(vq_dir, tmp_path, monkeypatch):
    # 4 steps, then 2 of the understanding tail: the kill falls in the tail, the resume at its start
    full = _run_dir(vq_dir, tmp_path, "full")
    steps = ["--steps", "4", "--und-steps", "2"]
    sft.main(BASE + steps + ["--out", full])
    cut = _run_dir(vq_dir, tmp_path, "cut")
    real, calls = sft.step_loss, []

    def dying_step(*a, **k):  # the process is killed during step 5
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sft, "step_loss", dying_step)
    with pytest.raises(KeyboardInterrupt):
        sft.main(BASE + steps + ["--ckpt-every", "2", "--out", cut])
    assert load_checkpoint(os.path.join(cut, "base_state.pt"))["step"] == 4
    assert not os.path.exists(os.path.join(cut, "base.pt"))  # nothing half-done looks finished
    monkeypatch.setattr(sft, "step_loss", real)
    sft.main(BASE + steps + ["--ckpt-every", "2", "--out", cut])
    a, b = _params(os.path.join(full, "base.pt")), _params(os.path.join(cut, "base.pt"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_base_ends_with_understanding_steps_on_a_restarted_schedule(vq_dir, tmp_path, monkeypatch):
    """--und-steps 2 after --steps 3: the last 2 steps draw UND_MIX conversations opening on easy
    prompts, and their lr starts a new warmup (tiny: 10 steps, so each step's lr is (i + 1) / 10 of the peak)."""
    seen, lrs = [], []
    real_batch, real_lr = sft.base_batch, train.lr_at

    def batch(rng, mix, n, by_cat, size, easy=False, grid=0):
        seen.append((dict(mix), easy))
        return real_batch(rng, mix, n, by_cat, size, easy, grid)

    monkeypatch.setattr(sft, "base_batch", batch)
    monkeypatch.setattr(train, "lr_at", lambda *a: lrs.append(real_lr(*a)) or lrs[-1])
    sft.main(BASE + ["--steps", "3", "--und-steps", "2", "--out", _run_dir(vq_dir, tmp_path, "tail")])
    assert [m for m, _ in seen] == [sft.BASE_MIX] * 3 + [sft.UND_MIX] * 2
    assert [e for _, e in seen][3:] == [True, True]
    peak = sft.TRAIN["tiny"]["base_lr"]
    groups = len(lrs) // 5  # lr_at runs once per parameter group and step
    assert len(lrs) == 5 * groups and lrs[::groups] == pytest.approx([peak * k / 10 for k in (1, 2, 3, 1, 2)])


def test_base_needs_the_pretrained_vit(vq_dir, tmp_path):
    d = _run_dir(vq_dir, tmp_path, "novit")
    os.remove(os.path.join(d, "vit.pt"))
    with pytest.raises(SystemExit, match="vit.pt not found"):
        sft.main(BASE + ["--steps", "1", "--out", d])


def test_a_base_of_another_model_is_refused(vq_dir, tmp_path, monkeypatch):
    # a base trained before the preset had the image position table: its resumable state, then its
    # base.pt, are refused in one line naming what differs
    d = _run_dir(vq_dir, tmp_path, "old")
    monkeypatch.setitem(sft.PRESETS, "tiny", {**sft.PRESETS["tiny"], "image_pos": False})
    sft.main(BASE + ["--steps", "2", "--ckpt-every", "1", "--out", d])
    shutil.copy(os.path.join(d, "base_state.pt"), os.path.join(d, "kept_state.pt"))
    monkeypatch.undo()
    os.replace(os.path.join(d, "base.pt"), os.path.join(d, "old_base.pt"))
    os.replace(os.path.join(d, "kept_state.pt"), os.path.join(d, "base_state.pt"))
    with pytest.raises(SystemExit, match="image_pos=False"):
        sft.main(BASE + ["--steps", "2", "--out", d])
    os.replace(os.path.join(d, "old_base.pt"), os.path.join(d, "base.pt"))
    with pytest.raises(SystemExit, match="differs in image_pos"):
        sft.main(["--stage", "sft", "--config", "tiny", "--dtype", "fp32", "--steps", "1", "--out", d])


def torchrun(script, argv, port):
    """2 gloo processes of one thread each, started (not waited for): communicate() collects them."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                             str(port), os.path.join(ROOT, script)] + argv, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(proc):
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]


def test_two_processes_equal_one(vq_dir, tmp_path):
    """torchrun with 2 gloo processes, DDP and FSDP2 (launched side by side): the loss at every step
    and the trained weights are the one-process run's (each process builds its half of the same
    global batch); an FSDP state resumes sharded, and one process refuses it."""
    runs = {name: _run_dir(vq_dir, tmp_path, name) for name in ("one", "ddp", "fsdp")}
    args = BASE + ["--steps", "3"]
    procs = [torchrun("sft.py", args + ["--out", runs[p], "--parallel", p], port) for p, port in (("ddp", 29517), ("fsdp", 29527))]
    sft.main(args + ["--out", runs["one"]])
    for proc in procs:
        finished(proc)
    states = {n: load_checkpoint(os.path.join(d, "base_state.pt")) for n, d in runs.items()}
    params = {n: _params(os.path.join(d, "base.pt")) for n, d in runs.items()}
    for p in ("ddp", "fsdp"):
        assert states[p]["sharded"] == (p == "fsdp") and not states["one"]["sharded"]  # FSDP did shard the model
        logs = [states["one"]["log"], states[p]["log"]]
        assert [(s, t) for s, t, _ in logs[0]] == [(s, t) for s, t, _ in logs[1]] and len(logs[0]) == 3
        assert [l for _, _, l in logs[0]] == pytest.approx([l for _, _, l in logs[1]], abs=1e-4)
        assert params[p].keys() == params["one"].keys() and _same(params["one"], params[p], atol=1e-5)
    # and the runs did train: the parameters moved away from the initialisation
    assert not _same(params["one"], Janus_init(), atol=1e-4)
    # a sharded state resumes sharded (one more step, from the whole state saved at step 3), and
    # one process refuses it with one line
    more = args[:-1] + ["4"]
    with pytest.raises(SystemExit, match="saved by a sharded"):
        sft.main(more + ["--out", runs["fsdp"]])
    proc = torchrun("sft.py", more + ["--out", runs["fsdp"], "--parallel", "fsdp"], 29527)
    sft.main(more + ["--out", runs["one"]])
    finished(proc)
    assert _same(_params(os.path.join(runs["one"], "base.pt")), _params(os.path.join(runs["fsdp"], "base.pt")), atol=1e-5)


def Janus_init():
    from model import PRESETS, Janus, JanusConfig
    torch.manual_seed(0)
    return Janus(JanusConfig(**PRESETS["tiny"])).state_dict()


def test_tiny_pipeline_end_to_end_and_loss_drops(vq_dir, tmp_path):
    d = _run_dir(vq_dir, tmp_path, "e2e")
    sft.main(["--stage", "base", "--config", "tiny", "--out", d, "--eval-prompts", "2"])
    log = load_checkpoint(os.path.join(d, "base_state.pt"))["log"]
    t2i = [l for _, task, l in log if task == "t2i"]
    assert sum(t2i[-5:]) / 5 < 0.9 * sum(t2i[:5]) / 5
    sft.main(["--stage", "sft", "--config", "tiny", "--out", d, "--eval-prompts", "2", "--no-final-eval"])
    st = load_checkpoint(os.path.join(d, "sft_state.pt"))
    assert {task for _, task, _ in st["log"]} == {"task1", "task2", "task3", "edit"}  # tiny: --edit-share 0.1
    assert os.path.isfile(os.path.join(d, "sft.pt")) and os.path.isfile(os.path.join(d, "sft_pool.pt"))
    import json
    ev = json.load(open(os.path.join(d, "base_eval.json")))
    assert set(ev["first"]) == set(shapes.CATEGORIES) | {"overall"} and 0 <= ev["understanding"]["agreement"] <= 1


def test_model_and_tokenizer_presets_fit():
    from model import PRESETS, JanusConfig
    for name, vq_name in (("tiny", "tiny"), ("toy", "toy"), ("small", "small"), ("janus-pro-1b", "vq16"), ("janus-pro-7b", "vq16")):
        cfg, vq = JanusConfig(**PRESETS[name]), tokenizer.VQ_PRESETS[vq_name]
        assert (cfg.image_vocab_size, cfg.image_tokens, cfg.image_size, cfg.image_code_dim) == \
            (vq.codebook_size, vq.num_tokens, vq.image_size, vq.code_dim), name
        assert cfg.scene_grid == vq.scene_grid, name
        assert len(TOK) <= cfg.vocab_size or name.startswith("janus")


def test_task3_repair_targets_keep_the_negatives_objects():
    """With repair share 1 in the grid world, Task III's target is its negative repaired: the own
    wrong image read back and mended in place (a blue circle made red, the triangle kept), a rendered
    near-miss likewise; with share 0, or in free placement, a new scene for the prompt, the data
    stream otherwise as before."""
    p = shapes.parse_prompt("a red circle")
    c, s = 16, 12
    obj = lambda sh, col, i, j: shapes.Obj(sh, col, i * c + 2, j * c + 2, s)
    own = shapes.render(shapes.Scene(64, [obj("circle", "blue", 1, 1), obj("triangle", "green", 3, 3)], 4))
    want = shapes.render(shapes.Scene(64, [obj("circle", "red", 1, 1), obj("triangle", "green", 3, 3)], 4))
    pool = {p.text: [(_codes(), own, False, "No, the circle is blue, not red.")]}
    cells = lambda im: {(o.shape, o.colour, o.x // c, o.y // c) for o in shapes.scene_from_image(im, 4).objects}
    rng = random.Random(0)
    exs = [sft.sft_example("task3", rng, sft.group([p]), pool, 64, grid=4, repair=1.0) for _ in range(60)]
    kinds = set()
    for ex in exs:
        (codes, reason, im), = ex["history"]
        kinds.add(codes is None)
        assert shapes.check(ex["image"], p).verdict
        if codes is not None:  # the own negative
            assert np.array_equal(ex["image"], want)
        else:  # a rendered near-miss, mended in one object
            assert len(cells(im) ^ cells(ex["image"])) <= 2, (cells(im), cells(ex["image"]))
    assert kinds == {True, False}
    for grid, share in ((4, 0.0), (0, 1.0)):
        exs = [sft.sft_example("task3", rng, sft.group([p]), pool, 64, grid=grid, repair=share) for _ in range(40)]
        assert not any(np.array_equal(ex["image"], want) for ex in exs if ex["history"][0][0] is not None)
    # the repair's draw comes last: at any share the prompt, history and prompt dropout are the same,
    # and off the grid (no draw) so is the target
    for seed in range(20):
        one = lambda grid, share: sft.sft_example("task3", random.Random(seed), sft.group([p]), pool, 64, grid=grid, repair=share)
        a, b = one(4, 1.0), one(4, 0.0)
        assert a["drop"] == b["drop"] and [h[1] for h in a["history"]] == [h[1] for h in b["history"]]
        assert all(np.array_equal(g[2], h[2]) for g, h in zip(a["history"], b["history"]))
        assert np.array_equal(one(0, 1.0)["image"], one(0, 0.0)["image"])
