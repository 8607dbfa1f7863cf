"""One training step (forward + loss + backward + grad clip + AdamW): ours vs the published-style model.

Ours: vse_fast.model.VSEModel (GPO.pool, fused loss) stepped by vse_fast.train.train_step (bf16
autocast and fused AdamW on GPU). Published: the same architecture built from the published-style
GPO and loss (tests/published/model.py, gpo.py, loss.py), fp32, the published step (criterion,
backward, clip_grad_norm_, AdamW with BERT at 0.1x lr). Both start from the same weights.
"ours-compiled" (GPU only): ours with BERT under torch.compile (``python -m vse_fast.train --compile``);
pytest-benchmark's warm-up call pays the compilation.

Shapes: GPU = the published COCO setting (36 x 2048 region features, BERT-base config with random
weights, B = 128, captions 8-32 tokens); CPU = a tiny BERT, 12 x 256 regions, B = 32.

    pytest bench/bench_train.py --benchmark-only
"""
import pytest
import torch

from vse_fast.distributed import DistContext


def make_setup(device, *, big=None, seed=0):
    """(our model, published model, batch, bert_config) on ``device`` with identical weights."""
    import transformers

    from vse_fast.model import build_model
    from tests.published.model import build_published

    big = device.type == "cuda" if big is None else big
    if big:
        bert_cfg = transformers.BertConfig()  # bert-base-uncased shape: 12 x 768, vocab 30522
        b, k, d, t, embed = 128, 36, 2048, 32, 1024
    else:
        bert_cfg = transformers.BertConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, intermediate_size=128)
        b, k, d, t, embed = 32, 12, 256, 16, 256
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    ours = build_model(dict(embed_size=embed, img_dim=d, bert_config_dict=bert_cfg.to_dict()))
    published = build_published(embed, d, "basic", bert=transformers.BertModel(bert_cfg))
    missing, unexpected = published.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected, unexpected
    img_lengths = torch.full((b,), k, dtype=torch.long)  # BUTD: 36 regions per image
    cap_lengths = torch.randint(8, t + 1, (b,), generator=g)
    captions = torch.randint(1000 if big else 5, bert_cfg.vocab_size, (b, t), generator=g)
    captions = captions * (torch.arange(t) < cap_lengths[:, None])
    batch = dict(images=torch.randn(b, k, d, generator=g).abs(), img_lengths=img_lengths,
                 captions=captions, cap_lengths=cap_lengths)
    batch = {key: v.to(device) for key, v in batch.items()}
    return ours.to(device).train(), published.to(device).train(), batch


def published_param_groups(model, lr=5e-4):
    bert_ids = {id(p) for p in model.txt_enc.bert.parameters()}
    return [dict(params=[p for p in model.txt_enc.parameters() if id(p) not in bert_ids], lr=lr),
            dict(params=list(model.txt_enc.bert.parameters()), lr=lr * 0.1),
            dict(params=list(model.img_enc.parameters()), lr=lr)]


def published_criterion(max_violation=True):
    from tests.published import loss as published_loss

    cls = getattr(published_loss, "PublishedContrastiveLoss", None) or published_loss.ContrastiveLoss
    return cls(margin=0.2, max_violation=max_violation)


def gradient_differences(ours, published, batch, *, max_violation=False):
    """{parameter name: ||g_ours - g_published|| / max(||g_published||, 1e-4 * the largest such norm)}
    after one fp32 forward + backward of each model's loss (margin 0.2) on the same weights, without
    dropout and with BatchNorm on batch statistics, as in training (its running statistics are put
    back afterwards). The floor keeps gradients that are 0 in exact arithmetic (BERT's attention key
    biases: the softmax ignores a shift) from comparing rounding noise with rounding noise. A NaN or
    inf gradient or difference gives inf, never a pass. The models' modes are restored and their
    gradients cleared. VSE0 (the default) is smooth away from its hinges; with max_violation a near-tie
    of two hardest negatives can pick another one. A parameter one model lacks, or whose gradient one
    of them leaves unset, is a ValueError: nothing is skipped silently."""
    import math

    from vse_fast.ops.contrastive import contrastive_loss

    modes = ours.training, published.training
    batch_norms = [m for model in (ours, published) for m in model.modules()
                   if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    saved = [{k: v.clone() for k, v in m.state_dict().items()} for m in batch_norms]
    ours.eval(), published.eval()
    for m in batch_norms:
        m.train()
    try:
        with torch.autocast(batch["images"].device.type, enabled=False):
            ours.zero_grad(set_to_none=True), published.zero_grad(set_to_none=True)
            contrastive_loss(*ours(**batch), margin=0.2, max_violation=max_violation).backward()
            published_criterion(max_violation)(*published(batch["images"], batch["img_lengths"], batch["captions"],
                                                           batch["cap_lengths"])).backward()
        ours_params, published_params = dict(ours.named_parameters()), dict(published.named_parameters())
        if set(ours_params) != set(published_params):
            raise ValueError(f"parameter names differ: ours only {sorted(set(ours_params) - set(published_params))}, "
                             f"published only {sorted(set(published_params) - set(ours_params))}")
        diffs, norms = {}, {}
        for name, p in ours_params.items():
            g_ours, g_pub = p.grad, published_params[name].grad
            if (g_ours is None) != (g_pub is None):
                raise ValueError(f"{name}: a gradient in one model only (ours {g_ours is not None}, "
                                 f"published {g_pub is not None})")
            if g_ours is None:  # unused or frozen in both: no gradient either side
                diffs[name] = norms[name] = 0.0
                continue
            diffs[name] = float((g_ours.double() - g_pub.double()).norm())
            norms[name] = float(g_pub.double().norm())
        floor = 1e-4 * max((v for v in norms.values() if math.isfinite(v)), default=0.0)
        result = {}
        for name, diff in diffs.items():
            if not (math.isfinite(diff) and math.isfinite(norms[name])):
                result[name] = math.inf
            else:
                result[name] = diff / max(norms[name], floor) if diff else 0.0
        return result
    finally:
        ours.zero_grad(set_to_none=True), published.zero_grad(set_to_none=True)
        ours.train(modes[0]), published.train(modes[1])
        with torch.no_grad():
            for m, state in zip(batch_norms, saved):
                m.load_state_dict(state)


def make_published_step(model, batch, lr=5e-4):
    """The published train_emb: forward, criterion, zero_grad, backward, clip 2, AdamW step (fp32)."""
    optimizer = torch.optim.AdamW(published_param_groups(model, lr), lr=lr, weight_decay=1e-4)
    criterion = published_criterion()
    params = list(model.parameters())

    def step():
        img_emb, cap_emb = model(batch["images"], batch["img_lengths"], batch["captions"], batch["cap_lengths"])
        optimizer.zero_grad()
        loss = criterion(img_emb, cap_emb)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 2.0)
        optimizer.step()
        return loss

    return step


def make_our_step(model, batch, precision, lr=5e-4):
    """vse_fast.train.train_step with the run's optimizer (fused AdamW on CUDA) and scaler. ``batch``:
    a dict, or a list of chunks (gradient caching)."""
    from vse_fast.train import build_optimizer, train_step

    device = (batch[0] if isinstance(batch, (list, tuple)) else batch)["images"].device
    optimizer = build_optimizer(model, dict(learning_rate=lr, bert_lr_factor=0.1, weight_decay=1e-4))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    ctx = DistContext(device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        return train_step(model, batch, optimizer, scaler, ctx, margin=0.2, max_violation=True, grad_clip=2.0,
                          precision=precision, params=params)[0]

    return step


@pytest.mark.parametrize("impl", ["ours", "ours-compiled", "published"])
def test_train_step(run_bench, bench_device, impl):
    if impl == "ours-compiled" and bench_device.type != "cuda":
        pytest.skip("--compile (BERT under torch.compile) is timed on a GPU: on this CPU it compiles for "
                    "20-45 s and the tiny BERT gains nothing")
    ours, published, batch = make_setup(bench_device)
    if impl.startswith("ours"):  # once, untimed: every fp32 gradient equals the published model's
        differences = gradient_differences(ours, published, batch)
        assert all(v <= 1e-3 for v in differences.values()), max(differences.items(), key=lambda kv: kv[1])
        precision = "bf16" if bench_device.type == "cuda" else "fp32"
        if impl == "ours-compiled":
            ours.compile_text_backbone()
        step = make_our_step(ours, batch, precision)
    else:
        precision = "fp32"
        step = make_published_step(published, batch)
    b, k, d = batch["images"].shape
    loss = run_bench(step, group=f"train-step-B{b}-K{k}-D{d}", impl=impl, precision=precision,
                     rounds=None if bench_device.type == "cuda" else 3)
    assert torch.isfinite(loss).all()
