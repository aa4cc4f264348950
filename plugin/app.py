"""The HTTP layer: libnetwork's remote-driver protocol, translated to driver and IPAM calls.

Thin on purpose: each route parses and validates its body, calls one method, returns JSON.
dockerd sends no Content-Type and empty bodies for argument-less calls; every failure is
``500 {"Err": "..."}`` (a traceback goes to our log, never to the caller).
"""

import json
import logging
import time

from flask import Flask, g, jsonify, request

from core import validate as V
from core.errors import L3netError

from . import metrics
from .ports import PORTMAP, parse_portmap

log = logging.getLogger("l3net.api")

MAX_BODY = 64 * 1024


def create_app(driver, ipam):
    app = Flask("l3net")
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY

    def body():
        raw = request.get_data(cache=True)
        if not raw or not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (ValueError, UnicodeDecodeError):
            raise L3netError("request body is not valid JSON") from None
        if data is None:
            return {}
        if not isinstance(data, dict):
            raise L3netError("request body must be a JSON object")
        return data

    def ids(data, network=True, endpoint=True):
        out = []
        if network:
            out.append(V.docker_id(V.field(data, "NetworkID", required=True), "NetworkID"))
            g.network = out[-1][:12]
        if endpoint:
            out.append(V.docker_id(V.field(data, "EndpointID", required=True), "EndpointID"))
            g.endpoint = out[-1][:12]
        return out

    @app.before_request
    def start():
        g.start = time.monotonic()

    @app.after_request
    def log_call(response):
        ms = (time.monotonic() - g.get("start", time.monotonic())) * 1000
        fields = {k: g.get(k) for k in ("network", "endpoint", "pool", "address") if g.get(k)}
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        log.info("%s %s %d %.1fms%s", request.method, request.path, response.status_code, ms, extra,
                 extra={"method": request.path.lstrip("/"), "status": response.status_code,
                        "ms": round(ms, 2), **fields})
        # the method label only for known routes: a fuzzer's paths must not make new series
        method = request.path.lstrip("/") if request.url_rule is not None else "unknown"
        metrics.CALLS.labels(method, str(response.status_code)).inc()
        metrics.LATENCY.labels(method).observe(ms / 1000)
        return response

    @app.errorhandler(L3netError)
    def user_error(e):
        log.warning("%s failed: %s", request.path, e)
        return jsonify(Err=str(e)), 500

    @app.errorhandler(404)
    def not_found(e):
        return jsonify(Err=f"unknown method {request.path}"), 404

    @app.errorhandler(405)
    def bad_method(e):
        return jsonify(Err="use POST"), 405

    @app.errorhandler(413)
    def too_large(e):
        return jsonify(Err="request body too large"), 500

    @app.errorhandler(Exception)
    def internal(e):
        if hasattr(e, "code") and hasattr(e, "get_response"):  # other werkzeug HTTP errors
            return jsonify(Err=str(e)), 500
        log.exception("%s: unexpected error", request.path)
        return jsonify(Err=f"internal error in {request.path.lstrip('/')}: "
                           f"{type(e).__name__}: {e}"), 500

    def route(name):
        return app.route(f"/{name}", methods=["POST"], endpoint=name)

    # -- handshake --------------------------------------------------------
    @route("Plugin.Activate")
    def activate():
        return jsonify(Implements=["NetworkDriver", "IpamDriver"])

    @route("NetworkDriver.GetCapabilities")
    def net_caps():
        # GwAllocChecker (Docker 28+): dockerd asks GwAllocCheck before a network create.
        return jsonify(Scope="local", ConnectivityScope="global", GwAllocChecker=True)

    # Docker 28+, before the IPAM calls of `docker network create`: l3net's containers route via
    # a link-local gateway of the host's (Join), so no pool address is ever spent on a gateway,
    # for either family (a --gateway the user gives is still reserved as asked).
    @route("NetworkDriver.GwAllocCheck")
    def gw_alloc_check():
        V.string_map(V.field(body(), "Options", dict), "Options")
        return jsonify(SkipIPv4=True, SkipIPv6=True)

    @route("IpamDriver.GetCapabilities")
    def ipam_caps():
        return jsonify(RequiresMACAddress=False, RequiresRequestReplay=False)

    @route("IpamDriver.GetDefaultAddressSpaces")
    def spaces():
        return jsonify(LocalDefaultAddressSpace="l3net", GlobalDefaultAddressSpace="l3net")

    # -- IPAM -------------------------------------------------------------
    @route("IpamDriver.RequestPool")
    def request_pool():
        data = body()
        pool = V.field(data, "Pool", default="")
        sub = V.field(data, "SubPool", default="")
        options = V.string_map(V.field(data, "Options", dict), "Options")
        v6 = V.field(data, "V6", bool, default=False)
        pool_id, cidr, meta = ipam.request_pool(pool, sub, options, v6)
        g.pool = pool_id
        return jsonify(PoolID=pool_id, Pool=cidr, Data=meta)

    @route("IpamDriver.ReleasePool")
    def release_pool():
        g.pool = V.field(body(), "PoolID", required=True)
        ipam.release_pool(g.pool)
        return jsonify({})

    @route("IpamDriver.RequestAddress")
    def request_address():
        data = body()
        g.pool = V.field(data, "PoolID", required=True)
        address = V.field(data, "Address", default="")
        if address:
            address = str(V.ipv4(address))
        options = V.string_map(V.field(data, "Options", dict), "Options")
        g.address = ipam.request_address(g.pool, address, options)
        return jsonify(Address=g.address, Data={})

    @route("IpamDriver.ReleaseAddress")
    def release_address():
        data = body()
        g.pool = V.field(data, "PoolID", required=True)
        g.address = str(V.ipv4_interface(V.field(data, "Address", required=True)))
        driver.release_address(g.pool, g.address)
        return jsonify({})

    # -- networks ---------------------------------------------------------
    @route("NetworkDriver.CreateNetwork")
    def create_network():
        data = body()
        (network_id,) = ids(data, endpoint=False)
        ipv4 = V.field(data, "IPv4Data", list, default=[])
        ipv6 = V.field(data, "IPv6Data", list, default=[])
        if not all(isinstance(d, dict) for d in ipv4):
            raise L3netError("IPv4Data must be a list of objects")
        options = V.string_map(V.field(data, "Options", dict), "Options")
        driver.create_network(network_id, ipv4, ipv6, options)
        return jsonify({})

    @route("NetworkDriver.DeleteNetwork")
    def delete_network():
        (network_id,) = ids(body(), endpoint=False)
        driver.delete_network(network_id)
        return jsonify({})

    @route("NetworkDriver.CreateEndpoint")
    def create_endpoint():
        data = body()
        network_id, endpoint_id = ids(data)
        iface = V.field(data, "Interface", dict, default={})
        address = V.field(iface, "Address", default="")
        address = V.ipv4_interface(address) if address else None
        if V.field(iface, "AddressIPv6", default=""):
            raise L3netError("l3net does not support IPv6 yet")
        mac = V.field(iface, "MacAddress", default="")
        mac = V.mac(mac) if mac else None
        driver.check_endpoint_options(V.string_map(V.field(data, "Options", dict), "Options"))
        g.address = str(address) if address else None
        answer = driver.create_endpoint(network_id, endpoint_id, address, mac)
        return jsonify(Interface=answer or None)

    @route("NetworkDriver.EndpointOperInfo")
    def oper_info():
        network_id, endpoint_id = ids(body())
        return jsonify(Value=driver.oper_info(network_id, endpoint_id))

    @route("NetworkDriver.DeleteEndpoint")
    def delete_endpoint():
        network_id, endpoint_id = ids(body())
        driver.delete_endpoint(network_id, endpoint_id)
        return jsonify({})

    @route("NetworkDriver.Join")
    def join():
        data = body()
        network_id, endpoint_id = ids(data)
        sandbox = V.field(data, "SandboxKey", default="")
        return jsonify(driver.join(network_id, endpoint_id, sandbox))

    @route("NetworkDriver.Leave")
    def leave():
        network_id, endpoint_id = ids(body())
        driver.leave(network_id, endpoint_id)
        return jsonify({})

    # docker run -p: after Join, before the container starts; revoked before Leave.
    @route("NetworkDriver.ProgramExternalConnectivity")
    def program_external():
        data = body()
        network_id, endpoint_id = ids(data)
        options = V.field(data, "Options", dict, default={})
        driver.publish(network_id, endpoint_id, parse_portmap(options.get(PORTMAP)))
        return jsonify({})

    @route("NetworkDriver.RevokeExternalConnectivity")
    def revoke_external():
        _, endpoint_id = ids(body())
        driver.unpublish(endpoint_id)
        return jsonify({})

    # Calls l3net answers without doing anything: discovery and swarm allocation do not apply
    # to a local-scope driver.
    for name in ("NetworkDriver.DiscoverNew", "NetworkDriver.DiscoverDelete",
                 "NetworkDriver.AllocateNetwork", "NetworkDriver.FreeNetwork"):
        def noop():
            body()  # still reject a malformed body
            return jsonify({})
        app.add_url_rule(f"/{name}", endpoint=name, view_func=noop, methods=["POST"])

    return app
