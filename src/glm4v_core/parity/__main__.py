"""`python -m glm4v_core.parity`: the same tool as `glm4v parity`."""
import sys

from glm4v_core.parity.cli import main

sys.exit(main(prog="python -m glm4v_core.parity"))
