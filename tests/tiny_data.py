"""Tiny training inputs shared by the train and distributed tests."""
import json
import os


def write_tiny_bert_config(path, vocab_size=40, dropout=0.1) -> str:
    """A 1-layer, 32-wide BertConfig json at `path` (random init; `dropout` for hidden and attention)."""
    cfg = dict(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=dropout,
               attention_probs_dropout_prob=dropout, model_type="bert")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return str(path)


def random_batch(n, generator, max_set=5, max_caption=7, img_dim=16):
    """A collated batch of n random pairs (zero-padded, lengths >= 1 / >= 3, token ids 5..39):
    images (n, max_set, img_dim), img_lengths, captions (n, max_caption), cap_lengths."""
    import torch

    k, t = max_set, max_caption
    img_lengths = torch.randint(1, k + 1, (n,), generator=generator)
    images = torch.randn(n, k, img_dim, generator=generator) * (torch.arange(k) < img_lengths[:, None]).unsqueeze(-1)
    cap_lengths = torch.randint(3, t + 1, (n,), generator=generator)
    captions = torch.randint(5, 40, (n, t), generator=generator) * (torch.arange(t) < cap_lengths[:, None])
    return dict(images=images, img_lengths=img_lengths, captions=captions, cap_lengths=cap_lengths)


def tiny_synthetic(root, seed):
    """A tiny synthetic image dataset (48/12/12 items, 5 captions each) under root/data:
    returns (data_path, vocab_size)."""
    from vse_fast.synthetic import generate

    data = generate(os.path.join(str(root), "data"), flavour="image", seed=seed, n_train=48, n_dev=12, n_test=12)
    with open(os.path.join(data, "vocab.txt")) as f:
        return data, sum(1 for _ in f)
