"""The binding's declarations against the stand-in's own C headers and exports.

The stand-ins were written separately from ivdfs/vddk/_cdefs.py, from the same public ABI, so
agreeing offsets are a real cross-check: a C program compiled from the stand-in headers
prints every field's offset and every struct's size, and cffi must compute the same.
"""

from __future__ import annotations

import os
import subprocess
import sysconfig
from pathlib import Path

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


def test_stand_ins_export_every_declared_function(built_testbed: None) -> None:
    lib = disklib_ffi.dlopen(str(VDDK_LIBDIR / "lib64" / "libvixDiskLib.so.8"))
    assert [n for n in (*_cdefs.REQUIRED, *_cdefs.OPTIONAL) if not has_symbol(lib, n)] == []
    mnt = mntapi_ffi.dlopen(str(VDDK_LIBDIR / "lib64" / "libvixMntapi.so.1"))
    assert [n for n in _mntapi_cdefs.REQUIRED if not has_symbol(mnt, n)] == []
    # The "too old" library really is: the refusal path in t4_errors depends on it.
    old = disklib_ffi.dlopen(str(VDDK6_LIBDIR / "lib64" / "libvixDiskLib.so.6"))
    assert not has_symbol(old, "VixDiskLib_AllocateConnectParams")
    assert has_symbol(old, "VixDiskLib_Read")


def _dynamic(path: Path) -> dict[str, list[str]]:
    """readelf -d: NEEDED, SONAME, RPATH and RUNPATH entries."""
    out = subprocess.run(["readelf", "-d", str(path)], check=True, capture_output=True,
                         text=True).stdout  # fmt: skip
    tags: dict[str, list[str]] = {}
    for line in out.splitlines():
        for tag in ("NEEDED", "SONAME", "RPATH", "RUNPATH"):
            if f"({tag})" in line:
                tags.setdefault(tag, []).append(line.split("[", 1)[1].rstrip("]"))
    return tags


def test_stand_in_lib64_is_laid_out_like_vddk(built_testbed: None) -> None:
    """The search-path trap of real VDDK only exists if nothing carries an RPATH and the plugin
    needs a library that lives in lib64 alone."""
    lib64 = VDDK_LIBDIR / "lib64"
    links = {
        "libvixDiskLib.so": "libvixDiskLib.so.8", "libvixDiskLib.so.8": "libvixDiskLib.so.8.0.1",
        "libvddkVimAccess.so": "libvddkVimAccess.so.8",
        "libvddkVimAccess.so.8": "libvddkVimAccess.so.8.0.1",
        "libvixMntapi.so": "libvixMntapi.so.1", "libvixMntapi.so.1": "libvixMntapi.so.1.1.0",
        "libssl.so": "libssl.so.3", "libcrypto.so": "libcrypto.so.3",
    }  # fmt: skip
    assert {n: os.readlink(lib64 / n) for n in links} == links
    assert not list(lib64.glob("libvixMntapi.so.8*"))  # a name VDDK never used
    for lib in [p for p in lib64.iterdir() if not p.is_symlink()]:
        tags = _dynamic(lib)
        assert "RPATH" not in tags and "RUNPATH" not in tags, lib
    assert _dynamic(lib64 / "libvixDiskLib.so.8.0.1")["SONAME"] == ["libvixDiskLib.so.8"]
    plugin = _dynamic(lib64 / "libvddkVimAccess.so.8.0.1")
    assert "libvmacore.so" in plugin["NEEDED"]
    assert not Path("/usr/lib", sysconfig.get_config_var("MULTIARCH"), "libvmacore.so").exists()
    mntapi = _dynamic(lib64 / "libvixMntapi.so.1.1.0")
    assert mntapi["SONAME"] == ["libvixMntapi.so.1"]
    assert {"libfuse.so.2", "libvixDiskLib.so.8"} <= set(mntapi["NEEDED"])
    # VDDK's OpenSSL: the system's copy, but not the system's compiled-in directory.
    crypto = (lib64 / "libcrypto.so.3").read_bytes()
    assert b'OPENSSLDIR: "/vddk-no/ssl"' in crypto and b"/usr/lib/ssl" not in crypto
