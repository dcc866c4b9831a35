"""`python -m glm4v_core ...` is the `glm4v` command."""
import sys

from glm4v_core.cli import main

sys.exit(main())
