"""The binding's declarations against the stand-in's own C headers and exports.

The stand-ins were written separately from ivdfs/vddk/_cdefs.py, from the same public ABI, so
agreeing offsets are a real cross-check: a C program compiled from the stand-in headers
prints every field's offset and every struct's size, and cffi must compute the same.
"""

from __future__ import annotations

import subprocess

import cffi
import pytest

from ivdfs.vddk import _cdefs, _mntapi_cdefs
from ivdfs.vddk.library import ffi as disklib_ffi
from ivdfs.vddk.library import has_symbol
from ivdfs.vddk.mntapi import ffi as mntapi_ffi
from tests.mounting import VDDK6_LIBDIR, VDDK_LIBDIR
from tests.testbed.vsphere import TESTBED

STRUCTS: dict[str, list[str]] = {
    "VixDiskLibGeometry": ["cylinders", "heads", "sectors"],
    "VixDiskLibInfo": ["biosGeo", "physGeo", "capacity", "adapterType", "numLinks",
                       "parentFileNameHint", "uuid", "logicalSectorSize",
                       "physicalSectorSize"],
    "VixDiskLibConnectParams": ["vmxSpec", "serverName", "thumbPrint", "reserved1", "credType",
                                "creds", "port", "nfcHostPort", "vimApiVer", "reserved3",
                                "reserved2", "spec", "specType"],
    "VixDiskLibVStorageObjectSpec": ["id", "datastoreMoRef", "ssId"],
    "VixDiskLibBlock": ["offset", "length"],
    "VixDiskLibBlockList": ["numBlocks", "blocks"],
    "VixVolumeInfo": ["type", "isMounted", "symbolicLink", "numGuestMountPoints",
                      "inGuestMountPoints"],
    "VixOsInfo": ["family", "majorVersion", "minorVersion", "osIs64Bit", "vendor", "edition",
                  "osFolder"],
    "VixDiskSetInfo": ["openFlags", "mountPath"],
}  # fmt: skip


@pytest.fixture(scope="module")
def c_layout(built_testbed: None, tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    d = tmp_path_factory.mktemp("abi")
    lines = ['#include <stdio.h>', '#include <stddef.h>', '#include "vixDiskLib.h"',
             '#include "vixMntapi.h"', "int main(void) {"]  # fmt: skip
    for struct, fields in STRUCTS.items():
        lines.append(f'printf("{struct} %zu\\n", sizeof({struct}));')
        for f in fields:
            lines.append(f'printf("{struct}.{f} %zu\\n", offsetof({struct}, {f}));')
    lines += ["return 0; }"]
    src = d / "layout.c"
    src.write_text("\n".join(lines))
    exe = d / "layout"
    subprocess.run(["gcc", "-I", str(TESTBED / "standin"), "-I", str(TESTBED / "mntapi"),
                    "-o", str(exe), str(src)], check=True)  # fmt: skip
    out = subprocess.run([str(exe)], check=True, capture_output=True, text=True).stdout
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


def ffi_for(struct: str) -> cffi.FFI:
    return mntapi_ffi if struct in ("VixVolumeInfo", "VixOsInfo", "VixDiskSetInfo") else disklib_ffi


@pytest.mark.parametrize("struct", list(STRUCTS))
def test_struct_layouts_match_the_c_headers(c_layout: dict[str, int], struct: str) -> None:
    ffi = ffi_for(struct)
    assert ffi.sizeof(struct) == c_layout[struct]
    for f in STRUCTS[struct]:
        assert ffi.offsetof(struct, f) == c_layout[f"{struct}.{f}"], f"{struct}.{f}"


def test_vddk6_info_is_the_short_struct(c_layout: dict[str, int]) -> None:
    # Reading the VDDK 7 sector-size fields from a 6.x struct would read past its end.
    assert disklib_ffi.sizeof("VixDiskLibInfo6") == c_layout["VixDiskLibInfo.logicalSectorSize"]


def test_stand_ins_export_every_declared_function(built_testbed: None) -> None:
    lib = disklib_ffi.dlopen(str(VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8"))
    assert [n for n in (*_cdefs.REQUIRED, *_cdefs.OPTIONAL) if not has_symbol(lib, n)] == []
    mnt = mntapi_ffi.dlopen(str(VDDK_LIBDIR / "lib64" / "libvixMntapi.so.8"))
    assert [n for n in _mntapi_cdefs.REQUIRED if not has_symbol(mnt, n)] == []
    # The "too old" library really is: the refusal path in t4_errors depends on it.
    old = disklib_ffi.dlopen(str(VDDK6_LIBDIR / "lib64" / "libvixDiskLib.so.6"))
    assert not has_symbol(old, "VixDiskLib_AllocateConnectParams")
    assert has_symbol(old, "VixDiskLib_Read")
