"""
The model as an image-text judge (SPEC.md section 6): prompt + image (understanding path) + the
self-check cue -> P(yes) = P(Yes) / (P(Yes) + P(No)) at the first answer position, the verdict
(the larger of the two) and the reason (the greedy answer after it, until EOS).

- judge_images / p_yes: batched, the layout of sample.selfcheck_seq (what SFT trains and the
  introspective loop asks), so the judge here reads exactly what the loop's judge reads;
  rl.py --reward judge uses p_yes as its reward model (the paper's use for OTHER generators);
- judge_eval: agreement with the ShapeWorld checker on a balanced held-out set (the paper's Table 3
  at toy scale): rendered scenes, and the model's own first images, labelled by the checker.

    python judge.py --ckpt out/toy/sft.pt --image scene.png --prompt "a red circle above a square"
    python judge.py --ckpt out/toy/sft.pt --eval --n 10 --out out/toy/judge.json
"""

import json
import os
import random
import re

import numpy as np
import torch
from PIL import Image

import shapes
from common import Parser, nonneg_int, pick_device, pos_int, run_cli, write_json
from evaluate import auc, auc_within_category, balanced_accuracy
from sample import collate, decode_text, embed_batch, forward_cached, generate, load_janus, new_cache, selfcheck_seq

BATCH = 64  # images judged in one forward

# -----------------------------------------------------------------------------
# The judge: one forward over prompt + image + cue, then (optionally) the greedy reason


def _first_answer(model, tok, images, prompts, reason_room=0):
    """Forward the self-check layouts (left-padded) and read the first answer position.
    Returns the two logits (B, 2) of Yes, No and, with reason_room > 0, the cache state to decode
    the reason from: (cache, key_mask, last hidden (B, D), next position)."""
    dev = next(model.parameters()).device
    seqs = [selfcheck_seq(tok, p, im, model.cfg.image_tokens) for im, p in zip(images, prompts)]
    b = collate(seqs, tok, dev, left=True)
    B, T = b.idx.shape
    if not reason_room:  # P(yes) only: no cache
        h = model(embed_batch(model, b), key_mask=b.key_mask)[:, -1]
        return model.text_logits(h)[:, [tok.yes, tok.no]].float(), None
    cache = new_cache(model, B, T + reason_room)
    km = torch.ones(B, T + reason_room, dtype=torch.bool, device=dev)
    km[:, :T] = b.key_mask
    h = forward_cached(model, embed_batch(model, b), cache, 0, km)[:, -1]
    return model.text_logits(h)[:, [tok.yes, tok.no]].float(), (cache, km, T)


@torch.no_grad()
def p_yes(model, tok, images, prompts):
    """P(Yes) / (P(Yes) + P(No)) for each (uint8 image at the model's size, prompt text): (B,) on
    the CPU. rl.py's judge reward."""
    out = [_first_answer(model, tok, images[i:i + BATCH], prompts[i:i + BATCH])[0].softmax(-1)[:, 0].cpu()
           for i in range(0, len(images), BATCH)]
    return torch.cat(out) if out else torch.zeros(0)


@torch.no_grad()
def judge_images(model, tok, images, prompts, max_reason=24):
    """(verdicts "yes"/"no", P(yes) floats, answers) for each (uint8 image, prompt text). The verdict
    is the larger of P(Yes), P(No) (a tie says Yes); the answer is the verdict word and the greedy
    reason after it, until EOS or max_reason tokens, e.g. "No, the circle is green, not red." (the
    checker's reason format and what sample.introspect records)."""
    verdicts, probs, answers = [], [], []
    for i in range(0, len(images), BATCH):
        two, (cache, km, pos) = _first_answer(model, tok, images[i:i + BATCH], prompts[i:i + BATCH], 1 + max_reason)
        first = two.argmax(-1)  # 0 = Yes, 1 = No: greedy, as sample.judge at text temperature 0
        ids = torch.where(first == 0, tok.yes, tok.no)
        h = forward_cached(model, model.embed(ids[:, None]), cache, pos, km)[:, -1]
        u = torch.zeros(len(ids), max_reason, device=h.device)  # greedy: the uniforms only set the length
        reasons = decode_text(model, tok, cache, km, h, pos + 1, u, 0.0)
        verdicts += ["yes" if f == 0 else "no" for f in first.tolist()]
        probs += two.softmax(-1)[:, 0].tolist()
        answers += [tok.decode([a] + r) for a, r in zip(ids.tolist(), reasons)]
    return verdicts, probs, answers


# -----------------------------------------------------------------------------
# Against the checker: a balanced held-out set from the test prompts


def _mentions(text, colour, shape):
    # the text names this (colour, shape): its shape word (singular or plural) and its colour, if any
    words = set(re.findall(r"[a-z]+", text.lower()))
    return (shape in words or shapes.plural(shape, 2) in words) and (colour is None or colour in words)


def failed_pairs(prompt, check):
    """The (colour, shape) descriptors of the checker's first failed fact that its reason names
    (a relation's reason may name one object or both); [] when no fact failed (too many shapes)."""
    failed = [f for f, ok in zip(prompt.facts, check.holds) if not ok]
    if not failed:
        return []
    f = failed[0]
    pairs = [(f.colour, f.shape)] + ([(f.colour2, f.shape2)] if f.kind == "rel" else [])
    return [p for p in pairs if _mentions(check.reason, *p)]


def judge_metrics(said, probs, labels, cats, answers, checks, prompts):
    """said/labels: bools (the model's Yes, the checker's); probs: P(yes). The reason scores count
    the images the checker says No to: `reason_exact` the model's answer equals the checker's
    reason, `reason_loose` the model says No and its reason names a (colour, shape) of the checker's
    first failed fact (the exact rule when no fact failed)."""
    no = [i for i, l in enumerate(labels) if not l]
    exact = [answers[i] == checks[i].reason for i in no]
    pairs = [failed_pairs(prompts[i], checks[i]) for i in no]
    loose = [e or (not said[i] and any(_mentions(answers[i], *p) for p in ps)) for i, e, ps in zip(no, exact, pairs)]
    mean = lambda v: float(np.mean(v)) if len(v) else None
    return {"agreement": mean(np.array(said) == np.array(labels)), "balanced_accuracy": balanced_accuracy(said, labels),
            "auc": auc(probs, labels), "auc_within_category": auc_within_category(probs, labels, cats) if cats else None,
            "reason_exact": mean(exact), "reason_loose": mean(loose), "n": len(labels), "n_checker_no": len(no),
            "yes_rate": mean(said), "checker_yes_rate": mean(labels)}


def _by_category(prompts):
    out = {}
    for p in prompts:
        out.setdefault(p.category, []).append(p)
    return out


def rendered_set(prompts, n, size, seed, grid=0):
    """n matching scenes and n near misses (shapes.sample_scene with match=False: one fact broken in
    one way) per category, on the category's prompts in turn."""
    rng = random.Random(seed)
    out = []
    for cat, ps in _by_category(prompts).items():
        for k in range(2 * n):
            p = ps[k // 2 % len(ps)]
            out.append((shapes.render(shapes.sample_scene(rng, size, p, match=k % 2 == 0, grid=grid)), p))
    return out


@torch.no_grad()
def drawn_set(model, vq, tok, prompts, n, seed, draws=4):
    """The model's own first images (sample.generate, the preset's CFG) of each category's prompts, up to
    draws x 2n per category, labelled by the checker; kept balanced: the first k checker-Yes and the
    first k checker-No of each category, k = min(n, either class's count). Drawing stops once both
    classes have n (the batches after that could not change what is kept). Returns the kept
    (image, prompt) pairs and how many were drawn."""
    out, drawn = [], 0
    for c, (cat, ps) in enumerate(_by_category(prompts).items()):
        chosen = [ps[k % len(ps)] for k in range(draws * 2 * n)]
        seeds = [seed + 1000 * c + k for k in range(len(chosen))]
        images, ok = [], []
        for i in range(0, len(chosen), BATCH):
            if min(sum(ok), len(ok) - sum(ok)) >= n:
                break
            images += list(generate(model, vq, tok, [p.text for p in chosen[i:i + BATCH]], seeds[i:i + BATCH])[0])
            ok += [shapes.check(im, p).verdict for im, p in zip(images[i:], chosen[i:])]
        drawn += len(images)
        k = min(n, sum(ok), len(ok) - sum(ok))
        yes = [j for j, v in enumerate(ok) if v][:k]
        no = [j for j, v in enumerate(ok) if not v][:k]
        out += [(images[j], chosen[j]) for j in sorted(yes + no)]
    return out, drawn


@torch.no_grad()
def judge_eval(model, vq, tok, n=10, seed=0, prompts=None, draws=4, max_reason=24):
    """The judge against the checker on the test split (default): `rendered` (n matching and n
    mismatching scenes per category), `drawn` (the model's own first images, balanced per category,
    up to n of each class; `pool` counts the images drawn) and both
    together at the top level (agreement, balanced_accuracy, auc, auc_within_category, reasons)."""
    prompts = prompts or shapes.make_splits(seed=0)["test"]
    sets = {"rendered": rendered_set(prompts, n, model.cfg.image_size, seed, model.cfg.scene_grid)}
    sets["drawn"], pool = drawn_set(model, vq, tok, prompts, n, seed, draws)
    out, every = {}, []
    for name, pairs in sets.items():
        images, ps = [im for im, _ in pairs], [p for _, p in pairs]
        verdicts, probs, answers = judge_images(model, tok, images, [p.text for p in ps], max_reason)
        checks = [shapes.check(im, p) for im, p in pairs]
        rows = ([v == "yes" for v in verdicts], probs, [c.verdict for c in checks], [p.category for p in ps],
                answers, checks, ps)
        out[name] = judge_metrics(*rows)
        every.append(rows)
    out.update(judge_metrics(*[sum((list(r[i]) for r in every), []) for i in range(7)]))
    out["drawn"]["pool"] = pool
    return out


# -----------------------------------------------------------------------------
# Judges compared on the same images: a judge's own images are a moving yardstick (RL's are right
# more often, and where they fail is harder to read), so "did RL teach the judge?" is asked here


@torch.no_grad()
def first_images(model, vq, tok, prompts, draws=2, seed=0):
    """The loop's image 1 (sample.generate: the same draw as introspect's first round, the preset's
    CFG) of every prompt, `draws` times: seeds seed + i (geneval's first images), then
    seed + 100000 k + i. -> (images, prompts), draw after draw."""
    images, ps = [], []
    for k in range(draws):
        for i in range(0, len(prompts), BATCH):
            chunk = prompts[i:i + BATCH]
            images += list(generate(model, vq, tok, [p.text for p in chunk], [seed + 100000 * k + i + j for j in range(len(chunk))])[0])
            ps += chunk
    return images, ps


@torch.no_grad()
def same_images(judges, sets):
    """Every judge on every image set. judges: {name: (model, tok)}; sets: {name: (images, prompts)}.
    -> {judge: {set: {auc_within_category, balanced_accuracy, right, n}}}: its P(yes) against the
    checker; the verdict is Yes where P(yes) >= 0.5 (the loop's: the larger of P(Yes), P(No), Yes on a tie)."""
    truth = {name: ([shapes.check(im, p).verdict for im, p in zip(images, ps)], [p.category for p in ps])
             for name, (images, ps) in sets.items()}
    out = {}
    for jname, (model, tok) in judges.items():
        out[jname] = {}
        for sname, (images, ps) in sets.items():
            probs = p_yes(model, tok, images, [p.text for p in ps]).tolist()
            labels, cats = truth[sname]
            out[jname][sname] = {"auc_within_category": auc_within_category(probs, labels, cats),
                                 "balanced_accuracy": balanced_accuracy([q >= 0.5 for q in probs], labels),
                                 "right": float(np.mean(labels)), "n": len(labels)}
    return out


# -----------------------------------------------------------------------------
# Command line


def read_rgb(path):
    """Any image file as uint8 RGB (H, W, 3), as the official processor reads it (PIL convert("RGB"))."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError) as e:
        raise ValueError(f"cannot read image {path!r}: {e}") from None


def to_model_size(image, size, pad=False):
    """An image of any square size, resized to the model's (as sample.py --edit does). pad=True, the
    released models' preprocessing: any shape, the long side scaled to `size` (bicubic, the short side
    truncated, at least 14 px), centred on a grey (127, 127, 127) square."""
    h, w = image.shape[:2]
    if h != w and not pad:
        raise ValueError(f"the image is {w}x{h} pixels; the judge reads square images")
    if (h, w) != (size, size):
        nw, nh = max(int(w / max(h, w) * size), 14), max(int(h / max(h, w) * size), 14)
        image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
    if h != w:
        square = np.full((size, size, 3), 127, dtype=np.uint8)
        top, left = (size - image.shape[0]) // 2, (size - image.shape[1]) // 2
        square[top:top + image.shape[0], left:left + image.shape[1]] = image
        image = square
    return image


def run(args):
    if args.eval == (args.image is not None or args.prompt is not None):
        raise ValueError("give either --image PNG --prompt TEXT, or --eval")
    if not args.eval and (args.image is None or args.prompt is None):
        raise ValueError("--image and --prompt go together")
    if args.out and not args.eval:
        raise ValueError("--out goes with --eval (the judgement of one image is printed)")
    folder = os.path.isdir(args.ckpt)  # a released model: any prompt, the official image preprocessing
    if folder and (args.eval or not args.prompt.strip()):
        raise ValueError("a model folder is judged on one --image and a non-empty --prompt (--eval needs ShapeWorld's checkpoints)")
    if not args.eval:  # every input is read and checked before the model is loaded
        text = args.prompt if folder else shapes.parse_prompt(args.prompt).text
        image = read_rgb(args.image) if folder else shapes.load_image(args.image)
    model, vq, tok, _ = load_janus(args.ckpt, pick_device(args.device))
    if args.eval:
        result = judge_eval(model, vq, tok, args.n, args.seed, max_reason=args.max_reason)
        if args.out:
            write_json(result, args.out)
        print(json.dumps(result, allow_nan=False))
        return
    verdicts, probs, answers = judge_images(model, tok, [to_model_size(image, model.cfg.image_size, pad=folder)], [text], args.max_reason)
    print(json.dumps({"verdict": verdicts[0], "p_yes": probs[0], "reason": answers[0]}, allow_nan=False))


def main(argv=None):
    ap = Parser(description="The model as an image-text judge: P(yes), verdict and reason for one image and prompt "
                            "(one JSON line), or --eval: its agreement with the ShapeWorld checker (one JSON object).")
    # what to judge
    ap.add_argument("--ckpt", required=True, help="a Janus checkpoint written by sft.py or rl.py (OUT/sft.pt, OUT/rl.pt), "
                    "or a released model's folder (config.json, weights, tokenizer.json)")
    ap.add_argument("--image", help="the image to judge (PNG; any square size, resized to the model's)")
    ap.add_argument("--prompt", help="the prompt it should show (ShapeWorld grammar, e.g. 'a red circle above a square')")
    ap.add_argument("--max-reason", type=nonneg_int, default=24, help="most reason tokens after the verdict")
    # or measure it
    ap.add_argument("--eval", action="store_true", help="measure agreement with the checker on the test prompts instead")
    ap.add_argument("--n", type=pos_int, default=10, help="--eval: matching images per category and source, and as "
                    "many mismatching (drawn images: up to n, as many as the checker balances)")
    ap.add_argument("--seed", type=int, default=0, help="--eval: scenes and drawn images are seeded from this")
    ap.add_argument("--out", help="--eval: also write the JSON object to this file (atomically)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    run_cli(ap, argv, run)


if __name__ == "__main__":
    main()
