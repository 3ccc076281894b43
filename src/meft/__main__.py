"""``python -m meft ...``: the same as the ``meft`` command (and how torchrun starts it).

One of torchrun's processes leaves without the interpreter's teardown: after a finished run
(results written, process group destroyed) gloo's threads were seen to abort it there
("terminate called without an active exception", SIGABRT), which torchrun reports as a
failed run."""

import os
import sys

from meft.cli.commands import main

code = main()
if os.environ.get("WORLD_SIZE", "1") != "1":
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
