import sys
import warnings

# torch warns at import time that numpy is missing; the serve side never uses numpy, and a
# start-up refusal must be the only line on stderr. The filter has to be in place before torch loads.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .malloc import keep_freed_memory  # noqa: E402
from .onednn import cap_isa  # noqa: E402
from .openmp import passive_waits  # noqa: E402

passive_waits()  # before torch loads libgomp, which reads it once
cap_isa()  # before oneDNN first runs, which reads it once
keep_freed_memory()  # before the first pass frees anything

from .server import main  # noqa: E402

sys.exit(main())
