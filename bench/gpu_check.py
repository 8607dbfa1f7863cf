"""One-shot GPU check: correctness, timings and memory of every Triton kernel, one command.

    python bench/gpu_check.py [--out bench/results] [--only gpo,loss,train,ddp,compile]

Runs on one CUDA GPU in about 6-7 minutes with every section (gpo ~2.5 min and loss ~1.5 min on the
H100 of 2026-11-27, then train, ddp and compile; bench/gpu_run.sh cuts it at 400 s, compile last, and a
cut section is recorded as such). Each section (bench/gpucheck_<name>.py, function
`run(ctx) -> dict`) checks its kernels against a float64 reference on fresh random inputs and times
them against the published re-implementation with CUDA events (triton.testing.do_bench, median).
The card's copy bandwidth is measured in the same run so memory-bound kernels can be reported as a
fraction of it. Prints a table and writes JSON to <out>/<date>-<gpu>.json, or to
<out>/<date>-<gpu>-<sections>.json when --only names a subset (so two partial runs do not overwrite
each other).
"""
import argparse
import datetime
import importlib
import json
import math
import os
import platform
import re
import sys
import time
import traceback

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

SECTIONS = ("gpo", "loss", "train", "ddp", "compile")


class Context:
    """What every section gets: the device, a timer, the copy-bandwidth ceiling, a memory probe."""

    def __init__(self, device):
        import triton.testing

        self.device = device
        self._do_bench = triton.testing.do_bench
        self.copy_gbs = self._measure_copy_bandwidth()

    def bench(self, fn, warmup=25, rep=100):
        """Median time of fn() in milliseconds, CUDA events (do_bench's warmup/rep are in ms)."""
        return float(self._do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))

    def peak_extra_memory(self, fn):
        """Bytes allocated by fn() beyond what was allocated before it (peak)."""
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return int(torch.cuda.max_memory_allocated() - base)

    def profile(self, fn, steps=5, top=12):
        """Where the time of fn() goes: the `top` ops/kernels by self device time over `steps` calls
        (torch.profiler), per call, with the host time per call. Never raises: errors are returned."""
        try:
            return profile_breakdown(fn, steps=steps, top=top, device=self.device)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"[:300]}

    def _measure_copy_bandwidth(self, nbytes=2 * 1024**3):
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=self.device).uniform_()
        dst = torch.empty_like(src)
        ms = self.bench(lambda: dst.copy_(src), warmup=50, rep=200)
        del src, dst
        torch.cuda.empty_cache()
        return 2 * nbytes / (ms * 1e-3) / 1e9  # bytes read + bytes written


def profile_breakdown(fn, *, steps=5, top=12, device=None):
    """torch.profiler summary of `steps` calls of fn(): host wall time per call, the device's busy time
    per call (the self time of the device rows: kineto also credits each kernel's time to the host op
    that launched it, so summing every row would count it twice), the `top` device rows (kernels) by
    self device time, and the `top` host ops by self CPU time, each with calls and microseconds per
    step. On a CPU-only run the device entries are empty."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    cuda = device is not None and torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    fn()
    sync()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with torch_profile(activities=activities) as prof:
        sync()
        start = time.perf_counter()  # inside: the profiler's start-up and shutdown are no step's time
        for _ in range(steps):
            fn()
        sync()
        wall_us = (time.perf_counter() - start) * 1e6 / steps

    def self_device_us(e):
        for attr in ("self_device_time_total", "self_cuda_time_total"):
            if hasattr(e, attr):
                return getattr(e, attr)
        return 0.0

    averages = list(prof.key_averages())
    device_rows = [e for e in averages if getattr(e, "device_type", DeviceType.CPU) != DeviceType.CPU
                   and not getattr(e, "is_user_annotation", False)]
    host_rows = [e for e in averages if getattr(e, "device_type", DeviceType.CPU) == DeviceType.CPU]

    def rows(events, key):
        return [{"name": e.key[:90], "calls_per_step": e.count / steps,
                 "self_device_us_per_step": round(self_device_us(e) / steps, 1),
                 "self_cpu_us_per_step": round(e.self_cpu_time_total / steps, 1)}
                for e in sorted(events, key=key, reverse=True)[:top]]

    return {
        "steps": steps,
        "wall_us_per_step_profiled": round(wall_us, 1),
        # device busy time per step: far below the wall time means the host (launches) bounds it
        "device_busy_us_per_step": round(sum(self_device_us(e) for e in device_rows) / steps, 1),
        "top": rows(device_rows, self_device_us),  # kernels by device time
        "top_host": rows(host_rows, lambda e: e.self_cpu_time_total),  # host ops by CPU time
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    args = parser.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    if not torch.cuda.is_available():
        sys.exit("gpu_check.py needs a CUDA GPU (torch.cuda.is_available() is False)")

    import triton

    device = torch.device("cuda")
    gpu = torch.cuda.get_device_name()
    t0 = time.time()
    ctx = Context(device)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "copy_bandwidth_gbs": ctx.copy_gbs,
        "sections": {},
    }
    print(f"{gpu}: copy bandwidth {ctx.copy_gbs:.0f} GB/s (read+write)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    if set(names) != set(SECTIONS):
        slug += "-" + "-".join(names)
    path = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{slug}.json")
    failed = []
    for name in names:
        start = time.time()
        try:
            section = importlib.import_module(f"gpucheck_{name}")
            result = section.run(ctx)
        except KeyboardInterrupt:  # gpu_run.sh's timeout sends SIGINT: record the cut, keep the rest
            report["sections"][name] = {"error": "cut off (time limit)", "seconds": round(time.time() - start, 1)}
            _write(report, path, t0, failed + [name])
            raise
        except Exception as exc:  # a broken section is reported, the others still run
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.time() - start, 1)
        report["sections"][name] = result
        if result.get("error") or not result.get("ok", False):
            failed.append(name)
        print(f"[{name}] done in {result['seconds']} s, ok={result.get('ok')}", flush=True)
        _write(report, path, t0, failed)  # after every section, so a cut-off run keeps what it measured
    _write(report, path, t0, failed, complete=True)
    print(f"wrote {path}; failed sections: {failed or 'none'}")
    return 1 if failed else 0


def _write(report, path, t0, failed, complete=False):
    report["total_seconds"] = round(time.time() - t0, 1)
    report["complete"] = complete
    report["ok"] = complete and not failed
    tmp = path + ".tmp"  # a kill mid-write keeps the last complete file
    with open(tmp, "w") as f:
        json.dump(_json_safe(report), f, indent=2, default=str, allow_nan=False)
    os.replace(tmp, path)


def _json_safe(value):
    """Non-finite floats as strings ("inf", "nan"): strict JSON readers (jq) reject Infinity/NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


if __name__ == "__main__":
    sys.exit(main())
