import sys
import warnings

# torch mentions at import that numpy is absent; nothing here needs it, and stderr is for the summary.
warnings.filterwarnings("ignore", message="Failed to initialize NumPy")

from .cli import main  # noqa: E402

sys.exit(main())
