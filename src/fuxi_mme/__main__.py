import sys

from .utils.exit_times import install, quick_exit

install()  # before torch's imports register their exit handlers: FUXI_MME_EXIT_TIMES only

from .cli import main  # noqa: E402

sys.exit(quick_exit(main()))
