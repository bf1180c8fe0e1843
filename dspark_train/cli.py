"""`dspark` command line: thin — parse, call the library, print. Bad input exits 2 with a one-line message."""
from __future__ import annotations

import argparse
import sys

from .config import RecipeError, exit_code, load_recipe


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's error contract: a bad or missing argument is one line naming it, exit 2 (argparse
    would print the usage block first; `--help` still shows it)."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message} (see `{self.prog} --help`)\n")


def _positive_int(text: str) -> int:
    value = int(text)  # a ValueError reads "invalid _positive_int value: ..."; name the type for argparse
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive_int.__name__ = "int"


def _recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="a recipe YAML file, or the name of a shipped recipe (`dspark recipes` lists them)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe field, e.g. --set train.lr=3e-4 (repeatable)")


def _load(args):
    return load_recipe(args.recipe, args.overrides)


def cmd_recipes(args):
    from . import shipped
    if args.action == "copy":
        print(f"wrote {shipped.copy(args.name, args.dest, force=args.force)}: edit it, then `dspark train` it")
        return
    rows = [("name", "target", "description")] + shipped.catalog()
    wide = [max(len(r[i]) for r in rows) for i in (0, 1)]
    for name, target, about in rows:
        print(f"{name:<{wide[0]}}  {target:<{wide[1]}}  {about}".rstrip())
    print(f"\n{shipped.folder()}\n`dspark train NAME` trains one as shipped; `dspark recipes copy NAME` writes it out "
          "to edit")


def cmd_plan(args):
    from .plan import plan
    print(plan(_load(args)))


def cmd_fetch_target(args):
    from .target import load_target
    target = load_target(_load(args).target)
    print(f"target ready: {target.name} ({target.num_layers} layers, hidden {target.hidden_size}, "
          f"vocab {target.vocab_size})")


def cmd_data(args):
    import json

    from .data.regenerate import run_data
    server = [f"data.server.url={json.dumps(args.server)}"] if args.server else []  # JSON: a YAML string as given
    run_data(load_recipe(args.recipe, args.overrides + server), shard=args.shard)


def cmd_train(args):
    import os

    from .training.launch import build_launch_command
    from .runlock import run_holding_lock, run_tied
    recipe = _load(args)
    cmd = build_launch_command(recipe, args.recipe, args.overrides)
    print("$ " + " ".join(cmd), flush=True)
    if args.dry_run:
        return
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if recipe.distributed.machine_rank != 0:  # machine 0 of a multi-node run holds the lock; the others write nothing
        raise SystemExit(run_tied(cmd, env, what="the trainer"))
    raise SystemExit(run_holding_lock(cmd, env, recipe.resolve_path(recipe.train.output_dir), "dspark train"))


def cmd_calibrate(args):
    from .calibration.calibrate import run_calibration
    run_calibration(args.run, overrides=args.overrides, prompts=args.prompts, out=args.out)


def cmd_export(args):
    from .artifacts.export import export_run, export_speculators
    if args.format == "speculators":
        out = export_speculators(args.run_dir, args.out_dir, mask_token_id=args.mask_token_id, force=args.force)
        print(f"speculators-format drafter written to {out} (serve it: README, 'Serve it')")
        return
    if args.mask_token_id is not None:
        raise RecipeError("--mask-token-id: applies to --format speculators only")
    out = export_run(args.run_dir, args.out_dir, force=args.force)
    print(f"artifact written to {out}")


def cmd_push(args):
    from .artifacts.export import push_artifact
    push_artifact(args.out_dir, args.repo_id, private=args.private, revision=args.revision,
                  commit_message=args.commit_message, dry_run=args.dry_run)


def add_eval_arguments(p: argparse.ArgumentParser) -> None:
    """`dspark eval`'s flags, one per `evaluate.EvalConfig` field. A flag left out is left out of the namespace
    (SUPPRESS), so the EvalConfig defaults are the only defaults and the parser never imports torch."""
    unset = argparse.SUPPRESS
    p.add_argument("artifact", help="drafter artifact directory or Hub id")
    p.add_argument("--target", default=unset,
                   help="target model id/path or recipe YAML (default: the artifact's recipe.yaml, else the "
                        "model id in its target fingerprint)")
    p.add_argument("--benchmarks", default=unset, type=_comma_list,
                   help="comma-separated names (<data-root>/eval/<name>.jsonl) or jsonl paths of {\"turns\": [...]}")
    p.add_argument("--n", type=int, default=unset, help="prompts per benchmark (the first N; 0 = all)")
    p.add_argument("--max-new-tokens", type=int, default=unset)
    p.add_argument("--mode", default=unset,
                   help="chain, tree, adaptive (needs calibration.json) or hybrid (adaptive, or tree without a "
                        "calibration, + copy branches)")
    p.add_argument("--hybrid", action="store_true", default=unset,
                   help="merge copy-drafter branches (spans of the prompt + output so far) into the mode's trees")
    p.add_argument("--temperature", type=float, default=unset, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=unset)
    p.add_argument("--top-k", type=int, default=unset, help="0 = off")
    p.add_argument("--seed", type=int, default=unset, help="sampling seed (each prompt and method reseeds)")
    p.add_argument("--dtype", default=unset,
                   help="target dtype: auto (default: bfloat16 where the hardware computes it, i.e. CUDA with bf16 "
                        "or a CPU with AMX/AVX512-BF16, else float32), bfloat16 or float32")
    p.add_argument("--device", default=unset, help="default: cuda when available, else cpu")
    p.add_argument("--out", default=unset, help="output directory (report.json, report.md, plots)")
    p.add_argument("--multi-turn", action="store_true", default=unset,
                   help="all turns; later turns see the target's own previous answers")
    p.add_argument("--save-outputs", action="store_true", default=unset, help="write every generation to outputs.jsonl")
    p.add_argument("--compare", nargs="+", default=unset, metavar="ARTIFACT",
                   help="more drafter artifacts measured in the same run (one report, one plot)")
    p.add_argument("--baselines", default=unset, type=_comma_list,
                   help="prompt-lookup, assisted (needs --assistant); in hybrid runs also drafter-only (our decoder "
                        "without copy branches) and copy-only (copy drafting alone); '' for none")
    p.add_argument("--no-fastest-plain", dest="fastest_plain", action="store_false", default=unset,
                   help="do not time plain decoding in the other of float32/bfloat16 (speedup_vs_fastest_plain "
                        "then compares against the same precision only; saves memory on big targets)")
    p.add_argument("--prompt-lookup-tokens", type=int, default=unset, help="prompt_lookup_num_tokens")
    p.add_argument("--assistant", default=unset, help="small model with the same tokenizer for assisted generation")
    p.add_argument("--threads", type=int, default=unset, help="torch CPU threads")
    p.add_argument("--data-root", default=unset,
                   help="where benchmark names are looked up (<data-root>/eval/<name>.jsonl; default ../shared/data, "
                        "relative to the current directory)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=unset, help="no progress bars")
    p.add_argument("--concurrency", default=unset, type=_int_list, metavar="R,R,...",
                   help="decode R requests together at each R (e.g. 1,4,16): speculative decoding with the load-aware "
                        "scheduler vs batched plain decoding, writes concurrency.{json,md} and a speedup-vs-R plot "
                        "instead of the one-at-a-time report")
    p.add_argument("--truncate-prompts", action="store_true", default=unset,
                   help="keep the last (window - max-new-tokens) tokens of a prompt too long for the target "
                        "(default: refuse it, naming its length and the window)")


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def _int_list(text: str) -> list[int]:
    try:
        return [int(s) for s in _comma_list(text)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def eval_config(args: argparse.Namespace):
    """The EvalConfig the parsed `dspark eval` flags describe (validated: a bad value exits 2 naming the flag)."""
    from .evaluation.evaluate import EvalConfig
    return EvalConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "fn")})


def cmd_eval(args):
    from .evaluation.evaluate import run_eval
    from .evaluation.lossless import LosslessError
    cfg = eval_config(args)
    try:
        if cfg.concurrency:
            from .evaluation.concurrency import run_concurrency
            run_concurrency(cfg)
        else:
            run_eval(cfg)
    except LosslessError as e:
        print(f"LOSSLESS CHECK FAILED: {e}", file=sys.stderr)
        raise SystemExit(1) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dspark", description="Train, calibrate, export and evaluate DSpark drafters.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("recipes", help="list the shipped recipes; `dspark recipes copy NAME [DEST]` writes one out")
    s.set_defaults(fn=cmd_recipes, action=None)
    copy = s.add_subparsers(dest="action", parser_class=_Parser).add_parser(
        "copy", help="write a shipped recipe out to edit (default: ./NAME.yaml)")
    copy.add_argument("name", help="a shipped recipe (`dspark recipes` lists them)")
    copy.add_argument("dest", nargs="?", default=".", help="file or directory to write to (default: .)")
    copy.add_argument("--force", action="store_true", help="replace an existing file")

    s = sub.add_parser("plan", help="print the resolved recipe, target architecture, drafter size and memory plan")
    _recipe_args(s)
    s.set_defaults(fn=cmd_plan)

    s = sub.add_parser("fetch-target", help="load (and convert/cache) the recipe's target once")
    _recipe_args(s)
    s.set_defaults(fn=cmd_fetch_target)

    s = sub.add_parser("data", help="regenerate answers with the frozen target (self-distillation data)")
    _recipe_args(s)
    s.add_argument("--shard", default=None, metavar="I/N", help="process shard I of N (0-based), e.g. 0/4")
    s.add_argument("--server", default=None, metavar="URL",
                   help="answer through this OpenAI-compatible server (vLLM, SGLang), e.g. http://127.0.0.1:8000; "
                        "sets data.server.url (model, API key variable, concurrency: data.server.*)")
    s.set_defaults(fn=cmd_data)

    s = sub.add_parser("train", help="train the drafter (builds the accelerate launch from `distributed`)")
    _recipe_args(s)
    s.add_argument("--dry-run", action="store_true", help="print the launch command and exit")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("calibrate", help="sequential temperature scaling + adaptive-k tuning on held-out data")
    s.add_argument("run", help="training run directory or exported artifact")
    s.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--prompts", type=_positive_int, default=None,
                   help="held-out prompts to probe-decode (default: recipe)")
    s.add_argument("--out", default=None, help="write calibration.json and the plot here instead of into RUN")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("export", help="write a Hub-ready artifact from a training run")
    s.add_argument("run_dir")
    s.add_argument("out_dir")
    s.add_argument("--force", action="store_true", help="replace an existing OUT_DIR")
    s.add_argument("--format", choices=("dspark", "speculators"), default="dspark",
                   help="dspark: our artifact (default); speculators: the format vLLM and speculators load")
    s.add_argument("--mask-token-id", type=int, default=None, metavar="ID",
                   help="speculators: the embedding row that carries a learned MASK (default: a spare token)")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("push", help="upload an artifact to the Hugging Face Hub")
    s.add_argument("out_dir")
    s.add_argument("repo_id")
    s.add_argument("--private", action="store_true")
    s.add_argument("--revision", default=None, help="branch to push to (created if missing)")
    s.add_argument("--commit-message", default=None)
    s.add_argument("--dry-run", action="store_true", help="list what would be uploaded; no network")
    s.set_defaults(fn=cmd_push)

    s = sub.add_parser("eval", help="τ, acceptance and wall-clock speedup side by side, with plots")
    add_eval_arguments(s)
    s.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
