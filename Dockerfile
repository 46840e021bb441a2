# syntax=docker/dockerfile:1
# One image per binary, from one build: `docker build --target worker .`
# (or producer, sim). docker-compose.yml builds all three.

FROM rust:1.95-bookworm AS build
# The revision every process reports in flotilla_build_info:
# `docker build --build-arg FLOTILLA_REVISION=$(git rev-parse --short HEAD)`.
ARG FLOTILLA_REVISION=unknown
WORKDIR /src
COPY . .
# Cache mounts keep the registry and compiled dependencies between builds;
# the binaries are copied out because the target cache is not in the layer.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked \
        --bin flotilla-worker --bin flotilla-producer --bin flotilla-sim \
 && mkdir /out \
 && cp target/release/flotilla-worker target/release/flotilla-producer target/release/flotilla-sim /out/

FROM debian:bookworm-slim AS runtime
# CA roots for HTTPS devices and image servers; a fixed non-root user whose
# /data a named volume inherits (the simulator writes its inventory there).
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin flotilla \
 && install -d -o flotilla -g flotilla /data
USER 10001:10001
WORKDIR /data

FROM runtime AS sim
COPY --from=build /out/flotilla-sim /usr/local/bin/
ENTRYPOINT ["flotilla-sim"]

FROM runtime AS producer
COPY --from=build /out/flotilla-producer /usr/local/bin/
# glibc returns a freed buffer of 128 KiB or more to the system at once;
# left to adjust its threshold, it kept the campaign snapshots' buffers, and
# the producer peaked at 54-57 MiB at 100,000 devices instead of 47
# (flotilla-bench throughput, which sets the same for the producer it runs).
ENV MALLOC_MMAP_THRESHOLD_=131072
COPY examples /examples
ENTRYPOINT ["flotilla-producer"]

# Last, so a plain `docker build .` gives the worker.
FROM runtime AS worker
COPY --from=build /out/flotilla-worker /usr/local/bin/
EXPOSE 9464
ENTRYPOINT ["flotilla-worker"]
