# socksd in a container: python:3.11-slim, runs as an unprivileged user, with a health check that
# really asks the proxy (socksd health: a SOCKS5 greeting). Build and run (README, "Docker"):
#   docker build -t socksd .
#   docker compose -f contrib/docker-compose.yml up -d
# The install step is the README's: a virtual environment, then python3 -m pip install .

FROM python:3.11-slim AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/socksd
# the venv first on PATH: what ". /opt/socksd/bin/activate" does
ENV PATH=/opt/socksd/bin:$PATH
WORKDIR /src
COPY pyproject.toml README.md ./
COPY src ./src
RUN python3 -m pip install .

FROM python:3.11-slim
COPY --from=build /opt/socksd /opt/socksd
ENV PATH=/opt/socksd/bin:$PATH PYTHONDONTWRITEBYTECODE=1
RUN groupadd --system --gid 10001 socksd \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin socksd \
    && mkdir -p /etc/socksd
USER 10001:10001
EXPOSE 1080
# Logs go to stdout/stderr (docker logs). Each check is one short session in the access log.
HEALTHCHECK --interval=30s --timeout=5s --start-period=10s --retries=3 \
    CMD ["socksd", "health", "127.0.0.1:1080"]
ENTRYPOINT ["socksd"]
CMD ["serve", "--config", "/etc/socksd/socksd.toml"]
