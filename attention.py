"""
Flash attention in Triton, forward and backward, for exactly the masks this model uses.

    out = softmax(q k^T / sqrt(d) + mask) v      q (B, H, T, d), k v (B, Hkv, Tk, d), H a multiple of Hkv

without ever writing the (T, Tk) score matrix: one program holds a block of BLOCK_M queries and walks
the keys BLOCK_N at a time, keeping for each query the running max m, the running sum l of
exp(s - m) and the running output acc (the "online softmax", all fp32). When a new block raises
the max from m to m', what was summed so far is rescaled by exp(m - m'). At the end out = acc / l,
and the log-sum-exp m + log(l) is kept per query for the backward pass, which recomputes the
probabilities p = exp(s - lse) block by block instead of storing them (the FlashAttention-2 scheme).

The masks: one rule covers every case of model.py. Query i of a row sits at absolute position
q_off + i (q_off = Tk - T: the queries are the last T of the keys' positions, as when a chunk is
appended to a KV cache; a 1-element tensor in static decoding, so a CUDA graph can replay it).
Key j may be seen by query i iff

    (not causal or j <= q_off + i)  and  (key_mask[b, j] or j == q_off + i)

key_mask (B, Tk), True = a real token: left padding, holes where a chunk was padded (CFG rows),
the unwritten slots of a preallocated cache. Every query sees itself, so no softmax row is empty.
The ViT is causal=False without key_mask. model.attention_mask builds the same rule densely.

Runs on a CUDA GPU, and on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set before
triton is imported: how the tests check it against the math path). Without triton installed this
file imports and `available()` is False; model.py then never calls it.
"""

import math
import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # the model runs without it: SDPA or the math path
    triton = None


def available():
    return triton is not None


if triton is not None:

    @triton.jit
    def _tile(X, stride, b, h, rows, offs_d, mask):
        """x[b, h, rows, :] as a (len(rows), BLOCK_D) tile, zeros where mask is False; stride = x's
        (batch, head, position) strides (the last dimension is contiguous)."""
        return tl.load(X + b * stride[0] + h * stride[1] + rows[:, None] * stride[2] + offs_d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _visible(offs_n, q_pos, km_row, TK, CAUSAL: tl.constexpr, HAS_KM: tl.constexpr):
        """(BLOCK_M, BLOCK_N) bool: may query (absolute position q_pos) see key offs_n (the rule above)."""
        ok = offs_n[None, :] < TK  # (1, BLOCK_N): keys past the end do not exist
        if CAUSAL:
            ok = ok & (offs_n[None, :] <= q_pos[:, None])
        if HAS_KM:
            real = tl.load(km_row + offs_n, mask=offs_n < TK, other=0) != 0  # (BLOCK_N,)
            ok = ok & (real[None, :] | (offs_n[None, :] == q_pos[:, None]))
        return ok

    @triton.jit
    def _forward(Q, K, V, O, LSE, KM, QOFF, stride_q, stride_k, stride_v, stride_o, stride_km,
                 H, REP, T, TK, D, scale,
                 CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, PREC: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (query block pid_m, row b, head h); stride_x = (batch, head, position) strides of x
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // REP  # GQA: query heads h*REP .. share key/value head hk
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,) query indices
        offs_d = tl.arange(0, BLOCK_D)  # head dim, padded to a power of two
        q_off = tl.load(QOFF)
        q_pos = q_off + offs_m  # absolute positions
        in_d = offs_d[None, :] < D
        q = _tile(Q, stride_q, b, h, offs_m, offs_d, (offs_m[:, None] < T) & in_d)  # (BLOCK_M, BLOCK_D)
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = TK
        if CAUSAL:  # keys after this block's last query are never seen: skip them
            hi = tl.minimum(TK, q_off + (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = (offs_n[:, None] < TK) & in_d
            k = _tile(K, stride_k, b, hk, offs_n, offs_d, in_n)  # (BLOCK_N, BLOCK_D)
            v = _tile(V, stride_v, b, hk, offs_n, offs_d, in_n)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (BLOCK_M, BLOCK_N) fp32
            s = tl.where(_visible(offs_n, q_pos, KM + b * stride_km, TK, CAUSAL, HAS_KM), s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing seen yet: no NaN
            p = tl.exp(s - m_safe[:, None])  # (BLOCK_M, BLOCK_N)
            alpha = tl.exp(m - m_safe)  # rescales what was summed under the old max
            l = l * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
            m = m_new
        out = acc / l[:, None]
        tl.store(O + b * stride_o[0] + h * stride_o[1] + offs_m[:, None] * stride_o[2] + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=(offs_m[:, None] < T) & in_d)
        tl.store(LSE + bh * T + offs_m, m + tl.log(l), mask=offs_m < T)

    @triton.jit
    def _backward_kv(Q, K, V, DO, LSE, DELTA, DK, DV, KM, QOFF, stride_q, stride_k, stride_v, stride_km,
                     H, REP, T, TK, D, scale,
                     CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (key block pid_n, row b, query head h): dK and dV of these keys from head h's
        # queries, into DK, DV (B, H, TK, D) contiguous; GQA's REP heads are summed afterwards.
        # With P = softmax rows: dV = P^T dO, dS = P * (dO V^T - delta), dK = scale * dS^T Q,
        # delta = rowsum(dO * O) (computed outside)
        pid_n, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // REP
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d[None, :] < D
        in_n = (offs_n[:, None] < TK) & in_d
        k = _tile(K, stride_k, b, hk, offs_n, offs_d, in_n)
        v = _tile(V, stride_v, b, hk, offs_n, offs_d, in_n)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        q_off = tl.load(QOFF)
        lo = 0
        if CAUSAL:  # queries before the first of these keys never see them: start at their block
            lo = tl.maximum(pid_n * BLOCK_N - q_off, 0) // BLOCK_M * BLOCK_M
        for start_m in range(lo, T, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            in_m = offs_m < T
            q = _tile(Q, stride_q, b, h, offs_m, offs_d, in_m[:, None] & in_d)  # (BLOCK_M, BLOCK_D)
            do = tl.load(DO + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=in_m[:, None] & in_d, other=0.0)
            lse = tl.load(LSE + bh * T + offs_m, mask=in_m, other=0.0)
            delta = tl.load(DELTA + bh * T + offs_m, mask=in_m, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale  # (BLOCK_M, BLOCK_N)
            ok = _visible(offs_n, offs_m + q_off, KM + b * stride_km, TK, CAUSAL, HAS_KM) & in_m[:, None]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)  # the forward's probabilities, recomputed
            dv += tl.dot(tl.trans(p).to(do.dtype), do, input_precision=PREC)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)  # (BLOCK_M, BLOCK_N)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds).to(q.dtype), q, input_precision=PREC)
        out = bh * TK * D + offs_n[:, None] * D + offs_d[None, :]
        tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=in_n)
        tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=in_n)

    @triton.jit
    def _backward_q(Q, K, V, DO, LSE, DELTA, DQ, KM, QOFF, stride_q, stride_k, stride_v, stride_km,
                    H, REP, T, TK, D, scale,
                    CAUSAL: tl.constexpr, HAS_KM: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        # program (query block pid_m, row b, head h): dQ = scale * dS K over all the keys it sees
        pid_m, bh = tl.program_id(0), tl.program_id(1)
        b, h = bh // H, bh % H
        hk = h // REP
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        in_d = offs_d[None, :] < D
        in_m = offs_m < T
        q_off = tl.load(QOFF)
        q = _tile(Q, stride_q, b, h, offs_m, offs_d, in_m[:, None] & in_d)
        do = tl.load(DO + bh * T * D + offs_m[:, None] * D + offs_d[None, :], mask=in_m[:, None] & in_d, other=0.0)
        lse = tl.load(LSE + bh * T + offs_m, mask=in_m, other=0.0)
        delta = tl.load(DELTA + bh * T + offs_m, mask=in_m, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        hi = TK
        if CAUSAL:
            hi = tl.minimum(TK, q_off + (pid_m + 1) * BLOCK_M)
        for start_n in range(0, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            in_n = (offs_n[:, None] < TK) & in_d
            k = _tile(K, stride_k, b, hk, offs_n, offs_d, in_n)
            v = _tile(V, stride_v, b, hk, offs_n, offs_d, in_n)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * scale
            ok = _visible(offs_n, offs_m + q_off, KM + b * stride_km, TK, CAUSAL, HAS_KM) & in_m[:, None]
            p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PREC)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PREC)
        tl.store(DQ + bh * T * D + offs_m[:, None] * D + offs_d[None, :], (dq * scale).to(DQ.dtype.element_ty),
                 mask=in_m[:, None] & in_d)


def _launch_args(q, k, v, key_mask, q_off):
    """What every kernel takes: the key mask as bytes (or a dummy), q_off as a 1-element int32
    tensor on the device, the block sizes (16 x 16 under the interpreter, 64 x 64 on a GPU)."""
    B, H, T, D = q.shape
    Tk = k.size(2)
    if q_off is None:
        q_off = Tk - T
    q_off = torch.as_tensor(q_off, device=q.device).to(torch.int32).reshape(1)
    km = (key_mask if key_mask is not None else torch.ones(1, 1, dtype=torch.bool, device=q.device)).to(torch.int8)
    block = 64 if q.is_cuda else 16
    prec = "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs stay exact (no TF32 rounding)
    return dict(B=B, H=H, T=T, Tk=Tk, D=D, REP=H // k.size(1), km=km, q_off=q_off, BLOCK=block,
                BLOCK_D=max(16, triton.next_power_of_2(D)), PREC=prec, scale=1.0 / math.sqrt(D), HAS_KM=key_mask is not None)


class FlashAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, key_mask, q_off, causal):
        q, k, v = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
        a = _launch_args(q, k, v, key_mask, q_off)
        B, H, T = a["B"], a["H"], a["T"]
        o = torch.empty_like(q)  # (B, H, T, D)
        lse = torch.empty(B * H, T, device=q.device, dtype=torch.float32)
        _forward[(triton.cdiv(T, a["BLOCK"]), B * H)](
            q, k, v, o, lse, a["km"], a["q_off"], q.stride()[:3], k.stride()[:3], v.stride()[:3], o.stride()[:3],
            a["km"].stride(0), H, a["REP"], T, a["Tk"], a["D"], a["scale"], CAUSAL=causal, HAS_KM=a["HAS_KM"],
            PREC=a["PREC"], BLOCK_M=a["BLOCK"], BLOCK_N=a["BLOCK"], BLOCK_D=a["BLOCK_D"])
        ctx.save_for_backward(q, k, v, o, lse, key_mask, a["q_off"])
        ctx.causal = causal
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, key_mask, q_off = ctx.saved_tensors
        a = _launch_args(q, k, v, key_mask, q_off)
        B, H, T, Tk, D = a["B"], a["H"], a["T"], a["Tk"], a["D"]
        do = do.contiguous()  # (B, H, T, D), read as flat rows
        delta = (do.float() * o.float()).sum(-1).reshape(B * H, T)  # rowsum(dO * O): (B*H, T)
        dq = torch.empty(B, H, T, D, device=q.device, dtype=q.dtype)
        dk = torch.empty(B, H, Tk, D, device=q.device, dtype=k.dtype)  # per query head: summed over GQA groups below
        dv = torch.empty(B, H, Tk, D, device=q.device, dtype=v.dtype)
        common = (a["km"], a["q_off"], q.stride()[:3], k.stride()[:3], v.stride()[:3], a["km"].stride(0),
                  H, a["REP"], T, Tk, D, a["scale"])
        meta = dict(CAUSAL=ctx.causal, HAS_KM=a["HAS_KM"], PREC=a["PREC"], BLOCK_M=a["BLOCK"], BLOCK_N=a["BLOCK"],
                    BLOCK_D=a["BLOCK_D"])
        _backward_kv[(triton.cdiv(Tk, a["BLOCK"]), B * H)](q, k, v, do, lse, delta, dk, dv, *common, **meta)
        _backward_q[(triton.cdiv(T, a["BLOCK"]), B * H)](q, k, v, do, lse, delta, dq, *common, **meta)
        Hk = k.size(1)
        dk = dk.view(B, Hk, a["REP"], Tk, D).sum(2)
        dv = dv.view(B, Hk, a["REP"], Tk, D).sum(2)
        return dq, dk, dv, None, None, None


def flash_attention(q, k, v, key_mask=None, causal=True, q_off=None):
    """softmax(q k^T / sqrt(d)) v under the rule in this file's docstring.
    q (B, H, T, d); k, v (B, Hkv, Tk, d); key_mask (B, Tk) bool or None; q_off: the absolute position
    of query 0 (an int or a 0-d / 1-element tensor; default Tk - T). -> (B, H, T, d), q's dtype."""
    if triton is None:
        raise ValueError("the triton attention kernel needs the triton package (pip install triton; Linux)")
    if not q.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("the triton attention kernel runs on a CUDA GPU (or on CPU under TRITON_INTERPRET=1)")
    return FlashAttention.apply(q, k, v, key_mask, q_off, causal)
