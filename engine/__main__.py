"""`python -m tinyfuse.engine`: the `tinyfuse` command."""
import sys

from .runtime import keep_checkout_off_path

keep_checkout_off_path()

from .cli import main  # noqa: E402

sys.exit(main())
