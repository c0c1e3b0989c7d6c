"""The inference core: an exported artifact loaded, its images decoded and preprocessed, scored on
the inference threads, and each output row made an answer; the live version and its hot swap.

It takes an InferenceSettings (settings.py), never the server's configuration, and imports
nothing from serve/http or serve/process: export, bench, deploy, fuzz and the batch command use
it alone. Importing this package loads no torch: control.py reads versions.py from any Python.
"""
