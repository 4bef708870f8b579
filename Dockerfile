# SageMaker image of the preprocessing: `docker run IMAGE train` runs the bundled runner.
# Build: scripts/build-image.sh [--tag TAG] [--base IMAGE]  (docker where a daemon answers, else
# buildah; see the README, "Running on SageMaker").
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/master-poc
# The dependencies in their own layer, before any code: a code change
# rebuilds only the small layers below (TensorFlow comes in through tfx-bsl).
COPY requirements.txt constraints.txt ./
RUN pip install -c constraints.txt -r requirements.txt

# The package itself.
COPY setup.py MANIFEST.in README.md ./
COPY pipeline/ pipeline/
COPY transforms/ transforms/
COPY launch/ launch/
RUN pip install --no-deps -c constraints.txt . && pip check

# The commit the image was built from; written into every output's metadata.
ARG GIT_COMMIT=unknown
ENV MASTER_POC_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.revision=${GIT_COMMIT}

# No credentials, accounts or buckets in the image: SageMaker provides the
# role's credentials and the job's hyperparameters at run time.
WORKDIR /opt/ml
ENTRYPOINT ["master-poc-sagemaker"]
