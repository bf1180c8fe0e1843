"""What `dspark eval` measures and how: `EvalConfig`, each field declared once with its default, rules and help, from
which cli.py builds the flags. Apart from evaluate.py because the CLI builds its parser without importing torch.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Optional

from ..config import DTYPES, MODES, check_settings, setting

BENCHMARKS = ("gsm8k", "mt-bench", "humaneval", "mbpp")
BASELINES = ("prompt-lookup", "assisted", "drafter-only", "copy-only")
# our own decoder without the copy drafter / without the learned drafter: baselines of hybrid runs only
DECODER_BASELINES = ("drafter-only", "copy-only")
EXACT = ("auto", "on", "off")  # --exact-attention (lossless.exact_attention_choice)


def _request_counts(text: str) -> list[int]:
    """`--concurrency 1,4,16`."""
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated request counts, got {text!r}") from None


@dataclass
class EvalConfig:
    """Each field is the flag of the same name (`max_new_tokens` is `--max-new-tokens`, `progress=False` is
    `--no-progress`); a bad value is a RecipeError naming the flag."""

    artifact: str = setting(help="drafter artifact directory or Hub id")
    target: Optional[str] = setting(None, "target model id/path or recipe YAML (default: the artifact's recipe.yaml, "
                                          "else the model id in its target fingerprint)")
    benchmarks: list[str] = setting(list(BENCHMARKS), "comma-separated names (<data-root>/eval/<name>.jsonl) or "
                                                      "jsonl paths of {\"turns\": [...]}", nonempty=True)
    n: int = setting(50, "prompts per benchmark (the first N; 0 = all)", ge=0)
    max_new_tokens: int = setting(256, "tokens generated per prompt (turn)", ge=1)
    mode: str = setting("chain", "adaptive needs calibration.json; hybrid: adaptive, or tree without a calibration, "
                                 "+ copy branches", choices=MODES)
    hybrid: bool = setting(False, "merge copy-drafter branches (spans of the prompt + output so far) into the mode's "
                                  "trees (always on in mode hybrid)")
    temperature: float = setting(0.0, "0 = greedy", ge=0)
    top_p: float = setting(1.0, "nucleus sampling: the top tokens holding this much probability (1 = off)", gt=0, le=1)
    top_k: int = setting(0, "0 = off", ge=0)
    seed: int = setting(0, "sampling seed (each prompt and method reseeds)")
    dtype: str = setting("auto", "target dtype; auto: bfloat16 where the hardware computes it (CUDA with bf16, a CPU "
                                 "with AMX/AVX512-BF16), else float32", choices=DTYPES)
    exact_attention: str = setting("auto", "row-exact verification attention in every target layer, so greedy "
                                           "output equals plain decoding's bit for bit in any dtype: auto (on where "
                                           "it costs <= 10%% of a verify pass, measured at start), on, off (first "
                                           "layer only, for the lossless check; divergent outputs are replayed "
                                           "row-exact to show they are rounding)", choices=EXACT)
    device: Optional[str] = setting(None, "default: cuda when available, else cpu")
    out: str = setting("runs/eval", "output directory (report.json, report.md, plots)")
    multi_turn: bool = setting(False, "all turns; later turns see the target's own previous answers")
    save_outputs: bool = setting(False, "write every generation to outputs.jsonl")
    compare: list[str] = setting([], "more drafter artifacts measured in the same run (one report, one plot)",
                                 flag=dict(nargs="+", metavar="ARTIFACT"))
    baselines: list[str] = setting(
        ["prompt-lookup", "assisted", "drafter-only"], "transformers' prompt-lookup and assisted (needs --assistant); "
        "in hybrid runs also drafter-only (our decoder without copy branches) and copy-only (copy drafting alone); "
        "'' for none", choices=BASELINES)
    fastest_plain: bool = setting(True, "do not time plain decoding in the other of float32/bfloat16 "
                                        "(speedup_vs_fastest_plain then compares against the same precision only; "
                                        "saves memory on big targets)")
    prompt_lookup_tokens: int = setting(10, "prompt_lookup_num_tokens", ge=1)
    assistant: Optional[str] = setting(None, "small model with the target's tokenizer for assisted generation")
    threads: Optional[int] = setting(None, "torch CPU threads", ge=1)
    data_root: str = setting("../shared/data", "where benchmark names are looked up (<data-root>/eval/<name>.jsonl); "
                                               "relative: to the current directory")
    progress: bool = setting(True, "no progress bars")
    truncate_prompts: bool = setting(False, "keep the last (window - max-new-tokens) tokens of a prompt too long for "
                                            "the target (default: refuse it, naming its length and the window)")
    concurrency: list[int] = setting([], "decode R requests together at each R (e.g. 1,4,16): speculative decoding "
                                         "with the load-aware scheduler vs batched plain decoding; writes "
                                         "concurrency.{json,md} and a speedup-vs-R plot instead of the one-at-a-time "
                                         "report (evaluation/concurrency.py)", ge=1, flag=dict(type=_request_counts))

    def __post_init__(self):
        check_settings(self, lambda name: f"--{name.replace('_', '-')}", coerce=True)
        self.hybrid = self.hybrid or self.mode == "hybrid"
