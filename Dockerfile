# SageMaker image of the preprocessing: `docker run IMAGE train` runs the bundled runner.
# Build: docker build -t master-poc-preprocess:1.0.0 .   (see README, "Running on SageMaker")
FROM python:3.11-slim-bookworm

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /opt/master-poc
# The locked dependency set first (a cached layer), then the package.
COPY constraints.txt setup.py ./
COPY pipeline/ pipeline/
COPY transforms/ transforms/
COPY launch/ launch/
RUN pip install -c constraints.txt . && pip check

# No credentials, accounts or buckets in the image: SageMaker provides the
# role's credentials and the job's hyperparameters at run time.
WORKDIR /opt/ml
ENTRYPOINT ["master-poc-sagemaker"]
