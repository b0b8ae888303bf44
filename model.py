"""
The Janus-Pro unified transformer (SPEC.md section 2), from scratch, in one file.

One decoder-only Llama (RMSNorm, RoPE, SwiGLU, untied text head) reads a single sequence that
mixes text and images, with *decoupled visual encoding*:
- understanding path: pixels -> SigLIP-style ViT -> `aligner` (Linear-GELU-Linear) -> LLM inputs;
- generation path: VQ code ids -> `gen_embed` -> `gen_aligner` -> LLM inputs, and the final hidden
  state -> `gen_head` -> logits over the VQ codebook (the text head `lm_head` is never used there).
The VQ tokenizer itself (`gen_vision_model`) lives in tokenizer.py.

How the pieces are used (SFT, RL and the sampler all go through these four calls):
    x = model.embed(idx, und_pixels=..., und_mask=..., gen_ids=..., gen_mask=...)   # (B, T, D)
    h = model(x, cache=None, start_pos=0, key_mask=None)                            # (B, T, D)
    model.text_logits(h) / model.image_logits(h)                                    # fp32 logits
    model.token_losses(h, text_targets, image_targets)                              # (B, T) fp32
The file reads top to bottom: config -> norm -> rope -> attention -> mlp -> block -> ViT -> heads ->
model -> loading the official checkpoints -> the same model in Hugging Face transformers (the
reference the tests compare against and bench.py times).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

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
    # generation path (ids of the VQ tokenizer's codebook)
    image_vocab_size: int = 512  # VQ codebook size = gen_head outputs
    image_code_dim: int = 8  # width of the gen_embed table
    image_tokens: int = 64  # sequence positions one image takes, on either path
    # the ShapeWorld the toy rungs train on: 0 objects anywhere, N objects centred in an N x N grid
    # of VQ patches (shapes.GRID_FILL); the real shapes never read it
    scene_grid: int = 0
    # kernels: PyTorch's fused scaled_dot_product_attention, or the plain-math reference
    sdpa: bool = True

    def __post_init__(self):
        assert self.n_embd % self.n_head == 0 and self.n_head % self.n_kv_head == 0
        assert self.vit_width % self.vit_heads == 0 and self.image_size % self.vit_patch == 0
        # Janus gives an image the same number of positions whichever path it enters by
        # (384 px / 16 = 24x24 = 576 for both the ViT and the VQ), so the sequence layout needs one number
        assert (self.image_size // self.vit_patch) ** 2 == self.image_tokens

    @property
    def head_dim(self):
        return self.n_embd // self.n_head


# Presets as plain data. The toy rungs share one 256-row text vocabulary (the word-level
# tokenizer fits in it, padded); the last two are the official shapes (janus_pro_facts.md).
PRESETS = {
    "tiny": dict(vocab_size=256, n_layer=2, n_head=4, n_kv_head=4, n_embd=64, ffn_hidden=176,
                 max_seq_len=256, image_size=32, vit_patch=8, vit_width=64, vit_layers=2,
                 vit_heads=4, vit_mlp=256, image_vocab_size=256, image_tokens=16),
    "toy": dict(vocab_size=256, n_layer=4, n_head=4, n_kv_head=4, n_embd=192, ffn_hidden=512,
                max_seq_len=512, image_size=64, vit_patch=16, vit_width=128, vit_layers=4,
                vit_heads=4, vit_mlp=512, image_vocab_size=1024, image_tokens=16, scene_grid=4),
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


def attend(q, k, v, mask=None, causal=False, sdpa=True):
    """softmax(q k^T / sqrt(hs)) v.  q (B, nh, T, hs), k v (B, nkv, Tk, hs) -> (B, nh, T, hs).
    mask: bool, broadcastable to (B, nh, T, Tk), True = may attend. causal: lower triangle (T == Tk)."""
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
    """Linear -> GELU -> Linear: `aligner` (ViT width -> D) and `gen_aligner` (code dim -> D)."""

    def __init__(self, d_in, d_out):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_in, d_out), nn.GELU(), nn.Linear(d_out, d_out))

    def forward(self, x):
        return self.layers(x)


class GenHead(nn.Module):
    """The image head: final hidden state -> Linear -> GELU -> logits over the VQ codebook."""

    def __init__(self, d, image_vocab_size):
        super().__init__()
        self.output_mlp_projector = nn.Linear(d, d)
        self.vision_head = nn.Linear(d, image_vocab_size)

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
        self.aligner = MlpProjector(cfg.vit_width, cfg.n_embd)
        # generation path: a separate embedding table for code ids (not the VQ's own codebook)
        self.gen_embed = nn.Embedding(cfg.image_vocab_size, cfg.image_code_dim)
        self.gen_aligner = MlpProjector(cfg.image_code_dim, cfg.n_embd)
        self.gen_head = GenHead(cfg.n_embd, cfg.image_vocab_size)
        # the language model
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.rms_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)  # untied, as Janus-Pro
        self.apply(self._init_weights)
        # unit-scale code vectors: at std 0.02 the 8-wide gen_embed would feed ~0 into the LLM
        nn.init.normal_(self.gen_embed.weight, mean=0.0, std=1.0)

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
        return self.aligner(self.vision_model(pixels))

    def embed_image_ids(self, ids):
        """Generation path: VQ code ids (any shape) -> (..., D). The sampler calls this per token."""
        return self.gen_aligner(self.gen_embed(ids))

    def embed(self, idx, und_pixels=None, und_mask=None, gen_ids=None, gen_mask=None):
        """Embeddings (B, T, D) of a mixed sequence. idx (B, T) holds text ids (anything valid at
        image positions, e.g. pad). Positions where und_mask (B, T) is True get the ViT features of
        und_pixels (N, 3, H, W), image after image, patches in raster order; positions where
        gen_mask is True get gen_ids (codes of those positions in the same row-major order)."""
        x = self.embed_tokens(idx)
        if und_pixels is not None:
            feats = self.embed_pixels(und_pixels)  # (N, image_tokens, D)
            assert int(und_mask.sum()) == feats.shape[0] * feats.shape[1], "und_mask vs images"
            x[und_mask] = feats.reshape(-1, x.size(-1)).to(x.dtype)
        if gen_ids is not None:
            assert int(gen_mask.sum()) == gen_ids.numel(), "gen_mask vs gen_ids"
            x[gen_mask] = self.embed_image_ids(gen_ids.reshape(-1)).to(x.dtype)
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
        if not torch.is_tensor(start_pos):
            mask = attention_mask(T, start_pos, key_mask, x.device)
        for i, layer in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i])
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
# loading the official checkpoints (keys as in janus_pro_facts.md)

# our name prefix -> official name prefix, first match wins
_PREFIXES = [
    ("vision_model.patch_embed.", "vision_model.vision_tower.patch_embed.proj."),
    ("vision_model.", "vision_model.vision_tower."),
    ("embed_tokens.", "language_model.model.embed_tokens."),
    ("layers.", "language_model.model.layers."),
    ("norm.", "language_model.model.norm."),
    ("lm_head.", "language_model.lm_head."),
]
_LAYER_PARTS = [(".attn_norm.", ".input_layernorm."), (".mlp_norm.", ".post_attention_layernorm."),
                (".attn.o_proj.", ".self_attn.o_proj.")]


def official_names(name):
    """Official key(s) holding our parameter `name`; our fused qkv is three official keys."""
    for ours, theirs in _PREFIXES:
        if name.startswith(ours):
            name = theirs + name[len(ours):]
            break
    if name.startswith("language_model.model.layers."):
        if ".attn.qkv." in name:
            return [name.replace(".attn.qkv.", f".self_attn.{p}_proj.") for p in "qkv"]
        for ours, theirs in _LAYER_PARTS:
            name = name.replace(ours, theirs)
    return [name]


def to_official(model):
    """Our state dict in the official layout (for exporting, and for tests)."""
    cfg, out = model.cfg, {}
    sizes = [cfg.n_head * cfg.head_dim] + 2 * [cfg.n_kv_head * cfg.head_dim]
    for name, t in model.state_dict().items():
        names = official_names(name)
        parts = t.split(sizes) if len(names) == 3 else [t]
        out.update(zip(names, parts))
    return out


def from_official(model, sd):
    """Split an official-layout state dict into (ours, vq): our state dict for `model` (q, k, v
    fused), and the VQ tokenizer's keys with `gen_vision_model.` stripped. The ViT's `attn_pool`
    head, which Janus never runs, is dropped. Raises on missing or unknown keys."""
    sd = {k: v for k, v in sd.items() if not k.startswith("vision_model.vision_tower.attn_pool.")}
    vq = {k[len("gen_vision_model."):]: v for k, v in sd.items() if k.startswith("gen_vision_model.")}
    ours, used = {}, set(k for k in sd if k.startswith("gen_vision_model."))
    for name in model.state_dict():
        names = official_names(name)
        missing = [n for n in names if n not in sd]
        if missing:
            raise KeyError(f"checkpoint lacks {missing[0]} (for our {name})")
        ours[name] = torch.cat([sd[n] for n in names]) if len(names) == 3 else sd[names[0]]
        used.update(names)
    unknown = sorted(set(sd) - used)
    if unknown:
        raise KeyError(f"checkpoint has {len(unknown)} keys this model does not, e.g. {unknown[0]}")
    return ours, vq


def load_official(model, sd):
    """Load an official Janus-Pro state dict (e.g. torch.load(..., weights_only=True) of
    pytorch_model.bin) into `model`; returns the VQ tokenizer's part for tokenizer.py."""
    ours, vq = from_official(model, sd)
    model.load_state_dict(ours, strict=True)
    return vq


# -----------------------------------------------------------------------------
# The peer reference: Hugging Face transformers' Janus with our shapes and weights, and one mixed
# batch both models take (tests/test_model.py checks logits and losses against it, bench.py times
# both); transformers is imported only inside, as nanoGPT's from_pretrained does


def hf_janus(cfg):
    """A randomly initialised HF JanusForConditionalGeneration with cfg's shapes (and a small VQ,
    which neither benchmark runs)."""
    from transformers import JanusConfig as HFJanusConfig
    from transformers import JanusForConditionalGeneration, JanusVisionConfig, JanusVQVAEConfig, LlamaConfig

    text = LlamaConfig(vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
                       num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
                       num_key_value_heads=cfg.n_kv_head, rms_norm_eps=cfg.rms_eps,
                       rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
                       max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False)
    vision = JanusVisionConfig(hidden_size=cfg.vit_width, num_hidden_layers=cfg.vit_layers,
                               num_attention_heads=cfg.vit_heads, image_size=cfg.image_size,
                               patch_size=cfg.vit_patch, mlp_ratio=cfg.vit_mlp / cfg.vit_width,
                               projection_dim=cfg.n_embd, depth=2, layer_norm_eps=1e-6,
                               num_image_tokens=cfg.image_tokens)
    vq = JanusVQVAEConfig(embed_dim=cfg.image_code_dim, num_embeddings=cfg.image_vocab_size,
                          projection_dim=cfg.n_embd, image_token_embed_dim=cfg.n_embd, base_channels=32,
                          channel_multiplier=[1, 1], num_res_blocks=1, latent_channels=32)
    config = HFJanusConfig(text_config=text, vision_config=vision, vq_config=vq, tie_word_embeddings=False)
    config._attn_implementation = "sdpa"  # HF's fastest CPU attention, as ours
    return JanusForConditionalGeneration(config).eval()


def hf_name(official):
    """Official Janus-Pro key -> HF JanusForConditionalGeneration key (the ViT's qkv still fused)."""
    k = official
    if k.startswith("language_model.lm_head."):
        return k.replace("language_model.", "", 1)
    if k.startswith("language_model.model."):
        return k.replace("language_model.model.", "model.language_model.", 1)
    if k.startswith("vision_model.vision_tower."):
        k = k.replace("vision_model.vision_tower.", "model.vision_model.", 1)
        for a, b in [("patch_embed.proj.", "embeddings.patch_embedding."),
                     ("pos_embed", "embeddings.position_embedding.weight"), ("blocks.", "encoder.layers."),
                     (".norm1.", ".layer_norm1."), (".norm2.", ".layer_norm2."),
                     (".attn.proj.", ".self_attn.projection_layer."), ("model.vision_model.norm.", "model.vision_model.post_layernorm.")]:
            k = k.replace(a, b)
        return k
    for a, b in [("aligner.layers.0.", "aligner.fc1."), ("aligner.layers.2.", "aligner.hidden_layers.0."),
                 ("gen_embed.", "generation_embeddings."), ("gen_head.output_mlp_projector.", "generation_head.proj_out."),
                 ("gen_head.vision_head.", "generation_head.vision_head.")]:
        k = k.replace(a, b)
    k = k.replace("gen_aligner.", "generation_aligner.")
    return "model." + k


@torch.no_grad()
def copy_to_hf(model, hf):
    """Copy our weights into the HF model; every HF parameter outside its VQ must be covered."""
    sd = {}
    for k, t in to_official(model).items():
        if ".attn.qkv." in k:  # the ViT's fused qkv: HF keeps q, k, v apart
            name = hf_name(k)
            for p, part in zip("qkv", t.chunk(3)):
                sd[name.replace(".attn.qkv.", f".self_attn.{p}_proj.")] = part
        elif k.endswith("pos_embed"):
            sd[hf_name(k)] = t[0]  # (1, N, C) -> an nn.Embedding(N, C)
        else:
            sd[hf_name(k)] = t
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected, unexpected
    assert all(k.startswith("model.vqmodel.") for k in missing), missing
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
