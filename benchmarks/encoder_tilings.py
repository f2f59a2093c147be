"""Stage 1 of the `tiles` encoder under several launch tilings: registers, spills, shared memory, CTAs per SM, time.

Stage 1 runs a max-reduction epilogue after each tile's MMA; with one CTA per SM nothing overlaps the two, so the
tilings that fit two CTAs per SM are the ones to watch.

    python benchmarks/encoder_tilings.py     # d_in 768, d_sae 32,768, k 32, batch 16,384, bf16
"""
from __future__ import annotations

import torch
import triton
from triton.testing import do_bench

from sae_widgets.kernels.topk_encoder import _tile_top_kernel, keys_per_tile

B, D, N, K = 16384, 768, 32768, 32


def main():
    x = torch.randn(B, D, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(D, N, device="cuda") / D ** 0.5).bfloat16()
    b = torch.zeros(N, device="cuda")
    props = torch.cuda.get_device_properties(0)
    print(f"device: {props.name}; B {B}, d_in {D}, d_sae {N}, k {K}, bf16; bare matmul "
          f"{do_bench(lambda: x @ w, warmup=10, rep=50, return_mode='median'):.3f} ms\n")
    print("| BM | BN | BK | R | warps | stages | regs | spills | smem KiB | CTAs/SM | stage 1 ms |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    configs = [(128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 256, 128, 8, 2), (256, 128, 64, 8, 3),
               (128, 128, 64, 4, 3), (128, 128, 128, 4, 2), (64, 256, 64, 4, 3)]
    for bm, bn, bk, warps, stages in configs:
        r = keys_per_tile(B, N, K, bn)
        keys = torch.empty(B, triton.cdiv(N, bn) * r, dtype=torch.int64, device="cuda")
        grid = (triton.cdiv(B, bm) * triton.cdiv(N, bn),)

        def launch():
            return _tile_top_kernel[grid](x, w, b, keys, B, D, N, x.stride(0), x.stride(1), w.stride(0), w.stride(1),
                                          keys.stride(0), ABS=False, R=r, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                                          num_warps=warps, num_stages=stages)
        try:
            h = launch()
            regs, spills, smem = h.n_regs, h.n_spills, h.metadata.shared
            ctas = min(props.regs_per_multiprocessor // max(1, regs * 32 * warps),
                       props.shared_memory_per_multiprocessor // max(1, smem))
            s1 = do_bench(launch, warmup=10, rep=50, return_mode="median")
            print(f"| {bm} | {bn} | {bk} | {r} | {warps} | {stages} | {regs} | {spills} | {smem // 1024} | "
                  f"{ctas} | {s1:.3f} |", flush=True)
        except Exception as e:  # a tiling that does not compile or fit on this GPU
            print(f"| {bm} | {bn} | {bk} | {r} | {warps} | {stages} | failed: {type(e).__name__}: {str(e)[:80]} |")


if __name__ == "__main__":
    main()
