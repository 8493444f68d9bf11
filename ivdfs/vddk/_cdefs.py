"""The one declaration source for the VDDK binding.

CDEFS is fed to cffi in ABI mode; REQUIRED/OPTIONAL drive the symbol probe, the per-call
statistics and the test that the stand-in library exports every required symbol. Layouts follow
VMware's public vixDiskLib.h (VDDK 6.7 and later on LP64 Linux).
"""

from __future__ import annotations

# VDDK's sector (VIXDISKLIB_SECTOR_SIZE) is ivdfs.units.SECTOR_SIZE: 512 bytes, whatever the
# disk's logical sector size.
VIX_OK = 0
VIX_ASYNC = 25000
VIX_E_FAIL = 1
VIX_E_INVALID_ARG = 3
VIX_E_NOT_SUPPORTED = 6
VIXDISKLIB_FLAG_OPEN_UNBUFFERED = 1
VIXDISKLIB_FLAG_OPEN_READ_ONLY = 4
VIXDISKLIB_SPEC_VMX = 0
VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1
VIXDISKLIB_CRED_UID = 1
VIXDISKLIB_CRED_SESSIONID = 2
VIXDISKLIB_CRED_TICKETID = 3
# QueryAllocatedBlocks wants chunk sizes of at least this many sectors (64 KiB).
VIXDISKLIB_MIN_CHUNK_SIZE = 128
# Largest request we hand the library in one call: NFC servers fail larger ones.
MAX_REQUEST_BYTES = 2 * 1024 * 1024

CDEFS = """
typedef uint64_t VixError;
typedef uint64_t VixDiskLibSectorType;
typedef char Bool;

typedef struct {
    uint32_t cylinders;
    uint32_t heads;
    uint32_t sectors;
} VixDiskLibGeometry;

typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    VixDiskLibSectorType capacity;
    int adapterType;
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
} VixDiskLibInfo;

typedef struct {
    char *userName;
    char *password;
} VixDiskLibUidPasswdCreds;

typedef struct {
    char *cookie;
    char *userName;
    char *key;
} VixDiskLibSessionIdCreds;

typedef struct {
    char *id;
    char *datastoreMoRef;
    char *ssId;
} VixDiskLibVStorageObjectSpec;

typedef struct {
    char *vmxSpec;
    char *serverName;
    char *thumbPrint;
    long reserved1;
    int credType;
    union {
        VixDiskLibUidPasswdCreds uid;
        VixDiskLibSessionIdCreds sessionId;
        void *ticketId;
    } creds;
    uint32_t port;
    uint32_t nfcHostPort;
    char *vimApiVer;
    char reserved3[8];
    void *reserved2;
    union {
        VixDiskLibVStorageObjectSpec vStorageObjSpec;
    } spec;
    int specType;
} VixDiskLibConnectParams;

typedef struct {
    VixDiskLibSectorType offset;
    VixDiskLibSectorType length;
} VixDiskLibBlock;

typedef struct {
    uint32_t numBlocks;
    VixDiskLibBlock blocks[1];
} VixDiskLibBlockList;

typedef struct VixDiskLibConnectParam *VixDiskLibConnection;
typedef struct VixDiskLibHandleStruct *VixDiskLibHandle;

/* The library calls these with a printf format and a va_list, declared opaque here and
   formatted with libc's vsnprintf. */
typedef void (VixDiskLibGenericLogFunc)(const char *fmt, void *args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);

VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                           VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                           VixDiskLibGenericLogFunc *panic, const char *libDir,
                           const char *configFile);
void VixDiskLib_Exit(void);
const char *VixDiskLib_ListTransportModes(void);
VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void);
void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *connectParams);
VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *connectParams, Bool readOnly,
                              const char *snapshotRef, const char *transportModes,
                              VixDiskLibConnection *connection);
VixError VixDiskLib_Disconnect(VixDiskLibConnection connection);
VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                         uint32_t flags, VixDiskLibHandle *diskHandle);
VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info);
void VixDiskLib_FreeInfo(VixDiskLibInfo *info);
const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle);
VixError VixDiskLib_Close(VixDiskLibHandle diskHandle);
VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                         VixDiskLibSectorType numSectors, uint8_t *readBuffer);
VixError VixDiskLib_ReadAsync(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                              VixDiskLibSectorType numSectors, uint8_t *readBuffer,
                              VixDiskLibCompletionCB callback, void *cbData);
VixError VixDiskLib_Wait(VixDiskLibHandle diskHandle);
char *VixDiskLib_GetErrorText(VixError err, const char *locale);
void VixDiskLib_FreeErrorText(char *errMsg);
VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                     const char *identity);
VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams,
                              const char *identity);
VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                         VixDiskLibSectorType startSector,
                                         VixDiskLibSectorType numSectors,
                                         VixDiskLibSectorType chunkSize,
                                         VixDiskLibBlockList **blockList);
VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList);

int vsnprintf(char *str, size_t size, const char *format, void *ap);
"""

# Missing any of these: the library is refused. AllocateConnectParams arrived in VDDK 6.7, the
# first release that can open an IVD, so it doubles as the version check.
REQUIRED: tuple[str, ...] = (
    "VixDiskLib_InitEx",
    "VixDiskLib_Exit",
    "VixDiskLib_AllocateConnectParams",
    "VixDiskLib_FreeConnectParams",
    "VixDiskLib_ConnectEx",
    "VixDiskLib_Disconnect",
    "VixDiskLib_Open",
    "VixDiskLib_GetInfo",
    "VixDiskLib_FreeInfo",
    "VixDiskLib_Close",
    "VixDiskLib_Read",
    "VixDiskLib_GetErrorText",
    "VixDiskLib_FreeErrorText",
    "VixDiskLib_PrepareForAccess",
    "VixDiskLib_EndAccess",
)

# Used when present; their absence only disables a feature.
OPTIONAL: tuple[str, ...] = (
    "VixDiskLib_ListTransportModes",
    "VixDiskLib_GetTransportMode",
    "VixDiskLib_ReadAsync",
    "VixDiskLib_Wait",
    "VixDiskLib_QueryAllocatedBlocks",
    "VixDiskLib_FreeBlockList",
)

MINIMUM_VDDK = "6.7"
