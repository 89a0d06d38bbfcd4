"""The tests' production server is the demo's (one implementation for both)."""
from callweaver.simulate.live_server import REPO, LiveServer, free_port, stop_process

__all__ = ["REPO", "LiveServer", "free_port", "stop_process"]
