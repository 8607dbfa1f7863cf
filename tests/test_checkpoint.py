"""Checkpoints: atomic save, weights_only loading only, full training-state round trip, RNG states,
and published-format checkpoints (BERT and BiGRU, "module." prefixes, transformers-4 buffers)."""
import argparse
import os
import random
import stat

import numpy as np
import pytest
import torch

from tests.published.model import build_published, published_checkpoint, published_opt
from vse_fast.checkpoint import (FORMAT, CheckpointError, capture_rng_state, load_any_checkpoint, load_checkpoint,
                                 load_model_checkpoint, load_published_checkpoint, restore_rng_state,
                                 save_checkpoint, strip_prefixes, to_published_state)
from vse_fast.model import build_model

transformers = pytest.importorskip("transformers")

TINY_BERT = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                 intermediate_size=37, max_position_embeddings=64)


class NotAllowed:
    """A class a checkpoint must never be able to instantiate."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


def batch(b=4, k=5, d=13, t=6, vocab=57):
    img_len = torch.randint(1, k + 1, (b,))
    cap_len = torch.randint(1, t + 1, (b,))
    img_len[0], cap_len[0] = k, t
    images = torch.randn(b, k, d) * (torch.arange(k)[None, :, None] < img_len[:, None, None])
    captions = torch.randint(1, vocab, (b, t)) * (torch.arange(t)[None] < cap_len[:, None])
    return images, img_len, captions, cap_len


def gru_model():
    return build_model(dict(embed_size=16, img_dim=13, text_encoder="gru", vocab_size=57, word_dim=7),
                       gpo_backend="torch")


def test_training_state_round_trip(tmp_path):
    model = gru_model()
    opt = torch.optim.AdamW(model.param_groups(1e-3), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", enabled=True)
    img, cap = model(*batch())
    (img @ cap.T).sum().backward()
    opt.step()
    state = {"format": FORMAT, "model": model.state_dict(), "optimizer": opt.state_dict(),
             "scaler": scaler.state_dict(), "epoch": 3, "step": 41, "best_rsum": 123.4,
             "rng": capture_rng_state(), "config": {"model": model.opt, "margin": 0.2, "run_dir": "runs/x"}}
    path = tmp_path / "run" / "last.pth"  # parent created
    save_checkpoint(str(path), state)
    loaded = load_checkpoint(str(path))
    assert loaded["epoch"] == 3 and loaded["step"] == 41 and loaded["best_rsum"] == 123.4
    assert loaded["config"] == state["config"]
    for k, v in state["model"].items():
        assert torch.equal(loaded["model"][k], v), k
    opt2 = torch.optim.AdamW(gru_model().param_groups(1e-3), lr=1e-3)
    opt2.load_state_dict(loaded["optimizer"])
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert s1.keys() == s2.keys()
    assert all(torch.equal(s1[i]["exp_avg"], s2[i]["exp_avg"]) for i in s1)
    assert loaded["scaler"] == scaler.state_dict()
    # the model rebuilt from the checkpoint alone gives the same embeddings
    rebuilt, _ = load_model_checkpoint(str(path))
    model.eval()
    data = batch()
    for a, b in zip(model(*data), rebuilt(*data)):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert sorted(os.listdir(path.parent)) == ["last.pth"]  # no temporary left behind


def test_rng_state_round_trip(tmp_path):
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # has_gauss / cached draws
    save_checkpoint(str(tmp_path / "rng.pth"), {"rng": capture_rng_state()})
    expected = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    for _ in range(5):
        random.random(), np.random.randn(), torch.rand(2)  # move every stream on
    restore_rng_state(load_checkpoint(str(tmp_path / "rng.pth"))["rng"])
    got = (random.random(), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert got[:3] == expected[:3]
    assert torch.equal(got[3], expected[3])


def test_cuda_rng_state_is_the_used_devices_and_older_lists_restore_by_index(monkeypatch):
    """The CUDA state saved is the one of the device the process uses (restored to it, whatever the
    number of visible GPUs); an older checkpoint's list of every visible device's state restores this
    device's entry, and warns when resumed with fewer visible GPUs than it has an index for. (CUDA
    simulated: this machine has none.)"""
    states = {i: torch.full((4,), i, dtype=torch.uint8) for i in range(3)}
    restored = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda index: states[index].clone())
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state, index: restored.__setitem__(index, state))
    assert torch.equal(capture_rng_state("cuda:2")["cuda"], states[2])
    assert torch.equal(capture_rng_state()["cuda"], states[0])
    assert "cuda" not in capture_rng_state("cpu")
    restore_rng_state(capture_rng_state("cuda:1"), "cuda:1")
    assert list(restored) == [1] and torch.equal(restored.pop(1), states[1])
    older = dict(capture_rng_state("cpu"), cuda=[states[0], states[1]])  # get_rng_state_all of 2 GPUs
    restore_rng_state(older, "cuda:1")
    assert list(restored) == [1] and torch.equal(restored.pop(1), states[1])
    with pytest.warns(UserWarning, match="CUDA RNG states of 2 device"):
        restore_rng_state(older, "cuda:2")
    restore_rng_state(older, "cpu")
    assert restored == {}


def test_save_is_atomic(tmp_path, monkeypatch):
    path = str(tmp_path / "ckpt.pth")
    save_checkpoint(path, {"step": 1})
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        real_save({"partial": torch.zeros(1000)}, f)  # bytes written, then the crash
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["ckpt.pth"]
    with pytest.raises(TypeError, match="dict"):
        save_checkpoint(path, [1, 2])


def test_a_saved_checkpoint_is_synced_before_its_rename_and_its_directory_after(tmp_path, monkeypatch):
    """As for copies: the file's bytes reach the disk before it is renamed into place, and the rename
    (the directory) after it; without either, a crash could leave an empty or missing checkpoint."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("directory" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        return real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", lambda src, dst: events.append("replace") or real_replace(src, dst))
    save_checkpoint(str(tmp_path / "ckpt.pth"), {"step": 1})
    assert events == ["file", "replace", "directory"]


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask022", "umask027"])
def test_saved_file_has_the_mode_of_a_plain_open(tmp_path, umask):
    old = os.umask(umask)
    try:
        save_checkpoint(str(tmp_path / "ckpt.pth"), {"step": 1})
        with open(tmp_path / "plain.pth", "wb"):
            pass
    finally:
        os.umask(old)
    mode = stat.S_IMODE(os.stat(tmp_path / "ckpt.pth").st_mode)
    assert mode == stat.S_IMODE(os.stat(tmp_path / "plain.pth").st_mode) == 0o666 & ~umask


def test_loading_is_weights_only(tmp_path, monkeypatch):
    path = str(tmp_path / "evil.pth")
    torch.save({"model": {}, "payload": NotAllowed()}, path)
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(CheckpointError, match="posix.system|os.system|nt.system"):
        load_checkpoint(path)
    assert calls == [True]
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        load_checkpoint(str(tmp_path / "missing.pth"))
    (tmp_path / "folder.pth").mkdir()
    with pytest.raises(FileNotFoundError, match="folder.pth' does not exist or is not a file"):
        load_checkpoint(str(tmp_path / "folder.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth"):
        load_checkpoint(str(tmp_path / "junk.pth"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")
@pytest.mark.parametrize("kind", ["text", "npy", "plain-pickle", "random-bytes"])
def test_a_file_that_is_no_checkpoint_is_named_as_such(tmp_path, kind):
    """Passing the wrong file (captions, a feature array, a plain pickle, garbage) gives CheckpointError
    saying it is no readable checkpoint, with the unpickler's own reason, not a traceback or a warning
    that it is unsafe."""
    path = tmp_path / f"{kind}.pth"
    if kind == "text":
        path.write_text("a dog on a sofa\ntwo men riding horses\n")
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), np.zeros((2, 3), np.float32))
        path.with_suffix(".npy").rename(path)
    elif kind == "plain-pickle":
        import pickle
        path.write_bytes(pickle.dumps({"model": 1}, protocol=4))
    else:
        path.write_bytes(np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match=f"{kind}.pth' is not a readable torch checkpoint") as exc:
        load_checkpoint(str(path))
    assert "safely" not in str(exc.value) and "Check the documentation" not in str(exc.value)


def test_namespace_and_numpy_scalars_load_safely(tmp_path):
    path = str(tmp_path / "p.pth")
    opt = argparse.Namespace(embed_size=8, data_name="coco_precomp", lr=2e-4, flags=[1, 2])
    torch.save({"opt": opt, "best_rsum": np.float64(412.25), "Eiters": np.int64(7)}, path)
    loaded = load_checkpoint(path)
    assert loaded["opt"] == opt
    assert loaded["best_rsum"] == 412.25 and type(loaded["best_rsum"]) is float
    assert loaded["Eiters"] == 7
    torch.save({"bad": np.array(["x"], dtype=object)[0:1]}, path)  # object arrays stay refused
    with pytest.raises(CheckpointError):
        load_checkpoint(path)
    scalars = {"f2": np.float16(1.5), "be": np.array(3, dtype=">i4")[()], "b": np.bool_(True),
               "u": np.uint64(2**63 + 1), "i1": np.int8(-5), "f4": np.float32(0.25)}
    torch.save(scalars, path)
    assert load_checkpoint(path) == {k: v.item() for k, v in scalars.items()}
    dtypes = {"plain": np.dtype("float32"), "nested": [argparse.Namespace(dt=np.dtype(">i8"))]}
    torch.save(dtypes, path)  # a bare dtype comes back as numpy's, not as the loader's stand-in
    loaded = load_checkpoint(path)
    assert loaded["plain"] == np.dtype("float32") and loaded["nested"][0].dt == np.dtype(">i8")
    assert isinstance(loaded["plain"], np.dtype)


class _ObjectDtype:  # pickles as numpy.dtype('O', False, True)
    def __reduce__(self):
        return np.dtype, ("O", False, True)


class _FloatHoldingObjects:  # numpy.dtype('f8') whose pickled state gives it an object subarray
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", (_ObjectDtype(), (1,)), None, None, -1, -1, 0)


_NUMPY_SCALAR = np.float64(1.0).__reduce__()[0]  # what numpy pickles a scalar with (numpy.core or numpy._core)


class _ScalarOfAddress:  # a numpy scalar of that dtype: 8 bytes read as a PyObject pointer
    def __init__(self, dtype):
        self.dtype = dtype

    def __reduce__(self):
        return _NUMPY_SCALAR, (self.dtype, id(self).to_bytes(8, "little"))


class _ByteOrderNotText:  # numpy.dtype('f8') with a byte order that is no string
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, 7, None, None, None, -1, -1, 0)


@pytest.mark.parametrize("dtype", [_FloatHoldingObjects(), _ObjectDtype(), _ByteOrderNotText()],
                         ids=["float-state", "object", "byte-order"])
def test_numpy_dtypes_that_would_read_bytes_as_objects_are_refused(tmp_path, dtype):
    """The allow-listed numpy dtype and scalar rebuild once took a float dtype whose state held an object
    subarray, then read checkpoint bytes as an object address (an object of the loading process, or a
    segfault). Only numeric type codes with a plain byte-order state are rebuilt now."""
    path = str(tmp_path / "evil.pth")
    evil = _ScalarOfAddress(dtype)  # kept alive: the address in the file stays valid
    torch.save({"best_rsum": evil}, path)
    with pytest.raises(CheckpointError, match="cannot be loaded safely .*refusing"):
        load_checkpoint(path)


class _ScalarWithExtraBytes:  # a numpy float64 scalar given 16 bytes
    def __reduce__(self):
        return _NUMPY_SCALAR, (np.dtype("f8"), np.float64(1.5).tobytes() + bytes(8))


class _FloatWithSubarray:  # numpy.dtype('f8') whose pickled state gives it a numeric (f4, (2,)) subarray
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", (np.dtype("f4"), (2,)), None, None, -1, -1, 0)


class _FloatWithFields:  # numpy.dtype('f8') whose pickled state gives it a field
    def __reduce__(self):
        return np.dtype, ("f8", False, True), (3, "|", None, ("x",), {"x": (np.dtype("f8"), 0)}, 8, 1, 16)


@pytest.mark.parametrize("value,match", [
    (_ScalarWithExtraBytes(), "numpy scalar of dtype float64 needs 8 bytes, got 16"),
    (_FloatWithSubarray(), "refusing numpy dtype state"),
    (_FloatWithFields(), "refusing numpy dtype state"),
], ids=["scalar-extra-bytes", "dtype-subarray", "dtype-fields"])
def test_numpy_pickles_the_loader_would_not_rebuild_as_saved_are_refused(tmp_path, value, match):
    """Numeric, so no other check refuses them: a scalar with more bytes than its dtype came back as
    its first 8 bytes, and a dtype with a subarray or fields as a plain f8, silently."""
    path = str(tmp_path / "odd.pth")
    torch.save({"value": value}, path)
    with pytest.raises(CheckpointError, match="odd.pth") as exc:
        load_checkpoint(path)
    assert match in str(exc.value)


@pytest.mark.parametrize("case", ["no-model", "model-list", "non-tensor", "prefix-collision", "wrong-shape"])
def test_malformed_checkpoint_names_the_file(tmp_path, case):
    model = gru_model()
    weights = model.state_dict()
    key = next(iter(weights))
    state = {"format": FORMAT, "config": {"model": model.opt}, "model": weights}
    if case == "no-model":
        del state["model"]
    elif case == "model-list":
        state["model"] = [weights]
    elif case == "non-tensor":
        state["model"] = {**weights, key: 3}
    elif case == "prefix-collision":
        state["model"] = {**weights, "module." + key: torch.zeros_like(weights[key])}
    else:  # load_state_dict's own RuntimeError did not name the file
        state["model"] = {**weights, key: torch.zeros(weights[key].shape[0] + 1, *weights[key].shape[1:])}
    path = str(tmp_path / "bad.pth")
    torch.save(state, path)
    match = {"no-model": "has no 'model' state dict", "model-list": "'model' must be a state dict, got list",
             "non-tensor": f"'model' entry '{key}' is int, not a tensor",
             "prefix-collision": f"keys '{key}' and 'module.{key}' both become '{key}'",
             "wrong-shape": f"shape mismatch (key, checkpoint, model) [('{key}', "}[case]
    with pytest.raises(CheckpointError, match="bad.pth") as exc:
        load_model_checkpoint(path)
    assert match in str(exc.value)


def test_strip_prefixes_refuses_colliding_keys():
    value = torch.zeros(1)
    assert strip_prefixes({"module._orig_mod.a": value, "b": value}) == {"a": value, "b": value}
    # a compiled submodule (model.txt_enc.bert = torch.compile(...)): its key did not load
    assert strip_prefixes({"txt_enc.bert._orig_mod.w": value}) == {"txt_enc.bert.w": value}
    with pytest.raises(CheckpointError, match="keys 'a' and '_orig_mod.module.a' both become 'a'"):
        strip_prefixes({"a": value, "_orig_mod.module.a": value})


def _published_bert(tmp_path, precomp="basic"):
    bert = transformers.BertModel(transformers.BertConfig(**TINY_BERT))
    bert.save_pretrained(tmp_path / "bert")
    pub = build_published(16, 13, precomp, bert=bert)
    pub.train()
    for _ in range(2):  # non-trivial BatchNorm statistics and a changed BERT
        pub(*batch(8, vocab=101))
    with torch.no_grad():
        for p in pub.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    return pub.eval()


@pytest.mark.parametrize("data_parallel", [False, True], ids=["plain", "module-prefix"])
@pytest.mark.parametrize("bert_source", ["text_model", "bert_config", "inferred-shape-error"])
def test_published_bert_checkpoint(tmp_path, data_parallel, bert_source):
    pub = _published_bert(tmp_path)
    state = published_checkpoint(pub, published_opt(embed_size=16, img_dim=13, vocab_size=101),
                                 data_parallel=data_parallel)
    prefix = "module." if data_parallel else ""
    state["model"][1][prefix + "bert.embeddings.position_ids"] = torch.arange(64)[None]  # transformers 4 buffer
    path = str(tmp_path / "model_best.pth")
    torch.save(state, path)
    if bert_source == "inferred-shape-error":  # hidden 32 is not bert-base: the config must be given
        with pytest.raises(CheckpointError, match="text_model"):
            load_published_checkpoint(path)
        return
    kwargs = ({"text_model": str(tmp_path / "bert")} if bert_source == "text_model"
              else {"bert_config": str(tmp_path / "bert" / "config.json")})
    model, info = load_published_checkpoint(path, **kwargs)
    assert not model.training
    assert info["epoch"] == 3 and info["Eiters"] == 1234 and info["data_name"] == "coco_precomp"
    assert info["text_encoder"] == "bert" and info["precomp_enc_type"] == "basic"
    data = batch(5, vocab=101)
    for ours, ref in zip(model(*data), pub(*data)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # fine-tuning from it: train mode, gradients reach the loaded weights
    model.train()
    img, cap = model(*data)
    (img @ cap.T).diagonal().sum().backward()
    assert model.txt_enc.bert.embeddings.word_embeddings.weight.grad is not None
    assert model.img_enc.fc.weight.grad.abs().sum() > 0


def test_published_bert_base_shape_inferred(tmp_path, monkeypatch):
    """Without a BERT directory a bert-base-shaped config (hidden 768, 12 heads) is inferred."""
    cfg = transformers.BertConfig(vocab_size=50, hidden_size=768, num_hidden_layers=1, num_attention_heads=12,
                                  intermediate_size=40, max_position_embeddings=16)
    pub = build_published(8, 13, "basic", bert=transformers.BertModel(cfg)).eval()
    path = str(tmp_path / "base.pth")
    torch.save(published_checkpoint(pub, published_opt(embed_size=8, img_dim=13)), path)
    model, _ = load_published_checkpoint(path)
    assert model.txt_enc.bert.config.num_attention_heads == 12
    data = batch(3, vocab=50, t=5)
    for ours, ref in zip(model(*data), pub(*data)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    for missing in ("bert.embeddings.position_embeddings.weight", "bert.encoder.layer.0.intermediate.dense.weight"):
        state = published_checkpoint(pub, published_opt(embed_size=8, img_dim=13))
        del state["model"][1][missing]
        torch.save(state, path)
        with pytest.raises(CheckpointError, match=f"weights lack \\['{missing}'\\], which its size is read from"):
            load_published_checkpoint(path)  # a KeyError before


@pytest.mark.parametrize("precomp", ["basic", "backbone"])
def test_published_gru_checkpoint(tmp_path, precomp):
    pub = build_published(16, 13, precomp, vocab_size=57, word_dim=7, num_layers=2).eval()
    opt = published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7, precomp_enc_type=precomp)
    path = str(tmp_path / "gru.pth")
    torch.save(published_checkpoint(pub, opt), path)
    model, info = load_any_checkpoint(path)  # format detected
    assert info["text_encoder"] == "gru" and info["num_layers"] == 2 and info["use_bi_gru"] is True
    data = batch()
    for ours, ref in zip(model(*data), pub(*data)):
        torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    pair = to_published_state(model)
    pub2 = build_published(16, 13, precomp, vocab_size=57, word_dim=7, num_layers=2).eval()
    pub2.img_enc.load_state_dict(pair[0], strict=True)
    pub2.txt_enc.load_state_dict(pair[1], strict=True)


def test_published_end_to_end_backbone_checkpoint(tmp_path):
    """precomp_enc_type='backbone' checkpoints hold backbone.* + image_encoder.*: the fc/GPO part loads."""
    pub = build_published(16, 13, "backbone", vocab_size=57, word_dim=7).eval()
    img_sd = {"image_encoder." + k: v for k, v in pub.img_enc.state_dict().items()}
    img_sd["backbone.base.conv1.weight"] = torch.zeros(2, 3, 1, 1)
    state = {"model": [img_sd, pub.txt_enc.state_dict()], "opt": published_opt(
        embed_size=16, img_dim=13, vocab_size=57, word_dim=7, precomp_enc_type="backbone")}
    path = str(tmp_path / "e2e.pth")
    torch.save(state, path)
    with pytest.warns(UserWarning, match="backbone"):
        model, _ = load_published_checkpoint(path)
    data = batch()
    torch.testing.assert_close(model.encode_images(*data[:2]), pub.img_enc(*data[:2]), atol=1e-5, rtol=1e-5)


def test_published_checkpoint_errors(tmp_path):
    pub = build_published(16, 13, vocab_size=57, word_dim=7).eval()
    path = str(tmp_path / "x.pth")
    torch.save(published_checkpoint(pub, published_opt(embed_size=32, img_dim=13, vocab_size=57)), path)
    with pytest.raises(CheckpointError, match="embed_size=32 but the weights say 16"):
        load_published_checkpoint(path)
    bad = published_checkpoint(pub, published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7))
    del bad["model"][0]["gpool.linear.weight"]
    torch.save(bad, path)
    with pytest.raises(CheckpointError, match="missing keys.*gpool.linear.weight"):
        load_published_checkpoint(path)
    torch.save({"format": FORMAT, "model": {}}, path)
    with pytest.raises(CheckpointError, match="not a published"):
        load_published_checkpoint(path)
    torch.save({"model": {}}, path)
    with pytest.raises(CheckpointError, match="not a vse_fast/1 checkpoint"):
        load_model_checkpoint(path)


@pytest.mark.parametrize("opt,match", [
    ([1, 2], "'opt' must be an argparse.Namespace or a dict, got list"),
    ("hello", "'opt' must be an argparse.Namespace or a dict, got str"),
    (dict(no_imgnorm="False"), "opt.no_imgnorm must be True or False, got 'False'"),
    (dict(no_txtnorm=2), "opt.no_txtnorm must be True or False, got 2"),
], ids=["list", "str", "flag-string", "flag-int"])
def test_published_opt_errors_name_the_file(tmp_path, opt, match):
    pub = build_published(16, 13, vocab_size=57, word_dim=7).eval()
    if isinstance(opt, dict):
        opt = published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7, **opt)
    path = str(tmp_path / "x.pth")
    torch.save(published_checkpoint(pub, opt), path)
    with pytest.raises(CheckpointError, match="x.pth") as exc:
        load_published_checkpoint(path)
    assert match in str(exc.value)


@pytest.mark.parametrize("value,expected", [(True, True), (False, False), (1, True), (0, False), (None, False)])
def test_published_opt_flags(tmp_path, value, expected):
    pub = build_published(16, 13, vocab_size=57, word_dim=7).eval()
    opt = published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7, no_imgnorm=value, no_txtnorm=value)
    path = str(tmp_path / "x.pth")
    torch.save(published_checkpoint(pub, opt), path)
    model, _ = load_published_checkpoint(path)
    assert model.opt["no_imgnorm"] is expected and model.opt["no_txtnorm"] is expected


def test_published_state_dict_entries_are_checked(tmp_path):
    pub = build_published(16, 13, vocab_size=57, word_dim=7).eval()
    state = published_checkpoint(pub, published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7),
                                 data_parallel=True)
    state["model"][1]["module.embed.weight"] = "weights"
    path = str(tmp_path / "x.pth")
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"x.pth.*'model'\[1\] entry 'module.embed.weight' is str, not a tensor"):
        load_published_checkpoint(path)
    state["model"][1]["module.embed.weight"] = pub.txt_enc.state_dict()["embed.weight"]
    state["model"][1]["embed.weight"] = state["model"][1]["module.embed.weight"]
    torch.save(state, path)
    with pytest.raises(CheckpointError, match="both become 'embed.weight'"):
        load_published_checkpoint(path)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_every_truncation_of_a_legacy_format_checkpoint_is_named(tmp_path):
    """The legacy (non-zip) format's unpickler raises struct.error, AssertionError or LookupError on some
    truncations and flipped bytes: they escaped as raw tracebacks that do not name the file."""
    good = tmp_path / "legacy.pth"
    torch.save({"model": {"w": torch.arange(6.0)}, "epoch": 3}, good, _use_new_zipfile_serialization=False)
    raw = good.read_bytes()
    bad = tmp_path / "bad.pth"
    for cut in range(1, len(raw)):
        bad.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="bad.pth"):
            load_checkpoint(str(bad))


def test_published_opt_that_disagrees_with_the_weights_structure_is_named(tmp_path):
    """opt says region features (an MLP) or two GRU layers, but the weights hold none, or one: it loaded
    as a smaller model, silently."""
    pub = build_published(16, 13, vocab_size=57, word_dim=7).eval()
    ckpt = published_checkpoint(pub, published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7))
    ckpt["model"][0] = {k: v for k, v in ckpt["model"][0].items() if not k.startswith("mlp.")}
    path = str(tmp_path / "x.pth")
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=r"x.pth.*opt.precomp_enc_type='basic' but the image encoder's "
                                              r"weights lack the region MLP"):
        load_published_checkpoint(path)
    ckpt = published_checkpoint(pub, published_opt(embed_size=16, img_dim=13, vocab_size=57, word_dim=7,
                                                   num_layers=2))
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="opt.num_layers=2 but the weights say 1"):
        load_published_checkpoint(path)


def test_a_copied_checkpoint_is_written_durably(tmp_path, monkeypatch):
    """A resumed run's best.pth copied into its new directory was renamed into place unsynced: a crash
    could leave an empty best.pth. It is written as save_checkpoint writes."""
    from vse_fast import checkpoint

    source = tmp_path / "best.pth"
    save_checkpoint(str(source), {"format": FORMAT, "epoch": 1})
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd) or real_fsync(fd))
    checkpoint.copy_checkpoint(str(source), str(tmp_path / "c.pth"))
    assert (tmp_path / "c.pth").read_bytes() == source.read_bytes()
    assert len(synced) == 2  # the file before its rename, then the directory
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pth", "c.pth"]  # no temporary file left


def test_an_unknown_model_option_override_is_an_error(tmp_path):
    model = build_model(dict(embed_size=8, img_dim=5, text_encoder="gru", vocab_size=11, word_dim=4),
                        gpo_backend="torch")
    path = str(tmp_path / "m.pth")
    save_checkpoint(path, {"format": FORMAT, "model": model.state_dict(), "config": {"model": model.opt}})
    with pytest.raises(TypeError, match=r"unknown model option\(s\) \['gpo_backnd'\]"):
        load_model_checkpoint(path, gpo_backnd="torch")
    assert load_model_checkpoint(path, no_txtnorm=True)[0].opt["no_txtnorm"] is True
