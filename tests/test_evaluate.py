"""The evaluation suite (evaluate.py): metrics on hand-computed values, the describing measures
against recomputation by hand. Run: OMP_NUM_THREADS=1 python -m pytest tests/test_evaluate.py"""
import random

import numpy as np
import torch

import evaluate as E
import model as M
import sample as S
import shapes
import tokenizer

TOK = tokenizer.TextTokenizer(shapes.WORDS)
N = 16  # tiny: image tokens per image


def test_describing_nats_are_the_mean_over_the_caption_tokens():
    # recomputed by hand: the caption (+ EOS) follows the question, position t predicts token t+1
    torch.manual_seed(0)
    model = M.Janus(M.JanusConfig(**M.PRESETS["tiny"])).eval()
    p = shapes.make_splits(seed=0)["test"][0]
    scene = shapes.sample_scene(random.Random("describe-eval-0"), 32, p)  # the evaluation's first scene
    image, caption = shapes.render(scene), TOK.encode(shapes.describe(scene)) + [TOK.eos]
    q = S.vqa_seq(TOK, image, S.DESCRIBE, N)
    b = S.collate([q.add(caption)], TOK)
    with torch.no_grad():
        logp = model.text_logits(model(S.embed_batch(model, b)))[0].log_softmax(-1)  # (T, V)
    start = len(q) - len(caption) - 1  # the position that predicts the caption's first token
    want = -np.mean([logp[start + k, t].item() for k, t in enumerate(caption)])
    assert abs(E.evaluate_describing(model, TOK, [p], 32)["nats"] - want) < 1e-5


def test_greedy_captions_equal_full_recomputation():
    import copy

    # KV-cached greedy decoding of a batch against argmax over full forwards of each growing
    # sequence alone (an untrained model: six arbitrary tokens each)
    torch.manual_seed(0)
    model = M.Janus(M.JanusConfig(**M.PRESETS["tiny"]))
    rng = random.Random(0)
    images = [shapes.render(shapes.random_scene(rng, 32)) for _ in range(3)]
    model.eval()
    got = E.greedy_captions(model, TOK, images, max_len=6)
    for im, text in zip(images, got):
        q = S.vqa_seq(TOK, im, S.DESCRIBE, N)
        ids = []
        with torch.no_grad():
            for _ in range(6):
                b = S.collate([copy.deepcopy(q).add(ids)], TOK)
                nxt = model.text_logits(model(S.embed_batch(model, b))[:, -1])[0, :len(TOK)].argmax().item()
                if nxt == TOK.eos:
                    break
                ids.append(nxt)
        assert text == TOK.decode(ids)
    assert all(len(TOK.encode(t)) == 6 for t in got)  # no early EOS: every step was compared


def test_describing_exact_is_per_category_then_mean(monkeypatch):
    # exact match with the canonical caption, per category, overall = mean over categories: a
    # describer that gets only the `single` scenes right scores 1 there, 0 elsewhere, 1/2 overall
    torch.manual_seed(0)
    model = M.Janus(M.JanusConfig(**M.PRESETS["tiny"])).eval()
    test = shapes.make_splits(seed=0)["test"]
    prompts = [p for p in test if p.category == "single"][:2] + [p for p in test if p.category == "colour"][:3]
    rng = random.Random("describe-eval-0")  # the evaluation's scenes, replayed
    right = [shapes.describe(shapes.sample_scene(rng, 32, p)) for p in prompts]
    # canonical captions always name a colour, so "a circle" is never exact
    monkeypatch.setattr(E, "greedy_captions", lambda m, tok, images: right[:2] + ["a circle"] * 3)
    d = E.evaluate_describing(model, TOK, prompts, 32)["exact"]
    assert d == {"single": 1.0, "colour": 0.0, "overall": 0.5}


def test_auc_hand_computed():
    assert E.auc([0.9, 0.8, 0.3, 0.1], [1, 1, 0, 0]) == 1.0
    assert E.auc([0.1, 0.8, 0.3, 0.9], [1, 1, 0, 0]) == 0.25  # of 4 pos-neg pairs only 0.8 > 0.3 wins
    assert E.auc([0.5, 0.5], [1, 0]) == 0.5


def test_balanced_accuracy_hand_computed():
    # matches at 0 and 5: one said Yes (TPR 1/2); the rest: three of four said No (TNR 3/4)
    said, labels = [1, 1, 0, 0, 0, 0], [1, 0, 0, 0, 0, 1]
    assert E.balanced_accuracy(said, labels) == (0.5 + 0.75) / 2
    # always No: agreement 4/6, the No rate, but balanced accuracy 0.5 (chance)
    assert E.balanced_accuracy([0] * 6, labels) == 0.5 and np.mean(np.array(labels) == 0) == 4 / 6
    assert E.balanced_accuracy([1, 0], [1, 1]) is None  # one class only


def test_auc_within_category_hand_computed():
    # A: the match ranks first, AUC 1; B: of 4 pos-neg pairs 0.3 > 0.1 and 0.5 > 0.1 win, AUC 0.5;
    # C: matches only, skipped. Mean (1 + 0.5) / 2, while all the images pooled give another AUC
    scores = [0.9, 0.2, 0.4, 0.3, 0.6, 0.5, 0.1, 0.99, 0.01]
    labels = [1, 0, 0, 1, 0, 1, 0, 1, 1]
    cats = ["A", "A", "A", "B", "B", "B", "B", "C", "C"]
    assert E.auc_within_category(scores, labels, cats) == 0.75
    assert E.auc(scores, labels) != 0.75
    assert E.auc_within_category([0.1, 0.9], [1, 0], ["A", "B"]) is None  # no category has both


def test_by_ink_hand_computed():
    """Eight images with 1..8 coloured pixels of 64; a judge that says Yes exactly when the ink is
    high: per quartile bin its yes-rate, the match rate and the agreement, counted by hand."""
    images = []
    for n in range(1, 9):
        im = np.full((8, 8, 3), 255, np.uint8)
        im.reshape(-1, 3)[:n] = (255, 0, 0)
        images.append(im)
    said = [False, False, False, False, True, True, True, True]
    labels = [False, True, False, False, True, True, False, True]
    bins = E.by_ink(images, said, labels, bins=4)  # two images per bin
    assert [b["n"] for b in bins] == [2, 2, 2, 2]
    assert [b["yes_rate"] for b in bins] == [0.0, 0.0, 1.0, 1.0]
    assert [b["match_rate"] for b in bins] == [0.5, 0.0, 1.0, 0.5]
    assert [b["agreement"] for b in bins] == [0.5, 1.0, 1.0, 0.5]
