"""Stage 5, evaluation: `dspark eval` — plain, speculative and baseline decoding side by side on the dev sets, the
report (JSON, markdown, plots) with τ, acceptance, speedups and the lossless check.

May import: anything below it (the ground floor, `policy`, `drafters`, `decoding`, the earlier stages).
"""
