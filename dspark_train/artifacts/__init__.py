"""Stage 4, artifacts: export of a calibrated run (our format and vLLM/speculators'), the model card, Hub push, and
the artifact reader (a local directory, a Hub id or a speculators directory back into a drafter).

May import: the ground floor, `policy`, `drafters`, `decoding`, and the earlier stages.
"""
