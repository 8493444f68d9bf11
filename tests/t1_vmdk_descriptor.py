"""ivdfs.datastore.descriptor: VMDK descriptors as ESXi and VMware's hosted products write them,
and what ivdfs refuses to follow (it then reads the disk over the network)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from ivdfs.datastore.descriptor import (
    NO_PARENT,
    DescriptorError,
    Extent,
    looks_like_text,
    parse_descriptor,
    sparse_descriptor_span,
)
from tests.testbed import vmdk

ESXI_DELTA = b"""# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=fb183c20
parentCID=a9e3ae1f
isNativeSnapshot="no"
createType="vmfsSparse"
parentFileNameHint="6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b.vmdk"
# Extent description
RW 16777216 VMFSSPARSE "6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b-000001-delta.vmdk"

# The Disk Data Base
#DDB

ddb.longContentID = "0c5b1b7e2d8f3a4c9e6b1d2ffb183c20"
"""


def test_an_esxi_delta_descriptor() -> None:
    d = parse_descriptor(ESXI_DELTA)
    assert (d.cid, d.parent_cid, d.create_type) == (0xFB183C20, 0xA9E3AE1F, "vmfsSparse")
    assert d.parent_hint == "6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b.vmdk"
    assert d.extents == (
        Extent("RW", 16777216, "VMFSSPARSE",
               "6b1c5e0d9a8f4c2b8e7d6a5f4e3d2c1b-000001-delta.vmdk", 0),
    )  # fmt: skip
    assert d.capacity == 16777216


def test_crlf_zero_extents_offsets_and_a_base_without_parent_cid() -> None:
    text = (
        b'CID=1\r\ncreateType="monolithicFlat"\r\nRW 100 FLAT "a-f001.vmdk" 0\r\n'
        b'RDONLY 50 FLAT "b.vmdk" 8\r\nRW 10 ZERO\r\n'
    )
    d = parse_descriptor(text)
    assert (d.cid, d.parent_cid, d.parent_hint) == (1, NO_PARENT, None)
    assert [(e.kind, e.file, e.offset) for e in d.extents] == [
        ("FLAT", "a-f001.vmdk", 0), ("FLAT", "b.vmdk", 8), ("ZERO", None, 0),
    ]  # fmt: skip
    assert d.capacity == 160


@pytest.mark.parametrize(
    ("text", "why"),
    [
        (b'createType="vmfs"\nRW 1 VMFS "x-flat.vmdk"\n', "no CID"),
        (b'CID=zz\ncreateType="vmfs"\nRW 1 VMFS "x-flat.vmdk"\n', "content ID"),
        (b'CID=1\nCID=2\ncreateType="vmfs"\nRW 1 VMFS "x"\n', "twice"),
        (b'CID=1\ncreateType="vmfs"\n', "no extent"),
        (b'CID=1\nRW 1 VMFS "x"\n', "no createType"),
        (b'CID=1\ncreateType="vmfs\nRW 1 VMFS "x"\n', "quotes"),
        (b'CID=1\ncreateType="vmfs"\nRW 1 VMFS\n', "without a file"),
        (b'CID=1\ncreateType="vmfs"\nthis is not a descriptor\n', "not a descriptor line"),
        (b'CID=1\ncreateType="vmfs"\nRW 1 VMFS "\xff"\n', "UTF-8"),
    ],
)
def test_what_is_not_followed(text: bytes, why: str) -> None:
    with pytest.raises(DescriptorError, match=why):
        parse_descriptor(text)


def test_the_descriptor_a_sparse_file_embeds(tmp_path: Path) -> None:
    img = tmp_path / "a.raw"
    img.write_bytes(b"\x01" * (1 << 20))
    (link,) = vmdk.write_chain(tmp_path, ["x.vmdk"], [img], seed=3)
    data = link.descriptor.read_bytes()
    span = sparse_descriptor_span(data[:512])
    assert span == (512, vmdk.DESCRIPTOR_SECTORS * 512)
    d = parse_descriptor(data[span[0] : span[0] + span[1]])  # NUL-padded: ends at the first NUL
    assert (d.cid, d.create_type, d.capacity) == (link.cid, "monolithicSparse", 2048)
    assert not looks_like_text(data[:4096])
    assert sparse_descriptor_span(b"# Disk DescriptorFile\n") is None
    extent_only = struct.pack("<4sIIQQQQ", b"KDMV", 1, 3, 2048, 128, 0, 0)
    with pytest.raises(DescriptorError, match="without an embedded descriptor"):
        sparse_descriptor_span(extent_only)
