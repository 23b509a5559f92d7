"""pytest-benchmark suite of flexnsa: ``pytest perf --benchmark-only``.

Collects ``perf/bench_*.py`` (the default test run, ``testpaths = ["tests"]``, never sees them).
Shapes: PERF.md's when CUDA is present, tiny ones on the CPU (see ``_shapes.py``). Each benchmark
runs one ``Case`` of ``_cases.py`` (the same code as ``report.py``); a piece that is not built yet
or does not fit the device is skipped with the reason. For the figures that count (do_bench
medians, ratios to the baselines) use ``python perf/report.py``.
"""

from __future__ import annotations

import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import pytest  # noqa: E402
import torch  # noqa: E402

from _shapes import default_shapes, format_seq_len  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
POINTS = [(shape, seq_len) for shape in default_shapes() for seq_len in shape.seq_lens]
POINT_IDS = [f"{shape.name}-{format_seq_len(seq_len)}" for shape, seq_len in POINTS]
DIRECTIONS = ["fwd", "fwd+bwd"]
# pedantic rounds: few on the CPU (the reference is slow and the suite must stay short)
ROUNDS, WARMUP_ROUNDS = (10, 2) if DEVICE.type == "cuda" else (3, 1)


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


@pytest.fixture(params=POINTS, ids=POINT_IDS)
def inputs(request):
    """Random inputs of one (shape, T) point; freed after the test."""
    import _cases
    import flexnsa
    from _timing import free_memory

    shape, seq_len = request.param
    inp = _cases.make_inputs(shape, seq_len, flexnsa.NSAConfig(), DEVICE)
    yield inp
    del inp
    free_memory()


@pytest.fixture
def run_case(benchmark):
    """``run_case(build, inputs, direction)``: builds the case (skip if unavailable) and
    benchmarks its forward or forward+backward, gradients reset before every round."""
    import _cases

    def run(build, inp, direction: str, group: str):
        try:
            case = build(inp)
        except _cases.Unavailable as error:
            pytest.skip(str(error))
        fn = case.fwd if direction == "fwd" else case.fwd_bwd
        if fn is None:
            pytest.skip(case.no_bwd or "no backward")

        def target():
            for x in case.leaves:
                x.grad = None
            fn()
            if DEVICE.type == "cuda":
                torch.cuda.synchronize()

        benchmark.group = f"{inp.shape.name} T={format_seq_len(inp.seq_len)} {direction}"
        benchmark.extra_info["piece"] = group
        benchmark.extra_info.update(shape=inp.shape.describe(), seq_len=inp.seq_len, note=case.note)
        benchmark.pedantic(target, rounds=ROUNDS, warmup_rounds=WARMUP_ROUNDS, iterations=1)

    return run
