"""`python -m kwanzaa_adapter`: the `kwanzaa-adapter` command."""

import sys

from kwanzaa_adapter.cli import main

sys.exit(main())
