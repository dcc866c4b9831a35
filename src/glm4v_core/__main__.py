"""`python -m glm4v_core ...` is the `glm4v` command."""
import sys

from .cli import main

sys.exit(main())
