"""What the label cache saves with a large teacher: bench/train.py with a PAA Swin-B teacher.

    python bench/swin.py [--scale 320] [--batch 2] [--iters 20] [--warmup 2] [--images 14] [--data toy]

A PAA R-50 student's training step by label source (cached, online Swin-B teacher, plain PAA, the floor), the
modes interleaved round by round on the same preloaded batches, and stage one (``cache-labels`` with the
Swin-B teacher) against the teacher's forward alone over the same views. Weights are random. Prints
``cache_labels_over_forward`` (goal <= 1.10), ``cached_over_floor`` (goal <= 1.05) and the headline
``swinb_online_over_cached`` (how many times a cached step is faster than running the Swin-B teacher online);
writes bench/train_swinb.json.
"""
from __future__ import annotations

from common import step_bench_args
from train import profile_option, run


def main() -> None:
    run(step_bench_args(__doc__, iters=20, extra=profile_option), "swinb")


if __name__ == "__main__":
    main()
