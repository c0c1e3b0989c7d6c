import sys

from serve.model.onednn import cap_isa

# An int8 package's weights are packed for oneDNN's AVX2 kernels at compile time; its parity check
# and the load check run it as the server will (serve/model/onednn.py). Float packages are packed
# at load and run under the cap as well as without it. Before torch loads.
cap_isa()

from .cli import main  # noqa: E402 - torch loads only after cap_isa()

sys.exit(main())
