"""
Stage 2 of the method (SPEC.md section 5): GRPO over the introspective chain.

Per prompt, G chains are sampled from the current policy (sample.introspect, two rounds):
    image 1 (CFG, temperature 1) -> forced Yes/No + reason (temperature 1) -> on No, image 2
    drawn with the reflection in context. The final image is image 1 on Yes, image 2 on No.
Each chain earns three rewards from a judge R(image, prompt) in [0, 1] (default: the ShapeWorld
checker's soft score, the fraction of the prompt's facts that hold; --reward verdict: its verdict,
1 or 0; --reward judge: a trained model's P(yes) from judge.p_yes, the paper's model-as-reward-model):
    segment 0, image 1's tokens:            r0 = R(I1)
    segment 1, the verdict + reason tokens: r1 = 1 - |R(I1) - SE|   (SE = 1 if the model said Yes)
    segment 2, the final image's tokens:    r2 = R(final); on Yes that is image 1 again, credited
                                            in its own context
On toy (and tiny) r1 reads R(I1) as the checker's verdict, 1[R(I1) = 1] (--verdicts strict): with the
soft score a Yes to an image with two of three facts right earns 0.67, and the toy judge drifts to
saying Yes to everything (docs/experiments.md). The other presets keep the paper's r1.
Each segment's rewards are normalised within the group, A = (r - mean) / (std + 1e-4), and
broadcast to that segment's tokens. Loss per token: the PPO-clipped ratio times A, plus beta times
the k3 estimate of KL to the frozen SFT model; a mean over a segment's tokens, then over chains,
then over segments. With one update per rollout the ratio is 1: REINFORCE with a group baseline.
beta may differ per segment: toy weighs the verdict and reason's KL 10x the images' (0.4 against 0.04);
they stay nearer SFT (KL 0.03-0.04 a token against 0.08-0.20), the judge drifts less, and the images
train as at 0.04 (docs/experiments.md, section 46).

Image log-probs come from the CFG-combined logits at temperature 1, w * l_c + (1 - w) * l_u: the
distribution the tokens were drawn from. (The released code uses l_c - ((w-1)/w) l_u, the same
logits divided by w, i.e. the guided distribution at temperature w: not the one it samples from.)
Text log-probs come from the text head, the verdict's over {Yes, No} only, as it was sampled.

    python rl.py --config toy --out out/toy          # reads sft.pt, writes rl.pt and rl_eval.json
    python rl.py --config tiny --out out/tiny --segments 0   # ablation: T2I GRPO on image 1 only
    torchrun --nproc_per_node 8 rl.py --config small --out out/small --parallel fsdp   # each GPU its share of the prompts
    python rl.py --init path/to/Janus-Pro-7B --config janus-pro-7b --out out/real   # from a released model folder
"""

import argparse
import json
import os
import random
import time
from types import SimpleNamespace

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import shapes
from common import (DTYPE_HELP, Parser, add_attention_arg, bounded, check_run_dir, digest, fraction, load_state, nonneg_float,
                    pos_float, pos_int, run_cli, save_checkpoint, stage_receipt, to_tensor, to_uint8, use_bf16, weights_list,
                    write_json)
from evaluate import evaluate_editing, final_eval
from judge import p_yes
from model import PRESETS, JanusConfig
from sample import (Options, add_answer, add_reflection, cfg_logits, collate, collate_groups, edit, edit_seq, embed_batch,
                    introspect, janus_checkpoint, load_janus, prompt_seq, selfcheck_seq)
from sft import category_weights, group, train_prompt
from tokenizer import TextTokenizer
from train import Plan, add_parallel_args, distribute, fit, gathered, make_optimizer, setup_distributed, sharded

TRAIN = {
    # prompts x group = chains per rollout; reason: tokens after Yes/No (EOS included). toy (the grid
    # world, 16 image tokens): a step of 32 chains takes ~0.9 s on 2 cores with native bf16 (~3.4 s in fp32
    # on an AVX2-only CPU); 480 steps (7-8 min here) put RL's final image 0.10-0.12 above SFT's over three
    # seeds, 120 steps 0.07-0.09 (docs/experiments.md, "RL: what ten minutes buy")
    # toy, tiny: segment 1 paid against the checker's verdict (--verdicts strict): with the paper's r1 the
    # toy judge drifts to Yes. From a 500-step SFT: AUC within category 0.70 against 0.53 (two seeds),
    # final image 0.02 lower; from the 800-step SFT: balanced accuracy 0.81 against 0.52, AUC within
    # category 0.54 against 0.62, the same final image (one seed; docs/experiments.md, "A longer SFT")
    # beta per segment (image 1, verdict + reason, final image). toy 0.4 on the verdict and reason: at 0.04 the
    # verdict and reason drift from SFT's (KL 0.08-0.20 a token) and the judge's AUC within category on the
    # balanced set lands at 0.754-0.784 over three seeds; at 0.4 (KL 0.03-0.04) at 0.784-0.785, the images as at
    # 0.04 (docs/experiments.md, "RL: the judge held to SFT")
    # edit_share: toy 0.25, a quarter of the rollouts editing ones, so that RL trains the editing SFT taught
    # (after SFT 0.58 / 0.64, after RL 0.63 / 0.69; docs/experiments.md, "Editing in SFT and RL")
    # category_weights: toy draws the chain's prompts where its images still fail (compositional 44%,
    # position 22%, counting 15%, the four that SFT already draws right 4-7% each): over three seeds
    # of 480 steps the final image 0.896-0.913 against 0.880-0.899 uniform, the judge's balanced
    # accuracy on its own images 0.75-0.83 against 0.59-0.71, its AUC within category 0.78-0.83
    # against 0.77-0.87 (docs/experiments.md, "RL: the failing categories drawn more often, at 480 steps")
    "tiny": dict(steps=6, prompts=2, group=4, lr=1e-4, warmup=1, beta=(0.04,) * 3, reason=8, eval_prompts=4, verdicts="strict", edit_share=0.0,
             category_weights={}),
    "toy": dict(steps=480, prompts=4, group=8, lr=5e-5, warmup=5, beta=(0.04, 0.4, 0.04), reason=24, eval_prompts=100, verdicts="strict",
                edit_share=0.25, category_weights={"single": 0.25, "two": 0.25, "colour": 0.25, "colour_attr": 0.5, "position": 1.5,
                                                   "compositional": 3.0}),
    "small": dict(steps=400, prompts=16, group=8, lr=5e-6, warmup=20, beta=(0.04,) * 3, reason=24, eval_prompts=50, edit_share=0.0,
              category_weights={}),
    # a released model (--init FOLDER) on ShapeWorld prompts: the paper's batch (16 x 8 chains), warmup
    # and first learning rate (SPEC.md section 5; its 3K steps decay in steps, ours by cosine)
    "janus-pro-1b": dict(steps=3000, prompts=16, group=8, lr=6e-6, warmup=100, beta=(0.04,) * 3, reason=64, eval_prompts=50, edit_share=0.0,
                         category_weights={}),
    "janus-pro-7b": dict(steps=3000, prompts=16, group=8, lr=6e-6, warmup=100, beta=(0.04,) * 3, reason=64, eval_prompts=50, edit_share=0.0,
                         category_weights={}),
}
SEGMENTS = ("image 1", "verdict + reason", "final image")

# -----------------------------------------------------------------------------
# Rewards and advantages (the quantities of SPEC.md section 5, as plain tensors)


def chain_rewards(r1, yes, r_final):
    """(C,) judge scores of image 1, verdicts (bool) and judge scores of the final image -> (C, 3).

    >>> chain_rewards(torch.tensor([0.5, 1.0]), torch.tensor([False, True]), torch.tensor([1.0, 1.0]))
    tensor([[0.5000, 0.5000, 1.0000],
            [1.0000, 1.0000, 1.0000]])
    """
    return torch.stack([r1, 1 - (r1 - yes.float()).abs(), r_final], 1)


def balanced_verdicts(rewards, yes, group):
    """rewards (C, 3) from chain_rewards, yes (C,) -> rewards with segment 1 paid by balanced accuracy
    within each group: a Yes earns R / (2 mean R), a No (1 - R) / (2 mean (1 - R)), means over its
    group (R = image 1's score). A judge that ignores the image then earns 0.5 on average whatever
    the group's share of right images, a perfect one 1: saying the majority answer pays nothing,
    only reading the image does (the plain r1 drifts to Yes as the images improve).

    >>> balanced_verdicts(torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 1.0, 0.0]]),
    ...                   torch.tensor([True, False, True, False]), 4)[:, 1]
    tensor([0.6667, 0.0000, 0.6667, 2.0000])
    """
    r = rewards[:, 0].reshape(-1, group)
    y = yes.reshape(-1, group).float()
    pos = r.mean(1, keepdim=True).clamp(min=1e-6)
    neg = (1 - r).mean(1, keepdim=True).clamp(min=1e-6)
    out = rewards.clone()
    out[:, 1] = (y * r / (2 * pos) + (1 - y) * (1 - r) / (2 * neg)).reshape(-1)
    return out


def strict_verdicts(rewards, yes):
    """rewards (C, 3) from chain_rewards (checker scores), yes (C,) -> segment 1 paid against the
    checker's verdict of image 1 (its score is 1) instead of its soft score: r1 = 1 - |1[R(I1) = 1] - SE|.
    The soft score pays a Yes 0.67 on an image with two of three facts right, which the checker calls
    wrong; here that Yes earns 0 and the No 1. Images keep their soft-score rewards.

    >>> strict_verdicts(torch.tensor([[2 / 3, 2 / 3, 1.0], [2 / 3, 1 / 3, 1.0], [1.0, 1.0, 1.0]]),
    ...                 torch.tensor([True, False, True]))[:, 1]
    tensor([0., 1., 1.])
    """
    out = rewards.clone()
    out[:, 1] = 1 - ((rewards[:, 0] >= 1).float() - yes.float()).abs()
    return out


def pay_verdicts(rewards, yes, group, how):
    # segment 1's pay, --verdicts: plain (SPEC.md's r1, as chain_rewards computes it), balanced, strict
    if how == "balanced":
        return balanced_verdicts(rewards, yes, group)
    return strict_verdicts(rewards, yes) if how == "strict" else rewards


def group_advantages(rewards, group):
    """rewards (C, S), C = prompts x group chains in prompt order -> advantages (C, S): each
    segment normalised within its group, (r - mean) / (std + 1e-4) (std over the group, not
    unbiased). A group whose chains all earned the same reward gives 0: it teaches nothing.

    >>> group_advantages(torch.tensor([[1.0], [0.0], [0.5], [0.5]]), 2)
    tensor([[ 0.9998],
            [-0.9998],
            [ 0.0000],
            [ 0.0000]])
    """
    r = rewards.reshape(-1, group, rewards.size(-1))  # (P, G, S)
    a = (r - r.mean(1, keepdim=True)) / (r.std(1, unbiased=False, keepdim=True) + 1e-4)
    return a.reshape(rewards.shape)


def grpo_loss(logp, old, ref, adv, mask, eps=0.2, beta=0.04):
    """The GRPO objective. logp, old, ref: (C, S, L) per-token log-probs of the sampled tokens under
    the policy, the policy that sampled them and the frozen reference; adv (C, S); mask (C, S, L)
    True on real tokens (masked tokens add nothing); beta: one weight, or one per segment (S,).
    Returns the loss and, per segment, the mean k3 KL (C, S) -> (S,).
    Per token: -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + beta (exp(ref - logp) - (ref - logp) - 1);
    a mean over a segment's tokens, then over chains, then over segments."""
    ratio = (logp - old).exp()
    a = adv[..., None]
    pg = -torch.minimum(ratio * a, ratio.clamp(1 - eps, 1 + eps) * a)
    d = ref - logp
    kl = d.exp() - d - 1  # k3: unbiased for KL(policy || ref), never negative
    m = mask.float()
    n = m.sum(-1).clamp(min=1)  # (C, S)
    beta = torch.as_tensor(beta, dtype=kl.dtype, device=kl.device).reshape(-1, 1)  # (S or 1, 1): per segment
    assert beta.size(0) in (1, kl.size(1)), f"{beta.size(0)} KL weights for {kl.size(1)} segments"
    per_seg = ((pg + beta * kl) * m).sum(-1) / n  # (C, S)
    return per_seg.mean(0).mean(), ((kl * m).sum(-1) / n).mean(0).detach()


# -----------------------------------------------------------------------------
# Rollouts: chains from sample.py, their training sequences from sample.py's layouts


def checker_reward(images, prompts):
    return torch.tensor([shapes.check(im, p).score for im, p in zip(images, prompts)])


def verdict_reward(images, prompts):
    # 1 when every fact holds, else 0: the verdict reward then pays Yes only on a right image
    return torch.tensor([float(shapes.check(im, p).verdict) for im, p in zip(images, prompts)])


def make_reward(args, tok, dev):
    """R(images, prompts) -> (n,) in [0, 1] for --reward: the checker's soft score or verdict, or a
    trained model's P(yes) (--judge-ckpt, the paper's model-as-reward-model)."""
    if args.reward == "judge":
        judge, _, _, _ = load_janus(args.judge_ckpt, dev)
        return lambda images, prompts: p_yes(judge, tok, images, prompts)
    return verdict_reward if args.reward == "verdict" else checker_reward


@torch.no_grad()
def rollout(model, vq, tok, prompts, seeds, opt, reward, regen="reflect", truth=False, redraw=False):
    """Chains for prompts (each repeated G times by the caller) -> a plain dict of lists and tensors
    (what the loss needs, and what a resumed run reloads): codes of image 1 and of the final image,
    the answer ids (verdict first, and whether its EOS was sampled), verdicts, rewards (C, 3).
    regen="plain": after a No, image 2 is a fresh sample from the prompt alone (the loop without
    reflection: the ablation that separates reflection from judge-guided resampling). truth: also
    the checker's answer on each image 1 (--judge-sft teaches it). redraw: every verdict forced to No
    (the reason sampled after it), a one-segment rollout (task "redraw") that scores image 2 only:
    R(image 2), the regeneration trained on every chain (--redraw-share)."""
    model.eval()
    chains = introspect(model, vq, tok, prompts, seeds, Options(cfg=opt.cfg, rounds=1 if regen == "plain" else 2,
                                                              text_temperature=1.0, max_reason=opt.max_reason,
                                                              force_no=redraw))
    yes = torch.tensor([c.verdicts[0] == "yes" for c in chains])
    if regen == "plain":  # image 2 from the prompt alone, with its own seed
        redo = [i for i, c in enumerate(chains) if not yes[i]]
        if redo:
            again = introspect(model, vq, tok, [prompts[i] for i in redo], [seeds[i] + 7919 for i in redo],
                               Options(cfg=opt.cfg, rounds=1, text_temperature=1.0, max_reason=opt.max_reason))
            for i, c in zip(redo, again):
                chains[i].images.append(c.images[0])
                chains[i].codes.append(c.codes[0])
    first = [c.images[0] for c in chains]
    final = [c.images[-1] for c in chains]
    if redraw:
        model.train()
        return {"task": "redraw", "prompts": list(prompts), "codes1": [c.codes[0] for c in chains],
                "codes2": [c.codes[-1] for c in chains], "answers": [c.reason_ids[0] for c in chains],
                "rewards": reward(final, prompts)[:, None]}
    r1 = reward(first, prompts)
    r_final = torch.where(yes, r1, reward(final, prompts))
    model.train()
    return {"prompts": list(prompts), "codes1": [c.codes[0] for c in chains], "codes2": [c.codes[-1] for c in chains],
            "truth": [shapes.check(im, p).reason for im, p in zip(first, prompts)] if truth else None,
            "answers": [c.reason_ids[0] for c in chains],
            "eos": [len(c.reason_ids[0]) - 1 < opt.max_reason for c in chains],  # cut at the limit: no EOS drawn
            "yes": yes, "rewards": chain_rewards(r1, yes, r_final), "regen": regen}


@torch.no_grad()
def rollout_edit(model, vq, tok, edits, seeds, opt, weights):
    """Editing RL (one segment, the edited image): ShapeWorld edits (source scene, instruction),
    each repeated G times by the caller -> the rollout dict. Reward: weights[0] * follow +
    weights[1] * preserve (the checker's score_edit; too little weight on follow teaches copying)."""
    model.eval()
    sources = [shapes.render(src) for src, _, _ in edits]
    images, codes = edit(model, vq, tok, sources, [e.text for _, e, _ in edits], seeds, Options(cfg=opt.cfg))
    scores = [shapes.score_edit(s, im, e) for s, im, (_, e, _) in zip(sources, images, edits)]
    model.train()
    reward = torch.tensor([[weights[0] * f + weights[1] * p] for f, p in scores])
    src_codes = vq.encode(to_tensor(np.stack(sources)).to(next(vq.parameters()).device))
    return {"task": "edit", "prompts": [e.text for _, e, _ in edits], "src": src_codes.tolist(), "codes1": codes.tolist(),
            "rewards": reward, "follow": torch.tensor([f for f, _ in scores]), "preserve": torch.tensor([p for _, p in scores])}


def chain_seqs(ro, tok, vq, n_tokens):
    """The training sequences of a rollout, built by sample.py's layout functions, so the loss reads
    every token in exactly the context it was drawn in. Returns (cond rows, uncond twins of the image
    rows, which row scores which segment of which chain)."""
    if ro.get("task") == "edit":  # one segment: the edited image after the source (VQ path) and instruction
        rows = [edit_seq(tok, src, ins).gen_image(tok, c, w=1.0) for src, ins, c in zip(ro["src"], ro["prompts"], ro["codes1"])]
        return rows, [r.uncond(tok, False) for r in rows], [(c, 0, c, "image") for c in range(len(rows))]
    if ro.get("task") == "redraw":  # one segment: image 2 after image 1 and its forced No + reason, as in a chain
        rows = [reflected_seq(tok, p, c1, ans, c2) for p, c1, ans, c2 in zip(ro["prompts"], ro["codes1"], ro["answers"], ro["codes2"])]
        return rows, [r.uncond(tok, False) for r in rows], [(c, 0, c, "image") for c in range(len(rows))]
    images1 = _decode(vq, ro["codes1"])
    rows, twins, where = [], [], []  # where: (chain, segment, row index, kind)
    for c, (p, c1, ans) in enumerate(zip(ro["prompts"], ro["codes1"], ro["answers"])):
        s0 = prompt_seq(tok, p).gen_image(tok, c1, w=1.0)
        where.append((c, 0, len(rows), "image"))
        rows.append(s0)
        twins.append(s0.uncond(tok, True))
        s1 = selfcheck_seq(tok, p, images1[c], n_tokens).add(ans + ([tok.eos] if ro["eos"][c] else []), w=1.0)
        where.append((c, 1, len(rows), "text"))
        rows.append(s1)
        twins.append(None)
        if ro["yes"][c]:  # the final image is image 1: its tokens again, in their own context
            where.append((c, 2, where[-2][2], "image"))
            continue
        if ro["regen"] == "plain":
            s2 = prompt_seq(tok, p).gen_image(tok, ro["codes2"][c], w=1.0)
            twin = s2.uncond(tok, True)
        else:
            s2 = reflected_seq(tok, p, c1, ans, ro["codes2"][c])
            twin = s2.uncond(tok, False)  # a regeneration pads only the user's words
        where.append((c, 2, len(rows), "image"))
        rows.append(s2)
        twins.append(twin)
    return rows, twins, where


def reflected_seq(tok, prompt, codes1, answer, codes2):
    # image 2 (scored, weight 1) after the prompt, image 1 and its verdict + reason: a chain's regeneration
    return add_reflection(prompt_seq(tok, prompt).gen_image(tok, codes1), tok, answer).gen_image(tok, codes2, w=1.0)


def _decode(vq, codes):
    dev = next(vq.parameters()).device
    return list(to_uint8(vq.decode(torch.tensor(codes, device=dev))))


def token_logps(model, tok, rows, twins, where, cfg_w, n_seg, grouped=True):
    """Per-token log-probs of the sampled tokens, (C, S, L) with a mask, from all rows (cond rows,
    then the uncond twins of image rows) in one forward per length group (grouped=False: one
    forward, as a model sharded by FSDP needs; collate_groups). Images: log_softmax of the CFG-combined
    logits; text: the text head over the tokenizer's vocabulary, the verdict over {Yes, No}."""
    img_rows = [i for i, t in enumerate(twins) if t is not None]
    dev = next(model.parameters()).device
    at = {}  # row -> (hidden states (T_g, D), its text targets (T_g,), its image targets (T_g,))
    for b in collate_groups(rows + [twins[i] for i in img_rows], tok, dev, grouped):
        h = model(embed_batch(model, b))
        at.update((r, (h[j], b.text_targets[j], b.image_targets[j])) for j, r in enumerate(b.rows))
    R, out = len(rows), {}
    for k, i in enumerate(img_rows):
        hr, _, targets = at[i]
        pos = (targets >= 0).nonzero()[:, 0]  # the uncond twin has the same length: the same positions
        g = cfg_logits(model.image_logits(hr[pos]), model.image_logits(at[R + k][0][pos]), cfg_w)
        out[i] = F.log_softmax(g, -1).gather(-1, targets[pos][:, None])[:, 0]
    for i, t in enumerate(twins):
        if t is None:
            hr, targets, _ = at[i]
            sel = targets >= 0
            logits = model.text_logits(hr[sel])
            logits[:, len(tok):] = float("-inf")  # as decode_text samples
            lp = F.log_softmax(logits, -1).gather(-1, targets[sel][:, None])[:, 0]
            verdict = F.log_softmax(logits[:1, [tok.yes, tok.no]], -1)  # the first answer token: Yes or No only
            first = targets[sel][0]
            out[i] = torch.cat([verdict[0, 0 if first == tok.yes else 1].reshape(1), lp[1:]])
    C = 1 + max(c for c, _, _, _ in where)
    L = max(len(v) for v in out.values())
    logp = torch.zeros(C, n_seg, L, device=dev)
    mask = torch.zeros(C, n_seg, L, dtype=torch.bool, device=dev)
    for c, s, i, _ in where:
        if s < n_seg:
            logp[c, s, :len(out[i])] = out[i]
            mask[c, s, :len(out[i])] = True
    return logp, mask


def judge_sft_loss(model, tok, vq, ro, n_tokens, group):
    """--judge-sft: Task II's loss (SPEC.md section 4) on the rollout's own first images, answered
    by the checker, so that the judge learns on exactly the images the policy draws now (RL alone
    pays whatever answer a group's majority earns). Within each group (one prompt) the Yes-answered
    and the No-answered chains weigh half each, and a group whose images all got one answer weighs
    nothing: the prompt alone never tells the answer; a mean over groups. On toy the judge read no
    better (docs/experiments.md, "RL: the judge taught on its own rollouts")."""
    yes = torch.tensor([a.startswith("Yes") for a in ro["truth"]]).reshape(-1, group)  # (P, G)
    n_yes = yes.sum(1, keepdim=True)
    mixed = (n_yes > 0) & (n_yes < group)  # (P, 1)
    share = torch.where(yes, 0.5 / n_yes.clamp(min=1), 0.5 / (group - n_yes).clamp(min=1)) * mixed
    share = share.reshape(-1) / mixed.sum().clamp(min=1)  # (C,)
    # only the mixed groups' chains weigh: only they are run; with none, one chain of share 0 still is
    # (under FSDP every process must run as many forwards)
    keep = share.nonzero().flatten().tolist() or [0]
    dev = next(model.parameters()).device
    images1 = _decode(vq, [ro["codes1"][i] for i in keep])
    rows = [add_answer(selfcheck_seq(tok, ro["prompts"][i], im, n_tokens), tok, ro["truth"][i], 0.8, 0.2)
            for i, im in zip(keep, images1)]
    b = collate(rows, tok, dev)
    losses = model.token_losses(model(embed_batch(model, b)), b.text_targets, b.image_targets)  # (K, T)
    return ((losses * b.weights).sum(1) * share[keep].to(dev)).sum()  # Task II's loss of each kept chain, weighed


# -----------------------------------------------------------------------------
# The stage: rollouts -> rewards -> advantages -> updates, through train.fit


def step_stats(ro, adv, kl, group):
    """What a researcher watches: mean reward per segment, the Yes rate, how often image 2 beat
    image 1 (among the chains that redrew), the KL per segment, the share of groups with nothing
    to learn (every chain the same reward in every segment)."""
    r = ro["rewards"]
    flat = (adv.reshape(-1, group, adv.size(-1)).abs().sum((1, 2)) == 0).float().mean().item()
    if ro.get("task") in ("edit", "redraw"):  # one segment: an edited image, or image 2 after a forced No
        one = {"reward": [round(r.mean().item(), 4)], "kl": [round(v, 5) for v in kl.tolist()],
               "flat_groups": round(flat, 3), "rollout_image_tokens_s": round(ro["tok_s"], 1)}
        if ro["task"] == "redraw":
            return dict(one, redraw=1)
        return dict(one, follow=round(ro["follow"].mean().item(), 3), preserve=round(ro["preserve"].mean().item(), 3))
    redrew = ~ro["yes"]
    return {"reward": [round(v, 4) for v in r.mean(0).tolist()], "yes": round(ro["yes"].float().mean().item(), 3),
            "better": round(((r[:, 2] > r[:, 0]) & redrew).float().sum().item() / max(1, int(redrew.sum())), 3),
            "kl": [round(v, 5) for v in kl.tolist()], "flat_groups": round(flat, 3),
            "rollout_image_tokens_s": round(ro["tok_s"], 1)}


def everyone(ro, kl, world):
    """Every process's chains (their per-chain fields gathered) and the KL averaged over the
    processes: a step's statistics cover all its chains, not rank 0's alone."""
    if world == 1:
        return ro, kl
    keys = [k for k in ("rewards", "yes", "adv", "follow", "preserve") if k in ro]
    parts = [None] * world
    dist.all_gather_object(parts, {k: ro[k] for k in keys})
    kl = kl.detach().clone()
    dist.all_reduce(kl)
    return dict(ro, **{k: torch.cat([p[k] for p in parts]) for k in keys}), kl / world


def draw_rollout(model, vq, tok, settings, k, rank, local, by_cat, reward):
    """Rollout k of this process: its share of the step's prompts (or edits), each G times, drawn
    by the current policy; the prompts and the seeds are a function of (seed, k) only."""
    rng, G, t0 = random.Random(f"rl-{settings['seed']}-{k}"), settings["group"], time.time()
    opt = SimpleNamespace(cfg=settings["cfg"], max_reason=settings["reason"])
    # an editing rollout (--task edit, or a share of a chain run's): the same draw on every process
    if settings["task"] == "edit" or (settings["edit_share"] and rng.random() < settings["edit_share"]):
        edits = [shapes.sample_edit(rng, model.cfg.image_size, grid=model.cfg.scene_grid) for _ in range(settings["prompts"])]
        edits = [e for e in edits[rank * local:(rank + 1) * local] for _ in range(G)]
        ro = rollout_edit(model, vq, tok, edits, _seeds(settings["seed"], k, rank, len(edits)), opt, settings["edit_weights"])
        drawn = len(edits)
    else:
        # a redraw rollout (a share of a chain run's, --redraw-share): every verdict No, image 2 scored
        redraw = bool(settings["redraw_share"]) and rng.random() < settings["redraw_share"]
        prompts = [train_prompt(rng, by_cat, settings["category_weights"]).text for _ in range(settings["prompts"])]
        prompts = [p for p in prompts[rank * local:(rank + 1) * local] for _ in range(G)]
        ro = rollout(model, vq, tok, prompts, _seeds(settings["seed"], k, rank, len(prompts)), opt, reward, settings["regen"],
                     truth=settings["judge_sft"] > 0, redraw=redraw)
        drawn = len(prompts) + (len(prompts) if redraw else int((~ro["yes"]).sum()))
    # rollouts are most of a step: image tokens drawn per second (CFG rows counted once)
    ro["tok_s"] = model.cfg.image_tokens * drawn / (time.time() - t0)
    return ro


def score_rollout(ro, sampler, ref, tok, vq, settings, n_seg, k):
    """A drawn rollout -> the same dict with what its updates need: "adv" (C, n_seg), each segment's
    rewards normalised within its group; "ref" (C, n_seg, L), the frozen SFT model's log-probs of the
    sampled tokens; "old", the sampling weights' (None at one update per rollout: ratio 1)."""
    G = settings["group"]
    paid = pay_verdicts(ro["rewards"], ro.get("yes"), G, settings["verdicts"] if "yes" in ro else "plain")
    ro["adv"] = group_advantages(paid[:, :n_seg], G)
    with torch.no_grad():
        rows = chain_seqs(ro, tok, vq, sampler.cfg.image_tokens)
        # one update per rollout: old = the loss's own log-probs, detached (loss_fn); ~10% of a toy step saved
        ro["old"] = token_logps(sampler, tok, *rows, settings["cfg"], n_seg)[0] if settings["updates"] > 1 else None
        ro["ref"], _ = token_logps(ref, tok, *rows, settings["cfg"], n_seg)
    ro["k"] = k
    return ro


def _seeds(seed, k, rank, n):
    # one seed per chain of rollout k: the same chains whatever the number of processes
    return [(seed * 1_000_003 + k * 10_007 + rank * n + i) % 2**31 for i in range(n)]


def finish(args, model, vq, tok, settings, step, seconds, curve, per_cat):
    """OUT/rl.pt, and its evaluation on the test split (the loop, first vs final) with the receipt."""
    model.eval()
    path = os.path.join(args.out, "rl.pt")
    save_checkpoint(janus_checkpoint(model, vq, tok, stage="rl", settings=settings, step=step), path)
    print(f"wrote {path} ({seconds:.0f} s of training)")
    if args.no_final_eval:
        return
    test = shapes.per_category(shapes.make_splits(seed=0)["test"], per_cat)
    result = final_eval(model, vq, tok, test, "sft", model.cfg.image_size)
    # editing goes through ShapeWorld's word vocabulary (sample.py): not for a released model's tokenizer
    result["edit"] = evaluate_editing(model, vq, tok, len(test)) if isinstance(tok, TextTokenizer) else None
    result.update(stage="rl", config=args.config, steps=step, train_seconds=round(seconds, 1), curve=curve,
                  made=stage_receipt(args.out, args.config, settings, () if args.init else ("sft.pt",)), ckpt=digest(path))
    write_json(result, os.path.join(args.out, "rl_eval.json"))
    print(json.dumps({k: result[k] for k in ("first", "final", "judge")}))


def segment_betas(text):
    """--beta: '0.04' -> [0.04, 0.04, 0.04]; '0.04,0.4,0.04' -> one per segment (image 1, verdict + reason,
    final image). A run of one segment (--segments 0, --task edit: an image) takes the first."""
    vals = [nonneg_float(v) for v in text.split(",")]  # argparse's error names a bad number
    if len(vals) not in (1, 3):
        raise argparse.ArgumentTypeError(f"one number, or three separated by commas (one per segment), got {text!r}")
    return vals * 3 if len(vals) == 1 else vals


def main(argv=None):
    ap = Parser(description="GRPO over the introspective chain (SPEC.md section 5), from OUT/sft.pt.")
    ap.add_argument("--config", choices=list(TRAIN), default="toy", help="model preset and run settings")
    ap.add_argument("--out", required=True, help="run folder: reads sft.pt, writes rl.pt, rl_eval.json (rl_state.pt while training)")
    ap.add_argument("--init", help="start from this instead of OUT/sft.pt: a Janus checkpoint, or a released model folder "
                    "(official or transformers layout with its tokenizer.json, e.g. Janus-Pro-7B; --config janus-pro-7b "
                    "picks the run settings); rl.pt then carries its tokenizer")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts and of every rollout")
    # optimisation (defaults from TRAIN[config])
    ap.add_argument("--steps", type=pos_int, help="optimizer steps")
    ap.add_argument("--prompts", type=pos_int, help="prompts per rollout, over all processes")
    ap.add_argument("--group", type=pos_int, help="chains per prompt (G)")
    ap.add_argument("--lr", type=pos_float, help="peak AdamW learning rate")
    ap.add_argument("--beta", type=segment_betas,
                    help="weight of the k3 KL to the SFT model (0 allowed): one for every segment, or three (image 1, "
                    "verdict + reason, final image; a one-segment run, --segments 0 or --task edit, takes the first); toy "
                    "0.04,0.4,0.04, the other presets 0.04 on all three")
    ap.add_argument("--clip-eps", type=fraction, default=0.2, help="PPO clip range of the ratio")
    ap.add_argument("--updates-per-batch", type=pos_int, default=1, help="optimizer steps per rollout batch (1: ratio 1, REINFORCE)")
    ap.add_argument("--cfg", type=nonneg_float, help="guidance weight of the rollouts' images (default: the preset's, "
                    "5 but toy 2)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help=DTYPE_HELP)
    # what is rewarded
    ap.add_argument("--reward", choices=["checker", "verdict", "judge"], default="checker",
                    help="checker: the ShapeWorld checker's soft score (the share of facts that hold); verdict: "
                    "its verdict, 1 or 0; judge: --judge-ckpt's P(yes)")
    ap.add_argument("--judge-ckpt", help="a Janus checkpoint whose P(yes) is the reward (with --reward judge)")
    ap.add_argument("--verdicts", choices=["plain", "balanced", "strict"],
                    help="segment 1's reward: plain r1 = 1 - |R(I1) - SE| (SPEC.md); balanced: Yes and No paid by "
                    "balanced accuracy within the group, so that the majority answer earns nothing (rl.balanced_verdicts); "
                    "strict: r1 = 1 - |1[R(I1) = 1] - SE|, against the checker's verdict, not its soft score (rl.strict_verdicts). "
                    "Default: the preset's (toy, tiny: strict where the rewards are the checker's; else plain)")
    ap.add_argument("--judge-sft", type=nonneg_float, default=0.0,
                    help="weight of Task II's loss on the rollouts' own first images answered by the checker, Yes and No "
                    "balanced within each group (rl.judge_sft_loss), added to the GRPO loss; 0 (default, the paper): none. "
                    "On toy it did not make the judge read its images better (docs/experiments.md)")
    ap.add_argument("--task", choices=["chain", "edit"], default="chain",
                    help="chain: the introspective chain (SPEC.md section 5); edit: editing RL on ShapeWorld edits")
    ap.add_argument("--edit-share", type=bounded(float, 0, 1),
                    help="chain runs: share of the rollouts, 0 to 1, that are editing rollouts instead (--task edit's), so "
                    "that RL on the chain keeps (and trains) the editing SFT taught; default: the preset's (toy 0.25, others 0)")
    ap.add_argument("--redraw-share", type=bounded(float, 0, 1), default=0.0,
                    help="chain runs: share of the rollouts, 0 to 1, whose verdicts are all forced to No, image 2 drawn "
                    "after the reason and scored alone (one segment): the regeneration trained on every chain, where "
                    "the chain trains it only after a No; 0 (default, the paper): none")
    ap.add_argument("--edit-weights", default="0.5,1.0",
                    help="editing reward: weights of follow (the change happened) and preserve (nothing else changed)")
    ap.add_argument("--category-weights", type=category_weights,
                    help="chain runs: how often each category's prompts are drawn, e.g. 'compositional=3,single=0.5' (1 "
                    "where absent; '' for uniform; default: the preset's, toy %s, the others uniform)"
                    % ",".join(f"{c}={w:g}" for c, w in TRAIN["toy"]["category_weights"].items()))
    ap.add_argument("--segments", type=int, choices=[0, 3], default=3,
                    help="3: the whole chain; 0: image 1 only (plain text-to-image GRPO, the ablation)")
    ap.add_argument("--regen", choices=["reflect", "plain"], default="reflect",
                    help="after a No, draw image 2 with the verdict and reason in context, or afresh from the prompt")
    # monitoring
    ap.add_argument("--eval-prompts", type=pos_int, help="test prompts per category for the final evaluation")
    ap.add_argument("--ckpt-every", type=pos_int, default=10, help="save the resumable state every N steps")
    ap.add_argument("--no-final-eval", action="store_true", help="write rl.pt only, no evaluation (and no rl_eval.json)")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    add_parallel_args(ap)
    add_attention_arg(ap)
    run_cli(ap, argv, run)


def rl_settings(args, preset):
    pick = lambda flag: getattr(args, flag) if getattr(args, flag) is not None else preset[flag]
    if (args.reward == "judge") != (args.judge_ckpt is not None):
        raise ValueError("--reward judge and --judge-ckpt CKPT go together")
    if args.verdicts not in (None, "plain") and args.task == "edit":
        raise ValueError(f"--verdicts {args.verdicts} pays the chain's Yes/No; --task edit has none")
    if args.verdicts == "strict" and args.reward == "judge":
        raise ValueError("--verdicts strict compares Yes/No with the checker's verdict (score 1); not with --reward judge")
    if args.judge_sft and (args.reward == "judge" or args.task == "edit"):
        raise ValueError("--judge-sft teaches the checker's answers to the chain's judge; not with --reward judge or --task edit")
    # the preset's pay of segment 1 where it applies: a judge's P(yes) has no verdict to pay against
    verdicts = args.verdicts or ("plain" if args.task == "edit" or args.reward == "judge" else preset.get("verdicts", "plain"))
    edit_weights = weights_list(args.edit_weights, 2, "--edit-weights")  # follow, preserve
    edit_share = pick("edit_share") if args.task == "chain" else 0.0
    if args.edit_share and args.task == "edit":
        raise ValueError("--edit-share mixes editing rollouts into a chain run; --task edit has only those")
    if args.category_weights and args.task == "edit":
        raise ValueError("--category-weights draws the chain's prompts; --task edit draws edits, not prompts")
    if args.redraw_share and (args.task == "edit" or args.segments == 0 or args.regen == "plain"):
        raise ValueError("--redraw-share trains image 2 after a reflection: a chain run with --segments 3 and --regen reflect")
    if edit_share and args.init:
        raise ValueError("--edit-share trains ShapeWorld edits in the toy's word layout; not for --init (a released model)")
    return dict(config=args.config, seed=args.seed, steps=pick("steps"), prompts=pick("prompts"), group=pick("group"),
                lr=pick("lr"), warmup=preset["warmup"], beta=list(pick("beta")), clip_eps=args.clip_eps,
                updates=args.updates_per_batch, reason=preset["reason"], reward=args.reward,
                cfg=args.cfg if args.cfg is not None else JanusConfig(**PRESETS[args.config]).guidance,
                segments=args.segments, regen=args.regen, verdicts=verdicts, judge_sft=args.judge_sft, task=args.task,
                edit_share=edit_share, edit_weights=edit_weights, redraw_share=args.redraw_share,
                category_weights=pick("category_weights"), bf16=None)


def run(args):
    preset = TRAIN[args.config]
    settings = rl_settings(args, preset)
    dev, rank, world = setup_distributed(args.device)
    settings["bf16"] = use_bf16(args.dtype, dev)
    if settings["prompts"] % world:
        raise ValueError(f"--prompts {settings['prompts']} does not split over {world} processes")
    sft_path = args.init or os.path.join(args.out, "sft.pt")
    if not os.path.exists(sft_path):
        raise ValueError(f"{sft_path} not found: run SFT first (python sft.py --stage sft --config {args.config} --out {args.out})")
    # what this stage starts from: a saved state of another SFT model (or judge) is not resumed
    settings["inputs"] = {"init" if args.init else "sft.pt": digest(sft_path), **({"judge": digest(args.judge_ckpt)} if args.judge_ckpt else {})}
    check_run_dir(args.out)
    state_path = os.path.join(args.out, "rl_state.pt")
    st = load_state(state_path, "rl_state", settings, ignore=("steps", "bf16"))

    model, vq, tok, _ = load_janus(sft_path, dev)
    ref = load_janus(sft_path, dev)[0].requires_grad_(False)  # the frozen SFT model of the KL term
    vq.requires_grad_(False)
    model.vision_model.requires_grad_(False)  # the released code keeps the ViT (and the VQ) frozen
    reward = make_reward(args, tok, dev)
    by_cat = group(shapes.make_splits(seed=0)["train"])
    # segments a rollout scores: an editing rollout one (the edited image), a chain three (or one, --segments 0)
    n_seg_of = lambda ro: 1 if settings["segments"] == 0 or ro.get("task") in ("edit", "redraw") else 3
    local = settings["prompts"] // world
    G, N = settings["group"], model.cfg.image_tokens
    held = {"rollout": None, "stats": []}  # the current rollout batch (saved in the state) and the curve

    def batch_fn(step, micro):
        k = step // settings["updates"]  # rollout k serves updates k*U .. k*U + U - 1
        if held["rollout"] is None or held["rollout"]["k"] != k:
            sampler = gathered(model)  # the live weights, whole (under FSDP a copy: a collective)
            ro = draw_rollout(sampler, vq, tok, settings, k, rank, local, by_cat, reward)
            held["rollout"] = score_rollout(ro, sampler, ref, tok, vq, settings, n_seg_of(ro), k)
        return held["rollout"], "loss"

    def loss_fn(ro):
        n_seg = n_seg_of(ro)
        held.pop("judge_ce", None)  # a step's own, or none (an editing rollout's step)
        logp, mask = token_logps(model, tok, *chain_seqs(ro, tok, vq, N), settings["cfg"], n_seg, grouped=not sharded(model))
        old = logp.detach() if ro["old"] is None else ro["old"]  # ratio 1 at a rollout's only update
        loss, kl = grpo_loss(logp, old, ro["ref"], ro["adv"], mask, settings["clip_eps"], settings["beta"][:n_seg])
        held["kl"] = kl
        if settings["judge_sft"] and "yes" in ro:  # Task II on the rollout's own first images (a chain's)
            held["judge_ce"] = judge_sft_loss(model, tok, vq, ro, N, G)
        return (loss + settings["judge_sft"] * held.get("judge_ce", 0)) / world  # this process's share (equal chains)

    def after_step(step):
        ro, kl = everyone(held["rollout"], held["kl"], world)
        s = step_stats(ro, ro["adv"], kl, G)
        ce = {"judge_ce": round(held["judge_ce"].item(), 4)} if "judge_ce" in held else {}  # --judge-sft's loss
        held["stats"].append(dict(step=step, **s, **ce))
        if "follow" in s:  # an editing rollout
            return {"reward": s["reward"][0], "follow": s["follow"], "preserve": s["preserve"]}
        if "redraw" in s:  # a redraw rollout: image 2's reward
            return {"r2": s["reward"][0]}
        return {"r0": s["reward"][0], "r1": s["reward"][1], "r2": s["reward"][2], "yes": s["yes"]}

    def set_held(saved):
        held.update(saved)

    model.checkpointing = args.checkpointing
    model.set_attention(args.attn)
    ref.set_attention(args.attn)
    plan = Plan(settings["steps"], settings["lr"], settings["warmup"], bf16=settings["bf16"], ckpt_every=args.ckpt_every,
                world=world, rank=rank, parallel=args.parallel, desc=f"rl {args.config} {'bf16' if settings['bf16'] else 'fp32'}")
    train_loss = distribute(model, loss_fn, plan)
    optimizer = make_optimizer(model, settings["lr"], weight_decay=0.0)  # after distribute: FSDP swaps the parameters
    model.train()
    step, seconds, _ = fit(batch_fn, train_loss, optimizer, model.parameters(), {"model": model}, plan, state_path,
                           "rl_state", settings, st, after_step=after_step,
                           extra_state=(lambda: {"rollout": held["rollout"], "stats": held["stats"]}, set_held))
    full = gathered(model)  # every rank: under FSDP a collective
    if rank == 0:
        finish(args, full, vq, tok, settings, step, seconds, held["stats"], args.eval_prompts or preset["eval_prompts"])
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
