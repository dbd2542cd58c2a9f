# Generated from targets/rpi4-legacy.yaml by `edgekit docker --write-dockerfiles`: edit the target, not this.
# Base image for rpi4-legacy (linux/arm64): python3.11 and tflite-runtime==2.14.0 numpy==1.26.4 in /opt/edgekit/site.
# docker buildx build --platform linux/arm64 -f base.Dockerfile -t edgekit-base-rpi4-legacy:py3.11-tflite-runtime2.14.0-numpy1.26.4 .
FROM python:3.11-slim-bookworm AS wheels
RUN pip install --no-cache-dir --target /opt/edgekit/site tflite-runtime==2.14.0 numpy==1.26.4

FROM debian:bookworm-slim
# Security updates replace exact package versions in the archive; the distribution release is the pin.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 libstdc++6 libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && mkdir /results && chmod 1777 /results
COPY --from=wheels /opt/edgekit/site /opt/edgekit/site
