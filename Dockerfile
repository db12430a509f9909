# One image for every Palisade worker: `palisade run <worker>` picks the worker (see docker-compose.yml).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# The pinned set first, so code changes do not reinstall the dependencies.
COPY requirements.lock .
RUN pip install -r requirements.lock

# Every package of the repository (whatever libs/* and services/* hold a pyproject.toml), without
# dependencies: the lock has them all, and `pip check` proves it.
COPY libs/ libs/
COPY services/ services/
RUN packages=$(for p in libs/*/pyproject.toml services/*/pyproject.toml; do [ -f "$p" ] && dirname "$p"; done) \
    && pip install --no-deps --no-build-isolation $packages \
    && pip check

RUN useradd --system --no-create-home --shell /usr/sbin/nologin palisade
USER palisade

ENTRYPOINT ["palisade"]
CMD ["run", "--all"]
