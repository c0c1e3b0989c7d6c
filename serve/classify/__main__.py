import sys
import warnings

# torch mentions at import that numpy is absent; nothing here needs it, and stderr is for the summary.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from ..malloc import keep_freed_memory  # noqa: E402
from ..onednn import cap_isa  # noqa: E402

cap_isa()  # as the server does, before torch loads (serve/onednn.py)
keep_freed_memory()  # as the server does (serve/malloc.py)

from .cli import main  # noqa: E402

sys.exit(main())
