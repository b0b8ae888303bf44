"""
Small shared helpers: device choice, atomic checkpoint I/O, and loading a trained Janus bundle
(model + VQ tokenizer + text tokenizer) from one checkpoint file.

A checkpoint is a plain dict saved with torch.save and always read back with
torch.load(..., weights_only=True): loading a checkpoint can never run code.
"""

import functools
import math
import os
import sys
import time

import torch


def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


@functools.lru_cache(maxsize=None)
def bf16_pays(device):
    """Whether bf16 autocast speeds matmuls up on this device, measured (a 256x256 matmul, fp32 vs
    bf16). CPUs differ by 100x here: one with AMX / AVX512-BF16 ran bf16 ~5x faster than fp32, one
    with AVX2 only ran it ~70x SLOWER (emulated). CUDA: whenever the GPU supports bf16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    a, b = torch.randn(256, 256), torch.randn(256, 256)
    x, y = a.bfloat16(), b.bfloat16()
    return best_seconds(lambda: x @ y) < 0.8 * best_seconds(lambda: a @ b)


def best_seconds(fn, reps=3):
    """The fastest of `reps` timed calls of fn, after one untimed warm-up call."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def use_bf16(choice, device):
    """A stage's --dtype (auto | bf16 | fp32) -> whether to train under bf16 autocast."""
    return choice == "bf16" or (choice == "auto" and bf16_pays(device))


DTYPE_HELP = ("auto (default): bf16 autocast where it measures faster than fp32 on this device (bf16 "
              "matmuls, fp32 norms, attention, losses and weights), else fp32; or force bf16 / fp32")


def lr_at(step, steps, lr, warmup):
    """The learning rate of every training loop here: linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def load_state(path, kind, settings, ignore=()):
    """A training loop's resumable state at `path` (None if there is none), refused with a one-line
    ValueError if it was made with other `settings` (keys in `ignore` may differ)."""
    if not os.path.isfile(path):
        return None
    st = load_checkpoint(path, {"kind": kind})
    diff = [f"{k}={st['settings'].get(k)!r} (now {v!r})" for k, v in settings.items()
            if k not in ignore and st["settings"].get(k) != v]
    if diff:
        raise ValueError(f"{path} is a run with other settings: {', '.join(diff)}; use another --out")
    return st


def run_cli(ap, argv, run):
    """Parse a stage's command line, check the options every stage shares, run it; a ValueError
    (bad input, a mismatched checkpoint, a NaN loss) becomes one line and a non-zero exit."""
    args = ap.parse_args(argv)
    if args.ckpt_every < 1:
        ap.error(f"--ckpt-every must be at least 1, got {args.ckpt_every}")
    try:
        run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


def save_checkpoint(obj, path):
    """torch.save to a temporary file, then rename: a reader never sees half a checkpoint."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path, expect=None):
    """Read a checkpoint dict (weights only). `expect` maps keys to required values, e.g.
    {"kind": "janus"}; a mismatch is a one-line ValueError naming the key."""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, not a torch file, pickled code...
        raise ValueError(f"cannot read checkpoint {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint of this project")
    for k, v in (expect or {}).items():
        if ckpt.get(k) != v:
            raise ValueError(f"checkpoint {path} has {k}={ckpt.get(k)!r}, expected {v!r}")
    return ckpt


# -----------------------------------------------------------------------------
# A trained Janus bundle: model + VQ tokenizer + the text vocabulary, in one file


def janus_checkpoint(model, vq, tok, **extra):
    """The dict that stage scripts save and sample.py / judge.py load."""
    from dataclasses import asdict
    return {"kind": "janus", "config": asdict(model.cfg), "model": model.state_dict(),
            "vq_config": asdict(vq.cfg), "vq": vq.state_dict(), "vocab": list(tok.vocab), **extra}


def load_janus(path, device="cpu"):
    """(model, vq, tok, ckpt) from a Janus checkpoint, in eval mode. Clear errors for a missing
    file, another kind of checkpoint, or a vocabulary that is not this code's."""
    from model import Janus, JanusConfig
    from tokenizer import VQConfig, VQModel, TextTokenizer
    import shapes
    ckpt = load_checkpoint(path, {"kind": "janus"})
    tok = TextTokenizer(shapes.WORDS)
    if ckpt["vocab"] != tok.vocab:
        raise ValueError(f"checkpoint {path} was trained with another text vocabulary than this code's")
    model = Janus(JanusConfig(**ckpt["config"]))
    vq = VQModel(VQConfig(**ckpt["vq_config"]))
    try:
        model.load_state_dict(ckpt["model"])
        vq.load_state_dict(ckpt["vq"])
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path} does not fit its own config: {str(e).splitlines()[0]}") from None
    return model.to(device).eval(), vq.to(device).eval(), tok, ckpt
