"""Declarations for libvixMntapi, in the style of `_cdefs.py` (its one declaration source).

Layouts follow VMware's public vixMntapi.h (LP64 Linux; the 4-byte packing there is Windows
only). Types shared with libvixDiskLib (VixError, Bool, VixDiskLibConnection, the log callback
type) come from `_cdefs` through `ffi.include`.
"""

from __future__ import annotations

VIXMNTAPI_MAJOR_VERSION = 1
VIXMNTAPI_MINOR_VERSION = 0

# VixVolumeType
VOLUME_TYPES = {0: "unknown", 1: "basic", 2: "gpt", 3: "dynamic", 4: "lvm"}

CDEFS = """
typedef enum VixOsFamily {
    VIXMNTAPI_NO_OS = 0,
    VIXMNTAPI_WINDOWS = 1,
    VIXMNTAPI_OTHER = 255
} VixOsFamily;

typedef struct {
    VixOsFamily family;
    uint32_t majorVersion;
    uint32_t minorVersion;
    Bool osIs64Bit;
    char *vendor;
    char *edition;
    char *osFolder;
} VixOsInfo;

typedef enum VixVolumeType {
    VIXMNTAPI_UNKNOWN_VOLTYPE = 0,
    VIXMNTAPI_BASIC_PARTITION = 1,
    VIXMNTAPI_GPT_PARTITION = 2,
    VIXMNTAPI_DYNAMIC_VOLUME = 3,
    VIXMNTAPI_LVM_VOLUME = 4
} VixVolumeType;

typedef struct {
    VixVolumeType type;
    Bool isMounted;
    char *symbolicLink;
    size_t numGuestMountPoints;
    char *inGuestMountPoints[1];
} VixVolumeInfo;

typedef struct {
    uint32_t openFlags;
    char *mountPath;
} VixDiskSetInfo;

typedef struct VixDiskSetHandleStruct *VixDiskSetHandle;
typedef struct VixVolumeHandleStruct *VixVolumeHandle;

VixError VixMntapi_Init(uint32_t majorVersion, uint32_t minorVersion,
                        VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                        VixDiskLibGenericLogFunc *panic, const char *libDir,
                        const char *configFile);
void VixMntapi_Exit(void);
VixError VixMntapi_OpenDisks(VixDiskLibConnection connection, const char *diskNames[],
                             size_t numberOfDisks, uint32_t openFlags,
                             VixDiskSetHandle *handle);
VixError VixMntapi_GetDiskSetInfo(VixDiskSetHandle handle, VixDiskSetInfo **diskSetInfo);
void VixMntapi_FreeDiskSetInfo(VixDiskSetInfo *diskSetInfo);
VixError VixMntapi_CloseDiskSet(VixDiskSetHandle diskSet);
VixError VixMntapi_GetVolumeHandles(VixDiskSetHandle diskSet, size_t *numberOfVolumes,
                                    VixVolumeHandle *volumeHandles[]);
void VixMntapi_FreeVolumeHandles(VixVolumeHandle *volumeHandles);
VixError VixMntapi_GetOsInfo(VixDiskSetHandle diskSet, VixOsInfo **info);
void VixMntapi_FreeOsInfo(VixOsInfo *info);
VixError VixMntapi_MountVolume(VixVolumeHandle volumeHandle, Bool readOnly);
VixError VixMntapi_DismountVolume(VixVolumeHandle volumeHandle, Bool force);
VixError VixMntapi_GetVolumeInfo(VixVolumeHandle volumeHandle, VixVolumeInfo **info);
void VixMntapi_FreeVolumeInfo(VixVolumeInfo *info);
"""

REQUIRED: tuple[str, ...] = (
    "VixMntapi_Init",
    "VixMntapi_Exit",
    "VixMntapi_OpenDisks",
    "VixMntapi_CloseDiskSet",
    "VixMntapi_GetVolumeHandles",
    "VixMntapi_FreeVolumeHandles",
    "VixMntapi_MountVolume",
    "VixMntapi_DismountVolume",
    "VixMntapi_GetVolumeInfo",
    "VixMntapi_FreeVolumeInfo",
)
