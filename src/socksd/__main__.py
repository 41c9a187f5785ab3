"""Allow ``python -m socksd``."""

from socksd.cli import main

raise SystemExit(main())
