/*
 * vixDiskLib.h -- the ivdfs test bed's own declaration of the public VDDK ABI.
 *
 * Written from the published VixDiskLib interface (VDDK 6.7 and later, LP64 Linux) for the
 * stand-in library; it must agree byte for byte with ivdfs/vddk/_cdefs.py. Only what the
 * stand-in implements is declared. Build with -DSTANDIN_VDDK6 for the "too old" variant: no
 * AllocateConnectParams/FreeConnectParams and no sector-size fields in VixDiskLibInfo.
 */
#ifndef IVDFS_STANDIN_VIXDISKLIB_H
#define IVDFS_STANDIN_VIXDISKLIB_H

#include <stdarg.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef uint64_t VixError;
typedef uint64_t VixDiskLibSectorType;
typedef char Bool;

#define VIX_ERROR_CODE(err) ((err) & 0xFFFF)
#define VIX_SUCCEEDED(err) (VIX_OK == (err))
#define VIX_FAILED(err) (VIX_OK != (err))

/* The subset of the public VIX error codes that the stand-in returns or names. */
enum {
    VIX_OK = 0,
    VIX_E_FAIL = 1,
    VIX_E_OUT_OF_MEMORY = 2,
    VIX_E_INVALID_ARG = 3,
    VIX_E_FILE_NOT_FOUND = 4,
    VIX_E_OBJECT_IS_BUSY = 5,
    VIX_E_NOT_SUPPORTED = 6,
    VIX_E_FILE_ERROR = 7,
    VIX_E_CANCELLED = 10,
    VIX_E_FILE_READ_ONLY = 11,
    VIX_E_FILE_ACCESS_ERROR = 13,
    VIX_E_HOST_NOT_CONNECTED = 26,
    VIX_E_AUTHENTICATION_FAIL = 35,
    VIX_E_HOST_CONNECTION_LOST = 36,
    VIX_E_INVALID_HANDLE = 1000,
    VIX_E_HOST_USER_PERMISSIONS = 3014,
    VIX_E_GUEST_USER_PERMISSIONS = 3015,
    VIX_E_HOST_FILE_ERROR_EOF = 14005,
    VIX_E_HOST_SERVER_NOT_FOUND = 14008,
    VIX_E_HOST_NETWORK_CONN_REFUSED = 14009,
    VIX_E_HOST_TCP_SOCKET_ERROR = 14010,
    VIX_E_HOST_TCP_CONN_LOST = 14011,
    VIX_E_DISK_INVAL = 16000,
    VIX_E_DISK_NOIO = 16002,
    VIX_E_DISK_NEEDSREPAIR = 16006,
    VIX_E_DISK_OUTOFRANGE = 16007,
    VIX_E_DISK_CID_MISMATCH = 16008,
    VIX_E_DISK_UNSUPPORTEDDISKVERSION = 16011,
    VIX_E_DISK_OPENPARENT = 16012,
    VIX_E_DISK_NOTSUPPORTED = 16013,
    VIX_E_DISK_SUBSYSTEM_INIT_FAIL = 16053,
    VIX_E_DISK_INVALID_CONNECTION = 16054,
    VIX_E_DISK_INVALIDDISK = 16063,
    VIX_E_DISK_CAPACITY_MISMATCH = 16067,
    VIX_E_CANNOT_CONNECT_TO_HOST = 18000,
    VIX_ASYNC = 25000,
    VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED = 26000,
};

#define VIXDISKLIB_SECTOR_SIZE 512
#define VIXDISKLIB_FLAG_OPEN_UNBUFFERED (1 << 0)
#define VIXDISKLIB_FLAG_OPEN_SINGLE_LINK (1 << 1)
#define VIXDISKLIB_FLAG_OPEN_READ_ONLY (1 << 2)
#define VIXDISKLIB_MIN_CHUNK_SIZE 128
#define VIXDISKLIB_MAX_CHUNK_SIZE (128 * 1024) /* sectors; the real library refuses more */
#define VIXDISKLIB_MAX_CHUNK_NUMBER (512 * 1024)

enum VixDiskLibCredType {
    VIXDISKLIB_CRED_UID = 1,
    VIXDISKLIB_CRED_SESSIONID = 2,
    VIXDISKLIB_CRED_TICKETID = 3,
    VIXDISKLIB_CRED_SSPI = 4,
    VIXDISKLIB_CRED_UNKNOWN = 256,
};

enum VixDiskLibSpecType {
    VIXDISKLIB_SPEC_VMX = 0,
    VIXDISKLIB_SPEC_VSTORAGE_OBJECT = 1,
    VIXDISKLIB_SPEC_UNKNOWN = 2,
};

typedef enum {
    VIXDISKLIB_ADAPTER_IDE = 1,
    VIXDISKLIB_ADAPTER_SCSI_BUSLOGIC = 2,
    VIXDISKLIB_ADAPTER_SCSI_LSILOGIC = 3,
    VIXDISKLIB_ADAPTER_UNKNOWN = 256,
} VixDiskLibAdapterType;

typedef struct {
    uint32_t cylinders;
    uint32_t heads;
    uint32_t sectors;
} VixDiskLibGeometry;

typedef struct {
    VixDiskLibGeometry biosGeo;
    VixDiskLibGeometry physGeo;
    VixDiskLibSectorType capacity;
    int adapterType; /* VixDiskLibAdapterType, stored as int */
    int numLinks;
    char *parentFileNameHint;
    char *uuid;
#ifndef STANDIN_VDDK6
    uint32_t logicalSectorSize;
    uint32_t physicalSectorSize;
#endif
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
    int credType; /* enum VixDiskLibCredType */
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
    int specType; /* enum VixDiskLibSpecType */
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

typedef void(VixDiskLibGenericLogFunc)(const char *fmt, va_list args);
typedef void (*VixDiskLibCompletionCB)(void *cbData, VixError result);

VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                           VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                           VixDiskLibGenericLogFunc *panic, const char *libDir,
                           const char *configFile);
void VixDiskLib_Exit(void);
const char *VixDiskLib_ListTransportModes(void);
#ifndef STANDIN_VDDK6
VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void);
void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *connectParams);
#endif
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
VixError VixDiskLib_Write(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                          VixDiskLibSectorType numSectors, const uint8_t *writeBuffer);
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

#ifdef __cplusplus
}
#endif

#endif /* IVDFS_STANDIN_VIXDISKLIB_H */
