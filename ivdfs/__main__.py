"""Allow `python -m ivdfs`."""

from ivdfs.cli import main

raise SystemExit(main())
