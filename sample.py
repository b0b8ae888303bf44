"""
Sampling with the unified model (SPEC.md section 3): text-to-image with classifier-free guidance,
the self-check with a forced Yes/No answer and a free-text reason, the introspective loop
(generate -> judge -> reflect -> regenerate, the paper's "aha moment"), and editing.

The first section, "sequence layouts", is the ONE place where this project builds sequences: SFT
and RL import `Seq` and the layout functions from here, so training and sampling can never
disagree on where a token goes, which positions are padded for CFG, or where the loss falls.

    python sample.py --ckpt out/toy/sft.pt --prompt "a red circle to the left of a square" --out out/samples
    python sample.py --ckpt out/toy/sft.pt --edit src.png --instruction "make the red circle blue" --out out/edit
"""

import json
import math
import os
import sys
import weakref
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import shapes
from common import build, load_checkpoint, load_weights, to_tensor, to_uint8
from model import Janus, JanusConfig, load_pretrained
from tokenizer import BPETokenizer, TextTokenizer, VQConfig, VQModel

# -----------------------------------------------------------------------------
# Sequence layouts

USER, ASSISTANT = "<|User|>:", "<|Assistant|>:"
# the self-check cue: closes the image and asks the question (the answer follows directly)
CUE = "<end_of_image>\nLet me think Does this image match the prompt..."
# after a "No, <reason>" + EOS: the bridge to the next image
NEXT = "\nNext, I will draw a new image<begin_of_image>"
EDIT_TAIL = "Please generate an image.\n\n<|Assistant|>:<begin_of_image>"

TEXT, UND, GEN = 0, 1, 2  # what fills a position: a text id, a ViT patch feature, a VQ code
CAPTION, SCAFFOLD = 1, 2  # prompt spans: the user's words; the rest between BOS and the first image


@dataclass
class Seq:
    """One row of the model's input, built left to right. Per position:
    ids (text id; image positions hold <image_placeholder>), kind (TEXT/UND/GEN), w (loss weight on
    predicting this position's token from the previous position; 0 = no loss), span (CAPTION /
    SCAFFOLD / 0, which tokens CFG replaces by pads). codes: VQ ids of the GEN positions in order,
    code_pos: each one's place in its image; images: uint8 (H, W, 3) images for the UND positions,
    one per image."""
    ids: list = field(default_factory=list)
    kind: list = field(default_factory=list)
    w: list = field(default_factory=list)
    span: list = field(default_factory=list)
    codes: list = field(default_factory=list)
    images: list = field(default_factory=list)
    code_pos: list = field(default_factory=list)

    def add(self, ids, kind=TEXT, w=0.0, span=0):
        ids = list(ids)
        self.ids += ids
        self.kind += [kind] * len(ids)
        self.w += w if isinstance(w, list) else [w] * len(ids)
        self.span += [span] * len(ids)
        return self

    def text(self, tok, s, w=0.0, span=0):
        return self.add(tok.encode(s), TEXT, w, span)

    def gen_image(self, tok, codes, w=0.0, start=0):
        """An image's codes from its place `start` on (> 0: the rest of an image whose first codes
        are already in a KV cache)."""
        codes = [int(c) for c in codes]
        self.codes += codes
        self.code_pos += range(start, start + len(codes))
        return self.add([tok.img] * len(codes), GEN, w)

    def und_image(self, tok, image, n_tokens):
        self.images.append(image)
        return self.add([tok.img] * n_tokens, UND)

    def __len__(self):
        return len(self.ids)

    def uncond(self, tok, whole_prompt):
        """The CFG twin: whole_prompt=True pads everything between BOS and the first image (a
        first image); False pads only the user's words (regeneration and editing: the earlier
        image, the judgement and the reflection stay)."""
        pad = (CAPTION, SCAFFOLD) if whole_prompt else (CAPTION,)
        out = Seq(list(self.ids), list(self.kind), list(self.w), list(self.span), list(self.codes), list(self.images),
                  list(self.code_pos))
        out.ids = [tok.pad if s in pad else i for i, s in zip(self.ids, self.span)]
        return out


def prompt_seq(tok, caption):
    """`<bos><|User|>: {caption}\\n\\n<|Assistant|>:<begin_of_image>`: a text-to-image prompt."""
    s = Seq().add([tok.bos])
    user, words, assistant = split_encode(tok, [USER, " " + caption, "\n\n" + ASSISTANT])
    s.add(user, span=SCAFFOLD).add(words, span=CAPTION).add(assistant, span=SCAFFOLD)
    return s.text(tok, "<begin_of_image>")


def split_encode(tok, parts):
    """The ids of "".join(parts), cut where the parts meet. A BPE gives a word other ids after a
    space than alone (" a" is not "a"), so the real models' prompts must be encoded whole, as the
    official code does; each cut must fall between tokens (checked), which holds at a space or a
    newline. The toy's word-level tokenizer gives every part the same ids either way."""
    out, before = [], []
    for k in range(1, len(parts) + 1):
        ids = tok.encode("".join(parts[:k]))
        assert ids[:len(before)] == before, f"{parts[k - 1]!r} does not start at a token boundary"
        out.append(ids[len(before):])
        before = ids
    return out


def add_answer(seq, tok, answer, w_first=0.8, w_rest=0.2, rest_mean=True):
    """The judge's answer "Yes, ..."/"No, ..." + EOS. rest_mean (SPEC.md section 4, the released
    code): the answer's loss is w_first * CE(Yes/No) + w_rest * mean CE over the rest, so each
    other token weighs w_rest / (len - 1) and the verdict's share does not shrink with the answer's
    length. rest_mean=False: w_first on the first token, w_rest on every other one."""
    ids = tok.encode(answer) + [tok.eos]
    rest = w_rest / (len(ids) - 1) if rest_mean else w_rest  # ids: at least Yes/No + EOS
    return seq.add(ids, TEXT, [w_first] + [rest] * (len(ids) - 1))


def add_reflection(seq, tok, reason):
    """After an image (VQ path): cue, "No, <reason>" + EOS, "Next, I will draw a new image<boi>".
    reason: text, or the ids the model itself produced (kept as they were, never re-encoded)."""
    ids = tok.encode(reason) if isinstance(reason, str) else list(reason)
    return seq.text(tok, CUE).add(ids + [tok.eos]).text(tok, NEXT)


def edit_seq(tok, src_codes, instruction):
    """`<bos><|User|>: <boi>[source as VQ codes]<eoi>{instruction} Please generate an image.
    \\n\\n<|Assistant|>:<begin_of_image>`; only the instruction is padded for CFG."""
    s = Seq().add([tok.bos]).text(tok, USER + " <begin_of_image>", span=SCAFFOLD)
    s.gen_image(tok, src_codes).text(tok, "<end_of_image>")
    return s.text(tok, instruction, span=CAPTION).text(tok, EDIT_TAIL)


# Understanding as Janus does it (the image in the user's turn, the question after it or before
# it) and the self-check: the base model learns these, SFT trains on them, evaluate.py asks them

DESCRIBE = "Describe the image."


# a released model's understanding conversations open with this (janus_pro_facts.md); the toy's do not
SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content that the "
          "user provides, and assist the user with a variety of tasks using natural language.")


def vqa_seq(tok, image, question, n_tokens, before=False):
    """`<bos><|User|>: <begin_of_image>[image, ViT path]<end_of_image>\\n{question}\\n\\n<|Assistant|>:`, or with
    before=True `<bos><|User|>: {question}\\n<begin_of_image>[image]<end_of_image>\\n\\n<|Assistant|>:`.
    With a released model's tokenizer the official template: SYSTEM + "\\n\\n" before `<|User|>:`."""
    system = SYSTEM + "\n\n" if isinstance(tok, BPETokenizer) else ""
    s = Seq().add([tok.bos]).text(tok, f"{system}{USER} " + (question + "\n" if before else "") + "<begin_of_image>")
    s.und_image(tok, image, n_tokens)
    return s.text(tok, "<end_of_image>" + ("" if before else "\n" + question) + "\n\n" + ASSISTANT)


def selfcheck_seq(tok, prompt_text, image, n_tokens, history=()):
    """The self-check layout (SPEC.md section 3): `<bos><|User|>: {prompt}\n\n<|Assistant|>:<begin_of_image>`
    [image, ViT path] `<end_of_image>\nLet me think Does this image match the prompt...`; the answer follows.
    history: earlier failed rounds [(VQ codes, "No, reason")], each drawn and reflected on as the
    loop does before a regeneration, so the judged image is the one drawn after them."""
    return after_rounds(tok, prompt_text, history).und_image(tok, image, n_tokens).text(tok, CUE)


def after_rounds(tok, prompt_text, history):
    """The prompt, then each earlier failed round as the loop leaves it before the next image:
    image (VQ path) + cue + "No, reason" + EOS + "Next, I will draw a new image<begin_of_image>"."""
    s = prompt_seq(tok, prompt_text)
    for codes, reason in history:
        add_reflection(s.gen_image(tok, codes), tok, reason)
    return s


def question(prompt_text):
    return f"Does this image match the prompt {prompt_text}"


def next_turn(seq, tok, question_text):
    """A further question about the same image, after an answer's EOS: `<|User|>: {q}\n\n<|Assistant|>:`."""
    return seq.text(tok, f"{USER} {question_text}\n\n{ASSISTANT}")


def describe_seq(tok, image, answer, n_tokens):
    """The describe question about an image (ViT path) + its caption + EOS, every answer token weighing 1."""
    return add_answer(vqa_seq(tok, image, DESCRIBE, n_tokens), tok, answer, 1.0, 1.0, rest_mean=False)


def collate(seqs, tok, device="cpu", left=False):
    """Seqs -> padded tensors for model.embed / model.forward / model.token_losses.
    Right padding for training (causal attention never sees trailing pads); left padding for
    sampling, so every row's next token lands at the same position. Returns a namespace with
    idx, key_mask, und_mask, gen_mask (B, T); gen_ids, gen_pos (n_gen,); und_pixels (n_img, 3, H, W) in
    [-1, 1]; text_targets, image_targets (B, T) (-1 = none, position t predicts token t+1); weights
    (B, T) (the loss weight of each target: the loss is sum(losses * weights) / sum(weights))."""
    B, T = len(seqs), max(len(s) for s in seqs)
    idx = torch.full((B, T), tok.pad, dtype=torch.long)
    kind = torch.full((B, T), -1, dtype=torch.long)
    w = torch.zeros(B, T)
    for b, s in enumerate(seqs):
        sl = slice(T - len(s), T) if left else slice(0, len(s))
        idx[b, sl] = torch.tensor(s.ids)
        kind[b, sl] = torch.tensor(s.kind)
        w[b, sl] = torch.tensor(s.w, dtype=torch.float32)
    gen_mask, und_mask = kind == GEN, kind == UND
    gen_ids = torch.tensor([c for s in seqs for c in s.codes], dtype=torch.long)
    gen_pos = torch.tensor([c for s in seqs for c in s.code_pos], dtype=torch.long)
    assert gen_pos.shape == gen_ids.shape, "a Seq's code_pos must hold one place per code (Seq.gen_image)"
    images = [im for s in seqs for im in s.images]
    und_pixels = to_tensor(np.stack(images)) if images else None
    # targets: position t predicts position t+1 (shift left by one)
    text_t = torch.full((B, T), -1, dtype=torch.long)
    image_t = torch.full((B, T), -1, dtype=torch.long)
    weights = torch.zeros(B, T)
    has = w[:, 1:] > 0
    text_t[:, :-1] = torch.where(has & (kind[:, 1:] == TEXT), idx[:, 1:], -1)
    codes_grid = torch.full((B, T), -1, dtype=torch.long)
    codes_grid[gen_mask] = gen_ids
    image_t[:, :-1] = torch.where(has & gen_mask[:, 1:], codes_grid[:, 1:], -1)
    weights[:, :-1] = torch.where(has, w[:, 1:], 0.0)
    d = lambda t: None if t is None else t.to(device)
    return SimpleNamespace(idx=d(idx), key_mask=d(kind >= 0), und_mask=d(und_mask), gen_mask=d(gen_mask),
                           gen_ids=d(gen_ids), gen_pos=d(gen_pos), und_pixels=d(und_pixels), text_targets=d(text_t),
                           image_targets=d(image_t), weights=d(weights))


def collate_groups(seqs, tok, device="cpu", grouped=True, overhead=128):
    """Training batches (right padded, as collate) of seqs grouped by length: sorted, then cut
    where the padding a cut saves outweighs `overhead` tokens (one more forward call's fixed cost),
    by dynamic programming over the cut points. The loss summed over the groups is collate's over
    all of them (causal attention: trailing pads are never seen, and they carry no weight). A base
    understanding step, VQA conversations (~180 tokens) beside describe answers (~40), pads 1.55x
    the tokens it holds in one batch, 1.08x grouped (docs/experiments.md, "Batches grouped by
    length"). The overhead was measured on the toy on CPU. grouped=False: one batch, as a model
    sharded by FSDP needs (it gathers each block's weights at every forward, so every process must
    run as many). Each batch's `rows`: the index in seqs of each of its rows."""
    order = sorted(range(len(seqs)), key=lambda i: len(seqs[i])) if grouped else list(range(len(seqs)))
    n, size = len(order), [len(seqs[i]) for i in order]
    # best[j]: the least cost of the j shortest; a group of sorted i..j-1 costs size[j-1] * (j - i) + overhead;
    # cut[j]: where the last of those groups starts (all 0: one group)
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1 if grouped else 1):
        for i in range(j):
            cost = best[i] + size[j - 1] * (j - i) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    out = []
    for g in reversed(groups):
        out.append(collate([seqs[k] for k in g], tok, device))
        out[-1].rows = g  # the index in seqs of each row
    return out


def embed_batch(model, b):
    return model.embed(b.idx, und_pixels=b.und_pixels, und_mask=b.und_mask if b.und_pixels is not None else None,
                       gen_ids=b.gen_ids if b.gen_ids.numel() else None, gen_mask=b.gen_mask, gen_pos=b.gen_pos)


# -----------------------------------------------------------------------------
# Drawing one token from logits with fixed random numbers

def cfg_logits(cond, uncond, w):
    """l = l_u + w (l_c - l_u), written so that w = 1 returns l_c exactly."""
    return w * cond + (1 - w) * uncond


def pick(logits, u, temperature=1.0, top_k=0, top_p=1.0):
    """Sample ids (B,) from logits (B, V) by inverse CDF with given uniforms u (B,) in [0, 1).
    Using pre-drawn uniforms (one stream per sample, from its own seed) makes every image
    reproducible from its seed alone, whatever else is in the batch. temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature if temperature != 1.0 else logits.float()
    if top_k:
        kth = logits.topk(min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)  # (B, V)
    if top_p < 1.0:
        # keep the smallest head of the sorted distribution whose mass reaches top_p
        sp, order = probs.sort(-1, descending=True)
        keep = torch.zeros_like(probs, dtype=torch.bool).scatter(-1, order, (sp.cumsum(-1) - sp) < top_p)
        probs = probs * keep
    # the CDF in vocabulary order (not sorted: sorting near-equal probabilities would let a 1e-8
    # wobble reorder them and change the pick; in this order only a draw within ~1e-8 of a step can)
    cdf = probs.cumsum(-1)
    j = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1]).unsqueeze(-1), right=True)
    return j.clamp(max=probs.size(-1) - 1).squeeze(-1)


@dataclass
class Options:
    cfg: float | None = None   # guidance weight w; None = the model preset's (JanusConfig.guidance, 5 but toy)
    temperature: float = 1.0   # image tokens
    top_k: int = 0
    top_p: float = 1.0
    text_temperature: float = 0.0  # the judge's answer: 0 = greedy (Yes/No by the larger P)
    max_reason: int = 24       # tokens after Yes/No, EOS included
    rounds: int = 3            # most images per chain
    compile: bool = False      # image tokens by the compiled static step (faster per token, compiles first)
    force_no: bool = False     # every verdict No, whatever P(yes): the redraw measured alone (evaluate.loop_split)

    def __post_init__(self):
        # NaN or inf guidance/temperature would turn every draw into the last id, silently: refuse
        ok = {"cfg": self.cfg is None or self.cfg >= 0, "temperature": self.temperature >= 0, "text_temperature": self.text_temperature >= 0,
              "top_k": self.top_k >= 0, "top_p": 0 < self.top_p <= 1, "max_reason": self.max_reason >= 0,
              "rounds": self.rounds >= 1}
        for name, good in ok.items():
            v = getattr(self, name)
            if not ((v is None or np.isfinite(v)) and good):
                raise ValueError(f"sampling option {name} = {v} is out of range (cfg, temperatures >= 0; top_k >= 0; "
                                 "0 < top_p <= 1; rounds >= 1)")

    def weight(self, model):
        """The guidance weight w these options give `model`: cfg, or its preset's default."""
        return model.cfg.guidance if self.cfg is None else self.cfg


def chain_length(tok, prompt_len, image_tokens, opt):
    """Positions a chain of opt.rounds images can take: prompt + rounds x (image + cue + reason +
    EOS + bridge). The ONE rule for the KV cache of introspect() (RoPE sets no limit of its own)."""
    per_round = image_tokens + len(tok.encode(CUE)) + opt.max_reason + 2 + len(tok.encode(NEXT))
    return prompt_len + opt.rounds * per_round


# -----------------------------------------------------------------------------
# The KV cache plumbing: row views, copies, one batched forward for cond + uncond rows

def new_cache(model, batch, length):
    # under autocast k and v come out in the autocast dtype: store them so, at half the bytes
    dev = model.lm_head.weight.device.type
    dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
    return model.make_cache(batch, length, dtype=dtype)


def forward_cached(model, x, cache, start, key_mask):
    # key_mask None when nothing is padded: the kernels' plain causal path is fastest
    km = None if key_mask is None or bool(key_mask.all()) else key_mask[:, :start + x.size(1)]
    return model(x, cache=cache, start_pos=start, key_mask=km)


def _image_code(model, h_last, u, n_cond, opt):
    """The next image code of n_cond chains from the last hidden states of their cond and uncond rows."""
    logits = model.image_logits(h_last)  # (2 n_cond, V) fp32
    guided = cfg_logits(logits[:n_cond], logits[n_cond:], opt.weight(model))
    return pick(guided, u, opt.temperature, opt.top_k, opt.top_p)  # (n_cond,)


@torch.no_grad()
def draw_image(model, cache, key_mask, h_last, start, n_cond, opt, uniforms):
    """Sample one image's codes for n_cond chains whose cond rows are cache rows [0, n_cond) and
    uncond rows [n_cond, 2 n_cond), both already prefilled up to `start` (h_last: their last hidden
    states, (2 n_cond, D)). One batched forward per token for both rows. Returns codes (n_cond, N)
    and the cache position after feeding all but the last code (it is fed later, only if the chain
    continues). key_mask: (2 n_cond, cache length) or None when nothing is padded."""
    N, dev = model.cfg.image_tokens, h_last.device
    codes = torch.empty(n_cond, N, dtype=torch.long, device=dev)
    if opt.compile:  # the same tokens by one compiled static-shape step (end of this file)
        return _draw_compiled(model, cache, key_mask, h_last, start, n_cond, opt, uniforms, codes)
    padded = key_mask is not None and not bool(key_mask.all())  # checked once, not per token
    for i in range(N):
        codes[:, i] = _image_code(model, h_last, uniforms[:, i], n_cond, opt)
        if i == N - 1:
            break
        x = model.embed_image_ids(codes[:, i].repeat(2), i)[:, None]  # (2 n_cond, 1, D)
        h_last = model(x, cache=cache, start_pos=start, key_mask=key_mask[:, :start + 1] if padded else None)[:, -1]
        start += 1
    return codes, start


# -----------------------------------------------------------------------------
# The introspective loop


@dataclass
class Chain:
    prompt: str
    seed: int
    images: list = field(default_factory=list)   # uint8 (H, W, 3), one per round
    codes: list = field(default_factory=list)    # VQ codes (N,), one per round
    verdicts: list = field(default_factory=list)  # "yes" / "no", one per judged image
    p_yes: list = field(default_factory=list)
    reasons: list = field(default_factory=list)
    reason_ids: list = field(default_factory=list)  # the answers' token ids (Yes/No first), no EOS


def draw_uniforms(gens, n, device):
    # (B, n) uniforms, each row from its chain's own generator
    return torch.stack([torch.rand(n, generator=g) for g in gens]).to(device)


@torch.no_grad()
def judge(model, tok, prefix_cache, prefix_len, key_mask, images, opt, gens):
    """Self-evaluation of `images` (B uint8 images) whose prompts (and earlier rounds) fill the
    first prefix_len positions of prefix_cache's first B rows: copy that prefix (it is identical:
    no recomputation), add the image through the understanding path + the cue, force the first
    answer token to Yes/No and decode the reason. Returns (verdicts, p_yes, answers)."""
    B, dev = len(images), key_mask.device
    cue = tok.encode(CUE)
    N = model.cfg.image_tokens
    L = prefix_len + N + len(cue) + 1 + opt.max_reason
    cache = new_cache(model, B, L)
    cache.copy_from(prefix_cache, slice(0, B), prefix_len)
    km = torch.ones(B, L, dtype=torch.bool, device=dev)
    km[:, :prefix_len] = key_mask[:B, :prefix_len]
    idx = torch.tensor([[tok.img] * N + cue] * B, device=dev)
    und = torch.zeros_like(idx, dtype=torch.bool)
    und[:, :N] = True
    x = model.embed(idx, und_pixels=to_tensor(np.stack(images)).to(dev), und_mask=und)
    pos = prefix_len
    h = forward_cached(model, x, cache, pos, km)[:, -1]
    pos += x.size(1)
    u = draw_uniforms(gens, 1 + opt.max_reason, dev)
    # first answer token: only Yes or No; P(yes) = P(Yes) / (P(Yes) + P(No))
    two = model.text_logits(h)[:, [tok.yes, tok.no]]  # (B, 2)
    p_yes = two.softmax(-1)[:, 0]
    first = pick(two, u[:, 0], opt.text_temperature)  # 0 = Yes, 1 = No
    if opt.force_no:
        first = torch.ones_like(first)
    ids = torch.where(first == 0, tok.yes, tok.no)
    h = forward_cached(model, model.embed(ids[:, None]), cache, pos, km)[:, -1]
    reasons = decode_text(model, tok, cache, km, h, pos + 1, u[:, 1:], opt.text_temperature)
    answer_ids = [[i] + r for i, r in zip(ids.tolist(), reasons)]
    verdicts = ["yes" if f == 0 else "no" for f in first.tolist()]
    return verdicts, p_yes.tolist(), [tok.decode(a) for a in answer_ids], answer_ids


@torch.no_grad()
def decode_text(model, tok, cache, km, h, pos, u, temperature):
    """Text tokens after the last hidden states h (B, D), the next one going to cache position
    pos, until EOS or u.size(1) tokens (u: (B, steps) uniforms). Returns B id lists without EOS
    (a text cut at the limit gets its EOS later, where it is put in a context)."""
    if u.size(1) == 0:
        return [[] for _ in range(h.size(0))]
    out, done = [], torch.zeros(h.size(0), dtype=torch.bool, device=h.device)
    for t in range(u.size(1)):
        logits = model.text_logits(h)
        logits[:, len(tok):] = float("-inf")  # the model's vocabulary is padded past the tokenizer's
        ids = torch.where(done, tok.pad, pick(logits, u[:, t], temperature))
        out.append(ids)
        done |= ids == tok.eos
        if done.all() or t == u.size(1) - 1:
            break
        h = forward_cached(model, model.embed(ids[:, None]), cache, pos, km)[:, -1]
        pos += 1
    rows = torch.stack(out, 1).tolist()
    return [row[:row.index(tok.eos)] if tok.eos in row else [i for i in row if i != tok.pad] for row in rows]


def prefill_pair(model, cond, uncond, tok, cache_len, dev):
    """Prefill cond rows + uncond rows (left-padded to one length) in one forward."""
    b = collate(cond + uncond, tok, dev, left=True)
    cache = new_cache(model, len(cond) * 2, cache_len)
    km = torch.ones(b.idx.size(0), cache_len, dtype=torch.bool, device=dev)
    km[:, :b.idx.size(1)] = b.key_mask
    h = forward_cached(model, embed_batch(model, b), cache, 0, km)[:, -1]
    return cache, km, h, b.idx.size(1)


@torch.no_grad()
def introspect(model, vq, tok, prompts, seeds, opt=Options(), progress=False):
    """The introspective loop, batched over chains (one chain per (prompt, seed)):
    image k (CFG) -> self-check -> "Yes": the chain stops; "No": the reason goes into the context
    and image k+1 is drawn, up to opt.rounds images. Finished chains leave the batch.

    What is reused: the judge copies the KV cache of the prompt (and of earlier rounds) from the
    generation cache instead of recomputing it; a regeneration keeps the conditional rows' cache
    (prompt + earlier images as VQ codes) and only feeds the last code, the cue, the reason and
    the bridge. The unconditional regeneration rows differ from the first image's (there only the
    caption is padded, SPEC.md section 3), so they are prefilled afresh, in the same batch."""
    dev = next(model.parameters()).device
    N = model.cfg.image_tokens
    chains = [Chain(p, s) for p, s in zip(prompts, seeds)]
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    seqs = [prompt_seq(tok, c.prompt) for c in chains]
    longest = chain_length(tok, max(map(len, seqs)), N, opt)  # room for every round
    cache, km, h, pos = prefill_pair(model, seqs, [s.uncond(tok, True) for s in seqs], tok, longest, dev)
    live = list(range(len(chains)))
    bar = tqdm(total=opt.rounds, desc="rounds", disable=not progress)
    for r in range(opt.rounds):
        n = len(live)
        codes, end = draw_image(model, cache, km, h, pos, n, opt, draw_uniforms([gens[i] for i in live], N, dev))
        images = to_uint8(vq.decode(codes))
        for j, i in enumerate(live):
            chains[i].images.append(images[j])
            chains[i].codes.append(codes[j].tolist())
            seqs[i].gen_image(tok, codes[j].tolist())
        bar.update(1)
        # every image is judged, the last one too, so each round records a verdict
        verdicts, p_yes, answers, answer_ids = judge(model, tok, cache, pos, km, list(images), opt, [gens[i] for i in live])
        for j, i in enumerate(live):
            chains[i].verdicts.append(verdicts[j])
            chains[i].p_yes.append(p_yes[j])
            chains[i].reasons.append(answers[j])
            chains[i].reason_ids.append(answer_ids[j])
        keep = [j for j in range(n) if verdicts[j] == "no"]
        if r == opt.rounds - 1 or not keep:
            break
        # --- regeneration for the chains that said No
        live = [live[j] for j in keep]
        chunks = []
        for i, j in zip(live, keep):
            c = Seq().gen_image(tok, codes[j, -1:].tolist(), start=N - 1)
            add_reflection(c, tok, answer_ids[j])
            add_reflection(seqs[i], tok, answer_ids[j])
            chunks.append(c)
        m, C = len(live), max(map(len, chunks))
        sel = torch.tensor(keep, device=dev)
        new = new_cache(model, 2 * m, longest)
        new.rows(slice(0, m)).copy_from(cache, sel, end)
        new_km = torch.ones(2 * m, longest, dtype=torch.bool, device=dev)
        new_km[:m, :end] = km[sel, :end]
        # cond rows: feed only the new chunk, left-padded (the holes are masked keys)
        b = collate(chunks, tok, dev, left=True)
        new_km[:m, end:end + C] = b.key_mask
        h_c = forward_cached(model, embed_batch(model, b), new.rows(slice(0, m)), end, new_km[:m])[:, -1]
        # uncond rows: the whole regeneration context with only the caption padded, prefilled
        # afresh and right-aligned with the cond rows (both hold the same number of real tokens)
        ub = collate([seqs[i].uncond(tok, False) for i in live], tok, dev, left=True)
        pad = end + C - ub.idx.size(1)
        new_km[m:, :pad] = False
        new_km[m:, pad:end + C] = ub.key_mask
        h_u = forward_cached(model, embed_batch(model, ub), new.rows(slice(m, 2 * m)), pad, new_km[m:])[:, -1]
        cache, km, h, pos = new, new_km, torch.cat([h_c, h_u]), end + C
    bar.close()
    return chains


@torch.no_grad()
def generate(model, vq, tok, prompts, seeds, opt=Options()):
    """Text-to-image only (first images, no judging): uint8 (B, H, W, 3) and codes (B, N)."""
    dev = next(model.parameters()).device
    seqs = [prompt_seq(tok, p) for p in prompts]
    N = model.cfg.image_tokens
    cache, km, h, pos = prefill_pair(model, seqs, [s.uncond(tok, True) for s in seqs], tok,
                                      max(map(len, seqs)) + N, dev)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    codes, _ = draw_image(model, cache, km, h, pos, len(seqs), opt, draw_uniforms(gens, N, dev))
    return to_uint8(vq.decode(codes)), codes


@torch.no_grad()
def edit(model, vq, tok, sources, instructions, seeds, opt=Options(cfg=4.0)):
    """Editing: source images (uint8, VQ path) + instructions -> edited images uint8 (B, H, W, 3)
    and their codes (B, N)."""
    dev = next(model.parameters()).device
    src_codes = vq.encode(to_tensor(np.stack(sources)).to(dev))
    seqs = [edit_seq(tok, c.tolist(), ins) for c, ins in zip(src_codes, instructions)]
    N = model.cfg.image_tokens
    cache, km, h, pos = prefill_pair(model, seqs, [s.uncond(tok, False) for s in seqs], tok,
                                      max(map(len, seqs)) + N, dev)
    gens = [torch.Generator().manual_seed(int(s)) for s in seeds]
    codes, _ = draw_image(model, cache, km, h, pos, len(seqs), opt, draw_uniforms(gens, N, dev))
    return to_uint8(vq.decode(codes)), codes


# -----------------------------------------------------------------------------
# A trained Janus bundle: model + VQ tokenizer + the text vocabulary, in one file (here, the first
# module that knows all three: what the stages save and sampling, judging and evaluation load)


def janus_checkpoint(model, vq, tok, **extra):
    """The dict that stage scripts save and sample.py / judge.py load. The text tokenizer: the word
    vocabulary, or a released model's whole tokenizer.json (sft.py / rl.py --init FOLDER)."""
    text = {"vocab": None, "tokenizer_json": tok.spec} if isinstance(tok, BPETokenizer) else {"vocab": list(tok.vocab)}
    return {"kind": "janus", "config": asdict(model.cfg), "model": model.state_dict(),
            "vq_config": asdict(vq.cfg), "vq": vq.state_dict(), **text, **extra}


JANUS_MAKE = "python sft.py --stage sft --config CONFIG --out DIR (or python run.py)"


def load_janus(path, device="cpu"):
    """(model, vq, tok, ckpt) from a Janus checkpoint, in eval mode. One-line errors for a missing,
    empty or foreign file, missing keys, a config this code cannot build, weights that do not fit
    it, NaN/inf weights, or a vocabulary that is not this code's. A folder is a released model
    (official or transformers layout, model.load_pretrained) with its DeepSeek tokenizer.json."""
    if os.path.isdir(path):
        model, vq = load_pretrained(path, device=device)
        tok = BPETokenizer(os.path.join(path, "tokenizer.json"))
        if len(tok) > model.cfg.vocab_size:
            raise ValueError(f"{path}: tokenizer.json has {len(tok)} tokens, the model {model.cfg.vocab_size}")
        return model.to(device), vq.to(device), tok, {"kind": "pretrained", "path": path}
    ckpt = load_checkpoint(path, {"kind": "janus"}, keys=("config", "model", "vq_config", "vq", "vocab"),
                           make=JANUS_MAKE, finite=True)
    if ckpt.get("tokenizer_json") is not None:  # a released model trained on (sft.py / rl.py --init FOLDER)
        tok = BPETokenizer(ckpt["tokenizer_json"])
    else:
        tok = TextTokenizer(shapes.WORDS)
        if ckpt["vocab"] != tok.vocab:
            raise ValueError(f"{path} was trained with another text vocabulary than this code's; {JANUS_MAKE} writes a good one")
    model = Janus(build(JanusConfig, ckpt["config"], path, JANUS_MAKE))
    vq = VQModel(build(VQConfig, ckpt["vq_config"], path, JANUS_MAKE))
    load_weights(model, ckpt["model"], path, JANUS_MAKE)
    load_weights(vq, ckpt["vq"], path, JANUS_MAKE)
    return model.to(device).eval(), vq.to(device).eval(), tok, ckpt


# -----------------------------------------------------------------------------
# Optional: the compiled decoding step (--compile, Options(compile=True))
#
# Everything above samples eagerly and is all a reader needs. This section draws the same tokens
# with one static-shape step (a new token per row written at a cache slot given as a tensor,
# attention over the whole preallocated cache under a mask), compiled once by inductor. It pays
# per token (bench.py) but compiles first; README, Speed, has the measurements.


def _static_token(model, cache, key_mask, h_last, slot, place, u, n_cond, opt):
    """One image token with static shapes: pick the code, feed it (both rows) at cache slot `slot`
    as the image's code number `place` (both 0-d tensors), attending over the whole cache. The
    unit that --compile compiles."""
    code = _image_code(model, h_last, u, n_cond, opt)
    x = model.embed_image_ids(code.repeat(2), place)[:, None]  # (2 n_cond, 1, D)
    return code, model(x, cache=cache, start_pos=slot, key_mask=key_mask)[:, -1]


# On a CPU the weights are frozen into the graph as constants, so that max-autotune can time
# inductor's C++ GEMM template (each weight prepacked for decoding's few rows) against ATen's matmul
# and keep the faster (figures: docs/experiments.md). Frozen weights go stale when the model is
# written in place: compiled_token() checks a stamp of them at every image. A GPU reads live weights.
CPU_COMPILE_OPTIONS = {"freezing": True, "max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN",
                       # and no table of timings, or stats line, on stderr per GEMM
                       "autotune_num_choices_displayed": 0, "max_autotune_report_choices_stats": False}
_compiled = None  # (weakref to the model, its weights' stamp, the compiled step)


def _weights_stamp(model):
    # every in-place write on a parameter or buffer (optimizer step, load_state_dict, .mul_ under
    # no_grad) bumps its _version, and replacing one moves its data_ptr. Writes through `.data`
    # (p.data.copy_(...)) bump nothing: they are not seen, so write weights in place under no_grad
    tensors = list(model.parameters()) + list(model.buffers())
    return tuple((t.data_ptr(), t._version) for t in tensors)


def compiled_token(model):
    """_static_token compiled by inductor for this model, and the inductor options to compile it
    under: CPU_COMPILE_OPTIONS on a CPU (the weights frozen in), none elsewhere. The first call
    compiles for its batch size and cache length; the first call with other sizes compiles once
    more, with those sizes symbolic (dynamo's automatic dynamic shapes), and every later size
    reuses that graph, except a single chain (dynamo fixes sizes 0 and 1): that compiles once more.
    Another model, or on a CPU this one with weights written since (training), drops every graph
    dynamo holds and compiles afresh: the old ones have the old weights baked in. A new sampling
    option compiles again too; past dynamo's limit of 8 versions it runs eagerly, with a warning
    (no fullgraph=True: that would make the limit an error)."""
    global _compiled
    frozen = model.lm_head.weight.device.type == "cpu"
    stamp = _weights_stamp(model) if frozen else None
    if _compiled is None or _compiled[0]() is not model or _compiled[1] != stamp:
        if _compiled is not None:
            torch._dynamo.reset()
        _compiled = (weakref.ref(model), stamp, torch.compile(_static_token, dynamic=None))
    return _compiled[2], CPU_COMPILE_OPTIONS if frozen else {}


@torch.no_grad()
def _draw_compiled(model, cache, key_mask, h_last, start, n_cond, opt, uniforms, codes):
    """draw_image's tokens by the compiled static step: one graph for every token (model.forward)."""
    N, dev = model.cfg.image_tokens, h_last.device
    km = key_mask if key_mask is not None else torch.ones(2 * n_cond, cache.k[0].size(2), dtype=torch.bool, device=dev)
    step, options = compiled_token(model)
    places = torch.arange(N - 1, device=dev)
    slots = start + places
    h_last = h_last.contiguous()  # as the step returns it: one graph for every call
    def token(i):
        codes[:, i], h = step(model, cache, km, h_last, slots[i], places[i], uniforms[:, i], n_cond, opt)
        return h

    # checked: finds (or compiles) the graph; the options go in as a patch, since through
    # torch.compile(options=...) freezing does not apply
    with torch._inductor.config.patch(options):
        h_last = token(0)
    # later calls change only tensor values, so dynamo's guard checks are skipped
    with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
        for i in range(1, N - 1):
            h_last = token(i)
    codes[:, N - 1] = _image_code(model, h_last, uniforms[:, N - 1], n_cond, opt)
    return codes, start + N - 1


# -----------------------------------------------------------------------------
# Command line


def _write_png(image, path):
    Image.fromarray(image).save(path)


CHUNK = 64  # chains sampled together: the KV cache of --n 100000 is never allocated at once


def _write_chains(model, vq, tok, prompt, seeds, opt, tmp):
    with open(os.path.join(tmp, "chains.jsonl"), "w") as f:
        for start in tqdm(range(0, len(seeds), CHUNK), desc="chains", unit="chunk", disable=len(seeds) <= CHUNK):
            chunk = seeds[start:start + CHUNK]
            for i, c in zip(range(start, start + len(chunk)), introspect(model, vq, tok, [prompt] * len(chunk), chunk, opt,
                                                                          progress=len(seeds) <= CHUNK)):
                files = []
                for r, im in enumerate(c.images):
                    files.append(f"chain{i}_round{r + 1}.png")
                    _write_png(im, os.path.join(tmp, files[-1]))
                f.write(json.dumps({"prompt": c.prompt, "seed": c.seed, "verdicts": c.verdicts,
                                    "p_yes": [round(p, 4) for p in c.p_yes], "reasons": c.reasons,
                                    "files": files}, allow_nan=False) + "\n")


def _write_edits(model, vq, tok, src, instruction, seeds, opt, tmp):
    _write_png(src, os.path.join(tmp, "source.png"))
    with open(os.path.join(tmp, "edits.jsonl"), "w") as f:
        for start in tqdm(range(0, len(seeds), CHUNK), desc="edits", unit="chunk"):
            chunk = seeds[start:start + CHUNK]
            for i, im in zip(range(start, start + len(chunk)), edit(model, vq, tok, [src] * len(chunk),
                                                                    [instruction] * len(chunk), chunk, opt)[0]):
                _write_png(im, os.path.join(tmp, f"edit{i}.png"))
                f.write(json.dumps({"instruction": instruction, "seed": chunk[i - start], "file": f"edit{i}.png"}) + "\n")


def main(argv=None):
    from common import Parser, add_attention_arg, discard_dir, fraction, new_output_dir, nonneg_float, nonneg_int, pos_int, publish_dir
    ap = Parser(description="Sample images with the introspective loop (or edit an image) from a trained "
                            "checkpoint; writes PNGs and chains.jsonl (or edits.jsonl) into a new folder.")
    # what to sample
    ap.add_argument("--ckpt", required=True, help="a Janus checkpoint written by sft.py (OUT/base.pt or OUT/sft.pt), "
                    "or a released model's folder (e.g. Janus-Pro-R1-7B: config.json, weights, tokenizer.json)")
    ap.add_argument("--prompt", help="the text prompt (ShapeWorld grammar, e.g. 'a red circle above a square'; "
                    "any text for a model folder)")
    ap.add_argument("--edit", metavar="SRC_PNG", help="edit this image instead (needs --instruction; "
                    "python shapes.py --scene PROMPT --png SRC_PNG draws one)")
    ap.add_argument("--instruction", help="edit instruction, e.g. 'make the red circle blue'")
    ap.add_argument("--out", required=True, help="output folder: new or empty, or an earlier output of this command "
                    "(replaced); a folder holding other files is refused, never deleted")
    # how
    ap.add_argument("--n", type=pos_int, default=4, help="chains (images) per prompt, sampled %d at a time" % CHUNK)
    ap.add_argument("--rounds", type=pos_int, default=3, help="most images per chain; 1 = no introspection")
    ap.add_argument("--cfg", type=nonneg_float, default=None, help="guidance weight w >= 0 (default: the preset's, "
                    "5 but toy 2; editing 4; 1 = no guidance)")
    ap.add_argument("--temperature", type=nonneg_float, default=1.0, help="image token temperature (0 = greedy)")
    ap.add_argument("--top-k", type=nonneg_int, default=0, help="keep the k most likely image tokens (0 = all)")
    ap.add_argument("--top-p", type=fraction, default=1.0, help="nucleus sampling mass for image tokens, in (0, 1]")
    ap.add_argument("--seed", type=int, default=0, help="chain i uses seed + i: any image can be redrawn alone")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    add_attention_arg(ap)
    ap.add_argument("--compile", action="store_true",
                    help="draw image tokens with a torch.compile'd static decoding step (faster per token, but it "
                         "compiles first, once per batch size and cache length: see README, Speed)")
    args = ap.parse_args(argv)

    from common import pick_device
    tmp = None
    try:
        if (args.prompt is None) == (args.edit is None):
            raise ValueError("give either --prompt or --edit SRC_PNG --instruction TEXT")
        if args.edit and not args.instruction:
            raise ValueError("--edit needs --instruction")
        # every input is read and checked before any work, the output folder too
        if os.path.isdir(args.ckpt):  # a released model reads any prompt; editing goes through ShapeWorld's checkpoints only
            if args.edit or not args.prompt.strip():
                raise ValueError("a model folder takes a non-empty --prompt (editing needs a checkpoint written by sft.py)")
            text = args.prompt
        else:
            text = shapes.parse_edit(args.instruction).text if args.edit else shapes.parse_prompt(args.prompt).text
        src = shapes.load_image(args.edit) if args.edit else None
        dev = pick_device(args.device)
        model, vq, tok, _ = load_janus(args.ckpt, dev)
        model.set_attention(args.attn)
        opt = Options(cfg=args.cfg if args.cfg is not None else (4.0 if args.edit else None),
                      temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, rounds=args.rounds,
                      compile=args.compile)
        tmp = new_output_dir(args.out)
        seeds = [args.seed + i for i in range(args.n)]
        if args.edit:
            size = model.cfg.image_size
            if src.shape[0] != size:  # any square size is converted to the model's
                src = np.asarray(Image.fromarray(src).resize((size, size), Image.BICUBIC))
            _write_edits(model, vq, tok, src, text, seeds, opt, tmp)
        else:
            _write_chains(model, vq, tok, text, seeds, opt, tmp)
        publish_dir(tmp, args.out)
        print(f"wrote {args.out}")
    except ValueError as e:
        if tmp is not None and "results are in" not in str(e):
            discard_dir(tmp)
        sys.exit(f"error: {e}")
    except BaseException:  # Ctrl-C or a crash: no half-written folder is left behind
        discard_dir(tmp)
        raise


if __name__ == "__main__":
    main()
