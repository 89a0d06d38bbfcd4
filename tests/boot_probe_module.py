"""Imported by tests/test_boot.py through the loader: records which thread imported it."""
import threading

IMPORTED_BY = threading.current_thread()
