import sys

from serve.onednn import cap_isa

# The packages' weights are packed for oneDNN's AVX2 kernels; their parity check and the
# server's load check run them as the server will (serve/onednn.py). Before torch loads.
cap_isa()

from .cli import main  # noqa: E402 - torch loads only after cap_isa()

sys.exit(main())
