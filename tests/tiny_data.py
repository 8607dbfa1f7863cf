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


def tiny_synthetic(root, seed):
    """A tiny synthetic image dataset (48/12/12 items, 5 captions each) under root/data:
    returns (data_path, vocab_size)."""
    from vse_fast.synthetic import generate

    data = generate(os.path.join(str(root), "data"), flavour="image", seed=seed, n_train=48, n_dev=12, n_test=12)
    with open(os.path.join(data, "vocab.txt")) as f:
        return data, sum(1 for _ in f)
