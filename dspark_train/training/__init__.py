"""Stage 2, training: the accelerate/DeepSpeed loop (`python -m dspark_train.train`), its launch, checkpoints,
schedule, optimizers, the DSpark loss and the feature cache.

May import: the ground floor, `drafters`, and the data stage.
"""
