"""The calibrated drafting policy, shared by the stage that fits it (calibration) and the decoder that follows it:
calibration.json's schema, the per-slot calibration maps, the adaptive width/depth rule and its tuner (the decoder
re-tunes on a machine whose cost curve differs).

May import: the ground floor only (numpy, no torch at import), so `decoding/` reads it without importing a stage.
"""
