# The l3net managed-plugin image (first version; `make plugin` and the managed-plugin test
# come with the packaging issue). Builds from wheels prepared on the host, so no registry
# is needed beyond the Debian base image.
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv iproute2 iptables ipset bird2 \
 && rm -rf /var/lib/apt/lists/*
COPY dist/wheels /wheels
RUN python3 -m venv /opt/l3net \
 && /opt/l3net/bin/pip install --no-index --find-links /wheels l3net \
 && ln -s /opt/l3net/bin/l3net-plugin /opt/l3net/bin/l3netctl /usr/local/bin/ \
 && rm -rf /wheels
ENTRYPOINT ["/usr/local/bin/l3net-plugin"]
