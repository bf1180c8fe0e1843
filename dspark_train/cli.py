"""`dspark` command line: thin — parse, call the library, print. Bad input exits 2 with a one-line message."""
from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing

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


def add_arguments(p: argparse.ArgumentParser, settings) -> None:
    """One flag per field of the dataclass `settings`, from its declaration (config.setting): `max_new_tokens` is
    `--max-new-tokens`, a bool that defaults to true is `--no-<name>`, a list is comma-separated, a field without
    a default is positional; the help, the choices and the default come from the field. A flag left out is left
    out of the namespace (SUPPRESS), so the dataclass's defaults are the only ones, and the dataclass checks the
    values, naming the flag."""
    hints = typing.get_type_hints(settings)
    for f in dataclasses.fields(settings):
        meta, tp = f.metadata, hints[f.name]
        help = meta.get("help", "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            p.add_argument(f.name, help=help)
            continue
        default = f.default if f.default_factory is dataclasses.MISSING else f.default_factory()
        optional = typing.get_origin(tp) in (typing.Union, types.UnionType)
        base = next(t for t in typing.get_args(tp) if t is not type(None)) if optional else tp
        flag, kw = "--" + f.name.replace("_", "-"), dict(default=argparse.SUPPRESS, **meta.get("flag", {}))
        if base is bool:
            flag, kw["action"] = (f"--no-{flag[2:]}", "store_false") if default else (flag, "store_true")
            kw["dest"] = f.name
        elif typing.get_origin(base) is list:
            kw.setdefault("type", None if "nargs" in kw else _comma_list)
        else:
            kw["type"] = base
            if "choices" in meta:
                kw.setdefault("metavar", "{" + ",".join(map(str, meta["choices"])) + "}")
        shown = ",".join(map(str, default)) if isinstance(default, list) else default
        if default not in (None, []) and base is not bool and "default" not in help:
            help = f"{help} (default: {shown})".lstrip()
        p.add_argument(flag, help=help, **kw)


def _comma_list(text: str) -> list[str]:
    return [s.strip() for s in text.split(",") if s.strip()]


def eval_config(args: argparse.Namespace):
    """The EvalConfig the parsed `dspark eval` flags describe (validated: a bad value exits 2 naming the flag)."""
    from .evaluation.settings import EvalConfig
    from .evaluation.served import served_fields
    return EvalConfig(**{k: v for k, v in vars(args).items() if k not in ("command", "fn", *served_fields())})


def served_config(args: argparse.Namespace):
    """The ServedConfig of `dspark eval --engine` (None without --engine; an engine flag without it exits 2)."""
    from .evaluation.served import ServedConfig, served_fields
    given = {k: v for k, v in vars(args).items() if k in served_fields()}
    if "engine" not in given:
        if given:
            raise RecipeError(f"--{next(iter(given)).replace('_', '-')}: applies with --engine only")
        return None
    return ServedConfig(**given)


def cmd_eval(args):
    from .evaluation.evaluate import run_eval
    from .evaluation.lossless import LosslessError
    from .evaluation.served import ServedError, run_served_eval
    cfg, served = eval_config(args), served_config(args)
    if cfg.concurrency and served:
        raise RecipeError("--concurrency: decodes with our batched decoder, not with --engine")
    try:
        if cfg.concurrency:
            from .evaluation.concurrency import run_concurrency
            run_concurrency(cfg)
        else:
            run_served_eval(cfg, served) if served else run_eval(cfg)
    except LosslessError as e:
        print(f"LOSSLESS CHECK FAILED: {e}", file=sys.stderr)
        raise SystemExit(1) from None
    except ServedError as e:
        print(f"SERVED CHECK FAILED: {e}", file=sys.stderr)
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
    from .evaluation.served import ServedConfig
    from .evaluation.settings import EvalConfig
    add_arguments(s, EvalConfig)
    add_arguments(s.add_argument_group("the same benchmarks served by an engine (evaluation/served.py)"), ServedConfig)
    s.set_defaults(fn=cmd_eval)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return exit_code(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
