"""python -m kvmdirty: the `kvmdirty` command."""
import sys

from .cli import main

sys.exit(main())
