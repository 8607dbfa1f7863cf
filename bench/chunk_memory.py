"""Peak memory and time of one training step with and without gradient caching (--chunk_size).

    python bench/chunk_memory.py [--batch 8192] [--chunk 256] [--device cpu|cuda]

The demo-size model (tiny BERT 2 x 64, 36 x 256 regions, embed 256; the published-size one on CUDA:
BERT-base, 36 x 2048, embed 1024), one VSE++ step (train_step: forward, loss, backward, clip, AdamW),
run once unchunked and once with the chunk size, each in a fresh process. Memory beyond what is held
before the step (the model; AdamW's state is created in the step, so it counts): peak RSS growth on
CPU, torch.cuda.max_memory_allocated growth on CUDA.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_step(batch_size: int, chunk: int, device: str) -> dict:
    import transformers

    from vse_fast import grad_cache, train
    from vse_fast.distributed import DistContext
    from vse_fast.model import build_model

    dev = torch.device(device)
    big = dev.type == "cuda"
    bert = transformers.BertConfig() if big else transformers.BertConfig(
        vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)
    img_dim, embed, k, t = (2048, 1024, 36, 32) if big else (256, 256, 36, 32)
    torch.manual_seed(0)
    model = build_model(dict(embed_size=embed, img_dim=img_dim, bert_config_dict=bert.to_dict())).to(dev).train()
    g = torch.Generator().manual_seed(0)
    cap_lengths = torch.randint(8, t + 1, (batch_size,), generator=g)
    batch = dict(images=torch.randn(batch_size, k, img_dim, generator=g), img_lengths=torch.full((batch_size,), k),
                 captions=torch.randint(1000 if big else 5, bert.vocab_size, (batch_size, t), generator=g)
                 * (torch.arange(t) < cap_lengths[:, None]), cap_lengths=cap_lengths)
    if chunk:
        step_batch = [{key: v.to(dev) for key, v in c.items()} for c in grad_cache.split_batch(batch, chunk)]
    else:
        step_batch = {key: v.to(dev) for key, v in batch.items()}
    optimizer = train.build_optimizer(model, dict(learning_rate=5e-4, bert_lr_factor=0.1, weight_decay=1e-4))
    scaler = torch.amp.GradScaler(dev.type, enabled=False)
    precision = "bf16" if big else "fp32"
    if big:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    start = time.perf_counter()
    loss, _, _ = train.train_step(model, step_batch, optimizer, scaler, DistContext(device=dev), margin=0.2,
                               max_violation=True, grad_clip=2.0, precision=precision)
    loss = float(loss.detach())
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if big else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return dict(batch=batch_size, chunk=chunk, device=device, seconds=round(seconds, 2),
                extra_bytes=int(peak - base), loss=loss)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # child process: one config
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one_step(args.batch, args.chunk, args.device)))
        return
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for chunk in (0, args.chunk):
        out = subprocess.run([sys.executable, __file__, "--one", "--batch", str(args.batch), "--chunk", str(chunk),
                              "--device", args.device], env=env, capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        label = f"--chunk_size {chunk}" if chunk else "unchunked"
        print(f"B={r['batch']} {label:>16} on {r['device']}: step {r['seconds']:.2f} s, "
              f"{r['extra_bytes'] / 2**30:.2f} GiB beyond the model, loss {r['loss']:.2f}")


if __name__ == "__main__":
    main()
