"""`accelerate launch recipes/x.yaml`: a recipe that Python can run as a script, while it stays plain YAML.

`accelerate launch SCRIPT ARGS` runs `python SCRIPT ARGS` on every rank. Every shipped recipe starts with the
line `# -*- coding: dspark-recipe -*-`: a YAML comment to every YAML reader (yaml.safe_load, editors, the Hub),
and to Python a PEP 263 source-encoding declaration naming a codec. Decoding a recipe with that codec yields,
instead of the YAML text, the few lines of Python that train on that file:

    python recipes/tiny.yaml --set train.max_steps=2   ≡   python -m dspark_train.train recipes/tiny.yaml --set …

(so `accelerate launch [--config_file recipes/accelerate/zero2.yaml] recipes/tiny.yaml --set …` trains, on one
process or on many). Nothing else changes: only a file that names this codec on its first or second line decodes
through it, and encoding with it is plain UTF-8.

The codec is registered at interpreter start by `dspark_train_recipes.pth` in site-packages (a wheel carries it,
see setup.py; an editable install gets it from `python -m dspark_train.recipe_codec install`, which `make setup`
runs). Every Python process of the environment runs that line, so it costs them nothing: it registers a search
function, which Python consults only for an encoding name it does not know, and which imports this module only
when the name is `dspark-recipe`. It reads no argument and touches no file (PTH_LINE).

Two traps of source codecs: the interpreter has already consumed the declaration line when it switches to the
codec, so the generated source's first line is lost (it is a comment), and the incremental decoder must return
"" once its text is out, or the reader asks again forever.

When the trainer that `accelerate launch RECIPE` started fails (a bad key, say: one line naming it), accelerate's
launcher adds a traceback of its own, as it does for any script; `accelerate launch -q` leaves it out, and `dspark
train` passes -q. (An earlier .pth hid it by reading every process's arguments at start; that cost every program.)
"""
from __future__ import annotations

import codecs
import sys

NAME = "dspark_recipe"  # as Python normalises `dspark-recipe` before asking a search function
DECLARATION = "# -*- coding: dspark-recipe -*-"
CODING = r"^[ \t\f]*#.*?coding[:=][ \t]*([-\w.]+)"  # PEP 263
SOURCE = ("# (this line is consumed with the coding declaration)\n"
          "import sys\n"
          "from dspark_train.train import main\n"
          "sys.exit(main([__file__, *sys.argv[1:]]))\n")
PTH_NAME = "dspark_train_recipes.pth"
# `codecs` is imported before site-packages are read; the lambda imports this module on the one name it serves
PTH_LINE = ("import codecs; codecs.register(lambda name: name == 'dspark_recipe' and "
            "__import__('dspark_train.recipe_codec', fromlist=['search']).search(name) or None)\n")


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


def search(name: str):
    """The codec search function behind PTH_LINE: the recipe codec for `dspark-recipe`, None for any other name."""
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


if __name__ == "__main__":
    if sys.argv[1:] != ["install"]:
        sys.exit("usage: python -m dspark_train.recipe_codec install")
    print(f"installed {install()}: `python RECIPE.yaml` and `accelerate launch RECIPE.yaml` now train")
