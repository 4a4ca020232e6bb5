# picie in a container. GPU (default target):
#   docker build -t picie .
#   docker run --gpus all -p 8080:8080 -v picie-data:/data picie
# CPU only:
#   docker build --target cpu -t picie:cpu .
#   docker run -p 8080:8080 -v picie-data:/data picie:cpu

# 1. The release binary.
FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY migrations migrations
COPY static static
COPY benches benches
RUN cargo build --release --locked

# 2. ONNX Runtime from PyPI: the CPU build (as scripts/setup.sh) and the GPU build, whose
#    newest release is 1.31.1 (1.27+ needs CUDA 13). Both versions are named alike in
#    scripts/setup.sh and scripts/gpu-check.sh; tests/versions.rs fails when they drift.
FROM python:3.11-slim AS ort
ARG ORT_VERSION=1.32.0
ARG ORT_GPU_VERSION=1.31.1
RUN pip download --no-deps --only-binary=:all: -d /whl "onnxruntime-gpu==${ORT_GPU_VERSION}" "onnxruntime==${ORT_VERSION}" \
 && mkdir -p /gpu /cpu /x/gpu /x/cpu \
 && python -m zipfile -e /whl/onnxruntime_gpu-*.whl /x/gpu && cp /x/gpu/onnxruntime/capi/*.so* /gpu/ \
 && python -m zipfile -e /whl/onnxruntime-*.whl /x/cpu && cp /x/cpu/onnxruntime/capi/libonnxruntime*.so* /cpu/ \
 && ln -s "libonnxruntime.so.${ORT_GPU_VERSION}" /gpu/libonnxruntime.so && ln -s "libonnxruntime.so.${ORT_VERSION}" /cpu/libonnxruntime.so

# 3a. CPU runtime.
FROM debian:bookworm-slim AS cpu
RUN useradd --uid 10001 --create-home picie && mkdir /data && chown picie /data
COPY --from=build /src/target/release/picie /usr/local/bin/picie
COPY --from=ort /cpu/ /opt/onnxruntime/lib/
COPY models /opt/picie/models
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so \
    PICIE_MODELS_DIR=/opt/picie/models PICIE_DATA_DIR=/data PICIE_PORT=8080 PICIE_DEVICE=cpu
# Without PICIE_API_KEY only loopback clients (inside the container) may change state: from
# outside, uploads, jobs and model activation answer 403. Pass a key to manage it remotely:
#   docker run -e PICIE_API_KEY=... ; clients send it as `x-api-key` or `Authorization: Bearer`.
ENV PICIE_API_KEY=
VOLUME /data
USER picie
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["picie", "healthcheck"]
ENTRYPOINT ["picie", "serve"]

# 3b. GPU runtime (default): CUDA 13 with cuDNN; falls back to CPU when no GPU is passed in.
FROM nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04 AS gpu
RUN useradd --uid 10001 --create-home picie && mkdir /data && chown picie /data
COPY --from=build /src/target/release/picie /usr/local/bin/picie
COPY --from=ort /gpu/ /opt/onnxruntime/lib/
COPY models /opt/picie/models
ENV ORT_DYLIB_PATH=/opt/onnxruntime/lib/libonnxruntime.so LD_LIBRARY_PATH=/opt/onnxruntime/lib \
    PICIE_MODELS_DIR=/opt/picie/models PICIE_DATA_DIR=/data PICIE_PORT=8080 PICIE_DEVICE=auto
# Without PICIE_API_KEY only loopback clients (inside the container) may change state: from
# outside, uploads, jobs and model activation answer 403. Pass a key to manage it remotely:
#   docker run -e PICIE_API_KEY=... ; clients send it as `x-api-key` or `Authorization: Bearer`.
ENV PICIE_API_KEY=
VOLUME /data
USER picie
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s CMD ["picie", "healthcheck"]
ENTRYPOINT ["picie", "serve"]
