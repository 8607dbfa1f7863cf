"""The drop-in promise, end to end: the published VSE∞ model (region MLP image encoder; BiGRU or
BERT text encoder) and training step (tests/published), with our GPO in both encoders and our
ContrastiveLoss in place of the published modules, trains to the same numbers as the published
modules, step for step: VSE0 warm-up steps, then VSE++, with the published AdamW and grad-norm clip 2."""
import copy

import pytest
import torch
from torch.nn.utils import clip_grad_norm_

from tests.published.gpo import PublishedGPO
from tests.published.loss import PublishedContrastiveLoss
from tests.published.model import build_published, published_opt
from vse_fast import GPO, ContrastiveLoss

B, K, IMG_DIM, EMBED, VOCAB, T = 12, 7, 20, 16, 30, 9
WARMUP_STEPS, STEPS = 3, 6


def swap_in_ours(model):
    """Replace both published GPO modules by ours, loading their state dicts strictly."""
    for encoder in (model.img_enc, model.txt_enc):
        assert isinstance(encoder.gpool, PublishedGPO)
        ours = GPO(32, 32)
        ours.load_state_dict(encoder.gpool.state_dict(), strict=True)
        encoder.gpool = ours
    return model


def batches(seed):
    """Published collate: region sets zero-padded with float lengths, captions padded with 0."""
    gen = torch.Generator().manual_seed(seed)
    for _ in range(STEPS):
        img_lengths = torch.randint(1, K + 1, (B,), generator=gen)
        images = torch.randn(B, K, IMG_DIM, generator=gen)
        images[torch.arange(K) >= img_lengths[:, None]] = 0
        cap_lengths = torch.randint(3, T + 1, (B,), generator=gen)
        captions = torch.randint(1, VOCAB, (B, T), generator=gen)
        captions[torch.arange(T) >= cap_lengths[:, None]] = 0
        yield images, img_lengths.float(), captions, cap_lengths


def published_optimizer(model, lr=5e-4):
    """Published VSEModel: the BiGRU branch's AdamW (torch defaults); the BERT branch's groups (text,
    BERT at 0.1x lr, image) with weight decay 1e-4."""
    bert = getattr(model.txt_enc, "bert", None)
    if bert is None:
        return torch.optim.AdamW(list(model.txt_enc.parameters()) + list(model.img_enc.parameters()), lr=lr)
    bert_ids = {id(p) for p in bert.parameters()}
    text = [p for p in model.txt_enc.parameters() if id(p) not in bert_ids]
    return torch.optim.AdamW([{"params": text, "lr": lr}, {"params": list(bert.parameters()), "lr": lr * 0.1},
                              {"params": list(model.img_enc.parameters()), "lr": lr}], lr=lr, weight_decay=1e-4)


def train(model, criterion, seed):
    """Published VSEModel.train_emb: its AdamW, clip 2 over all parameters; VSE0 for the warm-up
    steps, then max_violation_on(). Returns the per-step losses."""
    params = list(model.txt_enc.parameters()) + list(model.img_enc.parameters())
    optimizer = published_optimizer(model)
    losses = []
    for step, (images, img_lengths, captions, cap_lengths) in enumerate(batches(seed)):
        if step == WARMUP_STEPS:
            criterion.max_violation_on()
        img_emb, cap_emb = model(images, img_lengths, captions, cap_lengths)
        optimizer.zero_grad()
        loss = criterion(img_emb, cap_emb)
        loss.backward()
        clip_grad_norm_(params, 2.0)
        optimizer.step()
        losses.append(loss.item())
    return losses


# Parameters whose exact gradient is 0, so both runs see only rounding noise there, which AdamW
# scales to steps of arbitrary sign: the MLP's first bias (a BatchNorm follows it; the BatchNorm's
# running mean follows that bias) and BERT's attention key bias (it adds the same q.b to every key
# of a query, which the softmax cancels). They are compared by shape only.
ZERO_GRADIENT = ("img_enc.mlp.layers.0.bias", "img_enc.mlp.bns.0.running_mean",
                 "txt_enc.bert.encoder.layer.0.attention.self.key.bias")


@pytest.mark.parametrize("text", ["gru", "bert"])
def test_published_training_with_our_gpo_and_loss_gives_the_same_numbers(capsys, text):
    """fp32 (the published GPO builds its positional table in float32, so float64 is not an option):
    losses within 1e-5 and parameters within 1e-4 relative after 6 steps (measured: 2e-7 and 8e-6)."""
    torch.manual_seed(0)
    if text == "gru":
        published = build_published(EMBED, IMG_DIM, vocab_size=VOCAB, word_dim=8)
    else:
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         intermediate_size=24, max_position_embeddings=T, hidden_dropout_prob=0.0,
                                         attention_probs_dropout_prob=0.0)  # no dropout: no random draws to align
        published = build_published(EMBED, IMG_DIM, bert=transformers.BertModel(config))
    ours = swap_in_ours(copy.deepcopy(published))
    opt = published_opt(margin=0.2, max_violation=False)
    published_losses = train(published, PublishedContrastiveLoss(opt=opt, margin=opt.margin,
                                                                 max_violation=opt.max_violation), seed=1)
    our_losses = train(ours, ContrastiveLoss(opt=opt, margin=opt.margin, max_violation=opt.max_violation), seed=1)
    assert capsys.readouterr().out.count("Use VSE++ objective.") == 2  # the published switch message, both
    assert our_losses == pytest.approx(published_losses, rel=1e-5)
    assert published_losses[-1] < published_losses[0]
    reference = published.state_dict()
    assert ours.state_dict().keys() == reference.keys()
    for name, value in ours.state_dict().items():
        if name in ZERO_GRADIENT:
            assert value.shape == reference[name].shape
        elif value.is_floating_point():
            scale = reference[name].abs().max().clamp(min=1e-12)
            assert ((value - reference[name]).abs().max() / scale).item() < 1e-4, name
        else:
            assert torch.equal(value, reference[name]), name
