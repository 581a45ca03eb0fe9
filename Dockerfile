# ardetect: the pipeline and its tests in a container (CPU; onnxruntime-gpu falls back to CPU).
# Build:  docker build -t ardetect .
# Run:    docker run --rm -v "$PWD/data:/app/data" ardetect make run
FROM python:3.11-slim

# hadolint ignore=DL3008
RUN apt-get update && apt-get install -y --no-install-recommends git make tini && rm -rf /var/lib/apt/lists/*
WORKDIR /app
COPY pyproject.toml README.md Makefile ./
COPY src ./src
RUN python -m venv .venv && .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e '.[dev]' && touch .venv/.installed-stamp
COPY . .
ENV GX_ANALYTICS_ENABLED=False HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DO_NOT_TRACK=1 PATH=/app/.venv/bin:$PATH
# DVC needs a git repository; a build context without .git gets a fresh one
RUN test -d .git || (git init -q && git add -A && git -c user.name=ardetect -c user.email=build@ardetect.invalid commit -qm image)
# tini as the first process: it passes `docker stop`'s SIGTERM to make, which hands it to `ard pipeline run` (the stage
# then stops cleanly; `docker stop -t 120` gives a training the time), and it reaps what ends below it
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["make", "run"]
