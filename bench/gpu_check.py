"""One-shot GPU check: correctness, timings and memory of every Triton kernel, one command.

    python bench/gpu_check.py [--out bench/results] [--only gpo,loss,train,ddp,compile] [--budget 270]

Ends in about five minutes: the sections share a time budget (--budget seconds, 270 by default, beside
a few seconds of CUDA start-up and the copy-bandwidth probe). A section that cannot be cut short
(compile; ddp on two or more GPUs) has the seconds it needs set aside (its module's `reserve_s(ctx)`);
the others each get a share of the rest of the time left when they start (SHARES; what one leaves
unused passes on) and run their cases in order of priority
(correctness on the core shapes, then the timings the README's targets name, then diagnostics and the
wider correctness sweep); a case that would start after the section's deadline is skipped and listed by
name under "skipped_for_time", never dropped silently. A case already running is not interrupted, so
a section can overrun its deadline by one case. bench/gpu_run.sh runs it under a hard cut at 300 s.
Each section (bench/gpucheck_<name>.py, function `run(ctx) -> dict`) checks its kernels against a
float64 reference on fresh random inputs and times them against the published re-implementation with
CUDA events (triton.testing.do_bench, median). The card's copy bandwidth is measured in the same run so
memory-bound kernels can be reported as a fraction of it. Prints a table and writes JSON to
<out>/<date>-<gpu>.json, or to <out>/<date>-<gpu>-<sections>.json when --only names a subset (so two
partial runs do not overwrite each other). In the JSON, "checks_passed": every check that ran passed
("failed_sections" names the others); "all_cases_ran": nothing was skipped for time or cut; "ok": both.
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
# A section's share of the time left when it starts, against the sections still to run.
SHARES = {"gpo": 0.45, "loss": 0.30, "train": 0.25, "ddp": 0.0, "compile": 0.0}  # ddp, compile: reserve_s
DEFAULT_BUDGET_S = 270.0


class SectionBudget:
    """A section's deadline, and the cases skipped because it passed.

    `within(cases, what)` yields the cases one by one while the deadline has not passed and records
    the rest under `what`; `has_time(what, seconds)` says whether `seconds` are left, recording `what`
    as skipped when not. A case that has started is never interrupted."""

    def __init__(self):
        self.deadline = math.inf
        self.skipped = []

    def start_section(self, seconds):
        self.deadline = time.monotonic() + max(0.0, seconds)
        self.skipped = []

    def time_left(self):
        return self.deadline - time.monotonic()

    def within(self, cases, what):
        cases = list(cases)
        for i, case in enumerate(cases):
            if self.time_left() <= 0:
                self.skipped.append({"what": what, "cases": [_case_name(c) for c in cases[i:]]})
                return
            yield case

    def has_time(self, what, seconds=0.0):
        if self.time_left() > seconds:
            return True
        self.skipped.append({"what": what, "cases": [], "needs_s": seconds})
        return False


def _case_name(case):
    if isinstance(case, (tuple, list)):
        return "-".join(_case_name(c) for c in case)
    if isinstance(case, torch.dtype):
        return str(case).replace("torch.", "")
    return str(case)


class Context(SectionBudget):
    """What every section gets: the device, a timer, the copy-bandwidth ceiling, a memory probe, and
    the section's time budget (SectionBudget)."""

    def __init__(self, device):
        import triton.testing

        super().__init__()
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
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                        help="seconds the sections share (default %(default)s); cases past it are skipped and listed")
    args = parser.parse_args(argv)
    names = [s for s in args.only.split(",") if s]
    for name in names:
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {', '.join(SECTIONS)}")
    if len(set(names)) != len(names):
        sys.exit(f"--only names a section twice: {args.only!r}")
    if not names:
        sys.exit("--only names no section")
    if not args.budget > 0:
        sys.exit(f"--budget must be a positive number of seconds, got {args.budget}")
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
        "budget_s": args.budget,
        "sections": {},
    }
    print(f"{gpu}: copy bandwidth {ctx.copy_gbs:.0f} GB/s (read+write)", flush=True)
    os.makedirs(args.out, exist_ok=True)
    slug = re.sub(r"[^A-Za-z0-9]+", "-", gpu).strip("-").lower()
    if set(names) != set(SECTIONS):
        slug += "-" + "-".join(names)
    path = os.path.join(args.out, f"{datetime.date.today().isoformat()}-{slug}.json")
    failed = run_sections(ctx, names, args.budget, report, lambda failed, complete=False: _write(
        report, path, t0, failed, complete))
    skipped = {n: r["skipped_for_time"] for n, r in report["sections"].items() if r.get("skipped_for_time")}
    print(f"wrote {path}; failed sections: {failed or 'none'}; sections with cases skipped for time: "
          f"{sorted(skipped) or 'none'}")
    return 1 if failed else 0


def section_seconds(name, later, left, reserves):
    """A section's time: what it reserved, or its share of the time left less what the sections after
    it (``later``) reserved, whichever is more; never past the end of the budget (``left``)."""
    shares = sum(SHARES[n] for n in [name, *later])
    rest = left - sum(reserves[n] for n in later)
    share = SHARES[name] / shares if shares else 1.0
    return min(left, max(reserves[name], share * rest))


def run_sections(ctx, names, budget_s, report, save, load=None):
    """Run the sections in order, each under the time section_seconds gives it, into
    report["sections"]; save(failed, complete=...) after each. Returns the names of the sections that
    failed (an error, ok false). A SIGINT (gpu_run.sh's hard cut) records the section as cut, and those
    not started as such, and re-raises."""
    load = load or (lambda name: importlib.import_module(f"gpucheck_{name}"))
    end = time.monotonic() + budget_s
    reserves = {n: float(getattr(load(n), "reserve_s", lambda ctx: 0.0)(ctx)) for n in names}
    failed = []
    for i, name in enumerate(names):
        ctx.start_section(section_seconds(name, names[i + 1:], end - time.monotonic(), reserves))
        start = time.time()
        try:
            result = load(name).run(ctx)
        except KeyboardInterrupt:  # gpu_run.sh's timeout sends SIGINT: record the cut, keep the rest
            report["sections"][name] = {"error": "cut off (time limit)", "seconds": round(time.time() - start, 1),
                                        "skipped_for_time": ctx.skipped}
            for later in names[i + 1:]:
                report["sections"][later] = {"error": "not started (cut off)", "skipped_for_time": [
                    {"what": f"section {later}", "cases": []}]}
            save(failed + list(names[i:]))
            raise
        except Exception as exc:  # a broken section is reported, the others still run
            traceback.print_exc()
            result = {"error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.time() - start, 1)
        result["skipped_for_time"] = ctx.skipped
        report["sections"][name] = result
        if result.get("error") or not result.get("ok", False):
            failed.append(name)
        note = f", {sum(max(1, len(s['cases'])) for s in ctx.skipped)} cases skipped for time" if ctx.skipped else ""
        print(f"[{name}] done in {result['seconds']} s, ok={result.get('ok')}{note}", flush=True)
        save(failed)  # after every section, so a cut-off run keeps what it measured
    save(failed, complete=True)
    return failed


def _write(report, path, t0, failed, complete=False):
    report["total_seconds"] = round(time.time() - t0, 1)
    report["complete"] = complete
    report["failed_sections"] = list(failed)
    report["checks_passed"] = complete and not failed
    report["all_cases_ran"] = complete and not any(r.get("skipped_for_time") for r in report["sections"].values())
    report["ok"] = report["all_cases_ran"] and report["checks_passed"]
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
