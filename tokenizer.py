"""
The two tokenizers of Janus-Pro-R1 (SPEC.md section 2):

1. The VQ image tokenizer of the generation path: LlamaGen's VQ-16, which Janus-Pro reuses unchanged.
   A conv encoder turns pixels into a grid of latents, each latent is snapped to its nearest code
   in a codebook (both l2-normalised), and a conv decoder turns the codes back into pixels. The
   language model then generates images as raster-ordered grids of these code ids.
   The same class builds the real VQ-16 (its state_dict keys match the official `gen_vision_model.*`
   checkpoint) and the small tokenizers we train ourselves on ShapeWorld.
2. The text tokenizers: the word-level one of the toy world, and the real models' DeepSeek
   byte-level BPE (BPETokenizer, read from a model folder's tokenizer.json).

Run `python tokenizer.py --config toy --out out/toy` to train the toy VQ on freshly rendered
ShapeWorld scenes; it resumes if interrupted and ends with an evaluation on held-out scenes
(PSNR, codebook usage, and whether the ShapeWorld checker still gives the same verdict). Then:

    vq = load_vq("out/toy/vq.pt")
    codes = vq.encode(to_tensor(images))      # (common.to_tensor) uint8 (B, 64, 64, 3) -> long (B, 64), ids in [0, 1024)
    images = to_uint8(vq.decode(codes))       # and back
    tok = TextTokenizer(shapes.WORDS)
    ids = tok.encode("<|User|>: a red circle\n\n<|Assistant|>:<begin_of_image>")
"""

import itertools
import json
import math
import os
import random
import re
import sys
import unicodedata
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import shapes
from common import (DTYPE_HELP, Parser, build, check_run_dir, digest, load_checkpoint, load_state, load_weights, pick_device,
                    pos_float, pos_int, save_checkpoint, stage_receipt, to_tensor, to_uint8, use_bf16, write_json)
from train import Plan, fit, make_optimizer

# -----------------------------------------------------------------------------
# Config: one dataclass spans the tiny test tokenizer up to the real VQ-16


@dataclass
class VQConfig:
    image_size: int = 384  # square RGB input
    ch: int = 128  # channels of the first (full-resolution) level
    ch_mult: tuple = (1, 1, 2, 2, 4)  # channel multiplier per level; each level but the last halves H, W
    enc_blocks: int = 2  # residual blocks per encoder level
    dec_blocks: int = 3  # residual blocks per decoder level (LlamaGen: one more than the encoder)
    z_channels: int = 256  # encoder output / decoder input channels, before quant_conv
    code_dim: int = 8  # codebook vector size (quant_conv squeezes z_channels down to this)
    codebook_size: int = 16384
    norm_groups: int = 32  # GroupNorm groups; must divide every level's channel count
    beta: float = 0.25  # commitment weight on the encoder term
    # a patch-local encoder (toy): each code's patch is encoded on its own, without GroupNorm,
    # attention or middle blocks, so the same pixels always give the same code (see VQ_PRESETS)
    local_encoder: bool = False
    # a patch-local decoder (toy grid world): each code becomes its f x f patch on its own through a
    # two-layer MLP, so one code is one picture; the conv decoder learned sharp 12 px shapes slowly
    local_decoder: bool = False
    scene_grid: int = 0  # the ShapeWorld it trains on: 0 free placement, N an N x N grid (shapes.GRID_FILL)

    def __post_init__(self):
        self.ch_mult = tuple(self.ch_mult)  # a checkpoint's config comes back with a list

    @property
    def grid(self):  # codes per side: 384 -> 24 for VQ-16, 64 -> 8 for toy
        return self.image_size // 2 ** (len(self.ch_mult) - 1)

    @property
    def num_tokens(self):  # image tokens per image, the length of one image in the LM's sequence
        return self.grid**2


VQ_PRESETS = {
    # Our small tokenizers use ONE GroupNorm group (a LayerNorm over C, H, W): in groups of 2 channels
    # a "how red" channel is rescaled alike with or without a red object, and colour learns slowly.
    # the tests' tokenizer: 32x32 -> 4x4 codes, trains in seconds
    "tiny": VQConfig(image_size=32, ch=16, ch_mult=(1, 2, 2, 4), enc_blocks=1, dec_blocks=1,
                     z_channels=32, codebook_size=256, norm_groups=1, local_encoder=True),
    # the toy's tokenizer, for the grid world (shapes.GRID_FILL): 64x64 -> 4x4 codes, one per cell, so
    # one object is one code. Patch-local both ways (encoder and an MLP decoder): 19 kinds of patch
    # (18 objects and the background), each its own code and picture; checker agreement 1.0 after
    # 1600 steps, 2 minutes on 2 CPU cores (docs/experiments.md, "The grid world").
    "toy": VQConfig(image_size=64, ch=8, ch_mult=(1, 2, 2, 4, 4), enc_blocks=1, dec_blocks=1,
                    z_channels=64, codebook_size=1024, norm_groups=1, local_encoder=True, local_decoder=True,
                    scene_grid=4),
    # `small`'s tokenizer: the free world (objects anywhere) at 64x64 -> 8x8 codes. 1024 codes keep
    # yellow and orange apart; the patch-local encoder gives the same pixels the same code (less for
    # the LM to predict); one decoder block per level, as convolution backward dominates a step.
    # See docs/experiments.md, VQ tokenizer (it was the toy's until the grid world).
    "small": VQConfig(image_size=64, ch=16, ch_mult=(1, 2, 2, 4), enc_blocks=1, dec_blocks=1,
                      z_channels=64, codebook_size=1024, norm_groups=1, local_encoder=True),
    # Janus-Pro's VQ-16 exactly: 384x384 -> 24x24 codes, 16384 codes of dim 8 (janus_pro_facts.md)
    "vq16": VQConfig(),
}

# -----------------------------------------------------------------------------
# Building blocks (LlamaGen / taming-transformers): GroupNorm + swish + 3x3 convs with a skip


swish = F.silu  # x * sigmoid(x), as one fused op (faster than writing it out, same values)


def group_norm(groups, c):
    # groups = 0: no normalisation (the local encoder); GroupNorm pools over the whole image
    return nn.GroupNorm(groups, c, eps=1e-6) if groups else nn.Identity()


class ResnetBlock(nn.Module):
    def __init__(self, c_in, c_out, groups):
        super().__init__()
        self.norm1 = group_norm(groups, c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2 = group_norm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        # a 1x1 conv ("network in network") makes the skip path match a channel change
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):  # (B, c_in, H, W) -> (B, c_out, H, W)
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        skip = x if self.nin_shortcut is None else self.nin_shortcut(x)
        return skip + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all H*W positions, with 1x1 convs as the projections."""

    def __init__(self, c, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, c, eps=1e-6)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):  # (B, C, H, W)
        B, C, H, W = x.shape
        h = self.norm(x)
        # (B, C, H, W) -> (B, 1, H*W, C): one head whose "tokens" are the pixels of the grid
        q, k, v = (p(h).reshape(B, 1, C, H * W).transpose(2, 3) for p in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(C), as in LlamaGen
        h = h.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(h)


class Downsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):  # (B, C, H, W) -> (B, C, H/2, W/2)
        # pad right and bottom only, so a stride-2 3x3 conv without padding halves H and W exactly
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):  # (B, C, H, W) -> (B, C, 2H, 2W)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def level_block(c_in, c_out, n_res, groups, attn):
    """One resolution level: n_res residual blocks, each followed by attention at the deepest
    level. A bare nn.Module holder keeps the official key names `conv_blocks.{i}.res.{j}`,
    `.attn.{j}` (and `.downsample` / `.upsample`, which the caller adds)."""
    block = nn.Module()
    block.res = nn.ModuleList(ResnetBlock(c_in if j == 0 else c_out, c_out, groups) for j in range(n_res))
    block.attn = nn.ModuleList(AttnBlock(c_out, groups) for _ in range(n_res if attn else 0))
    return block


def run_level(block, h):
    for j, res in enumerate(block.res):
        h = res(h)
        if len(block.attn) > 0:
            h = block.attn[j](h)
    return h


def middle(c, groups):  # residual - attention - residual at the lowest resolution
    return nn.ModuleList([ResnetBlock(c, c, groups), AttnBlock(c, groups), ResnetBlock(c, c, groups)])


# -----------------------------------------------------------------------------
# Encoder and decoder


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in cfg.ch_mult]  # e.g. VQ-16: 128, 128, 256, 256, 512
        last = len(chs) - 1
        local = self.local = cfg.local_encoder
        self.f = 2 ** last  # pixels per code, each way
        groups = 0 if local else cfg.norm_groups
        self.conv_in = nn.Conv2d(3, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        for i, c in enumerate(chs):
            block = level_block(cfg.ch if i == 0 else chs[i - 1], c, cfg.enc_blocks, groups, attn=(i == last and not local))
            if i < last:
                block.downsample = Downsample(c)
            self.conv_blocks.append(block)
        self.mid = nn.ModuleList() if local else middle(chs[-1], groups)
        self.norm_out = group_norm(groups, chs[-1])
        self.conv_out = nn.Conv2d(chs[-1], cfg.z_channels, 3, padding=1)

    def forward(self, x):  # (B, 3, H, W) -> (B, z_channels, H/f, W/f), f = 2^(levels-1)
        if self.local:
            # every f x f patch on its own: (B, 3, H, W) -> (B*h*w, 3, f, f) -> (B*h*w, z, 1, 1)
            B, C, H, W = x.shape
            f, h, w = self.f, H // self.f, W // self.f
            x = x.reshape(B, C, h, f, w, f).permute(0, 2, 4, 1, 3, 5).reshape(B * h * w, C, f, f)
            z = self.convs(x)
            return z.reshape(B, h, w, -1).permute(0, 3, 1, 2)
        return self.convs(x)

    def convs(self, x):  # the LlamaGen encoder itself: (N, 3, H, W) -> (N, z_channels, H/f, W/f)
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    """The encoder mirrored: it starts at the deepest level (most channels, with attention)."""

    def __init__(self, cfg):
        super().__init__()
        chs = [cfg.ch * m for m in reversed(cfg.ch_mult)]  # e.g. VQ-16: 512, 256, 256, 128, 128
        last = len(chs) - 1
        self.conv_in = nn.Conv2d(cfg.z_channels, chs[0], 3, padding=1)
        self.mid = middle(chs[0], cfg.norm_groups)
        self.conv_blocks = nn.ModuleList()
        for i, c in enumerate(chs):
            block = level_block(chs[max(i - 1, 0)], c, cfg.dec_blocks, cfg.norm_groups, attn=(i == 0))
            if i < last:
                block.upsample = Upsample(c)
            self.conv_blocks.append(block)
        self.norm_out = nn.GroupNorm(cfg.norm_groups, chs[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(chs[-1], 3, 3, padding=1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3, h*f, w*f), roughly in [-1, 1]
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class PatchDecoder(nn.Module):
    """The local decoder: per code position, z (z_channels) -> MLP -> 3*f*f pixels, then a pixel
    shuffle lays each patch out in place. 1x1 convs are the per-position linear layers."""

    def __init__(self, cfg):
        super().__init__()
        self.f = 2 ** (len(cfg.ch_mult) - 1)
        self.fc1 = nn.Conv2d(cfg.z_channels, 4 * cfg.z_channels, 1)
        self.fc2 = nn.Conv2d(4 * cfg.z_channels, 3 * self.f**2, 1)

    def forward(self, z):  # (B, z_channels, h, w) -> (B, 3*f*f, h, w) -> (B, 3, h*f, w*f)
        return F.pixel_shuffle(self.fc2(swish(self.fc1(z))), self.f)


# -----------------------------------------------------------------------------
# The vector quantizer: nearest l2-normalised code, straight-through gradient


class VectorQuantizer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.beta = cfg.beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.code_dim)
        # LlamaGen's init: random directions, stored as unit vectors. Only directions matter (every
        # use normalises), but the norm sets how far one Adam step turns a code: at unit norm a
        # step of lr turns it by ~lr radians, at the raw init's norm (~0.003) by ~300x more
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))

    def codebook(self):  # (K, D), unit rows
        return F.normalize(self.embedding.weight, dim=-1)

    def forward(self, z):  # z: (B, D, h, w) encoder latents after quant_conv
        with torch.autocast(z.device.type, enabled=False):  # the code search stays fp32 under bf16 autocast
            B, D, h, w = z.shape
            z = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, D).float(), dim=-1)  # (N, D), N = B*h*w, raster order
            e = self.codebook()  # (K, D)
            # for unit vectors |z - e|^2 = 2 - 2 z.e, so the nearest code is the most similar one
            codes = (z @ e.t()).argmax(dim=-1)  # (N,)
            z_q = e[codes]  # (N, D)
            # the codebook loss pulls the chosen codes towards the (frozen) latents; the commitment
            # loss, weighted beta, pulls the latents towards their (frozen) codes so the encoder commits
            vq_loss = F.mse_loss(z_q, z.detach()) + self.beta * F.mse_loss(z, z_q.detach())
            # straight-through estimator: the forward value is z_q, the backward pass copies the
            # decoder's gradient onto z as if quantisation were the identity
            z_st = z + (z_q - z).detach()
        z_st = z_st.reshape(B, h, w, D).permute(0, 3, 1, 2)  # back to (B, D, h, w)
        return z_st, codes.reshape(B, h * w), vq_loss, z.detach()


# -----------------------------------------------------------------------------
# The VQ model: encoder -> quant_conv -> quantize -> post_quant_conv -> decoder


class VQModel(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = PatchDecoder(cfg) if cfg.local_decoder else Decoder(cfg)
        self.quantize = VectorQuantizer(cfg)
        # 1x1 convs between the wide conv features and the narrow (8-dim) code space
        self.quant_conv = nn.Conv2d(cfg.z_channels, cfg.code_dim, 1)
        self.post_quant_conv = nn.Conv2d(cfg.code_dim, cfg.z_channels, 1)
        # (the official checkpoint also holds a buffer `quantize.codebook_used` that nothing
        # reads; we leave it out: usage is monitored by the training loop below)

    def forward(self, pixels):
        """Training pass. pixels (B, 3, H, W) in [-1, 1] -> reconstruction (B, 3, H, W), vq loss,
        codes (B, h*w) and the normalised latents (B*h*w, D) for the dead-code restart."""
        z = self.quant_conv(self.encoder(pixels))  # (B, D, h, w)
        z_q, codes, vq_loss, latents = self.quantize(z)
        recon = self.decoder(self.post_quant_conv(z_q))
        return recon, vq_loss, codes, latents

    @torch.no_grad()
    def encode(self, pixels):  # (B, 3, H, W) in [-1, 1] -> codes (B, h*w), row-major: r * w + c
        return self.quantize(self.quant_conv(self.encoder(pixels)))[1]

    @torch.no_grad()
    def decode(self, codes):  # codes (B, h*w) -> pixels (B, 3, H, W), roughly in [-1, 1]
        B, n = codes.shape
        side = math.isqrt(n)
        assert side * side == n, f"{n} codes do not form a square grid"
        z_q = self.quantize.codebook()[codes].reshape(B, side, side, -1).permute(0, 3, 1, 2)
        return self.decoder(self.post_quant_conv(z_q))


VQ_MAKE = "python tokenizer.py --config CONFIG --out DIR"


def load_vq(path, device="cpu"):
    """A trained tokenizer from `OUT/vq.pt`, in eval mode; one-line errors for a bad file."""
    ckpt = load_checkpoint(path, keys=("config", "model"), make=VQ_MAKE, finite=True)  # weights only: runs no code
    model = VQModel(build(VQConfig, ckpt["config"], path, VQ_MAKE))
    load_weights(model, ckpt["model"], path, VQ_MAKE)
    return model.to(device).eval()


# -----------------------------------------------------------------------------
# Keeping the codebook alive: a usage monitor and a dead-code restart


def codebook_usage(codes, codebook_size):
    """Fraction of the codebook that `codes` (any shape) hit at least once."""
    return torch.unique(codes).numel() / codebook_size


@torch.no_grad()
def restart_dead_codes(quantizer, hits, latents, generator):
    """Re-initialise every code with hits == 0 (unused over the last window) to a recent encoder
    output. Gradient-trained codebooks lose codes: a code that no latent picks gets no gradient and
    never moves again. We pick the replacement latents k-means++ style, with probability
    proportional to their squared distance from their current nearest code, so new codes land
    where the codebook fits worst (on ShapeWorld: shape edges) rather than piling onto the plain
    background that most latents show. hits: (K,) counts; latents: (N, D) unit vectors.
    Returns the number of codes restarted."""
    dead = (hits == 0).nonzero().squeeze(1)  # (n_dead,)
    if len(dead) == 0:
        return 0
    e = quantizer.codebook()
    dist = (2 - 2 * (latents @ e.t()).max(dim=1).values).clamp(min=0) + 1e-12  # (N,) |z - nearest code|^2
    pick = torch.multinomial(dist.cpu(), len(dead), replacement=True, generator=generator)  # a CPU generator
    quantizer.embedding.weight[dead] = latents[pick.to(latents.device)]
    return len(dead)


# -----------------------------------------------------------------------------
# The toy world's text tokenizer: one token per word, special token or punctuation mark

SPECIAL_TOKENS = ["<pad>", "<bos>", "<eos>", "<|User|>:", "<|Assistant|>:",
                  "<begin_of_image>", "<end_of_image>", "<image_placeholder>", "\n"]
PUNCTUATION = ["...", ",", "."]  # longest first: "..." must not read as three "."
# the fixed phrases of the method (SPEC.md section 3), beyond the grammar's own words
PHRASES = ["Let me think Does this image match the prompt", "Next I will draw a new image",
           "Please generate an image", "Yes No", "Describe the image"]


class TextTokenizer:
    """Word-level and case-sensitive. The canonical spacing, which decode() writes and encode()
    insists on, is the one the project's strings use:
    - words are separated by one space; "," "." "..." stick to the word before them and are
      followed by a space when a word comes next;
    - "<|User|>:" is always followed by one space;
    - every other special token (and "\\n") is glued to its neighbours.
    >>> tok.decode(tok.encode("<|User|>: a red circle\\n\\n<|Assistant|>:<begin_of_image>"))
    '<|User|>: a red circle\\n\\n<|Assistant|>:<begin_of_image>'
    >>> tok.encode("No, the circle is green, not red.")  # 9 ids: No , the circle is green , not red .
    """

    def __init__(self, words):
        # a fixed order (specials, punctuation, then the sorted words) keeps ids stable across runs
        phrase_words = " ".join(PHRASES).split()
        self.vocab = SPECIAL_TOKENS + PUNCTUATION + sorted(set(words) | set(phrase_words))
        self.ids = {t: i for i, t in enumerate(self.vocab)}
        assert len(self.ids) == len(self.vocab), "a grammar word collides with a special token"
        self.words = set(self.vocab[len(SPECIAL_TOKENS) + len(PUNCTUATION):])
        self.pad, self.bos, self.eos, self.user, self.assistant, self.boi, self.eoi, self.img, self.newline = (
            self.ids[t] for t in SPECIAL_TOKENS)
        self.yes, self.no = self.ids["Yes"], self.ids["No"]
        self.split_special = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    def __len__(self):
        return len(self.vocab)

    def encode(self, text, bos=False, eos=False):
        ids = [self.bos] if bos else []
        # split out the special tokens first (odd chunks), then words and their trailing punctuation
        for i, chunk in enumerate(self.split_special.split(text)):
            if i % 2 == 1:
                ids.append(self.ids[chunk])
                continue
            for piece in chunk.split():
                word, punct = re.fullmatch(r"(.*?)(\.\.\.|,|\.)?", piece).groups()
                if word:
                    if word not in self.words:
                        raise ValueError(f"unknown word {word!r} in {text!r}")
                    ids.append(self.ids[word])
                if punct:
                    ids.append(self.ids[punct])
        # the round trip must be exact, so a string with other spacing is refused, not silently changed
        canonical = self.decode(ids[1:] if bos else ids)
        if canonical != text:
            raise ValueError(f"text {text!r} is not in the tokenizer's canonical spacing {canonical!r}")
        return ids + [self.eos] if eos else ids

    def decode(self, ids):
        tokens = [self.vocab[i] for i in ids]
        out = []
        for prev, t in zip([None] + tokens, tokens):
            if prev == "<|User|>:" or (t in self.words and (prev in self.words or prev in PUNCTUATION)):
                out.append(" ")
            out.append(t)
        return "".join(out)


# -----------------------------------------------------------------------------
# The real models' text tokenizer: DeepSeek's byte-level BPE, read from a model folder's tokenizer.json
# (the `tokenizers` library's format), in plain Python. tests/test_pretrained.py checks it id for id
# against `tokenizers` on a tokenizer.json of this shape trained in the test.


def byte_chars():
    """GPT-2's map of the 256 byte values to printable characters: byte-level BPE merges these, so
    every string, in any script, is spelt with 256 symbols and never needs an unknown token."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in keep]  # control bytes, space, ...: moved past 255
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(others)}}


BYTE_CHAR = byte_chars()
CHAR_BYTE = {c: b for b, c in BYTE_CHAR.items()}
# tokenizers' regexes (Oniguruma) read \s as Unicode White_Space; Python's \s also takes \x1c-\x1f
WHITE_SPACE = "[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
# the DeepSeek token names (janus_pro_facts.md: the bars are U+FF5C, the ▁ U+2581)
BPE_SPECIALS = dict(bos="<｜begin▁of▁sentence｜>", eos="<｜end▁of▁sentence｜>", pad="<｜▁pad▁｜>",
                    img="<image_placeholder>", boi="<begin_of_image>", eoi="<end_of_image>")


class BPETokenizer:
    """DeepSeek's tokenizer (Janus-Pro's): encode(text) does what `tokenizers` does with its tokenizer.json:
    1. the added tokens (BOS, <image_placeholder>, <begin_of_image>, ...) are cut out first, the
       longest match at the leftmost place; what lies between them goes on;
    2. pre-tokenizing: each regex Split cuts every piece into its matches and the gaps between them
       (DeepSeek: newlines, letter runs with one space before, punctuation runs, trailing space, CJK
       runs), then every digit becomes a piece of its own;
    3. each piece's UTF-8 bytes become BYTE_CHAR characters, and BPE merges adjacent symbols, the pair
       of lowest merge rank first, until no listed pair is left: the symbols are the tokens.
    Only the parts DeepSeek's tokenizer.json uses are written; any other is refused by name.
    Same interface as TextTokenizer: encode(text, bos, eos), decode(ids), len(), and the ids pad,
    bos, eos, img, boi, eoi, yes, no."""

    def __init__(self, path):
        if isinstance(path, dict):  # the file's contents, as a checkpoint carries them (sample.janus_checkpoint)
            spec, path = path, "tokenizer.json"
        else:
            try:
                with open(path, encoding="utf-8") as f:
                    spec = json.load(f)
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {path}: {e}") from None
        self.spec = spec
        model, norm = spec["model"], spec.get("normalizer")

        def need(ok, what):
            if not ok:
                raise ValueError(f"{path}: {what} is not supported (only DeepSeek's byte-level BPE is)")
        need(model.get("type") == "BPE" and not model.get("continuing_subword_prefix") and not model.get("end_of_word_suffix")
             and not model.get("dropout") and not model.get("byte_fallback"), f"model {model.get('type')} with these options")
        need(norm is None or norm == {"type": "Sequence", "normalizers": []}, f"normalizer {norm}")
        need((spec.get("decoder") or {}).get("type") == "ByteLevel", f"decoder {spec.get('decoder')}")
        self.token_ids = dict(model["vocab"])  # token string -> id
        # merges: "a b" strings (older files) or [a, b] pairs; rank = position in the list
        self.ranks = {tuple(m.split(" ") if isinstance(m, str) else m): r for r, m in enumerate(model["merges"])}
        self.ignore_merges = model.get("ignore_merges", False)  # a piece that is a whole token stays one
        self.cache = {}  # piece -> ids
        # added tokens, matched longest first: those not "normalized" before those that are, as tokenizers does
        added = spec.get("added_tokens", [])
        for t in added:
            need(not (t.get("lstrip") or t.get("rstrip") or t.get("single_word")), f"added token {t['content']!r} with strip/word options")
        self.added = {t["content"]: t["id"] for t in added}
        self.added_rx = [re.compile("|".join(re.escape(c) for c in sorted(group, key=len, reverse=True)))
                         for group in ([t["content"] for t in added if not t.get("normalized")],
                                       [t["content"] for t in added if t.get("normalized")]) if group]
        # the pre-tokenizer: one step, or a Sequence of them
        pre = spec.get("pre_tokenizer") or {"type": "Sequence", "pretokenizers": []}
        self.steps = []
        for step in pre["pretokenizers"] if pre["type"] == "Sequence" else [pre]:
            if step["type"] == "Split":
                need(step.get("behavior") == "Isolated" and not step.get("invert"), f"Split {step}")
                pattern = step["pattern"].get("Regex") or re.escape(step["pattern"]["String"])
                self.steps.append(("split", re.compile(pattern.replace(r"\s", WHITE_SPACE))))
            elif step["type"] == "Digits":
                self.steps.append(("digits", step.get("individual_digits", False)))
            else:
                need(step["type"] == "ByteLevel" and not step.get("add_prefix_space") and not step.get("use_regex", True),
                     f"pre-tokenizer {step}")
        self.vocab = [""] * (max([*self.token_ids.values(), *self.added.values()]) + 1)  # id -> token
        for t, i in {**self.token_ids, **self.added}.items():
            self.vocab[i] = t
        for name, content in BPE_SPECIALS.items():
            need(content in self.added, f"a tokenizer without the added token {content!r}")
            setattr(self, name, self.added[content])
        yes, no = self.encode("Yes"), self.encode("No")
        need(len(yes) == len(no) == 1, "a vocabulary without single tokens for Yes and No")
        self.yes, self.no = yes[0], no[0]

    def __len__(self):
        return len(self.vocab)

    def pieces(self, text):
        """Pre-tokenizing: text -> pieces, each merged on its own."""
        pieces = [text]
        for kind, arg in self.steps:
            out = []
            for p in pieces:
                if kind == "split":  # every match and every gap between matches, in order
                    pos = 0
                    for m in arg.finditer(p):
                        out += [p[pos:m.start()], m.group()]
                        pos = m.end()
                    out.append(p[pos:])
                else:  # digits (Unicode categories Nd, Nl, No): runs of them, or one each
                    for is_num, run in itertools.groupby(p, key=lambda c: unicodedata.category(c)[0] == "N"):
                        run = "".join(run)
                        out += list(run) if is_num and arg else [run]
            pieces = [p for p in out if p]
        return pieces

    def bpe(self, word):
        """A piece in BYTE_CHAR characters -> its token ids."""
        if word in self.cache:
            return self.cache[word]
        if self.ignore_merges and word in self.token_ids:
            return [self.token_ids[word]]
        symbols = list(word)
        while len(symbols) > 1:
            # the pair of lowest rank, merged everywhere it occurs, left to right
            rank, pair = min((self.ranks.get(pair, math.inf), pair) for pair in zip(symbols, symbols[1:]))
            if rank == math.inf:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        unknown = [s for s in symbols if s not in self.token_ids]
        if unknown:
            raise ValueError(f"the BPE vocabulary lacks {unknown[0]!r}")
        self.cache[word] = ids = [self.token_ids[s] for s in symbols]
        return ids

    def encode(self, text, bos=False, eos=False):
        ids = [self.bos] if bos else []
        chunks = [(text, None)]  # (text, None) or (added token, its id)
        for rx in self.added_rx:
            out = []
            for chunk, i in chunks:
                if i is not None:
                    out.append((chunk, i))
                    continue
                pos = 0
                for m in rx.finditer(chunk):
                    out += [(chunk[pos:m.start()], None), (m.group(), self.added[m.group()])]
                    pos = m.end()
                out.append((chunk[pos:], None))
            chunks = [(c, i) for c, i in out if c]
        for chunk, i in chunks:
            if i is not None:
                ids.append(i)
                continue
            for piece in self.pieces(chunk):
                ids += self.bpe("".join(BYTE_CHAR[b] for b in piece.encode("utf-8")))
        return ids + [self.eos] if eos else ids

    def decode(self, ids):
        # as tokenizers' ByteLevel decoder: a token spelt in BYTE_CHAR characters gives those bytes,
        # any other (DeepSeek's added tokens with U+FF5C in them) its own UTF-8
        out = b""
        for i in ids:
            t = self.vocab[i]
            out += bytes(CHAR_BYTE[c] for c in t) if all(c in CHAR_BYTE for c in t) else t.encode("utf-8")
        return out.decode("utf-8", errors="replace")


# -----------------------------------------------------------------------------
# Training the VQ on ShapeWorld (entry point)

# run settings per preset (the flags below override some). The learning rate warms up linearly,
# then follows a cosine down to lr / 10 at the last step.
TRAIN_PRESETS = {
    # tiny only has to be quick (the tests and the tiny pipeline); it reconstructs poorly
    # restart_until: the last step that restarts dead codes. The toy's 19 kinds of patch (18 objects
    # and the background) need fewer codes than it has: late restarts kept splitting a kind over a
    # fresh code, and the decoder chased codes that kept changing
    "tiny": dict(steps=150, batch_size=16, lr=1e-3, warmup=20, window=25, restart_until=150, eval_prompts=70),
    "toy": dict(steps=1600, batch_size=16, lr=2e-3, warmup=50, window=25, restart_until=800, eval_prompts=700),
    "small": dict(steps=1400, batch_size=16, lr=1e-3, warmup=50, window=50, restart_until=1400, eval_prompts=700),
}


def train_batch(seed, step, batch_size, size, grid=0):
    """The training images of one step, a pure function of (seed, step): a resumed run sees exactly
    the batches an uninterrupted one would have seen. (B, 3, size, size) in [-1, 1]."""
    rng = random.Random(f"vq-train-{seed}-{step}")  # string seeds never collide with the eval's
    # the grid world: up to half the cells hold an object, so each image teaches the decoder more
    # object patches (the encoder reads each patch alone: busier images are no other world to it)
    return to_tensor(shapes.random_images(rng, batch_size, size, grid, grid * grid // 2 if grid else shapes.MAX_OBJECTS))


def eval_set(n, size, grid=0):
    """Held-out (image, prompt) pairs: n prompts spread over the categories, each with one scene
    that matches it and one that does not. The seed space "vq-eval" is disjoint from training's."""
    rng = random.Random("vq-eval")
    prompts, images, matches = [], [], []
    for i in range(n):
        prompt = shapes.sample_prompt(rng, shapes.CATEGORIES[i % len(shapes.CATEGORIES)])
        for match in (True, False):
            prompts.append(prompt)
            images.append(shapes.render(shapes.sample_scene(rng, size, prompt, match, grid=grid)))
            matches.append(match)
    return prompts, np.stack(images), matches


@torch.no_grad()
def reconstruct(model, images, batch_size=256):  # uint8 (N, H, W, 3) -> codes (N, h*w), uint8 (N, H, W, 3)
    dev = model.quant_conv.weight.device
    codes = torch.cat([model.encode(to_tensor(images[i:i + batch_size]).to(dev)) for i in range(0, len(images), batch_size)])
    recon = np.concatenate([to_uint8(model.decode(codes[i:i + batch_size])) for i in range(0, len(codes), batch_size)])
    return codes, recon


def vq_metrics(model, n, size):
    """PSNR, codebook usage, checker agreement of the reconstructions, and the codes' entropy and
    number of background codes, on held-out scenes."""
    prompts, images, matches = eval_set(n, size, model.cfg.scene_grid)
    codes, recon = reconstruct(model.eval(), images)
    mse = np.mean((images.astype(np.float64) - recon.astype(np.float64)) ** 2)
    # the checker's verdict must survive the round trip, on matching and mismatching scenes alike
    same = np.array([shapes.check(a, p).verdict == shapes.check(b, p).verdict
                     for a, b, p in zip(images, recon, prompts)])
    matches = np.array(matches)
    by_category = {c: float(same[[p.category == c for p in prompts]].mean()) for c in shapes.CATEGORIES}
    # how predictable the codes are for the language model: their entropy, and how many different
    # codes the plain white background gets (1 is ideal: the same pixels, the same code)
    c = codes.numpy()  # (n, h*w)
    counts = np.bincount(c.reshape(-1), minlength=model.cfg.codebook_size)
    p = counts[counts > 0] / counts.sum()
    f = size // model.cfg.grid
    g = model.cfg.grid
    patches = images.reshape(len(images), g, f, g, f, 3).transpose(0, 1, 3, 2, 4, 5).reshape(len(images), g * g, -1)
    white = (patches == 255).all(-1)  # (n, h*w) patches with nothing drawn in them
    return dict(psnr=float(10 * np.log10(255**2 / mse)),
                usage=codebook_usage(codes, model.cfg.codebook_size),
                code_entropy=float(-(p * np.log(p)).sum()),
                background_codes=len(np.unique(c[white])),
                agreement=float(same.mean()), agreement_matching=float(same[matches].mean()),
                agreement_mismatching=float(same[~matches].mean()), agreement_by_category=by_category,
                pairs=len(same)), images, recon


def save_side_by_side(images, recon, path, scale=3):
    """A PNG with originals on the top row and their reconstructions below, scaled up to look at.
    Written to a temp file and renamed, like every artefact here, so none is ever half-written."""
    grid = np.concatenate([np.concatenate(list(images), axis=1), np.concatenate(list(recon), axis=1)], axis=0)
    grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    tmp = f"{path}.tmp.png"
    Image.fromarray(grid).save(tmp)
    os.replace(tmp, path)


def main(argv=None):
    parser = Parser(description="Train the VQ image tokenizer on ShapeWorld scenes.")
    # what to train and where
    parser.add_argument("--config", choices=list(TRAIN_PRESETS), default="toy", help="tokenizer preset (VQ_PRESETS)")
    parser.add_argument("--out", required=True, help="run folder: writes vq.pt, vq_eval.json, vq_recon.png "
                        "(vq_state.pt while training: rerun the same command to resume)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the init and of every training batch")
    # optimisation (defaults come from TRAIN_PRESETS[config])
    parser.add_argument("--steps", type=pos_int, help="total optimizer steps (the lr schedule spans them)")
    parser.add_argument("--batch-size", type=pos_int, help="images per step")
    parser.add_argument("--lr", type=pos_float, help="peak Adam learning rate (linear warm-up, then cosine to lr/10)")
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help=DTYPE_HELP)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    # monitoring and evaluation
    parser.add_argument("--ckpt-every", type=pos_int, default=100, help="save the resumable state every N steps")
    parser.add_argument("--eval-prompts", type=pos_int, help="held-out prompts (each gives a matching and a mismatching scene)")
    args = parser.parse_args(argv)
    try:
        train(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


def train(args):
    cfg = VQ_PRESETS[args.config]
    preset = TRAIN_PRESETS[args.config]
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    dev = pick_device(args.device)
    check_run_dir(args.out)
    # everything that shapes the training path; a state made with other values cannot be resumed
    run = dict(**asdict(cfg), seed=args.seed, steps=pick("steps"), batch_size=pick("batch_size"), lr=pick("lr"),
               warmup=preset["warmup"], window=preset["window"],
               restart_until=preset["restart_until"], bf16=use_bf16(args.dtype, dev))

    torch.manual_seed(args.seed)  # the only use of the global RNG: the init
    # channels-last: CPU convolutions run faster on NHWC
    model = VQModel(cfg).to(dev, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, run["lr"])  # LlamaGen's betas, no weight decay
    # the codebook's health: code hits in the current window, the usage of the last one
    health = {"hits": torch.zeros(cfg.codebook_size, dtype=torch.long, device=dev), "usage": float("nan")}

    def batch_fn(step, micro):
        # the images of a step are a function of (seed, step): a resumed run sees the same batches
        x = train_batch(args.seed, step, run["batch_size"], cfg.image_size, cfg.scene_grid).to(dev)  # (B, 3, H, W)
        return x.contiguous(memory_format=torch.channels_last), "loss"

    def loss_fn(x):
        recon, vq_loss, codes, health["latents"] = model(x)
        health["hits"] += torch.bincount(codes.flatten(), minlength=cfg.codebook_size)
        return F.mse_loss(recon.float(), x) + vq_loss

    def after_step(step):
        # at the end of each window: measure usage over it, restart the codes it never used
        if step % run["window"] == 0:
            health["usage"] = (health["hits"] > 0).float().mean().item()
            gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)  # a function of (seed, step) too
            if step <= run["restart_until"]:
                restart_dead_codes(model.quantize, health["hits"], health["latents"], gen)
            health["hits"].zero_()
        return {"usage": health["usage"]}

    def set_health(saved):
        health["hits"], health["usage"] = saved["hits"].to(dev), saved["usage"]

    plan = Plan(run["steps"], run["lr"], run["warmup"], clip=None, bf16=run["bf16"], ckpt_every=args.ckpt_every,
                desc=f"vq {args.config} {'bf16' if run['bf16'] else 'fp32'}")
    get_health = lambda: {"hits": health["hits"].cpu(), "usage": health["usage"]}
    state_path = os.path.join(args.out, "vq_state.pt")
    # the dtype may differ (a resume on another machine): the run's path is the same
    state = load_state(state_path, "vq_state", run, ignore=("bf16",))
    step, seconds, _ = fit(batch_fn, loss_fn, optimizer, model.parameters(), {"model": model}, plan, state_path,
                           "vq_state", run, state, after_step=after_step, extra_state=(get_health, set_health))

    # the artefact the other stages load: weights and config only
    model.cpu()
    vq_path = os.path.join(args.out, "vq.pt")
    save_checkpoint(dict(model=model.state_dict(), config=asdict(cfg), step=step), vq_path)
    result, images, recon = vq_metrics(model, pick("eval_prompts"), cfg.image_size)
    # the receipt run.py checks before reusing this stage: which config made which vq.pt
    result.update(config=args.config, step=step, train_seconds=round(seconds, 1),
                  made=stage_receipt(args.out, args.config, run), ckpt=digest(vq_path))
    save_side_by_side(images[:16], recon[:16], os.path.join(args.out, "vq_recon.png"))
    write_json(result, os.path.join(args.out, "vq_eval.json"), indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
