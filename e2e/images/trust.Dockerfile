# syntax=docker/dockerfile:1
# Adds e2e/kind-up.sh's registry CA to an image, so that its Python (requests, under oras) trusts the in-cluster
# registry's TLS certificate. The build context is the folder holding registry-ca.crt (e2e/.state/trust).
#   docker build -f e2e/images/trust.Dockerfile --build-arg BASE=quantrol/worker-cpu:e2e -t quantrol/worker:e2e \
#     e2e/.state/trust
ARG BASE
FROM ${BASE}
COPY registry-ca.crt /etc/quantrol-e2e/registry-ca.crt
# Replaces the CA bundle for requests: the e2e pods reach nothing outside the cluster.
ENV REQUESTS_CA_BUNDLE=/etc/quantrol-e2e/registry-ca.crt
