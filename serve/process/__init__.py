"""The server process: its configuration (flags and WHATCAR_* variables), start-up under Waitress,
SIGHUP reloads, the SIGTERM drain, pid and ready files, and `python -m serve.process.control`."""
