"""`accelerate launch recipes/x.yaml`: a recipe that Python can run as a script, while it stays plain YAML.

`accelerate launch SCRIPT ARGS` runs `python SCRIPT ARGS` on every rank. Every shipped recipe starts with the
line `# -*- coding: dspark-recipe -*-`: a YAML comment to every YAML reader (yaml.safe_load, editors, the Hub),
and to Python a PEP 263 source-encoding declaration naming a codec. This module registers that codec; decoding
a recipe with it yields, instead of the YAML text, the few lines of Python that train on that file:

    python recipes/tiny.yaml --set train.max_steps=2   ≡   python -m dspark_train.train recipes/tiny.yaml --set …

(so `accelerate launch [--config_file recipes/accelerate/zero2.yaml] recipes/tiny.yaml --set …` trains, on one
process or on many). Nothing else changes: only a file that names this codec on its first or second line decodes
through it, and encoding with it is plain UTF-8.

The codec is registered at interpreter start by `dspark_train_recipes.pth` in site-packages (a wheel carries it,
see setup.py; an editable install gets it from `python -m dspark_train.recipe_codec install`, which `make setup`
runs). The .pth imports this module only: no torch, a few microseconds.

Two traps of source codecs: the interpreter has already consumed the declaration line when it switches to the
codec, so the generated source's first line is lost (it is a comment), and the incremental decoder must return
"" once its text is out, or the reader asks again forever.

One courtesy to accelerate's own process: when a trainer it launched on a recipe exits non-zero (a bad key, say:
the trainer has printed its one-line error), accelerate raises CalledProcessError (or torch's ChildFailedError)
with a traceback of its launcher. In a process whose arguments name a recipe script, and only for those two
exceptions raised by accelerate's launch command, `_launcher_excepthook` prints one line and exits with the
trainer's code instead.
"""
from __future__ import annotations

import codecs
import sys

NAME = "dspark_recipe"  # as Python normalises `dspark-recipe`
DECLARATION = "# -*- coding: dspark-recipe -*-"
CODING = r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)"  # PEP 263 (compiled on use: `re` costs ms at start)
SOURCE = ("# (this line is consumed with the coding declaration)\n"
          "import sys\n"
          "from dspark_train.train import main\n"
          "sys.exit(main([__file__, *sys.argv[1:]]))\n")
PTH_NAME = "dspark_train_recipes.pth"
PTH_LINE = ("import importlib.util as _u; _u.find_spec('dspark_train') is not None and "
            "__import__('dspark_train.recipe_codec')\n")


class _Decoder(codecs.IncrementalDecoder):
    """Consumes the file, yields SOURCE once."""

    def __init__(self, errors: str = "strict"):
        super().__init__(errors)
        self.done = False

    def decode(self, data, final: bool = False) -> str:
        if self.done:
            return ""
        self.done = True
        return SOURCE

    def reset(self) -> None:
        self.done = False


def _decode(data, errors: str = "strict") -> tuple[str, int]:
    return SOURCE, len(data)


def _search(name: str):
    if name.replace("-", "_") != NAME:
        return None
    utf8 = codecs.lookup("utf-8")
    return codecs.CodecInfo(name="dspark-recipe", encode=utf8.encode, decode=_decode, incrementaldecoder=_Decoder,
                            incrementalencoder=utf8.incrementalencoder, streamreader=utf8.streamreader,
                            streamwriter=utf8.streamwriter)


def is_recipe_script(path) -> bool:
    """Whether the file declares this codec (so `python FILE` trains on it)."""
    import re
    try:
        with open(path, "rb") as f:
            head = f.read(256).decode("utf-8", errors="replace").splitlines()[:2]
    except OSError:
        return False
    return any((m := re.match(CODING, line)) and m.group(1).replace("-", "_") == NAME for line in head)


def pth_path():
    import sysconfig
    from pathlib import Path
    return Path(sysconfig.get_path("purelib")) / PTH_NAME


def install():
    """Write the .pth that registers the codec at interpreter start into this interpreter's site-packages."""
    path = pth_path()
    if not path.is_file() or path.read_text() != PTH_LINE:
        path.write_text(PTH_LINE)
    return path


def _launcher_excepthook(previous):
    def hook(kind, error, tb):
        main = getattr(sys.modules.get("__main__"), "__spec__", None)
        ours = main is not None and main.name.startswith("accelerate.commands") or \
            sys.argv[0].rsplit("/", 1)[-1] in ("accelerate", "accelerate-launch")
        if ours and kind.__name__ in ("CalledProcessError", "ChildFailedError"):
            code = getattr(error, "returncode", None) or 1
            sys.stdout.flush()
            print(f"error: accelerate launch: the trainer exited with code {code} (its error is above)",
                  file=sys.stderr, flush=True)
            import os
            os._exit(code)
        previous(kind, error, tb)
    return hook


codecs.register(_search)
if any(is_recipe_script(a) for a in sys.argv[1:] if a.endswith((".yaml", ".yml"))):
    sys.excepthook = _launcher_excepthook(sys.excepthook)

if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m dspark_train.recipe_codec install")
    print(f"installed {install()}: `python RECIPE.yaml` and `accelerate launch RECIPE.yaml` now train")
