"""Fuzzing of the upload path: bytes through `serve.model.decode.decode` and `serve.model.preprocess.preprocess`.

`python -m fuzz` (what `make fuzz` runs) is a coverage-guided atheris harness; `fuzz.target`
holds the property both it and the seeded test in tests/serve check.
"""
