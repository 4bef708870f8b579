"""master-poc-preprocessing: VitalDB -> windowed, normalised, patient-split TFRecords on Apache Beam.

Also what Beam ships to remote workers: `--setup_file ./setup.py`.
"""
from setuptools import setup

setup(
    name="master-poc-preprocessing",
    version="1.0.0",
    description="VitalDB anaesthesia recordings to windowed, normalised, patient-split TFRecords on Apache Beam",
    python_requires=">=3.11,<3.12",
    # Exactly the project's packages: never tests/.
    packages=["pipeline", "transforms", "launch"],
    install_requires=[
        "apache-beam[aws]==2.77.0",
        "tensorflow-metadata",
        "tfx-bsl==1.21.0",
        "numpy",
        "pandas",
        "pyarrow",
        "boto3",
        "google-crc32c",
        "matplotlib",  # the quality report written with every output
        "vitaldb==1.7.2",
    ],
    extras_require={
        # TensorFlow reads the output back (tests, users); the pipeline and inspect do not import it.
        "tf": ["tensorflow==2.21.0"],
        "launch": ["sagemaker>=3", "pyyaml"],
        "test": ["pytest", "moto[server]", "psutil", "tensorflow==2.21.0"],
    },
    entry_points={
        "console_scripts": [
            "master-poc-preprocess=pipeline.cli:main",
            "master-poc-generate=pipeline.sample:main",
            "master-poc-launch=launch.launcher:main",
            "master-poc-sagemaker=launch.entrypoint:main",
        ],
    },
)
