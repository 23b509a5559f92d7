"""One launch of each selection kernel at 64k (paper shape), for ``ncu`` (see perf/gpu_ncu.sh).

Every call runs once (compile included), so ``ncu --kernel-name regex:...`` profiles each of its
launches once: select_blocks (the split path: per query chunk, the scores kernel then the top-n
kernel), the same with the scores kernel's band sums off (``BANDED``: the float32 product whose
operands pass through shared memory; L1/shared traffic of both),
selected_attention forward (union and one-query kernels), its backward (dq, dK/dV), and one decode
step (batch 16, 64k context).
"""

import sys

import torch

import flexnsa
from flexnsa.custom_ops import api, kernel_utils

T = int(sys.argv[1]) if len(sys.argv) > 1 else 65536
cfg = flexnsa.NSAConfig()
B, HQ, HKV, D = 1, 64, 4, 128
g = torch.Generator(device="cuda").manual_seed(0)


def randn(*s):
    return torch.randn(*s, generator=g, device="cuda").bfloat16()


q, k, v = randn(B, HQ, T, D), randn(B, HKV, T, D), randn(B, HKV, T, D)
kc = randn(B, HKV, cfg.num_cmp_tokens(T), D)
lse = torch.randn(B, HQ, T, generator=g, device="cuda") + 6.0  # plausible log-sum-exp scale
idx = api.select_blocks(q, kc, lse, cfg)
kernel_utils.TUNING["select_v2"] = {"BANDED": False}
api.select_blocks(q, kc, lse, cfg)
kernel_utils.TUNING.clear()
q.requires_grad_(True), k.requires_grad_(True), v.requires_grad_(True)
o, _ = api.selected_attention(q, k, v, idx, cfg)
o.backward(randn(*o.shape))
torch.cuda.synchronize()
print("selection kernels done", flush=True)
