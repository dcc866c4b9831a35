"""`python -m glm4v_core.serving`: the same command as `glm4v serve`."""
import sys

from glm4v_core.serving.cli import main

sys.exit(main(prog="python -m glm4v_core.serving"))
