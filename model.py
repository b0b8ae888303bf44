"""
The Janus-Pro unified transformer (SPEC.md section 2), from scratch, in one file.

One decoder-only Llama (RMSNorm, RoPE, SwiGLU, untied text head) reads a single sequence that
mixes text and images, with *decoupled visual encoding*:
- understanding path: pixels -> SigLIP-style ViT -> `aligner` (Linear-GELU-Linear) -> LLM inputs;
- generation path: VQ code ids -> `gen_embed` -> `gen_aligner` -> LLM inputs, and the final hidden
  state -> `gen_head` -> logits over the VQ codebook (the text head `lm_head` is never used there).
The toy rungs add one thing Janus-Pro has not: a learned vector per image position (`image_pos`),
added to an image's tokens on both paths, so that a token knows its row and column.
The VQ tokenizer itself (`gen_vision_model`) lives in tokenizer.py.

How the pieces are used (SFT, RL and the sampler all go through these four calls):
    x = model.embed(idx, und_pixels=..., und_mask=..., gen_ids=..., gen_mask=..., gen_pos=...)  # (B, T, D)
    h = model(x, cache=None, start_pos=0, key_mask=None)                            # (B, T, D)
    model.text_logits(h) / model.image_logits(h)                                    # fp32 logits
    model.token_losses(h, text_targets, image_targets)                              # (B, T) fp32
The file reads top to bottom: config -> norm -> rope -> attention -> mlp -> block -> ViT -> heads ->
model -> checkpoints (one table of key names for the official and the transformers layout;
load_pretrained reads either folder) -> the same model in Hugging Face transformers (the
reference the tests compare against and bench.py times).
"""

import json
import math
import os
import re
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

# -----------------------------------------------------------------------------
# config


@dataclass
class JanusConfig:
    # language model (Llama)
    vocab_size: int = 256  # text vocabulary (embedding rows = lm_head rows)
    n_layer: int = 6
    n_head: int = 4
    n_kv_head: int = 4  # < n_head gives grouped-query attention; Janus-Pro itself is MHA
    n_embd: int = 256
    ffn_hidden: int = 704  # SwiGLU intermediate width
    rope_theta: float = 10000.0
    rms_eps: float = 1e-6
    max_seq_len: int = 512  # longest sequence; the default KV cache length
    # understanding path (SigLIP ViT on pixels in [-1, 1])
    image_size: int = 64
    vit_patch: int = 8
    vit_width: int = 128
    vit_layers: int = 4
    vit_heads: int = 4
    vit_mlp: int = 512
    aligner_depth: int = 2  # Linears in the aligner (ViT -> LLM); 2 in every released model
    # generation path (ids of the VQ tokenizer's codebook)
    image_vocab_size: int = 512  # VQ codebook size = gen_head outputs
    image_code_dim: int = 8  # width of the gen_embed table
    image_tokens: int = 64  # sequence positions one image takes, on either path
    # the ShapeWorld the toy rungs train on: 0 objects anywhere, N objects centred in an N x N grid
    # of VQ patches (shapes.GRID_FILL); the real shapes never read it
    scene_grid: int = 0
    # the default guidance weight w of image sampling (sample.Options.cfg None): the paper's 5. The
    # grid-world toy uses 2: there one object is one token, and w = 5 multiplies objects (5.5 per
    # image after SFT, first-image accuracy 0.09 against 0.38 at w = 2; docs/experiments.md)
    guidance: float = 5.0
    gen_aligner_depth: int = 2  # Linears in gen_aligner (codes -> LLM)
    gen_head_width: int = 0  # width inside gen_head; 0 = n_embd, as in every released model
    tie_embeddings: bool = False  # lm_head shares embed_tokens' weight (transformers' default; not Janus-Pro)
    # a learned vector per image position (image_tokens, D), added to an image's tokens on both paths,
    # as DALL-E's row and column embeddings. Janus-Pro has none (RoPE alone says where a token sits);
    # the grid-world toy uses it so that a token knows its column (docs/experiments.md, "Where an image
    # token sits"). It trains as the other matrices do (weight decay, the base lr)
    image_pos: bool = False
    # kernels: PyTorch's fused scaled_dot_product_attention, or the plain-math reference
    sdpa: bool = True

    def __post_init__(self):
        assert self.n_embd % self.n_head == 0 and self.n_head % self.n_kv_head == 0
        assert self.vit_width % self.vit_heads == 0 and self.image_size % self.vit_patch == 0
        # Janus gives an image the same number of positions whichever path it enters by
        # (384 px / 16 = 24x24 = 576 for both the ViT and the VQ), so the sequence layout needs one number
        assert (self.image_size // self.vit_patch) ** 2 == self.image_tokens
        assert self.aligner_depth >= 1 and self.gen_aligner_depth >= 1 and self.gen_head_width >= 0

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# Presets as plain data. The toy rungs share one 256-row text vocabulary (the word-level
# tokenizer fits in it, padded); the last two are the official shapes (janus_pro_facts.md).
PRESETS = {
    "tiny": dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, ffn_hidden=176,
                 max_seq_len=256, image_size=32, vit_patch=8, vit_width=64, vit_layers=2,
                 vit_heads=4, vit_mlp=256, image_vocab_size=256, image_tokens=16, image_pos=True),
    "toy": dict(vocab_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=192, ffn_hidden=512,
                max_seq_len=512, image_size=64, vit_patch=16, vit_width=128, vit_layers=4,
                vit_heads=4, vit_mlp=512, image_vocab_size=1024, image_tokens=16, scene_grid=4,
                guidance=2.0, image_pos=True),
    "small": dict(vocab_size=256, n_layer=12, n_head=12, n_kv_head=12, n_embd=768,
                  ffn_hidden=2112, max_seq_len=1024, image_size=64, vit_patch=8, vit_width=384,
                  vit_layers=6, vit_heads=6, vit_mlp=1536, image_vocab_size=1024, image_tokens=64),
    "janus-pro-1b": dict(vocab_size=102400, n_layer=24, n_head=16, n_kv_head=16, n_embd=2048,
                         ffn_hidden=5632, max_seq_len=4096, image_size=384, vit_patch=16,
                         vit_width=1024, vit_layers=24, vit_heads=16, vit_mlp=4096,
                         image_vocab_size=16384, image_tokens=576),
    "janus-pro-7b": dict(vocab_size=102400, n_layer=30, n_head=32, n_kv_head=32, n_embd=4096,
                         ffn_hidden=11008, max_seq_len=4096, image_size=384, vit_patch=16,
                         vit_width=1024, vit_layers=24, vit_heads=16, vit_mlp=4096,
                         image_vocab_size=16384, image_tokens=576),
}


def image_cost(cfg, prompt_len=32, cache_bytes=2):
    """What drawing one image with CFG costs, counted from the shapes: two rows (the prompt and its
    unconditional twin) of prompt_len tokens prefilled, then the image's N tokens one at a time
    through the KV cache (N - 1 fed back; the last is only drawn). flops: the matmuls of the LLM,
    the attention (the prefill scores all P x P pairs, a decoded token its prefix), gen_head at the
    N drawing positions and gen_aligner on the fed codes; the VQ decode is not in it. kv_bytes:
    the KV cache per token per row (k and v of every layer, cache_bytes each: 2 in bf16).
    janus-pro-7b: 15.15 TFLOP and 480 KiB (janus_pro_facts.md), 1B 3.16 TFLOP and 192 KiB."""
    D, hd, L, N, P = cfg.n_embd, cfg.head_dim, cfg.n_layer, cfg.image_tokens, prompt_len
    block = D * cfg.n_head * hd * 2 + 2 * D * cfg.n_kv_head * hd + 3 * D * cfg.ffn_hidden  # q, o; k, v; SwiGLU
    fed = N - 1
    pairs = P * P + sum(P + i + 1 for i in range(fed))  # (query, key) pairs scored, per layer and head
    W = cfg.gen_head_width or D
    per_row = (2 * L * block * (P + fed) + 4 * L * cfg.n_head * hd * pairs  # QK^T and the weighted sum: 2 hd each
               + 2 * N * (D * W + W * cfg.image_vocab_size)
               + 2 * fed * (cfg.image_code_dim * D + (cfg.gen_aligner_depth - 1) * D * D))
    return dict(flops=2 * per_row, kv_bytes=2 * L * cfg.n_kv_head * hd * cache_bytes)


# -----------------------------------------------------------------------------
# language model pieces: RMSNorm, RoPE, attention (+ KV cache), SwiGLU, the block


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 (as Llama does) even when the rest runs in bf16
        return F.rms_norm(x.float(), self.weight.shape, eps=self.eps).type_as(x) * self.weight


def rope_cos_sin(pos, head_dim, theta):
    """Rotary angles for integer positions pos (..., T) -> cos, sin (..., T, hs) in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=pos.device).float() / head_dim)
    freqs = pos.float()[..., None] * inv_freq  # (..., T, hs/2): position p turns pair i by p * theta^(-2i/hs)
    # "rotate_half" layout (Hugging Face Llama): channel i pairs with channel i + hs/2
    emb = torch.cat([freqs, freqs], dim=-1)  # (..., T, hs)
    return emb.cos(), emb.sin()


def apply_rope(x, cos, sin):
    """Rotate each (x_i, x_{i+hs/2}) pair of x (B, nh, T, hs) by its position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos.type_as(x) + torch.cat([-x2, x1], dim=-1) * sin.type_as(x)


class KeyRule:
    """The mask in the Triton kernel's compact form (attention.py): causal, query 0 at absolute
    position q_off (an int, or a 0-d tensor in static decoding), key_mask (B, Tk) or None."""

    def __init__(self, key_mask, q_off):
        self.key_mask, self.q_off = key_mask, q_off


def attend(q, k, v, mask=None, causal=False, sdpa=True):
    """softmax(q k^T / sqrt(hs)) v.  q (B, nh, T, hs), k v (B, nkv, Tk, hs) -> (B, nh, T, hs).
    mask: bool, broadcastable to (B, nh, T, Tk), True = may attend; or a KeyRule: attention.py's
    Triton kernel. causal: lower triangle (T == Tk)."""
    if isinstance(mask, KeyRule):
        import attention  # here, not at the top: importing triton costs every command half a second
        return attention.flash_attention(q, k, v, mask.key_mask, True, mask.q_off)
    if q.requires_grad and q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # PyTorch's CPU flash-attention backward is several times slower in bf16 than in fp32
        # (docs/experiments.md), so training under CPU autocast runs attention in fp32 (also more exact)
        with torch.autocast("cpu", enabled=False):
            return attend(q.float(), k.float(), v.float(), mask, causal, sdpa).type_as(q)
    if sdpa:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                              enable_gqa=k.size(1) != q.size(1))
    # the plain-math reference path, what SDPA computes without fusing it
    rep = q.size(1) // k.size(1)  # GQA: each kv head serves `rep` consecutive query heads
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    att = (q @ k.transpose(-2, -1)) / math.sqrt(q.size(-1))  # (B, nh, T, Tk)
    if causal:
        mask = torch.ones(q.size(2), k.size(2), dtype=torch.bool, device=q.device).tril()
    if mask is not None:
        att = att.masked_fill(~mask, float("-inf"))
    att = F.softmax(att.float(), dim=-1).type_as(q)
    return att @ v


class KVCache:
    """Keys and values, preallocated: k[i] and v[i] are layer i's (B, nkv, max_len, hs). Decoding
    writes the new positions in place; nothing is concatenated or reallocated per step. One tensor
    per layer, not one stacked tensor: a compiled decoding step (sample.py, --compile) then writes
    each layer's slot in place, where a stacked tensor made it copy the whole cache per layer
    (measured on toy: 20 ms per step against 8)."""

    def __init__(self, n_layer, batch, n_kv_head, max_len, head_dim, device=None, dtype=None):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]

    def rows(self, sl):
        """A view on some rows (batch slice sl): writes through it land in this cache."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = [t[sl] for t in self.k], [t[sl] for t in self.v]
        return view

    def copy_from(self, src, rows, length):
        """Positions [0, length) of every row of this cache <- those of src's rows `rows`."""
        for dst, s in zip(self.k + self.v, src.k + src.v):
            dst[:, :, :length] = s[rows, :, :length]


class Attention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.sdpa = cfg.sdpa
        # one matmul for q, k and v (the checkpoint's q_proj, k_proj, v_proj stacked by rows)
        self.qkv = nn.Linear(cfg.n_embd, (cfg.n_head + 2 * cfg.n_kv_head) * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)

    def forward(self, x, rope, mask, kv=None, start_pos=0):
        B, T, C = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, self.head_dim).transpose(1, 2)  # (B, nh + 2 nkv, T, hs)
        # q and k heads rotated in one go (fewer small ops per decoding step), then split
        q, k = apply_rope(qkv[:, :nh + nkv], *rope).split([nh, nkv], dim=1)  # (B, nh, T, hs), (B, nkv, T, hs)
        v = qkv[:, nh + nkv:]  # (B, nkv, T, hs)
        if kv is not None and torch.is_tensor(start_pos):
            # static decoding (T == 1, start_pos a 0-d tensor): write the slot, attend over the whole
            # cache; the mask hides the slots not written yet, so every step has the same shapes
            cache_k, cache_v = kv  # (B, nkv, max_len, hs) each, this layer's
            cache_k.index_copy_(2, start_pos.view(1), k)
            cache_v.index_copy_(2, start_pos.view(1), v)
            k, v = cache_k, cache_v
        elif kv is not None:
            # write this chunk into the cache, then attend over everything cached so far
            cache_k, cache_v = kv  # (B, nkv, max_len, hs) each, this layer's
            end = start_pos + T
            cache_k[:, :, start_pos:end] = k
            cache_v[:, :, start_pos:end] = v
            k, v = cache_k[:, :, :end], cache_v[:, :, :end]  # (B, nkv, Tk, hs), views
        # no mask means plain causal for a fresh sequence, or "see every key" for one new token
        y = attend(q, k, v, mask, causal=mask is None and T > 1, sdpa=self.sdpa)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, nh * hs)
        return self.o_proj(y)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm Llama block: x += attn(norm(x)); x += mlp(norm(x))."""

    def __init__(self, cfg):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x, rope, mask, kv=None, start_pos=0):
        x = x + self.attn(self.attn_norm(x), rope, mask, kv, start_pos)
        return x + self.mlp(self.mlp_norm(x))


# -----------------------------------------------------------------------------
# understanding path: SigLIP-style ViT (no class token, every patch token used)


class VisionAttention(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_head, self.sdpa = cfg.vit_heads, cfg.sdpa
        self.qkv = nn.Linear(cfg.vit_width, 3 * cfg.vit_width)  # SigLIP's attention has biases
        self.proj = nn.Linear(cfg.vit_width, cfg.vit_width)

    def forward(self, x):
        B, N, C = x.shape
        qkv = self.qkv(x).view(B, N, 3, self.n_head, C // self.n_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)  # 3 x (B, nh, N, hs)
        y = attend(q, k, v, sdpa=self.sdpa)  # bidirectional: every patch sees every patch
        return self.proj(y.transpose(1, 2).reshape(B, N, C))


class VisionMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc1 = nn.Linear(cfg.vit_width, cfg.vit_mlp)
        self.fc2 = nn.Linear(cfg.vit_mlp, cfg.vit_width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))  # exact (erf) GELU, as the official timm SigLIP


class VisionBlock(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.vit_width, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.vit_width, eps=1e-6)
        self.mlp = VisionMLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        # a p x p conv with stride p = one linear map per non-overlapping patch
        self.patch_embed = nn.Conv2d(3, cfg.vit_width, cfg.vit_patch, stride=cfg.vit_patch)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.image_tokens, cfg.vit_width))
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.vit_layers))
        self.norm = nn.LayerNorm(cfg.vit_width, eps=1e-6)

    def forward(self, pixels):  # (N, 3, H, W) in [-1, 1]
        pixels = pixels.to(self.patch_embed.weight.dtype)  # fp32 images into a bf16 model
        x = self.patch_embed(pixels).flatten(2).transpose(1, 2)  # (N, h*w, C), row-major patches
        x = x + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.norm(x)  # Janus takes the final-normed features of all patches


# -----------------------------------------------------------------------------
# the adapters between the two visual paths and the LLM


class MlpProjector(nn.Module):
    """Linear, then (GELU, Linear) x (depth - 1): `aligner` (ViT width -> D) and `gen_aligner`
    (code dim -> D). Depth 2 (Linear -> GELU -> Linear) in every released model."""

    def __init__(self, d_in, d_out, depth=2):
        super().__init__()
        layers = [nn.Linear(d_in, d_out)]
        for _ in range(depth - 1):
            layers += [nn.GELU(), nn.Linear(d_out, d_out)]
        self.layers = nn.Sequential(*layers)  # keys layers.0, layers.2, ... as the official ones

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    """The image head: final hidden state -> Linear -> GELU -> logits over the VQ codebook."""

    def __init__(self, d, width, image_vocab_size):
        super().__init__()
        self.output_mlp_projector = nn.Linear(d, width)
        self.vision_head = nn.Linear(width, image_vocab_size)

    def forward(self, h):
        return self.vision_head(F.gelu(self.output_mlp_projector(h)))


# -----------------------------------------------------------------------------
# the whole model


def attention_mask(T, start_pos, key_mask, device):
    """Boolean (B, 1, T, Tk) mask for T new queries at absolute positions start_pos..start_pos+T-1
    over Tk = start_pos + T keys, or None when the kernel's plain causal rule (fresh sequence) or
    "see all keys" (a single new token) is already right."""
    if key_mask is None and (start_pos == 0 or T == 1):
        return None
    if T == 1:  # one new token (decoding): every real key, and itself
        mask = key_mask[:, :start_pos + 1].clone()
        mask[:, -1] = True
        return mask[:, None, None]  # (B, 1, 1, Tk)
    q_pos = torch.arange(start_pos, start_pos + T, device=device)[:, None]  # (T, 1)
    k_pos = torch.arange(start_pos + T, device=device)[None, :]  # (1, Tk)
    mask = (k_pos <= q_pos)[None]  # (1, T, Tk) causal
    if key_mask is not None:
        # hide pad keys, but let every query see itself so no softmax row is empty (all -inf = NaN)
        mask = (mask & key_mask[:, None, :]) | (k_pos == q_pos)[None]  # (B, T, Tk)
    return mask[:, None]


class Janus(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        # understanding path
        self.vision_model = VisionTransformer(cfg)
        self.aligner = MlpProjector(cfg.vit_width, cfg.n_embd, cfg.aligner_depth)
        # generation path: a separate embedding table for code ids (not the VQ's own codebook)
        self.gen_embed = nn.Embedding(cfg.image_vocab_size, cfg.image_code_dim)
        self.gen_aligner = MlpProjector(cfg.image_code_dim, cfg.n_embd, cfg.gen_aligner_depth)
        self.gen_head = GenHead(cfg.n_embd, cfg.gen_head_width or cfg.n_embd, cfg.image_vocab_size)
        # zeros: a model given the table starts out as the model without it
        self.image_pos = nn.Parameter(torch.zeros(cfg.image_tokens, cfg.n_embd)) if cfg.image_pos else None
        # the language model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as Janus-Pro
        self.apply(self._init_weights)
        # unit-scale code vectors: at std 0.02 the 8-wide gen_embed would feed ~0 into the LLM
        nn.init.normal_(self.gen_embed.weight, mean=0.0, std=1.0)
        if cfg.tie_embeddings:  # one Parameter in both places (the text head reads the input table)
            self.lm_head.weight = self.embed_tokens.weight
        # the language model's attention kernel: "sdpa", "math" (the reference) or "triton" (set_attention)
        self.attention = "sdpa" if cfg.sdpa else "math"
        # activation checkpointing (sft.py / rl.py --checkpointing): a block keeps only its input for
        # backward and runs again there, so activations cost one (B, T, D) per layer, at ~1/3 more compute
        self.checkpointing = False

    def set_attention(self, kind):
        """The language model's attention: "sdpa" (PyTorch's fused kernels), "math" (the plain
        reference) or "triton" (attention.py's flash attention: a CUDA GPU with triton, or CPU
        tensors under TRITON_INTERPRET=1). The ViT stays on SDPA / math."""
        if kind not in ("sdpa", "math", "triton"):
            raise ValueError(f"unknown attention kernel {kind!r}: sdpa, math or triton")
        if kind == "triton":
            import attention  # only now: importing triton costs every command half a second
            if not attention.available():
                raise ValueError("--attn triton needs the triton package (pip install triton; Linux)")
        self.attention = kind
        for block in self.layers:
            block.attn.sdpa = kind != "math"
        return self

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if getattr(module, "bias", None) is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, VisionTransformer):
            nn.init.normal_(module.pos_embed, mean=0.0, std=0.02)

    # --- inputs: text ids, pixels and image code ids -> one sequence of embeddings

    def embed_pixels(self, pixels):
        """Understanding path: (N, 3, H, W) pixels in [-1, 1] -> (N, image_tokens, D)."""
        x = self.aligner(self.vision_model(pixels))
        return x if self.image_pos is None else x + self.image_pos

    def embed_image_ids(self, ids, pos=None):
        """Generation path: VQ code ids (any shape) -> (..., D). The sampler calls this per token.
        pos: where in its image each code sits (0..image_tokens-1; an int or a tensor shaped as ids),
        needed only by a model with cfg.image_pos."""
        x = self.gen_aligner(self.gen_embed(ids))
        if self.image_pos is None:
            return x
        assert pos is not None, "cfg.image_pos: embed_image_ids needs each code's place in its image"
        pos = torch.as_tensor(pos, device=ids.device)
        return x + F.embedding(pos, self.image_pos)  # a lookup, not [pos]: a compiled step's 0-d pos stays a tensor

    def embed(self, idx, und_pixels=None, und_mask=None, gen_ids=None, gen_mask=None, gen_pos=None):
        """Embeddings (B, T, D) of a mixed sequence. idx (B, T) holds text ids (anything valid at
        image positions, e.g. pad). Positions where und_mask (B, T) is True get the ViT features of
        und_pixels (N, 3, H, W), image after image, patches in raster order; positions where
        gen_mask is True get gen_ids (codes of those positions in the same row-major order), each
        at its place in its image gen_pos (shaped as gen_ids; None: whole images, in order)."""
        x = self.embed_tokens(idx)
        if und_pixels is not None:
            feats = self.embed_pixels(und_pixels)  # (N, image_tokens, D)
            assert int(und_mask.sum()) == feats.shape[0] * feats.shape[1], "und_mask vs images"
            x[und_mask] = feats.reshape(-1, x.size(-1)).to(x.dtype)
        if gen_ids is not None:
            assert int(gen_mask.sum()) == gen_ids.numel(), "gen_mask vs gen_ids"
            if gen_pos is None and self.image_pos is not None:
                gen_pos = torch.arange(gen_ids.numel(), device=gen_ids.device) % self.cfg.image_tokens
            x[gen_mask] = self.embed_image_ids(gen_ids.reshape(-1), None if gen_pos is None else gen_pos.reshape(-1)).to(x.dtype)
        return x

    # --- the transformer

    def make_cache(self, batch, max_len=None, dtype=None):
        """An empty KV cache on the model's device, in the weights' dtype unless told otherwise
        (under bf16 autocast pass dtype=torch.bfloat16, the dtype k and v come out in)."""
        cfg, w = self.cfg, self.lm_head.weight
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len or cfg.max_seq_len, cfg.head_dim,
                       device=w.device, dtype=dtype or w.dtype)

    def forward(self, x, cache=None, start_pos=0, key_mask=None):
        """Final hidden states (B, T, D), after the last RMSNorm, of input embeddings x (B, T, D)
        sitting at positions start_pos..start_pos+T-1 of the sequence (start_pos > 0 only with a
        cache holding the earlier positions). key_mask (B, start_pos + T), True = real token, is for
        padded batches: masked slots are never attended to and do not count as positions.
        start_pos as a 0-d tensor selects static decoding (see below; key_mask then spans the cache)."""
        T = x.size(1)
        if torch.is_tensor(start_pos):
            # static decoding: one new token per row at cache slot start_pos (a 0-d tensor, so the
            # shapes, and a compiled graph, are the same at every step); key_mask (B, max_len) spans
            # the whole cache and the mask built here also hides the slots after start_pos
            assert T == 1 and cache is not None and key_mask is not None, "static decoding: one token, cache, key_mask"
            slots = torch.arange(key_mask.size(1), device=x.device)
            seen = (key_mask & (slots <= start_pos)) | (slots == start_pos)  # (B, max_len)
            pos = (seen.sum(-1) - 1)[:, None, None]  # (B, 1, 1): the row's real tokens before this one
            mask = seen[:, None, None]  # (B, 1, 1, max_len)
        elif key_mask is None:
            pos = torch.arange(start_pos, start_pos + T, device=x.device)  # (T,)
        else:
            # a row's positions count only its real tokens, so masked slots (left padding, or holes
            # where a chunk was padded) are as if absent: RoPE sees the distances of the unpadded row
            pos = (key_mask.long().cumsum(-1)[:, start_pos:] - 1).clamp(min=0)[:, None]  # (B, 1, T)
        cos, sin = rope_cos_sin(pos, self.cfg.head_dim, self.cfg.rope_theta)
        # cast once to the dtype q and k will have (bf16 under autocast), not in every layer;
        # apply_rope's type_as still covers any other case
        dev = x.device.type
        dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
        rope = (cos.to(dt), sin.to(dt))
        if self.attention == "triton":  # the kernel applies the same rule from the compact form
            mask = KeyRule(key_mask if torch.is_tensor(start_pos) or key_mask is None else key_mask[:, :start_pos + T],
                           start_pos)
        elif not torch.is_tensor(start_pos):
            mask = attention_mask(T, start_pos, key_mask, x.device)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.checkpointing and cache is None and torch.is_grad_enabled():
                x = torch.utils.checkpoint.checkpoint(layer, x, rope, mask, use_reentrant=False)
            else:
                x = layer(x, rope, mask, kv, start_pos)
        return self.norm(x)

    # --- heads and the per-token loss (always fp32 before any softmax)

    def text_logits(self, h):
        return self.lm_head(h).float()

    def image_logits(self, h):
        return self.gen_head(h).float()

    def token_losses(self, h, text_targets=None, image_targets=None):
        """Per-token cross entropy (B, T), no reduction: the target at position t is the token that
        position t predicts (already shifted), -1 = no target. Text targets go through lm_head, image
        targets (VQ code ids) through gen_head, each head run only where it has a target.
        SFT takes a weighted mean of this; RL uses -losses as the per-token log-probs."""
        losses = torch.zeros(h.shape[:2], dtype=torch.float32, device=h.device)
        for targets, head in ((text_targets, self.text_logits), (image_targets, self.image_logits)):
            if targets is None:
                continue
            sel = targets >= 0  # (B, T)
            # gather first: the head (102400 or 16384 wide at full size) runs on n rows, not B*T
            logits = head(h[sel])  # (n, V) fp32
            losses[sel] = F.cross_entropy(logits, targets[sel], reduction="none")
        return losses


# -----------------------------------------------------------------------------
# checkpoints: one table of names, then loading a model folder (official DeepSeek or transformers)

# Our parameter names -> the official DeepSeek checkpoint's (janus_pro_facts.md) and transformers'
# JanusForConditionalGeneration's. First matching row wins. `#` is a number and `*` the rest of a
# name, both carried over; `@` is q, k, v: our fused qkv is three tensors there (but one in the
# official ViT); `&` is transformers' index of an aligner's hidden Linear (our layers.2 is its
# hidden_layers.0). `gen_vision_model.*` is the VQ tokenizer (tokenizer.VQModel, official names).
KEYS = [
    # ours                             official                                                 transformers
    ("embed_tokens.*",                 "language_model.model.embed_tokens.*",                   "model.language_model.embed_tokens.*"),
    ("layers.#.attn_norm.*",           "language_model.model.layers.#.input_layernorm.*",       "model.language_model.layers.#.input_layernorm.*"),
    ("layers.#.attn.qkv.*",            "language_model.model.layers.#.self_attn.@_proj.*",      "model.language_model.layers.#.self_attn.@_proj.*"),
    ("layers.#.attn.o_proj.*",         "language_model.model.layers.#.self_attn.o_proj.*",      "model.language_model.layers.#.self_attn.o_proj.*"),
    ("layers.#.mlp_norm.*",            "language_model.model.layers.#.post_attention_layernorm.*", "model.language_model.layers.#.post_attention_layernorm.*"),
    ("layers.#.mlp.*",                 "language_model.model.layers.#.mlp.*",                   "model.language_model.layers.#.mlp.*"),
    ("norm.*",                         "language_model.model.norm.*",                           "model.language_model.norm.*"),
    ("lm_head.*",                      "language_model.lm_head.*",                              "lm_head.*"),
    ("vision_model.patch_embed.*",     "vision_model.vision_tower.patch_embed.proj.*",          "model.vision_model.embeddings.patch_embedding.*"),
    ("vision_model.pos_embed",         "vision_model.vision_tower.pos_embed",                   "model.vision_model.embeddings.position_embedding.weight"),
    ("vision_model.blocks.#.norm1.*",  "vision_model.vision_tower.blocks.#.norm1.*",            "model.vision_model.encoder.layers.#.layer_norm1.*"),
    ("vision_model.blocks.#.norm2.*",  "vision_model.vision_tower.blocks.#.norm2.*",            "model.vision_model.encoder.layers.#.layer_norm2.*"),
    ("vision_model.blocks.#.attn.qkv.*", "vision_model.vision_tower.blocks.#.attn.qkv.*",       "model.vision_model.encoder.layers.#.self_attn.@_proj.*"),
    ("vision_model.blocks.#.attn.proj.*", "vision_model.vision_tower.blocks.#.attn.proj.*",     "model.vision_model.encoder.layers.#.self_attn.projection_layer.*"),
    ("vision_model.blocks.#.mlp.*",    "vision_model.vision_tower.blocks.#.mlp.*",              "model.vision_model.encoder.layers.#.mlp.*"),
    ("vision_model.norm.*",            "vision_model.vision_tower.norm.*",                      "model.vision_model.post_layernorm.*"),
    ("aligner.layers.0.*",             "aligner.layers.0.*",                                    "model.aligner.fc1.*"),
    ("aligner.layers.#.*",             "aligner.layers.#.*",                                    "model.aligner.hidden_layers.&.*"),
    ("gen_embed.*",                    "gen_embed.*",                                           "model.generation_embeddings.*"),
    ("gen_aligner.layers.0.*",         "gen_aligner.layers.0.*",                                "model.generation_aligner.fc1.*"),
    ("gen_aligner.layers.#.*",         "gen_aligner.layers.#.*",                                "model.generation_aligner.hidden_layers.&.*"),
    ("gen_head.output_mlp_projector.*", "gen_head.output_mlp_projector.*",                      "model.generation_head.proj_out.*"),
    ("gen_head.vision_head.*",         "gen_head.vision_head.*",                                "model.generation_head.vision_head.*"),
    # the VQ tokenizer: transformers names a level `down` / `up`, its residual blocks `block`
    ("gen_vision_model.encoder.conv_blocks.#.res.*", "gen_vision_model.encoder.conv_blocks.#.res.*", "model.vqmodel.encoder.down.#.block.*"),
    ("gen_vision_model.encoder.conv_blocks.*", "gen_vision_model.encoder.conv_blocks.*",        "model.vqmodel.encoder.down.*"),
    ("gen_vision_model.decoder.conv_blocks.#.res.*", "gen_vision_model.decoder.conv_blocks.#.res.*", "model.vqmodel.decoder.up.#.block.*"),
    ("gen_vision_model.decoder.conv_blocks.*", "gen_vision_model.decoder.conv_blocks.*",        "model.vqmodel.decoder.up.*"),
    ("gen_vision_model.*.mid.0.*",     "gen_vision_model.*.mid.0.*",                            "model.vqmodel.*.mid.block_1.*"),
    ("gen_vision_model.*.mid.1.*",     "gen_vision_model.*.mid.1.*",                            "model.vqmodel.*.mid.attn_1.*"),
    ("gen_vision_model.*.mid.2.*",     "gen_vision_model.*.mid.2.*",                            "model.vqmodel.*.mid.block_2.*"),
    ("gen_vision_model.*",             "gen_vision_model.*",                                    "model.vqmodel.*"),
]
# checkpoint keys with nothing to load into: the official ViT's attention-pooling head (never run)
# and the VQ's usage counter
IGNORED = ("vision_model.vision_tower.attn_pool.", "gen_vision_model.quantize.codebook_used")
_KEY_RX = [(re.compile(re.escape(ours).replace(r"\#", r"(\d+)").replace(r"\*", "(.*)") + "$"), official, hf)
           for ours, official, hf in KEYS]


def checkpoint_names(name, cfg, layout="official"):
    """Where our parameter `name` is stored in a checkpoint of `layout` ("official" or "hf"):
    [(key, rows)], rows the slice of our tensor's first dim that key holds (None = all of it).
    >>> checkpoint_names("layers.0.attn.qkv.weight", cfg)   # MHA, D = 256
    [('language_model.model.layers.0.self_attn.q_proj.weight', slice(0, 256)), (... k_proj ..., slice(256, 512)), ...]"""
    for rx, official, hf in _KEY_RX:
        m = rx.match(name)
        if m:
            break
    else:
        if name == "image_pos":
            raise ValueError("image_pos (cfg.image_pos, the toy's table of image positions) has no place in the official or HF layouts")
        raise ValueError(f"no checkpoint name for our parameter {name}")
    groups = iter(m.groups())
    key = re.sub(r"[#*&]", lambda c: str(int(next(groups)) // 2 - 1) if c.group() == "&" else next(groups),
                 official if layout == "official" else hf)
    if "@" not in key:
        return [(key, None)]
    # q, k, v stacked by rows: the LLM's k and v have n_kv_head heads (GQA), the ViT's all have its width
    hs = cfg.head_dim
    sizes = [cfg.n_head * hs, cfg.n_kv_head * hs, cfg.n_kv_head * hs] if name.startswith("layers.") else [cfg.vit_width] * 3
    ends = [sum(sizes[:i + 1]) for i in range(3)]
    return [(key.replace("@", p), slice(e - n, e)) for p, n, e in zip("qkv", sizes, ends)]


def _fit(t, shape, key):
    """t as `shape`, allowing only a leading 1 more or less (pos_embed: ours (1, N, C), transformers' (N, C))."""
    if t.shape == shape:
        return t
    strip = lambda s: tuple(s)[1:] if len(s) and s[0] == 1 else tuple(s)
    if strip(t.shape) != strip(shape):
        raise ValueError(f"{key} has shape {tuple(t.shape)}, the model expects {tuple(shape)}")
    return t.reshape(shape)


def _targets(model, layout, vq=None):
    """{checkpoint key: (our parameter, rows)} for every parameter of model (and vq). A tied lm_head
    is embed_tokens' Parameter, which named_parameters lists once, under embed_tokens."""
    params = dict(model.named_parameters())
    if vq is not None:
        params.update({"gen_vision_model." + k: p for k, p in vq.named_parameters()})
    return {key: (p, rows) for name, p in params.items() for key, rows in checkpoint_names(name, model.cfg, layout)}


@torch.no_grad()
def load_tensors(targets, tensors, where):
    """Copy (key, tensor) pairs, e.g. a shard's, into targets (see _targets), each tensor cast to its
    target's dtype as it goes. Raises, naming them, on missing or unexpected keys."""
    seen, unexpected = set(), []
    for key, t in tensors:
        if key.startswith(IGNORED):
            continue
        if key not in targets:
            unexpected.append(key)
            continue
        p, rows = targets[key]
        dst = p if rows is None else p[rows]
        dst.copy_(_fit(t, dst.shape, key))
        seen.add(key)
    missing = sorted(set(targets) - seen)
    if missing or unexpected:
        show = lambda keys: ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        raise ValueError(f"{where} does not fit this model: " + "; ".join(
            [f"missing {len(missing)} keys: {show(missing)}"] * bool(missing) +
            [f"unexpected {len(unexpected)} keys: {show(sorted(unexpected))}"] * bool(unexpected)))


def to_official(model):
    """Our state dict in the official layout (for exporting, and for tests)."""
    return {key: p.detach() if rows is None else p.detach()[rows] for key, (p, rows) in _targets(model, "official").items()}


def from_official(model, sd):
    """Split an official-layout state dict into (ours, vq): our state dict for `model` (q, k, v
    fused), and the VQ tokenizer's keys with `gen_vision_model.` stripped. The ViT's `attn_pool`
    head, which Janus never runs, is dropped. Raises on missing or unknown keys."""
    vq = {k[len("gen_vision_model."):]: v for k, v in sd.items() if k.startswith("gen_vision_model.")}
    ours = {k: torch.empty_like(v) for k, v in model.state_dict().items()}  # on the model's device (meta works)
    targets = {key: (ours[name], rows) for name in ours for key, rows in checkpoint_names(name, model.cfg)}
    load_tensors(targets, [(k, v) for k, v in sd.items() if not k.startswith("gen_vision_model.")], "the state dict")
    return ours, vq


def load_official(model, sd):
    """Load an official Janus-Pro state dict (e.g. torch.load(..., weights_only=True) of
    pytorch_model.bin) into `model`; returns the VQ tokenizer's part for tokenizer.py."""
    ours, vq = from_official(model, sd)
    model.load_state_dict(ours, strict=True)
    return vq


# Reading a model folder: config.json in either layout -> our configs; the weights, tensor by tensor

# the official config names its SigLIP by name (shapes from the official siglip_vit.py); a folder
# with another ViT (our small test folders) spells its shape out in vision_config.params, same keys
SIGLIP = {"siglip_large_patch16_384": dict(image_size=384, patch_size=16, width=1024, layers=24, heads=16, mlp_ratio=4)}


def _require(ok, what):
    if not ok:
        raise ValueError(f"config.json: {what} (this code has no such model)")


def configs_from_hf(c):
    """(JanusConfig, VQConfig fields) from a transformers Janus config.json (model_type "janus")."""
    t, v, q = c["text_config"], c["vision_config"], c["vq_config"]
    d, heads = t["hidden_size"], t["num_attention_heads"]
    rope = t.get("rope_parameters") or {"rope_theta": t.get("rope_theta", 10000.0)}  # transformers 5 / 4
    _require(rope.get("rope_type", "default") == "default", "RoPE scaling")
    _require(t.get("head_dim", d // heads) == d // heads, "a head_dim other than hidden_size / heads")
    _require(not t.get("attention_bias") and not t.get("mlp_bias"), "biases in the language model")
    _require(t.get("hidden_act", "silu") == "silu" and v.get("hidden_act", "gelu") == q.get("hidden_act", "gelu") == "gelu",
             "other activations")
    _require(v.get("layer_norm_eps", 1e-6) == 1e-6 and not v.get("use_qk_norm") and v.get("attention_bias", True),
             "a ViT other than SigLIP's")
    # transformers' projection_dim is both aligners' output (= the LLM width) and gen_head's inner width
    _require(v["projection_dim"] == q["projection_dim"] == q["image_token_embed_dim"] == d, "projection_dim != hidden_size")
    _require(not q.get("double_latent") and q.get("in_channels", 3) == q.get("out_channels", 3) == 3, "another VQ")
    cfg = JanusConfig(vocab_size=t["vocab_size"], n_layer=t["num_hidden_layers"], n_head=heads,
                      n_kv_head=t.get("num_key_value_heads") or heads, n_embd=d, ffn_hidden=t["intermediate_size"],
                      rope_theta=rope["rope_theta"], rms_eps=t.get("rms_norm_eps", 1e-6),
                      max_seq_len=t.get("max_position_embeddings", 4096), image_size=v["image_size"],
                      vit_patch=v["patch_size"], vit_width=v["hidden_size"], vit_layers=v["num_hidden_layers"],
                      vit_heads=v["num_attention_heads"], vit_mlp=int(v["hidden_size"] * v["mlp_ratio"]),
                      aligner_depth=v["depth"], image_vocab_size=q["num_embeddings"], image_code_dim=q["embed_dim"],
                      image_tokens=v["num_image_tokens"], gen_aligner_depth=q["num_hidden_layers"],
                      tie_embeddings=c.get("tie_word_embeddings", True))  # transformers' JanusConfig ties by default
    mult = list(q["channel_multiplier"])
    grid = v["image_size"] // v["patch_size"]  # transformers decodes num_patches x num_patches codes
    vq = dict(image_size=grid * 2 ** (len(mult) - 1), ch=q["base_channels"], ch_mult=mult, enc_blocks=q["num_res_blocks"],
              dec_blocks=q["num_res_blocks"] + 1, z_channels=q["latent_channels"], code_dim=q["embed_dim"],
              codebook_size=q["num_embeddings"], norm_groups=32)
    return cfg, vq


def configs_from_official(c):
    """(JanusConfig, VQConfig fields) from an official DeepSeek config.json (model_type "multi_modality")."""
    t, vp = c["language_config"], c["vision_config"]["params"]
    ap, gp, hp = (c[k]["params"] for k in ("aligner_config", "gen_aligner_config", "gen_head_config"))
    vit = {**SIGLIP.get(vp["model_name"], {}), **vp}
    _require("width" in vit, f"an unknown ViT {vp['model_name']!r} (known: {list(SIGLIP)}, or give its shape in params)")
    _require(vp.get("select_layer", -1) == -1 and vp.get("select_feature", "same") == "same", "ViT features from another layer")
    _require(ap["projector_type"] == gp["projector_type"] == "mlp_gelu", "aligners other than mlp_gelu")
    d = t["hidden_size"]
    _require(ap["input_dim"] == vit["width"] and ap["n_embed"] == gp["n_embed"] == hp["n_embed"] == d, "aligner widths")
    _require(c["gen_vision_config"]["cls"] == "VQ-16", "a VQ other than VQ-16")
    heads, grid = t["num_attention_heads"], vit["image_size"] // vit["patch_size"]
    cfg = JanusConfig(vocab_size=t["vocab_size"], n_layer=t["num_hidden_layers"], n_head=heads,
                      n_kv_head=t.get("num_key_value_heads") or heads, n_embd=d, ffn_hidden=t["intermediate_size"],
                      rope_theta=t.get("rope_theta", 10000.0), rms_eps=t.get("rms_norm_eps", 1e-6),
                      max_seq_len=t.get("max_position_embeddings", 4096), image_size=vit["image_size"],
                      vit_patch=vit["patch_size"], vit_width=vit["width"], vit_layers=vit["layers"], vit_heads=vit["heads"],
                      vit_mlp=int(vit["width"] * vit["mlp_ratio"]), aligner_depth=ap.get("depth", 2),
                      image_vocab_size=hp["image_token_size"], image_code_dim=gp["input_dim"], image_tokens=grid**2,
                      gen_aligner_depth=gp.get("depth", 2), gen_head_width=hp["image_token_embed"] if hp["image_token_embed"] != d else 0)
    # the official code always builds the default VQ-16; our small test folders describe theirs in
    # gen_vision_config.params with tokenizer.VQConfig's field names
    vq = dict(image_size=vit["image_size"], code_dim=gp["input_dim"], codebook_size=hp["image_token_size"])
    vq.update({k: v for k, v in c["gen_vision_config"].get("params", {}).items()
               if k in ("image_size", "ch", "ch_mult", "enc_blocks", "dec_blocks", "z_channels", "norm_groups")})
    return cfg, vq


def pretrained_configs(path):
    """(JanusConfig, VQConfig, layout) of a model folder, layout "official" or "hf"."""
    from tokenizer import VQConfig, VQ_PRESETS
    file = os.path.join(path, "config.json")
    try:
        with open(file) as f:
            c = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read {file}: {e}") from None
    layout = "hf" if c.get("model_type") == "janus" else "official" if "language_config" in c else None
    if layout is None:
        raise ValueError(f"{file} is neither a transformers Janus config (model_type 'janus') nor an official one (language_config)")
    try:
        cfg, vq = (configs_from_hf if layout == "hf" else configs_from_official)(c)
    except KeyError as e:
        raise ValueError(f"{file} lacks {e}") from None
    vq = VQConfig(**{**asdict(VQ_PRESETS["vq16"]), **vq})
    _require(vq.num_tokens == cfg.image_tokens, f"the VQ makes {vq.num_tokens} codes an image, the LLM expects {cfg.image_tokens}")
    return cfg, vq, layout


def checkpoint_files(path):
    """The weight files of a model folder: the shards an index lists, or the one file."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if os.path.exists(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                return [os.path.join(path, s) for s in sorted(set(json.load(f)["weight_map"].values()))]
    for single in ("model.safetensors", "pytorch_model.bin"):
        if os.path.exists(os.path.join(path, single)):
            return [os.path.join(path, single)]
    raise ValueError(f"{path} holds no model.safetensors, pytorch_model.bin or index of shards")


def read_tensors(files):
    """(key, tensor) of every weight file, one tensor at a time: safetensors and mmap-ed torch files
    read a tensor only when it is copied, so memory holds the model plus at most one tensor (or one
    .bin shard's pages). Neither format can run code (weights_only=True)."""
    for file in files:
        if file.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    yield key, f.get_tensor(key)
        else:
            sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            yield from sd.items()
            del sd


def load_pretrained(path, dtype=None, device="cpu"):
    """(model, vq) from a model folder in the official DeepSeek layout (Janus-Pro-1B/7B, Janus-Pro-R1-7B:
    config.json + pytorch_model.bin or shards with an index) or in transformers' (what
    JanusForConditionalGeneration.save_pretrained writes: safetensors). The model in `dtype` (default
    fp32; torch.bfloat16 halves it) on `device`, in eval mode; the VQ tokenizer stays fp32 (its code search is fp32
    anyway). Both are built on the meta device and filled tensor by tensor: no second copy of the weights.
    Note: transformers' VQ `encode` picks codes by distance to the raw (unnormalised) codebook, ours
    (and the official LlamaGen) by cosine after l2-normalising both: the same codes when the codebook
    rows have unit norm. Decoding normalises in all three."""
    from tokenizer import VQModel
    cfg, vq_cfg, layout = pretrained_configs(path)
    with torch.device("meta"):
        model, vq = Janus(cfg).to(dtype or torch.float32), VQModel(vq_cfg)
    model, vq = model.to_empty(device=device), vq.to_empty(device=device)  # allocated where they will run
    if cfg.tie_embeddings:  # to_empty gives each module a Parameter of its own: tie them again
        model.lm_head.weight = model.embed_tokens.weight
    load_tensors(_targets(model, layout, vq), read_tensors(checkpoint_files(path)), path)
    return model.eval(), vq.eval()


# -----------------------------------------------------------------------------
# The peer reference: Hugging Face transformers' Janus with our shapes and weights, and one mixed
# batch both models take (tests/test_model.py checks logits and losses against it, bench.py times
# both); transformers is imported only inside, as nanoGPT's from_pretrained does


def hf_janus(cfg, vq=None):
    """A randomly initialised HF JanusForConditionalGeneration with cfg's shapes, and with vq's
    (a tokenizer.VQConfig) or else a small VQ, which neither benchmark runs."""
    from transformers import JanusConfig as HFJanusConfig
    from transformers import JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    assert cfg.gen_head_width in (0, cfg.n_embd), "transformers' gen head is n_embd wide inside"
    text = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, rms_norm_eps=cfg.rms_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=cfg.tie_embeddings)
    vision = JanusVisionConfig(hidden_size=cfg.vit_width, num_hidden_layers=cfg.vit_layers,
                               num_attention_heads=cfg.vit_heads, image_size=cfg.image_size,
                               patch_size=cfg.vit_patch, mlp_ratio=cfg.vit_mlp / cfg.vit_width,
                               projection_dim=cfg.n_embd, depth=cfg.aligner_depth, layer_norm_eps=1e-6,
                               num_image_tokens=cfg.image_tokens)
    shape = dict(base_channels=32, channel_multiplier=[1, 1], num_res_blocks=1, latent_channels=32)
    if vq is not None:  # transformers' VQ: GroupNorm(32), one more residual block per decoder level
        assert vq.norm_groups == 32 and vq.dec_blocks == vq.enc_blocks + 1 and not vq.local_encoder
        shape = dict(base_channels=vq.ch, channel_multiplier=list(vq.ch_mult), num_res_blocks=vq.enc_blocks,
                     latent_channels=vq.z_channels)
    vq = JanusVQVAEConfig(embed_dim=cfg.image_code_dim, num_embeddings=cfg.image_vocab_size,
                          projection_dim=cfg.n_embd, image_token_embed_dim=cfg.n_embd,
                          num_hidden_layers=cfg.gen_aligner_depth, **shape)
    config = HFJanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=cfg.tie_embeddings)
    config._attn_implementation = "sdpa"  # HF's fastest CPU attention, as ours
    return JanusForConditionalGeneration(config).eval()


@torch.no_grad()
def copy_to_hf(model, hf, vq=None):
    """Copy our weights (and the VQ tokenizer's) into the HF model, through KEYS; every HF
    parameter must be covered (its VQ's only when vq is given)."""
    theirs = hf.state_dict()  # tensors sharing the parameters' storage
    for key, (p, rows) in _targets(model, "hf", vq).items():
        src = p if rows is None else p[rows]
        theirs[key].copy_(_fit(src, theirs[key].shape, key))
    covered = set(_targets(model, "hf", vq)) | ({"lm_head.weight"} if model.cfg.tie_embeddings else set())
    left = [k for k in theirs if k not in covered and (vq is not None or not k.startswith("model.vqmodel."))]
    assert not left, left
    return hf


# one mixed batch: [text][image via ViT][text][image as VQ codes][text]


def make_batch(cfg, B, T, seed=0):
    """Random inputs and shifted targets for a Task-III-like row layout (SPEC.md section 4)."""
    n = cfg.image_tokens
    assert T >= 2 * n + 24, f"--seq must be at least {2 * n + 24} for this config"
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, T), generator=g)
    und_mask = torch.zeros(B, T, dtype=torch.bool)
    und_mask[:, 8:8 + n] = True
    gen_mask = torch.zeros(B, T, dtype=torch.bool)
    gen_mask[:, T - 8 - n:T - 8] = True
    pixels = torch.rand(B, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    gen_ids = torch.randint(0, cfg.image_vocab_size, (B, n), generator=g)
    # position t predicts token t+1: text after text through lm_head, codes through gen_head
    text_next, gen_next = ~(und_mask | gen_mask)[:, 1:], gen_mask[:, 1:]
    text_targets = torch.full((B, T), -1)
    text_targets[:, :-1][text_next] = idx[:, 1:][text_next]
    image_targets = torch.full((B, T), -1)
    image_targets[:, :-1][gen_next] = gen_ids.reshape(-1)
    return dict(idx=idx, und_pixels=pixels, und_mask=und_mask, gen_ids=gen_ids, gen_mask=gen_mask,
                text_targets=text_targets, image_targets=image_targets)


def ours_loss(model, b):
    x = model.embed(b["idx"], b["und_pixels"], b["und_mask"], b["gen_ids"], b["gen_mask"])
    losses = model.token_losses(model(x), b["text_targets"], b["image_targets"])
    return losses.sum() / ((b["text_targets"] >= 0).sum() + (b["image_targets"] >= 0).sum())


def hf_loss(hf, b):
    # the same splice and the same gathered heads, so only the model implementations differ
    m = hf.model
    x = m.language_model.embed_tokens(b["idx"])
    feats = m.get_image_features(b["und_pixels"]).pooler_output  # ViT + aligner
    x[b["und_mask"]] = feats.reshape(-1, x.size(-1)).to(x.dtype)
    x[b["gen_mask"]] = hf.prepare_embeddings_for_image_generation(b["gen_ids"].reshape(-1)).to(x.dtype)
    h = m.language_model(inputs_embeds=x).last_hidden_state
    tt, it = b["text_targets"], b["image_targets"]
    loss = F.cross_entropy(hf.lm_head(h[tt >= 0]).float(), tt[tt >= 0], reduction="sum")
    loss = loss + F.cross_entropy(m.generation_head(h[it >= 0]).float(), it[it >= 0], reduction="sum")
    return loss / ((tt >= 0).sum() + (it >= 0).sum())
