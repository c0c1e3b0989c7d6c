"""Side-by-side releases of whatcar on a server: build, check, switch atomically, roll back.

Run by the system's python3 with the standard library only: it builds the serving virtualenvs,
so it cannot live in one. `make deploy PREFIX=...` and `make deploy-rollback PREFIX=...` call it;
`python3 -m deploy --help` lists its commands.
"""
