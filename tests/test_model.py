"""VSEModel: published parameter names, parity with the published-style encoders (strict load of
their state dicts, fp32, train- and eval-mode BatchNorm, outputs and gradients), option and
input validation, optimizer groups, BERT sources, no host sync."""
import json

import inspect
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tests.conftest import requires_cuda
from tests.published.model import build_published
import vse_fast.model as vse_model
from vse_fast.model import build_model, model_defaults, resolve_model_options

transformers = pytest.importorskip("transformers")

TINY_BERT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                 intermediate_size=37, max_position_embeddings=64)


def tiny_bert_config(**kw):
    return transformers.BertConfig(**{**TINY_BERT, **kw})


def to_our_state(pair):
    state = {"img_enc." + k: v for k, v in pair[0].items()}
    state.update({"txt_enc." + k: v for k, v in pair[1].items()})
    return state


def make_pair(kind, embed=18, img_dim=13, precomp="basic", **kw):
    """(published-style model, our model with its weights loaded strictly)."""
    if kind == "bert":
        cfg = tiny_bert_config()
        pub = build_published(embed, img_dim, precomp, bert=transformers.BertModel(cfg), **kw)
        ours = build_model(dict(embed_size=embed, img_dim=img_dim, precomp_enc_type=precomp,
                                bert_config_dict=cfg.to_dict(), **kw), gpo_backend="torch")
    else:
        gru = dict(vocab_size=57, word_dim=11, num_layers=kw.pop("num_layers", 2), use_bi_gru=True)
        pub = build_published(embed, img_dim, precomp, **gru, **kw)
        ours = build_model(dict(embed_size=embed, img_dim=img_dim, precomp_enc_type=precomp,
                                text_encoder="gru", **gru, **kw), gpo_backend="torch")
    ours.load_state_dict(to_our_state(pub.state_dict_pair()), strict=True)
    return pub, ours


def make_batch(batch, k, img_dim, t, vocab, *, full_first=True):
    """Zero-padded sets and captions with unsorted random lengths, including 1 and the maximum."""
    img_len = torch.randint(1, k + 1, (batch,))
    cap_len = torch.randint(1, t + 1, (batch,))
    if full_first:
        img_len[0], cap_len[0] = k, t
    img_len[-1], cap_len[-1] = 1, 1
    images = torch.randn(batch, k, img_dim)
    images[torch.arange(k)[None] >= img_len[:, None]] = 0  # published collate zero-pads
    captions = torch.randint(1, vocab, (batch, t))
    captions[torch.arange(t)[None] >= cap_len[:, None]] = 0
    return images, img_len, captions, cap_len


def run(model, batch, seed=1234):
    torch.manual_seed(seed)  # same dropout masks (BERT) in both models
    return model(*batch)


@pytest.mark.parametrize("kind", ["gru", "bert"])
@pytest.mark.parametrize("precomp", ["basic", "backbone"])
def test_state_dict_names_match_published(kind, precomp):
    pub, ours = make_pair(kind, precomp=precomp)
    assert set(ours.state_dict()) == set(to_our_state(pub.state_dict_pair()))
    has_mlp = any(k.startswith("img_enc.mlp.") for k in ours.state_dict())
    assert has_mlp == (precomp == "basic")
    if precomp == "basic":
        # published MLP(img_dim, embed // 2, embed, 2): two Linear, two BatchNorm (the last unused)
        assert ours.img_enc.mlp.layers[0].weight.shape == (18 // 2, 13)
        assert ours.img_enc.mlp.bns[1].num_features == 18


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("kind,precomp,batch,k,t", [
    ("gru", "basic", 7, 9, 8),
    ("gru", "backbone", 1, 1, 1),
    ("bert", "basic", 5, 6, 11),
    ("bert", "backbone", 3, 4, 5),
], ids=["gru-basic-B7", "gru-backbone-B1-K1-T1", "bert-basic-B5", "bert-backbone-B3"])
def test_parity_with_published(kind, precomp, batch, k, t, mode):
    pub, ours = make_pair(kind, precomp=precomp)
    if mode == "eval":  # non-trivial BatchNorm running statistics
        pub.train()
        for _ in range(2):
            run(pub, make_batch(8, k, 13, t, 57))
        ours.load_state_dict(to_our_state(pub.state_dict_pair()), strict=True)
    pub.train(mode == "train")
    ours.train(mode == "train")
    data = make_batch(batch, k, 13, t, 57, full_first=batch > 1)
    ref_img, ref_cap = run(pub, data)
    img, cap = run(ours, data)
    assert img.dtype == cap.dtype == torch.float32
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap, ref_cap, atol=1e-5, rtol=1e-5)
    if mode == "train":  # BatchNorm running statistics updated identically
        for name, buf in ours.img_enc.named_buffers():
            torch.testing.assert_close(buf, dict(pub.img_enc.named_buffers())[name], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kind", ["gru", "bert"])
def test_gradients_match_published(kind):
    pub, ours = make_pair(kind)
    data = make_batch(6, 7, 13, 9, 57)
    ref = run(pub, data)
    out = run(ours, data)
    up = [torch.randn_like(x) for x in ref]
    torch.autograd.backward(ref, up)
    torch.autograd.backward(out, up)
    pub_grads = {n: p.grad for n, p in to_our_state(
        [dict(pub.img_enc.named_parameters()), dict(pub.txt_enc.named_parameters())]).items()}
    checked = 0
    for name, p in ours.named_parameters():
        if not p.requires_grad:  # published never gives these a gradient either
            assert pub_grads[name] is None and p.grad is None, name
            continue
        torch.testing.assert_close(p.grad, pub_grads[name], atol=1e-5, rtol=1e-4, msg=name)
        checked += 1
    assert checked > 20


def test_unused_published_parameters_are_frozen():
    _, ours = make_pair("bert")
    frozen = sorted(n for n, p in ours.named_parameters() if not p.requires_grad)
    assert frozen == ["img_enc.mlp.bns.1.bias", "img_enc.mlp.bns.1.weight",
                      "txt_enc.bert.pooler.dense.bias", "txt_enc.bert.pooler.dense.weight"]


def test_a_fresh_model_has_the_published_initialisation():
    """What training starts from (the parity tests load published weights over it): the image fc
    Xavier-uniform, bias 0 (published EncoderImageAggr.init_weights), the BiGRU word embedding
    U(-0.1, 0.1) (published EncoderText.init_weights)."""
    import math

    torch.manual_seed(0)
    img_dim, embed = 300, 200
    model = build_model(dict(embed_size=embed, img_dim=img_dim, text_encoder="gru", vocab_size=500, word_dim=300))
    bound = math.sqrt(6.0) / math.sqrt(img_dim + embed)
    w = model.img_enc.fc.weight.detach()
    assert 0.99 * bound < w.abs().max().item() <= bound
    assert float(w.std()) == pytest.approx(bound / math.sqrt(3.0), rel=0.02)  # uniform, not clustered at 0
    assert torch.count_nonzero(model.img_enc.fc.bias) == 0
    e = model.txt_enc.embed.weight.detach()
    assert 0.099 < e.abs().max().item() <= 0.1


@pytest.mark.parametrize("kind", ["gru", "bert"])
def test_no_norm_options(kind):
    pub, ours = make_pair(kind, no_imgnorm=True, no_txtnorm=True)
    ours.eval(), pub.eval()
    data = make_batch(4, 5, 13, 6, 57)
    img, cap = ours(*data)
    ref_img, ref_cap = pub(*data)
    assert not torch.allclose(img.norm(dim=1), torch.ones(4))
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(cap, ref_cap, atol=1e-5, rtol=1e-5)


def test_embeddings_do_not_depend_on_padding_in_eval():
    _, ours = make_pair("gru")
    ours.eval()
    images, img_len, captions, cap_len = make_batch(4, 6, 13, 7, 57)
    img, cap = ours(images, img_len, captions, cap_len)
    more_img = torch.cat([images, torch.zeros(4, 3, 13)], dim=1)
    more_cap = torch.cat([captions, torch.zeros(4, 2, dtype=torch.long)], dim=1)
    img2, cap2 = ours(more_img, img_len, more_cap, cap_len)
    torch.testing.assert_close(img2, img, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap2, cap, atol=1e-6, rtol=1e-5)


def test_param_groups_published_learning_rates():
    _, ours = make_pair("bert")
    groups = ours.param_groups(1e-3, bert_lr_factor=0.1, weight_decay=5e-4)
    by_name = {g["name"]: g for g in groups}
    assert by_name["bert"]["lr"] == pytest.approx(1e-4)
    assert by_name["text"]["lr"] == by_name["image"]["lr"] == 1e-3
    assert all(g["weight_decay"] == 5e-4 for g in groups)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in ours.parameters() if p.requires_grad}
    assert {id(p) for p in by_name["bert"]["params"]} == {
        id(p) for p in ours.txt_enc.bert.parameters() if p.requires_grad}
    torch.optim.AdamW(groups, lr=1e-3)  # accepted as is
    _, gru = make_pair("gru")
    assert [g["name"] for g in gru.param_groups(1e-3)] == ["text", "image"]


def test_bert_from_local_directory_and_config_json(tmp_path):
    bert = transformers.BertModel(tiny_bert_config())
    bert.save_pretrained(tmp_path / "bert")
    model = build_model(dict(embed_size=8, img_dim=5, text_model=str(tmp_path / "bert")))
    for name, value in bert.state_dict().items():
        torch.testing.assert_close(model.txt_enc.bert.state_dict()[name], value, atol=0, rtol=0)
    assert model.opt["bert_config_dict"]["hidden_size"] == 32
    json.dumps(model.opt)  # plain types only
    (tmp_path / "cfg.json").write_text(tiny_bert_config(num_hidden_layers=2).to_json_string())
    random_init = build_model(dict(embed_size=8, img_dim=5, bert_config=str(tmp_path / "cfg.json")))
    assert random_init.txt_enc.bert.config.num_hidden_layers == 2
    rebuilt = build_model(model.opt, load_pretrained=False)  # a checkpoint's stored options
    assert set(rebuilt.state_dict()) == set(model.state_dict())
    with pytest.raises(ValueError, match="not a directory"):
        build_model(dict(embed_size=8, img_dim=5, text_model=str(tmp_path / "missing")))
    bert.to(torch.bfloat16).save_pretrained(tmp_path / "bert16")  # many hub directories are 16-bit
    half_saved = build_model(dict(embed_size=8, img_dim=5, text_model=str(tmp_path / "bert16")))
    assert {p.dtype for p in half_saved.parameters()} == {torch.float32}
    emb = half_saved.encode_captions(torch.tensor([[2, 5, 3]]), torch.tensor([3]))
    assert emb.dtype == torch.float32 and torch.isfinite(emb).all()
    with pytest.raises(ValueError, match="not a file"):
        build_model(dict(embed_size=8, img_dim=5, bert_config=str(tmp_path / "missing.json")))


@pytest.mark.parametrize("bad,match", [
    (dict(embed_size=0), "embed_size"),
    (dict(img_dim=2.5), "img_dim"),
    (dict(precomp_enc_type="grid"), "precomp_enc_type"),
    (dict(text_encoder="lstm"), "text_encoder"),
    (dict(gpo_backend="cuda"), "gpo_backend"),
    (dict(text_encoder="bert"), "text_model"),
    (dict(text_encoder="gru", vocab_size=None), "vocab_size"),
    (dict(embed_size=1, text_encoder="gru", vocab_size=9), "embed_size >= 2"),
    (dict(no_imgnorm="false"), "no_imgnorm must be a bool.*'false'"),
    (dict(no_txtnorm=1), "no_txtnorm must be a bool.*int 1"),
    (dict(use_bi_gru="no"), "use_bi_gru must be a bool.*'no'"),
    (dict(use_bi_gru=None), "use_bi_gru must be a bool.*None"),
    (dict(pooling="attention"), "pooling must be one of"),
    (dict(pooling="kmax"), "pooling='kmax' needs pool_k, a positive int; got None"),
    (dict(pooling="kmax", pool_k=0), "needs pool_k.*got 0"),
    (dict(pool_k=3), "pool_k=3 is only used by pooling='kmax', not 'gpo'"),
])
def test_option_validation(bad, match):
    with pytest.raises(ValueError, match=match):
        resolve_model_options({**dict(text_encoder="gru", vocab_size=10), **bad})


@pytest.mark.parametrize("kind", ["gru", "bert"])
@pytest.mark.parametrize("pooling,pool_k", [("mean", None), ("max", None), ("kmax", 2)])
def test_fixed_poolings_replace_gpo_in_both_encoders(kind, pooling, pool_k, monkeypatch):
    """pooling="mean" / "max" / "kmax" (ours: the paper's fixed baselines) pool both encoders' valid set
    elements per dimension with no parameters: the embeddings are the L2-normalised mean, maximum or mean
    of the top min(k, n) of the GPO model's pre-pooling features, and the state dict is the GPO model's
    without gpool.*."""
    _, gpo_model = make_pair(kind)
    state = {k: v for k, v in gpo_model.state_dict().items() if ".gpool." not in k}
    fixed = build_model(dict(gpo_model.opt, pooling=pooling, pool_k=pool_k), load_pretrained=False,
                        gpo_backend="torch").eval()
    assert fixed.opt["pooling"] == pooling and fixed.opt["pool_k"] == pool_k
    fixed.load_state_dict(state, strict=True)
    images, img_len, captions, cap_len = make_batch(5, 4, 13, 6, 57)
    captured = {}  # the features each encoder of the GPO model pools (same weights before the pooling)
    for name in ("img_enc", "txt_enc"):
        gpool = getattr(gpo_model, name).gpool

        def spy(features, lengths, *, backend="auto", name=name, real=gpool.pool):
            captured[name] = (features.detach(), lengths)
            return real(features, lengths, backend=backend)

        monkeypatch.setattr(gpool, "pool", spy)
    with torch.no_grad():
        gpo_model.eval()(images, img_len, captions, cap_len)

    def pooled(features, lengths):
        rows = []
        for f, n in zip(features, lengths.long()):
            top = f[:n].sort(dim=0, descending=True).values
            take = {"mean": n, "max": 1, "kmax": min(int(pool_k or 1), int(n))}[pooling]
            rows.append(top[:take].mean(0))
        return torch.nn.functional.normalize(torch.stack(rows).float(), dim=-1)

    with torch.no_grad():
        img_emb, cap_emb = fixed(images, img_len, captions, cap_len)
    assert set(captured) == {"img_enc", "txt_enc"}
    torch.testing.assert_close(img_emb, pooled(*captured["img_enc"]), atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(cap_emb, pooled(*captured["txt_enc"]), atol=1e-6, rtol=1e-5)


def test_options_from_namespace_and_unknown_override():
    import argparse

    opt = resolve_model_options(argparse.Namespace(embed_size=64, margin=0.2, text_encoder="gru", vocab_size=9))
    assert opt["embed_size"] == 64 and "margin" not in opt
    assert set(opt) == set(model_defaults())
    with pytest.raises(TypeError, match="unknown model option"):
        resolve_model_options(opt, embed=3)
    with pytest.raises(TypeError, match="argparse.Namespace"):
        resolve_model_options([1, 2])


def test_input_validation():
    _, ours = make_pair("gru")
    images, img_len, captions, cap_len = make_batch(3, 4, 13, 5, 57)
    with pytest.raises(ValueError, match="img_dim=13"):
        ours.encode_images(torch.randn(3, 4, 12), img_len)
    with pytest.raises(ValueError, match=r"\(B, K, D\)"):
        ours.encode_images(images[0], img_len)
    with pytest.raises(ValueError, match=r"img_lengths must have shape \(3,\)"):
        ours.encode_images(images, img_len[:2])
    with pytest.raises(ValueError, match="integer"):
        ours.encode_captions(captions.float(), cap_len)
    with pytest.raises(ValueError, match=r"cap_lengths must have shape \(3,\)"):
        ours.encode_captions(captions, cap_len[None])
    with pytest.raises(TypeError, match="tensors"):
        ours.encode_images(images, [4, 4, 4])


@pytest.mark.parametrize("which,lengths,match", [
    ("images", [4, 0, 2], r"img_lengths must hold whole numbers in \[1, K=4\].*\[0\]"),
    ("images", [5, 3, 2], r"img_lengths .*\[1, K=4\].*\[5\]"),
    ("images", [4.0, 2.5, 1.0], r"img_lengths .*\[2\.5\]"),
    ("images", [4.0, float("nan"), float("inf")], r"img_lengths .*\[nan, inf\]"),
    ("captions", [5, 0, 1], r"cap_lengths must hold whole numbers in \[1, T=5\].*\[0\]"),
    ("captions", [6, 3, 1], r"cap_lengths .*\[1, T=5\].*\[6\]"),
    ("captions", [5.0, 1.5, 1.0], r"cap_lengths .*\[1\.5\]"),
], ids=["img-0", "img-gt-K", "img-fraction", "img-nonfinite", "cap-0", "cap-gt-T", "cap-fraction"])
def test_length_values_are_checked(which, lengths, match):
    """Bad lengths raise (they used to give zero embeddings, pool all K, truncate, or fail in gather)."""
    _, ours = make_pair("gru")
    images, _, captions, _ = make_batch(3, 4, 13, 5, 57)
    with pytest.raises(ValueError, match=match):
        if which == "images":
            ours.encode_images(images, torch.tensor(lengths))
        else:
            ours.encode_captions(captions, torch.tensor(lengths))
    with pytest.raises(TypeError, match="img_lengths must be an integer or float tensor"):
        ours.encode_images(images, torch.tensor([True, True, True]))
    with pytest.raises(ValueError, match="img_lengths must be on the images' device"):
        ours.encode_images(images, torch.tensor([4, 1, 2], device="meta"))


def test_length_checks_without_host_read_use_a_device_assert(monkeypatch):
    """The CUDA branch (taken here on CPU tensors): good lengths, int or float, pass; a bad one
    trips torch._assert_async, whose message names the argument."""
    monkeypatch.setattr(vse_model, "_check_on_host", lambda t: False)
    _, ours = make_pair("gru")
    images, img_len, captions, cap_len = make_batch(3, 4, 13, 5, 57)
    ours(images, img_len.float(), captions, cap_len)
    with pytest.raises(RuntimeError, match=r"img_lengths must hold whole numbers in \[1, K=4\]"):
        ours.encode_images(images, torch.tensor([4, 0, 1]))
    with pytest.raises(RuntimeError, match=r"cap_lengths must hold whole numbers in \[1, T=5\]"):
        ours.encode_captions(captions, torch.tensor([6, 1, 1]))


def _is_packed_batch_sizes(t):
    """True for (a view of) a PackedSequence's batch_sizes, which lives on the host by design
    (pack_padded_sequence keeps it on the CPU even for CUDA data): reading it is no device sync."""
    frame = sys._getframe()
    while frame is not None:
        sizes = frame.f_locals.get("batch_sizes")
        if isinstance(sizes, torch.Tensor) and sizes.untyped_storage().data_ptr() == t.untyped_storage().data_ptr():
            return True
        frame = frame.f_back
    return False


_DATA_DEPENDENT_OPS = ("aten::nonzero", "aten::unique", "aten::_unique", "aten::masked_select",
                       "aten::repeat_interleave")  # output sizes from tensor values (name prefixes): a CUDA sync


class _HostSyncDetector(TorchDispatchMode):
    """Records what would synchronise with a CUDA device: value reads (.item(), int(t), bool(t),
    .tolist(), .numpy()), ops whose output size depends on the values (nonzero, unique,
    masked_select, boolean-mask indexing, repeat_interleave by a tensor). On this CPU machine every
    tensor is a host tensor, so reads of PackedSequence.batch_sizes (always on the CPU, also on a
    GPU) are exempt. .tolist() and .numpy() of CPU tensors bypass dispatch: they are wrapped."""

    def __init__(self):
        super().__init__()
        self.calls = []
        self._wrapped = {}

    def __enter__(self):
        for name in ("tolist", "numpy"):
            original = getattr(torch.Tensor, name)
            self._wrapped[name] = original

            def wrapper(t, *args, _original=original, _name=name, **kw):
                if not _is_packed_batch_sizes(t):
                    self.calls.append(_name)
                return _original(t, *args, **kw)

            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._wrapped.items():
            setattr(torch.Tensor, name, original)
        return super().__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if func is torch.ops.aten._local_scalar_dense.default and not _is_packed_batch_sizes(args[0]):
            self.calls.append(func)
        elif name.startswith(_DATA_DEPENDENT_OPS) and not (name == "aten::repeat_interleave" and (kwargs or {}).get("output_size") is not None):
            self.calls.append(func)
        elif name == "aten::index" and any(i is not None and i.dtype == torch.bool for i in args[1]):
            self.calls.append(func)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kind,attn", [("gru", None), ("bert", "sdpa"), ("bert", "eager")])
def test_forward_backward_without_host_sync(kind, attn, monkeypatch):
    """No value copied to the host in forward or backward (CPU check of what CUDA would sync on).
    The length checks take their CUDA branch (device-side assert) and the torch pool its one-sort
    branch, as on a GPU: CPU tensors are otherwise checked, and grouped by set length, on the host,
    which is free for them."""
    import vse_fast.ops.gpo_pool

    monkeypatch.setattr(vse_model, "_check_on_host", lambda t: False)
    monkeypatch.setattr(vse_fast.ops.gpo_pool, "_sorts_by_length", lambda t: False)
    _, ours = make_pair(kind)
    if kind == "bert":
        ours.txt_enc.bert.config._attn_implementation = attn
    data = make_batch(5, 6, 13, 7, 57)
    with _HostSyncDetector() as det:
        img, cap = ours(*data)
        (img.sum() + cap.sum()).backward()
    assert det.calls == [], "host synchronisation in the forward or backward"


def test_bert_attention_implementations_agree():
    _, ours = make_pair("bert")
    ours.eval()
    data = make_batch(5, 6, 13, 7, 57)
    ours.txt_enc.bert.config._attn_implementation = "sdpa"
    sdpa = ours.encode_captions(*data[2:])
    ours.txt_enc.bert.config._attn_implementation = "eager"
    torch.testing.assert_close(ours.encode_captions(*data[2:]), sdpa, atol=1e-5, rtol=1e-5)


def test_gpo_backend_option_selects_the_pool_kernel(monkeypatch):
    """gpo_backend="triton" runs the Triton pool Function (interpreter on CPU) in both encoders,
    "torch" never does (nor the Triton coefficient table on CUDA: table_backend "torch"), and the
    two give the same embeddings and gradients."""
    from vse_fast.ops import gpo_pool as pool_ops

    launches = []
    triton_apply = pool_ops.TritonGPOPoolFunction.apply
    monkeypatch.setattr(pool_ops.TritonGPOPoolFunction, "apply",
                        lambda *args: launches.append(1) or triton_apply(*args))
    kw = dict(embed_size=6, img_dim=5, precomp_enc_type="backbone", text_encoder="gru", vocab_size=9, word_dim=4)
    ref = build_model(kw, gpo_backend="torch")
    tri = build_model(kw, gpo_backend="triton")
    tri.load_state_dict(ref.state_dict())
    assert ref.img_enc.gpool.table_backend == ref.txt_enc.gpool.table_backend == "torch"
    assert tri.img_enc.gpool.table_backend == tri.txt_enc.gpool.table_backend == "auto"
    assert build_model(kw).img_enc.gpool.table_backend == "auto"
    images, img_len = torch.randn(2, 3, 5), torch.tensor([3, 1])
    captions, cap_len = torch.randint(1, 9, (2, 4)), torch.tensor([4, 2])
    out = [m.encode_images(images, img_len) for m in (ref, tri)]
    assert len(launches) == 1  # the triton model's image encoder only
    caps = [m.encode_captions(captions, cap_len) for m in (ref, tri)]
    assert len(launches) == 2
    torch.testing.assert_close(out[1], out[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(caps[1], caps[0], atol=1e-5, rtol=1e-5)
    up = torch.randn_like(out[0])
    for o in out:
        o.backward(up)
    torch.testing.assert_close(tri.img_enc.fc.weight.grad, ref.img_enc.fc.weight.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(tri.img_enc.gpool.linear.weight.grad, ref.img_enc.gpool.linear.weight.grad,
                               atol=1e-5, rtol=1e-5)


@requires_cuda
@pytest.mark.parametrize("kind", ["gru", "bert"])
def test_cuda_parity_and_no_sync(kind, monkeypatch):
    """Eval-mode parity with the published model on CUDA (fp32, cuDNN without TF32), then a train-mode
    forward + backward of ours with no host synchronisation. (The parity check once came after that
    step, whose BatchNorm statistics updates only ours had: it could not pass.)"""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    pub, ours = make_pair(kind)
    pub, ours = pub.cuda(), ours.cuda()
    ours.img_enc.gpo_backend = ours.txt_enc.gpo_backend = "auto"  # Triton pool on CUDA
    data = [x.cuda() for x in make_batch(6, 7, 13, 9, 57)]
    pub.eval(), ours.eval()
    ref, out = run(pub, data), run(ours, data)
    torch.testing.assert_close(out[0], ref[0], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out[1], ref[1], atol=1e-4, rtol=1e-4)
    ours.train()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        img, cap = ours(*data)
        (img.sum() + cap.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_host_sync_detector_catches_value_reads():
    """The detector above is not blind: value reads and value-sized outputs of ordinary tensors are
    recorded, one call each; shape-only work is not."""
    x = torch.arange(4)
    reads = [lambda: torch.ones(3).sum().item(), lambda: int(x[2]), lambda: x.tolist(), lambda: x.numpy(),
             lambda: torch.nonzero(x), lambda: torch.unique(x), lambda: x[x > 1], lambda: x.masked_select(x > 1),
             lambda: torch.repeat_interleave(x)]
    for read in reads:
        with _HostSyncDetector() as det:
            read()
        assert len(det.calls) >= 1, inspect.getsource(read)
    with _HostSyncDetector() as det:
        (x * 2).sum(), x[1:3], x.view(2, 2).t(), torch.where(x > 1, x, 0)
    assert det.calls == []
