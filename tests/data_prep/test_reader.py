"""Tolerant shard reading: damage ends the stream with a StreamBroken (never an exception), unsafe
member names reject their sample, the strict reader raises naming the shard."""
import io
import tarfile

import pytest

from data_prep.reader import Sample, StreamBroken, iter_samples, iter_stream, member_problem
from data_prep.schema import SchemaError


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


MEMBERS = [(f"doc-{i:03d}.{f}", f"{i}{f}".encode() * 200) for i in range(6) for f in ("json", "0000.png")]


def test_intact_stream_groups_members_by_key():
    items = list(iter_stream(io.BytesIO(_tar(MEMBERS))))
    assert [s.key for s in items] == [f"doc-{i:03d}" for i in range(6)]
    assert all(isinstance(s, Sample) and set(s.members) == {"json", "0000.png"} and not s.unsafe for s in items)


@pytest.mark.parametrize("cut", [0.3, 0.55, 0.7])
def test_truncated_stream_yields_what_it_can_then_stream_broken(cut):
    blob = _tar(MEMBERS)
    items = list(iter_stream(io.BytesIO(blob[:int(len(blob) * cut)])))
    assert isinstance(items[-1], StreamBroken) and items[-1].reason == "truncated_shard"
    samples = items[:-1]
    assert 0 < len(samples) < 6
    assert all(set(s.members) == {"json", "0000.png"} for s in samples)  # no half sample is yielded


def test_corrupt_header_breaks_the_stream():
    blob = bytearray(_tar(MEMBERS))
    second_header = 512 + 512 * ((len(MEMBERS[0][1]) + 511) // 512)
    blob[second_header + 148:second_header + 156] = b"garbage!"  # the header checksum field
    items = list(iter_stream(io.BytesIO(bytes(blob))))
    assert isinstance(items[-1], StreamBroken) and "corrupt member header" in items[-1].detail
    assert len(items) == 1  # the first sample was being read when the stream broke: not yielded


@pytest.mark.parametrize("name", ["/etc/doc-001.json", "../doc-001.json", "a/../doc-001.json", "doc-001",
                                  "a\\b.json", "doc.001.json/x"])
def test_unsafe_names_are_named(name):
    assert member_problem(name)


def test_unsafe_member_rejects_its_sample_and_the_strict_reader_raises(tmp_path):
    members = MEMBERS[:2] + [("doc-001.json", b"{}"), ("doc-001.0000.png/../../x", b"zz")] + MEMBERS[4:]
    items = list(iter_stream(io.BytesIO(_tar(members))))
    unsafe = [s for s in items if isinstance(s, Sample) and s.unsafe]
    assert len(unsafe) >= 1 and "doc-001" in unsafe[0].key + "".join(unsafe[0].unsafe)
    path = tmp_path / "s.tar"
    path.write_bytes(_tar(members))
    with pytest.raises(SchemaError, match="unsafe members"):
        list(iter_samples(path))
    path.write_bytes(_tar(MEMBERS)[:3000])
    with pytest.raises(SchemaError, match="unreadable past this point"):
        list(iter_samples(path))
