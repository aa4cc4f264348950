"""The one exception type whose message is shown to the Docker user as is."""


class L3netError(Exception):
    """A failure with a message written for the user (dockerd shows it after the method name)."""


def run_tool(args, hint, what=None, timeout=15, stdin=None):
    """Run a system tool (iptables, ipset, bird, birdc), bounded: a missing tool or a hang
    becomes one clear L3netError. Returns the CompletedProcess; callers judge its exit status."""
    import subprocess

    try:
        return subprocess.run(args, input=stdin, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise L3netError(f"{args[0]} not found: {hint}") from None
    except subprocess.TimeoutExpired:
        raise L3netError(f"{what or args[0]} did not finish within {timeout}s") from None
