# Stepbox: multi-stage build. The guest runtime (CPython component) is built inside the image
# build from guest-runtime/python, never copied in as a binary.
#
#   docker build -t stepbox .
#   docker run --read-only --tmpfs /tmp -p 50051:50051 -p 9090:9090 stepbox
#
# The final image runs as a non-root user and writes only to /tmp (job directories) and
# /var/cache/stepbox (compiled runtime, filled on first start): both can be emptyDir volumes, so
# the root filesystem can be read-only.

FROM rust:1.95-bookworm AS build
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN guest-runtime/python/build.sh \
 && cargo build --release --locked --bin stepbox

FROM debian:bookworm-slim
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin stepbox \
 && mkdir -p /var/cache/stepbox && chown stepbox /var/cache/stepbox
COPY --from=build /src/target/release/stepbox /usr/local/bin/stepbox
COPY --from=build /src/target/guest/python-runtime.wasm /usr/local/share/stepbox/python-runtime.wasm
COPY --from=build /src/target/guest/python-runtime.LICENSE-CPython.txt /src/target/guest/python-runtime.LICENSES-packages.txt /usr/local/share/stepbox/
COPY deploy/stepbox.toml /etc/stepbox/stepbox.toml
ENV STEPBOX_CONFIG=/etc/stepbox/stepbox.toml \
    STEPBOX_PYTHON_COMPONENT=/usr/local/share/stepbox/python-runtime.wasm \
    STEPBOX_CACHE_DIR=/var/cache/stepbox \
    STEPBOX_WORK_ROOT=/tmp/stepbox-work
USER 10001
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/stepbox"]
CMD ["serve"]
