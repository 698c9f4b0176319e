"""Read by every Python process started with this folder on PYTHONPATH (`verify_timeline.py`
starts the hub so): with SPECEDGE_TIMELINE set, the hub's modules are timed as they load."""

import os

if os.environ.get("SPECEDGE_TIMELINE"):
    import verify_timeline_marks

    verify_timeline_marks.install()
