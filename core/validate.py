"""Validation at the edge: every field dockerd (or anyone who can reach the socket) sends is
checked here before it reaches etcd keys, interface names or the kernel."""

import re

from netaddr import AddrFormatError, IPAddress, IPNetwork

from .errors import L3netError

_ID = re.compile(r"[0-9a-f]{64}")
_MAC = re.compile(r"[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}")
_HOSTNAME = re.compile(r"[A-Za-z0-9]([A-Za-z0-9_.-]{0,62})")


def field(body, name, kind=str, required=False, default=None):
    """``body[name]`` (matched case-insensitively, as dockerd's own decoder does), type-checked.
    JSON null counts as absent."""
    value = None
    for key, v in body.items():
        if key.lower() == name.lower():
            value = v
            break
    if value is None:
        if required:
            raise L3netError(f"missing field {name}")
        return default
    if kind is dict and isinstance(value, dict):
        return value
    if kind is list and isinstance(value, list):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is bool and isinstance(value, bool):
        return value
    raise L3netError(f"field {name} must be a {kind.__name__}, not {type(value).__name__}")


def docker_id(value, what):
    """Network and endpoint IDs are 64 lowercase hex characters; nothing else reaches a key."""
    if not isinstance(value, str) or not _ID.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 80 else type(value).__name__
        raise L3netError(f"invalid {what} {shown!r}: expected 64 hex characters")
    return value


def ipv4_interface(value, what="address"):
    """"10.20.0.5/32" or "10.20.0.5" -> IPAddress (prefix ignored: containers always get /32)."""
    if not isinstance(value, str) or len(value) > 18:
        raise L3netError(f"invalid {what} {value!r}: expected an IPv4 address")
    try:
        return IPNetwork(value, version=4).ip
    except (AddrFormatError, ValueError, TypeError):
        raise L3netError(f"invalid {what} {value!r}: expected an IPv4 address") from None


def ipv4(value, what="address"):
    if not isinstance(value, str) or len(value) > 15:
        raise L3netError(f"invalid {what} {value!r}: expected an IPv4 address")
    try:
        return IPAddress(value, 4)
    except (AddrFormatError, ValueError, TypeError):
        raise L3netError(f"invalid {what} {value!r}: expected an IPv4 address") from None


def mac(value):
    if not isinstance(value, str) or not _MAC.fullmatch(value):
        raise L3netError(f"invalid MAC address {value!r}")
    return value.lower()


def string_map(value, what):
    """Docker option maps: str -> str (values may also be bools or numbers from -o parsing)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise L3netError(f"{what} must be an object")
    out = {}
    for k, v in value.items():
        if not isinstance(k, str) or len(k) > 256:
            raise L3netError(f"invalid key in {what}")
        if isinstance(v, (dict, list)):
            out[k] = v
        else:
            out[k] = "" if v is None else str(v)
    return out


def hostname(value):
    if not isinstance(value, str) or not _HOSTNAME.fullmatch(value):
        raise L3netError(f"invalid hostname {value!r}: letters, digits, '.', '-', '_' "
                         "(max 63), starting with a letter or digit")
    return value


TAG = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
TAG_SIDE = "tag:"           # a policy side naming a tag: "tag:needs-db"
MAX_TAGS = 32               # per network


def tag(value):
    """A tag: a plain label (lowercase letters, digits and inner hyphens, at most 63), so it
    fits an etcd record, a rule comment and a command line as it is."""
    if not isinstance(value, str) or not TAG.fullmatch(value):
        shown = value if isinstance(value, str) and len(value) <= 70 else type(value).__name__
        raise L3netError(f"invalid tag {shown!r}: a tag is a plain label of lowercase letters, "
                         "digits and inner hyphens (at most 63 characters), such as needs-db")
    return value


def tag_list(values):
    """Tags from a list or a comma-separated string ("frontend,needs-db") -> sorted, unique."""
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",")] if values.strip() else []
    if not isinstance(values, (list, tuple)):
        raise L3netError("tags must be a list or a comma-separated string")
    out = sorted({tag(v) for v in values})
    if len(out) > MAX_TAGS:
        raise L3netError(f"{len(out)} tags: a network carries at most {MAX_TAGS}")
    return out


def tag_side(value):
    """The tag a policy side names ("tag:needs-db" -> "needs-db"), or None for a network."""
    if isinstance(value, str) and value.startswith(TAG_SIDE):
        return tag(value[len(TAG_SIDE):])
    return None
