"""Training demo: a small NSA language model learns associative recall over a long context.

Run ``python -m flexnsa.train_demo`` (about two minutes on 2 CPU cores; CUDA is used when present).

The task (multi-query associative recall): ``num_pairs`` key-value pairs ``k v`` are scattered at random
positions of a long stream of filler tokens; the sequence ends with ``num_queries`` of those keys, each
followed by its value. The loss is the cross-entropy of the value predicted at each query key. Chance
level is ``log(num_values)``; getting below it needs attention that reaches back past the sliding window,
through the compressed and selected branches.

After training the demo prints (1) the agreement of the trained NSA layer with the float64 reference
(maximum absolute error of the module's output against the same module run in float64 on the
``"reference"`` backend) and (2) training throughput (forward+backward tokens/s) against the
full-attention model of the same size.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time

import torch
import torch.nn.functional as F

from .config import NSAConfig
from .model import NSALanguageModel
from .module import NativeSparseAttention

__all__ = ["RecallTask", "main"]


@dataclasses.dataclass(frozen=True)
class RecallTask:
    """Token layout: ``[0, num_filler)`` filler, then keys, then values."""

    seq_len: int = 128
    num_pairs: int = 6
    num_queries: int = 6
    num_keys: int = 16
    num_values: int = 8
    num_filler: int = 8

    def __post_init__(self) -> None:
        if self.num_queries > self.num_pairs or self.num_pairs > self.num_keys:
            raise ValueError("RecallTask needs num_queries <= num_pairs <= num_keys")
        if (self.seq_len - 2 * self.num_queries) // 2 < self.num_pairs:
            raise ValueError(f"seq_len {self.seq_len} is too short for {self.num_pairs} pairs and the queries")

    @property
    def vocab_size(self) -> int:
        return self.num_filler + self.num_keys + self.num_values

    @property
    def first_value(self) -> int:
        return self.num_filler + self.num_keys

    def sample(self, batch: int, generator: torch.Generator, device="cpu"):
        """Returns ``tokens [B, T]`` (int64), ``query_pos [Q]`` (positions of the query keys, whose next
        token is the answer) and ``answers [B, Q]``."""
        T, N, Q = self.seq_len, self.num_pairs, self.num_queries
        tokens = torch.randint(0, self.num_filler, (batch, T), generator=generator)  # [B, T]
        keys = torch.rand(batch, self.num_keys, generator=generator).argsort(-1)[:, :N] + self.num_filler  # [B, N]
        values = torch.randint(0, self.num_values, (batch, N), generator=generator) + self.first_value  # [B, N]
        # pairs occupy distinct 2-token slots of the context before the query section
        num_slots = (T - 2 * Q) // 2
        slots = torch.rand(batch, num_slots, generator=generator).argsort(-1)[:, :N]  # [B, N]
        rows = torch.arange(batch)[:, None]
        tokens[rows, 2 * slots] = keys
        tokens[rows, 2 * slots + 1] = values
        asked = torch.rand(batch, N, generator=generator).argsort(-1)[:, :Q]  # [B, Q] pair indices
        query_pos = T - 2 * Q + 2 * torch.arange(Q)  # [Q]
        answers = values.gather(1, asked)  # [B, Q]
        tokens[:, query_pos] = keys.gather(1, asked)
        tokens[:, query_pos + 1] = answers
        return tokens.to(device), query_pos.to(device), answers.to(device)


def recall_loss(logits: torch.Tensor, query_pos: torch.Tensor, answers: torch.Tensor):
    """Cross-entropy and accuracy of the answers predicted at the query keys."""
    picked = logits[:, query_pos]  # [B, Q, V]
    loss = F.cross_entropy(picked.flatten(0, 1), answers.flatten())
    accuracy = (picked.argmax(-1) == answers).float().mean()
    return loss, accuracy


def demo_config() -> NSAConfig:
    """Small blocks so that a short context has many of them: l=8, d=4, l'=16, n=4, w=16."""
    return NSAConfig(cmp_block=8, cmp_stride=4, slc_block=16, num_selected=4, num_init_blocks=1,
                     num_local_blocks=1, window=16)


def build_model(task: RecallTask, attention: str, args) -> NSALanguageModel:
    return NSALanguageModel(
        task.vocab_size, dim=args.dim, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        config=demo_config(), attention=attention,
    )


class ProgressBar:
    """A one-line progress bar redrawn with carriage returns (no dependency)."""

    def __init__(self, total: int, width: int = 30, stream=None):
        self.total, self.width = total, width
        self.stream = stream or sys.stdout
        self.start = time.perf_counter()

    def update(self, step: int, text: str) -> None:
        done = int(self.width * step / self.total)
        elapsed = time.perf_counter() - self.start
        bar = "#" * done + "." * (self.width - done)
        self.stream.write(f"\r[{bar}] {step:>4}/{self.total} {elapsed:5.0f}s  {text}")
        self.stream.flush()

    def close(self) -> None:
        self.stream.write("\n")
        self.stream.flush()


def train(model, task, args, device, generator) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0, betas=(0.9, 0.98))
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    )
    bar = ProgressBar(args.steps)
    losses, accs = [], []
    model.train()
    for step in range(1, args.steps + 1):
        tokens, query_pos, answers = task.sample(args.batch, generator, device)
        loss, acc = recall_loss(model(tokens), query_pos, answers)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        accs.append(acc.item())
        if step % max(1, args.steps // 100) == 0 or step == args.steps:
            recent = slice(max(0, step - 20), step)
            mean_loss = sum(losses[recent]) / len(losses[recent])
            mean_acc = sum(accs[recent]) / len(accs[recent])
            bar.update(step, f"loss {mean_loss:.3f}  recall {100 * mean_acc:5.1f}%")
    bar.close()
    return losses


@torch.no_grad()
def reference_agreement(layer: NativeSparseAttention, x: torch.Tensor) -> float:
    """Max |module(x) - module_float64_reference(x)| for one trained NSA layer."""
    import copy

    exact = copy.deepcopy(layer).double()
    exact.backend = "reference"
    return (layer(x).double() - exact(x.double())).abs().max().item()


def throughput(model, task, args, device, generator, repeats: int) -> float:
    """Forward+backward tokens per second of ``model`` on the task's sequences."""
    tokens, query_pos, answers = task.sample(args.batch, generator, device)

    def step():
        loss, _ = recall_loss(model(tokens), query_pos, answers)
        loss.backward()

    step()  # warm-up
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * tokens.numel() / (time.perf_counter() - start)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m flexnsa.train_demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300, help="training steps")
    p.add_argument("--seq-len", type=int, default=128, help="tokens per sequence")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.steps < 1 or args.seq_len < 32 or args.batch < 1:
        p.error("need --steps >= 1, --seq-len >= 32, --batch >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    task = RecallTask(seq_len=args.seq_len)
    model = build_model(task, "nsa", args).to(device)
    cfg = model.config
    pairs = cfg.attended_pairs(task.seq_len)
    print(
        f"flexnsa training demo on {device}: associative recall, {task.num_pairs} key-value pairs hidden in "
        f"{task.seq_len} tokens, {task.num_queries} queries at the end"
    )
    print(
        f"model: {args.layers} layers, dim {args.dim}, {args.heads} query / {args.kv_heads} kv heads, "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; NSA l={cfg.cmp_block} d={cfg.cmp_stride} "
        f"l'={cfg.slc_block} n={cfg.num_selected} w={cfg.window}"
    )
    print(
        f"query-key pairs scored per head: NSA {pairs['cmp'] + pairs['slc'] + pairs['win']:,} "
        f"(cmp {pairs['cmp']:,}, slc {pairs['slc']:,}, win {pairs['win']:,}), full attention {pairs['full']:,}"
    )
    print(f"chance loss log({task.num_values}) = {math.log(task.num_values):.3f}; recall at chance "
          f"{100 / task.num_values:.1f}%")
    losses = train(model, task, args, device, generator)
    first, last = losses[: max(1, len(losses) // 10)], losses[-max(1, len(losses) // 10):]
    print(f"loss: first tenth {sum(first) / len(first):.3f} -> last tenth {sum(last) / len(last):.3f}")

    model.eval()
    tokens, _, _ = task.sample(2, generator, device)
    with torch.no_grad():
        x = model.blocks[0].attn_norm(model.embed(tokens))  # [2, T, dim], the first NSA layer's input
    err = reference_agreement(model.blocks[0].attn, x)
    print(f"agreement: trained NSA layer vs float64 reference, max abs error {err:.2e}")

    full = build_model(task, "full", args).to(device)
    repeats = 5 if device.type == "cpu" else 20
    nsa_tps = throughput(model, task, args, device, generator, repeats)
    full_tps = throughput(full, task, args, device, generator, repeats)
    print(
        f"throughput (forward+backward, T={task.seq_len}, batch {args.batch}): NSA {nsa_tps:,.0f} tok/s, "
        f"full attention {full_tps:,.0f} tok/s ({nsa_tps / full_tps:.2f}x)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
