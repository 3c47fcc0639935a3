"""`python -m proxy`, the same as the token-proxy command."""

from proxy.cli import main

raise SystemExit(main())
