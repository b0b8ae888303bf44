"""
The evaluation suite: every number the stages and run.py report about a Janus model, measured here
against the ShapeWorld checker (the toy's GenEval and its judge, SPEC.md section 5).

- geneval: the introspective loop on a prompt list, accuracy of the first and of the final image per
  category (GenEval-style), and the model-as-judge's answers on every image it judged;
- judge metrics: agreement, balanced accuracy, AUC of P(yes) overall and within category, answers
  per ink quartile (by_ink) and per group (group_stats);
- understanding (the base model): VQA on rendered scenes (evaluate_understanding) and describing
  them (evaluate_describing, greedy_captions);
- editing: follow / preserve of seeded edits (evaluate_editing);
- the per-stage bundles sft.py prints and saves (quick_eval, final_eval).

It imports no trainer: sft.py, run.py (and rl.py, judge.py) import it.
"""

import random

import numpy as np
import torch
from tqdm import tqdm

import shapes
from sample import (DESCRIBE, Options, collate, decode_text, describe_seq, edit, embed_batch, forward_cached, introspect,
                    new_cache, question, selfcheck_seq, vqa_seq)

# -----------------------------------------------------------------------------
# The judge against the checker: agreement is not enough (a judge that always says No agrees at the
# checker's No rate), so balanced accuracy, AUC of P(yes), and AUC inside each prompt category


def auc(scores, labels):
    """Area under the ROC curve: P(score of a random positive > score of a random negative)."""
    pos = [s for s, l in zip(scores, labels) if l]
    neg = [s for s, l in zip(scores, labels) if not l]
    if not pos or not neg:
        return None  # undefined with one class only (JSON has no NaN)
    s = np.array(scores)
    ranks = s.argsort().argsort() + 1.0
    for v in np.unique(s):  # ties share their mean rank
        ranks[s == v] = ranks[s == v].mean()
    r_pos = ranks[np.array(labels, bool)].sum()
    return float((r_pos - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def balanced_accuracy(said, labels):
    """The mean of the true-positive and true-negative rates of Yes/No answers against the checker:
    a judge that always says No scores 0.5 however rare matches are (its agreement is the No rate).
    None with one class only."""
    said, labels = np.asarray(said, bool), np.asarray(labels, bool)
    if labels.all() or not labels.any():
        return None
    return float((said[labels].mean() + (~said[~labels]).mean()) / 2)


def auc_within_category(scores, labels, cats):
    """AUC of P(yes) inside each prompt category, averaged over the categories where both classes
    occur (None if none): across categories the prompt alone ranks images (hard ones fail more
    often), inside one only what the judge reads from the image does."""
    scores, labels, cats = np.asarray(scores), np.asarray(labels, bool), np.asarray(cats)
    per = [auc(scores[cats == c], labels[cats == c]) for c in dict.fromkeys(cats.tolist())]
    per = [a for a in per if a is not None]
    return float(np.mean(per)) if per else None


def by_ink(images, said, labels, bins=4):
    """The judge's answers binned by the amount of ink (the fraction of non-white pixels) into
    quantile bins: per bin, its yes-rate, the true match rate and its agreement. A judge that reads
    the prompt's facts agrees well within every bin; one that learned "more colour -> Yes" (what
    negatives made by removing objects allow) tracks the match rate and sits near chance inside them."""
    ink = np.array([(np.asarray(im) != 255).any(-1).mean() for im in images])
    edges = np.quantile(ink, np.linspace(0, 1, bins + 1)[1:-1])
    k = np.digitize(ink, edges)
    return [group_stats(said, labels, k == b) for b in range(bins) if (k == b).any()]


def group_stats(said, labels, sel):
    """The judge's yes-rate, the true match rate and their agreement over the answers where sel."""
    said, labels = np.asarray(said, bool)[sel], np.asarray(labels, bool)[sel]
    return {"yes_rate": float(said.mean()), "match_rate": float(labels.mean()),
            "agreement": float((said == labels).mean()), "n": int(sel.sum())}


# -----------------------------------------------------------------------------
# GenEval-style: prompts -> the introspective loop -> the checker on every image


@torch.no_grad()
def geneval(model, vq, tok, prompts, rounds=3, batch=64, seed=0, progress=False):
    """Sample every prompt once (seed + index) with the introspective loop and score with the
    checker. Returns per-category accuracy of the first and of the final image, and the judge's
    agreement with the checker, balanced accuracy, AUC of its P(yes) and AUC within category over
    every image it judged."""
    opt = Options(rounds=rounds)
    first, final = {}, {}
    said, truth, p_yes, cats = [], [], [], []
    it = range(0, len(prompts), batch)
    for i in tqdm(it, desc=f"evaluating {len(prompts)} prompts", disable=not progress, dynamic_ncols=True):
        chunk = prompts[i:i + batch]
        chains = introspect(model, vq, tok, [p.text for p in chunk], [seed + i + j for j in range(len(chunk))], opt)
        for p, c in zip(chunk, chains):
            checks = [shapes.check(im, p).verdict for im in c.images]
            first.setdefault(p.category, []).append(checks[0])
            final.setdefault(p.category, []).append(checks[-1])
            said += [v == "yes" for v in c.verdicts]
            truth += checks
            p_yes += c.p_yes
            cats += [p.category] * len(checks)
    out = {}
    for name, d in (("first", first), ("final", final)):
        out[name] = {cat: float(np.mean(v)) for cat, v in d.items()}
        out[name]["overall"] = float(np.mean([np.mean(v) for v in d.values()]))  # mean over categories
    out["judge"] = {"agreement": float(np.mean(np.array(said) == np.array(truth))),
                    "balanced_accuracy": balanced_accuracy(said, truth), "auc": auc(p_yes, truth),
                    "auc_within_category": auc_within_category(p_yes, truth, cats),
                    "n": len(truth), "checker_yes_rate": float(np.mean(truth))}
    # per category: a judge can beat chance overall from the prompt alone (hard categories fail
    # more often); inside one category only what it reads from the image helps
    cats, p_yes = np.array(cats), np.array(p_yes)
    out["judge"]["by_category"] = {c: dict(group_stats(said, truth, cats == c), auc=auc(p_yes[cats == c], np.array(truth)[cats == c]))
                                   for c in dict.fromkeys(cats.tolist())}
    out["mean_images"] = len(truth) / len(prompts)
    return out


@torch.no_grad()
def loop_split(model, vq, tok, prompts, batch=64, seed=0):
    """Where the loop's gain is lost: every image 1 is judged No (Options(force_no=True)), so every
    chain draws image 2 after the model's own reason. Per category (and overall, their mean): image 1
    (geneval's first image: the same seeds), image 2, and the ceiling, the final image of a judge
    that agreed with the checker (image 2 where image 1 is wrong, else image 1). The ceiling minus
    the first image is what a perfect judge would add with this redraw."""
    ok = {}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        chains = introspect(model, vq, tok, [p.text for p in chunk], [seed + i + j for j in range(len(chunk))],
                            Options(rounds=2, force_no=True))
        for p, c in zip(chunk, chains):
            ok.setdefault(p.category, []).append([shapes.check(im, p).verdict for im in c.images])
    out = {}
    for name, f in (("first", lambda a, b: a), ("second", lambda a, b: b), ("ceiling", lambda a, b: a or b)):
        acc = {cat: float(np.mean([f(*v) for v in vs])) for cat, vs in ok.items()}
        out[name] = dict(acc, overall=float(np.mean(list(acc.values()))))
    return out


@torch.no_grad()
def evaluate_editing(model, vq, tok, n):
    """n seeded ShapeWorld edits (source scene, instruction): the model's edit of each rendered
    source, scored by the checker's follow (the change happened) and preserve (nothing else changed)."""
    rng = random.Random("edit-eval")
    edits = [shapes.sample_edit(rng, model.cfg.image_size, grid=model.cfg.scene_grid) for _ in range(n)]
    outs = edit(model, vq, tok, [shapes.render(s) for s, _, _ in edits], [e.text for _, e, _ in edits],
                list(range(len(edits))))[0]
    scores = [shapes.score_edit(shapes.render(s), o, e) for (s, e, _), o in zip(edits, outs)]
    return {"follow": float(np.mean([f for f, _ in scores])), "preserve": float(np.mean([p for _, p in scores])),
            "n": len(scores)}


# -----------------------------------------------------------------------------
# Understanding: the base model's VQA and describing on rendered held-out scenes


@torch.no_grad()
def evaluate_understanding(model, tok, prompts, size, seed=0, batch=64, layout="after"):
    """The base model's VQA skill: rendered held-out scenes, half matching and half broken, asked
    "Does this image match the prompt {prompt}" after the image (layout "after"), before it in the
    user's turn ("before"), or as the self-check does ("selfcheck": prompt, image, cue) -> the
    forced Yes/No at the first answer position. Returns the agreement of its Yes/No with the
    checker, its balanced accuracy, the AUC of its P(yes) (overall and within category), and the
    answers per ink quartile (by_ink)."""
    rng = random.Random(f"und-eval-{seed}")
    N = model.cfg.image_tokens
    said, labels, p_yes, images, cats = [], [], [], [], []
    for i in range(0, len(prompts), batch):
        seqs = []
        for p in prompts[i:i + batch]:
            match = rng.random() < 0.5
            im = shapes.render(shapes.sample_scene(rng, size, p, match=match, grid=model.cfg.scene_grid))
            seqs.append(selfcheck_seq(tok, p.text, im, N) if layout == "selfcheck"
                        else vqa_seq(tok, im, question(p.text), N, layout == "before"))
            labels.append(match)
            images.append(im)
            cats.append(p.category)
        b = collate(seqs, tok, next(model.parameters()).device, left=True)
        h = model(embed_batch(model, b), key_mask=b.key_mask)[:, -1]
        two = model.text_logits(h)[:, [tok.yes, tok.no]].softmax(-1)
        said += (two[:, 0] > two[:, 1]).tolist()
        p_yes += two[:, 0].tolist()
    return {"agreement": float(np.mean(np.array(said) == np.array(labels))), "balanced_accuracy": balanced_accuracy(said, labels),
            "auc": auc(p_yes, labels), "auc_within_category": auc_within_category(p_yes, labels, cats), "n": len(labels),
            "by_ink": by_ink(images, said, labels)}


@torch.no_grad()
def greedy_captions(model, tok, images, max_len=24):
    """The base model's descriptions of uint8 images: greedy text after the describe question,
    until EOS or max_len tokens (KV-cached, one batch)."""
    dev = next(model.parameters()).device
    b = collate([vqa_seq(tok, im, DESCRIBE, model.cfg.image_tokens) for im in images], tok, dev, left=True)
    P = b.idx.size(1)
    cache = new_cache(model, len(images), P + max_len)
    km = torch.ones(len(images), P + max_len, dtype=torch.bool, device=dev)
    km[:, :P] = b.key_mask
    h = forward_cached(model, embed_batch(model, b), cache, 0, km)[:, -1]
    u = torch.zeros(len(images), max_len, device=dev)  # unused by greedy decoding
    return [tok.decode(ids) for ids in decode_text(model, tok, cache, km, h, P, u, temperature=0)]


@torch.no_grad()
def evaluate_describing(model, tok, prompts, size, seed=0, batch=64):
    """The base model's describing skill on one rendered held-out scene per prompt:
    - nats: teacher-forced loss per token of the canonical caption (+ EOS); it falls long before
      VQA leaves chance;
    - exact: per prompt category (and overall, the mean over categories) the share of scenes whose
      greedy description is exactly the canonical caption, i.e. names every object with its
      colour and count and nothing else: understanding scored by the same world as generation."""
    rng = random.Random(f"describe-eval-{seed}")
    dev = next(model.parameters()).device
    total, count, exact = 0.0, 0, {}
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        scenes = [shapes.sample_scene(rng, size, p, grid=model.cfg.scene_grid) for p in chunk]
        exs = [dict(task="describe", image=shapes.render(sc), answer=shapes.describe(sc)) for sc in scenes]
        b = collate([describe_seq(tok, ex["image"], ex["answer"], model.cfg.image_tokens) for ex in exs], tok, dev)
        losses = model.token_losses(model(embed_batch(model, b)), b.text_targets)  # (B, T)
        total += (losses * b.weights).sum().item()  # every answer token weighs 1, the rest 0
        count += int((b.weights > 0).sum())
        said = greedy_captions(model, tok, [ex["image"] for ex in exs])
        for p, ex, s in zip(chunk, exs, said):
            exact.setdefault(p.category, []).append(s == ex["answer"])
    exact = {c: float(np.mean(v)) for c, v in exact.items()}
    exact["overall"] = float(np.mean(list(exact.values())))
    return {"nats": total / count, "exact": exact}


# -----------------------------------------------------------------------------
# What sft.py prints during training (quick_eval, on val) and saves at the end (final_eval, on test)


def r3(v):  # a rounded figure, or None where it is undefined (an AUC over one class)
    return None if v is None else round(v, 3)


def quick_eval(model, vq, tok, prompts, stage, size):
    if stage == "base":
        r = geneval(model, vq, tok, prompts, rounds=1)
        u = evaluate_understanding(model, tok, prompts, size)
        sc = evaluate_understanding(model, tok, prompts, size, layout="selfcheck")
        d = evaluate_describing(model, tok, prompts, size)
        # judge_auc_wc: the self-check answer's AUC within category, the base model's judge
        return {"first": round(r["first"]["overall"], 3), "judge_auc_wc": r3(sc["auc_within_category"]),
                "describe_nats": round(d["nats"], 3),
                "describe_exact": round(d["exact"]["overall"], 3),
                "vqa": round(u["agreement"], 3), "vqa_auc": u["auc"] and round(u["auc"], 3),
                "selfcheck": round(sc["agreement"], 3), "selfcheck_auc": sc["auc"] and round(sc["auc"], 3)}
    r = geneval(model, vq, tok, prompts, rounds=3)
    return {"first": round(r["first"]["overall"], 3), "final": round(r["final"]["overall"], 3),
            "judge": round(r["judge"]["agreement"], 3), "judge_auc_wc": r3(r["judge"]["auc_within_category"])}


def final_eval(model, vq, tok, prompts, stage, size):
    """On the test split: the base model's first images, its VQA and its describing; the SFT model's
    introspective loop (first and final images) and its judging."""
    if stage == "base":
        r = geneval(model, vq, tok, prompts, rounds=1, progress=True)
        d = evaluate_describing(model, tok, prompts, size)
        return {"first": r["first"], "understanding": evaluate_understanding(model, tok, prompts, size),
                "selfcheck": evaluate_understanding(model, tok, prompts, size, layout="selfcheck"),
                "describe_nats": d["nats"], "describe_exact": d["exact"]}
    r = geneval(model, vq, tok, prompts, rounds=3, progress=True)
    return r
