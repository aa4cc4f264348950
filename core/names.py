"""The names l3net gives its veths, derived from Docker's endpoint IDs (pure; datapath creates
the devices, the policy renderer matches them, the sweeper recognises its own)."""

HOST_PREFIX = "l3h"     # l3h + 11 hex chars: host side, named from the endpoint ID. Distinct
                        # enough for the policy's "-i l3h+" matches (a bridge named l3bed0 is not ours)
TEMP_PREFIX = "l3t"     # l3t + 11 hex chars: container side until dockerd moves it ("t" is not hex)


def host_ifname(endpoint_id):
    return HOST_PREFIX + endpoint_id[:11]


def temp_ifname(endpoint_id):
    return TEMP_PREFIX + endpoint_id[:11]
