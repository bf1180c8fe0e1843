"""Everything is in pyproject.toml; this only adds dspark_train_recipes.pth to the wheel's root (site-packages), the
line that registers the recipe codec at interpreter start (dspark_train/recipe_codec.py). Editable installs do not
carry it: `python -m dspark_train.recipe_codec install` (run by `make setup`) writes it."""
import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH = "dspark_train_recipes.pth"


class BuildWithPth(build_py):
    def run(self):
        super().run()
        from dspark_train.recipe_codec import PTH_LINE  # noqa: E402 (the source tree is the working directory)
        with open(os.path.join(self.build_lib, PTH), "w") as f:
            f.write(PTH_LINE)

    def get_outputs(self, include_bytecode=True):
        return super().get_outputs(include_bytecode) + [os.path.join(self.build_lib, PTH)]


setup(cmdclass={"build_py": BuildWithPth})
