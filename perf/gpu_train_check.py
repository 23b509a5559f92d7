#!/usr/bin/env python
"""GPU check of the NSA model end to end: ``torch.compile(model, fullgraph=True)`` training at T = 8k.

    OUT=perf/results/h200/train python perf/gpu_train_check.py        # under 3 minutes on an H200

1. Agreement: one NativeSparseAttention layer in float32 on the GPU (backend "auto") against the same layer
   in float64 on the "reference" backend, T = 1024. Fails if the max abs error exceeds 2e-3 x max |exact|.
2. Training: the small NSA language model (default: 2 layers, dim 512, 8 query / 2 KV heads, head dim 64,
   paper NSA settings l=32, d=16, l'=64, n=16, w=512), float32 parameters, bfloat16 autocast, fused AdamW,
   compiled with ``fullgraph=True``, trained for 100 steps on sequences of 8192 tokens of the
   associative-recall stream of ``flexnsa.train_demo`` (next-token loss on every position). Fails on a
   non-finite loss or unless the mean of the last 10 losses is below the mean of the first 10.
3. Compiled vs eager: logits of the compiled model against the eager model on one batch (bf16 autocast);
   fails if the max abs difference exceeds 5% of the largest eager logit.
4. Throughput: forward+backward tokens/s (``triton.testing.do_bench`` median) of the compiled NSA model
   and of the compiled full-attention model of the same size (``attention="full"``: causal
   ``F.scaled_dot_product_attention``), same inputs.

Writes ``gpu_train_check.json`` (after every section, so a timeout keeps what was done) and
``gpu_train_check.md`` under ``$OUT`` (default ``perf/results/tmp``); prints the summary table last and
exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import pathlib
import sys
import time
import traceback

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent




import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import flexnsa  # noqa: E402  (installed: pip install -e .)

from flexnsa import functional  # noqa: E402
from flexnsa.model import NSALanguageModel  # noqa: E402
from flexnsa.module import NativeSparseAttention  # noqa: E402
from flexnsa.train_demo import RecallTask  # noqa: E402

DEVICE = torch.device("cuda")  # --device cpu only for a smoke test of this script


def _sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


class Results:
    def __init__(self, out_dir: pathlib.Path, args):
        self.out_dir = out_dir
        self.data = {
            "args": vars(args),
            "versions": {
                "torch": torch.__version__,
                "triton": _version("triton"),
                "cuda": torch.version.cuda,
                "gpu": torch.cuda.get_device_name() if DEVICE.type == "cuda" else str(DEVICE),
            },
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            "failures": [],
        }

    def set(self, key, value):
        self.data[key] = value
        self.save()

    def fail(self, message: str):
        print(f"FAIL: {message}", flush=True)
        self.data["failures"].append(message)
        self.save()

    def save(self):
        (self.out_dir / "gpu_train_check.json").write_text(json.dumps(self.data, indent=2, default=str))


def _version(name):
    try:
        return __import__(name).__version__
    except Exception:  # noqa: BLE001
        return None


def _resolved_backend(dtype=torch.bfloat16) -> str:
    """What ``backend="auto"`` runs for ``dtype`` inputs on DEVICE (a private helper; informative only)."""
    probe = torch.zeros(1, 1, 1, 8, device=DEVICE, dtype=dtype)
    for arg in (probe, DEVICE):  # its signature took a device first, then a tensor
        try:
            return str(functional._resolve_backend("auto", arg))
        except Exception:  # noqa: BLE001
            continue
    return "unknown"


def _bench_ms(fn) -> float:
    if DEVICE.type == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=100, rep=500, return_mode="median"))
    fn()
    times = []
    for _ in range(3):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return sorted(times)[1]


def build(task: RecallTask, attention: str, args) -> NSALanguageModel:
    torch.manual_seed(args.seed)
    return NSALanguageModel(
        task.vocab_size, dim=args.dim, num_layers=args.layers, num_heads=args.heads, num_kv_heads=args.kv_heads,
        head_dim=args.head_dim, config=flexnsa.NSAConfig(), attention=attention,
    ).to(DEVICE)


def lm_loss(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), tokens[:, 1:].flatten())


# ---- sections --------------------------------------------------------------------------------------
def check_agreement(res: Results, args):
    torch.manual_seed(args.seed)
    layer = NativeSparseAttention(args.dim, args.heads, args.kv_heads, args.head_dim).to(DEVICE)
    exact_layer = copy.deepcopy(layer).double()
    exact_layer.backend = "reference"
    x = torch.randn(1, 1024, args.dim, device=DEVICE)
    with torch.no_grad():
        fast = layer(x).double()
        exact = exact_layer(x.double())
    err = (fast - exact).abs().max().item()
    tol = 2e-3 * exact.abs().max().item()
    res.set("agreement", {"T": 1024, "max_abs_err": err, "tol": tol, "max_abs_exact": exact.abs().max().item()})
    print(f"agreement (float32 '{_resolved_backend(torch.float32)}' vs float64 reference, T=1024): max abs err {err:.2e} "
          f"(tol {tol:.1e})", flush=True)
    if not err <= tol:
        res.fail(f"NSA layer disagrees with the float64 reference: {err:.3e} > {tol:.3e}")


def train(res: Results, args, task: RecallTask):
    model = build(task, "nsa", args)
    compiled = torch.compile(model, fullgraph=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0,
                            fused=DEVICE.type == "cuda")
    gen = torch.Generator().manual_seed(args.seed)
    losses, step_ms = [], []
    compile_s = None
    for step in range(args.steps):
        tokens, _, _ = task.sample(args.batch, gen, DEVICE)
        _sync()
        start = time.perf_counter()
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            loss = lm_loss(compiled(tokens), tokens)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())  # a sync per step, outside the compiled region
        elapsed = time.perf_counter() - start
        if step == 0:
            compile_s = elapsed
            print(f"step 0: compile + first step {compile_s:.1f} s, loss {losses[0]:.4f}", flush=True)
        else:
            step_ms.append(1e3 * elapsed)
        if (step + 1) % 10 == 0:
            print(f"step {step + 1:>4}: loss {sum(losses[-10:]) / 10:.4f}  ({1e3 * elapsed:.1f} ms/step)", flush=True)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    res.set("training", {
        "losses": losses, "first10_mean": first, "last10_mean": last, "compile_plus_first_step_s": compile_s,
        "median_step_ms": sorted(step_ms)[len(step_ms) // 2] if step_ms else None,
        "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else None,
    })
    if not all(math.isfinite(v) for v in losses):
        res.fail("non-finite training loss")
    if not last < first:
        res.fail(f"loss did not fall: first-10 mean {first:.4f}, last-10 mean {last:.4f}")
    return model, compiled


def check_compiled_vs_eager(res: Results, args, task, model, compiled):
    tokens, _, _ = task.sample(args.batch, torch.Generator().manual_seed(args.seed + 1), DEVICE)
    with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
        out_compiled = compiled(tokens).detach()  # grad mode as in training: no recompile
        with torch.no_grad():
            out_eager = model(tokens)
    diff = (out_compiled - out_eager).abs().max().item()
    scale = out_eager.abs().max().item()
    res.set("compiled_vs_eager", {"max_abs_diff": diff, "max_abs_eager": scale})
    print(f"compiled vs eager logits: max abs diff {diff:.3e} (max |logit| {scale:.2f})", flush=True)
    if not (math.isfinite(diff) and diff <= 0.05 * scale):
        res.fail(f"compiled logits differ from eager: {diff:.3e} > 5% of {scale:.3e}")


def throughput(res: Results, args, task, compiled_nsa, compile_full: bool):
    tokens, _, _ = task.sample(args.batch, torch.Generator().manual_seed(args.seed + 2), DEVICE)

    def fwd_bwd(model):
        def run():
            with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
                loss = lm_loss(model(tokens), tokens)
            loss.backward()

        return run

    rows = {"full_compiled": compile_full}
    full_model = build(task, "full", args)
    for name, model in (("nsa", compiled_nsa), ("full", None)):
        if model is None:
            start = time.perf_counter()
            model = torch.compile(full_model, fullgraph=True) if compile_full else full_model
            fwd_bwd(model)()
            _sync()
            rows["full_compile_s"] = time.perf_counter() - start
        ms = _bench_ms(fwd_bwd(model))
        rows[name] = {"fwd_bwd_ms": ms, "tokens_per_s": tokens.numel() / (ms / 1e3)}
        print(f"{name}: forward+backward {ms:.2f} ms, {rows[name]['tokens_per_s']:,.0f} tokens/s", flush=True)
    rows["nsa_over_full"] = rows["nsa"]["tokens_per_s"] / rows["full"]["tokens_per_s"]
    res.set("throughput", rows)


def summary_table(data) -> str:
    def get(*keys):
        value = data
        for key in keys:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return value

    def fmt(value, spec):
        return "-" if value is None else format(value, spec)

    a = data["args"]
    lines = [
        f"## NSA model training check ({data['versions']['gpu']}, torch {data['versions']['torch']}, "
        f"triton {data['versions']['triton']}, {data['date']})",
        "",
        f"Model: {a['layers']} layers, dim {a['dim']}, {a['heads']}/{a['kv_heads']} heads, head dim {a['head_dim']}, "
        f"T={a['seq_len']}, batch {a['batch']}, bf16 autocast, torch.compile(fullgraph=True); NSA backend "
        f"'auto' -> {data.get('backend')}",
        "",
        "| quantity | value |",
        "|---|---|",
        f"| agreement vs float64 reference (T=1024), max abs err | {fmt(get('agreement', 'max_abs_err'), '.2e')} |",
        f"| compile + first step, s | {fmt(get('training', 'compile_plus_first_step_s'), '.1f')} |",
        f"| loss, mean of first 10 steps | {fmt(get('training', 'first10_mean'), '.4f')} |",
        f"| loss, mean of last 10 steps ({a['steps']} steps) | {fmt(get('training', 'last10_mean'), '.4f')} |",
        f"| training step (median), ms | {fmt(get('training', 'median_step_ms'), '.1f')} |",
        f"| peak memory in training, GiB | {fmt(get('training', 'peak_mem_gib'), '.1f')} |",
        f"| compiled vs eager logits, max abs diff | {fmt(get('compiled_vs_eager', 'max_abs_diff'), '.2e')} |",
        f"| NSA fwd+bwd, ms / tokens/s | {fmt(get('throughput', 'nsa', 'fwd_bwd_ms'), '.2f')} / "
        f"{fmt(get('throughput', 'nsa', 'tokens_per_s'), ',.0f')} |",
        f"| full attention (SDPA{', compiled' if get('throughput', 'full_compiled') else ', eager'}) fwd+bwd, "
        f"ms / tokens/s | {fmt(get('throughput', 'full', 'fwd_bwd_ms'), '.2f')} / "
        f"{fmt(get('throughput', 'full', 'tokens_per_s'), ',.0f')} |",
        f"| NSA / full tokens/s | {fmt(get('throughput', 'nsa_over_full'), '.2f')} |",
        f"| failures | {'; '.join(data['failures']) or 'none'} |",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=8192)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile-full", choices=["auto", "yes", "no"], default="auto",
                   help="compile the full-attention baseline (auto: unless 110 s have passed)")
    p.add_argument("--device", default="cuda", help="cuda (the check); cpu only to smoke-test this script")
    args = p.parse_args(argv)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.steps < 20:
        p.error("--steps must be >= 20 (first and last 10 losses are compared)")
    out_dir = pathlib.Path(os.environ.get("OUT", REPO_ROOT / "perf" / "results" / "tmp"))
    out_dir.mkdir(parents=True, exist_ok=True)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("FAIL: CUDA is not available", flush=True)
        return 1
    res = Results(out_dir, args)
    res.set("backend", _resolved_backend())
    task = RecallTask(seq_len=args.seq_len, num_pairs=64, num_queries=64, num_keys=256, num_values=64,
                      num_filler=64)
    t0 = time.perf_counter()
    sections = [("agreement", lambda: check_agreement(res, args))]
    state = {}

    def compile_full() -> bool:
        """Compile the full-attention model too unless that would overrun the 3-minute budget."""
        if args.compile_full != "auto":
            return args.compile_full == "yes"
        return time.perf_counter() - t0 < 110

    def run_train():
        state["model"], state["compiled"] = train(res, args, task)

    sections += [
        ("training", run_train),
        ("compiled_vs_eager", lambda: check_compiled_vs_eager(res, args, task, state["model"], state["compiled"])),
        ("throughput", lambda: throughput(res, args, task, state["compiled"], compile_full())),
    ]
    for name, section in sections:
        start = time.perf_counter()
        try:
            section()
        except Exception:  # noqa: BLE001  (report, keep going where possible)
            traceback.print_exc()
            res.fail(f"{name} raised: {traceback.format_exc().strip().splitlines()[-1]}")
            if name == "training":
                break
        print(f"[{name}: {time.perf_counter() - start:.1f} s, total {time.perf_counter() - t0:.1f} s]", flush=True)
    res.set("total_s", time.perf_counter() - t0)
    table = summary_table(res.data)
    (out_dir / "gpu_train_check.md").write_text(table + "\n")
    print()
    print(table)
    return 1 if res.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
