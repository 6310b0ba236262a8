"""`python -m timebill_ros.cli ...` runs the `timebill` command."""

from . import main

raise SystemExit(main())
