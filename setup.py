"""master-poc-preprocessing: VitalDB -> windowed, normalised, patient-split TFRecords on Apache Beam.

Also what Beam ships to remote workers: `--setup_file ./setup.py`.
"""
import pathlib

from setuptools import find_packages, setup

HERE = pathlib.Path(__file__).resolve().parent
# One list of run-time requirements, shared with the Dockerfile's dependency layer.
REQUIRES = [line.strip() for line in (HERE / "requirements.txt").read_text().splitlines()
            if line.strip() and not line.startswith("#")]

setup(
    name="master-poc-preprocessing",
    version="1.0.0",
    description="VitalDB anaesthesia recordings to windowed, normalised, patient-split TFRecords on Apache Beam",
    python_requires=">=3.11,<3.12",
    # Exactly the project's packages: never tests/.
    packages=find_packages(include=["pipeline", "pipeline.*", "transforms", "transforms.*", "launch"]),
    # the shipped track maps (usable by name) and the launcher's dated price table
    package_data={"transforms": ["trackmaps/*.yaml"], "launch": ["prices.json"]},
    install_requires=REQUIRES,
    extras_require={
        # TensorFlow reads the output back (tests, users); the pipeline and inspect do not import it.
        "tf": ["tensorflow==2.21.0"],
        "launch": ["sagemaker>=3", "pyyaml"],
        "test": ["pytest", "moto[server]", "psutil", "tensorflow==2.21.0", "mkdocs-material", "ruff"],
    },
    entry_points={
        "console_scripts": [
            "master-poc-preprocess=pipeline.cli:main",
            "master-poc-generate=pipeline.tools.sample:main",
            "master-poc-launch=launch.launcher:main",
            "master-poc-sagemaker=launch.entrypoint:main",
        ],
    },
)
