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
  loss_fn under autocast, backward (DDP / FSDP reduce the gradients over processes meanwhile) ->
  the loss summed over processes (the NaN guard: every rank sees the same number, so all stop
  together instead of one hanging in a collective) -> clip -> optimizer step -> the trainer's
  after_step hook -> progress bar, resumable state every ckpt_every steps (atomic), the trainer's
  evaluation every eval_every steps.
Data parallel: launch with torchrun; `setup_distributed` reads its environment, and
`distribute(model, loss_fn, plan)` wraps the loss in DDP or shards the model with FSDP2.
"""

import json
import math
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from common import pick_device, save_checkpoint

# -----------------------------------------------------------------------------
# Optimizer and schedule


def make_optimizer(model, lr, weight_decay=0.0, betas=(0.9, 0.95), lr_scale=None):
    """AdamW over the parameters that need a gradient; weight decay on matrices only (not norms,
    biases or the ViT's positional table), as nanoGPT does. With weight_decay 0 this is Adam.
    lr_scale {name prefix: factor}: those parameters train at factor x the schedule's lr (nanochat
    gives its embedding and unembedding their own rates); `fit` applies it every step."""
    scale = lambda n: next((f for pre, f in (lr_scale or {}).items() if n.startswith(pre)), 1.0)
    groups = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            decay = p.dim() >= 2 and "pos_embed" not in n
            groups.setdefault((decay, scale(n)), []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[1]))  # decayed first: a 2-group state of older runs still loads
    return torch.optim.AdamW([{"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1]}
                              for k in order], lr=lr, betas=betas)


def lr_at(step, steps, lr, warmup, restart=0):
    """The learning rate of every training loop here: linear warmup, then cosine decay to 10% of the peak.
    restart > 0: two phases, [0, restart) and [restart, steps), each with its own warmup and decay
    (the base stage's understanding tail: as if a second run continued the first; fit() also starts
    the optimizer's moments afresh there)."""
    if restart and step >= restart:
        step, steps = step - restart, steps - restart
    elif restart:
        steps = restart
    if step < warmup:
        return lr * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


# -----------------------------------------------------------------------------
# Data parallel: PyTorch's DDP (a full copy of the model per process), or FSDP2 (`fully_shard`:
# each process holds 1/world of every weight, gradient and Adam moment, and gathers a block's
# weights just before it runs; what a 7B model needs: 16 bytes per parameter of weights, gradients
# and moments in fp32 is 112 GB, 14 GB per GPU over 8)


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


def add_parallel_args(ap):
    """The flags of a trainer that runs under torchrun (sft.py, rl.py)."""
    ap.add_argument("--parallel", choices=["ddp", "fsdp"], default="ddp",
                    help="under torchrun: ddp (DistributedDataParallel, a full copy of the model per process) or fsdp "
                         "(FSDP2 fully_shard: weights, gradients and Adam state split over the processes, for models "
                         "that do not fit one GPU); ignored in one process")
    ap.add_argument("--checkpointing", action="store_true",
                    help="activation checkpointing: each transformer block runs again in backward instead of keeping "
                         "its activations (less memory, about 1/3 more compute)")


class LossOf(nn.Module):
    """A model and a loss function as one module, so that DDP and FSDP see the whole step inside
    one forward(): our losses call model.embed, the trunk and the heads, not model() alone."""

    def __init__(self, model, loss_fn):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn  # self.model: the parameters DDP / FSDP manage

    def forward(self, batch):
        return self.loss_fn(batch)


def distribute(model, loss_fn, plan):
    """loss_fn as it runs over plan.world processes: through DDP ("ddp") or with the model sharded by
    FSDP2 ("fsdp"; one unit per transformer block, the rest (embeddings, ViT, heads) in the root
    unit); loss_fn itself in one process. Call it before make_optimizer: fully_shard swaps the
    parameters for sharded ones. Both average gradients over processes; fit scales for that."""
    if plan.world == 1:
        return loss_fn
    if plan.parallel == "ddp":
        # a step of one task leaves other parts unused (text-to-image: the text head), and DDP must be told
        return DDP(LossOf(model, loss_fn), find_unused_parameters=True)
    mesh = init_device_mesh(next(model.parameters()).device.type, (plan.world,))
    # bf16: weights gathered and run in bf16, gradients reduced and kept in fp32 (the shards stay fp32)
    mp = MixedPrecisionPolicy(torch.bfloat16, torch.float32) if plan.bf16 else MixedPrecisionPolicy()
    for block in model.layers:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    return fully_shard(LossOf(model, loss_fn), mesh=mesh, mp_policy=mp)


def sharded(model):
    return any(isinstance(m, FSDPModule) for m in model.modules())


def gathered(model):
    """The model with every weight whole, for sampling, evaluating and saving: the model itself, or,
    when FSDP shards it, a plain copy on every process (a collective: every process calls it).
    Sampling runs thousands of small forwards; through FSDP each would gather weights and all
    processes would have to run the very same ones. The copy costs one model's weights per process."""
    if not sharded(model):
        return model
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    with torch.device("meta"):
        copy = type(model)(model.cfg)
    copy.load_state_dict(full, assign=True)
    copy.set_attention(model.attention)
    return copy.train(model.training).requires_grad_(False)


def state_of(modules, optimizer):
    """({name: module state}, optimizer state), whole, as one process would save them. Under FSDP
    (a sharded run trains one module) a collective: every rank calls it, rank 0 gets the tensors,
    and the optimizer's state is keyed by parameter name instead of number."""
    if not any(sharded(m) for m in modules.values()):
        return {n: m.state_dict() for n, m in modules.items()}, optimizer.state_dict()
    (name, m), = modules.items()
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return {name: get_model_state_dict(m, options=opts)}, get_optimizer_state_dict(m, optimizer, options=opts)


def set_state(modules, optimizer, module_states, optimizer_state):
    """state_of's inverse (under FSDP every rank reads the whole state and keeps its shards)."""
    if not any(sharded(m) for m in modules.values()):
        for n, m in modules.items():
            m.load_state_dict(module_states[n])
        optimizer.load_state_dict(optimizer_state)
        return
    (name, m), = modules.items()
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(m, module_states[name], options=opts)
    set_optimizer_state_dict(m, optimizer, optimizer_state, options=opts)


def resume(st, modules, optimizer, extra_state, sharded_run, state_path):
    """Put a saved state back into the modules, the optimizer and the trainer's extra state; a
    sharded (FSDP) state only into a sharded run and an unsharded one only into an unsharded run.
    Returns (step, seconds, log) where it stopped."""
    if st.get("sharded", False) != sharded_run:
        raise ValueError(f"{state_path} was saved by a{' sharded (FSDP)' if st.get('sharded') else 'n unsharded'} run: "
                         f"resume it the same way (--parallel {'fsdp' if st.get('sharded') else 'ddp'}), or delete it")
    set_state(modules, optimizer, st["modules"], st["optimizer"])
    if extra_state is not None:
        extra_state[1](st["extra"])
    return st["step"], st["seconds"], st["log"]


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
    restart: int = 0               # a second run from this step: the schedule again (lr_at), fresh AdamW moments
    clip: float | None = 1.0       # max gradient norm (None: no clipping)
    accum: int = 1                 # micro-batches per optimizer step
    bf16: bool = False             # bf16 autocast for the forward pass (weights, optimizer, losses fp32)
    ckpt_every: int = 100          # resumable state every N steps (and at the end)
    eval_every: int = 0            # the evaluation hook every N steps (0: never)
    desc: str = ""                 # the progress bar's title
    world: int = 1                 # processes
    rank: int = 0
    parallel: str = "ddp"          # over several processes: "ddp" (a copy per process) or "fsdp" (sharded)


def fit(batch_fn, loss_fn, optimizer, params, modules, plan, state_path, kind, settings, state=None,
        after_step=None, evaluate=None, extra_state=None):
    """Train until plan.steps, from `state` (what common.load_state found at state_path: a run with
    the same settings, to resume) or afresh; the resumable state goes to state_path.
    batch_fn(step, micro) -> (batch, name): this process's part of micro-batch `micro` of step
    `step`, a function of (seed, step) so that a resumed run sees the same data; name labels the
    running loss shown (e.g. the SFT task). Built outside autocast (VQ codes stay exact).
    loss_fn(batch) -> loss: this process's share of the step's loss (the shares over micro-batches
    and processes sum to it), run under bf16 autocast when plan.bf16; over several processes, what
    distribute() returned.
    params: what is clipped; modules: {name: module} saved in the state (one module when sharded).
    after_step(step): after each optimizer step (e.g. the VQ's dead-code restart), step = steps
    done; it may return {name: number} to show on the progress bar.
    evaluate(step, seconds): the evaluation hook, every plan.eval_every steps (not at the end), told
    the training seconds so far, called on every rank (under FSDP gathering the weights is a
    collective); what rank 0's returns is printed as JSON. Its own time is not
    training time: it is left out of every `seconds` here (the learning curve's x axis).
    extra_state: (get, set): get() -> a dict saved in the state too, set(dict) restores it.
    Returns (steps done, training seconds summed over resumed runs, the loss log)."""
    master = plan.rank == 0
    step, seconds, log = 0, 0.0, []
    sharded_run = any(sharded(m) for m in modules.values())
    if state is not None:
        step, seconds, log = resume(state, modules, optimizer, extra_state, sharded_run, state_path)
        if master:
            print(f"resuming {state_path} at step {step}")

    def save():
        module_states, optimizer_state = state_of(modules, optimizer)  # every rank: under FSDP a collective
        if master:
            save_checkpoint({"kind": kind, "settings": settings, "step": step, "seconds": seconds + time.time() - t0,
                             "log": log, "modules": module_states, "optimizer": optimizer_state, "sharded": sharded_run,
                             "extra": extra_state[0]() if extra_state else {}}, state_path)

    params = list(params)
    dev_type = params[0].device.type
    running = {}
    bar = tqdm(total=plan.steps, initial=step, desc=plan.desc, disable=not master, dynamic_ncols=True)
    t0 = time.time()
    while step < plan.steps:
        if plan.restart and step == plan.restart:
            # as a second run would: moments kept from the first phase's task mix cost the toy base
            # ~0.09 of its drawing in its understanding-only tail (docs/experiments.md, section 44)
            optimizer.state.clear()
        for g in optimizer.param_groups:
            g["lr"] = lr_at(step, plan.steps, plan.lr, plan.warmup, plan.restart) * g.get("lr_scale", 1.0)
        total = 0.0
        for micro in range(plan.accum):
            batch, name = batch_fn(step, micro)
            with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=plan.bf16):
                loss = loss_fn(batch)
            # DDP and FSDP average the gradients over processes; the shares sum to the step's loss
            (loss * plan.world).backward()
            total += loss.item()
        total = sum_over_processes(total, plan.world, params[0].device)  # every rank checks the same number
        if not math.isfinite(total):
            raise ValueError(f"loss is {total} at step {step} ({name}): lower --lr or use --dtype fp32")
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
        if evaluate is not None and plan.eval_every and step % plan.eval_every == 0 and step < plan.steps:
            t_eval = time.time()
            result = evaluate(step, seconds + t_eval - t0)
            if master:
                bar.write(f"step {step} val: {json.dumps(result)}")
            t0 += time.time() - t_eval  # the clock of training time skips the evaluation
    bar.close()
    if plan.world > 1:
        dist.barrier()
    return step, seconds + time.time() - t0, log
