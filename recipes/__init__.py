"""The shipped recipes, as the package data `dspark_train.recipes` (pyproject.toml maps this folder onto it):
`dspark recipes` lists them and `dspark train NAME` runs one by name, in a checkout or from an installed wheel."""
