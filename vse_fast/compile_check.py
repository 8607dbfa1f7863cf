"""Build every Triton kernel specialization for real GPUs, without a GPU.

    python -m vse_fast.compile_check [--arch 90 --arch 80] [--filter NAME] [--json PATH] [--markdown]

The kernel modules in `KERNEL_MODULES` (gpo_pool, which also lists the gpo_pool_net builds, gpo_table
and contrastive) export `compile_specializations()`: one dict per
specialization its launchers can choose (dtype, block-size bucket, mode flag, forward/backward):
{"name", "fn" (the @triton.jit function), "signature" {arg: "*bf16"|"i32"|...|"constexpr"},
"constexprs" {arg: value}, "num_warps", "num_stages", optional "tensor_cores": True when its tl.dot
must compile to tensor-core instructions (HGMMA on sm_90, HMMA on sm_80), optional "arches": the
only compute capabilities it is built for (a launcher picks it by capability), optional "maxnreg" (the
launch's register cap).
Each spec is built twice: "plain" (no alignment known: what an odd D or an offset view compiles to)
and "aligned" (name + "+aligned": every pointer and every specialized integer argument divisible by 16,
what a contiguous launch with D, B multiples of 16 compiles to: vectorized accesses, other registers).
This compiles each for CUDA targets with `triton.compile(ASTSource(...), target=GPUTarget(...))`
and reads the cubin with the `cuobjdump` shipped in the Triton wheel: registers, shared memory,
spills, and the count of tensor-core instructions (HGMMA on sm_90, HMMA) in the SASS. Spills show up as
the per-thread stack frame (cuobjdump's STACK: ptxas puts spilled registers there; a Triton kernel makes
no calls, so any frame is spill space) or as LOCAL memory; both count.
It also reads the PTX of the inline-asm blocks (the sorting networks of `gpo_pool_net`, which the
interpreter never runs): a block copies its inputs into its outputs first, so an output that shares a
register with a later input would clobber it (`inline_asm_aliases`).
The interpreter tests prove the arithmetic; this proves the kernels build and do not spill.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

KERNEL_MODULES = ("vse_fast.kernels.gpo_pool", "vse_fast.kernels.gpo_table", "vse_fast.kernels.contrastive")
DEFAULT_ARCHES = (90, 80)


@dataclass
class CompileResult:
    name: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int
    shared_bytes: int
    local_bytes: int  # per-thread local memory outside the stack frame
    stack_bytes: int  # per-thread stack frame: spilled registers (Triton kernels make no calls)
    hgmma: int  # warpgroup tensor-core instructions (sm_90)
    hmma: int  # warp-level tensor-core instructions
    needs_tensor_cores: bool = False  # the spec says its tl.dot must run on tensor cores
    only_arches: tuple = ()  # the spec's "arches": built for these only (empty: every arch asked for)
    asm_blocks: int = 0  # inline-asm blocks in the PTX
    asm_aliased: int = 0  # of those, blocks whose input was overwritten before it was read
    error: str = ""

    @property
    def tensor_core_ok(self) -> bool:
        # sm_90 should use warpgroup MMA (HGMMA); HMMA alone means a slower path there.
        return not self.needs_tensor_cores or (self.hgmma > 0 if self.arch >= 90 else self.hmma > 0)

    @property
    def spill_bytes(self) -> int:
        return self.local_bytes + self.stack_bytes

    @property
    def ok(self) -> bool:
        return not self.error and self.spill_bytes == 0 and self.tensor_core_ok and not self.asm_aliased


def cuobjdump_path() -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(path):
        raise FileNotFoundError(f"cuobjdump not found in the Triton wheel at {path}")
    return path


def collect_specializations(modules=KERNEL_MODULES):
    """All specs of all kernel modules, as dicts (see the kernel modules' compile_specializations)."""
    import importlib

    specs = []
    for name in modules:
        specs.extend(importlib.import_module(name).compile_specializations())
    return specs


def _resource_usage(cubin_path: str) -> dict:
    out = subprocess.run(
        [cuobjdump_path(), "--dump-resource-usage", cubin_path], capture_output=True, text=True, check=True
    ).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", out))
    return {k: int(v) for k, v in fields.items()}


def _sass(cubin_path: str) -> str:
    return subprocess.run(
        [cuobjdump_path(), "--dump-sass", cubin_path], capture_output=True, text=True, check=True
    ).stdout


def inline_asm_aliases(ptx: str) -> tuple:
    """(blocks, aliased) over the inline-asm blocks of `ptx` that open a register scope (`{ .reg ...`):
    aliased counts the blocks whose leading movs (each output $i = input $n+i) read a register that an
    earlier mov of the same block wrote, i.e. an output placed in the register of a later input."""
    blocks = aliased = 0
    for body in re.findall(r"// begin inline asm\n(.*?)// end inline asm", ptx, re.S):
        if "{ .reg" not in body:
            continue
        blocks += 1
        written = set()
        statements = [st.strip() for st in body.split("{", 1)[1].split(";")]
        for st in [st for st in statements if st and not st.startswith(".reg")]:
            m = re.fullmatch(r"mov\.\w+\s+(\S+),\s*(\S+)", st)
            if not m:
                break
            dst, src = m.groups()
            if src in written:
                aliased += 1
                break
            written.add(dst)
    return blocks, aliased


ALIGNED_SUFFIX = "+aligned"


def aligned_attrs(spec: dict) -> dict:
    """ASTSource attrs of the aligned build: tt.divisibility 16 on every pointer argument and on every
    integer argument the kernel lets Triton specialize (not in its do_not_specialize), as Triton's
    launcher sets them when those values are multiples of 16."""
    fn = spec["fn"]
    skip = set(getattr(fn, "do_not_specialize", ()) or ())
    attrs = {}
    for index, (arg, kind) in enumerate(spec["signature"].items()):
        if kind.startswith("*") or (kind in ("i32", "i64") and arg not in skip and index not in skip):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return attrs


def compile_spec(spec: dict, arch: int, aligned: bool = False) -> CompileResult:
    """Compile one specialization for sm_<arch> (aligned: with `aligned_attrs`) and read its resource
    usage and SASS."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    name = spec["name"] + (ALIGNED_SUFFIX if aligned else "")
    base = dict(name=name, arch=arch, num_warps=spec["num_warps"], num_stages=spec["num_stages"],
                needs_tensor_cores=bool(spec.get("tensor_cores", False)), only_arches=tuple(spec.get("arches", ())))
    try:
        src = ASTSource(fn=spec["fn"], signature=spec["signature"], constexprs=spec["constexprs"],
                        attrs=aligned_attrs(spec) if aligned else None)
        kernel = triton.compile(
            src,
            target=GPUTarget("cuda", arch, 32),
            options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"],
                     **({"maxnreg": spec["maxnreg"]} if spec.get("maxnreg") else {})},
        )
    except Exception as exc:  # reported per specialization, so one failure shows all the others too
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines()
        return CompileResult(**base, registers=0, shared_bytes=0, local_bytes=0, stack_bytes=0,
                             hgmma=0, hmma=0, error=" ".join(msg)[:500])
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = _resource_usage(f.name)
        sass = _sass(f.name)
    asm_blocks, asm_aliased = inline_asm_aliases(kernel.asm["ptx"])
    return CompileResult(
        **base,
        asm_blocks=asm_blocks,
        asm_aliased=asm_aliased,
        registers=usage.get("REG", 0),
        shared_bytes=int(getattr(kernel.metadata, "shared", 0) or usage.get("SHARED", 0)),
        local_bytes=usage.get("LOCAL", 0),
        stack_bytes=usage.get("STACK", 0),
        hgmma=len(re.findall(r"\bHGMMA\b", sass)),
        hmma=len(re.findall(r"\bHMMA\b", sass)),
    )


_FORKED_SPECS = []  # set before forking workers: jit functions are not picklable, indices are


def _compile_forked(job):
    index, arch, aligned = job
    return compile_spec(_FORKED_SPECS[index], arch, aligned)


def compile_all(arches=DEFAULT_ARCHES, specs=None, jobs=None, variants=(False, True)):
    """Compile every spec for every arch and variant (False: plain, True: aligned), in `jobs` forked
    worker processes (default: all cores)."""
    specs = collect_specializations() if specs is None else specs
    work = [(i, arch, aligned) for i in range(len(specs)) for arch in arches
            if arch in specs[i].get("arches", arches) for aligned in variants]
    jobs = jobs or os.cpu_count() or 1
    if jobs == 1:
        return [compile_spec(specs[i], arch, aligned) for i, arch, aligned in work]
    import multiprocessing

    _FORKED_SPECS[:] = specs
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_forked, work, chunksize=1)


def format_table(results) -> str:
    head = f"{'specialization':<52} {'sm':>3} {'warps':>5} {'regs':>5} {'smem KB':>8} {'spill B':>7} {'HGMMA':>6} {'HMMA':>5}"
    lines = [head, "-" * len(head)]
    for r in results:
        if r.error:
            lines.append(f"{r.name:<52} {r.arch:>3}  ERROR {r.error[:80]}")
            continue
        flag = ("" if r.tensor_core_ok else "  NO TENSOR CORES") + ("  ASM OPERANDS ALIASED" if r.asm_aliased else "")
        lines.append(
            f"{r.name:<52} {r.arch:>3} {r.num_warps:>5} {r.registers:>5} {r.shared_bytes / 1024:>8.1f} "
            f"{r.spill_bytes:>7} {r.hgmma:>6} {r.hmma:>5}{flag}"
        )
    return "\n".join(lines)


def format_summary(results) -> str:
    """Markdown table, one row per kernel (the name before the first "-") and arch: specializations,
    register range, largest shared memory, largest spill, and tensor cores as "present / required":
    builds whose tl.dot must use them (16-bit, HGMMA on sm_90 / HMMA on sm_80) and do, of those required."""
    groups = {}
    for r in results:
        groups.setdefault((r.name.split("-")[0], r.arch), []).append(r)
    lines = ["| kernel | sm | builds (plain + aligned) | registers | max shared KB | max spill bytes | tensor cores "
             "(16-bit builds required to use them: with HGMMA on sm_90 / HMMA on sm_80, of required) |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for (kernel, arch), rs in groups.items():
        built = [r for r in rs if not r.error]
        regs = f"{min(r.registers for r in built)}-{max(r.registers for r in built)}" if built else "error"
        needed = [r for r in rs if r.needs_tensor_cores]
        tc = f"{sum(r.tensor_core_ok for r in needed)}/{len(needed)}" if needed else "-"
        shared_kb = max((r.shared_bytes for r in built), default=0) / 1024
        spill = max((r.spill_bytes for r in built), default=0)
        lines.append(f"| `{kernel}` | {arch} | {len(rs)} | {regs} | {shared_kb:.1f} | {spill} | {tc} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="CUDA compute capability, e.g. 90 (repeatable)")
    parser.add_argument("--filter", default="", help="only specializations whose name contains this")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--jobs", type=int, default=None, help="worker processes (default: all cores)")
    parser.add_argument("--markdown", action="store_true", help="also print a per-kernel summary table (README)")
    parser.add_argument("--variants", default="plain,aligned", help="builds per spec: plain, aligned or both")
    args = parser.parse_args(argv)
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    if args.json and not os.path.isdir(os.path.dirname(os.path.abspath(args.json))):
        parser.error(f"--json {args.json!r}: its directory does not exist")
    names = [v for v in args.variants.split(",") if v]
    if not names or set(names) - {"plain", "aligned"}:
        parser.error(f"--variants takes plain and/or aligned, got {args.variants!r}")
    specs = [s for s in collect_specializations() if args.filter in s["name"]]
    if not specs:
        parser.error(f"--filter {args.filter!r} matches no specialization")
    variants = tuple(v == "aligned" for v in ("plain", "aligned") if v in names)
    results = compile_all(tuple(args.arch or DEFAULT_ARCHES), specs, jobs=args.jobs, variants=variants)
    print(format_table(results))
    if args.markdown:
        print("\n" + format_summary(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in results], f, indent=2)
    bad = [r for r in results if not r.ok]
    print(f"\n{len(results)} builds, {len(bad)} failed, spilled, missed tensor cores or aliased asm operands")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
