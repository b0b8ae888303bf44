"""
Speed of model.py side by side with Hugging Face `transformers`' Janus (JanusForConditionalGeneration)
built from the same shapes with the same weights (DESIGN.md, "Performance method"):
- training: forward + backward + AdamW step over a mixed sequence (text, an image through the ViT,
  an image as VQ codes), loss on text via lm_head and on the VQ codes via gen_head; tokens/s;
- decoding: KV-cached image-token generation with classifier-free guidance (cond + uncond rows in
  one batch, as the Janus sampler does), image tokens/s.
Both models get identical inputs, the same loss code around them, the same optimizer and dtype.

    python bench.py --config toy --batch 8            # --dtype auto: bf16 where it measures faster
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from common import Parser, best_seconds, bf16_pays, nonneg_int, pos_int
from model import PRESETS, Janus, JanusConfig, copy_to_hf, hf_janus, hf_loss, make_batch, ours_loss

# -----------------------------------------------------------------------------
# CFG image-token decoding with a KV cache: 2B rows (cond, then uncond), greedy for determinism


@torch.no_grad()
def ours_decode(model, prompt, steps, cfg_w):
    B2, P = prompt.shape
    cache = model.make_cache(B2, P + steps)
    h = model(model.embed_tokens(prompt), cache=cache)[:, -1]  # prefill, (2B, D)
    for t in range(steps):
        logits = model.image_logits(h)  # (2B, V)
        cond, uncond = logits.chunk(2)
        nxt = (uncond + cfg_w * (cond - uncond)).argmax(-1)  # (B,)
        x = model.embed_image_ids(torch.cat([nxt, nxt])[:, None], t % model.cfg.image_tokens)  # (2B, 1, D)
        h = model(x, cache=cache, start_pos=P + t)[:, -1]
    return nxt


@torch.no_grad()
def hf_decode(hf, prompt, steps, cfg_w):
    from transformers import StaticCache

    B2, P = prompt.shape
    lm = hf.model.language_model
    cache = StaticCache(config=hf.config.text_config, max_cache_len=P + steps)  # what Janus' generate uses
    h = lm(inputs_embeds=lm.embed_tokens(prompt), cache=cache, use_cache=True).last_hidden_state[:, -1]
    for t in range(steps):
        logits = hf.model.generation_head(h).float()
        cond, uncond = logits.chunk(2)
        nxt = (uncond + cfg_w * (cond - uncond)).argmax(-1)
        x = hf.prepare_embeddings_for_image_generation(torch.cat([nxt, nxt])[:, None])
        h = lm(inputs_embeds=x, cache=cache, use_cache=True).last_hidden_state[:, -1]
    return nxt


def bench_sampling(ours, hf, cfg, batch, runs):
    """Image tokens/s of sample.generate's core and of HF's generate in image mode."""
    import sample
    import shapes
    from transformers import GenerationConfig
    from tokenizer import TextTokenizer

    tok = TextTokenizer(shapes.WORDS)
    prompt = "a red circle to the left of a blue square and two green triangles"
    seqs = [sample.prompt_seq(tok, prompt) for _ in range(batch)]
    P, N = len(seqs[0]), cfg.image_tokens

    @torch.no_grad()
    def ours_sample(compile=False):
        cache, km, h, pos = sample.prefill_pair(ours, seqs, [s.uncond(tok, True) for s in seqs], tok, P + N, "cpu")
        gens = [torch.Generator().manual_seed(i) for i in range(batch)]
        opt = sample.Options(compile=compile)
        return sample.draw_image(ours, cache, km, h, pos, batch, opt, sample.draw_uniforms(gens, N, "cpu"))[0]

    # sample.py --compile: the first call compiles; the same seeds must give the same images
    t0 = time.perf_counter()
    same = (ours_sample(True) == ours_sample()).float().mean().item()
    print(f"sample.py --compile: compiled (and one eager draw) in {time.perf_counter() - t0:.1f} s; "
          f"{same:.1%} of its image tokens equal the eager sampler's (same seeds)"
          + ("" if same == 1.0 else "  <-- WARNING: the compiled step draws other tokens"))

    ids = torch.tensor([s.ids for s in seqs])  # the same token ids and length
    gc = GenerationConfig(do_sample=True, guidance_scale=5.0, bos_token_id=tok.bos, pad_token_id=tok.pad,
                          max_new_tokens=N, generation_kwargs={"boi_token_id": tok.boi})

    @torch.no_grad()
    def hf_sample():
        return hf.generate(ids, attention_mask=torch.ones_like(ids), generation_mode="image", generation_config=gc)

    # like for like: generate with transformers' language model compiled under the same inductor
    # options as sample.py's step (weights frozen in, max-autotune GEMMs; its heads stay eager)
    lm = hf.model.language_model
    compiled_forward = torch.compile(lm.forward)

    def hf_sample_compiled():
        lm.forward = compiled_forward
        try:
            with torch._inductor.config.patch(sample.CPU_COMPILE_OPTIONS):
                return hf_sample()
        finally:
            del lm.forward  # the class's forward again

    t0 = time.perf_counter()
    hf_sample_compiled()
    print(f"transformers' language model compiled in {time.perf_counter() - t0:.1f} s")
    fns = {"ours": ours_sample, "ours compiled": lambda: ours_sample(True), "hf": hf_sample,
           "hf compiled": hf_sample_compiled}
    return {k: batch * N / sec for k, sec in timed(fns, 1, runs).items()}


# -----------------------------------------------------------------------------
# floors: what the same matmuls cost alone, and what streaming the weights costs


def linears(*modules):
    return [m for mod in modules for m in mod.modules() if isinstance(m, torch.nn.Linear)]


@torch.no_grad()
def gemm_seconds(layers, rows, dtype, reps=10):
    """Seconds for `rows` rows to pass through every nn.Linear in `layers`, each matmul timed alone
    (best of reps, its weight hot in cache): what a step costs if it did nothing but its matmuls."""
    total = 0.0
    for lin in layers:
        x, w = torch.randn(rows, lin.in_features, dtype=dtype), lin.weight.detach().to(dtype)
        total += best_seconds(lambda: F.linear(x, w), reps)
    return total


def copy_bandwidth(mb=64):
    """Bytes/s of a large tensor copy (read + write): the memory system's practical rate."""
    x = torch.empty(mb * 2 ** 20 // 4)
    y = torch.empty_like(x)
    return 2 * x.numel() * 4 / best_seconds(lambda: y.copy_(x), 5)


# -----------------------------------------------------------------------------


def timed(fns, warmup, steps):
    """Median seconds per call of each function, calling them in turn (a, b, a, b, ...) so that a
    neighbour's load on the shared CPU falls on all of them alike; warm-up calls first."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts) for name, ts in times.items()}


def train_step(model, loss_fn, batch, amp):
    # the same optimizer for both: fused AdamW (transformers' Trainer default); betas as SPEC.md
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05, fused=True)

    def step():
        with amp:
            loss = loss_fn(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def parse_args():
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to measure
    p.add_argument("--config", default="toy", choices=[k for k in PRESETS if not k.startswith("janus")],
                   help="model preset (the full-size ones do not fit a CPU bench)")
    p.add_argument("--batch", type=pos_int, default=8, help="rows per training step; images per decode run")
    p.add_argument("--seq", type=nonneg_int, default=0, help="training sequence length (0: 2 images + 64 text)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto (default): bf16 where it measures faster than fp32 on this CPU, else fp32; bf16: training under bf16 autocast (fp32 weights, optimizer state "
                   "and losses; bf16 matmuls), decoding on bf16 weights and KV cache")
    p.add_argument("--compile", action="store_true",
                   help="also time training with both models' ViT and LLM under torch.compile "
                   "(the image splice and the heads stay eager)")
    # how long
    p.add_argument("--steps", type=pos_int, default=10, help="timed training steps per model (after --warmup)")
    p.add_argument("--warmup", type=nonneg_int, default=3, help="untimed training steps per model first")
    p.add_argument("--decode-runs", type=pos_int, default=5,
                   help="timed CFG decode runs of one image per row (after one warm-up run)")
    p.add_argument("--prompt", type=pos_int, default=32, help="prompt length before the image when decoding")
    p.add_argument("--threads", type=nonneg_int, default=0, help="torch threads (0: torch's default, one per core)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the random batch")
    args = p.parse_args()
    if args.dtype == "auto":
        args.dtype = "bf16" if bf16_pays("cpu") else "fp32"
    return args


def bench_training(args, cfg, T):
    """Training tokens/s of both models (identical weights and batch), and the FLOPs of one step."""
    amp = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    b = make_batch(cfg, args.batch, T, args.seed)
    ours = Janus(cfg)
    hf = copy_to_hf(ours, hf_janus(cfg))

    # the work: 6 FLOPs per parameter and position, N counting what each kind of position runs through
    count = lambda *ms: sum(p.numel() for m in ms for p in m.parameters())
    n_text, n_img = (b["text_targets"] >= 0).sum().item(), (b["image_targets"] >= 0).sum().item()
    flops = 6 * (count(ours.layers) * args.batch * T
                 + count(ours.vision_model, ours.aligner) * b["und_mask"].sum().item()
                 + count(ours.gen_aligner) * b["gen_mask"].sum().item()
                 + count(ours.lm_head) * n_text + count(ours.gen_head) * n_img)
    print(f"config {args.config}: {count(ours):,} params (HF: {count(hf) - count(hf.model.vqmodel):,} "
          f"without its VQ); batch {args.batch} x seq {T}; dtype {args.dtype}; {torch.get_num_threads()} threads")

    # training: identical weights and batch, so the first losses must agree
    with torch.no_grad(), amp:
        loss0 = ours_loss(ours, b).item(), hf_loss(hf, b).item()
    print(f"first loss: ours {loss0[0]:.5f}  hf {loss0[1]:.5f}")
    ours.train()
    hf.train()
    steps = {"ours": train_step(ours, ours_loss, b, amp), "hf": train_step(hf, hf_loss, b, amp)}
    if args.compile:
        ours_c, hf_c = Janus(cfg).train(), hf_janus(cfg).train()
        ours_c.vision_model = torch.compile(ours_c.vision_model)
        hf_c.model.vision_model = torch.compile(hf_c.model.vision_model)
        hf_c.model.language_model = torch.compile(hf_c.model.language_model)
        steps["ours compiled"] = train_step(torch.compile(ours_c), ours_loss, b, amp)
        steps["hf compiled"] = train_step(hf_c, hf_loss, b, amp)
        for fn in list(steps.values())[2:]:
            t0 = time.perf_counter()
            fn()  # compiles forward and backward
            print(f"compiled in {time.perf_counter() - t0:.1f} s")
    return {k: args.batch * T / sec for k, sec in timed(steps, args.warmup, args.steps).items()}, flops


def bench_decoding(args, cfg):
    """Image tokens/s of the plain CFG decode loop and of sampling as users run it, both models."""
    # fresh identical weights, cast to the dtype (inference runs on bf16 weights, as the official
    # sampler does, rather than under autocast)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours = Janus(cfg).eval()
    hf = copy_to_hf(ours, hf_janus(cfg)).to(dtype)
    ours = ours.to(dtype)
    g = torch.Generator().manual_seed(args.seed)
    prompt = torch.randint(0, cfg.vocab_size, (args.batch, args.prompt), generator=g)
    prompt = torch.cat([prompt, torch.zeros_like(prompt)])  # the uncond twins (all pads, id 0 here)
    runs = {"ours": lambda: ours_decode(ours, prompt, cfg.image_tokens, 5.0),
            "hf": lambda: hf_decode(hf, prompt, cfg.image_tokens, 5.0)}
    decode = {k: args.batch * cfg.image_tokens / sec for k, sec in timed(runs, 1, args.decode_runs).items()}

    # sampling as users run it: sample.py's CFG sampler (per-sample seeds, temperature 1, the
    # first image's uncond rows) against transformers' generate(generation_mode="image"), same
    # weights, batch and prompt length; VQ decoding excluded on both sides
    return decode, bench_sampling(ours, hf, cfg, args.batch, args.decode_runs), ours


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cfg = JanusConfig(**{**PRESETS[args.config], "image_pos": False})  # HF's Janus has no image_pos table
    T = args.seq or 2 * cfg.image_tokens + 64
    train, flops = bench_training(args, cfg, T)
    decode, sampling, ours = bench_decoding(args, cfg)
    # decoding: 2 FLOPs per parameter per row and image token, two rows (cond, uncond) per image
    dflops = 2 * 2 * sum(p.numel() for m in (ours.layers, ours.gen_aligner, ours.gen_head) for p in m.parameters())
    print(f"training FLOPs per step (6 N T): {flops / 1e9:.2f} GFLOP; decoding: {dflops / 1e6:.1f} MFLOP per image token")
    print(f"{'':34s}{'ours':>10s}{'hf':>10s}{'ours/hf':>9s}")
    rows = [("train tokens/s", train["ours"], train["hf"]),
            ("train GFLOP/s", train["ours"] * flops / (args.batch * T) / 1e9, train["hf"] * flops / (args.batch * T) / 1e9)]
    if args.compile:
        rows += [("train tokens/s, both compiled", train["ours compiled"], train["hf compiled"]),
                 ("train tokens/s, ours compiled", train["ours compiled"], train["hf"])]
    rows += [("CFG decode image tokens/s", decode["ours"], decode["hf"]),
             ("decode GFLOP/s", decode["ours"] * dflops / 1e9, decode["hf"] * dflops / 1e9),
             ("CFG sampling image tokens/s (generate)", sampling["ours"], sampling["hf"]),
             ("sampling GFLOP/s", sampling["ours"] * dflops / 1e9, sampling["hf"] * dflops / 1e9),
             ("  ... sample.py --compile", sampling["ours compiled"], sampling["hf"]),
             ("  ... both compiled, same options", sampling["ours compiled"], sampling["hf compiled"])]
    for name, a, c in rows:
        print(f"{name:34s}{a:10.1f}{c:10.1f}{a / c:9.2f}")
    print_floors(args, ours, T, train, sampling, dflops)


def print_floors(args, ours, T, train, sampling, dflops):
    # how far from the floors (DESIGN.md, "Performance method"): the LM's matmuls alone, timed
    # one by one with hot weights (a training step runs each 3 times: forward, and two in backward)
    lm = linears(ours.layers)
    head = linears(ours.layers, ours.gen_aligner, ours.gen_head)
    wdt = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    t_train = 3 * gemm_seconds(lm, args.batch * T, wdt)
    peak = 3 * sum(2 * l.in_features * l.out_features for l in lm) * args.batch * T / t_train  # FLOP/s
    dtype = wdt
    t_dec = gemm_seconds(head, 2 * args.batch, dtype)  # one image token: cond + uncond rows
    wbytes = sum(lin.weight.numel() for lin in head) * torch.finfo(dtype).bits // 8
    bw = copy_bandwidth()
    s = sampling

    def reached(cap):  # the four sampling rates as shares of a cap in image tokens/s
        return (f"{s['ours'] / cap:.0%} of that reached, {s['ours compiled'] / cap:.0%} compiled; "
                f"hf {s['hf'] / cap:.0%}, {s['hf compiled'] / cap:.0%} compiled")

    print(f"floors on this CPU ({args.dtype}):")
    print(f"  training: the LM's matmuls alone {t_train:.3f} s per step -> at most {args.batch * T / t_train:.0f} "
          f"tokens/s ({train['ours'] * t_train / (args.batch * T):.0%} of that reached; hf {train['hf'] * t_train / (args.batch * T):.0%}); "
          f"{peak / 1e9:.0f} GFLOP/s in them")
    print(f"  decoding: matmuls alone {t_dec * 1e3:.2f} ms per image token of {args.batch} images -> at most "
          f"{args.batch / t_dec:.0f} image tokens/s ({reached(args.batch / t_dec)})")
    # the compiled step runs other GEMM kernels (inductor's C++ template where autotuning timed it
    # faster), so ATen's matmuls timed alone are no strict floor for it; this line counts FLOPs
    # instead, at the best matmul rate measured here (training's), not the machine's nominal peak
    print(f"  decoding: {dflops / 1e6:.1f} MFLOP per image token at {peak / 1e9:.0f} GFLOP/s (the training matmuls' rate) -> "
          f"at most {peak / dflops:.0f} image tokens/s ({reached(peak / dflops)})")
    print(f"  decoding: {wbytes / 1e6:.1f} MB of weights per token at {bw / 1e9:.1f} GB/s (a large copy) -> "
          f"at most {args.batch * bw / wbytes:.0f} image tokens/s")


if __name__ == "__main__":
    main()
