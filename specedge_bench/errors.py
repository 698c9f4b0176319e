"""Errors `hub_server bench` reports as one line that says what to do.

    BenchRefused        the bench cannot measure this hub as asked (another vocabulary, a mode
                        the hub lacks); the message says what to do instead

What the hub says goes through the typed client (`specedge_cli.errors.HubError` and its
subclasses); `explain` words those for the bench's operator, at the command's one boundary.
"""

from __future__ import annotations

from specedge_cli.errors import HubError, HubRejected, InsecureHub, TokenRejected


class BenchRefused(ValueError):
    """The bench cannot measure this hub as asked; the message says what to do instead."""


def explain(exc: HubError | InsecureHub, hub: str, token: str | None) -> str:
    """What a failure of the hub (or of reaching it) means for the bench, and what to do, in the
    bench's own words rather than the chat client's (`specedge login` is not the fix here)."""
    if isinstance(exc, TokenRejected) and not token:
        return (
            f"the hub at {hub} needs an API token: pass --token or set SPECEDGE_TOKEN "
            "(its operator makes one with `hub_server tokens create --user NAME`)"
        )
    if isinstance(exc, TokenRejected):
        return (
            f"the hub at {hub} refused this token (401): it is unknown or revoked; its operator "
            "makes a new one with `hub_server tokens create --user NAME`"
        )
    if isinstance(exc, InsecureHub):
        return (
            f"refusing plain http to {hub} with a token (it would cross the network unencrypted): "
            "measure the hub over https://, or from its own machine"
        )
    if isinstance(exc, HubRejected) and exc.status == 403:
        return (
            f"the hub at {hub} refused this token ({exc.code}): the bench reads its /metrics, which "
            "needs an operator's token (`hub_server users add NAME --role operator`, then "
            "`hub_server tokens create --user NAME`)"
        )
    if isinstance(exc, HubRejected):
        return f"the hub at {hub} refused a request ({exc.status} {exc.code}): {exc.message}"
    return f"{exc.message}; check the URL and that the hub is serving"
