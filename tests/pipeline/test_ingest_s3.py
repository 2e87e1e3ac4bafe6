"""The S3 path against an S3-compatible server (moto) on 127.0.0.1: same shards, same counts."""

import sys
from pathlib import Path

import pyarrow.fs as pafs
import pytest

from pipeline.ingest import IngestConfig, ingest
from pipeline.preprocess import PreprocessConfig, run
from pipeline.stage import StageContext
from pipeline.storage import resolve

moto_server = pytest.importorskip("moto.server")
sys.path.insert(0, str(Path(__file__).parent))
import badcorpus

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def s3_endpoint():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


def _upload(local: Path, bucket_prefix: str, fs: pafs.FileSystem) -> None:
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        with fs.open_output_stream(f"{bucket_prefix}/{path.relative_to(local).as_posix()}") as f:
            f.write(path.read_bytes())


def test_ingest_and_preprocess_through_s3_match_local(tmp_path, s3_endpoint, monkeypatch,
                                                       ray_local):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3_endpoint)
    monkeypatch.setenv("AWS_REGION", "us-east-1")
    fs = pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                           endpoint_override=s3_endpoint, allow_bucket_creation=True)
    fs.create_dir("data")
    corpus = tmp_path / "corpus"
    badcorpus.write_corpus(corpus)
    _upload(corpus, "data/corpus", fs)

    # Ingest (repairing the corpus) from S3 to S3 and locally: identical shards and quarantine.
    remote = ingest(IngestConfig(source="s3://data/corpus"), "s3://data/ingested")
    local = ingest(IngestConfig(source=str(corpus)), tmp_path / "ingested")
    assert [(r["path"], r["sha256"]) for r in remote["shards"]] == [
        (r["path"], r["sha256"]) for r in local["shards"]]
    assert {k: v for k, v in remote["counts"].items()} == local["counts"]
    assert resolve("s3://data/ingested/train/shard-000000.tar").sha256() == \
        local["shards"][0]["sha256"]

    # Preprocess the raw corpus from S3 and from disk: same counts.
    config = PreprocessConfig(image_size=16, sample_rate=8000, audio_samples=1600,
                              text_max_len=16, num_actors=1)
    counts = []
    for name, shards in (("s3", "s3://data/corpus"), ("local", corpus)):
        out = tmp_path / f"pre-{name}"
        out.mkdir()
        counts.append(run(config, StageContext(output_dir=out, inputs={"shards": shards}))
                      ["counts"])
    assert counts[0] == counts[1] and counts[0]["quarantined"] > 0
