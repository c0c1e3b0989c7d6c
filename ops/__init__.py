"""Changing files on disk so that a crash at any moment leaves the old state or the new one.

Standard library only: the server, the exporter, training, the benchmarks and the deploy tool
(which runs under the system's Python, outside every virtualenv) all import it.
"""
