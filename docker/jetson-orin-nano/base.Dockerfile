# Generated from targets/jetson-orin-nano.yaml by `edgekit docker --write-dockerfiles`: edit the target, not this.
# Base image for jetson-orin-nano (linux/arm64): python3.10 and onnxruntime-gpu==1.23.0 numpy==1.26.4 in /opt/edgekit/site.
# docker buildx build --platform linux/arm64 -f base.Dockerfile -t edgekit-base-jetson-orin-nano:py3.10-onnxruntime-gpu1.23.0-numpy1.26.4 .
# onnxruntime-gpu for JetPack comes from NVIDIA's Jetson pip index: pass it as PIP_INDEX.
FROM nvcr.io/nvidia/l4t-jetpack:r36.4.0
ARG PIP_INDEX
# Security updates replace exact package versions in the archive; the distribution release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 python3-pip \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /results && chmod 1777 /results
RUN python3.10 -m pip install --no-cache-dir --target /opt/edgekit/site \
    --extra-index-url "${PIP_INDEX}" onnxruntime-gpu==1.23.0 numpy==1.26.4
