"""Benchmarks that print Markdown tables (`python -m bench.<name>`); nothing here is imported by the service."""
