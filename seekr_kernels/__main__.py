"""``python -m seekr_kernels`` runs the ``seekr`` command."""
import sys

from .cli import main

sys.exit(main())
