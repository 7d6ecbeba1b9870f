"""reclip_ray.storage against a real S3 API (moto's server on localhost) and the local disk, the same calls."""

from __future__ import annotations

import json
import os
import threading

import pytest

from reclip_ray import storage
from reclip_ray.errors import DataError


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_prefix")


def test_join_keeps_the_scheme_where_pathlib_loses_it():
    from pathlib import Path

    assert str(Path("s3://b/runs") / "x") == "s3:/b/runs/x"  # the bug this module exists for
    assert storage.join("s3://b/runs", "x", "meta.json") == "s3://b/runs/x/meta.json"
    assert storage.join("s3://b/runs/", "x") == "s3://b/runs/x"
    assert storage.join("/tmp/runs", "x") == "/tmp/runs/x"
    assert storage.parent("s3://b/runs/x") == "s3://b/runs"
    assert storage.name("s3://b/runs/x/") == "x"
    assert storage.local_path("file:///tmp/a") == "/tmp/a"
    assert storage.local_path("s3://b/a") is None
    assert storage.normalize("relative/dir") == os.path.abspath("relative/dir")
    # Ray Train's URI parser drops empty folder names: so does the run folder's spelling (train.prepare)
    assert storage.normalize("s3://b//runs//x/") == "s3://b/runs/x" and storage.normalize("gs://b/") == "gs://b"


MINIO = "?endpoint_override=http://minio:9000&scheme=http"


def test_a_uris_query_is_its_stores_options_and_paths_are_made_before_it():
    """``s3://b/runs?endpoint_override=...`` (MinIO, R2, Ceph) is the key ``runs`` on that endpoint, as pyarrow and
    Ray Train read it. ``join`` appended after the query (``hdfs://nn/x?user=u/run``: the user ``u/run``), and
    ``pyarrow_uri`` encoded the ``?``, so Ray Train wrote under a key named ``runs?endpoint_override=...`` at AWS."""
    import pyarrow.fs as pafs

    assert storage.join(f"s3://b/runs{MINIO}", "run", "meta.json") == f"s3://b/runs/run/meta.json{MINIO}"
    assert storage.join(f"s3://b/runs/{MINIO}", "run") == f"s3://b/runs/run{MINIO}"
    assert storage.join("hdfs://nn:8020/x?user=u", "run") == "hdfs://nn:8020/x/run?user=u"
    assert storage.parent(f"s3://b/runs/run{MINIO}") == f"s3://b/runs{MINIO}"
    assert storage.parent("hdfs://nn/x/run/?user=u") == "hdfs://nn/x?user=u"
    assert storage.name(f"s3://b/runs/run/{MINIO}") == "run" and storage.name("hdfs://nn/x?user=u") == "x"
    assert storage.normalize(f"s3://b//runs//{MINIO}") == f"s3://b/runs{MINIO}"
    assert storage.normalize("hdfs://nn//x/?user=u") == "hdfs://nn/x?user=u" and storage.normalize("s3://b/x?") == (
        "s3://b/x")
    assert storage.relative(f"s3://b/d/x/y.parquet{MINIO}", f"s3://b/d{MINIO}") == "x/y.parquet"
    assert storage.pyarrow_uri(f"s3://b/my runs{MINIO}") == f"s3://b/my%20runs{MINIO}"  # the query as written
    assert storage.pyarrow_uri("hdfs://nn/x?user=u") == "hdfs://nn/x?user=u"
    for path in (f"s3://b/my runs/run{MINIO}", f"gs://b/runs/run{MINIO}"):  # the key pyarrow (Ray Train) reads
        fs, inner = pafs.FileSystem.from_uri(storage.pyarrow_uri(path))
        assert inner == path.split("://")[1].split("?")[0], path
        assert fs.__reduce__()[1][0]["endpoint_override"] == "http://minio:9000", path
    # a local path is no URI: '?' and '#' are file names there
    assert storage.join("/tmp/a?b", "c#d") == "/tmp/a?b/c#d" and storage.name("/tmp/a?b") == "a?b"


@pytest.mark.parametrize("path", ["hdfs://nn/x#y", "mock://nn/runs#1?user=u"])
def test_a_fragment_in_a_uri_is_one_line_naming_it(path):
    """On HDFS, Azure and the like pyarrow parses the path and drops a ``#fragment`` (Ray Train with it), while this
    module would have kept it: refused where it is given."""
    for call in (storage.normalize, storage.filesystem, storage.pyarrow_uri, lambda p: storage.join(p, "x")):
        with pytest.raises(DataError, match="'#' starts a URI fragment") as info:
            call(path)
        assert str(info.value).startswith(path) and "\n" not in str(info.value)
    with pytest.raises(DataError, match="cannot name 'a\\?b' under it"):
        storage.join("s3://b/runs", "a?b")  # a part that would read as options
    with pytest.raises(DataError, match="cannot name 'c#d' under it"):
        storage.join("hdfs://nn/x", "c#d")


def test_an_s3_key_keeps_its_hash_as_written(s3_prefix):
    """An S3 or GCS key is the text after the bucket as written, '#' included (scraped images are named
    ``photo#1.jpg``): readable and listable here, and given to Ray encoded (``%23``), which pyarrow decodes back."""
    import pyarrow.fs as pafs

    path = storage.join(s3_prefix, "imgs", "photo#1.jpg")
    storage.write_bytes(path, b"x")
    assert storage.read_bytes(path) == b"x" and storage.list_files(storage.join(s3_prefix, "imgs")) == [path]
    assert storage.pyarrow_uri("s3://b/runs#1") == "s3://b/runs%231"
    assert pafs.FileSystem.from_uri(storage.pyarrow_uri(f"s3://b/runs#1{MINIO}"))[1] == "b/runs#1"


def _count_from_uri(monkeypatch) -> list[str]:
    """Every URI ``pyarrow.fs.FileSystem.from_uri`` is given from now on (the module's cache emptied first)."""
    import pyarrow.fs as pafs

    real = pafs.FileSystem
    built: list[str] = []

    class Counting(real):
        @staticmethod
        def from_uri(uri):
            built.append(uri)
            return real.from_uri(uri)

    monkeypatch.setattr(pafs, "FileSystem", Counting)
    storage._remote_filesystem.cache_clear()
    return built


def test_options_pyarrow_refuses_are_one_line_naming_the_path_and_the_rule():
    """pyarrow refuses options it does not know (``Unexpected query parameter in S3 URI``): a mistyped option, or
    a key spelt with '?' (a glob's one-character wildcard) in a URI."""
    for path in ("s3://b/runs?endpoint=http://minio:9000", "s3://b/shard-0?.parquet"):
        with pytest.raises(DataError, match="Unexpected query parameter") as info:
            storage.filesystem(path)
        message = str(info.value)
        assert message.startswith(f"cannot open {path}: ") and "the text after '?' is the filesystem's options" in (
            message) and "\n" not in message


def test_an_s3_filesystem_adds_delayed_open_to_the_users_options_and_keeps_theirs(monkeypatch):
    """The filesystem of a URI with options is built with them, once per (scheme, authority, query), with
    ``allow_delayed_open=true`` added (one PUT per small object) unless the user set it; a large object's
    filesystem never delays (``_put_object``: a refused CreateMultipartUpload must raise at the open)."""
    import pyarrow.fs as pafs

    built = _count_from_uri(monkeypatch)
    try:
        fs, inner = storage.filesystem(f"s3://b/runs/run{MINIO}")
        storage.filesystem(f"s3://b/other{MINIO}")
        assert inner == "b/runs/run" and built == [f"s3://b/{MINIO}&allow_delayed_open=true"], built
        options = fs.__reduce__()[1][0]
        assert (options["endpoint_override"], options["scheme"], options["allow_delayed_open"]) == (
            "http://minio:9000", "http", True)
        own = storage.filesystem("s3://b/x?region=eu-west-1&allow_delayed_open=false")[0].__reduce__()[1][0]
        assert (own["region"], own["allow_delayed_open"]) == ("eu-west-1", False)
        large = storage._remote_filesystem("s3", "b", "allow_delayed_open=true&region=r", delayed_open=False)[0]
        assert large.__reduce__()[1][0]["allow_delayed_open"] is False
        storage.filesystem("mock://store/x?user=u")
        assert built[-1] == "mock://store/?user=u"
    finally:
        storage._remote_filesystem.cache_clear()
    assert storage._boto3_options("endpoint_override=minio:9000&scheme=http&region=eu") == {
        "endpoint_url": "http://minio:9000", "region_name": "eu"}
    assert storage._boto3_options("endpoint_override=https://r2.example:443") == {
        "endpoint_url": "https://r2.example:443"}
    assert storage._boto3_options("") == {}  # boto3 reads AWS_ENDPOINT_URL itself, as pyarrow does
    # a repeated option is pyarrow's first value (the abort must reach the store the upload went to); a self-signed
    # MinIO's tls_verify_certificates=false is boto3's verify=False, or it could not list the uploads to abort
    twice = "endpoint_override=a.example:1&endpoint_override=b.example:2&region=r1&region=r2"
    assert pafs.FileSystem.from_uri(f"s3://b/k?{twice}")[0].__reduce__()[1][0]["endpoint_override"] == "a.example:1"
    assert storage._boto3_options(twice) == {"endpoint_url": "https://a.example:1", "region_name": "r1"}
    assert storage._boto3_options("endpoint_override=m:9&tls_verify_certificates=false")["verify"] is False


@pytest.mark.parametrize("env_endpoint", ["absent", "elsewhere"])
def test_an_endpoint_given_only_in_the_uri_is_where_every_read_write_and_abort_goes(
        s3_server, s3_prefix, s3_faults, s3_requests, tmp_path, monkeypatch, env_endpoint):
    """With ``AWS_ENDPOINT_URL`` unset (or naming another store) a run folder under
    ``s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http`` is written, listed, read and deleted at that
    endpoint, under ``prefix/run/`` (listed here with boto3 at the server); a small object is still one PUT
    (delayed open kept beside the user's options), and a large upload refused part-way is aborted there by boto3
    (a client for the URI's endpoint), not looked for at AWS."""
    import boto3

    at_server = boto3.client("s3", endpoint_url=s3_server)
    bucket, key = s3_prefix[len("s3://"):].split("/", 1)
    if env_endpoint == "absent":
        monkeypatch.delenv("AWS_ENDPOINT_URL")
    else:
        monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(storage, "_S3_CLIENTS", {})
    storage._remote_filesystem.cache_clear()
    try:
        options = f"endpoint_override={s3_server.split('://')[1]}&scheme=http"
        run = storage.join(storage.normalize(f"{s3_prefix}/?{options}"), "run")
        assert run == f"{s3_prefix}/run?{options}"
        s3_requests.clear()
        storage.write_json(storage.join(run, "reclip_run.json"), {"run": 1})
        assert [m for m, p in s3_requests] == ["PUT"], s3_requests  # one PutObject: delayed open kept
        model = tmp_path / "model"
        (model / "sub").mkdir(parents=True)
        (model / "config.yaml").write_text("a: 1\n")
        (model / "sub" / "weights.bin").write_bytes(b"w" * (storage.SINGLE_PUT_BYTES + 1))  # a multipart upload
        storage.upload_dir(str(model), storage.join(run, "model"))
        assert storage.list_files(run) == [storage.join(run, name) for name in (
            "model/config.yaml", "model/sub/weights.bin", "reclip_run.json")]
        assert storage.read_json(storage.join(run, "reclip_run.json")) == {"run": 1}
        assert storage.read_bytes(storage.join(run, "model", "config.yaml")) == b"a: 1\n"
        listed = at_server.list_objects_v2(Bucket=bucket)["Contents"]
        assert sorted(o["Key"] for o in listed if o["Key"].startswith(key)) == [
            f"{key}/run/{name}" for name in ("model/config.yaml", "model/sub/weights.bin", "reclip_run.json")]
        assert not [o["Key"] for o in listed if "?" in o["Key"] or "endpoint_override" in o["Key"]]
        big = storage.join(run, "big.bin")
        refused = s3_faults(f"{key}/run/big.bin", times=1, query="partNumber=2")
        with pytest.raises(OSError, match="ACCESS_DENIED during UploadPart"):
            storage.write_bytes(big, os.urandom(3 * storage.SINGLE_PUT_BYTES))
        assert refused, "the planted refusal was not reached"
        uploads = at_server.list_multipart_uploads(Bucket=bucket, Prefix=f"{key}/run/").get("Uploads", [])
        assert uploads == [], "the refused upload was left open at the URI's endpoint"
        storage.delete_file(storage.join(run, "reclip_run.json"))
        storage.delete_dir(storage.join(run, "model"))
        assert not storage.exists(storage.join(run, "reclip_run.json")) and storage.list_files(run) == []
        left = at_server.list_objects_v2(Bucket=bucket, Prefix=f"{key}/").get("Contents", [])
        assert [(o["Key"], o["Size"]) for o in left] == [(f"{key}/run/", 0)]  # pyarrow's marker of the emptied folder
    finally:
        storage._remote_filesystem.cache_clear()


def test_read_write_delete_round_trip(root, tmp_path):
    path = storage.join(root, "sub", "state.json")
    assert not storage.exists(path)
    assert storage.read_json(path, default={"none": 1}) == {"none": 1}
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(path)
    storage.write_json(path, {"a": 1})
    assert storage.is_file(path) and storage.read_json(path) == {"a": 1}
    storage.write_json(path, {"a": 2})  # overwrite in place
    assert storage.read_json(path) == {"a": 2}
    storage.delete_file(path)
    storage.delete_file(path)  # absent: no error
    assert not storage.exists(path)
    if storage.local_path(root):  # no temporary file left beside it
        assert os.listdir(os.path.dirname(storage.local_path(path))) == []


def test_upload_replaces_a_folder_and_download_returns_it(root, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    (src / "a.txt").write_text("one")
    (src / "b.txt").write_text("two")
    target = storage.join(root, "model")
    storage.upload_dir(str(src), target)
    (src / "b.txt").unlink()
    (src / "a.txt").write_text("three")
    storage.upload_dir(str(src), target)  # a second export replaces the first: no stale b.txt
    out = storage.download_dir(target, str(tmp_path / "back"))
    assert sorted(os.listdir(out)) == ["a.txt"]
    assert open(os.path.join(out, "a.txt")).read() == "three"
    storage.delete_dir(target)
    assert not storage.exists(storage.join(target, "a.txt"))


def test_a_folder_is_downloaded_in_ranged_reads_of_one_part_each_every_byte_once(tmp_path, s3_prefix, s3_requests):
    """``copy_to_local`` (restores, exports, evaluations read folders through it): files of every size around the
    part size, an empty one and a nested folder come back byte for byte, each file read in ranged GETs of one part
    that tile it, several in flight at once, instead of ``pyarrow.fs.copy_files``' 1 MB GETs one after another."""
    from conftest import S3_RANGE_LATENCY_S, S3_RANGES

    part = 256 << 10
    src = tmp_path / "ckpt"
    (src / "nested").mkdir(parents=True)
    sizes = {"empty.bin": 0, "one.bin": 1, "under.bin": part - 1, "exact.bin": part, "over.bin": part + 1,
             "nested/big.bin": 3 * part + part // 2}
    payloads = {name: os.urandom(size) for name, size in sizes.items()}
    for name, data in payloads.items():
        (src / name).write_bytes(data)
    target = f"{s3_prefix}/ckpt"
    storage.upload_dir(str(src), target)
    S3_RANGES.clear()

    fs, inner = storage.filesystem(target)
    S3_RANGE_LATENCY_S[0] = 0.05  # so that overlapping GETs show as such
    try:
        storage.copy_to_local(fs, inner, str(tmp_path / "back"), part_bytes=part, threads=4)
    finally:
        S3_RANGE_LATENCY_S[0] = 0.0

    for name, data in payloads.items():
        assert (tmp_path / "back" / name).read_bytes() == data, name
    got: dict[str, list[tuple[int, int]]] = {}
    for path, first, last, _ in S3_RANGES:
        got.setdefault(path.split("/ckpt/", 1)[1], []).append((first, last))
    want = {name: [(o, min(o + part, size) - 1) for o in range(0, size, part)] for name, size in sizes.items() if size}
    assert {name: sorted(r) for name, r in got.items()} == want
    assert max(in_flight for *_, in_flight in S3_RANGES) > 1  # the GETs overlap
    # One thread: 4 files open at a time, so the 6 come in two rounds
    storage.copy_to_local(fs, inner, str(tmp_path / "again"), part_bytes=part, threads=1)
    for name, data in payloads.items():
        assert (tmp_path / "again" / name).read_bytes() == data, name


def test_read_bytes_reads_a_small_file_in_one_get_and_a_large_one_in_parallel_parts(s3_prefix, monkeypatch):
    """``read_bytes`` (single-file exports and ``init_from`` files, every JSON): pyarrow's stream read would take
    256 KB GETs one after another."""
    from conftest import S3_RANGE_LATENCY_S, S3_RANGES

    part = 256 << 10
    monkeypatch.setattr(storage, "PART_BYTES", part)
    big, small = os.urandom(5 * part + 7), b'{"a": 1}'
    storage.write_bytes(f"{s3_prefix}/big.bin", big)
    storage.write_bytes(f"{s3_prefix}/small.json", small)
    S3_RANGES.clear()
    S3_RANGE_LATENCY_S[0] = 0.05
    try:
        assert storage.read_bytes(f"{s3_prefix}/big.bin") == big
    finally:
        S3_RANGE_LATENCY_S[0] = 0.0
    assert sorted((first, last) for _, first, last, _ in S3_RANGES) == [
        (o, min(o + part, len(big)) - 1) for o in range(0, len(big), part)]
    assert max(in_flight for *_, in_flight in S3_RANGES) > 1
    S3_RANGES.clear()
    assert storage.read_json(f"{s3_prefix}/small.json") == {"a": 1}
    assert [(first, last) for _, first, last, _ in S3_RANGES] == [(0, len(small) - 1)]


def _read_while_rewritten(path: str, versions: list[str]) -> tuple[int, list[bytes]]:
    """Read ``path`` over and over while another thread writes ``versions`` to it one after another, as Ray Train
    rewrites its checkpoint snapshot; (reads made, reads that are none of the versions)."""
    storage.write_text(path, versions[0])
    done = threading.Event()

    def write_all() -> None:
        try:
            for text in versions[1:]:
                storage.write_text(path, text)
        finally:
            done.set()

    writer = threading.Thread(target=write_all)
    writer.start()
    reads, torn, whole = 0, [], {v.encode() for v in versions}
    while not done.is_set():
        data = storage.read_bytes(path)
        reads += 1
        if data not in whole:
            torn.append(data)
    writer.join()
    return reads, torn


def test_an_object_replaced_while_it_is_read_is_read_again_never_returned_torn(s3_prefix, s3_requests):
    """CI saw a sweep's test read Ray's ``checkpoint_manager_snapshot.json`` on S3 cut short (a JSONDecodeError):
    pyarrow HEADs an object for its size, then GETs that many bytes of whatever version is there by then. A longer
    version comes back cut at the old size; a shorter one padded to the old size with uninitialised memory, without
    an error. Versions that grow (as Ray's snapshot does), then shrink; with the check removed about 4 reads in 10 are
    torn."""
    versions = [json.dumps({"checkpoint_results": list(range(n))}) for n in range(1, 121)]
    for order in (versions, versions[::-1]):
        reads, torn = _read_while_rewritten(f"{s3_prefix}/checkpoint_manager_snapshot.json", order)
        assert reads >= 1 and torn == [], (reads, [t[-40:] for t in torn[:3]])

    # What the check costs: one HEAD after the GET; none for a file read with may_change=False (an image to convert)
    s3_requests.clear()
    assert storage.read_json(f"{s3_prefix}/checkpoint_manager_snapshot.json") == {"checkpoint_results": [0]}
    assert [m for m, p in s3_requests if "checkpoint_manager_snapshot" in p] == ["HEAD", "GET", "HEAD"], s3_requests
    s3_requests.clear()
    snapshot = storage.read_bytes(f"{s3_prefix}/checkpoint_manager_snapshot.json", may_change=False)
    assert snapshot == b'{"checkpoint_results": [0]}'
    assert [m for m, p in s3_requests if "checkpoint_manager_snapshot" in p] == ["HEAD", "GET"], s3_requests


class _Store:
    """A stand-in object store: ``versions`` of one object, in turn, the next one served after each HEAD that
    follows a read; a read of ``fail`` raises as a ranged GET past the end of a shorter new version does."""

    def __init__(self, versions: list[bytes], fail: set[int] = frozenset()) -> None:
        self.versions, self.fail, self.reads, self.now = versions, fail, 0, 0

    def open_input_file(self, inner):
        import pyarrow as pa

        self.reads += 1
        reader = pa.BufferReader(self.versions[self.now])  # the open's HEAD: this version's size
        if self.reads - 1 in self.fail:
            def read_at(nbytes, offset):
                raise OSError("When reading information for key 'k': AWS Error INVALID_RANGE")

            return type("Failing", (), {"size": reader.size, "read_at": staticmethod(read_at),
                                        "__enter__": lambda self: self, "__exit__": lambda self, *a: None})()
        return reader

    def get_file_info(self, inner):
        import pyarrow.fs as pafs

        self.now = (self.now + 1) % len(self.versions)  # replaced while it was read
        return pafs.FileInfo(inner, type=pafs.FileType.File, size=len(self.versions[self.now]))


def test_a_read_that_fails_because_the_object_shrank_is_read_again_one_that_held_still_raises(monkeypatch):
    """A ranged GET past the end of a shorter new version fails (S3's 416): that is the replacement, not the
    object, so the read is repeated; the same failure on an object that did not change is raised."""
    store = _Store([b"a longer version", b"short", b"short"], fail={0})
    monkeypatch.setattr(storage, "filesystem", lambda path: (store, "bkt/k"))
    assert storage.read_bytes("s3://bkt/k") == b"short" and store.reads == 2
    store = _Store([b"same", b"same"], fail={0})
    monkeypatch.setattr(storage, "filesystem", lambda path: (store, "bkt/k"))
    with pytest.raises(OSError, match="INVALID_RANGE"):
        storage.read_bytes("s3://bkt/k")
    assert store.reads == 1


def test_an_object_replaced_at_every_read_is_one_line_after_the_wait_naming_it(monkeypatch):
    """A store whose object never holds still long enough to be read whole: an error naming the path, not a torn
    read and not a wait without end."""
    store = _Store([b"abc", b"abcd"])  # the HEAD after each read sees the other version
    monkeypatch.setattr(storage, "filesystem", lambda path: (store, "bkt/k"))
    monkeypatch.setattr(storage, "REPLACED_WAIT_S", 0.1)
    with pytest.raises(OSError, match=r"^s3://bkt/k: replaced while being read, again and again for 0 s$"):
        storage.read_bytes("s3://bkt/k")


def test_an_unknown_scheme_is_one_line_naming_the_path():
    from reclip_ray.errors import DataError

    with pytest.raises(DataError, match="cannot open nosuch://x/y"):
        storage.filesystem("nosuch://x/y")


def test_a_large_write_refused_at_its_start_leaves_the_old_object_not_an_empty_one(s3_prefix, s3_faults, s3_requests):
    """An object of ``SINGLE_PUT_BYTES`` or more is a multipart upload. Opened with delayed open, a refused
    CreateMultipartUpload made close() PUT what the stream held, nothing: the old object became an empty one (a
    ray.log holding every launch's lines, a data shard). A small object is still one PUT."""
    path = f"{s3_prefix}/ray.log"
    storage.write_bytes(path, b"old")
    refused = s3_faults("/ray.log", times=1)
    with pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.write_bytes(path, b"x" * storage.SINGLE_PUT_BYTES)
    assert refused and storage.read_bytes(path) == b"old"
    storage.write_bytes(path, b"x" * storage.SINGLE_PUT_BYTES)  # and without the refusal it is written whole
    assert storage.read_bytes(path) == b"x" * storage.SINGLE_PUT_BYTES
    s3_requests.clear()
    storage.write_bytes(path, b"small")
    assert [method for method, p in s3_requests if p.endswith("/ray.log")] == ["PUT"]


def test_a_file_replaced_while_it_is_downloaded_is_copied_again_never_kept_torn(s3_prefix, tmp_path, monkeypatch):
    """``download_file`` (``local_copy`` of a file) copies in parallel ranged GETs, each of whatever version is there
    by then: a file replaced meanwhile is copied again, as ``read_bytes`` reads one again. Versions of other sizes,
    rewritten in a loop while the file is copied over and over."""
    part = 64 << 10
    monkeypatch.setattr(storage, "PART_BYTES", part)
    versions = [bytes([i]) * (part * (2 + i % 3) + 7 * i) for i in range(30)]
    path, local = f"{s3_prefix}/weights.bin", str(tmp_path / "weights.bin")
    storage.write_bytes(path, versions[0])
    done = threading.Event()

    def write_all() -> None:
        try:
            for data in versions[1:]:
                storage.write_bytes(path, data)
        finally:
            done.set()

    writer = threading.Thread(target=write_all)
    writer.start()
    copies, torn = 0, []
    while not done.is_set():
        with open(storage.download_file(path, local), "rb") as f:
            data = f.read()
        copies += 1
        if data not in versions:
            torn.append((len(data), sorted(set(data))))
    writer.join()
    assert copies >= 1 and torn == [], (copies, torn[:3])
    assert open(storage.download_file(path, local), "rb").read() == versions[-1]
    with pytest.raises(FileNotFoundError):
        storage.download_file(f"{s3_prefix}/absent.bin", local)


@pytest.mark.parametrize("key", ["my runs", "my%20runs", "a+b/c;d=e", "ü/x", "runs/", ""])
def test_a_storage_path_given_to_ray_names_the_place_this_module_writes(s3_prefix, tmp_path, key):
    """Ray Train and Tune open ``storage_path`` with ``pyarrow.fs.FileSystem.from_uri``, which parses a URI: given
    ``s3://b/my%20runs`` as written, Ray Train wrote checkpoints under ``my runs/`` and the launcher the rest of the
    run folder (reclip_run.json, model/, the tokenizer) under ``my%20runs/``; given ``s3://b/my runs``, Ray Train
    refused it after the launch had begun. ``pyarrow_uri`` is what they are given (and a local or ``file://`` path
    as a plain one)."""
    import pyarrow.fs as pafs

    bucket = s3_prefix.split("/")[2]
    for base in (f"s3://{bucket}/{key}", str(tmp_path / key), f"file://{tmp_path / key}"):
        storage.write_json(storage.join(base, "run", "reclip_run.json"), {"at": base})
        fs, inner = pafs.FileSystem.from_uri(storage.pyarrow_uri(base))
        with fs.open_input_file(f"{inner.rstrip('/')}/run/reclip_run.json") as f:
            assert json.loads(f.read()) == {"at": base}, (base, storage.pyarrow_uri(base))
    assert storage.pyarrow_uri("gs://b/a b%") == "gs://b/a%20b%25"
    assert storage.pyarrow_uri("s3://b/runs/") == "s3://b/runs" and storage.pyarrow_uri("s3://b") == "s3://b"


@pytest.mark.parametrize("path", ["mock://nn/my runs", "mock://nn/my%20runs", "mock://nn/a%25b c/ü", "mock://nn/x?"])
def test_a_path_on_another_scheme_reaches_ray_as_the_folder_this_module_reads(path):
    """On schemes other than S3/GCS (HDFS, Azure) this module reads a path as pyarrow parses a URI (``%20`` is a
    space), but pyarrow refuses a raw space, so ``hdfs://nn/my runs`` passed the launch here and failed in Ray
    Train. ``mock://`` is pyarrow's in-memory filesystem, parsed as those are."""
    import pyarrow.fs as pafs

    assert pafs.FileSystem.from_uri(storage.pyarrow_uri(path))[1] == storage.filesystem(path)[1]


def test_every_storage_path_ray_parses_goes_through_pyarrow_uri():
    """Where the package hands a run or sweep folder to Ray (``RunConfig(storage_path=...)``, ``Tuner.restore``,
    ``Tuner.can_restore``), it passes ``storage.pyarrow_uri(...)``: the check above is worth nothing for a call
    that gives Ray the path as written."""
    import ast
    from pathlib import Path

    package = Path(storage.__file__).parent
    calls, bad = 0, []
    for file in package.rglob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            if not isinstance(node, ast.Call):
                continue
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            given = [k.value for k in node.keywords if k.arg == "storage_path" and func == "RunConfig"]
            given += node.args[:1] if func in ("restore", "can_restore") and "Tuner" in ast.unparse(node.func) else []
            for value in given:
                calls += 1
                if not (isinstance(value, ast.Call) and ast.unparse(value.func) == "storage.pyarrow_uri"):
                    bad.append(f"{file.relative_to(package)}:{node.lineno}: {ast.unparse(value)}")
    assert calls >= 5 and bad == []


def _open_uploads(s3_path: str) -> list[str]:
    """The multipart uploads the S3 server holds open for the object ``s3_path`` (boto3, as an operator would)."""
    import boto3

    bucket, key = s3_path[len("s3://"):].split("/", 1)
    listing = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=key)
    return [u["UploadId"] for u in listing.get("Uploads", []) if u["Key"] == key]


def test_a_large_write_refused_part_way_aborts_its_upload_and_keeps_the_old_object(s3_prefix, s3_faults, s3_requests):
    """S3 keeps (and bills) the parts of a multipart upload nobody completes or aborts; pyarrow leaves a failed one
    open (it binds no Abort in Python), so ``write_bytes`` aborts it: after a refused second part the server lists
    no upload of the key, the old object is intact, and another writer's upload of the key, begun before, is left
    alone. Without the abort the failed upload is listed."""
    import boto3

    path = f"{s3_prefix}/model.safetensors"
    storage.write_bytes(path, b"old")
    bucket, key = path[len("s3://"):].split("/", 1)
    other = boto3.client("s3").create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
    refused = s3_faults("/model.safetensors", times=1, query="partNumber=2")
    with pytest.raises(OSError, match="ACCESS_DENIED during UploadPart"):
        storage.write_bytes(path, os.urandom(3 * storage.SINGLE_PUT_BYTES))
    requests = [(m, "?uploads&" in p, "uploadId=" in p) for m, p in s3_requests if key in p or "?uploads&" in p]
    assert refused, "the planted refusal was not reached"
    assert _open_uploads(path) == [other]
    assert storage.read_bytes(path) == b"old"
    # What it costs: one LIST of the key's uploads before a multipart write; on failure one more and a DELETE
    assert requests.count(("GET", True, False)) == 2 and requests.count(("DELETE", False, True)) == 1, requests


def test_a_folder_upload_whose_file_is_refused_raises_and_leaves_no_part_of_it_nor_an_open_upload(
        s3_prefix, s3_faults, tmp_path):
    """``upload_dir`` went through ``pyarrow.fs.copy_files``, which leaves the closing of each file to a destructor:
    a refused part was an ignored error on stderr (the upload returned, the old file stayed, its upload stayed
    open), and a refused CreateMultipartUpload left the first 10 MB of the file as the object, a file the manifest
    (``folders``) later caught as not matching. Now a refused file raises, the old object (or none, for a new
    file) stays whole, no upload is left open, and the other files go up whole."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "weights.bin").write_bytes(b"old weights")
    target = f"{s3_prefix}/model"
    storage.upload_dir(str(src), target)
    big = os.urandom(3 * storage.SINGLE_PUT_BYTES)
    (src / "weights.bin").write_bytes(big)
    (src / "new.bin").write_bytes(big)
    (src / "config.json").write_text("{}")
    for query in ("uploads", "partNumber=2"):  # CreateMultipartUpload refused; the second part refused
        refused = [s3_faults("/weights.bin", times=1, query=query), s3_faults("/new.bin", times=1, query=query)]
        with pytest.raises(OSError, match="ACCESS_DENIED"):
            storage.upload_dir(str(src), target)
        assert all(refused), (query, refused)  # both files began (3 files, 3 threads), both were refused
        assert storage.read_bytes(f"{target}/weights.bin") == b"old weights", query
        assert not storage.exists(f"{target}/new.bin"), query
        assert storage.read_bytes(f"{target}/config.json") == b"{}"
        assert _open_uploads(f"{target}/weights.bin") == [] and _open_uploads(f"{target}/new.bin") == [], query
    storage.upload_dir(str(src), target)  # and without a refusal every file goes up whole
    assert storage.read_bytes(f"{target}/weights.bin") == big and storage.read_bytes(f"{target}/new.bin") == big


def test_a_remote_filesystem_is_built_once_per_process_for_its_scheme_and_authority(monkeypatch, tmp_path):
    """``pyarrow.fs.FileSystem.from_uri`` builds a client each call (an HDFS connection, an S3 region lookup).
    ``filesystem`` built one more for every path of a scheme other than S3 and GCS, only to learn the path inside
    it: a checkpoint of N files on HDFS was N connections. Counted here with pyarrow's own mock:// filesystem (a
    real pyarrow filesystem that from_uri builds, empty each time): a run folder's writes, reads, listings, an
    upload and a download build it once, and the paths are still the ones from_uri gives."""
    import pyarrow.fs as pafs

    built = _count_from_uri(monkeypatch)
    try:
        run = "mock://store/runs/my%20run"
        for step in range(3):
            storage.makedirs(storage.join(run, f"checkpoint_{step}"))
            storage.write_json(storage.join(run, f"checkpoint_{step}", "meta.json"), {"step": step})
        assert [storage.read_json(storage.join(run, f"checkpoint_{s}", "meta.json")) for s in range(3)] == [
            {"step": 0}, {"step": 1}, {"step": 2}]
        assert storage.is_dir(run) and storage.is_file(storage.join(run, "checkpoint_0", "meta.json"))
        src = tmp_path / "model"
        (src / "sub").mkdir(parents=True)
        (src / "a.txt").write_text("a")
        (src / "sub" / "b.txt").write_text("b")
        storage.upload_dir(str(src), storage.join(run, "model"))
        assert storage.list_files(storage.join(run, "model")) == [f"{run}/model/a.txt", f"{run}/model/sub/b.txt"]
        back = storage.download_dir(storage.join(run, "model"), str(tmp_path / "back"))
        assert open(os.path.join(back, "sub", "b.txt")).read() == "b"
        storage.delete_file(storage.join(run, "checkpoint_0", "meta.json"))
        assert not storage.exists(storage.join(run, "checkpoint_0", "meta.json"))
        assert built == ["mock://store/"], built
        storage.exists("mock://other/x")  # another authority: a filesystem of its own
        assert built == ["mock://store/", "mock://other/"]
    finally:
        storage._remote_filesystem.cache_clear()
    for uri in ("mock://store/runs/my%20run/a", "mock://store/a?b=1", "mock://store", "mock://store/",
                "abfs://box@acct.dfs.core.windows.net/runs/my%20run", "abfs://box@acct.dfs.core.windows.net"):
        assert storage.filesystem(uri)[1] == pafs.FileSystem.from_uri(uri)[1], uri
    storage._remote_filesystem.cache_clear()


def test_without_boto3_a_failed_upload_is_left_open_with_a_warning_naming_it(s3_prefix, s3_faults, monkeypatch,
                                                                              caplog):
    """pyarrow cannot abort an upload from Python, so the abort takes boto3; without it the write still fails whole
    (the old object stays) and the upload it leaves is named in a warning, with the lifecycle rule that removes it."""
    import sys

    path = f"{s3_prefix}/shard.parquet"
    storage.write_bytes(path, b"old")
    monkeypatch.setitem(sys.modules, "boto3", None)  # import boto3 fails, find_spec finds none
    s3_faults("/shard.parquet", times=1, query="partNumber=2")
    with caplog.at_level("WARNING", logger="reclip_ray.storage"), pytest.raises(OSError, match="ACCESS_DENIED"):
        storage.write_bytes(path, os.urandom(2 * storage.SINGLE_PUT_BYTES))
    assert storage.read_bytes(path) == b"old"
    assert [r.getMessage() for r in caplog.records] == [
        f"{path}: the failed multipart upload is left open on the bucket (it takes boto3 and the "
        "s3:ListBucketMultipartUploads permission to abort it; a lifecycle rule with AbortIncompleteMultipartUpload "
        "removes it)"]
    monkeypatch.delitem(sys.modules, "boto3")
    assert len(_open_uploads(path)) == 1


def test_a_large_write_holds_a_bounded_number_of_parts_not_a_copy_of_the_object(s3_prefix, tmp_path):
    """pyarrow's S3 stream copies each 10 MB part of a ``write`` and queues it for its I/O threads with no bound: one
    ``write`` of a whole 300 MB object added 300 MB to the writer's peak (rank 0's model export: 600 MB for vit-b-16,
    1.7 GB for vit-l-16), and ``upload_dir``'s memory-mapped file 300 MB more. Written a part at a time and flushed
    every ``PARTS_IN_FLIGHT`` parts, with the mapped pages of each part dropped, both add ~80-90 MB. Measured as the
    growth of VmHWM in a fresh process (``tests/child.py``), after one small multipart write has built what a process
    builds once (boto3, the S3 clients); the object is checked whole."""
    from child import run_python

    size = 300 << 20
    src = tmp_path / "model"
    src.mkdir()
    with open(src / "weights.bin", "wb") as f:
        for i in range(size >> 20):
            f.write(bytes([i % 251]) * (1 << 20))
    script = ("import sys\n"
              "from reclip_ray import storage\n"
              "src, uri, case = sys.argv[1:]\n"
              "storage.write_bytes(uri + '/warm-up', bytes(storage.SINGLE_PUT_BYTES))\n"
              "data = open(src + '/weights.bin', 'rb').read() if case == 'write_bytes' else None\n"
              "before = hwm()\n"
              "if case == 'write_bytes':\n"
              "    storage.write_bytes(uri + '/weights.bin', data)\n"
              "else:\n"
              "    storage.upload_dir(src, uri)\n"
              "print(hwm() - before)\n")
    for case in ("write_bytes", "upload_dir"):
        target = f"{s3_prefix}/{case}"
        done = run_python(script, str(src), target, case, timeout=300, text=True)
        assert done.returncode == 0, done.stderr
        growth = int(done.stdout.split()[-1])
        assert growth < size / 2, f"{case}: peak grew {growth / 2**20:.0f} MB for a {size >> 20} MB object"
        assert storage.is_file(f"{target}/weights.bin")
        fs, inner = storage.filesystem(f"{target}/weights.bin")
        with fs.open_input_file(inner) as f:
            assert f.size() == size and f.read_at(1 << 20, size - (1 << 20)) == bytes([299 % 251]) * (1 << 20)
        storage.delete_dir(target)


def _interrupt_at_the_third_part(monkeypatch) -> list:
    """A KeyboardInterrupt (a Ctrl-C) in a large write, once, before its third part is written; the list returned
    holds that part once it was reached."""
    real_parts, interrupted = storage._parts, []

    def parts(size):
        for i, part in enumerate(real_parts(size)):
            if i == 2 and not interrupted:
                interrupted.append(part)
                raise KeyboardInterrupt
            yield part

    monkeypatch.setattr(storage, "_parts", parts)
    return interrupted


@pytest.mark.parametrize("abortable", [True, False])
def test_a_large_write_interrupted_between_two_parts_publishes_nothing_or_the_whole_object(
        s3_prefix, monkeypatch, abortable):
    """A large object is written a part at a time, and pyarrow's stream completes its upload, with what it holds,
    when it is destroyed: a KeyboardInterrupt between two parts would publish the parts written so far. The upload is
    aborted instead (the old object stays, no upload is left open); where it cannot be aborted, it is finished, so
    the object is the new one whole. Interrupted here after the second of five parts, flushed after each."""
    path = f"{s3_prefix}/weights.bin"
    storage.write_bytes(path, b"old")
    new = os.urandom(5 * storage.SINGLE_PUT_BYTES)
    interrupted = _interrupt_at_the_third_part(monkeypatch)
    monkeypatch.setattr(storage, "PARTS_IN_FLIGHT", 1)
    if not abortable:
        monkeypatch.setattr(storage, "_abort_uploads", lambda *args, **kwargs: False)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes(path, new)
    assert interrupted
    assert storage.read_bytes(path) == (b"old" if abortable else new)
    assert _open_uploads(path) == []


def test_a_part_refused_after_a_flush_aborts_the_upload_and_keeps_the_old_object(s3_prefix, s3_faults, monkeypatch):
    """With the stream flushed after every part, a refused part is raised by the flush, not by close(): the upload
    is aborted all the same and the old object stays."""
    monkeypatch.setattr(storage, "PARTS_IN_FLIGHT", 1)
    path = f"{s3_prefix}/shard.parquet"
    storage.write_bytes(path, b"old")
    refused = s3_faults("/shard.parquet", times=1, query="partNumber=2")
    with pytest.raises(OSError, match="ACCESS_DENIED during UploadPart"):
        storage.write_bytes(path, os.urandom(4 * storage.SINGLE_PUT_BYTES))
    assert refused and storage.read_bytes(path) == b"old" and _open_uploads(path) == []


class _DestructorCompletesStream:
    """An output stream as Arrow's GCS and Azure ones behave: written bytes are held, ``close`` publishes them, and
    so does the destructor of a stream never closed (``io::internal::CloseFromDestructor``); no abort."""

    def __init__(self, published: dict, key: str) -> None:
        self.published, self.key, self.held, self.closed = published, key, bytearray(), False

    def write(self, data) -> None:
        self.held += bytes(data)

    def tell(self) -> int:
        return len(self.held)

    def flush(self) -> None:
        pass

    def close(self) -> None:
        if not self.closed:
            self.published[self.key], self.closed = bytes(self.held), True

    def __del__(self) -> None:
        self.close()


def test_a_large_write_to_gcs_interrupted_between_two_parts_is_finished_whole_not_published_torn(monkeypatch):
    """A large object is written a part at a time on every store, and GCS's (and Azure's) pyarrow stream completes
    the upload with what it holds when destroyed, and cannot be aborted: a Ctrl-C between two parts published the
    parts so far as the object (the interrupt branch acted on S3 multipart uploads only). It is finished instead,
    as an S3 upload that cannot be aborted is, and the KeyboardInterrupt still raised."""
    published: dict[str, bytes] = {"b/w.bin": b"old"}
    streams: list[_DestructorCompletesStream] = []

    class Store:
        def open_output_stream(self, inner, compression=None):
            streams.append(_DestructorCompletesStream(published, inner))
            return streams[-1]

    monkeypatch.setattr(storage, "filesystem", lambda path: (Store(), "b/w.bin"))
    interrupted = _interrupt_at_the_third_part(monkeypatch)
    new = os.urandom(5 * storage.SINGLE_PUT_BYTES)
    with pytest.raises(KeyboardInterrupt):
        storage.write_bytes("gs://b/w.bin", new)
    assert interrupted
    assert streams[0].closed, "the stream was left for its destructor to publish the parts so far"
    assert published["b/w.bin"] == new


def test_the_boto3_client_is_built_once_when_several_threads_ask_for_it_at_once(monkeypatch):
    """``upload_dir``'s threads each ask for the S3 client at their first large file; a lazily cached builder let
    each of them build one from boto3's shared default session at the same time, which boto3 does not support (its
    loaders fail with a KeyError now and then): the listing then failed quietly and a failed upload stayed open."""
    import sys
    import types

    built: list[int] = []
    release = threading.Event()

    class Session:
        def client(self, name):
            built.append(1)
            release.wait(timeout=2)  # held while the other threads arrive, so that they overlap with this build
            return object()

    fake = types.ModuleType("boto3")
    fake.session = types.SimpleNamespace(Session=Session)
    fake.client = lambda name: Session().client(name)
    monkeypatch.setitem(sys.modules, "boto3", fake)
    monkeypatch.setattr(storage, "_S3_CLIENTS", {}, raising=False)
    if hasattr(storage._s3_client, "cache_clear"):
        storage._s3_client.cache_clear()
    start = threading.Barrier(8)
    clients: list[object] = []

    def ask() -> None:
        start.wait()
        clients.append(storage._s3_client())

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    while len(built) < 1:
        threading.Event().wait(0.01)
    threading.Event().wait(0.2)  # the other seven have asked by now
    release.set()
    for t in threads:
        t.join()
    if hasattr(storage._s3_client, "cache_clear"):
        storage._s3_client.cache_clear()
    assert len(built) == 1 and len(clients) == 8 and len({id(c) for c in clients}) == 1


@pytest.mark.parametrize("path", [
    "s3://AKIA:S3CR3T@bucket/runs", "gs://user:S3CR3T@bucket/x?region=r",
    "s3://AKIA:wJal/S3CR3T@bucket/runs",  # a secret holding '/' (half of AWS's): the authority ends early
    "s3://AK:ab?S3CR3T@bucket/x", "s3://AK:ab#S3CR3T@bucket/x", "S3://AK:S3CR3T@b/x",
    "abfs://account:S3CR3T@container/x", "hdfs://user:S3CR3T@nn:8020/x",
    "abfss://c@acct.dfs.core.windows.net/x?client_id=c&tenant_id=t&client_secret=S3CR3T",
])
def test_credentials_in_a_uri_are_refused_without_echoing_them(path):
    """pyarrow reads ``s3://KEY:SECRET@bucket`` (``abfs://account:KEY@container``, ``?client_secret=``) as
    credentials, this module read ``KEY:SECRET@bucket`` as the bucket; and a path is printed, logged, recorded and
    joined onto every file of a run folder. One line, without the secret."""
    for call in (storage.normalize, storage.filesystem, storage.pyarrow_uri, lambda p: storage.join(p, "x")):
        with pytest.raises(DataError, match=r"credentials in a URI|a secret in a URI's options") as raised:
            call(path)
        assert "S3CR3T" not in str(raised.value), str(raised.value)


@pytest.mark.parametrize("path", ["hdfs://nn:8020/x", "hdfs://user@nn/x", "abfss://c@acct.dfs.core.windows.net/x",
                                  "s3://bucket?endpoint_override=http://minio:9000&scheme=http", "s3://b/user@x/y"])
def test_hosts_ports_and_azure_containers_are_not_credentials(path):
    assert storage.split_query(path)[0] == path.partition("?")[0]
