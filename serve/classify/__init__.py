"""`python -m serve.classify`: score a whole folder of photos into one CSV or JSON Lines file, on
this machine or on a Ray cluster. See cli.py."""
