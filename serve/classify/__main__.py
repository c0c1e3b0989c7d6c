import sys
import warnings

# torch mentions at import that numpy is absent; nothing here needs it, and stderr is for the summary.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from ..malloc import keep_freed_memory  # noqa: E402 - after the NumPy warning filter, before torch loads
from ..onednn import cap_isa, packed_isa  # noqa: E402 - after the NumPy warning filter, before torch loads
from .cli import main, parse_args  # noqa: E402 - after the NumPy warning filter, before torch loads

# As the server does, before torch loads (serve/onednn.py, serve/malloc.py).
cap_isa(packed_for=packed_isa(parse_args(sys.argv[1:]).model_dir))
keep_freed_memory()

sys.exit(main())
