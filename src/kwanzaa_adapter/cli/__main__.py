"""`python -m kwanzaa_adapter.cli`: the `kwanzaa-adapter` command (as torchrun and accelerate launch it)."""

import sys

from kwanzaa_adapter.cli.main import main

sys.exit(main())
