"""Record the torch.distributed collectives of DDP training steps, global vs local negatives.

Shared by tests/test_distributed_comm.py (gloo, 2 CPU processes) and bench/gpucheck_ddp.py (NCCL,
2 GPUs), so both check the same thing:

- ``spawn_comm_probe(cfg, backend, out_dir)`` starts ``cfg.world`` processes. Each one sets up the
  process group with ``vse_fast.distributed.init_distributed`` (as under torchrun), wraps a small
  two-tower model in DDP and runs ``vse_fast.train.train_step`` (the training loop's step: forward,
  ``global_contrastive_loss``, backward of loss x world size, grad-norm clip, AdamW) with global
  negatives, with ``local_negatives=True`` and with global negatives under ``--dedupe_items`` (mode
  ``global_dedupe``: every item has a pair on each rank), recording every collective of each step, then
  times the global and local steps. Returns one dict per rank (JSON-able).
- ``CollectiveRecorder`` wraps every collective function of ``torch.distributed`` and the aliases of
  them held by ``vse_fast`` modules (e.g. ``vse_fast.distributed._all_gather_flat``) and logs the name
  and the shapes of the tensor arguments of each call. DDP's gradient all-reduce runs in C++, out of
  its reach, so the probe registers DDP's Python reference comm hook
  (``default_hooks.allreduce_hook``: the same bucketed all-reduce, then the average) and the
  recorder sees each bucket's ``dist.all_reduce``.
- ``communication_problems(rank_result, cfg)`` compares one rank's record with docs/distributed.md:
  per global-negatives step exactly two all-gathers of (B_local, E) rows into (B_global, E), exactly
  two reduce-scatters of (B_global, E) into (B_local, E), DDP all-reduces totalling the model's
  parameters, nothing else (``--dedupe_items`` included); per local-negatives step only the DDP
  all-reduces.

The model (one Linear per modality, l2-normalised like vse_fast's encoders) stands for any encoder:
what reaches the loss, and so what is communicated for it, is the (B_local, E) embeddings.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist

# Every collective (and point-to-point) entry point of torch.distributed across 2.x versions; the
# ones a given torch lacks are skipped.
COLLECTIVES = (
    "all_gather", "all_gather_into_tensor", "all_gather_single", "_all_gather_base", "all_gather_coalesced",
    "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "reduce_scatter_single",
    "_reduce_scatter_base", "all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "_broadcast_coalesced",
    "broadcast_object_list", "gather", "gather_object", "scatter", "scatter_object_list", "all_to_all",
    "all_to_all_single", "barrier", "monitored_barrier", "send", "recv", "isend", "irecv", "batch_isend_irecv",
    "send_object_list", "recv_object_list",
)


def collective_kind(name: str) -> str:
    """"all_gather", "reduce_scatter" or "all_reduce" for any spelling of those, else the name."""
    for kind in ("all_gather", "reduce_scatter", "all_reduce"):
        if kind in name:
            return kind
    return name


def _tensor_groups(value):
    """The tensors of one argument: [t] for a tensor, the tensors of a list/tuple, else []."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (list, tuple)):
        return [v for v in value if torch.is_tensor(v)]
    return []


class CollectiveRecorder:
    """Context manager that logs every torch.distributed collective call while installed.

    ``calls`` holds one dict per call: ``name`` (the function called), ``kind``
    (``collective_kind``), ``shapes`` (of every tensor argument, lists flattened), ``payload_numel`` /
    ``payload_bytes`` (the largest buffer argument: a tensor, or a list of tensors counted together;
    for an all-gather the gathered output, for a reduce-scatter its full input). A collective that
    calls another one through the patched names is logged once (the outer call). Calls from any
    thread are logged (the backward, where reduce-scatters and DDP all-reduces run, may use its own).
    """

    def __init__(self):
        self.calls: list = []
        self._local = threading.local()
        self._patched: list = []

    def _wrap(self, name, fn):
        def recorded(*args, **kwargs):
            depth = getattr(self._local, "depth", 0)
            if depth == 0:
                groups = [_tensor_groups(a) for a in list(args) + list(kwargs.values())]
                groups = [g for g in groups if g]
                payload = max(groups, key=lambda g: sum(t.numel() for t in g), default=[])
                self.calls.append(dict(
                    name=name, kind=collective_kind(name),
                    shapes=[list(t.shape) for g in groups for t in g],
                    payload_numel=sum(t.numel() for t in payload),
                    payload_bytes=sum(t.numel() * t.element_size() for t in payload),
                ))
            self._local.depth = depth + 1
            try:
                return fn(*args, **kwargs)
            finally:
                self._local.depth = depth

        recorded.__wrapped__ = fn
        return recorded

    def __enter__(self):
        wrappers = {}
        for name in COLLECTIVES:
            fn = getattr(dist, name, None)
            if callable(fn):
                wrappers[id(fn)] = self._wrap(name, fn)
                self._patched.append((dist, name, fn))
                setattr(dist, name, wrappers[id(fn)])
        # Aliases bound at import time (``_all_gather_flat = dist.all_gather_single``) in vse_fast.
        for mod_name, mod in list(sys.modules.items()):
            if mod is None or not (mod_name == "vse_fast" or mod_name.startswith("vse_fast.")):
                continue
            for attr, value in list(vars(mod).items()):
                if id(value) in wrappers and callable(value):
                    self._patched.append((mod, attr, value))
                    setattr(mod, attr, wrappers[id(value)])
        return self

    def __exit__(self, *exc):
        for owner, attr, original in reversed(self._patched):
            setattr(owner, attr, original)
        self._patched.clear()
        return False


# ----------------------------------------------------------------------------- the probe


@dataclass(frozen=True)
class ProbeConfig:
    """Sizes of the probe: ``world`` processes with ``b_local`` pairs each, embeddings of size
    ``embed`` from inputs of ``img_dim`` / ``cap_dim`` features; ``steps`` recorded steps per mode,
    ``time_reps`` timed steps per mode (after ``warmup`` untimed ones; 0 = no timing)."""

    world: int = 2
    b_local: int = 16
    embed: int = 8
    img_dim: int = 12
    cap_dim: int = 10
    steps: int = 2
    time_reps: int = 0
    warmup: int = 2
    precision: str = "fp32"
    max_violation: bool = True
    seed: int = 0

    @property
    def b_global(self) -> int:
        return self.world * self.b_local


class TwoTower(torch.nn.Module):
    """(images (B, img_dim), captions (B, cap_dim)) -> l2-normalised (B, embed) embeddings of each,
    with vse_fast's model call signature (the lengths are ignored)."""

    def __init__(self, img_dim: int, cap_dim: int, embed: int):
        super().__init__()
        self.img_fc = torch.nn.Linear(img_dim, embed)
        self.cap_fc = torch.nn.Linear(cap_dim, embed)

    def forward(self, images, img_lengths, captions, cap_lengths):
        norm = torch.nn.functional.normalize
        return norm(self.img_fc(images), dim=-1), norm(self.cap_fc(captions), dim=-1)


def _median_ms(fn, reps: int, device: torch.device) -> float:
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def comm_worker(rank: int, world: int, port: int, backend: str, cfg_dict: dict, out_dir: str) -> None:
    """One rank of the probe (``torch.multiprocessing.spawn`` target); writes ``out_dir/rank{r}.json``."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from vse_fast import distributed as vdist
    from vse_fast.train import train_step

    cfg = ProbeConfig(**cfg_dict)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if backend == "gloo":
        torch.set_num_threads(1)
    ctx = vdist.init_distributed("cuda" if backend == "nccl" else "cpu", backend=backend)
    device = ctx.device
    torch.manual_seed(cfg.seed)  # same initial weights everywhere (DDP also broadcasts rank 0's)
    model = TwoTower(cfg.img_dim, cfg.cap_dim, cfg.embed).to(device)
    ddp = torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None)
    ddp.register_comm_hook(None, default_hooks.allreduce_hook)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    g = torch.Generator().manual_seed(cfg.seed * 1000 + rank + 1)
    ones = torch.ones(cfg.b_local, dtype=torch.long)
    batch = {k: v.to(device) for k, v in dict(
        images=torch.randn(cfg.b_local, cfg.img_dim, generator=g), img_lengths=ones,
        captions=torch.randn(cfg.b_local, cfg.cap_dim, generator=g), cap_lengths=ones).items()}

    # --dedupe_items: item i has a pair on each rank (rows i and B_local + i of the global batch)
    pairing = vdist.item_pairing(torch.arange(cfg.b_global) % cfg.b_local).to(device)

    def step(local_negatives: bool, pairing=None):
        loss, _, _ = train_step(ddp, batch, optimizer, scaler, ctx, margin=0.2, max_violation=cfg.max_violation,
                                grad_clip=2.0, precision=cfg.precision, local_negatives=local_negatives,
                                pairing=pairing)
        return loss

    out = dict(rank=rank, world=world, backend=backend, device=str(device),
               n_params=sum(p.numel() for p in model.parameters()), steps={}, losses={}, ms={})
    for mode in ("global", "local", "global_dedupe"):
        out["steps"][mode], out["losses"][mode] = [], []
        for _ in range(cfg.steps):
            with CollectiveRecorder() as rec:
                loss = step(local_negatives=mode == "local", pairing=pairing if mode == "global_dedupe" else None)
            out["steps"][mode].append(rec.calls)
            out["losses"][mode].append(float(loss.detach()))  # after the recorded window
        vdist.barrier(ctx)
    if cfg.time_reps > 0:
        img = torch.randn(cfg.b_local, cfg.embed, device=device, requires_grad=True)
        cap = torch.randn(cfg.b_local, cfg.embed, device=device, requires_grad=True)

        def gather_only():  # the embedding communication alone: 2 all-gathers + 2 reduce-scatters
            (vdist.all_gather_with_grad(img, ctx).sum() + vdist.all_gather_with_grad(cap, ctx).sum()).backward()

        for mode, fn in (("global", lambda: step(False)), ("local", lambda: step(True)), ("gather", gather_only)):
            _median_ms(fn, cfg.warmup, device)
            vdist.barrier(ctx)
            out["ms"][mode] = _median_ms(fn, cfg.time_reps, device)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(out, f)
    vdist.barrier(ctx)
    del ddp, optimizer, step  # the DDP wrapper holds the process group: release it before the teardown
    vdist.cleanup_distributed(ctx)


def spawn_comm_probe(cfg: ProbeConfig, backend: str, out_dir: str) -> list:
    """Run ``comm_worker`` on ``cfg.world`` spawned processes (loopback rendezvous on a free port);
    returns their results ordered by rank."""
    import torch.multiprocessing as mp

    from tests.test_distributed import _free_port

    mp.spawn(comm_worker, args=(cfg.world, _free_port(), backend, asdict(cfg), out_dir), nprocs=cfg.world,
             join=True)
    results = []
    for r in range(cfg.world):
        with open(os.path.join(out_dir, f"rank{r}.json")) as f:
            results.append(json.load(f))
    return results


# ----------------------------------------------------------------------------- the expectations


def step_summary(calls: list) -> dict:
    """{kind: {"count": calls, "numel": summed payload elements, "bytes": summed payload bytes}}."""
    out = {}
    for c in calls:
        s = out.setdefault(c["kind"], dict(count=0, numel=0, bytes=0))
        s["count"] += 1
        s["numel"] += c["payload_numel"]
        s["bytes"] += c["payload_bytes"]
    return out


def communication_problems(result: dict, cfg: ProbeConfig) -> list:
    """What in one rank's record differs from docs/distributed.md (empty list: as documented)."""
    problems = []
    local_rows, global_rows = [cfg.b_local, cfg.embed], [cfg.b_global, cfg.embed]
    expected_shapes = {"all_gather": [global_rows, local_rows], "reduce_scatter": [local_rows, global_rows]}
    for mode, steps in result["steps"].items():
        for i, calls in enumerate(steps):
            where = f"rank {result['rank']} {mode}-negatives step {i}"
            summary = step_summary(calls)
            want = {"all_gather": 2, "reduce_scatter": 2} if mode.startswith("global") else {}
            for kind in ("all_gather", "reduce_scatter"):
                if summary.get(kind, {}).get("count", 0) != want.get(kind, 0):
                    problems.append(f"{where}: {summary.get(kind, {}).get('count', 0)} {kind} calls, "
                                    f"expected {want.get(kind, 0)}")
            for c in calls:
                kind = c["kind"]
                if kind in expected_shapes:
                    if c["shapes"] != expected_shapes[kind] or c["payload_bytes"] != cfg.b_global * cfg.embed * 4:
                        problems.append(f"{where}: {c['name']} of shapes {c['shapes']} ({c['payload_bytes']} B), "
                                        f"expected {expected_shapes[kind]} fp32")
                elif kind != "all_reduce":
                    problems.append(f"{where}: unexpected collective {c['name']} of shapes {c['shapes']}")
            reduced = summary.get("all_reduce", {}).get("numel", 0)
            if reduced != result["n_params"]:
                problems.append(f"{where}: all-reduces of {reduced} elements in all, expected DDP's gradient "
                                f"all-reduce of the {result['n_params']} parameters")
    return problems
