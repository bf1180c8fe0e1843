"""Everything is in pyproject.toml; this only adds dspark_train_recipes.pth to the wheel's root (site-packages), the
line that registers the recipe codec at interpreter start (dspark_train/recipe_codec.py). Editable installs do not
carry it: `python -m dspark_train.recipe_codec install` (run by `make setup`) writes it.

The line is read from recipe_codec.py as a file, without importing the package: the build runs where
`dspark_train` may not be importable (an isolated build, an editable build's staging directory)."""
import ast
import os

from setuptools import setup
from setuptools.command.build_py import build_py

CODEC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dspark_train", "recipe_codec.py")


def _constant(name: str) -> str:
    with open(CODEC, encoding="utf-8") as f:
        tree = ast.parse(f.read(), CODEC)
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == [name]:
            return ast.literal_eval(node.value)
    raise RuntimeError(f"{CODEC}: no {name} = '...'")


class BuildWithPth(build_py):
    def _pth(self) -> str:
        return os.path.join(self.build_lib, _constant("PTH_NAME"))

    def run(self):
        super().run()
        with open(self._pth(), "w", encoding="utf-8") as f:
            f.write(_constant("PTH_LINE"))

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [self._pth()]


setup(cmdclass={"build_py": BuildWithPth})
