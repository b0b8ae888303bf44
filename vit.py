"""
Pretraining the understanding encoder: our stand-in for SigLIP.

Janus-Pro reads images through a SigLIP ViT that was pretrained on billions of image-text pairs
before Janus ever saw it. Our toy ViT has no such past, and trained from scratch inside the base
stage it does not learn to see shapes in time, so Yes/No questions stay at chance too
(docs/experiments.md, "ViT pretraining"). So, like the VQ tokenizer, the ViT gets its own short
pretraining on ShapeWorld: every patch learns what it shows, from the scene graph:

    shape of the object that covers the patch (circle / square / triangle / background)
    colour of that object (6 colours / background)
    whether the object's centre lies in the patch (one patch per object: what counting needs)

A patch belongs to the object covering most of its pixels, if that is at least COVER of them.
The dense labels give ~64 targets per image instead of one, so this takes seconds, not hours.
The head is thrown away; `vit.pt` holds the ViT's weights, which the base stage starts from.

    python vit.py --config toy --out out/toy      # -> vit.pt, vit_eval.json
"""

import json
import os
import random

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import shapes
from common import (DTYPE_HELP, Parser, check_run_dir, digest, load_checkpoint, load_state, load_weights,
                    pick_device, pos_float, pos_int, run_cli, save_checkpoint, stage_receipt, to_tensor, use_bf16, write_json)
from model import PRESETS, JanusConfig, VisionTransformer
from train import Plan, fit

TRAIN = {
    "tiny": dict(steps=150, batch_size=16, lr=1e-3, warmup=10, eval_scenes=64),
    "toy": dict(steps=300, batch_size=32, lr=1e-3, warmup=30, eval_scenes=512),
    "small": dict(steps=3000, batch_size=64, lr=6e-4, warmup=100, eval_scenes=512),
}
COVER = 0.15  # share of a patch's pixels an object must cover to own the patch
VIT_KEYS = ("image_size", "vit_patch", "vit_width", "vit_layers", "vit_heads", "vit_mlp", "scene_grid")
S, C = len(shapes.SHAPES), len(shapes.COLOUR_NAMES)


def patch_labels(scene, patch):
    """Scene -> per-patch targets, patches in raster order (as the ViT's tokens):
    shape (n,) in 0..S (S = background), colour (n,) in 0..C (C = background), centre (n,) 0/1."""
    g = scene.size // patch
    owner = shapes.object_map(scene).reshape(g, patch, g, patch).transpose(0, 2, 1, 3).reshape(g * g, -1)
    cover = np.stack([(owner == i + 1).mean(1) for i in range(len(scene.objects))], 1)  # (n, objects)
    best = cover.argmax(1)
    owned = cover.max(1) >= COVER
    shape = np.where(owned, [shapes.SHAPES.index(scene.objects[i].shape) for i in best], S)
    colour = np.where(owned, [shapes.COLOUR_NAMES.index(scene.objects[i].colour) for i in best], C)
    centre = np.zeros(g * g, dtype=np.int64)
    for o in scene.objects:
        centre[int(o.cy) // patch * g + int(o.cx) // patch] = 1
    return shape, colour, centre


def make_batch(rng, n, size, patch, grid=0):
    """n random scenes -> pixels (n, 3, H, W) in [-1, 1] and targets shape, colour, centre (n, patches)."""
    scenes = [shapes.random_scene(rng, size, grid=grid) for _ in range(n)]
    labels = [patch_labels(s, patch) for s in scenes]
    pixels = to_tensor(np.stack([shapes.render(s) for s in scenes]))
    return (pixels, *(torch.from_numpy(np.stack(t)).long() for t in zip(*labels)))


class PatchHead(nn.Module):
    """ViT features (B, n, width) -> shape logits (B, n, S+1), colour logits (B, n, C+1), centre logit (B, n)."""

    def __init__(self, width):
        super().__init__()
        self.proj = nn.Linear(width, (S + 1) + (C + 1) + 1)

    def forward(self, h):
        out = self.proj(h).float()
        return out[..., :S + 1], out[..., S + 1:S + C + 2], out[..., -1]


def losses(head_out, shape, colour, centre):
    a, b, c = head_out
    return (F.cross_entropy(a.flatten(0, 1), shape.flatten()) + F.cross_entropy(b.flatten(0, 1), colour.flatten())
            + F.binary_cross_entropy_with_logits(c, centre.float()))


@torch.no_grad()
def patch_metrics(vit, head, n, size, patch, device, grid=0):
    """On held-out random scenes (seed space "vit-eval"): per-patch shape and colour accuracy on the
    patches an object owns, background accuracy, and the share of scenes whose number of predicted
    centres equals the number of objects."""
    vit.eval()
    pixels, shape, colour, centre = make_batch(random.Random("vit-eval"), n, size, patch, grid)
    a, b, c = head(vit(pixels.to(device)))
    a, b, c = a.argmax(-1).cpu(), b.argmax(-1).cpu(), (c > 0).cpu()
    obj = shape < S
    vit.train()
    return {"shape": float((a[obj] == shape[obj]).float().mean()), "colour": float((b[obj] == colour[obj]).float().mean()),
            "background": float((a[~obj] == S).float().mean()),
            "count": float((c.sum(1) == centre.sum(1)).float().mean()), "scenes": n}


def vit_config(cfg):
    return {k: getattr(cfg, k) for k in VIT_KEYS}


def load_vit(path, model):
    """Copy a pretrained vit.pt into model.vision_model; a clear error if it is another shape."""
    make = "python vit.py --config CONFIG --out DIR"
    ckpt = load_checkpoint(path, {"kind": "vit"}, keys=("config", "model"), make=make, finite=True)
    if ckpt["config"] != vit_config(model.cfg):
        raise ValueError(f"{path} is a ViT of another shape ({ckpt['config']}) than this config's ({vit_config(model.cfg)})")
    load_weights(model.vision_model, ckpt["model"], path, make)


def main(argv=None):
    ap = Parser(description="Pretrain the understanding ViT (our SigLIP stand-in) on dense ShapeWorld labels.")
    ap.add_argument("--config", choices=list(TRAIN), default="toy", help="model preset whose ViT to pretrain")
    ap.add_argument("--out", required=True, help="run folder: writes vit.pt, vit_eval.json (vit_state.pt while training)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init and of every batch")
    ap.add_argument("--steps", type=pos_int, help="optimizer steps (the lr schedule spans them)")
    ap.add_argument("--batch-size", type=pos_int, help="images per step")
    ap.add_argument("--lr", type=pos_float, help="peak AdamW learning rate (warm-up, then cosine to lr/10)")
    ap.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help=DTYPE_HELP)
    ap.add_argument("--ckpt-every", type=pos_int, default=200, help="save the resumable state every N steps")
    ap.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    run_cli(ap, argv, run)


def run(args):
    preset = TRAIN[args.config]
    cfg = JanusConfig(**PRESETS[args.config])
    dev = pick_device(args.device)
    pick = lambda name: getattr(args, name) if getattr(args, name) is not None else preset[name]
    check_run_dir(args.out)
    settings = dict(config=vit_config(cfg), seed=args.seed, steps=pick("steps"), batch_size=pick("batch_size"),
                    lr=pick("lr"), warmup=preset["warmup"], bf16=use_bf16(args.dtype, dev), cover=COVER)
    torch.manual_seed(args.seed)
    vit, head = VisionTransformer(cfg).to(dev), PatchHead(cfg.vit_width).to(dev)
    params = list(vit.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=settings["lr"], betas=(0.9, 0.95), weight_decay=0.05)  # decay on all

    def batch_fn(step, micro):
        # the batch of a step is a function of (seed, step) only: a resumed run sees the same data
        rng = random.Random(f"vit-train-{args.seed}-{step}")
        return [t.to(dev) for t in make_batch(rng, settings["batch_size"], cfg.image_size, cfg.vit_patch, cfg.scene_grid)], "loss"

    def loss_fn(batch):
        pixels, shape, colour, centre = batch
        return losses(head(vit(pixels)), shape, colour, centre)

    vit.train()
    plan = Plan(settings["steps"], settings["lr"], settings["warmup"], bf16=settings["bf16"], ckpt_every=args.ckpt_every,
                desc=f"vit {args.config} {'bf16' if settings['bf16'] else 'fp32'}")
    state_path = os.path.join(args.out, "vit_state.pt")
    state = load_state(state_path, "vit_state", settings, ignore=("bf16",))
    step, seconds, _ = fit(batch_fn, loss_fn, optimizer, params, {"model": vit, "head": head}, plan, state_path,
                           "vit_state", settings, state)
    vit_path = os.path.join(args.out, "vit.pt")
    save_checkpoint({"kind": "vit", "config": settings["config"], "model": vit.state_dict(), "step": step}, vit_path)
    result = patch_metrics(vit, head, preset["eval_scenes"], cfg.image_size, cfg.vit_patch, dev, cfg.scene_grid)
    # the receipt run.py checks before reusing this stage
    result.update(config=args.config, steps=step, train_seconds=round(seconds, 1),
                  made=stage_receipt(args.out, args.config, settings), ckpt=digest(vit_path))
    write_json(result, os.path.join(args.out, "vit_eval.json"))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
