"""`python -m glm4v_core.parity`: the same tool as `glm4v parity`."""
import sys

from glm4v_conversion.streams import named_stdout_failures
from glm4v_core.parity.cli import main

PROG = "python -m glm4v_core.parity"

with named_stdout_failures(PROG):  # `>&-` and `> /dev/full` named in one line, exit 1; `| head` stays quiet
    code = main(prog=PROG)
sys.exit(code)
