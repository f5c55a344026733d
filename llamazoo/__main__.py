import sys

from llamazoo.cli import main

code = main()
if "llamazoo.distributed.mesh" in sys.modules:  # possibly a torchrun rank: its exit path (no torch import otherwise)
    from llamazoo.distributed.mesh import exit_process

    exit_process(code)
sys.exit(code)
