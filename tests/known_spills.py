"""Register spills recorded for the kernel builds under older Triton releases (test_compile.py).

Each Triton wheel carries its own ptxas, so which builds spill depends on the Triton release alone.
torch's CUDA wheels pin these releases (torch 2.8: 3.4.0; 2.9.0: 3.5.0; 2.9.1: 3.5.1; 2.10 and 2.11:
3.6.0; 2.12: 3.7.0; 2.13: 3.7.1; 2.14: 3.8.0), so a user who keeps the torch they have runs one of
them. Triton 3.9 spills in no build and has no entry: under it, and under any release not listed,
every spill fails `test_no_register_spills`. Under a listed release the test fails on a spill that is
not recorded or is larger than recorded, and is an expected failure (xfail) otherwise.

Recorded on 2026-11-30 at commit 94cec69 with `python -m vse_fast.compile_check --arch 90 --arch 80
--json FILE`, one run per release (784 builds each), in a venv with torch 2.13 (CPU). Values are
stack + local bytes per thread. A kernel change that moves a spill needs a new record; the figures
are in docs/PERF_NOTES.md ("Spills under the Triton releases torch pins").
"""

KNOWN_SPILLS = {
    "3.4.0": {  # torch 2.8: 21 builds
        ("contrastive_small_fwd-fp32-vse0", 90): 192,
        ("contrastive_small_fwd-fp32-vsepp", 90): 56,
        ("contrastive_vse0_mask-bf16-L0-both", 80): 32,
        ("contrastive_vse0_mask-bf16-L1", 80): 16,
        ("contrastive_vse0_mask-bf16-L2", 80): 16,
        ("contrastive_vse0_mask-fp16-L0", 80): 48,
        ("contrastive_vse0_mask-fp16-L0-both", 80): 32,
        ("contrastive_vse0_mask-fp16-L1", 80): 8,
        ("contrastive_vse0_mask-fp16-L2", 80): 16,
        ("gpo_pool_bwd-fp32-K16-D256+aligned", 90): 8,
        ("gpo_pool_bwd-fp32-K256-D16", 80): 8,
        ("gpo_pool_fwd-bf16-K128-D32+aligned", 80): 8,
        ("gpo_pool_fwd-fp16-K128-D32+aligned", 80): 8,
        ("gpo_pool_net_bwd-bf16-K32-D256-s16x2", 90): 8,
        ("gpo_pool_net_bwd-bf16-K32-D256-s16x2+aligned", 90): 8,
        ("gpo_pool_net_bwd-bf16-K64-D256-s16x2", 90): 8,
        ("gpo_pool_net_bwd-bf16-K64-D256-s16x2+aligned", 90): 8,
        ("gpo_pool_net_bwd-fp16-K32-D256-s16x2", 90): 8,
        ("gpo_pool_net_bwd-fp16-K32-D256-s16x2+aligned", 90): 8,
        ("gpo_pool_net_bwd-fp16-K64-D256-s16x2", 90): 8,
        ("gpo_pool_net_bwd-fp16-K64-D256-s16x2+aligned", 90): 8,
    },
    "3.5.0": {  # torch 2.9.0: 7 builds
        ("contrastive_fwd-fp32-L1-vse0+aligned", 80): 8,
        ("contrastive_fwd-fp32-L2-vse0+aligned", 80): 8,
        ("contrastive_vse0_mask-bf16-L1", 80): 16,
        ("contrastive_vse0_mask-bf16-L2", 80): 8,
        ("contrastive_vse0_mask-fp16-L1", 80): 8,
        ("gpo_pool_bwd-fp32-K256-D16", 80): 8,
        ("gpo_pool_fwd-fp16-K128-D32+aligned", 80): 8,
    },
    "3.6.0": {  # torch 2.10 and 2.11: 7 builds
        ("contrastive_fwd-fp32-L1-vse0+aligned", 80): 8,
        ("contrastive_fwd-fp32-L2-vse0+aligned", 80): 8,
        ("contrastive_small_fwd-fp32-vsepp", 80): 32,
        ("contrastive_vse0_mask-bf16-L1", 80): 16,
        ("contrastive_vse0_mask-bf16-L2", 80): 8,
        ("contrastive_vse0_mask-fp16-L1", 80): 8,
        ("gpo_pool_bwd-fp32-K256-D16", 80): 8,
    },
    "3.7.0": {  # torch 2.12: 7 builds
        ("contrastive_fwd-fp32-L1-vse0+aligned", 80): 8,
        ("contrastive_fwd-fp32-L2-vse0+aligned", 80): 8,
        ("contrastive_vse0_mask-bf16-L1", 80): 16,
        ("contrastive_vse0_mask-bf16-L2", 80): 16,
        ("contrastive_vse0_mask-fp16-L1", 80): 16,
        ("contrastive_vse0_mask-fp16-L2", 80): 16,
        ("gpo_pool_bwd-fp32-K512-D8+aligned", 90): 8,
    },
    "3.8.0": {  # torch 2.14: 12 builds
        ("contrastive_fwd-fp32-L0-vse0+aligned", 80): 24,
        ("contrastive_fwd-fp32-L1-vse0", 80): 16,
        ("contrastive_fwd-fp32-L2-vse0", 80): 24,
        ("contrastive_small_fwd-fp32-vse0", 80): 40,
        ("contrastive_small_fwd-fp32-vsepp", 80): 40,
        ("contrastive_vsepp_bwd-bf16-diag-i2t", 90): 8,
        ("contrastive_vsepp_bwd-fp16-diag-i2t", 90): 16,
        ("gpo_pool_bwd-bf16-K128-D32", 80): 40,
        ("gpo_pool_bwd-fp16-K128-D32", 80): 40,
        ("gpo_pool_bwd-fp32-K512-D8+aligned", 90): 8,
        ("gpo_pool_fwd-fp32-K64-D64", 90): 8,
        ("gpo_pool_net_fwd-fp16-K32-D256+aligned", 90): 8,
    },
}
KNOWN_SPILLS["3.5.1"] = KNOWN_SPILLS["3.5.0"]  # torch 2.9.1: the same builds and bytes
KNOWN_SPILLS["3.7.1"] = KNOWN_SPILLS["3.7.0"]  # torch 2.13: the same builds and bytes
