# syntax=docker/dockerfile:1
# Build stage: compile wheels once, so the runtime image carries no compiler.
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
RUN pip install --no-cache-dir --upgrade pip build
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY connectors ./connectors
COPY normalizers ./normalizers
COPY dedupe ./dedupe
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Runtime stage: the package and its dependencies, a non-root user, config and data as volumes.
FROM python:3.11-slim-bookworm
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 \
    TICKETGATE_CONFIG=/etc/ticketgate/ticketgate.toml
RUN groupadd --system --gid 10001 ticketgate \
 && useradd --system --uid 10001 --gid ticketgate --home-dir /var/lib/ticketgate ticketgate \
 && mkdir -p /var/lib/ticketgate /etc/ticketgate \
 && chown ticketgate:ticketgate /var/lib/ticketgate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
COPY config/ticketgate.example.toml /etc/ticketgate/ticketgate.example.toml
USER ticketgate
WORKDIR /var/lib/ticketgate
VOLUME ["/etc/ticketgate", "/var/lib/ticketgate"]
# HTTP channels and operations endpoints; SMTP.
EXPOSE 8080 2525
HEALTHCHECK --interval=15s --timeout=3s --start-period=10s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
# Exec form: the gateway is PID 1 and receives SIGTERM directly for its graceful drain.
ENTRYPOINT ["ticketgate"]
CMD ["run"]
