"""Command modules of `specedge`, one per command group."""
