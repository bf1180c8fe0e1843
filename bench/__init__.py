"""The checkout's benchmark and check scripts (`make bench`, `make curve`, `make peer`, …), one module each, run from
the repo root as `python -m bench.<name>` (bench/README.md lists them). Not part of the installed wheel: they use
`dspark_train` as an installed package, through its public names only (tests/test_structure.py checks it), and
write committed results under eval/results/ through `bench.resultfile`."""
