import sys

from .utils.exit_times import install

install()  # before torch's imports register their exit handlers: FUXI_MME_EXIT_TIMES only

from .cli import main  # noqa: E402

sys.exit(main())
