"""A process that starts but never speaks MCP: the connect timeout must fire (and the process go)."""

import time

from _common import startup

startup()
while True:
    time.sleep(60)
