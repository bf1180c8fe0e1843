"""Stage 3, calibration: `dspark calibrate` — held-out replay and probe decoding, STS / Platt / isotonic maps, their
metrics, adaptive-k tuning on the measured cost curve → calibration.json (its schema: `dspark_train.policy`).

May import: the ground floor, `policy`, `drafters`, `decoding`, and the data and training stages.
"""
