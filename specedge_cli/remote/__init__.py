"""Talking to a hub: the wire format, the HTTP client, and an embedded hub."""
