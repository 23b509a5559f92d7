"""The top-n kernel at 64k (paper shape, random inputs, real log-sum-exp) with each ``TUNING["select_topn"]``
variant given on the command line (JSON), for ``ncu --kernel-name regex:_topn_kernel``:

    ncu --section SpeedOfLight --section InstructionStats python3 perf/gpu_ncu_topn.py '{}' '{"BRACKET": false}'
"""

import json
import sys

import torch

import flexnsa
from flexnsa.custom_ops import api, kernel_utils

T = 65536
cfg = flexnsa.NSAConfig()
B, HQ, HKV, D = 1, 64, 4, 128
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(B, HQ, T, D, generator=g, device="cuda").bfloat16()
kc = torch.randn(B, HKV, cfg.num_cmp_tokens(T), D, generator=g, device="cuda").bfloat16()
vc = torch.randn(B, HKV, cfg.num_cmp_tokens(T), D, generator=g, device="cuda").bfloat16()
_, lse = flexnsa.compressed_attention(q, kc, vc, cfg, return_lse=True)
lse = lse.float().contiguous()
ref = None
for variant in sys.argv[1:]:
    kernel_utils.TUNING["select_topn"] = json.loads(variant)
    idx = api.select_blocks(q, kc, lse, cfg)
    torch.cuda.synchronize()
    same = "reference" if ref is None else bool(torch.equal(idx.sort(-1).values, ref))
    ref = idx.sort(-1).values if ref is None else ref
    print(variant, "selection equal to the first variant's:", same, flush=True)
