"""Compile every Triton kernel of mmtrain.kernels, in every autotune config, for Hopper (sm_90a)
without a GPU, and report shared memory, registers and spills.

    python benchmarks/gpu_compile_check.py [--jobs 2] [--head-dims 64,128]

Catches what the interpreter cannot: constructs the compiler rejects, configs that need more shared
memory than an H100/H200 SM has (227 KiB), and register spills. Uses the ptxas Triton itself uses.
Must run without TRITON_INTERPRET (kernels defined under the interpreter cannot be compiled).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

SHARED_LIMIT = 227 * 1024  # bytes per thread block on sm_90


def _signature(jit_fn, pointer_types: dict[str, str], float_args: set[str]) -> dict[str, str]:
    sig = {}
    for param in jit_fn.params:
        name = param.name
        if param.is_constexpr:
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = pointer_types[name]
        elif name in float_args:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _jobs(head_dims: list[int], dtype: str, quick: bool = False) -> list[tuple]:
    """(label, module, kernel name, signature spec, constexprs, num_warps, num_stages)."""
    from mmtrain.kernels import cross_entropy, flash_attention as fa, rmsnorm

    t = dtype
    attn_ptrs = {
        "_fwd_kernel": dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", o_ptr=f"*{t}", lse_ptr="*fp32",
                            cu_seqlens_ptr="*i32"),
        "_bwd_dq_kernel": dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dq_ptr=f"*{t}",
                               lse_ptr="*fp32", delta_ptr="*fp32", cu_seqlens_ptr="*i32"),
        "_bwd_dkv_kernel": dict(q_ptr=f"*{t}", k_ptr=f"*{t}", v_ptr=f"*{t}", do_ptr=f"*{t}", dk_ptr=f"*{t}",
                                dv_ptr=f"*{t}", lse_ptr="*fp32", delta_ptr="*fp32", cu_seqlens_ptr="*i32"),
    }  # fmt: skip
    jobs = []
    for kernel_name, ptrs in attn_ptrs.items():
        autotuner = getattr(fa, kernel_name)
        for head_dim in head_dims:
            for causal in (True,) if quick else (True, False):
                configs = autotuner.configs
                if autotuner.early_config_prune:  # the candidates for this head dim
                    configs = autotuner.early_config_prune(configs, {}, HEAD_DIM=head_dim)
                if quick:
                    configs = configs[:1]
                for cfg in configs:
                    const = dict(GROUP=4, CAUSAL=causal, HEAD_DIM=head_dim, **cfg.kwargs)
                    label = f"{kernel_name} D={head_dim} causal={causal} {cfg.kwargs} w{cfg.num_warps} s{cfg.num_stages}"
                    jobs.append((label, fa.__name__, kernel_name, ptrs, {"qk_scale", "sm_scale"}, const,
                                 cfg.num_warps, cfg.num_stages))  # fmt: skip
    for head_dim in head_dims:
        jobs.append((f"_bwd_delta_kernel D={head_dim}", fa.__name__, "_bwd_delta_kernel",
                     dict(o_ptr=f"*{t}", do_ptr=f"*{t}", delta_ptr="*fp32"), set(),
                     dict(HEAD_DIM=head_dim, BLOCK=64), 4, 3))  # fmt: skip
    for dim in (768, 2048, 4096):
        block = 1 << (dim - 1).bit_length()
        warps = rmsnorm._num_warps(block)
        jobs.append((f"_rms_norm_fwd_kernel D={dim}", rmsnorm.__name__, "_rms_norm_fwd_kernel",
                     dict(x_ptr=f"*{t}", w_ptr=f"*{t}", y_ptr=f"*{t}", rstd_ptr="*fp32"), {"eps"},
                     dict(BLOCK_D=block), warps, 3))  # fmt: skip
        jobs.append((f"_rms_norm_bwd_kernel D={dim}", rmsnorm.__name__, "_rms_norm_bwd_kernel",
                     dict(dy_ptr=f"*{t}", x_ptr=f"*{t}", w_ptr=f"*{t}", rstd_ptr="*fp32", dx_ptr=f"*{t}",
                          dw_partial_ptr="*fp32"), set(), dict(BLOCK_D=block), warps, 3))  # fmt: skip
    for has_grad in (True, False):
        jobs.append((f"_cross_entropy_kernel HAS_GRAD={has_grad}", cross_entropy.__name__, "_cross_entropy_kernel",
                     dict(logits_ptr=f"*{t}", targets_ptr="*i64", grad_scale_ptr="*fp32", loss_ptr="*fp32"), set(),
                     dict(HAS_GRAD=has_grad, BLOCK_V=8192), 16, 3))  # fmt: skip
    return jobs


def _compile(job) -> str:
    import importlib

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    label, module, kernel_name, ptrs, floats, const, num_warps, num_stages = job
    kernel = getattr(importlib.import_module(module), kernel_name)
    jit_fn = kernel.fn if hasattr(kernel, "configs") else kernel  # an Autotuner wraps the JITFunction
    sig = _signature(jit_fn, ptrs, floats)
    # As at run time: 16-byte aligned pointers and strides divisible by 16.
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, name in enumerate(jit_fn.arg_names)
        if name in ptrs or name.startswith("stride") or name == "seqlen_bucket"
    }
    try:
        compiled = triton.compile(
            ASTSource(jit_fn, sig, constexprs=const, attrs=attrs),
            target=GPUTarget("cuda", 90, 32),
            options=dict(num_warps=num_warps, num_stages=num_stages),
        )
    except Exception as e:  # report, keep checking the others
        return f"FAIL  {label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
    shared = compiled.metadata.shared
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(90).path  # the ptxas Triton itself uses for this architecture
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "k.ptx"
        ptx.write_text(compiled.asm["ptx"])
        res = subprocess.run([str(ptxas), "-arch=sm_90a", "-v", str(ptx), "-o", str(Path(tmp) / "k.cubin")],
                             capture_output=True, text=True)  # fmt: skip
    info = res.stderr
    regs = re.search(r"Used (\d+) registers", info)
    spill = re.search(r"(\d+) bytes spill stores", info)
    flags = []
    if shared > SHARED_LIMIT:
        flags.append("SHARED>227KiB")
    if spill and int(spill.group(1)) > 0:
        flags.append("SPILLS")
    status = "WARN " if flags else "ok   "
    return (
        f"{status} {label}: shared {shared / 1024:.0f} KiB, registers {regs.group(1) if regs else '?'}, "
        f"spill stores {spill.group(1) if spill else '?'} B {' '.join(flags)}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--head-dims", default="64,128")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    parser.add_argument("--only", default="", help="substring a kernel label must contain")
    parser.add_argument("--quick", action="store_true", help="one config per attention kernel and head dim (CI)")
    args = parser.parse_args()
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: interpreted kernels cannot be compiled")
    head_dims = [int(d) for d in args.head_dims.split(",")]
    jobs = [j for j in _jobs(head_dims, args.dtype, args.quick) if args.only in j[0]]
    failed = 0
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for line in pool.map(_compile, jobs):
            print(line, flush=True)
            failed += line.startswith("FAIL")
    print(f"{len(jobs)} kernels compiled for sm_90a, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
