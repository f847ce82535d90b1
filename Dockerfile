# syntax=docker/dockerfile:1
# kvroute's container image: the release binary on Debian bookworm-slim, non-root.
#   docker build -t kvroute:0.1.0 .
# The binary links Debian's libzmq (libzmq5, built with libsodium), not the copy the zmq
# crate vendors, so CurveZMQ (--zmq-curve-*) works in the image (docs/security.md).
# Deploy it with deploy/kubernetes (docs/kubernetes.md).

FROM rust:1-bookworm AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends libzmq3-dev pkg-config \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates crates
COPY src src
# `links = "zmq"` overridden: the zmq-sys build script (vendored libzmq) is skipped and
# the system's libzmq.so is linked. Debug info off (Cargo.toml keeps it for profiling).
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    TRIPLE="$(rustc -vV | sed -n 's/^host: //p')" \
 && CARGO_PROFILE_RELEASE_DEBUG=0 cargo build --release --locked --bin kvroute \
      --config "target.${TRIPLE}.zmq.rustc-link-lib=[\"zmq\"]" \
 && cp target/release/kvroute /kvroute

FROM debian:bookworm-slim
# libzmq5: the KV-event sockets; ca-certificates: TLS to the API server or Redis.
RUN apt-get update \
 && apt-get install -y --no-install-recommends libzmq5 ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 65532 kvroute \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin kvroute
COPY --from=build /kvroute /usr/local/bin/kvroute
USER 65532:65532
# 8080 OpenAI gateway + /health + /ready; 9002 ext_proc; 9003 gRPC health (9090, the
# admin port, is loopback unless configured otherwise).
EXPOSE 8080 9002 9003
ENTRYPOINT ["/usr/local/bin/kvroute"]
CMD ["serve", "--config", "/etc/kvroute/config.yaml"]
