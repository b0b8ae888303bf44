"""
Stage 1 of the method (SPEC.md section 4), preceded by the base model it starts from.

- stage `base`: our stand-in for a pretrained Janus-Pro, trained on rendered ShapeWorld data from
  the pretrained ViT of vit.py (kept fixed) and an untrained LM: text-to-image (10% prompt dropout, so the unconditional branch of CFG is learned) and
  understanding through the ViT path (describing an image; answering "Does this image match the
  prompt ...").
- stage `sft`: builds its data as the paper does (sample the base model several times per training
  prompt, score every image with the judge = the ShapeWorld checker; rendered scenes play the
  paper's strong external generator for positives) and trains the three sub-tasks, mixed 0.2/0.3/0.5:
    Task I   prompt -> a positive image (rendered; own correct samples at rate OWN_POSITIVE, 0 on toy);
    Task II  prompt + image (understanding path) + cue -> "Yes, ..."/"No, ..." + EOS, balanced,
             loss 0.8 CE(Yes/No) + 0.2 mean CE(rest of the answer) per example; even odds for every
             prompt, and own images as often behind Yes as behind No (OWN_SHARE); after 0 to
             `--depth` earlier failed rounds, as the loop judges its later images;
             on toy half its examples are the base's describe and VQA instead (`--und-share`);
    Task III prompt + a NEGATIVE image (VQ path) + cue + "No, <reason>" + EOS + "Next, I will draw a
             new image" -> a POSITIVE image of the same prompt.
  and, on a share of its steps (`--edit-share`, not in the paper's SFT), editing: a rendered source
  scene (VQ path) + an instruction -> the edited scene, so that editing RL starts from a model that
  can copy its source.
Both stages share one training loop: AdamW, warmup + cosine, grad clip, bf16 autocast, periodic
held-out evaluation, atomic checkpoints, resume after interruption, DDP or FSDP2 through torchrun.

    python sft.py --stage base --config toy --out out/toy
    python sft.py --stage sft --config toy --out out/toy
    torchrun --nproc_per_node 2 sft.py --stage base --config tiny --out out/tiny   # DDP (gloo on CPU)
    torchrun --nproc_per_node 8 sft.py --stage sft --config small --out out/small --parallel fsdp --dtype bf16
    python sft.py --stage sft --init path/to/Janus-Pro-7B --config janus-pro-7b --out out/real   # a released model
"""

import argparse
import json
import os
import random
from dataclasses import asdict

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

import shapes
from common import (DTYPE_HELP, Parser, add_attention_arg, bounded, check_run_dir, digest, load_checkpoint, load_state,
                    nonneg_int, pos_float, pos_int, run_cli, save_checkpoint, stage_receipt, to_tensor, use_bf16, weights_list, write_json)
from evaluate import final_eval, quick_eval
from model import PRESETS, Janus, JanusConfig
from sample import (Options, add_answer, after_rounds, collate_groups, describe_seq, edit_seq, embed_batch, generate,
                    janus_checkpoint, load_janus, next_turn, prompt_seq, question, selfcheck_seq)
from tokenizer import TextTokenizer, load_vq, reconstruct
from train import Plan, add_parallel_args, distribute, fit, gathered, make_optimizer, setup_distributed, sharded
from vit import load_vit

# -----------------------------------------------------------------------------
# Run settings per config (flags override). Learning rates are the toy's: these models start
# from scratch, so they need far more than the paper's 2e-5 for fine-tuning a 7B model (at 1e-3 the
# toy's Yes/No answer collapsed in the free world). The grid-world toy (a 4 x 192 model, 16 image
# tokens) is sized to the CPU budget: docs/experiments.md, "The grid world".

TRAIN = {
    # eval_prompts: val prompts per category for the learning curve; test_prompts: test prompts per
    # category for the final evaluation (None: all 100; tiny's numbers only prove the plumbing);
    # gen_lr_scale: the generation path (GEN_PATH) trains at this many times the lr; on toy, 10 gets
    # the prompt's words into the drawn codes sooner (docs/experiments.md, "The drawing path's learning rate");
    # toy sft_steps 800: against 500, first image 0.51 -> 0.59 after SFT and 0.62 -> 0.70 after RL, for
    # ~3 more minutes (docs/experiments.md, "A longer SFT");
    # und_steps: base steps after base_steps that train understanding only (UND_MIX), the lr schedule
    # started again; on toy 200 (150-170 s of training) teach the self-check to read what the base
    # stops short of (docs/experiments.md, "The base reads colour after more VQA");
    # und_share: the share of Task II's examples that rehearse that reading in SFT; toy 0.5: on judge.py's
    # balanced set SFT's judge ranks within a category at 0.78 against 0.70 (RL's 0.74 against 0.70) and
    # names the failed fact 0.51 against 0.35, for SFT's first image 0.58 against 0.60 (docs/experiments.md,
    # "SFT rehearses the base's reading");
    # toy edit_share 0.4 with sft_steps 1333 (the three tasks keep ~800 steps): editing after RL follow /
    # preserve 0.63 / 0.69 against 0.30 / 0.01; category_weights: toy draws compositional prompts twice as
    # often, SFT's first image compositional 0.35 against 0.27 (docs/experiments.md, "Editing in SFT and RL")
    "tiny": dict(base_steps=60, und_steps=10, easy_steps=20, sft_steps=40, batch_size=16, base_lr=2e-3, sft_lr=1e-3, warmup=10,
                 gen_lr_scale=1, eval_every=0, eval_prompts=4, test_prompts=20, sft_prompts=32, samples_per_prompt=2, edit_share=0.1, und_share=0.5,
                 category_weights={}, repair_share=0.0),
    "toy": dict(base_steps=1000, und_steps=200, easy_steps=400, sft_steps=1333, batch_size=32, base_lr=3e-4, sft_lr=3e-4, warmup=60,
                gen_lr_scale=10, eval_every=250, eval_prompts=15, test_prompts=None, sft_prompts=400, samples_per_prompt=4, edit_share=0.4,
                und_share=0.5, category_weights={"compositional": 2.0}, repair_share=0.0),
    "small": dict(base_steps=6000, und_steps=0, easy_steps=2000, sft_steps=2000, batch_size=64, base_lr=3e-4, sft_lr=2e-4, warmup=300,
                  gen_lr_scale=1, eval_every=1000, eval_prompts=20, test_prompts=None, sft_prompts=2000, samples_per_prompt=4, edit_share=0.0, und_share=0.0,
                  category_weights={}, repair_share=0.0),
    # a released model (--init FOLDER) fine-tuned on ShapeWorld: the paper's SFT learning rate (SPEC.md
    # section 4); no base stage (the released model is the base)
    "janus-pro-1b": dict(base_steps=0, und_steps=0, easy_steps=0, sft_steps=2000, batch_size=128, base_lr=2e-5, sft_lr=2e-5, warmup=100,
                         gen_lr_scale=1, eval_every=500, eval_prompts=20, test_prompts=None, sft_prompts=2000, samples_per_prompt=4, edit_share=0.0, und_share=0.0,
                         category_weights={}, repair_share=0.0),
    "janus-pro-7b": dict(base_steps=0, und_steps=0, easy_steps=0, sft_steps=2000, batch_size=128, base_lr=2e-5, sft_lr=2e-5, warmup=100,
                         gen_lr_scale=1, eval_every=500, eval_prompts=20, test_prompts=None, sft_prompts=2000, samples_per_prompt=4, edit_share=0.0, und_share=0.0,
                         category_weights={}, repair_share=0.0),
}
# The base model: draw, describe, answer. Drawing is the skill it lacks most, so it gets 5/8 of the
# steps; describing is learned quickly, so the Yes/No answers (the slow skill) get most understanding
# examples (docs/experiments.md, "Base stage: the share of drawing steps").
BASE_MIX = {"t2i": 0.625, "describe": 0.1125, "vqa": 0.2625}
# The base stage's last und_steps: understanding only, its conversations opening on EASY_CATEGORIES
# prompts, as a second run continuing a finished base (its own warmup and decay). At step 1,000 the
# toy base's self-check was still learning to read (renders: AUC within category 0.68); 200 such
# steps took it to 0.83 (colour 0.73 -> 0.89). SFT's judge ranked its own images better in two runs
# (0.76, 0.76 against 0.69, 0.68), not in the whole job (0.67); RL's did there (0.73 against 0.54);
# with the first phase's AdamW moments the base drew worse at its end (0.44 -> 0.34), SFT better
# (0.59 -> 0.61). docs/experiments.md,
# "The base reads colour after more VQA". Fresh AdamW moments at the restart (train.fit) keep the
# drawing: 0.45 against 0.37 from the same step-1,000 base (section 44 there).
UND_MIX = {"t2i": 0.0, "describe": 0.1, "vqa": 0.9}
# Questions per VQA image: a conversation, as VLM instruction data has, so that each pass through the
# ViT teaches several answers for little more time (docs/experiments.md, "questions per VQA image").
VQA_QUESTIONS = 4
# The first question of every VQA conversation is asked in the self-check layout (prompt, image, cue),
# which the judge needs; for the first `easy_steps` base steps its prompt comes from these categories,
# where the toy LM first learns to join the prompt with the image after it (docs/experiments.md).
EASY_CATEGORIES = ("single", "colour")
SFT_MIX = {"task1": 0.2, "task2": 0.3, "task3": 0.5}   # the paper's mix
# The ViT: both stages keep vit.py's pretraining (the SigLIP stand-in). Trained in SFT (where only
# Task II reaches it), SFT from the longer base judged its own images worse (AUC within category
# 0.716 against 0.762) and kept less of the base's reading of rendered scenes (docs/experiments.md,
# "SFT: the ViT fixed or trained", "The base reads colour after more VQA").
VIT_DEFAULT = {"base": "fixed", "sft": "fixed"}
PROMPT_DROPOUT = 0.1
GEN_PATH = ("gen_embed", "gen_aligner", "gen_head")  # the parameters --gen-lr-scale speeds up

def train_prompt(rng, by_cat, weights=None):
    # categories uniformly (or in proportion to weights, {category: weight}, 1 where absent), then a
    # text: the train split holds ~100x more compositional texts
    cats = list(by_cat)
    cat = rng.choices(cats, [weights.get(c, 1.0) for c in cats])[0] if weights else rng.choice(cats)
    return rng.choice(by_cat[cat])


def category_weights(text):
    """--category-weights: 'compositional=2,single=0.5' -> {"compositional": 2.0, "single": 0.5}."""
    out = {}
    for part in filter(None, text.split(",")):
        cat, _, w = part.partition("=")
        if cat.strip() not in shapes.CATEGORIES:
            raise argparse.ArgumentTypeError(f"unknown category {cat.strip()!r} (one of {', '.join(shapes.CATEGORIES)})")
        out[cat.strip()] = bounded(float, 0)(w)
    if out and not any(out.get(c, 1.0) > 0 for c in shapes.CATEGORIES):
        raise argparse.ArgumentTypeError(f"every category weighs 0 in {text!r}")
    return out


def group(prompts):
    """Prompts -> {category: [prompts, one per text]}, categories and texts in first-seen order."""
    by_cat = {}
    for p in {p.text: p for p in prompts}.values():
        by_cat.setdefault(p.category, []).append(p)
    return by_cat


# -----------------------------------------------------------------------------
# Examples: every example of step s is a pure function of (seed, s), so a resumed run, or one
# split over several processes, sees exactly the data of an uninterrupted single-process run.


def base_example(task, rng, by_cat, size, easy=False, grid=0):
    """(kind, scene-or-None, seq builder args) for the base stage; images are rendered here and
    VQ-encoded per batch by `encode_codes`. easy: a VQA conversation opens with an EASY_CATEGORIES prompt."""
    if task == "vqa" and easy:
        p = train_prompt(rng, {c: v for c, v in by_cat.items() if c in EASY_CATEGORIES})
    else:
        p = train_prompt(rng, by_cat)
    if task == "t2i":
        return dict(task=task, prompt=p.text, image=target_scene(rng, size, p, grid), drop=rng.random() < PROMPT_DROPOUT)
    if task == "describe":
        scene = shapes.sample_scene(rng, size, p, grid=grid)
        return dict(task=task, image=shapes.render(scene), answer=shapes.describe(scene))
    # a conversation about one image: the first question, in the self-check layout, matches or
    # breaks with even odds (the scene is drawn for it); the others, asked after the image as a VLM
    # is usually asked, are further training prompts answered from the same scene
    match = rng.random() < 0.5
    scene = shapes.sample_scene(rng, size, p, match=match, grid=grid)
    asked = [p] + [train_prompt(rng, by_cat) for _ in range(VQA_QUESTIONS - 1)]
    return dict(task=task, image=shapes.render(scene), qa=[(q.text, shapes.truth(scene, q).reason) for q in asked])


def target_scene(rng, size, p, grid=0):
    """A rendered scene for prompt p that a drawing example (base t2i, SFT Tasks I and III) learns
    to draw. A prompt with a relation gets its asked objects alone, each relation in one row or
    column (ALIGNED_RELATIONS); any other prompt a matching scene with random distractors. With
    ORDERED_TARGETS, in the grid world (one object, one token), raster order meets the asked objects
    in the prompt's order: a relation's two as they stand (`in_reading_order`, resampled up to
    ORDER_TRIES times), the others moved (`in_mention_order`). Free placement (tiny, small) keeps
    random order: there an object spans several rows of tokens, and a row of its own is untried."""
    if ALIGNED_RELATIONS and any(f.kind == "rel" for f in p.facts):
        try:
            ordered = ORDERED_TARGETS and grid
            for _ in range(ORDER_TRIES if ordered else 1):
                scene = shapes.sample_scene(rng, size, p, grid=grid, most=1, aligned=True)
                if not ordered or in_reading_order(scene, p):
                    break
            return shapes.render(scene)
        except RuntimeError:  # free placement (no grid) may fail to align two relations among four objects
            return shapes.render(shapes.sample_scene(rng, size, p, grid=grid, most=1))
    scene = shapes.sample_scene(rng, size, p, grid=grid)
    return shapes.render(in_mention_order(scene) if ORDERED_TARGETS and grid else scene)


def in_mention_order(scene):
    """The scene with its objects moved so that raster order (the order the image tokens are drawn
    in) meets the asked ones first, in the order the prompt names them, then the distractors:
    "a red circle and a blue square" -> the red circle, the blue square, any others. Objects swap
    places (and sizes) only; the facts (no relation among them) still hold. sample_scene lists the
    asked objects first."""
    places = sorted((raster_place(o, scene), o.x, o.y, o.s) for o in scene.objects)
    moved = [shapes.Obj(o.shape, o.colour, x, y, s) for o, (_, x, y, s) in zip(scene.objects, places)]
    return shapes.Scene(scene.size, moved, scene.grid)


def raster_place(o, scene):
    """(row, column) of a grid-world object's cell: its token is drawn in this order."""
    cell = scene.size / scene.grid
    return o.cy // cell, o.cx // cell


def in_reading_order(scene, p):
    """Whether raster order meets the asked objects fact by fact, a relation's two objects in the
    order they stand ("X right of Y": Y, then X), as in_mention_order orders prompts without one."""
    want = []  # (colour or None, shape) of each asked object, in the order raster order should meet them
    for f in p.facts:
        a, b = (f.colour, f.shape), (f.colour2, f.shape2)
        if f.kind == "rel":
            want += [a, b] if f.rel in ("left of", "above") else [b, a]
        else:
            want += [a] * f.n  # exists: n = 1
    seen = sorted(scene.objects, key=lambda o: raster_place(o, scene))
    return len(seen) == len(want) and all(o.shape == s and c in (None, o.colour) for o, (c, s) in zip(seen, want))


UND_TASKS = ("describe", "vqa")  # the base tasks that read an image through the ViT


def base_batch(rng, mix, n, by_cat, size, easy=False, grid=0):
    """One base-stage step -> (task, n examples): a text-to-image step with probability mix["t2i"],
    otherwise an understanding step ("und") whose examples are describe or vqa, drawn per example
    in the proportion mix["describe"] : mix["vqa"]. Mixed per example because alternating whole
    describe and VQA steps let every VQA step undo describe's progress (docs/experiments.md)."""
    task = rng.choices(list(mix), weights=list(mix.values()))[0]
    if task not in UND_TASKS:
        return task, [base_example(task, rng, by_cat, size, grid=grid) for _ in range(n)]
    return "und", [und_example(rng, mix, by_cat, size, easy, grid) for _ in range(n)]


def und_example(rng, mix, by_cat, size, easy=False, grid=0):
    """A describe or a VQA example, drawn in the proportion mix["describe"] : mix["vqa"]."""
    return base_example(rng.choices(UND_TASKS, weights=[mix[t] for t in UND_TASKS])[0], rng, by_cat, size, easy, grid)


def base_phase(settings, step):
    """(mix, easy) of base step `step`: the last und_steps train understanding only (UND_MIX), their
    conversations opening on easy prompts, as the first easy_steps do."""
    if step >= settings["steps"] - settings["und_steps"]:
        return UND_MIX, True
    return settings["mix"], step < settings["easy_steps"]


def build_seq(ex, tok, n_tokens):
    """One training example (a dict) -> Seq, with the loss where SPEC.md puts it. ex["unit"]: its
    weights scaled to sum to 1 (a rehearsed base example inside a Task II step, which weighs each of
    its examples 1; a VQA conversation's per-token weights sum to several)."""
    s = task_seq(ex, tok, n_tokens)
    if ex.get("unit"):
        total = sum(s.w)
        s.w = [w / total for w in s.w]
    return s


def task_seq(ex, tok, n_tokens):
    t = ex["task"]
    if t in ("t2i", "task1"):
        s = prompt_seq(tok, ex["prompt"])
        s = s.uncond(tok, True) if ex["drop"] else s  # prompt dropout = the first image's CFG twin
        return s.gen_image(tok, ex["codes"], w=1.0)
    if t == "describe":
        return describe_seq(tok, ex["image"], ex["answer"], n_tokens)
    if t == "vqa":
        # per-token weights, as the base stage was tuned with (its steps mix describe and vqa per example)
        (q, a), *more = ex["qa"]
        s = add_answer(selfcheck_seq(tok, q, ex["image"], n_tokens), tok, a, 0.8, 0.2, rest_mean=False)
        for q, a in more:
            add_answer(next_turn(s, tok, question(q)), tok, a, 0.8, 0.2, rest_mean=False)
        return s
    if t == "task2":
        # the weights sum to 1: 0.8 CE(Yes/No) + 0.2 mean CE(rest) per example (SPEC.md section 4)
        s = selfcheck_seq(tok, ex["prompt"], ex["image"], n_tokens, ex.get("history", ()))
        return add_answer(s, tok, ex["answer"], 0.8, 0.2)
    if t == "edit":  # dropout pads only the instruction: the source stays in both CFG rows (SPEC.md section 3)
        s = edit_seq(tok, ex["src_codes"], ex["prompt"])
        return (s.uncond(tok, False) if ex["drop"] else s).gen_image(tok, ex["codes"], w=1.0)
    # task3: the earlier failed rounds go in through the VQ path, each with its reflection
    s = after_rounds(tok, ex["prompt"], ex["history"])
    s = s.uncond(tok, False) if ex["drop"] else s  # dropout pads only the user's words
    return s.gen_image(tok, ex["codes"], w=1.0)


@torch.no_grad()
def encode_codes(vq, images):
    """uint8 (B, H, W, 3) -> VQ codes (B, N) as lists."""
    return vq.encode(to_tensor(np.stack(images)).to(vq.quant_conv.weight.device)).tolist()


# -----------------------------------------------------------------------------
# SFT data, built from the base model's own samples (SPEC.md section 4)


@torch.no_grad()
def build_sft_pool(model, vq, tok, prompts, k, size, seed, batch=64, opt=Options()):
    """Sample the base model k times per prompt (CFG, temperature 1), score every image with the
    checker. Returns {prompt text: [(codes, image, verdict, reason), ...]}."""
    items = [(p, seed * 1000003 + i * k + j) for i, p in enumerate(prompts) for j in range(k)]
    pool = {p.text: [] for p in prompts}
    for i in tqdm(range(0, len(items), batch), desc="sampling the base model", dynamic_ncols=True):
        chunk = items[i:i + batch]
        images, codes = generate(model, vq, tok, [p.text for p, _ in chunk], [s for _, s in chunk], opt)
        for (p, _), im, c in zip(chunk, images, codes.tolist()):
            r = shapes.check(im, p)
            pool[p.text].append((c, im, r.verdict, r.reason))
    return pool


# Task II: share of answers shown on the base model's own images, where a prompt has both kinds.
# The judge reads rendered scenes already (the base's VQA); its own images are what it misreads
# (docs/experiments.md, "OWN_SHARE").
OWN_SHARE = 1.0
# Tasks I and III: for a prompt with a correct own sample, the chance that its target (positive)
# image is one of them rather than a rendered scene. 0: training on its own checker-approved
# samples taught the toy model their mess (docs/experiments.md, "OWN_POSITIVE"). The renderer is the
# toy's strong (and perfect) external generator; own images still feed Task II and Task III's inputs.
OWN_POSITIVE = 0.0
# Task II: the chance that a "No" example shows, instead of one of the prompt's own wrong images, an
# own image drawn for a NEIGHBOUR prompt (same category, one word changed: "a red circle" / "a blue
# circle"), answered by the checker against this prompt: wrong images that look like right ones and
# differ from the prompt in one named fact. 0: at 0.5 the judge was no better over two seeds (AUC
# within category 0.78 / 0.77 against 0.73 / 0.79; docs/experiments.md, "SFT: neighbours' images").
NEIGHBOUR_SHARE = 0.0
# Drawing targets of prompts with a relation: the asked objects alone, in one row or column. From
# random distractors and cells the toy never learned to read the relation word (its drawings held the
# asked relation 0.58 of the time, the opposite 0.61); from these its SFT does (0.77 against 0.20;
# docs/experiments.md, "Relations: drawing targets in one row or column").
ALIGNED_RELATIONS = True
# Drawing targets in the grid world: raster order meets the asked objects first, in the order the
# prompt names them (`in_mention_order`, `in_reading_order`). Image tokens are drawn in raster order,
# and from randomly ordered targets the toy had to work out, cell by cell, which named object it had
# not drawn yet: SFT drew "a red circle and a blue square" right 0.29 of the time, in this order 0.94;
# the first image overall 0.61 -> 0.78, RL's final 0.71 -> 0.84; with compositional prompts' relations
# read in order too, compositional 0.06 -> 0.27 (docs/experiments.md, "Drawing targets in the prompt's order").
ORDERED_TARGETS = True
# a compositional prompt with relations reads in order in ~1 of 4.5 aligned scenes (99% within 24;
# 1.4 ms a scene): resampled, not moved, since moving objects could break a relation
ORDER_TRIES = 50


def sft_example(task, rng, by_cat, pool, size, depth=1, grid=0, weights=None, repair=0.0):
    """One SFT example. Positives: rendered matching scenes (the strong external generator), or at
    rate OWN_POSITIVE the base model's correct samples; negatives: the base model's wrong samples,
    or, when a prompt has none, a rendered near-miss (a deliberately broken scene).
    by_cat: the SFT prompts by category (group); a category uniformly, then a prompt, as the base
    stage draws (uniform over texts would be mostly compositional prompts), or by weights (train_prompt).
    repair: in the grid world, the share of Task III examples whose positive is the last negative
    repaired (`repaired`) instead of a new scene for the prompt: the negative's layout and objects,
    not ORDERED_TARGETS' or ALIGNED_RELATIONS', on purpose."""
    p = train_prompt(rng, by_cat, weights)
    samples = pool[p.text]
    pos = [s for s in samples if s[2]]
    neg = [s for s in samples if not s[2]]

    def positive():
        if pos and rng.random() < OWN_POSITIVE:
            c, im, _, _ = rng.choice(pos)
            return dict(codes=c, image=im)
        return dict(image=target_scene(rng, size, p, grid))

    def negative():
        if neg and rng.random() < 0.7:
            c, im, _, reason = rng.choice(neg)
            return dict(codes=c, image=im, reason=reason)
        scene = shapes.sample_scene(rng, size, p, match=False, grid=grid)
        im = shapes.render(scene)
        return dict(image=im, reason=shapes.check(im, p).reason, scene=scene)

    if task == "task1":
        return dict(task=task, prompt=p.text, drop=rng.random() < PROMPT_DROPOUT, **positive())
    if task == "task2":
        # Yes or No with even odds for every prompt, and on the base model's own images as often
        # behind Yes as behind No: own images look unlike rendered ones, and a prompt the base model
        # usually fails must not mean "No" either. Otherwise the judge learns the look or the
        # prompt, not to read the image (it did both).
        # The paper's deeper context: 0 to `depth` earlier failed rounds before the judged image,
        # with even odds, as the loop judges every image after the first; without them the judge
        # says No after any reflection (docs/experiments.md, "earlier rounds in Task II's context").
        yes = rng.random() < 0.5
        history = [_hist(negative()) for _ in range(rng.randint(0, depth))]
        if pos and neg and rng.random() < OWN_SHARE:
            near = neighbours(p, by_cat[p.category]) if NEIGHBOUR_SHARE and not yes else []
            if near and rng.random() < NEIGHBOUR_SHARE:  # (no draw at 0: the data stream stays as it was)
                _, im, _, _ = rng.choice(pool[rng.choice(near).text])
                return dict(task=task, prompt=p.text, image=im, answer=shapes.check(im, p).reason, history=history)
            _, im, _, reason = rng.choice(pos if yes else neg)
            return dict(task=task, prompt=p.text, image=im, answer=reason, history=history)
        # a rendered scene is shown as the judge sees every image at inference: VQ-decoded
        # (finish_examples replaces it by its VQ round trip and the answer by the checker's on that)
        im = shapes.render(shapes.sample_scene(rng, size, p, match=yes, grid=grid))
        return dict(task=task, prompt=p.text, image=im, answer=shapes.check(im, p).reason, history=history,
                    roundtrip=True)
    negs = [negative() for _ in range(rng.randint(1, depth))]
    drop = rng.random() < PROMPT_DROPOUT
    target = positive()
    if grid and repair and rng.random() < repair:  # drawn last: at share 0 the data stream is as it was
        fixed = repaired(negs[-1], p, grid)
        target = target if fixed is None else dict(image=shapes.render(fixed))
    return dict(task=task, prompt=p.text, drop=drop, history=[_hist(n) for n in negs], **target)


_REPAIRS = {}  # (prompt text, the image's bytes) -> the repaired scene of an own negative: detected once


def repaired(neg, p, grid):
    """Task III's repair target: the negative's objects (its scene, or read back from its pixels)
    with the fewest edits that make prompt p true (shapes.repair), or None."""
    if "scene" in neg:
        return shapes.repair(neg["scene"], p)
    key = (p.text, np.ascontiguousarray(neg["image"]).tobytes())
    if key not in _REPAIRS:
        _REPAIRS[key] = shapes.repair(shapes.scene_from_image(neg["image"], grid), p)
    return _REPAIRS[key]


def neighbours(p, prompts):
    """The prompts whose words differ from p's in exactly one place, articles aside ("an orange
    circle" / "a red circle", "two circles" / "three circles", "left of" / "right of")."""
    words = lambda t: [w for w in t.split() if w not in ("a", "an")]
    mine = words(p.text)
    return [q for q in prompts if len(words(q.text)) == len(mine)
            and sum(a != b for a, b in zip(words(q.text), mine)) == 1]


def edit_example(rng, size, grid=0):
    """An editing example: a rendered source scene and the correctly edited one (shapes.sample_edit),
    the instruction never naming a held-out (ood) colour-shape pairing, not even as a recolour's result.
    With ORDERED_TARGETS, in the grid world an added object goes to the first free cell in raster
    order (`first_free_cell`): "add" names no place, and a random one is a guess per cell."""
    while True:
        src, e, out = shapes.sample_edit(rng, size, grid=grid)
        if e.kind == "add" and ORDERED_TARGETS and grid:
            out = first_free_cell(src, out)
        if not shapes.text_mentions_ood(e.text) and (e.colour2, e.shape) not in shapes.OOD_PAIRS:
            return dict(task="edit", prompt=e.text, src_image=shapes.render(src), image=shapes.render(out),
                        drop=rng.random() < PROMPT_DROPOUT)


def first_free_cell(src, out):
    """out (src plus one added object, listed last, as shapes.apply_edit appends it) with the added
    object moved to src's first free cell in raster order (row by row): the one place the toy learns."""
    *kept, new = out.objects
    taken = {raster_place(o, src) for o in src.objects}
    row, col = next((r, c) for r in range(src.grid) for c in range(src.grid) if (r, c) not in taken)
    return shapes.Scene(out.size, kept + [shapes.in_cell(new, (col, row), src.size, src.grid)], out.grid)


def sft_batch(rng, settings, by_cat, pool, size, depth=1, grid=0):
    """One SFT step -> (task, examples): an editing step with probability settings["edit_share"],
    otherwise one task of settings["mix"] for the whole batch (one task per step, as the paper's
    code). In a Task II step each example is, with probability settings["und_share"], one of the
    base's understanding examples instead (describe or VQA on a rendered scene, UND_MIX)."""
    n = settings["batch_size"]
    if settings["edit_share"] and rng.random() < settings["edit_share"]:
        return "edit", [edit_example(rng, size, grid) for _ in range(n)]
    task = rng.choices(list(settings["mix"]), weights=list(settings["mix"].values()))[0]
    und = settings["und_share"] if task == "task2" else 0
    # the base's reading rehearsed beside the judge's own task: without it SFT forgets colour
    # (docs/experiments.md, "The base reads colour after more VQA"); per example, not whole steps,
    # which cost drawing steps
    return task, [dict(und_example(rng, UND_MIX, by_cat, size, True, grid), unit=True)
                  if und and rng.random() < und else sft_example(task, rng, by_cat, pool, size, depth, grid,
                                                                 settings["category_weights"], settings["repair_share"])
                  for _ in range(n)]


def _hist(neg):
    """A failed round for an example's history: (codes or None until finish_examples, reason, image)."""
    return neg.get("codes"), neg["reason"], neg["image"]


def finish_examples(exs, vq):
    """VQ-encode every image that an example needs as codes and doesn't have yet (one batch), and
    replace Task II's rendered images by their VQ round trip (encode + decode), re-answered by the checker."""
    shown = [ex for ex in exs if ex.pop("roundtrip", False)]
    if shown:
        _, recon = reconstruct(vq, np.stack([ex["image"] for ex in shown]))
        for ex, im in zip(shown, recon):
            ex["image"], ex["answer"] = im, shapes.check(im, ex["prompt"]).reason
    need = []
    for ex in exs:
        if ex["task"] in ("t2i", "task1", "task3", "edit") and ex.get("codes") is None:
            need.append((ex, "codes", ex["image"]))
        if ex["task"] == "edit":
            need.append((ex, "src_codes", ex["src_image"]))
        for j, h in enumerate(ex.get("history", [])):
            if h[0] is None:
                need.append((ex, j, h[2]))
    if need:
        codes = encode_codes(vq, [im for _, _, im in need])
        for (ex, key, _), c in zip(need, codes):
            if isinstance(key, str):
                ex[key] = c
            else:
                ex["history"][key] = (c,) + ex["history"][key][1:]
    for ex in exs:
        ex["history"] = [(c, r) for c, r, *_ in ex.get("history", [])]
    return exs


# -----------------------------------------------------------------------------
# The training loop, shared by both stages


def step_loss(model, groups, world):
    """This process's share of the step's loss: the weighted mean over the GLOBAL batch (its weight
    summed over processes), so the shares add up to it. An SFT step is one task, so this is a mean
    over examples: Task II's weights sum to 1 per example (add_answer), and Tasks I and III weigh
    each of their N image tokens 1 (every example has N). groups: this process's examples as
    collate_groups batches them by length, one forward each."""
    wsum = sum(b.weights.sum() for b in groups)
    if world > 1:
        dist.all_reduce(wsum)
    total = 0.0
    for b in groups:
        h = model(embed_batch(model, b))
        losses = model.token_losses(h, b.text_targets, b.image_targets)  # (B, T) fp32
        total = total + (losses * b.weights).sum()
    return total / wsum


def main(argv=None):
    ap = Parser(description="Train the base model (stage base) or the three-task SFT (stage sft).")
    # what and where
    ap.add_argument("--stage", choices=["base", "sft"], required=True, help="base: the Janus-Pro stand-in; sft: the three sub-tasks")
    ap.add_argument("--config", choices=list(TRAIN), default="toy", help="model preset and run settings")
    ap.add_argument("--out", required=True, help="run folder: reads vq.pt (and base.pt for sft), writes {stage}.pt")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init and of every batch")
    ap.add_argument("--init", help="sft: start from this instead of OUT/base.pt and OUT/vq.pt: a released model folder "
                    "(official or transformers layout, with its tokenizer.json, e.g. Janus-Pro-7B; --config janus-pro-7b "
                    "picks the run settings) or a Janus checkpoint; sft.pt then carries its tokenizer")
    # optimisation (defaults from TRAIN[config])
    ap.add_argument("--steps", type=pos_int, help="optimizer steps (base: before --und-steps); rerun with more to continue")
    ap.add_argument("--und-steps", type=nonneg_int, help="base: understanding-only steps after --steps, the lr schedule "
                    "and AdamW's moments started again (toy 200, tiny 10)")
    ap.add_argument("--batch-size", type=pos_int, help="sequences per step, over all processes")
    ap.add_argument("--lr", type=pos_float, help="peak AdamW learning rate")
    ap.add_argument("--gen-lr-scale", type=pos_float, help=f"the generation path ({', '.join(GEN_PATH)}) "
                    "trains at this many times --lr")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help=DTYPE_HELP)
    ap.add_argument("--vit", choices=["fixed", "train"], help="the pretrained ViT (vit.py): kept fixed (the default) or trained "
                    "(in sft only Task II reaches it)")
    # sft data
    ap.add_argument("--mix", help="task probabilities: base 't2i,describe,vqa' (%s); sft 'I,II,III' (%s)"
                    % (",".join(map(str, BASE_MIX.values())), ",".join(map(str, SFT_MIX.values()))))
    ap.add_argument("--edit-share", type=bounded(float, 0, 1), help="sft: share of steps, 0 to 1, that train editing "
                    "(rendered source scene + instruction -> the edited scene), before the task mix is drawn (toy 0.4, tiny 0.1)")
    ap.add_argument("--und-share", type=bounded(float, 0, 1), help="sft: share of Task II's examples, 0 to 1, that "
                    "rehearse the base's understanding instead (describe and VQA on rendered scenes, as its last steps; toy and tiny 0.5)")
    ap.add_argument("--category-weights", type=category_weights,
                    help="sft: how often Tasks I-III draw each category against the others, e.g. 'compositional=2' "
                    "(1 where not named; '' for all alike); default: the preset's (toy %s, the others all alike)"
                    % ",".join(f"{c}={w:g}" for c, w in TRAIN["toy"]["category_weights"].items()))
    ap.add_argument("--repair-share", type=bounded(float, 0, 1), help="sft, grid world: share of Task III's examples, 0 to 1, "
                    "whose target is the negative repaired (shapes.repair: its objects kept, the failed facts fixed) rather "
                    "than a new scene for the prompt (default %g)" % TRAIN["toy"]["repair_share"])
    ap.add_argument("--depth", type=pos_int, default=1, help="sft: up to this many failed rounds in context, Task III 1 to DEPTH, Task II 0 to DEPTH (paper: 2)")
    ap.add_argument("--sft-prompts", type=pos_int, help="training prompts sampled from the base model to build SFT data")
    ap.add_argument("--samples-per-prompt", type=pos_int, help="base-model images per SFT prompt")
    # monitoring
    ap.add_argument("--eval-every", type=nonneg_int, help="held-out evaluation every N steps (0 = only at the end)")
    ap.add_argument("--eval-prompts", type=pos_int, help="held-out prompts per category for the evaluations")
    ap.add_argument("--ckpt-every", type=pos_int, default=100, help="save the resumable state every N steps")
    ap.add_argument("--no-final-eval", action="store_true", help="skip the evaluation on the test split at the end")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    add_parallel_args(ap)
    add_attention_arg(ap)
    run_cli(ap, argv, run)


def stage_settings(args, preset):
    """Everything that shapes the training path: a saved state made with other values can't resume."""
    pick = lambda flag, key: getattr(args, flag) if getattr(args, flag) is not None else preset[key]
    mix = dict(BASE_MIX if args.stage == "base" else SFT_MIX)
    if args.mix:
        vals = weights_list(args.mix, 3, "--mix")
        mix = dict(zip(mix, vals))
    if args.edit_share and args.init:
        raise ValueError("--edit-share trains ShapeWorld edits in the toy's word layout; not for --init (a released model)")
    if args.repair_share and (args.init or not PRESETS[args.config].get("scene_grid")):
        raise ValueError(f"--repair-share mends grid-world scenes (toy); the {args.config} preset places objects freely")
    if args.und_steps and args.stage != "base":
        raise ValueError("--und-steps goes with --stage base")
    und = pick("und_steps", "und_steps") if args.stage == "base" else 0
    return dict(stage=args.stage, config=args.config, seed=args.seed, lr=pick("lr", f"{args.stage}_lr"),
                gen_lr_scale=pick("gen_lr_scale", "gen_lr_scale"),
                batch_size=pick("batch_size", "batch_size"), warmup=preset["warmup"], steps=pick("steps", f"{args.stage}_steps") + und,
                und_steps=und,
                bf16=None, mix=mix, depth=args.depth, freeze_vit=(args.vit or VIT_DEFAULT[args.stage]) == "fixed",
                easy_steps=preset["easy_steps"] if args.stage == "base" else 0,
                edit_share=pick("edit_share", "edit_share") if args.stage == "sft" else 0,
                und_share=pick("und_share", "und_share") if args.stage == "sft" else 0,
                category_weights=pick("category_weights", "category_weights") if args.stage == "sft" else {},
                repair_share=pick("repair_share", "repair_share") if args.stage == "sft" else 0,
                # a base saved before the preset had the image position table is another model
                image_pos=None if args.init else PRESETS[args.config].get("image_pos", False))


def stage_inputs(args, settings):
    """The checkpoints this stage starts from, their digests in settings (a state or pool built from
    other ones is not reused), and the vq tokenizer, checked against the config."""
    if args.init:  # a released model (or any Janus checkpoint) with its own VQ and tokenizer
        if args.stage != "sft" or not os.path.exists(args.init):
            raise ValueError(f"--init {args.init}: " + ("not found" if args.stage == "sft" else "goes with --stage sft"))
        settings["inputs"] = {"init": digest(args.init)}
        return ()
    if args.config.startswith("janus-pro"):
        raise ValueError(f"--config {args.config} fine-tunes a released model: --stage sft --init path/to/its/folder")
    inputs = ("vq.pt", "vit.pt") if args.stage == "base" else ("vq.pt", "base.pt")
    for n in inputs:
        if not os.path.isfile(os.path.join(args.out, n)):
            first = {"vq.pt": "python tokenizer.py", "vit.pt": "python vit.py", "base.pt": "python sft.py --stage base"}[n]
            raise ValueError(f"{os.path.join(args.out, n)} not found: run the earlier stages first ({first} "
                             f"--config {args.config} --out {args.out}, or python run.py, which runs them all)")
    settings["inputs"] = {n: digest(os.path.join(args.out, n)) for n in inputs}
    return inputs


def sft_data(args, preset, model, vq, tok, by_cat, settings, master, world):
    """The SFT prompts (category first) and their pool of base-model samples scored by the checker,
    built once by rank 0 and cached in OUT/sft_pool.pt (rebuilt when base.pt changed)."""
    pool_path = os.path.join(args.out, "sft_pool.pt")
    rng = random.Random(f"sft-prompts-{args.seed}")
    # the SFT prompts drawn as the examples draw them (--category-weights): a category drawn twice as often
    # gets twice as many texts, not the same texts twice as often
    chosen = [train_prompt(rng, by_cat, settings["category_weights"]) for _ in range(args.sft_prompts or preset["sft_prompts"])]
    made_from = settings["inputs"]["init" if args.init else "base.pt"]  # the model sampled
    pool = load_pool(pool_path, chosen, made_from)
    if pool is None:
        if master:
            model.eval()
            pool = build_sft_pool(model, vq, tok, chosen, args.samples_per_prompt or preset["samples_per_prompt"],
                                  model.cfg.image_size, args.seed)
            save_pool(pool, made_from, pool_path)
            model.train()
        if world > 1:
            dist.barrier()
        pool = load_pool(pool_path, chosen, made_from)
    n_img = sum(len(v) for v in pool.values())
    n_pos = sum(s[2] for v in pool.values() for s in v)
    if master:
        print(f"sft data: {len(pool)} prompts, {n_img} base-model images, {n_pos} correct ({n_pos / max(1, n_img):.1%})")
    return group(chosen), pool  # each text once, drawn category first (sft_example)


def load_base(args, cfg, dev):
    """OUT/base.pt for SFT, refused in one line when it is another model than the config's (e.g. a
    base trained before the preset changed)."""
    model = load_janus(os.path.join(args.out, "base.pt"), dev)[0]
    if model.cfg != cfg:
        diff = [k for k, v in asdict(cfg).items() if getattr(model.cfg, k) != v]
        raise ValueError(f"{args.out}/base.pt was trained with another model than config {args.config} "
                         f"(differs in {', '.join(diff)}): rebuild it (sft.py --stage base) or use another --out")
    return model


def run(args):
    preset = TRAIN[args.config]
    settings = stage_settings(args, preset)
    dev, rank, world = setup_distributed(args.device)
    master = rank == 0
    bf16 = torch.tensor([use_bf16(args.dtype, dev)], device=dev)
    if world > 1:
        dist.broadcast(bf16, 0)  # a timing measured per process could disagree: rank 0's holds for all
    settings["bf16"] = bool(bf16.item())
    if settings["batch_size"] % world:
        raise ValueError(f"--batch-size {settings['batch_size']} does not split over {world} processes")
    inputs = stage_inputs(args, settings)
    check_run_dir(args.out)
    # a saved state of another run is refused here, before any work (more --steps continue a run)
    state_path = os.path.join(args.out, f"{args.stage}_state.pt")
    st = load_state(state_path, f"{args.stage}_state", settings, ignore=("steps", "bf16"))

    if args.init:
        model, vq, tok, _ = load_janus(args.init, dev)
        cfg = model.cfg
    else:
        tok = TextTokenizer(shapes.WORDS)
        vq = load_vq(os.path.join(args.out, "vq.pt"), dev)
        cfg = JanusConfig(**PRESETS[args.config])
    vq.requires_grad_(False)
    if (vq.cfg.codebook_size, vq.cfg.num_tokens, vq.cfg.scene_grid) != (cfg.image_vocab_size, cfg.image_tokens, cfg.scene_grid):
        raise ValueError(f"{args.out}/vq.pt ({vq.cfg.codebook_size} codes, {vq.cfg.num_tokens} per image, scene grid "
                         f"{vq.cfg.scene_grid}) does not fit config {args.config} ({cfg.image_vocab_size} codes, "
                         f"{cfg.image_tokens} per image, scene grid {cfg.scene_grid})")
    splits = shapes.make_splits(seed=0)
    by_cat = group(splits["train"])
    torch.manual_seed(args.seed)
    if args.stage == "base":
        model = Janus(cfg).to(dev)
        load_vit(os.path.join(args.out, "vit.pt"), model)  # the SigLIP stand-in: Janus-Pro starts from a pretrained ViT too
    else:
        if not args.init:
            model = load_base(args, cfg, dev)
        model.train()
        chosen, pool = sft_data(args, preset, model, vq, tok, by_cat, settings, master, world)
    if settings["freeze_vit"]:
        model.vision_model.requires_grad_(False)  # make_optimizer leaves out what has no gradient
    model.checkpointing = args.checkpointing
    model.set_attention(args.attn)
    plan = Plan(settings["steps"], settings["lr"], settings["warmup"], restart=settings["steps"] - settings["und_steps"]
                if settings["und_steps"] else 0, bf16=settings["bf16"], ckpt_every=args.ckpt_every,
                eval_every=preset["eval_every"] if args.eval_every is None else args.eval_every, world=world, rank=rank,
                parallel=args.parallel, desc=f"{args.stage} {args.config} {'bf16' if settings['bf16'] else 'fp32'}")
    loss_fn = distribute(model, lambda b: step_loss(model, b, world), plan)  # first: FSDP swaps the parameters
    optimizer = make_optimizer(model, settings["lr"], 0.05, lr_scale=dict.fromkeys(GEN_PATH, settings["gen_lr_scale"]))

    local = settings["batch_size"] // world

    def batch_fn(step, micro):
        # the global batch of this step, a function of (seed, step) only; this process's share
        rng = random.Random(f"{args.stage}-{args.seed}-{step}")
        if args.stage == "base":
            mix, easy = base_phase(settings, step)
            task, exs = base_batch(rng, mix, settings["batch_size"], by_cat, cfg.image_size, easy=easy, grid=cfg.scene_grid)
        else:
            task, exs = sft_batch(rng, settings, chosen, pool, cfg.image_size, args.depth, cfg.scene_grid)
        exs = finish_examples(exs[rank * local:(rank + 1) * local], vq)
        return collate_groups([build_seq(ex, tok, cfg.image_tokens) for ex in exs], tok, dev, grouped=not sharded(model)), task

    per_cat = args.eval_prompts or preset["eval_prompts"]
    val = shapes.per_category(splits["val"], per_cat)
    validate, measure, curve = learning_curve(model, vq, tok, val, args.stage, master)
    model.train()
    step, seconds, _ = fit(batch_fn, loss_fn, optimizer, model.parameters(), {"model": model}, plan, state_path,
                           f"{args.stage}_state", settings, state=st, evaluate=validate,
                           extra_state=(lambda: {"curve": list(curve)}, lambda saved: curve.extend(saved.get("curve", []))))
    full = gathered(model)  # every rank: under FSDP a collective
    if master:
        if not args.no_final_eval and (not curve or curve[-1]["step"] < step):
            measure(full, step, seconds)
        finish_stage(args, full, vq, tok, settings, inputs, step, seconds, shapes.per_category(splits["test"], preset["test_prompts"]), curve)
    if world > 1:
        dist.destroy_process_group()


def learning_curve(model, vq, tok, val, stage, master=True):
    """fit's evaluate hook, the measurement it makes and the curve it fills: held-out (val)
    first-image accuracy and judge AUC within category against training seconds, every eval_every
    steps and at the end (the list travels in the resumable state)."""
    curve = []

    def measure(m, step, seconds):
        m.eval()
        r = quick_eval(m, vq, tok, val, stage, m.cfg.image_size)
        m.train()
        curve.append(dict(step=step, seconds=round(seconds, 1), first=r["first"], judge_auc_wc=r["judge_auc_wc"]))
        return r

    def validate(step, seconds):  # on every rank (gathering FSDP's shards is a collective); rank 0 measures
        full = gathered(model)
        return measure(full, step, seconds) if master else None
    return validate, measure, curve


def finish_stage(args, model, vq, tok, settings, inputs, step, seconds, test, curve=()):
    """The stage's artefact (OUT/{stage}.pt) and its evaluation on the test split, with the receipt."""
    model.eval()
    ckpt_path = os.path.join(args.out, f"{args.stage}.pt")
    save_checkpoint(janus_checkpoint(model, vq, tok, stage=args.stage, settings=settings, step=step), ckpt_path)
    print(f"wrote {ckpt_path} ({seconds:.0f} s of training)")
    if not args.no_final_eval:
        result = final_eval(model, vq, tok, test, args.stage, model.cfg.image_size)
        # the receipt run.py checks before reusing this stage: config, settings, what it was built from
        result.update(stage=args.stage, config=args.config, steps=step, train_seconds=round(seconds, 1), curve=list(curve),
                      made=stage_receipt(args.out, args.config, settings, inputs), ckpt=digest(ckpt_path))
        write_json(result, os.path.join(args.out, f"{args.stage}_eval.json"))
        print(json.dumps(result))


def save_pool(pool, base_digest, path):
    texts = list(pool)
    flat = [(i, s) for i, t in enumerate(texts) for s in pool[t]]
    save_checkpoint({"kind": "sft_pool", "texts": texts, "base": base_digest,
                     "prompt": torch.tensor([i for i, _ in flat]),
                     "codes": torch.tensor([s[0] for _, s in flat]),
                     "images": torch.from_numpy(np.stack([s[1] for _, s in flat])),
                     "verdict": torch.tensor([s[2] for _, s in flat]),
                     "reasons": [s[3] for _, s in flat]}, path)


def load_pool(path, prompts, base_digest):
    """The SFT data built earlier, or None (to rebuild it) when there is none or it was built from
    another base.pt or for other prompts: it is a cache of this stage's own."""
    if not os.path.isfile(path):
        return None
    d = load_checkpoint(path, {"kind": "sft_pool"})
    if d.get("base") != base_digest or set(d["texts"]) != {p.text for p in prompts}:
        print(f"{path} was built from another base.pt or for other prompts: rebuilding it")
        return None
    pool = {t: [] for t in d["texts"]}
    for i, c, im, v, r in zip(d["prompt"].tolist(), d["codes"].tolist(), d["images"].numpy(), d["verdict"].tolist(), d["reasons"]):
        pool[d["texts"][i]].append((c, im, v, r))
    return pool


if __name__ == "__main__":
    main()
