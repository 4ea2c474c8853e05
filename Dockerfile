# syntax=docker/dockerfile:1
# One image for the four services, shopctl and the payment provider
# simulator (provider-sim):
#   docker build -t shop .
#   docker run --rm shop order-svc --help
# The dependencies are compiled in a layer of their own, rebuilt only when
# a manifest or Cargo.lock changes; the crates' downloads are a BuildKit
# cache mount shared by every build.
#
# Where no Rust image can be pulled, the binaries can be built on the host
# and handed in; the image is then the same runtime stage around them:
#   docker build --build-arg BINARIES=host --build-context host-binaries=DIR -t shop .
# DIR holds user-svc, order-svc, inventory-svc, payment-svc, shopctl and
# provider-sim, built for Debian 12 (scripts/compose-smoke does this).

# `build` (compile here) or `host` (the host-binaries context).
ARG BINARIES=build
# The runtime's base; CI, where nothing can be pulled, names one it made.
ARG RUNTIME_BASE=debian:bookworm-slim

FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
ENV CARGO_TARGET_DIR=/src/target
ARG PACKAGES="-p shop-user -p shop-order -p shop-inventory -p shop-payment -p shopctl -p shop-provider-sim"

# Every manifest and the lock file, with empty targets: this layer holds
# the compiled dependencies.
COPY Cargo.toml Cargo.lock ./
COPY shared/auth/Cargo.toml shared/auth/
COPY shared/domain/Cargo.toml shared/domain/
COPY shared/pg-jetstream/Cargo.toml shared/pg-jetstream/
COPY shared/proto/Cargo.toml shared/proto/
COPY shared/saga-model/Cargo.toml shared/saga-model/
COPY shared/servers/Cargo.toml shared/servers/
COPY shared/service/Cargo.toml shared/service/
COPY shared/test-support/Cargo.toml shared/test-support/
COPY services/user/Cargo.toml services/user/
COPY services/order/Cargo.toml services/order/
COPY services/inventory/Cargo.toml services/inventory/
COPY services/payment/Cargo.toml services/payment/
COPY tools/provider-sim/Cargo.toml tools/provider-sim/
COPY tools/shopctl/Cargo.toml tools/shopctl/
COPY integration-tests/Cargo.toml integration-tests/
RUN for dir in shared/* services/* tools/provider-sim tools/shopctl integration-tests; do \
      mkdir -p "$dir/src" && touch "$dir/src/lib.rs" && echo 'fn main() {}' > "$dir/src/main.rs"; \
    done
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    cargo build --release --locked $PACKAGES

# The project: only its own crates compile here.
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    rm -f shared/*/src/main.rs integration-tests/src/main.rs \
 && find shared services tools -name '*.rs' -exec touch {} + \
 && cargo build --release --locked $PACKAGES \
 && mkdir -p /out \
 && cp target/release/user-svc target/release/order-svc target/release/inventory-svc \
       target/release/payment-svc target/release/shopctl target/release/provider-sim /out/

FROM scratch AS host
COPY --from=host-binaries . /out/

FROM ${BINARIES} AS binaries

FROM ${RUNTIME_BASE} AS runtime
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --system --gid 10001 shop \
 && useradd --system --uid 10001 --gid shop --no-create-home --shell /usr/sbin/nologin shop
COPY --from=binaries /out/ /usr/local/bin/
USER 10001:10001
# gRPC 50051-50054, HTTP (/healthz, /readyz, /metrics) 9101-9104.
EXPOSE 50051 50052 50053 50054 9101 9102 9103 9104
ENV LOG_FORMAT=json
CMD ["shopctl", "--help"]
