# The l3net managed-plugin image. `make plugin` builds it (scripts/build-plugin.sh) from wheels
# prepared on the host (dist/wheels) and a Debian base of the release whose Python built them
# (made with debootstrap when dockerd has no debian:SUITE-slim, so no registry is needed);
# the image's filesystem becomes the plugin's rootfs, plugin.json its config.json.
ARG BASE=debian:bookworm-slim
FROM ${BASE}
# (a base scripts/build-plugin.sh made with debootstrap has them already)
ARG PACKAGES="python3 python3-venv iproute2 iptables ipset bird2 conntrack"
RUN if dpkg-query -W $PACKAGES >/dev/null 2>&1; then exit 0; fi \
 && apt-get update \
 && apt-get install -y --no-install-recommends $PACKAGES \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/archives/*.deb
COPY dist/wheels /wheels
RUN python3 -m venv /opt/l3net \
 && /opt/l3net/bin/pip install --no-cache-dir --no-index --find-links /wheels l3net \
 && ln -s /opt/l3net/bin/l3net-plugin /opt/l3net/bin/l3net-plugin-managed /opt/l3net/bin/l3netctl /usr/local/bin/ \
 && rm -rf /wheels
ENTRYPOINT ["/usr/local/bin/l3net-plugin"]
