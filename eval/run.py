#!/usr/bin/env python
"""`python eval/run.py ARTIFACT [options]` is `dspark eval ARTIFACT [options]` (see eval/README.md)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from dspark_train.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(["eval", *sys.argv[1:]]))
