"""The in-chat commands of `glm4v chat` as text and patterns, without torch: `glm4v chat --help` shows them
(glm4v_core.cli), the chat loop obeys them (glm4v_core.generation.cli)."""
import re

EXIT_WORDS = ("exit", "quit", "/exit", "/quit")
BANNER = "glm4v chat: one message per line; /image PATH attaches an image, /help lists the commands, /exit ends"
CHAT_COMMANDS = """in-chat commands (typed as a message):
  /image PATH        attach an image to your next message (repeat for several; GLM-4V checkpoints only)
  /help              list these commands
  /exit, /quit       end the session (so do exit, quit, an empty line and end of input)
  Ctrl-C             during an answer: cancel it (the session goes on); at the prompt: quit
A line whose first word is /NAME (letters, digits, - or _) is a command: an unknown one is answered, not
sent to the model; a message that begins with a path such as /usr/bin goes to the model."""
COMMAND = re.compile(r"/[A-Za-z][\w-]*")
