# Build stage: install the package and its dependencies into a virtualenv, so that the runtime stage
# copies one directory of installed files (no wheel files left in a layer, no compiler).
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY connectors ./connectors
COPY normalizers ./normalizers
COPY dedupe ./dedupe
RUN python -m venv /opt/ticketgate \
 && /opt/ticketgate/bin/pip install --no-cache-dir . \
 && /opt/ticketgate/bin/pip uninstall --yes pip setuptools

# Runtime stage: the package and its dependencies, a non-root user, config and data as volumes.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    PATH=/opt/ticketgate/bin:$PATH \
    TICKETGATE_CONFIG=/etc/ticketgate/ticketgate.toml
RUN groupadd --system --gid 10001 ticketgate \
 && useradd --system --uid 10001 --gid ticketgate --home-dir /var/lib/ticketgate ticketgate \
 && mkdir -p /var/lib/ticketgate /etc/ticketgate \
 && chown ticketgate:ticketgate /var/lib/ticketgate
COPY --from=build /opt/ticketgate /opt/ticketgate
COPY config/ticketgate.example.toml /etc/ticketgate/ticketgate.example.toml
USER ticketgate
WORKDIR /var/lib/ticketgate
VOLUME ["/etc/ticketgate", "/var/lib/ticketgate"]
# HTTP channels and operations endpoints; SMTP.
EXPOSE 8080 2525
# `ticketgate health` reads the same config and TICKETGATE__ variables as `run`, so it probes the
# port the gateway really listens on. It costs ~0.2 s of CPU (loading the settings), hence 30 s.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
  CMD ["ticketgate", "health", "--timeout", "3"]
# Exec form: the gateway is PID 1 and receives SIGTERM directly for its graceful drain.
ENTRYPOINT ["ticketgate"]
CMD ["run"]
