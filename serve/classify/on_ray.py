"""`python -m serve.classify ... --ray ADDRESS`: the batch job on a Ray cluster, with Ray Data.

The driver lists the files (serve/classify/rows.py's walker, minus what a resumed run skips) and
hands their paths to Ray Data; `map_batches` runs `ScoreBatch`, a callable class Ray starts once
per actor of a fixed pool. Each actor loads the artifact once, with the server's own loader (every
sha256 and the check photos verified on the worker), and makes each file's row with the same
`score_file` as the one-machine command, one image a forward pass on one thread, so both give a
file the same row to the last digit. Rows stream back to the driver, which writes them with the
one-machine writer: the same file, the same format, resumable the same way.

What travels to the cluster with the job: whatcar's code (Ray's `py_modules`) and the model
version's files (through Ray's object store). What the nodes need beforehand: Python 3.11 and
requirements/ray.txt installed (the same Ray as the driver), and the photos at the same path.

Ray is imported here only, never by the server: it lives in its own virtualenv (.venv/ray).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

from .. import onednn
from ..postprocess import clamp_k
from .rows import ClassifyError, Row, batch_config, score_file

SERVE_PACKAGE = Path(__file__).resolve().parent.parent
OPS_PACKAGE = SERVE_PACKAGE.parent / "ops"  # serve imports it: it travels too
# How long the actor pool may take to start before the job is given up (too few CPUs anywhere).
ACTOR_START_SECONDS = 120.0


def check_address(address: str, timeout: float = 5.0) -> None:
    """Fail fast, in one line, on an address nothing answers at: Ray 2.60's own connect retries a
    refused, unresolvable or silent address for about fourteen minutes before it gives up."""
    if address == "auto":
        return
    if address.startswith("ray://"):
        raise ClassifyError(f"{address}: Ray Client addresses are not supported (no ray[client] in "
                            "requirements/ray.txt); run the command on a node of the cluster with the head's HOST:PORT")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClassifyError(f"--ray {address!r} is not HOST:PORT (the head node's GCS address) or auto")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except socket.gaierror as exc:
        raise ClassifyError(f"cannot reach the Ray cluster at {address}: "
                            f"cannot resolve {host} ({exc.strerror})") from None
    except TimeoutError:
        raise ClassifyError(f"cannot reach the Ray cluster at {address}: no answer within {timeout:g} s") from None
    except OSError as exc:
        raise ClassifyError(f"cannot reach the Ray cluster at {address}: {exc.strerror or exc}") from None


def artifact_files(folder: Path) -> dict[str, bytes]:
    """Every file of a model version (the Triton copy left out), by its path inside the folder."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and "triton" not in p.relative_to(folder).parts}


class ScoreBatch:
    """Ray Data's callable class: one per actor, loading the model version once and scoring
    batches of paths into rows."""

    def __init__(self, files, version: str, k: int, max_image_pixels: int):
        import ray

        from ..handler import load_handler
        from ..malloc import keep_freed_memory

        keep_freed_memory()  # as the server does (serve/malloc.py)
        # Ray Data passes constructor arguments nested, so an object reference arrives unresolved.
        if isinstance(files, ray.ObjectRef):
            files = ray.get(files)
        folder = Path(tempfile.mkdtemp(prefix="whatcar-model-"))
        try:
            for name, data in files.items():
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).write_bytes(data)
            self.handler = load_handler(folder, version, batch_config(folder, max_image_pixels, workers=1))
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.k = clamp_k(k, len(self.handler.artifact.labels))

    def __call__(self, batch):
        import pyarrow as pa

        rows = [score_file(self.handler, Path(root), Path(path), self.k)
                for root, path in zip(batch.column("root").to_pylist(), batch.column("path").to_pylist())]
        return pa.table({"row": [row.to_json() for row in rows]})


class RayScorer:
    """Rows for files scored by a pool of ScoreBatch actors on the cluster at `address`."""

    def __init__(self, address: str, model_folder: Path, version: str, args):
        check_address(address)
        try:
            import ray
        except ImportError:
            raise ClassifyError("--ray needs the Ray virtualenv: `make classify-ray`, or .venv/ray/bin/python "
                                "-m serve.classify ...") from None
        self.ray = ray
        self.connect(address, args.connect_timeout)
        cpus = max((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["Alive"]), default=0)
        if cpus < 1:
            ray.shutdown()
            raise ClassifyError(f"the Ray cluster at {address} has no node with a whole CPU for a scoring actor")
        self.actors = args.actors or max(1, int(ray.cluster_resources().get("CPU", 1)))
        self.batch_size = args.batch_size
        self.model = self.ship(artifact_files(model_folder), address)
        self.version, self.k, self.max_image_pixels = version, args.top_k, args.max_image_pixels

    def ship(self, files: dict[str, bytes], address: str):
        """The model version put into the cluster's object store once, for every actor to fetch."""
        from ray.exceptions import ObjectStoreFullError, OutOfDiskError

        try:
            return self.ray.put(files)
        except (ObjectStoreFullError, OutOfDiskError) as exc:
            # A store smaller than the model spills it to the node's disk, which Ray refuses when
            # that disk is nearly full: the fix is on the cluster, so say which and why.
            self.ray.shutdown()
            size = sum(map(len, files.values())) / 1e6
            raise ClassifyError(f"the Ray cluster at {address} cannot hold the model version ({size:.1f} MB): "
                                f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}") from None

    def connect(self, address: str, timeout: float) -> None:
        # A port that accepts connections but is no Ray cluster would keep ray.init waiting for minutes.
        def give_up():
            # Nothing has been written yet, so leaving at once loses nothing.
            print(f"whatcar classify: {address} accepts connections but did not answer as a Ray cluster within "
                  f"{timeout:g} s", file=sys.stderr, flush=True)
            os._exit(1)

        watchdog = threading.Timer(timeout, give_up)
        watchdog.daemon = True
        watchdog.start()
        try:
            # whatcar's code travels with the job, so the nodes need only the packages installed;
            # the actors' oneDNN gets the cap the packages were packed for (serve/onednn.py).
            self.ray.init(address=address, runtime_env={
                "py_modules": [str(SERVE_PACKAGE), str(OPS_PACKAGE)],
                "env_vars": {onednn.VARIABLE: os.environ.get(onednn.VARIABLE, onednn.PACKED_FOR)}},
                logging_level="ERROR", log_to_driver=False)
        except ConnectionError as exc:
            raise ClassifyError(f"cannot reach the Ray cluster at {address}: {exc}") from None
        finally:
            watchdog.cancel()

    def rows(self, folder: Path, files: list[Path]) -> Iterator[Row]:
        if not files:
            return
        import ray.data

        context = ray.data.DataContext.get_current()
        context.wait_for_min_actors_s = ACTOR_START_SECONDS
        context.enable_progress_bars = False
        root = str(folder.resolve())
        # One block per batch, so every actor gets work at once and rows come back batch by batch.
        dataset = ray.data.from_items([{"root": root, "path": str(p.resolve())} for p in files],
                                      override_num_blocks=max(1, math.ceil(len(files) / self.batch_size)))
        scored = dataset.map_batches(
            ScoreBatch, fn_constructor_args=(self.model, self.version, self.k, self.max_image_pixels),
            batch_size=self.batch_size, batch_format="pyarrow", num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.actors))
        for batch in scored.iter_batches(batch_size=None, batch_format="pyarrow"):
            for text in batch.column("row").to_pylist():
                yield Row.from_json(text)

    def close(self) -> None:
        self.ray.shutdown()
