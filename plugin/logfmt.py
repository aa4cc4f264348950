"""Log formats: readable text (default) or JSON lines (``--log-format json``) for log
collectors. A call's IDs travel as record attributes (``extra=``), so both formats carry them:
text as ``network=... endpoint=...`` at the end of the line, JSON as fields."""

import json
import logging
import time

FIELDS = ("method", "status", "ms", "network", "endpoint", "pool", "address")


class JsonFormatter(logging.Formatter):
    def format(self, record):
        out = {"time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
               + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        for name in FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                out[name] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, sort_keys=False)


def setup(level, fmt="text"):
    handler = logging.StreamHandler()
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
