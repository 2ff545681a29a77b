"""A small decoder-only language model with Canon layers, trained on associative recall.

Canon layers (Allen-Zhu, "Physics of Language Models: Part 4.1") are short causal depthwise
convolutions with a residual, placed at four points of each transformer block:

    A: on the normed hidden state, before attention      C: on the normed hidden state, before the MLP
    B: on the concatenated Q, K and V projections        D: on the concatenated gate and up projections

Each is a `causal_conv1d_mps.ShortConvolution(..., residual=True)`; `--conv torch` builds the same model
on a plain `nn.Conv1d(groups=D)` with causal padding instead, for comparison.

The task has a known answer: a row lists key-value pairs, then asks for some of the keys again; the
model must answer each with its value. Attention has no positional encoding: the Canon layers give each
token its neighbours, which is all this task needs (a value token sees the key just before it).

After training, the model answers fresh queries with cached decoding: one prefill pass that returns
every conv state (`output_final_state=True`) and the attention keys and values, then one token at a time
through `ShortConvolution.step` and a KV cache.

With `--context-parallel` under `torchrun`, every row's time axis is split over the ranks (context
parallelism): the Canon layers exchange their W-1 halo through `causal_conv1d_mps.context_parallel`,
attention gathers the keys and values of all ranks, each rank scores its slice of the targets, and the
gradients are summed over the ranks before the (identical) optimizer step on every rank. The loss
curve is that of one process on the same data.

    python examples/canon_lm.py                  # best device available, library conv
    python examples/canon_lm.py --conv torch     # the same model on nn.Conv1d
    torchrun --nproc-per-node 2 examples/canon_lm.py --context-parallel      # 2 GPUs (NCCL), or CPU (gloo)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import causal_conv1d_mps as ccmps
import causal_conv1d_mps.context_parallel as cp

IGNORE = -100  # cross_entropy's ignore_index: positions whose next token is not an answer


# --------------------------------------------------------------------------- the task


@dataclass(frozen=True)
class RecallTask:
    """Rows of `num_pairs` distinct keys, each followed by a value, then `num_queries` of those keys
    again, each followed by its value. Tokens: keys are `0..num_keys-1`, values come after them."""

    num_keys: int = 32
    num_values: int = 32
    num_pairs: int = 16
    num_queries: int = 8

    @property
    def vocab_size(self) -> int:
        return self.num_keys + self.num_values

    @property
    def prompt_len(self) -> int:
        return 2 * self.num_pairs

    def sample(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """Returns `tokens` `[B, 2*(pairs+queries)]` int64 on the CPU and `answers` `[B, queries]`."""
        shape = (batch_size, self.num_keys)
        keys = torch.rand(shape, generator=generator).argsort(dim=1)[:, : self.num_pairs]
        values = self.num_keys + torch.randint(self.num_values, keys.shape, generator=generator)
        asked = torch.rand(keys.shape, generator=generator).argsort(dim=1)[:, : self.num_queries]
        query_keys, answers = keys.gather(1, asked), values.gather(1, asked)
        pairs = torch.stack([keys, values], dim=2).flatten(1)
        queries = torch.stack([query_keys, answers], dim=2).flatten(1)
        return torch.cat([pairs, queries], dim=1), answers

    def training_batch(self, batch_size: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """`inputs` and next-token `targets`, both `[B, T-1]`; only the answers are scored (the
        pairs and the query keys are random, so no model can predict them)."""
        tokens, _ = self.sample(batch_size, generator)
        targets = torch.full_like(tokens[:, 1:], IGNORE)
        answer_at = torch.arange(self.prompt_len + 1, tokens.shape[1], 2)
        targets[:, answer_at - 1] = tokens[:, answer_at]
        return tokens[:, :-1], targets

    def describe(self, token: int) -> str:
        return f"k{token:02d}" if token < self.num_keys else f"v{token - self.num_keys:02d}"


# --------------------------------------------------------------------------- the model


@dataclass
class CanonLMConfig:
    vocab_size: int
    d_model: int = 128
    n_layers: int = 2
    n_heads: int = 4
    ffn_hidden: int = 256  # width of the gate and of the up projection each
    canon: str = "ABCD"  # which Canon layers to build; "" gives a plain transformer
    canon_width: int = 4
    conv: str = "library"  # "library": ccmps.ShortConvolution; "torch": TorchShortConvolution


class TorchShortConvolution(nn.Conv1d):
    """The part of `ShortConvolution`'s interface this model uses (no mask, no packed sequences), on a
    plain `nn.Conv1d(groups=D)` with causal (left) padding. Its weight is `[D, 1, W]` where the library's
    is `[D, W]`; `copy_weights` converts."""

    def __init__(self, hidden_size, kernel_size=4, bias=False, activation="silu", residual=False):
        super().__init__(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=bias)
        self.activation, self.residual = activation, residual

    def forward(self, x: Tensor, cache: Tensor | None = None, output_final_state: bool = False):
        """`x` `[B, T, D]`; `cache` `[B, D, W-1]` holds the inputs before `x`. Returns `(y, new_cache)`."""
        width = self.kernel_size[0]
        x_bdt = x.transpose(1, 2)
        if cache is None:
            extended = F.pad(x_bdt, (width - 1, 0))
        else:
            extended = torch.cat([cache.to(x.dtype), x_bdt], dim=2)
        new_cache = None
        if output_final_state or cache is not None:
            new_cache = extended[..., extended.shape[2] - (width - 1) :].contiguous()
        y = super().forward(extended).transpose(1, 2)
        if self.activation is not None:
            y = F.silu(y)
        # under autocast the conv runs in low precision; return x's dtype as the library does
        return (x + y if self.residual else y).to(x.dtype), new_cache

    def step(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        """Decodes `x` `[B, D]` or `[B, L, D]`; shifts the new inputs into `cache` in place."""
        tokens = x if x.dim() == 3 else x.unsqueeze(1)
        y, window = self.forward(tokens, cache)
        cache.copy_(window)
        return (y if x.dim() == 3 else y.squeeze(1)), cache


def make_canon_conv(config: CanonLMConfig, channels: int) -> nn.Module:
    conv_class = {"library": ccmps.ShortConvolution, "torch": TorchShortConvolution}[config.conv]
    # No activation: Canon layers are linear mixes of the last few tokens, plus the residual.
    return conv_class(channels, config.canon_width, bias=False, activation=None, residual=True)


@dataclass
class LayerCache:
    """Decoding state of one block: the conv state of each Canon layer, and attention's keys and values.
    An empty cache is filled by the call that receives it (prefill); a filled one is continued."""

    conv: dict[str, Tensor] = field(default_factory=dict)
    keys: Tensor | None = None  # [B, H, S, head_dim]
    values: Tensor | None = None


class CanonBlock(nn.Module):
    def __init__(self, config: CanonLMConfig):
        super().__init__()
        d, hidden = config.d_model, config.ffn_hidden
        self.n_heads = config.n_heads
        self.attn_norm = nn.RMSNorm(d)
        self.qkv = nn.Linear(d, 3 * d, bias=False)
        self.attn_out = nn.Linear(d, d, bias=False)
        self.mlp_norm = nn.RMSNorm(d)
        self.gate_up = nn.Linear(d, 2 * hidden, bias=False)
        self.down = nn.Linear(hidden, d, bias=False)
        widths = {"A": d, "B": 3 * d, "C": d, "D": 2 * hidden}
        self.canon = nn.ModuleDict({p: make_canon_conv(config, widths[p]) for p in config.canon})
        self.context_parallel: cp.ContextParallel | None = None  # set by use_context_parallel

    def _canon(self, place: str, x: Tensor, cache: LayerCache | None) -> Tensor:
        if place not in self.canon:
            return x
        conv = self.canon[place]
        if cache is None:
            return conv(x)[0]
        if place in cache.conv:
            return conv.step(x, cache.conv[place])[0]
        y, cache.conv[place] = conv(x, output_final_state=True)
        return y

    def _attend(self, qkv: Tensor, cache: LayerCache | None) -> Tensor:
        batch, length, _ = qkv.shape
        q, k, v = qkv.unflatten(2, (3, self.n_heads, -1)).permute(2, 0, 3, 1, 4)
        if cache is not None:
            if cache.keys is not None:
                k, v = torch.cat([cache.keys, k], dim=2), torch.cat([cache.values, v], dim=2)
            cache.keys, cache.values = k, v
        total = k.shape[2]
        if self.context_parallel is not None and cache is None:
            # this rank's queries against every rank's keys: causal in global positions
            k, v = gather_sequence(k, self.context_parallel), gather_sequence(v, self.context_parallel)
            first = self.context_parallel.rank * length
            positions = first + torch.arange(length, device=q.device)
            visible = torch.arange(k.shape[2], device=q.device) <= positions[:, None]
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
        elif length == total:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif length == 1:  # one new token sees every cached one
            out = F.scaled_dot_product_attention(q, k, v)
        else:  # several new tokens after a cache: causal among themselves
            mask = torch.ones(length, total, dtype=torch.bool, device=q.device).tril(total - length)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return out.transpose(1, 2).reshape(batch, length, -1)

    def forward(self, h: Tensor, cache: LayerCache | None = None) -> Tensor:
        x = self._canon("A", self.attn_norm(h), cache)
        qkv = self._canon("B", self.qkv(x), cache)
        h = h + self.attn_out(self._attend(qkv, cache))
        x = self._canon("C", self.mlp_norm(h), cache)
        gate, up = self._canon("D", self.gate_up(x), cache).chunk(2, dim=-1)
        return h + self.down(F.silu(gate) * up)


class CanonLM(nn.Module):
    def __init__(self, config: CanonLMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(CanonBlock(config) for _ in range(config.n_layers))
        self.norm = nn.RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)

    def forward(self, tokens: Tensor, cache: list[LayerCache] | None = None) -> Tensor:
        """`tokens` `[B, T]` -> logits `[B, T, vocab]`. Without `cache`: the training forward.
        With `cache` (from `new_cache()`): the first call is the prefill and fills it; later calls
        decode their tokens after the cached ones and extend it in place."""
        h = self.embed(tokens)
        for i, block in enumerate(self.blocks):
            h = block(h, None if cache is None else cache[i])
        return self.head(self.norm(h))

    def new_cache(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]


def copy_weights(src: nn.Module, dst: nn.Module) -> None:
    """Loads `src`'s parameters into `dst` built with the other `conv`: the names are the same and only
    the Canon weights' shapes differ (`[D, W]` against `nn.Conv1d`'s `[D, 1, W]`)."""
    shapes = {name: t.shape for name, t in dst.state_dict().items()}
    dst.load_state_dict({name: t.reshape(shapes[name]) for name, t in src.state_dict().items()})


# --------------------------------------------------------------------------- context parallelism


_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherSequence(torch.autograd.Function):
    """Every rank's `t` `[B, H, S, hd]` (equal S) concatenated along time; the backward hands each rank
    the sum over ranks of the gradient on its own slice."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        ctx.group = group
        world = dist.get_world_size(group)
        parts = t.new_empty((world * t.shape[0], *t.shape[1:]))  # rank-major along dim 0
        _all_gather(parts, t.contiguous(), group=group)
        return parts.unflatten(0, (world, -1)).permute(1, 2, 0, 3, 4).flatten(2, 3)

    @staticmethod
    def backward(ctx, grad: Tensor):
        world = dist.get_world_size(ctx.group)
        b, heads, total, dim = grad.shape
        parts = grad.reshape(b, heads, world, total // world, dim).permute(2, 0, 1, 3, 4).contiguous()
        mine = grad.new_empty(parts.shape[1:])
        _reduce_scatter(mine, parts.flatten(0, 1), group=ctx.group)
        return mine, None


def gather_sequence(t: Tensor, context: cp.ContextParallel) -> Tensor:
    return _GatherSequence.apply(t, context.group)


def use_context_parallel(model: CanonLM, context: cp.ContextParallel | None) -> None:
    """Splits the time axis of the model's forward over `context`'s ranks (None: back to one process)."""
    for block in model.blocks:
        block.context_parallel = context
        for conv in block.canon.values():
            if not isinstance(conv, ccmps.ShortConvolution):
                raise ValueError("context parallelism needs the library's ShortConvolution (--conv library)")
            conv.context_parallel = context


def shard_batch(inputs: Tensor, targets: Tensor, context: cp.ContextParallel) -> tuple[Tensor, Tensor]:
    """This rank's time slice of a batch, after padding the time axis to a multiple of the group size
    (a pad token at the end changes no earlier output: everything is causal; its target is ignored)."""
    world = context.world_size
    pad = -inputs.shape[1] % world
    inputs = F.pad(inputs, (0, pad), value=0)
    targets = F.pad(targets, (0, pad), value=IGNORE)
    return cp.shard(inputs, 1, context), cp.shard(targets, 1, context)


# --------------------------------------------------------------------------- training and decoding


def best_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The low-precision dtype for autocast, or None for float32. "auto": bf16 where the device has it,
    else fp16 (CUDA and MPS); float32 on CPU, where autocast gives this small model no speed."""
    if precision != "auto":
        return {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[precision]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        try:  # bf16 on MPS needs macOS 14
            torch.ones(1, device=device, dtype=torch.bfloat16)
            return torch.bfloat16
        except (RuntimeError, TypeError):
            return torch.float16
    return None


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def show_progress(step: int, total: int, loss: float, width: int = 30) -> None:
    """A bar redrawn in place on a terminal; in a log, a line at every tenth of the run."""
    on_terminal = sys.stdout.isatty()
    if not on_terminal and step % max(1, total // 10) and step != total:
        return
    filled = width * step // total
    bar = f"train [{'#' * filled}{'.' * (width - filled)}] {step}/{total} loss {loss:.4f}"
    print(f"\r{bar}" if on_terminal else bar, end="\n" if step == total or not on_terminal else "", flush=True)


def train(model: CanonLM, task: RecallTask, *, steps: int, batch_size: int, lr: float,
          amp_dtype: torch.dtype | None = None, seed: int = 0, progress: bool = True,
          context: cp.ContextParallel | None = None) -> list[float]:
    """AdamW with warmup and cosine decay; returns the loss of every step.

    With `context` (after `use_context_parallel`), every rank draws the same batch and trains on its time
    slice: its loss is its share of the batch's mean (summed over its targets, divided by the batch's
    count), and the gradients are summed over the ranks, so that every rank takes the single-process step."""
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * s / steps))))
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype is torch.float16)
    losses = []
    model.train()
    for step in range(1, steps + 1):
        inputs, targets = (t.to(device) for t in task.training_batch(batch_size, generator))
        scored = (targets != IGNORE).sum()
        if context is not None:
            inputs, targets = shard_batch(inputs, targets, context)
        with autocast(device, amp_dtype):
            logits = model(inputs)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE,
                               reduction="sum") / scored
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        if context is not None:  # what DistributedDataParallel over these ranks would do (as a sum)
            for p in model.parameters():
                if p.grad is not None:
                    dist.all_reduce(p.grad, group=context.group)
            loss = loss.detach().clone()
            dist.all_reduce(loss, group=context.group)
        scaler.unscale_(optimizer)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(optimizer)
        scaler.update()
        schedule.step()
        losses.append(loss.item())
        if progress:
            show_progress(step, steps, losses[-1])
    return losses


@torch.no_grad()
def generate(model: CanonLM, prompt: Tensor, max_new_tokens: int, amp_dtype=None) -> Tensor:
    """Greedy continuation of `prompt` `[B, T]` with cached decoding; returns `[B, max_new_tokens]`."""
    cache = model.new_cache()
    with autocast(prompt.device, amp_dtype):
        logits = model(prompt, cache)  # prefill: fills the conv states and the KV cache
        new_tokens = [logits[:, -1].argmax(-1)]
        for _ in range(max_new_tokens - 1):
            logits = model(new_tokens[-1][:, None], cache)  # one token through step + KV cache
            new_tokens.append(logits[:, -1].argmax(-1))
    return torch.stack(new_tokens, dim=1)


@torch.no_grad()
def answer_queries(model: CanonLM, tokens: Tensor, task: RecallTask, amp_dtype=None) -> Tensor:
    """Prefills the pairs of `tokens` (from `task.sample`), then decodes one token at a time: each
    query key is fed, the model's answer is read and fed back. Returns the answers `[B, queries]`."""
    cache = model.new_cache()
    predicted = []
    with autocast(tokens.device, amp_dtype):
        model(tokens[:, : task.prompt_len], cache)
        for i in range(task.num_queries):
            query_key = tokens[:, task.prompt_len + 2 * i]
            predicted.append(model(query_key[:, None], cache)[:, -1].argmax(-1))
            model(predicted[-1][:, None], cache)
    return torch.stack(predicted, dim=1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["mps", "cuda", "cpu"], help="default: best available")
    parser.add_argument("--conv", choices=["library", "torch"], default="library",
                        help="Canon layers on causal_conv1d_mps.ShortConvolution or on nn.Conv1d")
    parser.add_argument("--canon", default="ABCD", help="which Canon layers to use (subset of ABCD)")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--d-model", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--context-parallel", action="store_true",
                        help="under torchrun: split every row's time axis over the ranks (gloo on CPU, NCCL on CUDA)")
    parser.add_argument("--eval-batch", type=int, default=512, help="rows of the recall test after training")
    parser.add_argument("--loss-log", help="write the loss of every step to this JSON file (first rank)")
    args = parser.parse_args(argv)
    if set(args.canon) - set("ABCD"):
        parser.error(f"--canon: expected letters from ABCD, got {args.canon!r}")

    device = torch.device(args.device) if args.device else best_device()
    context = None
    if args.context_parallel:
        if "RANK" not in os.environ:
            parser.error("--context-parallel: run under torchrun, e.g. torchrun --nproc-per-node 2 "
                         "examples/canon_lm.py --context-parallel")
        if args.conv != "library":
            parser.error("--context-parallel: needs --conv library")
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        context = cp.ContextParallel()
    main_rank = context is None or context.rank == 0
    say = print if main_rank else (lambda *a, **k: None)
    amp_dtype = autocast_dtype(device, args.precision)
    torch.manual_seed(args.seed)
    task = RecallTask()
    config = CanonLMConfig(task.vocab_size, d_model=args.d_model, n_layers=args.layers,
                           ffn_hidden=2 * args.d_model, canon="".join(sorted(set(args.canon))),
                           conv=args.conv)
    model = CanonLM(config).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    precision = str(amp_dtype or torch.float32).removeprefix("torch.")
    split = f" context_parallel={context.world_size}" if context is not None else ""
    say(f"canon-lm: device={device.type} precision={precision} conv={config.conv} "
        f"canon={config.canon or '-'} params={n_params / 1e6:.2f}M seq_len={2 * (task.num_pairs + task.num_queries)}"
        f"{split}")

    if context is not None:
        use_context_parallel(model, context)
    start = time.perf_counter()
    losses = train(model, task, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                   amp_dtype=amp_dtype, seed=args.seed, progress=main_rank, context=context)
    if args.loss_log and main_rank:
        with open(args.loss_log, "w") as f:
            json.dump(losses, f)
    if context is not None:
        use_context_parallel(model, None)  # every rank holds the same weights; decode on one process each
    say(f"trained {args.steps} steps in {time.perf_counter() - start:.1f} s, "
          f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")

    model.eval()
    tokens, answers = task.sample(args.eval_batch, torch.Generator().manual_seed(args.seed + 1))
    tokens, answers = tokens.to(device), answers.to(device)
    start = time.perf_counter()
    predicted = answer_queries(model, tokens, task, amp_dtype)
    accuracy = (predicted == answers).float().mean().item()  # .item() waits for the device
    seconds = time.perf_counter() - start
    say(f"recall with cached decoding: {100 * accuracy:.1f}% of {answers.numel()} queries right "
          f"(chance {100 / task.num_values:.1f}%), {2 * task.num_queries} decode steps in {seconds:.2f} s")
    pairs = " ".join(task.describe(t) for t in tokens[0, : task.prompt_len].tolist())
    query, got, want = (task.describe(int(t)) for t in (tokens[0, task.prompt_len], predicted[0, 0], answers[0, 0]))
    say(f"example: {pairs} | {query} -> {got} (expected {want})")
    if context is not None:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
