"""Compile every GPU specialisation of the MSA kernels for sm_90 (H100/H200) on a machine without a
GPU, and report each kernel's registers, spills, shared memory and whether its SASS uses the Hopper
tensor-core instructions (HGMMA, or QGMMA for FP8) or the older HMMA.

Run from the repo root: `python -m scripts.compile_check [--sweep] [--fp32-only]` (no TRITON_INTERPRET;
needs only triton's bundled ptxas). --sweep also compiles every launch variant of
`python -m benchmarks.msa_kernels --sweep` on the benchmark shape; --fp32-only compiles only the
fp32 cases. A specialisation that asks for more shared memory than a block has on sm_90 counts as
a failure (the card would refuse its launch).

It replaces Triton's driver with a stub that reports an sm_90 target and turns every launch into a
compile-only warm-up, then runs the public functions (forward and backward) on CPU tensors of the
benchmark shape (small T) and of the awkward shapes, so exactly the specialisations the ops use get
compiled. A front-end error (what the interpreter accepts but the compiler rejects) shows up here
without a GPU. The installed triton may differ from the one your GPU runs (the results in docs/perf/
were measured with triton 3.6, whose pipeliner decides what the card runs); to compile with another
version, install it into a folder of its own and put that first on the path:
`pip install --target DIR --no-deps triton==3.6.0`, then `PYTHONPATH=DIR python -m scripts.compile_check`.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("scripts.compile_check needs TRITON_INTERPRET unset (it compiles, it does not interpret)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class _StubDriver:
    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


COMPILED = []
_run = JITFunction.run


def _compile_only(self, *args, grid, warmup, **kwargs):
    kernel = _run(self, *args, grid=grid, warmup=True, **kwargs)
    COMPILED.append((self.__name__, {k: v for k, v in kwargs.items() if k.isupper() or k.startswith("num_")}, kernel))
    return kernel


def _report(name, params, kernel, bindir):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        open(path, "wb").write(kernel.asm["cubin"])
        res = subprocess.run([os.path.join(bindir, "cuobjdump"), "-res-usage", path], capture_output=True, text=True).stdout
        sass = subprocess.run([os.path.join(bindir, "nvdisasm"), path], capture_output=True, text=True).stdout
    usage = next((ln.strip() for ln in res.splitlines() if "REG:" in ln), "?")
    usage = usage.replace("SHARED:", "STATIC_SHARED:") + f" DYN_SHARED:{kernel.metadata.shared}"
    # HGMMA: Hopper's 16-bit (and tf32) tensor-core instruction, QGMMA its FP8 one, HMMA the older one
    mma = next((m for m in ("HGMMA", "QGMMA", "HMMA") if m in sass), "no MMA")
    local = "LDL/STL" if ("LDL" in sass or "STL" in sass) else ""
    shown = {k: v for k, v in params.items() if k in ("G", "TM", "TQ", "R", "BN", "BS", "D", "DI", "HB", "BM", "DENSE",
                                                      "HAS_LSE", "HAS_ILSE", "TN", "SOFTMAX", "HAS_DLSE", "W",
                                                      "HAS_GRAD", "PREFETCH", "Q_EVICT", "PART_CACHE", "PART_EVICT",
                                                      "PIPE", "SCORES", "FP8", "num_warps", "num_stages")}
    over = "OVER-SMEM" if kernel.metadata.shared > SMEM_LIMIT else ""
    return f"{name:22s} {mma:6s} {local:7s} {over:9s} {usage}  {shown}"


# shared memory one block may use on sm_90 (H100 and H200): a launch asking for more fails with
# OutOfResources on the card, so a specialisation over it counts as a failure here
SMEM_LIMIT = 232448


def _run_case(kernels, case) -> int:
    """Compile every kernel the ops launch on one shape (forward and backward); 1 if it failed."""
    T, Hq, Hkv, D, I, BS, K, cu, dt = case
    try:
        cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int32)
        q = torch.randn(1, T, Hq, D).to(dt).requires_grad_(True)
        k = torch.randn(1, T, Hkv, D).to(dt).requires_grad_(True)
        v = torch.randn(1, T, Hkv, D).to(dt).requires_grad_(True)
        qi = torch.randn(1, T, Hkv, I).to(dt).requires_grad_(True)
        ki = torch.randn(1, T, I).to(dt).requires_grad_(True)
        # Outputs are never written (nothing runs), so feed a valid selection by hand.
        bidx, ilse = kernels.msa_select(qi.detach(), ki.detach(), BS, K, cu_seqlens=cu_t)
        # without the log-sum-exps (the model's default), and the variant that also writes each
        # slot's scores, for the adaptive budgets
        kernels.msa_select(qi.detach(), ki.detach(), BS, K, cu_seqlens=cu_t, with_lse=False)
        kernels.msa_select(qi.detach(), ki.detach(), BS, K, cu_seqlens=cu_t, budget=kernels.Budget("top_p"))
        # ranked on FP8 scores (model.msa.select_fp8): e4m3 products on the tensor cores
        kernels.msa_select(qi.detach(), ki.detach(), BS, K, cu_seqlens=cu_t, with_lse=False, fp8=True)
        nb = -(-T // BS)
        sel = torch.arange(min(K, nb), dtype=torch.int32).expand(1, T, Hkv, min(K, nb))
        bidx = torch.nn.functional.pad(sel, (0, K - sel.shape[-1]), value=-1).contiguous()
        for schedule in ("split", "query"):
            o, lse = kernels.msa_attention(q, k, v, bidx, BS, cu_seqlens=cu_t, schedule=schedule)
            torch.autograd.grad((o.float().sum(), lse.sum()), (q, k, v), allow_unused=True)
        if Hq // Hkv >= 8:
            kernels.msa_attention(q, k, v, bidx, BS, cu_seqlens=cu_t, tokens_per_tile=8)
        lse0 = torch.zeros(1, T, Hq)
        ilse0 = torch.zeros(1, T, Hkv)
        for b_, l_, il_ in ((bidx, lse0, ilse0), (bidx, None, None), (bidx, lse0, None), (None, None, None)):
            for schedule in ("split", "query") if b_ is not None else ("query",):
                kl = kernels.msa_kl_loss(q, k, qi, ki, b_, BS, cu_seqlens=cu_t, lse=l_, index_lse=il_,
                                         schedule=schedule)
                torch.autograd.grad(kl, (qi, ki))
    except Exception as e:  # report every failing case, not just the first
        print(f"FAILED case T={T} Hq={Hq} Hkv={Hkv} dh={D} dI={I} block={BS} {dt}: {type(e).__name__}: {e}")
        return 1
    return 0


def main(argv=None):
    driver.set_active(_StubDriver())
    JITFunction.run = _compile_only
    import kernels
    from kernels import _common

    _common.INTERPRETED = True  # CPU tensors are allowed through the backend check ...
    _common.COMPILE_ONLY = True
    _check_backend = _common.check_backend
    # ... and so is bf16 (nothing is interpreted here, only compiled).
    _common.check_backend = lambda backend, device, *dtypes: _check_backend(backend, device)
    fails = 0
    cases = [  # (T, Hq, Hkv, dh, dI, block, topk, cu, dtype)
        (512, 32, 2, 128, 128, 128, 4, None, torch.bfloat16),   # benchmark shape (short T)
        (512, 32, 2, 128, 128, 128, 4, None, torch.float16),
        (300, 16, 4, 64, 64, 64, 3, [0, 5, 200, 300], torch.bfloat16),
        (256, 8, 8, 64, 128, 64, 2, None, torch.bfloat16),
        (256, 2, 2, 128, 64, 128, 2, None, torch.bfloat16),
        (512, 32, 2, 128, 128, 128, 4, None, torch.float32),    # fp32 (IEEE products) at the `small` shape
        (300, 16, 4, 64, 64, 64, 3, [0, 5, 200, 300], torch.float32),
    ]
    argv = argv if argv is not None else sys.argv[1:]
    if "--fp32-only" in argv:  # the fp32 cases alone (a quicker check of the fp32 launch settings)
        cases = [c for c in cases if c[-1] == torch.float32]
    for case in cases:
        fails += _run_case(kernels, case)
    if "--sweep" in argv:
        # Every launch variant `benchmarks.msa_kernels --sweep` may pick, on the benchmark shape.
        from benchmarks.msa_kernels import SWEEP
        from kernels.attention import op as attn_op
        from kernels.kl import op as kl_op
        from kernels.select import op as sel_op

        configs = {"attention": attn_op.GPU_CONFIG, "kl": kl_op.GPU_CONFIG, "select": sel_op.GPU_CONFIG}
        for op, key, variants, _ in SWEEP:
            saved = copy.deepcopy(configs[op])
            for cfg in variants:
                if key is None:
                    configs[op].update(cfg)
                else:
                    configs[op][key] = cfg
                fails += _run_case(kernels, cases[0])
            configs[op].clear()
            configs[op].update(saved)
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    seen = set()
    over = 0
    for name, params, kernel in COMPILED:
        key = (name, tuple(sorted(params.items())))
        if kernel is None or key in seen:
            continue
        seen.add(key)
        print(_report(name, params, kernel, bindir))
        over += kernel.metadata.shared > SMEM_LIMIT
    print(f"{len(seen)} specialisations compiled for sm_90 with triton {triton.__version__}; {fails} failing cases; "
          f"{over} over the {SMEM_LIMIT}-byte shared memory of a block")
    return 1 if fails or over else 0


if __name__ == "__main__":
    sys.exit(main())
