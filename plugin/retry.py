"""Background work that must get done, whatever etcd does: each job runs in one background
thread and, when it fails, again after a back-off (1 s, doubling, at most ``cap``) until it
succeeds. Used for what dockerd will not ask again: the etcd half of a veth deletion, and a
ReleaseAddress that met an etcd that did not answer.
"""

import logging
import queue
import threading

log = logging.getLogger("l3net.retry")


class Retrier:
    def __init__(self, name, cap=10.0):
        self.name, self.cap = name, float(cap)
        self._queue = queue.Queue()
        self._thread = None
        self._lock = threading.Lock()

    def submit(self, job, what, attempt=0):
        """Run ``job()`` until it returns without raising. ``what`` names it in the logs."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                self._thread.start()
        self._queue.put((job, what, attempt))

    def _run(self):
        while True:
            job, what, attempt = self._queue.get()
            try:
                job()
            except Exception as e:  # noqa: BLE001 - retried until done
                delay = min(2.0 ** attempt, self.cap)
                if attempt < 3 or attempt % 10 == 0:
                    log.warning("%s failed (%s); retrying in %.0f s", what, e, delay)
                timer = threading.Timer(delay, self.submit, (job, what, attempt + 1))
                timer.daemon = True
                timer.start()
            finally:
                self._queue.task_done()

    def wait(self):
        """Block until everything submitted so far has been tried once (tests, shutdown)."""
        self._queue.join()
