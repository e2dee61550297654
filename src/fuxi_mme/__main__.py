import sys

from .utils.bytecode import keep
from .utils.exit_times import install, quick_exit

install()  # before torch's imports register their exit handlers: FUXI_MME_EXIT_TIMES only
keep()  # before torch's imports: their bytecode kept where the install cannot keep it

from .cli import main  # noqa: E402

sys.exit(quick_exit(main()))
