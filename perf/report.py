#!/usr/bin/env python3
"""One command, one GPU report: ``python perf/report.py``.

Times ``flexnsa.nsa_attention`` forward and forward+backward at the shapes of ``shared/PERF.md``,
each of its stages (compressed, scores+top-n, window, selected+combine), the
``NativeSparseAttention`` module, and in the same process, on the same inputs, the baselines: full
causal attention through SDPA (cuDNN, flash) and FlexAttention, FlexAttention with a 512-token
window, and fla-core's ``parallel_nsa`` when importable. Every time is the median of
``triton.testing.do_bench`` after warm-up; every baseline is also given as a ratio
baseline / NSA. Before timing, a correctness gate compares the timed path with the float64
reference at a short length.

Writes ``<out>/<gpu-slug>.md``, ``<out>/<gpu-slug>.json`` and ``<out>/<gpu-slug>.png`` and prints a
short summary table last. A piece that fails (not built, OOM, unsupported) is recorded as
"n/a (reason)" and the run goes on. Exit status 1 when a result is wrong (correctness gate failed,
non-finite output) or the GPU context was lost; 0 otherwise.

``--cpu-smoke`` runs the whole pipeline (gate, cases, writers) on tiny CPU shapes: a dry run.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import re
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import torch  # noqa: E402

import _cases  # noqa: E402
import _sanity  # noqa: E402
import _shapes  # noqa: E402
import _writers  # noqa: E402
from _setup import REPO_ROOT  # noqa: E402
from _timing import free_memory, is_oom, median_ms  # noqa: E402

import flexnsa  # noqa: E402  (importable: _cases called ensure_flexnsa)

CHECK_SEQ_LEN = {"cuda": 2000, "cpu": 300}  # not a multiple of any block; NB > n on CUDA


class ContextLost(Exception):
    """The CUDA context is unusable (illegal address, device assert): nothing more can run."""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Benchmark flexnsa against cuDNN/flash SDPA, FlexAttention and fla-core on one GPU.",
    )
    parser.add_argument("--quick", action="store_true",
                        help="paper shape only, at 8k and 64k (other shapes only when named in --shapes)")
    parser.add_argument("--shapes", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                        help="comma list among: " + ",".join(_shapes.GPU_SHAPES) + " (default: all)")
    parser.add_argument("--seq-lens", type=_shapes.parse_seq_lens,
                        help="comma list of lengths for every chosen shape, e.g. 8k,64k (default: PERF.md's)")
    parser.add_argument("--out", type=pathlib.Path,
                        help="output folder (default: $OUT if set, else perf/results; "
                             "for --cpu-smoke, $OUT else a temporary folder)")
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG")
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage times")
    parser.add_argument("--no-module", action="store_true", help="skip the NativeSparseAttention module")
    parser.add_argument("--flex-window", action="store_true",
                        help="add the FlexAttention sliding-window baseline (one more compile per shape)")
    parser.add_argument("--no-check", action="store_true", help="skip the correctness gate")
    parser.add_argument("--budget-s", type=float, default=330.0,
                        help="soft time budget in seconds: pieces not started by then are recorded "
                             "'n/a (time budget)' (default 330)")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="dry run of the whole pipeline on tiny CPU shapes (no CUDA baselines)")
    parser.add_argument("--render", type=pathlib.Path, metavar="JSON",
                        help="only rewrite the Markdown beside a report's JSON (same numbers; no timing)")
    return parser.parse_args(argv)


def render(json_path: pathlib.Path) -> int:
    """Rewrites ``<name>.md`` from ``<name>.json`` of an earlier run (e.g. after a change of the
    table format); the plot is linked when ``<name>.png`` exists."""
    run = json.loads(json_path.read_text())
    plot = json_path.with_suffix(".png")
    _writers.write_markdown(run, json_path.with_suffix(".md"), plot.name if plot.exists() else None)
    print(f"wrote {json_path.with_suffix('.md')}")
    return 0


# ---- environment ------------------------------------------------------------------------------
def _command_output(cmd: list[str], cwd=None) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=cwd)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 and done.stdout.strip() else None


def _package_version(name: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def _auto_backend(device: torch.device) -> str:
    """What ``backend="auto"`` resolves to (read from flexnsa.functional when it says)."""
    from flexnsa import functional

    resolve = getattr(functional, "_resolve_backend", None)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for probe in (torch.empty(1, 1, 1, 128, device=device, dtype=dtype), device):  # head dim of the shapes
        try:
            return f"auto -> {resolve('auto', probe)}"
        except Exception:  # noqa: BLE001 - informational only; the signature is private
            continue
    return "auto"


def environment(device: torch.device, argv: list[str]) -> dict:
    """Report header: date, device, driver and library versions."""
    import triton

    header = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        smi = _command_output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                               "--format=csv,noheader"])
        header["GPU"] = name
        header["driver"] = smi.splitlines()[0].split(",")[1].strip() if smi else "unknown (no nvidia-smi)"
        header["nvidia-smi"] = smi.splitlines()[0] if smi else "not available"
        header["CUDA (torch)"] = torch.version.cuda
        header["cuDNN"] = str(torch.backends.cudnn.version())
    else:
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} threads)"
        header["device"] = name
    header["torch"] = torch.__version__
    header["triton"] = triton.__version__
    header["python"] = platform.python_version()
    header["fla-core"] = _package_version("fla-core")
    # FLEXNSA_COMMIT first: a copied checkout (e.g. a remote GPU machine) may carry a stale .git
    commit = os.environ.get("FLEXNSA_COMMIT") or _command_output(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT)
    header["flexnsa"] = f"{flexnsa.__version__}" + (f" (commit {commit})" if commit else "")
    header["nsa_attention backend"] = _auto_backend(device)
    header["command"] = "`python perf/report.py " + " ".join(argv) + "`"
    slug = "cpu" if device.type == "cpu" else re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    return {"device_name": name, "slug": slug, "header": header}


# ---- measuring --------------------------------------------------------------------------------
def _reason(error: BaseException) -> str:
    if is_oom(error):
        return "out of memory"
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def _context_alive(device: torch.device) -> bool:
    if device.type != "cuda":
        return True
    try:
        torch.cuda.synchronize(device)
        torch.empty(1, device=device).add_(1)
        torch.cuda.synchronize(device)
        return True
    except Exception:  # noqa: BLE001
        return False


def _finite(tensors) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in tensors if t is not None and t.is_floating_point())


class Runner:
    """Builds and times cases, recording a row per (piece, direction); never raises but ContextLost."""

    def __init__(self, device: torch.device, deadline: float):
        self.device = device
        self.deadline = deadline
        self.records: list[dict] = []
        self.wrong: list[str] = []

    def _record(self, inp, kind, name, direction, ms=None, reason="", note="", no_bwd=False):
        self._append(inp.shape, inp.seq_len, kind, name, direction, ms, reason, note, no_bwd)

    def _append(self, shape, seq_len, kind, name, direction, ms=None, reason="", note="", no_bwd=False):
        self.records.append(dict(shape=shape.name, seq_len=seq_len, kind=kind, name=name,
                                 direction=direction, ms=ms, reason=reason, note=note, no_bwd=no_bwd))

    def record_all(self, shape, seq_len, kind, name, reason):
        """Both directions of a piece that did not run."""
        for direction in _writers.DIRECTIONS:
            self._append(shape, seq_len, kind, name, direction, reason=reason)

    def measure(self, kind: str, name: str, build, inp, check_finite: bool) -> None:
        """Times ``build(inp)``'s forward and forward+backward; records "n/a" on any failure."""
        if time.monotonic() > self.deadline:
            self.record_all(inp.shape, inp.seq_len, kind, name, "skipped: time budget of the run spent")
            return
        try:
            case = build(inp)
        except _cases.Unavailable as error:
            self.record_all(inp.shape, inp.seq_len, kind, name, str(error))
            return
        except Exception as error:  # noqa: BLE001 - recorded, the run goes on
            self._after_failure(error)
            self.record_all(inp.shape, inp.seq_len, kind, name, _reason(error))
            return
        for direction, fn in (("fwd", case.fwd), ("fwd+bwd", case.fwd_bwd)):
            if fn is None:
                self._record(inp, kind, name, direction, reason=case.no_bwd, note=case.note, no_bwd=True)
                continue
            if time.monotonic() > self.deadline:
                self._record(inp, kind, name, direction, reason="skipped: time budget of the run spent")
                continue
            try:
                out = fn()  # warm-up / compile, and the output to check
                if check_finite:
                    grads = [x.grad for x in case.leaves] if direction == "fwd+bwd" else []
                    # the attention output only: a log-sum-exp is -inf on rows that see no key
                    output = out[0] if isinstance(out, (tuple, list)) else out
                    if not _finite([output] + grads):
                        self.wrong.append(f"{kind} {name} {inp.shape.name} T={inp.seq_len} {direction}")
                        self._record(inp, kind, name, direction, reason="WRONG: non-finite output or gradient")
                        continue
                del out
                ms = median_ms(fn, self.device, case.leaves)
                self._record(inp, kind, name, direction, ms=ms, note=case.note)
                print(f"  {inp.shape.name:<12} T={inp.seq_len:<6} {name:<16} {direction:<8} {ms:10.3f} ms",
                      flush=True)
            except Exception as error:  # noqa: BLE001
                self._after_failure(error)
                self._record(inp, kind, name, direction, reason=_reason(error), note=case.note)
                print(f"  {inp.shape.name:<12} T={inp.seq_len:<6} {name:<16} {direction:<8} n/a: {_reason(error)}",
                      flush=True)
            finally:
                for x in case.leaves:
                    x.grad = None
        del case
        free_memory()

    def _after_failure(self, error: BaseException) -> None:
        """Frees memory after a failure; raises ContextLost when the GPU can no longer run."""
        free_memory_safe()
        if not _context_alive(self.device):
            raise ContextLost(_reason(error)) from error


def free_memory_safe() -> None:
    try:
        free_memory()
    except Exception:  # noqa: BLE001 - a dead context raises here; _context_alive reports it
        pass


def run_point(runner: Runner, shape, seq_len: int, config, pieces: list[tuple[str, str, object, bool]]) -> None:
    """Times ``pieces`` (kind, name, builder, check_finite) on fresh inputs of one (shape, T)."""
    try:
        inp = _cases.make_inputs(shape, seq_len, config, runner.device)
    except Exception as error:  # noqa: BLE001
        runner._after_failure(error)
        for kind, name, _, _ in pieces:
            runner.record_all(shape, seq_len, kind, name, f"inputs: {_reason(error)}")
        return
    for kind, name, build, check_finite in pieces:
        runner.measure(kind, name, build, inp, check_finite=check_finite)
    del inp
    free_memory_safe()


def passes(device: torch.device, args) -> list[list[tuple[str, str, object, bool]]]:
    """Pass 1, the headline: NSA, cuDNN and fla-core (the baselines of the targets) at every point;
    pass 2: the other baselines; pass 3: stages and module. Should the time budget run out, it is the
    less important figures that go missing."""
    names = _cases.baseline_names(device, args.flex_window)
    primary = {"sdpa-cudnn", "fla-nsa", "sdpa-cpu"}
    headline = [("nsa", "nsa_attention", _cases.build_nsa, True)]
    headline += [("baseline", name, _cases.BASELINES[name], False) for name in names if name in primary]
    others = [("baseline", name, _cases.BASELINES[name], False) for name in names if name not in primary]
    detail = [] if args.no_stages else [("stage", n, b, True) for n, b in _cases.STAGES.items()]
    if not args.no_module:
        detail.append(("module", "NativeSparseAttention", _cases.build_module, True))
    return [p for p in (headline, others, detail) if p]


def notes(config, shapes, device) -> list[str]:
    c = config
    out = [
        f"NSA config (paper defaults): l={c.cmp_block}, d={c.cmp_stride}, l'={c.slc_block}, "
        f"n={c.num_selected}, {c.num_init_blocks} init + {c.num_local_blocks} local blocks, w={c.window}; "
        "causal; k_cmp/v_cmp and gates are given inputs (the module row includes their computation).",
        ("Times: median of `triton.testing.do_bench(..., return_mode=\"median\")` (warm-up 25 ms, "
         "rep 100 ms, L2 flushed between runs)" if device.type == "cuda" else
         "Times: median of 5 wall-clock runs after one warm-up (CPU dry run: not a performance figure)")
        + "; inputs random normal (gates uniform), fixed random upstream gradient, gradients set to "
        "None between runs; forwards run with autograd recording (training forward).",
        "fwd+bwd = forward + backward to every input (q, k, v, k_cmp, v_cmp, gates for NSA; "
        "q, k, v for the baselines; x and the parameters for the module).",
        "Stage `selected+combine` times `flexnsa.custom_ops.selected_attention_gated` (the selected "
        "branch; its kernels also write the gated sum of the three branches, as in `nsa_attention`), "
        "on the fast top-n's indices (synthetic ones, marked, when it is missing); stage "
        "`scores+top-n` has no backward (discrete) and counts with its forward in the fwd+bwd sum.",
        "Baselines: SDPA full causal attention with GQA (`enable_gqa=True`, else K/V expanded, "
        "marked); FlexAttention compiled (`torch.compile(flex_attention, dynamic=False)`) with a "
        f"causal BlockMask (with `--flex-window` also a causal {c.window}-token window: the floor "
        "of NSA's window branch).",
        _cases.FLA_NOTE,
    ]
    for shape in shapes:
        for T in shape.seq_lens:
            pairs = c.attended_pairs(T)
            attended = pairs["cmp"] + pairs["slc"] + pairs["win"]
            out.append(f"Sparsity {shape.name} T={_shapes.format_seq_len(T)}: NSA scores "
                       f"{attended / pairs['full']:.1%} of the query-key pairs of full causal attention "
                       f"(cmp {pairs['cmp'] / pairs['full']:.1%}, slc {pairs['slc'] / pairs['full']:.1%}, "
                       f"win {pairs['win'] / pairs['full']:.1%}).")
    return out


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.render is not None:
        return render(args.render)
    start = time.monotonic()
    if args.cpu_smoke:
        device = torch.device("cpu")
        table = _shapes.CPU_SHAPES
    elif torch.cuda.is_available():
        device = torch.device("cuda")
        table = _shapes.GPU_SHAPES
    else:
        print("report.py: no CUDA device; use --cpu-smoke for a dry run on the CPU", file=sys.stderr)
        return 2
    shapes = _shapes.select_shapes(table, args.shapes, args.seq_lens, args.quick)
    if args.cpu_smoke:
        default_out = pathlib.Path(tempfile.gettempdir()) / "flexnsa-perf-smoke"
    else:
        default_out = REPO_ROOT / "perf" / "results"
    out_dir = args.out or pathlib.Path(os.environ.get("OUT") or default_out)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = flexnsa.NSAConfig()
    meta = environment(device, argv)
    meta["shapes"] = [dict(dataclasses.asdict(s), dtype=str(s.dtype), describe=s.describe()) for s in shapes]
    meta["config"] = dataclasses.asdict(config)
    print(f"flexnsa report on {meta['device_name']}: " + "; ".join(s.describe() for s in shapes), flush=True)

    checks = []
    if not args.no_check:
        for shape in shapes:
            result = _sanity.check_nsa(shape, CHECK_SEQ_LEN[device.type], config, device)
            checks.append(result)
            print(f"  check {shape.name} T={result.seq_len}: {'ok' if result.ok else 'FAILED ' + result.message}",
                  flush=True)
            free_memory_safe()

    runner = Runner(device, deadline=start + args.budget_s)
    slug = meta["slug"]

    def build_run(lost: str | None, done: bool) -> dict:
        meta["header"]["wall time"] = (f"{time.monotonic() - start:.0f} s (budget {args.budget_s:.0f} s)"
                                       + ("" if done else ", run still going: partial report"))
        return {
            "meta": meta,
            "checks": [dataclasses.asdict(c) for c in checks],
            "records": runner.records,
            "notes": notes(config, shapes, device) + ([f"**{lost}**"] if lost else []),
        }

    def write_partial() -> None:
        """Markdown and JSON after every point: a run killed from outside still leaves its numbers."""
        run = build_run(None, done=False)
        _writers.write_json(run, out_dir / f"{slug}.json")
        _writers.write_markdown(run, out_dir / f"{slug}.md", None)

    lost = None
    try:
        for pieces in passes(device, args):
            for shape in shapes:
                for seq_len in shape.seq_lens:
                    run_point(runner, shape, seq_len, config, pieces)
                    write_partial()
    except ContextLost as error:
        lost = f"CUDA context lost ({error}); the remaining pieces did not run"
        print("ERROR: " + lost, file=sys.stderr, flush=True)

    run = build_run(lost, done=True)
    plot_name = None
    if not args.no_plot:
        problem = _writers.write_plot(run, out_dir / f"{slug}.png")
        if problem:
            print(f"plot: {problem}", flush=True)
        else:
            plot_name = f"{slug}.png"
    _writers.write_json(run, out_dir / f"{slug}.json")
    _writers.write_markdown(run, out_dir / f"{slug}.md", plot_name)
    print(f"wrote {out_dir / (slug + '.md')}, .json" + (", .png" if plot_name else ""), flush=True)

    failures = [f"correctness gate {c.shape} T={c.seq_len}: {c.message}" for c in checks if not c.ok]
    failures += [f"non-finite result: {w}" for w in runner.wrong]
    failures += [lost] if lost else []
    print()
    print(_writers.summary_text(run))
    if failures:
        print("\nFAILED:\n  " + "\n  ".join(failures), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
