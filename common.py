"""
Small shared helpers: device choice, pixels <-> tensors, command lines, atomic checkpoint I/O and
checked checkpoint loading (sample.py builds the Janus bundle on top of it).

A checkpoint is a plain dict saved with torch.save and always read back with
torch.load(..., weights_only=True): loading a checkpoint can never run code.
"""

import functools
import hashlib
import json
import os
import pickle
import sys
import tempfile
import time

import numpy as np
import torch

# the parser and flag types of every script live in shapes.py, the bottom of the import order
# (its own CLI needs them and must not import torch); re-exported for the scripts
from shapes import Parser, bounded, fraction, nonneg_float, nonneg_int, pos_float, pos_int, weights_list  # noqa: F401


def pick_device(name="auto"):
    """--device -> torch.device: auto (cuda -> mps -> cpu), or one the machine has; a clear
    ValueError for a name torch does not know or a device this machine lacks."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"unknown --device {name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    have = {"cpu": True, "cuda": torch.cuda.is_available(),
            "mps": bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())}
    if not have.get(dev.type, False):
        raise ValueError(f"--device {name}: this machine has no {dev.type} device (use auto or cpu)")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


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
    # the median of 5 ratios: one timing of a sub-millisecond matmul can be 20x off when the machine
    # hiccups, and a single ratio once picked fp32 on a CPU where bf16 runs ~3x faster
    ratios = sorted(best_seconds(lambda: x @ y) / best_seconds(lambda: a @ b) for _ in range(5))
    return ratios[2] < 0.8


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


def add_attention_arg(ap):
    """--attn: the language model's attention kernel (model.Janus.set_attention), for every CLI that runs the model."""
    ap.add_argument("--attn", choices=["sdpa", "triton", "math"], default="sdpa",
                    help="the language model's attention kernel: sdpa (default: PyTorch's fused kernels), triton "
                         "(attention.py's flash attention; a CUDA GPU with the triton package) or math (the plain reference)")


DTYPE_HELP = ("auto (default): bf16 autocast where it measures faster than fp32 on this device (bf16 "
              "matmuls, fp32 norms, attention, losses and weights), else fp32; or force bf16 / fp32")


# -----------------------------------------------------------------------------
# Pixels: uint8 HWC images (what the renderer and PNG files hold) <-> float tensors in [-1, 1]
# (here, not in shapes.py: they make torch tensors, and shapes.py stays numpy/PIL only)


def to_tensor(images):
    """uint8 (H, W, 3) or (B, H, W, 3) numpy -> float (B, 3, H, W) in [-1, 1]."""
    x = torch.tensor(np.asarray(images, dtype=np.uint8))  # a copy: rendered arrays are read-only
    x = x.unsqueeze(0) if x.ndim == 3 else x
    return x.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def to_uint8(pixels):
    """float (B, 3, H, W), roughly [-1, 1] -> uint8 (B, H, W, 3) numpy (Janus: clip((x + 1) / 2 * 255))."""
    x = ((pixels.detach().float() + 1.0) * 127.5).round().clamp(0, 255)
    return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


# -----------------------------------------------------------------------------
# Command lines


def run_cli(ap, argv, run):
    """Parse a stage's command line, run it; a ValueError (bad input, a mismatched checkpoint, a
    NaN loss) becomes one line and a non-zero exit."""
    args = ap.parse_args(argv)
    try:
        run(args)
    except ValueError as e:
        sys.exit(f"error: {e}")


# -----------------------------------------------------------------------------
# Files: atomic writes, digests, output folders that never swallow a user's files


def _fsync_replace(tmp, path):
    # the bytes reach the disk before the name points at them: a crash leaves the old file or the new
    os.replace(tmp, path)
    try:
        fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    except OSError:  # some file systems cannot fsync a directory; the rename itself is still atomic
        pass


def _remove_abandoned(path):
    # temp files of an earlier save that was killed: `{name}.tmp{pid}` beside `path`, ours by name
    folder, name = os.path.split(os.path.abspath(path))
    for f in os.listdir(folder):
        if f.startswith(name + ".tmp") and f[len(name) + 4:].isdigit() and f != f"{name}.tmp{os.getpid()}":
            os.remove(os.path.join(folder, f))


def atomic_write(path, write, binary=False):
    """write(f) into a temporary file beside `path`, fsync, then rename: a reader never sees half
    a file, and a save killed half-way leaves only a temp file that the next save removes."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _remove_abandoned(path)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb" if binary else "w") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_replace(tmp, path)


def save_checkpoint(obj, path):
    atomic_write(path, lambda f: torch.save(obj, f), binary=True)


def write_json(obj, path, indent=1):
    # allow_nan=False: NaN is not JSON; a NaN that reaches an output is a bug to hear about
    atomic_write(path, lambda f: json.dump(obj, f, indent=indent, allow_nan=False))


def write_text(text, path):
    atomic_write(path, lambda f: f.write(text))


def read_json(path):
    with open(path) as f:
        return json.load(f)


_digests = {}


def digest(path):
    """sha256 of a file's bytes (16 hex digits), remembered per (path, size, mtime): what a stage
    records about the checkpoints it was built from, to notice when one was rebuilt since. A
    released model folder (sft.py / rl.py --init): its config.json's."""
    if os.path.isdir(path):
        return digest(os.path.join(path, "config.json"))
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _digests:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _digests[key] = h.hexdigest()[:16]
    return _digests[key]


def check_run_dir(out):
    """A stage's --out: a folder that is (or can be made) writable; checked before any work."""
    if os.path.exists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    os.makedirs(out, exist_ok=True)
    if not os.access(out, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out} is not writable")


MARKER = ".janus-output"  # lists the files a command wrote into a folder it owns


def _owned_files(out):
    """None if `out` is free to use (missing or empty); else the files listed in our marker, if
    every file in the folder is one of them; else a ValueError: the folder holds a user's files."""
    if not os.path.exists(out):
        return None
    if not os.path.isdir(out):
        raise ValueError(f"--out {out} is a file, not a folder")
    have = set(os.listdir(out))
    if not have:
        return None
    listed = set(read_json(os.path.join(out, MARKER))) if MARKER in have else set()
    if have - listed - {MARKER}:
        raise ValueError(f"--out {out} holds files this command did not write: give a new or empty folder "
                         "(nothing was changed)")
    return have - {MARKER}


def new_output_dir(out):
    """Check `out` before any work (a file, a folder of someone else's files, no permission:
    one-line errors) and return an empty temporary folder beside it to write into."""
    _owned_files(out)
    parent = os.path.dirname(os.path.abspath(out))
    try:
        os.makedirs(parent, exist_ok=True)
        return tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out))}.partial-", dir=parent)
    except OSError as e:
        raise ValueError(f"cannot write --out {out}: {e.strerror}") from None


def publish_dir(tmp, out):
    """Move the finished temporary folder to `out`. An earlier output of ours there is replaced,
    file by file of its own list; anything else in `out` stops it with the results left in tmp."""
    try:
        old = _owned_files(out)
    except ValueError as e:
        raise ValueError(f"{e}; this run's results are in {tmp}") from None
    write_json(sorted(os.listdir(tmp)), os.path.join(tmp, MARKER))
    if old is not None or os.path.isdir(out):
        for f in old or ():
            os.remove(os.path.join(out, f))
        if os.path.exists(os.path.join(out, MARKER)):
            os.remove(os.path.join(out, MARKER))
        os.rmdir(out)
    os.replace(tmp, out)


def discard_dir(tmp):
    """Remove a temporary folder new_output_dir made (only files, written by us, one level)."""
    if tmp and os.path.isdir(tmp):
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)


# -----------------------------------------------------------------------------
# Checkpoints: plain dicts, read with weights_only=True, every problem in one line


def load_checkpoint(path, expect=None, keys=(), make=None, finite=False):
    """Read a checkpoint dict (weights only: it can never run code). `expect` maps keys to required
    values, e.g. {"kind": "janus"}; `keys` must be present; finite=True refuses NaN/inf weights.
    `make`: the command that writes a good one, named in every error."""
    hint = f"; {make} writes a good one" if make else ""
    if not os.path.isfile(path):
        raise ValueError(f"checkpoint not found: {path}{hint}")
    if os.path.getsize(path) == 0:
        raise ValueError(f"{path} is empty (0 bytes), not a checkpoint{hint}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "Unsupported global" in str(e):  # a pickled function or class: what a code-running pickle needs
            raise ValueError(f"{path} holds Python objects that are not plain data: refused, loading it could "
                             f"run code{hint}") from None
        raise ValueError(f"{path} is not a checkpoint file (unreadable or truncated){hint}") from None
    except Exception:  # truncated zip, a text file, another format...
        raise ValueError(f"{path} is not a checkpoint file (unreadable or truncated){hint}") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{path} is not a checkpoint of this project{hint}")
    for k, v in (expect or {}).items():
        if ckpt.get(k) != v:
            raise ValueError(f"{path} has {k}={ckpt.get(k)!r}, expected {v!r}{hint}")
    missing = [k for k in keys if k not in ckpt]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not written by this project's code{hint}")
    if finite:
        for name, t in _tensors(ckpt):
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                raise ValueError(f"{path} holds non-finite weights (NaN or inf, first in {name}): "
                                 f"it comes from a diverged run{hint}")
    return ckpt


def _tensors(obj, prefix=""):
    # (name, tensor) of every tensor in nested dicts and lists
    if isinstance(obj, torch.Tensor):
        yield prefix, obj
    elif isinstance(obj, dict):
        for k, v in obj.items():
            yield from _tensors(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from _tensors(v, f"{prefix}[{i}]")


def build(cls, fields, path, make=None):
    """A config dataclass from a checkpoint's dict, or a one-line error naming what does not fit."""
    try:
        return cls(**fields)
    except (TypeError, AssertionError, ValueError) as e:
        hint = f"; {make} writes a good one" if make else ""
        why = str(e).splitlines()[0] if str(e) else "its fields do not fit together"
        raise ValueError(f"{path} has a {cls.__name__} this code cannot build ({why}){hint}") from None


def load_weights(module, state, path, make=None):
    """module.load_state_dict(state), a mismatch as one line naming the first missing/unexpected keys."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError) as e:
        hint = f"; {make} writes a good one" if make else ""
        raise ValueError(f"{path} does not fit its own config: {str(e).splitlines()[0][:200]}{hint}") from None


def load_state(path, kind, settings, ignore=()):
    """A training loop's resumable state at `path` (None if there is none), refused with a one-line
    ValueError if it was made with other `settings` (keys in `ignore` may differ). A settings key
    "inputs" holds the digests of the checkpoints the run started from."""
    if not os.path.isfile(path):
        return None
    st = load_checkpoint(path, {"kind": kind}, keys=("settings",))
    old = st["settings"]
    for name, d in settings.get("inputs", {}).items():
        if old.get("inputs", {}).get(name) != d:
            raise ValueError(f"{path} continues a run that started from another {name} than the one now beside it "
                             f"(rebuilt since?): delete {path} to start this stage afresh, or use another --out")
    diff = [f"{k}={old.get(k)!r} (now {v!r})" for k, v in settings.items()
            if k not in ignore and k != "inputs" and old.get(k) != v]
    if diff:
        raise ValueError(f"{path} is a run with other settings: {', '.join(diff)}; use another --out")
    return st


def stage_receipt(out, config, settings, inputs=()):
    """What a stage records beside its output: the config it ran, its settings, and the digests of
    the checkpoints in `out` it was built from (run.py checks them before reusing the stage)."""
    return {"config": config, "settings": {k: v for k, v in settings.items() if k != "inputs"},
            "inputs": {n: digest(os.path.join(out, n)) for n in inputs}}
