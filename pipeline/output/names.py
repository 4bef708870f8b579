"""The names of an output's files, importing nothing: pipeline.output.storage builds
every path from them, and pipeline.reader (which must not import Beam or
TensorFlow) finds the metadata and the split files by them."""

METADATA_NAME = "preprocessing_metadata.json"
STATISTICS_NAME = "statistics.json"
SCHEMA_NAME = "schema.pbtxt"
CONFIG_NAME = "config.yaml"
TABLE1_NAME = "table1.csv"
SUFFIX = ".tfrecord.gz"
# A split file's name, and the same as the metadata describes it for readers.
SHARD_NAME = "{split}-{index:05d}-of-{count:05d}" + SUFFIX
SHARD_PATTERN = "<split>/<split>-SSSSS-of-NNNNN" + SUFFIX


def split_files_glob(out: str, split: str) -> str:
    return f"{out.rstrip('/')}/{split}/*{SUFFIX}"
