"""A local journal of accepted-but-unfinished deletions, under the state dir.

One empty file per endpoint being deleted (``<state-dir>/deleting/<endpoint id>``): creating
it costs microseconds, survives the plugin being killed, and tells a restarted plugin what
to finish. (A host reboot loses nothing either: the veths are gone with it.)
"""

import os
import re

_ID = re.compile(r"[0-9a-f]{64}")


class Journal:
    def __init__(self, state_dir):
        self.dir = os.path.join(state_dir, "deleting")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)

    def add(self, endpoint_id):
        with open(os.path.join(self.dir, endpoint_id), "w"):
            pass

    def remove(self, endpoint_id):
        try:
            os.unlink(os.path.join(self.dir, endpoint_id))
        except FileNotFoundError:
            pass

    def pending(self):
        return sorted(n for n in os.listdir(self.dir) if _ID.fullmatch(n))
