"""
Tests of model.py against references: transformers' Llama and Janus modules on copied random
weights, a full forward for the KV cache, F.cross_entropy for the loss, and the official key list
(shared/reference/janus_pro_state_dict_shapes.json) for the full-size presets.

    python -m pytest -q tests/test_model.py
"""

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from model import (PRESETS, Janus, JanusConfig, copy_to_hf, from_official, hf_janus, hf_loss, image_cost, load_official,
                   make_batch,
                   ours_loss, to_official)

# a copy of shared/reference/janus_pro_state_dict_shapes.json, kept in the repo so CI always has it
SHAPES = Path(__file__).resolve().parent / "data" / "janus_pro_state_dict_shapes.json"


def tiny(**changes):
    # without the toy's image position table: the official and HF layouts have none
    return JanusConfig(**{**PRESETS["tiny"], "image_pos": False, **changes})


@torch.no_grad()
def randomized(model, seed=0):
    """Weights of O(1) effect everywhere (norm gains and biases too), so that a wrong mapping or a
    wrong formula moves the outputs by far more than the tolerances below."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.dim() == 1 and name.endswith("weight"):  # RMSNorm / LayerNorm gains
            p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
        elif p.dim() == 1:  # biases
            p.copy_(0.2 * torch.randn(p.shape, generator=g))
        else:
            fan_in = p[0].numel() if p.dim() > 1 and "embed" not in name else 1
            p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(fan_in))
    return model.eval()


def maxdiff(a, b):
    return (a.float() - b.float()).abs().max().item()


# -----------------------------------------------------------------------------
# equality with transformers


@pytest.mark.parametrize("n_kv_head", [4, 2])  # MHA as Janus-Pro, and GQA
def test_language_model_matches_hf_llama(n_kv_head):
    from transformers import LlamaForCausalLM

    cfg = tiny(n_kv_head=n_kv_head)
    ours = randomized(Janus(cfg))
    llama = LlamaForCausalLM(hf_janus(cfg).config.text_config).eval()
    # the official layout IS Hugging Face Llama's, under `language_model.`
    sd = {k[len("language_model."):]: v for k, v in to_official(ours).items() if k.startswith("language_model.")}
    llama.load_state_dict(sd, strict=True)
    idx = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = llama(idx).logits
        mine = ours.text_logits(ours(ours.embed(idx)))
    assert theirs.abs().max() > 1.0  # logits of O(1): the tolerance below is a real test
    assert maxdiff(mine, theirs) <= 1e-4


def test_vision_aligners_heads_match_hf_janus():
    cfg = tiny()
    ours = randomized(Janus(cfg))
    hf = copy_to_hf(ours, hf_janus(cfg))
    g = torch.Generator().manual_seed(2)
    pixels = torch.rand(3, 3, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    ids = torch.randint(0, cfg.image_vocab_size, (3, cfg.image_tokens), generator=g)
    h = torch.randn(3, 5, cfg.n_embd, generator=g)
    with torch.no_grad():
        vit = hf.model.vision_model(pixels).last_hidden_state
        assert maxdiff(ours.vision_model(pixels), vit) <= 1e-4
        assert maxdiff(ours.aligner(vit), hf.model.aligner(vit)) <= 1e-4
        assert maxdiff(ours.embed_pixels(pixels), hf.model.get_image_features(pixels).pooler_output) <= 1e-4
        assert maxdiff(ours.embed_image_ids(ids), hf.prepare_embeddings_for_image_generation(ids)) <= 1e-4
        assert maxdiff(ours.image_logits(h), hf.model.generation_head(h)) <= 1e-4
        # and the whole mixed sequence: text, an image through the ViT, an image as VQ codes
        b = make_batch(cfg, 2, 2 * cfg.image_tokens + 24)
        assert abs(ours_loss(ours, b).item() - hf_loss(hf, b).item()) <= 1e-4


# -----------------------------------------------------------------------------
# the KV cache, masking, padding, the two attention paths


def inputs(cfg, B=2, T=24, seed=3):
    return torch.randn(B, T, cfg.n_embd, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_kv_cache_decode_equals_full_forward(sdpa, n_kv_head):
    cfg = tiny(n_kv_head=n_kv_head, sdpa=sdpa)
    model = randomized(Janus(cfg))
    x = inputs(cfg)
    with torch.no_grad():
        full = model(x)
        # one token at a time
        cache = model.make_cache(2, 32)
        steps = torch.cat([model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(x.size(1))], 1)
        assert maxdiff(steps, full) <= 1e-5
        # a prefill, chunks of uneven sizes, then single tokens
        cache, out, t = model.make_cache(2, 32), [], 0
        for n in [7, 5, 1, 8, 1, 1, 1]:
            out.append(model(x[:, t:t + n], cache=cache, start_pos=t))
            t += n
        assert maxdiff(torch.cat(out, 1), full) <= 1e-5


@pytest.mark.parametrize("sdpa", [True, False])
@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_static_decode_equals_full_forward(sdpa, n_kv_head):
    # sample.py --compile's path: the slot as a 0-d tensor, attention over the whole (longer)
    # cache; a left-padded row with a hole, as the introspective loop's cache has
    cfg = tiny(n_kv_head=n_kv_head, sdpa=sdpa)
    model = randomized(Janus(cfg))
    x = inputs(cfg)
    T, P = x.size(1), 10
    key_mask = torch.ones(2, T + 6, dtype=torch.bool)  # the cache is 6 slots longer than needed
    key_mask[1, :3] = False
    key_mask[1, 7] = False
    with torch.no_grad():
        full = model(x, key_mask=key_mask[:, :T])
        cache = model.make_cache(2, T + 6)
        model(x[:, :P], cache=cache, key_mask=key_mask[:, :P])
        steps = [model(x[:, t:t + 1], cache=cache, start_pos=torch.tensor(t), key_mask=key_mask) for t in range(P, T)]
    assert maxdiff(torch.cat(steps, 1), full[:, P:]) <= 1e-5


def test_causal_masking():
    cfg = tiny()
    model = randomized(Janus(cfg))
    x = inputs(cfg)
    y = x.clone()
    y[:, 10] += 1.0  # change one token
    with torch.no_grad():
        a, b = model(x), model(y)
    assert maxdiff(a[:, :10], b[:, :10]) == 0.0  # the past does not see the future
    assert maxdiff(a[:, 10:], b[:, 10:]) > 1e-2  # but the future sees it


@pytest.mark.parametrize("sdpa", [True, False])
def test_left_padding_equals_unpadded(sdpa):
    cfg = tiny(n_kv_head=2, sdpa=sdpa)
    model = randomized(Janus(cfg))
    x = inputs(cfg, B=2, T=20)
    pad = 6
    # row 0: 6 pad positions (garbage embeddings) then the first 14 tokens; row 1: 20 real tokens
    batch = x.clone()
    batch[0, pad:] = x[0, :20 - pad]
    batch[0, :pad] = 100.0
    key_mask = torch.ones(2, 20, dtype=torch.bool)
    key_mask[0, :pad] = False
    with torch.no_grad():
        alone = model(x[:1, :20 - pad])
        out = model(batch, key_mask=key_mask)
        assert maxdiff(out[0, pad:], alone[0]) <= 1e-5
        assert maxdiff(out[1], model(x[1:])[0]) <= 1e-5
        # the same through a cache: padded prefill of 12, then 8 single steps
        cache = model.make_cache(2, 20)
        outs = [model(batch[:, :12], cache=cache, key_mask=key_mask[:, :12])]
        for t in range(12, 20):
            outs.append(model(batch[:, t:t + 1], cache=cache, start_pos=t, key_mask=key_mask[:, :t + 1]))
        assert maxdiff(torch.cat(outs, 1)[0, pad:], alone[0]) <= 1e-5


@pytest.mark.parametrize("sdpa", [True, False])
def test_masked_hole_is_as_if_absent(sdpa):
    # the sampler appends left-padded chunks to a cache, leaving masked holes inside a row
    cfg = tiny(sdpa=sdpa)
    model = randomized(Janus(cfg))
    x = inputs(cfg, B=1, T=16)
    holed = torch.cat([x[:, :9], torch.full((1, 4, cfg.n_embd), 100.0), x[:, 9:]], 1)  # (1, 20, D)
    key_mask = torch.ones(1, 20, dtype=torch.bool)
    key_mask[0, 9:13] = False
    with torch.no_grad():
        want = model(x)
        got = model(holed, key_mask=key_mask)
        assert maxdiff(torch.cat([got[:, :9], got[:, 13:]], 1), want) <= 1e-5
        cache = model.make_cache(1, 20)
        model(holed[:, :9], cache=cache)
        model(holed[:, 9:15], cache=cache, start_pos=9, key_mask=key_mask[:, :15])
        steps = [model(holed[:, t:t + 1], cache=cache, start_pos=t, key_mask=key_mask[:, :t + 1]) for t in range(15, 20)]
        assert maxdiff(torch.cat(steps, 1), want[:, 11:]) <= 1e-5


def test_sdpa_equals_math_path():
    fast = randomized(Janus(tiny(n_kv_head=2)))
    slow = Janus(tiny(n_kv_head=2, sdpa=False))
    slow.load_state_dict(fast.state_dict())
    x = inputs(fast.cfg)
    key_mask = torch.ones(2, 24, dtype=torch.bool)
    key_mask[1, :5] = False
    pixels = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert maxdiff(fast(x), slow(x)) <= 1e-5
        assert maxdiff(fast(x, key_mask=key_mask), slow(x, key_mask=key_mask)) <= 1e-5
        assert maxdiff(fast.vision_model(pixels), slow.vision_model(pixels)) <= 1e-5


def test_activation_checkpointing_gives_the_same_gradients():
    # --checkpointing reruns each block in backward: the same loss and gradients, fewer tensors kept
    model = randomized(Janus(tiny(n_kv_head=2))).train()
    b = make_batch(model.cfg, 2, 2 * model.cfg.image_tokens + 24)
    grads, saved = [], []
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            loss = ours_loss(model, b)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        saved.append(len(kept))
    assert grads[0].keys() == grads[1].keys()
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
    assert saved[1] < saved[0]


def test_bf16_autocast_stays_close_to_fp32():
    # the dtype bench.py and training use on CPU: bf16 matmuls, fp32 norms, attention and losses
    cfg = tiny(n_kv_head=2)
    model = randomized(Janus(cfg))
    b = make_batch(cfg, 2, 2 * cfg.image_tokens + 24)
    with torch.no_grad():
        full = ours_loss(model, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = ours_loss(model, b)
            x = inputs(cfg)
            cache = model.make_cache(2, 24, dtype=torch.bfloat16)
            steps = torch.cat([model(x[:, t:t + 1], cache=cache, start_pos=t) for t in range(24)], 1)
            whole = model(x)
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) / full.item() < 1e-2
    assert maxdiff(steps, whole) < 0.1 * whole.abs().max().item()


# -----------------------------------------------------------------------------
# embedding a mixed sequence and the per-token loss


def test_embed_fills_image_positions_in_order():
    cfg = tiny()
    model = randomized(Janus(cfg))
    b = make_batch(cfg, 2, 2 * cfg.image_tokens + 24)
    with torch.no_grad():
        x = model.embed(b["idx"], b["und_pixels"], b["und_mask"], b["gen_ids"], b["gen_mask"])
        und, gen = b["und_mask"], b["gen_mask"]
        assert torch.equal(x[und].view(2, cfg.image_tokens, -1), model.embed_pixels(b["und_pixels"]))
        assert torch.equal(x[gen].view(2, cfg.image_tokens, -1), model.embed_image_ids(b["gen_ids"]))
        text = ~(und | gen)
        assert torch.equal(x[text], model.embed_tokens(b["idx"][text]))


def test_image_pos_adds_each_place_its_vector_on_both_paths():
    cfg = tiny(image_pos=True)
    model, plain = randomized(Janus(cfg)), Janus(tiny())
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if k != "image_pos"})
    b = make_batch(cfg, 2, 2 * cfg.image_tokens + 24)
    und, gen, N = b["und_mask"], b["gen_mask"], cfg.image_tokens
    with torch.no_grad():
        x = model.embed(b["idx"], b["und_pixels"], und, b["gen_ids"], gen)
        y = plain.embed(b["idx"], b["und_pixels"], und, b["gen_ids"], gen)
        # place k of every image, on either path, moves by row k of the table; text does not move
        assert torch.allclose((x - y)[und].view(2, N, -1), model.image_pos.expand(2, N, -1), atol=1e-6)
        assert torch.allclose((x - y)[gen].view(2, N, -1), model.image_pos.expand(2, N, -1), atol=1e-6)
        assert torch.equal(x[~(und | gen)], y[~(und | gen)])
        # one code at a time, as the sampler feeds them: an int place, a 0-d tensor, a tensor per code
        ids = b["gen_ids"][0]
        one = torch.stack([model.embed_image_ids(ids[k], k) for k in range(N)])
        assert torch.allclose(one, x[gen][:N], atol=1e-6)
        assert torch.allclose(model.embed_image_ids(ids[3], torch.tensor(3)), one[3], atol=1e-6)
        # gen_pos puts a lone code (the loop's last code, fed after the judge) at its place
        x1 = model.embed(b["idx"][:1, :1], gen_ids=ids[-1:], gen_mask=torch.ones(1, 1, dtype=torch.bool),
                         gen_pos=torch.tensor([N - 1]))
        assert torch.allclose(x1[0, 0], one[-1], atol=1e-6)
    # a new table is zeros: the model starts as the one without it; no official key to hold it
    assert not Janus(cfg).image_pos.any()
    with pytest.raises(ValueError, match="image_pos"):
        to_official(model)


def test_token_losses_equal_cross_entropy_by_hand():
    cfg = tiny()
    model = randomized(Janus(cfg))
    b = make_batch(cfg, 2, 2 * cfg.image_tokens + 24)
    tt, it = b["text_targets"], b["image_targets"]
    with torch.no_grad():
        h = model(model.embed(b["idx"], b["und_pixels"], b["und_mask"], b["gen_ids"], b["gen_mask"]))
        losses = model.token_losses(h, tt, it)
        text_logits, image_logits = model.text_logits(h), model.image_logits(h)
    assert losses.shape == (2, h.size(1)) and losses.dtype == torch.float32
    assert text_logits.dtype == image_logits.dtype == torch.float32
    for b_ in range(2):
        for t in range(h.size(1)):
            if tt[b_, t] >= 0:
                want = -F.log_softmax(text_logits[b_, t], -1)[tt[b_, t]]
            elif it[b_, t] >= 0:
                want = -F.log_softmax(image_logits[b_, t], -1)[it[b_, t]]
            else:
                want = torch.tensor(0.0)
            assert abs(losses[b_, t].item() - want.item()) <= 1e-5
    assert (tt >= 0).sum() > 10 and (it >= 0).sum() == 2 * cfg.image_tokens


# -----------------------------------------------------------------------------
# the full-size presets against the official checkpoints' keys


# official totals (janus_pro_facts.md), the VQ tokenizer's share (tokenizer.py's, the same in both)
# and the SigLIP attention-pooling head that the checkpoints carry but Janus never runs
FULL = [("janus-pro-1b", "1B", 2_089_232_011), ("janus-pro-7b", "7B", 7_420_368_523)]
VQ_PARAMS, ATTN_POOL_PARAMS = 71_883_403, 12_595_200


@pytest.mark.parametrize("name,size,total", FULL)
def test_parameter_count_of_full_size_presets(name, size, total):
    with torch.device("meta"):  # shapes only, no memory
        model = Janus(JanusConfig(**PRESETS[name]))
    assert sum(p.numel() for p in model.parameters()) == total - VQ_PARAMS - ATTN_POOL_PARAMS


@pytest.mark.parametrize("name,size,total", FULL)
def test_official_keys_and_shapes(name, size, total):
    ref = json.loads(SHAPES.read_text())
    shapes, buffers = ref[size], set(ref[size + "_buffers"])
    numel = lambda keys: sum(math.prod(shapes[k]) for k in keys)
    vq = [k for k in shapes if k.startswith("gen_vision_model.") and k not in buffers]
    pool = [k for k in shapes if k.startswith("vision_model.vision_tower.attn_pool.")]
    # the figures used above are the checkpoint's
    assert (numel(set(shapes) - buffers), numel(vq), numel(pool)) == (total, VQ_PARAMS, ATTN_POOL_PARAMS)
    with torch.device("meta"):
        model = Janus(JanusConfig(**PRESETS[name]))
    # ours -> official: exactly the official keys outside the VQ and attn_pool, same shapes
    want = {k: list(v) for k, v in shapes.items() if not k.startswith("gen_vision_model.") and k not in pool}
    assert {k: list(v.shape) for k, v in to_official(model).items()} == want
    # official -> ours: every key of the checkpoint consumed, shapes ours
    official = {k: torch.empty(v, device="meta") for k, v in shapes.items()}
    ours, vq_sd = from_official(model, official)
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert len(vq_sd) == len(vq) + len(buffers)


def test_load_official_round_trip():
    cfg = tiny(n_kv_head=2)
    src = randomized(Janus(cfg), seed=5)
    official = to_official(src)
    official["vision_model.vision_tower.attn_pool.latent"] = torch.randn(1, 1, cfg.vit_width)  # dropped
    official["gen_vision_model.quantize.embedding.weight"] = torch.randn(cfg.image_vocab_size, 8)
    dst = Janus(cfg)
    vq = load_official(dst, official)
    assert vq.keys() == {"quantize.embedding.weight"}
    for k, v in src.state_dict().items():
        assert torch.equal(dst.state_dict()[k], v), k
    # a checkpoint with a key too few or too many is an error, not a silent partial load
    with pytest.raises(ValueError, match="missing 1 keys: language_model.model.layers.1.self_attn.k_proj.weight"):
        load_official(dst, {k: v for k, v in official.items() if "layers.1.self_attn.k_proj" not in k})
    with pytest.raises(ValueError, match="unexpected 1 keys: language_model.model.extra.weight"):
        load_official(dst, {**official, "language_model.model.extra.weight": torch.zeros(1)})


def test_full_size_parameter_counts_with_the_vq():
    # model + VQ-16 tokenizer on the meta device == the official totals (SigLIP's unused
    # attn_pool head, 12,595,200 parameters, is the one part we do not build)
    from tokenizer import VQ_PRESETS, VQModel
    with torch.device("meta"):
        vq = sum(p.numel() for p in VQModel(VQ_PRESETS["vq16"]).parameters())
        for name, official in (("janus-pro-1b", 2_089_232_011), ("janus-pro-7b", 7_420_368_523)):
            ours = sum(p.numel() for p in Janus(JanusConfig(**PRESETS[name])).parameters())
            assert ours + vq + 12_595_200 == official, name


def test_image_cost_counts_what_cfg_decoding_computes():
    """image_cost against torch's FLOP counter over a real CFG draw through the KV cache (tiny, GQA,
    a wider gen_head and a deeper aligner so that every term shows), then the facts' figures."""
    from torch.utils.flop_counter import FlopCounterMode

    from tokenizer import VQ_PRESETS, VQModel
    cfg = tiny(n_kv_head=2, sdpa=False, gen_head_width=96, gen_aligner_depth=3)
    model, P, N = Janus(cfg).eval(), 7, cfg.image_tokens
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        cache = model.make_cache(2, P + N)  # the prompt's row and its unconditional twin
        h = model(torch.randn(2, P, cfg.n_embd), cache=cache, start_pos=0)[:, -1]
        for i in range(N):
            code = model.image_logits(h).argmax(-1)  # (2,)
            if i < N - 1:
                h = model(model.embed_image_ids(code)[:, None], cache=cache, start_pos=P + i)[:, -1]
    assert image_cost(cfg, P)["flops"] == counter.get_total_flops()
    # janus_pro_facts.md, "Cost of one image": 7B 15.15 TFLOP in the LLM and heads and 0.57 in the VQ
    # decode, 480 KiB of cache per token per row; 1B ~3.7 TFLOP with the VQ decode, 192 KiB
    with torch.device("meta"), FlopCounterMode(display=False) as counter:
        VQModel(VQ_PRESETS["vq16"]).decode(torch.zeros(1, 576, dtype=torch.long))
    vq = counter.get_total_flops()
    seven, one = (image_cost(JanusConfig(**PRESETS[f"janus-pro-{n}"])) for n in ("7b", "1b"))
    assert seven["flops"] / 1e12 == pytest.approx(15.15, abs=0.01) and vq / 1e12 == pytest.approx(0.57, abs=0.005)
    assert (one["flops"] + vq) / 1e12 == pytest.approx(3.7, abs=0.05)
    assert seven["kv_bytes"] == 480 * 1024 and one["kv_bytes"] == 192 * 1024
