"""attention.py's Triton kernel against the math path (model.attend, sdpa=False), on CPU tensors
through Triton's interpreter: every mask case model.py uses, fp32 outputs within 1e-5 and
gradients within 1e-4. Skipped where the triton package is missing (it is in requirements-dev).
Run: python -m pytest -q tests/test_attention.py   (CPU, about half a minute)"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported: kernels run on CPU tensors

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from attention import flash_attention  # noqa: E402
from model import attend, attention_mask  # noqa: E402


def rule(B, T, Tk, key_mask, causal, q_off):
    """The kernel's visibility rule written densely: (B, 1, T, Tk) bool."""
    qp = (q_off + torch.arange(T))[:, None]  # (T, 1) absolute query positions
    kp = torch.arange(Tk)[None, :]  # (1, Tk)
    ok = (kp <= qp) if causal else torch.ones(T, Tk, dtype=torch.bool)
    ok = ok[None].expand(B, T, Tk)
    if key_mask is not None:
        ok = ok & (key_mask[:, None, :] | (kp == qp)[None])
    return ok[:, None]


def padded(B, Tk, holes):
    """A key mask with row 1 left-padded by 3 and, if holes, slots 7-8 of row 0 masked."""
    km = torch.ones(B, Tk, dtype=torch.bool)
    km[1, :3] = False
    if holes:
        km[0, 7:9] = False
    return km


CASES = {  # name: (T, Tk, key mask, causal, q_off)
    "causal": (24, 24, None, True, None),
    "left padding and holes (CFG rows)": (24, 24, "holes", True, None),
    "a chunk after a cache": (6, 29, "holes", True, None),
    "one token against a cache": (1, 29, "pad", True, None),
    "static decoding (whole cache, q_off)": (1, 32, "pad", True, 20),
    "no mask, not causal (the ViT)": (20, 20, None, False, None),
}


@pytest.mark.parametrize("case,D", [(c, 16) for c in CASES] + [("a chunk after a cache", 24)])
def test_kernel_equals_the_math_path(case, D):  # D = 24: a head dim the kernel pads to 32
    T, Tk, km, causal, q_off = CASES[case]
    B, H, Hk = 2, 4, 2  # GQA: two query heads per key/value head
    g = torch.Generator().manual_seed(list(CASES).index(case) * 100 + D)
    q = torch.randn(B, H, T, D, generator=g, requires_grad=True)
    k = torch.randn(B, Hk, Tk, D, generator=g, requires_grad=True)
    v = torch.randn(B, Hk, Tk, D, generator=g, requires_grad=True)
    key_mask = None if km is None else padded(B, Tk, km == "holes")
    off = Tk - T if q_off is None else q_off
    mask = rule(B, T, Tk, key_mask, causal, off)
    ref = attend(q, k, v, mask=mask, sdpa=False)
    out = flash_attention(q, k, v, key_mask, causal, None if q_off is None else torch.tensor(q_off))
    assert (out - ref).abs().max().item() <= 1e-5
    dout = torch.randn(out.shape, generator=g)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    got = torch.autograd.grad(out, (q, k, v), dout)
    for name, a, b in zip("qkv", got, want):
        assert (a - b).abs().max().item() <= 1e-4, name


def test_the_rule_is_the_models_mask():
    """model.attention_mask (training, prefill and decoding) and the static decoding step's mask are
    the kernel's rule: the kernel can stand in for them."""
    B, Tk = 2, 29
    km = padded(B, Tk, holes=True)
    for T, start in [(29, 0), (6, 23), (1, 28)]:
        assert torch.equal(attention_mask(T, start, km[:, :start + T], "cpu"), rule(B, T, start + T, km[:, :start + T], True, start))
    slots, start = torch.arange(Tk), 20  # model.forward's static decoding mask
    seen = (km & (slots <= start)) | (slots == start)
    assert torch.equal(seen[:, None, None], rule(B, 1, Tk, km, True, start))


def test_the_model_with_the_kernel_equals_sdpa():
    """Janus with set_attention("triton"): a padded batch's hidden states and loss gradients, a KV-cache
    decode and a static decoding step equal the SDPA path's (tiny, GQA)."""
    from model import PRESETS, Janus, JanusConfig
    torch.manual_seed(0)
    ref = Janus(JanusConfig(**{**PRESETS["tiny"], "n_kv_head": 2}))
    fast = Janus(ref.cfg).set_attention("triton")
    fast.load_state_dict(ref.state_dict())
    B, T = 2, 24
    x = torch.randn(B, T, ref.cfg.n_embd)
    km = torch.ones(B, T, dtype=torch.bool)
    km[1, :5] = False  # left padding
    km[0, 9:11] = False  # a hole
    hs = [m(x, key_mask=km) for m in (ref, fast)]
    assert (hs[0] - hs[1]).abs().max().item() <= 1e-5
    grads = [torch.autograd.grad(h.square().mean(), list(m.layers.parameters())) for h, m in zip(hs, (ref, fast))]
    assert all((a - b).abs().max().item() <= 1e-4 for a, b in zip(*grads))
    with torch.no_grad():
        outs = []
        for m in (ref, fast):
            cache = m.make_cache(B, 32)
            m(x[:, :20], cache=cache, start_pos=0, key_mask=km[:, :20])  # prefill, then one token
            step = m(x[:, 20:21], cache=cache, start_pos=20, key_mask=km[:, :21])
            static_km = torch.zeros(B, 32, dtype=torch.bool)
            static_km[:, :21] = km[:, :21]
            static = m(x[:, 21:22], cache=cache, start_pos=torch.tensor(21), key_mask=static_km)
            outs.append(torch.cat([step, static], 1))
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5
