"""`python -m glm4v_core.parity`: the same tool as `glm4v parity`."""
import sys

from glm4v_conversion.streams import named_stdout_failures

PROG = "python -m glm4v_core.parity"

try:
    with named_stdout_failures(PROG):  # `>&-` and `> /dev/full` named in one line, exit 1; `| head` stays quiet
        from glm4v_core.parity.cli import main  # here, not above: it imports torch, and Ctrl-C may come then
        code = main(prog=PROG)
except KeyboardInterrupt:  # while importing torch, loading, or where the tool's own handler is not
    print(f"\n{PROG}: interrupted", file=sys.stderr)
    code = 130
sys.exit(code)
