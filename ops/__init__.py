"""Operating whatcar, done one way for the server, export, training, the benchmarks and the deploy
tool alike: files replaced whole, versions switched by one rename, and what else they share.

Standard library only: the deploy tool imports it under the system's Python, outside every
virtualenv, and a command that only moves files must never pull in torch.
"""
