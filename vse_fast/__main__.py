"""``python -m vse_fast``: say which entry points exist."""
import sys

USAGE = """vse_fast: VSE-infinity (GPO + VSE++ loss) with fused Triton kernels.

  python -m vse_fast.train                  train a small model on synthetic data (~1 min on 2 CPU cores)
  python -m vse_fast.train --data_path DIR --text_model BERT_DIR
                                            train with the published hyperparameters
  torchrun --nproc_per_node=N -m vse_fast.train ...
                                            multi-GPU (DDP, global negatives)
  python -m vse_fast.eval --checkpoint PATH --data_path DIR --split test [--fold5]
                                            recall@K / rsum of a checkpoint (ours or published)

Add --help to any of them for the options.
"""


def main() -> int:
    sys.stdout.write(USAGE)
    return 0


if __name__ == "__main__":
    sys.exit(main())
