"""Stage 1, data: prompt and conversation files → regenerated answers (`dspark data`, in-process or through an
OpenAI-compatible server) → token ids, loss masks, anchors and batches; the chat template path; the draft vocabulary.

May import: the ground floor (config, layout, hardware, target, runlock) only.
"""
