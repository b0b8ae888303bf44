"""
The one training loop. tokenizer.py (the VQ), vit.py (the SigLIP stand-in), sft.py (the base model
and SFT) and rl.py all train through `fit`; each keeps only what is its own: its data, its loss, its
evaluation, its final artefact.

    optimizer = make_optimizer(model, lr=1e-3)
    state = load_state("out/x_state.pt", "x_state", settings)  # None, or a run to resume
    fit(batch_fn, loss_fn, optimizer, params, {"model": model}, Plan(steps=1000, lr=1e-3, warmup=50),
        "out/x_state.pt", "x_state", settings, state)

What the loop does every step (nanoGPT's train.py, as a function):
  lr from the schedule (linear warmup, cosine to 10%) -> for each micro-batch: batch_fn, then
  loss_fn under autocast, backward -> the loss summed over processes (the NaN guard: every rank sees the same
  number, so all stop together instead of one hanging in a collective) -> gradients summed over
  processes -> clip -> optimizer step -> the trainer's after_step hook -> progress bar, resumable
  state every ckpt_every steps (atomic), the trainer's evaluation every eval_every steps.
Data parallel: launch with torchrun; `setup_distributed` reads its environment.
"""

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import pick_device, save_checkpoint

# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95)):
    """AdamW over the parameters that need a gradient; weight decay on matrices only (not norms,
    biases or the ViT's positional table), as nanoGPT does. With weight_decay 0 this is Adam."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = [p for n, p in named if p.dim() >= 2 and "pos_embed" not in n]
    rest = [p for n, p in named if not (p.dim() >= 2 and "pos_embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=lr, betas=betas)


def lr_at(step, steps, lr, warmup):
    """The learning rate of every training loop here: linear warmup, then cosine decay to 10% of the peak."""
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# Data parallel: what DistributedDataParallel does, spelled out


def setup_distributed(device_name):
    """(device, rank, world): one process, or one of torchrun's (gloo on CPU, nccl on CUDA)."""
    dev = pick_device(device_name)
    if "RANK" not in os.environ:
        return dev, 0, 1
    dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return dev, dist.get_rank(), dist.get_world_size()


def all_reduce_grads(params, world):
    """Sum every gradient over the processes. Each process's loss is its share of the global
    batch's loss, so the sum is the gradient of the global loss. One flat buffer: one message."""
    if world == 1:
        return
    # a path this step doesn't use (e.g. the ViT in text-to-image) has no gradient on any process
    # (they all run the same kind of step) and must keep none: AdamW skips it, a zero would decay it
    params = [p for p in params if p.grad is not None]
    flat = torch.cat([p.grad.flatten() for p in params])
    dist.all_reduce(flat)
    i = 0
    for p in params:
        p.grad.copy_(flat[i:i + p.numel()].view_as(p))
        i += p.numel()


def sum_over_processes(x, world, device):
    """A float summed over the processes (every rank gets the same number)."""
    if world == 1:
        return x
    t = torch.tensor([x], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.item()


# -----------------------------------------------------------------------------
# The loop


@dataclass
class Plan:
    steps: int
    lr: float
    warmup: int
    clip: float | None = 1.0       # max gradient norm (None: no clipping)
    accum: int = 1                 # micro-batches per optimizer step
    bf16: bool = False             # bf16 autocast for the forward pass (weights, optimizer, losses fp32)
    ckpt_every: int = 100          # resumable state every N steps (and at the end)
    eval_every: int = 0            # the evaluation hook every N steps (0: never)
    desc: str = ""                 # the progress bar's title
    world: int = 1                 # processes
    rank: int = 0


def fit(batch_fn, loss_fn, optimizer, params, modules, plan, state_path, kind, settings, state=None,
        after_step=None, evaluate=None, extra_state=None):
    """Train until plan.steps, from `state` (what common.load_state found at state_path: a run with
    the same settings, to resume) or afresh; the resumable state goes to state_path.
    batch_fn(step, micro) -> (batch, name): this process's part of micro-batch `micro` of step
    `step`, a function of (seed, step) so that a resumed run sees the same data; name labels the
    running loss shown (e.g. the SFT task). Built outside autocast (VQ codes stay exact).
    loss_fn(batch) -> loss: this process's share of the step's loss (the shares over micro-batches
    and processes sum to it), run under bf16 autocast when plan.bf16.
    params: what is clipped and all-reduced; modules: {name: module} saved in the state.
    after_step(step): after each optimizer step (e.g. the VQ's dead-code restart), step = steps
    done; it may return {name: number} to show on the progress bar.
    evaluate(step, seconds): the rank-0 evaluation hook, every plan.eval_every steps (not at the
    end), told the training seconds so far; what it returns is printed as JSON. Its own time is not
    training time: it is left out of every `seconds` here (the learning curve's x axis).
    extra_state: (get, set): get() -> a dict saved in the state too, set(dict) restores it.
    Returns (steps done, training seconds summed over resumed runs, the loss log)."""
    master = plan.rank == 0
    step, seconds, log = 0, 0.0, []
    st = state
    if st is not None:
        for name, m in modules.items():
            m.load_state_dict(st["modules"][name])
        optimizer.load_state_dict(st["optimizer"])
        step, seconds, log = st["step"], st["seconds"], st["log"]
        if extra_state is not None:
            extra_state[1](st["extra"])
        if master:
            print(f"resuming {state_path} at step {step}")

    def save():
        if master:
            save_checkpoint({"kind": kind, "settings": settings, "step": step, "seconds": seconds + time.time() - t0,
                             "log": log, "modules": {n: m.state_dict() for n, m in modules.items()},
                             "optimizer": optimizer.state_dict(), "extra": extra_state[0]() if extra_state else {}},
                            state_path)

    params = list(params)
    dev_type = params[0].device.type
    running = {}
    bar = tqdm(total=plan.steps, initial=step, desc=plan.desc, disable=not master, dynamic_ncols=True)
    t0 = time.time()
    while step < plan.steps:
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, plan.steps, plan.lr, plan.warmup)
        total = 0.0
        for micro in range(plan.accum):
            batch, name = batch_fn(step, micro)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=plan.bf16):
                loss = loss_fn(batch)
            loss.backward()
            total += loss.item()
        total = sum_over_processes(total, plan.world, params[0].device)  # every rank checks the same number
        if not math.isfinite(total):
            raise ValueError(f"loss is {total} at step {step} ({name}): lower --lr or use --dtype fp32")
        all_reduce_grads(params, plan.world)
        if plan.clip is not None:
            torch.nn.utils.clip_grad_norm_(params, plan.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        shown = after_step(step) if after_step is not None else None
        running[name] = 0.9 * running.get(name, total) + 0.1 * total
        log.append((step, name, round(total, 5)))
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in sorted(running.items()) + sorted((shown or {}).items())})
        if step % plan.ckpt_every == 0 or step == plan.steps:
            save()
        if master and evaluate is not None and plan.eval_every and step % plan.eval_every == 0 and step < plan.steps:
            t_eval = time.time()
            bar.write(f"step {step} val: {json.dumps(evaluate(step, seconds + t_eval - t0))}")
            t0 += time.time() - t_eval  # the clock of training time skips the evaluation
    bar.close()
    if plan.world > 1:
        dist.barrier()
    return step, seconds + time.time() - t0, log
