# Generated from targets/x86-64.yaml by `edgekit docker --write-dockerfiles`: edit the target, not this.
# Base image for x86-64 (linux/amd64): python3.11 and ai-edge-litert==2.1.0 onnxruntime==1.23.0 numpy==1.26.4 in /opt/edgekit/site.
# docker buildx build --platform linux/amd64 -f base.Dockerfile -t edgekit-base-x86-64:py3.11-ai-edge-litert2.1.0-onnxruntime1.23.0-numpy1.26.4 .
FROM python:3.11-slim-bookworm AS wheels
RUN pip install --no-cache-dir --target /opt/edgekit/site ai-edge-litert==2.1.0 onnxruntime==1.23.0 numpy==1.26.4

FROM debian:bookworm-slim
# Security updates replace exact package versions in the archive; the distribution release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 libstdc++6 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /results && chmod 1777 /results
COPY --from=wheels /opt/edgekit/site /opt/edgekit/site
