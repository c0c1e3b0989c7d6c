import sys
import warnings

# torch warns at import time that numpy is missing; the serve side never uses numpy, and a
# start-up refusal must be the only line on stderr. The filter has to be in place before torch loads.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .config import ConfigError, load_config  # noqa: E402 - after the NumPy warning filter, before torch loads
from .malloc import keep_freed_memory  # noqa: E402 - after the NumPy warning filter, before torch loads
from .onednn import cap_isa, packed_isa  # noqa: E402 - after the NumPy warning filter, before torch loads
from .openmp import passive_waits  # noqa: E402 - after the NumPy warning filter, before torch loads

try:
    model_dir = load_config(sys.argv[1:]).model_dir
except ConfigError:
    model_dir = None  # main() says what is wrong
passive_waits()  # before torch loads libgomp, which reads it once
cap_isa(packed_for=packed_isa(model_dir))  # before oneDNN first runs, which reads it once
keep_freed_memory()  # before the first pass frees anything

from .server import main  # noqa: E402 - torch loads only once the settings above are in place

sys.exit(main())
