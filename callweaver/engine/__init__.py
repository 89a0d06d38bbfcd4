"""The conversation engine: plain Python, never imports Flask."""
