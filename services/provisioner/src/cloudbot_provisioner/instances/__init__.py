"""Driving one instance's machine through its lifecycle, one command at a time."""
