# One image for every rollcall container: the `rollcall` binary plus Debian's redis-server,
# redis-sentinel and nginx, so that docker-compose runs the same config files through the
# same code as `rollcall dev` (`rollcall node redis|sentinel|nginx`, `rollcall serve`).

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY nginx ./nginx
COPY redis-sentinel ./redis-sentinel
COPY prometheus ./prometheus
RUN cargo build --release --locked --bin rollcall

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      redis-server redis-sentinel nginx prometheus curl ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/rollcall /usr/local/bin/rollcall
ENV ROLLCALL_LOG_FORMAT=json
EXPOSE 8888 8000 9090
CMD ["rollcall", "serve"]
