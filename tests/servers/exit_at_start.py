"""A server that cannot start: it complains on stderr and exits before the handshake."""

import sys

print("fatal: MISSING_TOKEN is not set", file=sys.stderr, flush=True)
sys.exit(3)
