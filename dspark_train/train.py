"""`python -m dspark_train.train RECIPE [--set k=v ...]`: the trainer's entry point, as `accelerate launch` and
`dspark train` run it (the loop itself: dspark_train/training/loop.py)."""
import sys

from .runlock import tie_to_launcher
from .training.loop import main as train_main


def main(argv=None) -> int:
    tie_to_launcher()  # first: a trainer never outlives the `dspark train` that started it
    return train_main(argv)


if __name__ == "__main__":
    sys.exit(main())
