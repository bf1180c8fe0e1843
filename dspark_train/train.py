"""`python -m dspark_train.train RECIPE [--set k=v ...]`: the trainer's entry point, as `accelerate launch` and
`dspark train` run it (the loop itself: dspark_train/training/loop.py)."""
import sys

from .training.loop import main

if __name__ == "__main__":
    sys.exit(main())
