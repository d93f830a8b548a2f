"""``python -m helpers``: see helpers/cli.py."""
import sys

from .cli import main

sys.exit(main())
