"""`python -m score_fast ...` (and `torchrun ... -m score_fast train ...`): the CLI."""
import sys

from score_fast.cli import main

sys.exit(main())
