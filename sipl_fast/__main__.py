"""``python -m sipl_fast ...`` runs the ``sipl-fast`` command line (also under torchrun)."""
import sys

from .cli import main

sys.exit(main())
