"""``--compile`` / ``VSEModel.compile_text_backbone``: BERT under torch.compile trains like eager (CPU).

The inductor case compiles C++ kernels for a 1-layer BERT (about a minute on two cores, once per
test session); the rest use the "aot_eager" backend, which traces the same graphs without codegen.
"""
import os

import pytest
import torch
import torch._dynamo

from tests.tiny_data import tiny_synthetic, write_tiny_bert_config
from vse_fast import train
from vse_fast.checkpoint import load_checkpoint
from vse_fast.distributed import DistContext
from vse_fast.model import build_model

pytestmark = pytest.mark.usefixtures("cpu_runs")  # training and evaluation on the CPU, GPU or not


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Each test compiles from scratch and counts its own graphs (dynamo caches per code object)."""
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    yield
    torch._dynamo.reset()


def _graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def _bert_model(seed=0, dropout=0.0):
    import transformers

    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64,
                                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return build_model(dict(embed_size=16, img_dim=12, bert_config_dict=config.to_dict()))


def _batch(seed, b=6, k=5, t=9):
    g = torch.Generator().manual_seed(seed)
    cap_lengths = torch.randint(2, t + 1, (b,), generator=g)
    captions = torch.randint(5, 50, (b, t), generator=g) * (torch.arange(t) < cap_lengths[:, None])
    return dict(images=torch.randn(b, k, 12, generator=g), img_lengths=torch.randint(1, k + 1, (b,), generator=g),
                captions=captions, cap_lengths=cap_lengths)


def _steps(model, batches):
    optimizer = train.build_optimizer(model, dict(learning_rate=1e-3, bert_lr_factor=1.0, weight_decay=1e-4))
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    losses, graphs = [], []
    for batch in batches:
        loss, _, _ = train.train_step(model, batch, optimizer, scaler, DistContext(), margin=0.2, max_violation=False,
                                   grad_clip=2.0)
        losses.append(float(loss.detach()))
        graphs.append(_graphs())
    return losses, graphs


def test_compiled_bert_trains_like_eager_over_varying_caption_lengths():
    """Three optimizer steps with captions of 9, 4 and 13 tokens (dynamic shapes, no recompile per
    length), dropout on: same losses and weights as eager. State-dict names are unchanged."""
    eager, compiled = _bert_model(dropout=0.1), _bert_model(dropout=0.1)
    compiled.compile_text_backbone(backend="aot_eager")
    assert list(compiled.state_dict()) == list(eager.state_dict())
    batches = [_batch(1), _batch(2, t=4), _batch(3, t=13)]
    torch.manual_seed(7)
    losses_eager, _ = _steps(eager, batches)
    torch.manual_seed(7)
    losses_compiled, graphs = _steps(compiled, batches)
    assert graphs[0] >= 1 and graphs[1] == graphs[2] == graphs[0]  # compiled once, not per caption length
    torch.testing.assert_close(losses_compiled, losses_eager, rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(eager.state_dict().items(), compiled.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # eval mode, no grad: a second graph, same embeddings as eager
        eager.eval(), compiled.eval()
        torch.testing.assert_close(compiled(**_batch(4)), eager(**_batch(4)), rtol=1e-5, atol=1e-6)


def test_compile_needs_bert():
    model = build_model(dict(embed_size=16, img_dim=8, text_encoder="gru", vocab_size=20, word_dim=8))
    with pytest.raises(ValueError, match="has no BERT"):
        model.compile_text_backbone()


def test_cli_compile_with_the_gru_encoder_is_an_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        train.main(["--text_encoder", "gru", "--compile", "--run_dir", str(tmp_path / "r")])
    assert exc.value.code == 2
    assert "--compile compiles the BERT text encoder" in capsys.readouterr().err


def test_cli_compile_trains_with_inductor_like_eager(tmp_path):
    """``python -m vse_fast.train --compile`` with the default backend (inductor C++ kernels on CPU):
    with inductor's RNG set to eager's (fallback_random) the run matches the eager run closely; its
    checkpoint has the eager run's keys; a resumed run does not inherit --compile."""
    data, vocab_size = tiny_synthetic(tmp_path / "data", seed=1)
    bert_config = write_tiny_bert_config(tmp_path / "bert.json", vocab_size)
    args = ["--data_path", data, "--bert_config", bert_config, "--vocab_file", os.path.join(data, "vocab.txt"),
            "--embed_size", "32", "--batch_size", "40", "--num_epochs", "1", "--workers", "0", "--max_steps", "3",
            "--progress", "off"]
    import torch._inductor.config as inductor_config

    with inductor_config.patch(fallback_random=True):
        compiled = train.main(args + ["--run_dir", str(tmp_path / "c"), "--compile"])
    assert _graphs() >= 1  # BERT was compiled, not silently run eager
    eager = train.main(args + ["--run_dir", str(tmp_path / "e")])
    assert compiled["step"] == eager["step"] == 3
    a, b = load_checkpoint(tmp_path / "e" / "last.pth"), load_checkpoint(tmp_path / "c" / "last.pth")
    assert b["config"]["compile"] is True and a["model"].keys() == b["model"].keys()
    # Exactly zero gradient, so Adam moves them by normalised rounding noise in either run: the bias
    # feeding BatchNorm (and the running mean that carries it) and attention's key bias (softmax is
    # shift-invariant). Every other weight and statistic agrees to float32 rounding, amplified by Adam
    # where a gradient element is tiny: atol 2e-5 is 4% of one step at lr 5e-4.
    noise_only = ("img_enc.mlp.layers.0.bias", "img_enc.mlp.bns.0.running_mean", "attention.self.key.bias")
    for key in a["model"]:
        if not key.endswith(noise_only):
            torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=2e-5,
                                       msg=lambda m, key=key: f"{key}: {m}")
    parser = train.build_parser()
    assert train.resolve_config(parser.parse_args([]), parser, b["config"])["compile"] is False
