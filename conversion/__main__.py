"""`python -m glm4v_conversion` = the `glm4v-convert` command."""
import sys

from .cli import main

sys.exit(main())
