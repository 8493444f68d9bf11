/*
 * selftest.c -- exercises the stand-in VDDK (libvixDiskLib.so.8) through its public ABI.
 * Built and run by `make -C tests/testbed/standin check` with lib64 on LD_LIBRARY_PATH (as real
 * VDDK needs); the plugin-less phase runs in a re-executed copy of itself without it. Exits 0
 * when every check passes.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <limits.h>
#include <malloc.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vixDiskLib.h"

static int g_failures;
#define CHECK(cond, ...)                                                                  \
    do {                                                                                  \
        if (!(cond)) {                                                                    \
            g_failures++;                                                                 \
            fprintf(stderr, "FAIL %s:%d: %s: ", __FILE__, __LINE__, #cond);               \
            fprintf(stderr, __VA_ARGS__);                                                 \
            fputc('\n', stderr);                                                          \
        }                                                                                 \
    } while (0)
#define CHECK_ERR(expr, want)                                                             \
    do {                                                                                  \
        VixError e_ = (expr);                                                             \
        CHECK(e_ == (VixError)(want), "%s returned %llu, want %llu", #expr,               \
              (unsigned long long)e_, (unsigned long long)(want));                        \
    } while (0)

#define SECTOR 512
#define IMG_SIZE (4 * 1024 * 1024)
#define SPARSE_SIZE (16 * 1024 * 1024)
#define LOCAL_SIZE (1024 * 1024 + 300) /* not a multiple of 512: capacity rounds down */
#define ODD_SECTORS 9217ULL                 /* 4.5 MiB + 512 bytes: no whole number of chunks */
#define HUGE_SECTORS (524289ULL * 128)      /* one 64 KiB chunk more than a query may cover */

static char g_dir[1024], g_images[1280], g_local[PATH_MAX], g_current[PATH_MAX],
    g_sparse[PATH_MAX], g_odd[PATH_MAX], g_huge[PATH_MAX];
static pid_t g_main_tid;

static pid_t tid(void) { return (pid_t)syscall(SYS_gettid); }
static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static uint8_t pattern(uint64_t off, unsigned seed) {
    return (uint8_t)((off * 7u) ^ (off >> 9) ^ seed);
}

static void write_pattern(const char *path, uint64_t size, unsigned seed) {
    int fd = open(path, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0) { perror(path); exit(2); }
    static uint8_t buf[65536];
    for (uint64_t off = 0; off < size; off += sizeof(buf)) {
        size_t n = size - off < sizeof(buf) ? (size_t)(size - off) : sizeof(buf);
        for (size_t i = 0; i < n; i++) buf[i] = pattern(off + i, seed);
        if (write(fd, buf, n) != (ssize_t)n) { perror("write"); exit(2); }
    }
    close(fd);
}

static void write_at(int fd, uint64_t off, size_t len, unsigned seed) {
    uint8_t *b = malloc(len);
    for (size_t i = 0; i < len; i++) b[i] = pattern(off + i, seed);
    if (pwrite(fd, b, len, (off_t)off) != (ssize_t)len) { perror("pwrite"); exit(2); }
    free(b);
}

static int matches_file(const char *path, uint64_t start_sector, const uint8_t *buf, size_t len) {
    int fd = open(path, O_RDONLY);
    uint8_t *ref = malloc(len);
    ssize_t k = pread(fd, ref, len, (off_t)(start_sector * SECTOR));
    close(fd);
    int ok = k == (ssize_t)len && memcmp(ref, buf, len) == 0;
    free(ref);
    return ok;
}

static void write_text(const char *dir, const char *name, const char *text) {
    char path[2048];
    snprintf(path, sizeof(path), "%s/%s", dir, name);
    FILE *f = fopen(path, "we");
    if (!f || fputs(text, f) < 0 || fclose(f) != 0) {
        perror(path);
        exit(2);
    }
}

static char *slurp(const char *path) {
    FILE *f = fopen(path, "r");
    if (!f) return strdup("");
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    char *s = calloc(1, (size_t)n + 1);
    if (fread(s, 1, (size_t)n, f) != (size_t)n) n = 0;
    fclose(f);
    return s;
}

static int count(const char *hay, const char *needle) {
    int n = 0;
    for (const char *p = hay; (p = strstr(p, needle)); p += strlen(needle)) n++;
    return n;
}

/* ---- environment ---- */
static const char *k_env[] = {
    "VDDK_STANDIN_IMAGES", "VDDK_STANDIN_USER", "VDDK_STANDIN_PASSWORD", "VDDK_STANDIN_THUMBPRINT",
    "VDDK_STANDIN_TRANSPORT", "VDDK_STANDIN_ASYNC_INLINE_EVERY", "VDDK_STANDIN_LATENCY_US",
    "VDDK_STANDIN_HANDLE_BW", "VDDK_STANDIN_GLOBAL_BW", "VDDK_STANDIN_CONNECT_LATENCY_US",
    "VDDK_STANDIN_NO_QAB", "VDDK_STANDIN_FAIL_PREPARE", "VDDK_STANDIN_FAIL_READ_NTH",
    "VDDK_STANDIN_FAIL_READ_RATE", "VDDK_STANDIN_SEED", "VDDK_STANDIN_FAIL_CODE",
    "VDDK_STANDIN_DROP_AFTER", "VDDK_STANDIN_STALL_NTH", "VDDK_STANDIN_STALL_MS",
    "VDDK_STANDIN_SHORT_READ_NTH", "VDDK_STANDIN_FAIL_CONNECT", "VDDK_STANDIN_FAIL_OPEN",
    "VDDK_STANDIN_FAIL_CONNECT_CODE", "VDDK_STANDIN_FAIL_CONNECT_FIRST",
    "VDDK_STANDIN_FAIL_CONNECT_AFTER", "VDDK_STANDIN_FAIL_OPEN_CODE",
    "VDDK_STANDIN_FAIL_OPEN_FIRST", "VDDK_STANDIN_FAIL_OPEN_AFTER",
    "VDDK_STANDIN_LOG", "VDDK_STANDIN_LOG_READS", "VDDK_STANDIN_ASYNC_THREADS",
    "VDDK_STANDIN_NFC_SESSION_BYTES", "VDDK_STANDIN_NFC_HOST_BYTES", NULL};

static char g_logpath[PATH_MAX];
/* Clears every switch, then sets the images dir and a fresh call log named after the phase. */
static void env_reset(const char *phase) {
    for (int i = 0; k_env[i]; i++) unsetenv(k_env[i]);
    setenv("VDDK_STANDIN_IMAGES", g_images, 1);
    snprintf(g_logpath, sizeof(g_logpath), "%s/%s.log", g_dir, phase);
    unlink(g_logpath);
    setenv("VDDK_STANDIN_LOG", g_logpath, 1);
}

/* ---- InitEx log callbacks ---- */
static pthread_mutex_t g_msg_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_nlog, g_nwarn, g_saw_ceip, g_saw_libdir, g_saw_plugin_error;
static void on_log(const char *fmt, va_list ap) {
    char b[1024];
    vsnprintf(b, sizeof(b), fmt, ap);
    pthread_mutex_lock(&g_msg_mu);
    g_nlog++;
    if (strstr(b, "CEIP")) g_saw_ceip = 1;
    if (strstr(b, "/opt/vddk-test")) g_saw_libdir = 1;
    if (strstr(b, "Failed to load libvddkVimAccess.so") && strstr(b, "cannot open shared object"))
        g_saw_plugin_error = 1;
    pthread_mutex_unlock(&g_msg_mu);
}
static void on_warn(const char *fmt, va_list ap) {
    char b[1024];
    vsnprintf(b, sizeof(b), fmt, ap);
    pthread_mutex_lock(&g_msg_mu);
    g_nwarn++;
    pthread_mutex_unlock(&g_msg_mu);
}

static void init(void) {
    CHECK_ERR(VixDiskLib_InitEx(8, 0, on_log, on_warn, NULL, "/opt/vddk-test", NULL), VIX_OK);
}

/* ---- connections ---- */
static VixDiskLibConnectParams *server_params(const char *id, const char *ssid, const char *user,
                                              const char *pw, const char *thumb) {
    VixDiskLibConnectParams *p = VixDiskLib_AllocateConnectParams();
    p->serverName = "vcsim.example";
    p->port = 443;
    p->thumbPrint = (char *)thumb;
    p->credType = VIXDISKLIB_CRED_UID;
    p->creds.uid.userName = (char *)user;
    p->creds.uid.password = (char *)pw;
    p->specType = VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
    p->spec.vStorageObjSpec.id = (char *)id;
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-11";
    p->spec.vStorageObjSpec.ssId = (char *)ssid;
    return p;
}

static VixError connect_server(const char *id, const char *ssid, const char *modes,
                               VixDiskLibConnection *c) {
    VixDiskLibConnectParams *p = server_params(id, ssid, "u", "secretpw", "AA:BB:CC");
    VixError e = VixDiskLib_ConnectEx(p, 1, NULL, modes, c);
    VixDiskLib_FreeConnectParams(p);
    return e;
}

static VixDiskLibHandle open_ro(VixDiskLibConnection c, const char *path) {
    VixDiskLibHandle h = NULL;
    CHECK_ERR(VixDiskLib_Open(c, path, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h), VIX_OK);
    return h;
}

/* ---- async bookkeeping ---- */
typedef struct {
    atomic_int done;
    VixError err;
    pid_t tid;
    int during_submit;
} slot_t;
static atomic_int g_submitting;
static void on_done(void *data, VixError err) {
    slot_t *s = data;
    s->err = err;
    s->tid = tid();
    s->during_submit = atomic_load(&g_submitting);
    atomic_store(&s->done, 1);
}

/* ======================================================================================== */
static void phase_basic(void) {
    env_reset("basic");
    setenv("VDDK_STANDIN_USER", "u", 1);
    setenv("VDDK_STANDIN_PASSWORD", "secretpw", 1);
    setenv("VDDK_STANDIN_THUMBPRINT", "aa:bb:cc", 1);
    init();
    CHECK(g_saw_ceip && g_saw_libdir, "InitEx log messages: ceip=%d libdir=%d", g_saw_ceip,
          g_saw_libdir);
    CHECK(!g_saw_plugin_error, "the plugin loads with lib64 on LD_LIBRARY_PATH");
    CHECK_ERR(VixDiskLib_InitEx(8, 0, NULL, NULL, NULL, NULL, NULL), VIX_OK); /* VIOLATION */
    CHECK(strcmp(VixDiskLib_ListTransportModes(), "file:san:hotadd:nbdssl:nbd") == 0, "modes");

    /* local-file mode */
    VixDiskLibConnection c = NULL;
    VixDiskLibConnectParams *p = VixDiskLib_AllocateConnectParams();
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    VixDiskLibHandle h = open_ro(c, g_local);
    CHECK(strcmp(VixDiskLib_GetTransportMode(h), "file") == 0, "local transport");
    VixDiskLibInfo *info = NULL;
    CHECK_ERR(VixDiskLib_GetInfo(h, &info), VIX_OK);
    CHECK(info && info->capacity == LOCAL_SIZE / SECTOR, "capacity %llu",
          info ? (unsigned long long)info->capacity : 0ULL);
    CHECK(info && info->logicalSectorSize == 512 && info->physicalSectorSize == 512, "sector sizes");
    CHECK(info && info->uuid && strlen(info->uuid) == 47, "uuid");
    /* VMware's geometry for 2048 sectors (as VDDK 7.0.2 reports it), and no BIOS geometry. */
    CHECK(info && info->physGeo.cylinders == 1 && info->physGeo.heads == 64 &&
              info->physGeo.sectors == 32, "physGeo");
    CHECK(info && !info->biosGeo.cylinders && !info->biosGeo.heads && !info->biosGeo.sectors,
          "biosGeo");
    VixDiskLib_FreeInfo(info);
    uint8_t *buf = malloc(2 * 1024 * 1024 + SECTOR);
    CHECK_ERR(VixDiskLib_Read(h, 3, 100, buf), VIX_OK);
    CHECK(matches_file(g_local, 3, buf, 100 * SECTOR), "local read data");
    CHECK_ERR(VixDiskLib_Read(h, LOCAL_SIZE / SECTOR - 1, 1, buf), VIX_OK);
    CHECK_ERR(VixDiskLib_Read(h, LOCAL_SIZE / SECTOR - 1, 2, buf), VIX_E_DISK_OUTOFRANGE);
    CHECK_ERR(VixDiskLib_Read(h, LOCAL_SIZE / SECTOR, 1, buf), VIX_E_DISK_OUTOFRANGE);
    /* A local file has no 2 MiB bound (the NFC server's): only the range fails here. */
    CHECK_ERR(VixDiskLib_Read(h, 0, 4097, buf), VIX_E_DISK_OUTOFRANGE);
    /* ReadAsync past the end: VIX_ASYNC, and 16007 through the callback before it returns. */
    slot_t past;
    memset(&past, 0, sizeof(past));
    CHECK_ERR(VixDiskLib_ReadAsync(h, LOCAL_SIZE / SECTOR, 1, buf, on_done, &past), VIX_ASYNC);
    CHECK(atomic_load(&past.done) && past.err == VIX_E_DISK_OUTOFRANGE && past.tid == g_main_tid,
          "ReadAsync past the end reports 16007 through an inline callback");
    VixDiskLibHandle h2 = NULL;
    CHECK_ERR(VixDiskLib_Open(c, "/nonexistent/disk.raw", VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h2),
              VIX_E_FILE_NOT_FOUND);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Close(h), VIX_E_INVALID_ARG); /* stale handle: VIOLATION bad-handle */
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);

    /* server mode: validation */
    VixDiskLibConnection bad = NULL;
    p = server_params("ivd-1", NULL, "u", "secretpw", "AA:BB:CD");
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_FAIL);
    p->thumbPrint = "AA:BB:CC";
    p->creds.uid.password = "wrong";
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_AUTHENTICATION_FAIL);
    p->creds.uid.password = "secretpw";
    p->specType = VIXDISKLIB_SPEC_VMX;
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_INVALID_ARG);
    p->specType = VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
    p->spec.vStorageObjSpec.datastoreMoRef = "";
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_INVALID_ARG);
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-11";
    p->spec.vStorageObjSpec.id = "ivd-missing";
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_FILE_NOT_FOUND);
    p->spec.vStorageObjSpec.id = "ivd-1";
    p->spec.vStorageObjSpec.ssId = "no-such-snap";
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &bad), VIX_E_FILE_NOT_FOUND);
    CHECK(bad == NULL, "failed ConnectEx leaves NULL");
    VixDiskLib_FreeConnectParams(p);

    /* server mode: the sparse snapshot */
    CHECK_ERR(connect_server("ivd-1", "snap-1", NULL, &c), VIX_OK);
    CHECK_ERR(VixDiskLib_Open(c, "ivd-other", VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h2),
              VIX_E_FILE_NOT_FOUND);
    h = open_ro(c, "ivd-1");
    CHECK(strcmp(VixDiskLib_GetTransportMode(h), "nbdssl") == 0, "server transport");
    CHECK_ERR(VixDiskLib_Open(c, NULL, 0, &h2), VIX_OK); /* VIOLATION open-not-readonly */
    CHECK_ERR(VixDiskLib_Close(h2), VIX_OK);
    CHECK_ERR(VixDiskLib_GetInfo(h, &info), VIX_OK);
    CHECK(info->capacity == SPARSE_SIZE / SECTOR, "sparse capacity");
    VixDiskLib_FreeInfo(info);
    CHECK_ERR(VixDiskLib_Read(h, 0, 4097, buf), VIX_E_INVALID_ARG); /* VIOLATION: > 2 MiB */
    for (uint64_t s = 0; s < SPARSE_SIZE / SECTOR; s += 4096) {
        CHECK_ERR(VixDiskLib_Read(h, s, 4096, buf), VIX_OK);
        CHECK(matches_file(g_sparse, s, buf, 4096 * SECTOR), "sparse data at %llu",
              (unsigned long long)s);
    }

    /* QueryAllocatedBlocks: data at [2048,+128) and bytes [9 MiB + 32 KiB, +128 KiB) */
    VixDiskLibBlockList *bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, SPARSE_SIZE / SECTOR, 128, &bl), VIX_OK);
    int fd = open(g_sparse, O_RDONLY);
    int holes = lseek(fd, 0, SEEK_DATA) > 0;
    close(fd);
    if (!holes) {
        fprintf(stderr, "note: %s does not keep holes; QAB run check skipped\n", g_dir);
    } else {
        CHECK(bl && bl->numBlocks == 2, "QAB runs: %u", bl ? bl->numBlocks : 0);
        if (bl && bl->numBlocks == 2) {
            CHECK(bl->blocks[0].offset == 2048 && bl->blocks[0].length == 128, "run0 %llu+%llu",
                  (unsigned long long)bl->blocks[0].offset, (unsigned long long)bl->blocks[0].length);
            CHECK(bl->blocks[1].offset == 18432 && bl->blocks[1].length == 384, "run1 %llu+%llu",
                  (unsigned long long)bl->blocks[1].offset, (unsigned long long)bl->blocks[1].length);
        }
    }
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 2048, 2048, 1024, &bl), VIX_OK);
    if (holes) CHECK(bl && bl->numBlocks == 1 && bl->blocks[0].offset == 2048 &&
                         bl->blocks[0].length == 1024, "QAB sub-range");
    VixDiskLib_FreeBlockList(bl);
    /* The real library's rules: each breach is VIX_E_INVALID_ARG plus a VIOLATION (8 here). */
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 4096, 64, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 4608, 192, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 262144, 262144, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 100, 4096, 128, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 4000, 128, &bl), VIX_E_INVALID_ARG);
    /* An empty range within the rules: an empty list, as from VDDK 7.0.2. */
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 0, 128, &bl), VIX_OK);
    CHECK(bl && bl->numBlocks == 0, "empty range, empty list");
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 64, 0, 128, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, SPARSE_SIZE / SECTOR, 128, 128, &bl),
              VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 128, 128, NULL), VIX_E_INVALID_ARG);
    CHECK(bl == NULL, "no list after a refused query");
    /* As VDDK 7.0.2: a bad chunk or alignment leaves *blockList as it was; a range beyond the
       disk sets it NULL. */
    VixDiskLibBlockList *const mark = (VixDiskLibBlockList *)(uintptr_t)0x5ea1ed;
    bl = mark;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 64, 128, 128, &bl), VIX_E_INVALID_ARG);
    CHECK(bl == mark, "blockList untouched after a misaligned query");
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, SPARSE_SIZE / SECTOR, 128, 128, &bl),
              VIX_E_INVALID_ARG);
    CHECK(bl == NULL, "blockList NULL after a query beyond the disk");
    /* The largest chunk is fine, and so is the whole disk in one query. */
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, SPARSE_SIZE / SECTOR, 131072 / 4, &bl),
              VIX_OK);
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;

    CHECK_ERR(VixDiskLib_Write(h, 0, 1, buf), VIX_E_FILE_READ_ONLY); /* VIOLATION write */

    char *t = VixDiskLib_GetErrorText(VIX_E_DISK_OUTOFRANGE, NULL);
    CHECK(t && strstr(t, "out of bounds"), "error text: %s", t ? t : "(null)");
    VixDiskLib_FreeErrorText(t);
    t = VixDiskLib_GetErrorText(((VixError)0x1234 << 16) | VIX_E_HOST_CONNECTION_LOST, "en");
    CHECK(t && strstr(t, "connection"), "error text, high bits ignored: %s", t ? t : "(null)");
    VixDiskLib_FreeErrorText(t);

    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);

    /* A disk of 9217 sectors: the partial last chunk can never be queried (1 VIOLATION);
       a chunk larger than the disk neither (1 VIOLATION, on a 2048-sector file). */
    CHECK_ERR(connect_server("ivd-1", "odd", NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 9216, 1024, &bl), VIX_OK);
    CHECK(bl && bl->numBlocks == 1 && bl->blocks[0].offset == 0 && bl->blocks[0].length == 9216,
          "odd disk: whole chunks only");
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 8192, 2048, 1024, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_Read(h, ODD_SECTORS - 1, 1, buf), VIX_OK); /* reads reach the end */
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    p = VixDiskLib_AllocateConnectParams();
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    h = open_ro(c, g_local);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 4096, 4096, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);

    /* At most 512 Ki chunks per call (1 VIOLATION for one more). */
    CHECK_ERR(connect_server("ivd-1", "huge", NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, HUGE_SECTORS - 128, 128, &bl), VIX_OK);
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, HUGE_SECTORS, 128, &bl), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 128, HUGE_SECTORS - 128, 128, &bl), VIX_OK);
    VixDiskLib_FreeBlockList(bl);
    bl = NULL;
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);

    /* PrepareForAccess / EndAccess */
    p = server_params("ivd-1", NULL, "u", "secretpw", "AA:BB:CC");
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, "ivdfs-test"), VIX_OK);
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-test"), VIX_OK);
    const char *longid = "x123456789x123456789x123456789x123456789x123456789X"; /* 51 */
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, longid), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_EndAccess(p, longid), VIX_E_INVALID_ARG);
    /* the identity that ends access must be the one that prepared it (across processes: the
       state lives beside the images), and none of id, datastore, identity may be empty */
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, ""), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, "ivdfs-a"), VIX_OK);
    CHECK_ERR(VixDiskLib_EndAccess(p, ""), VIX_E_INVALID_ARG);
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-b"), VIX_E_INVALID_ARG);
    p->spec.vStorageObjSpec.datastoreMoRef = "";
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-a"), VIX_E_INVALID_ARG);
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-12";
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-a"), VIX_E_FILE_NOT_FOUND);
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-11";
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-a"), VIX_OK);
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs-b"), VIX_OK); /* nothing pending: harmless */
    /* ConnectEx: the datastore must be the IVD's; snapshotRef (a VM snapshot) is refused */
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-12";
    c = NULL;
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_E_FILE_NOT_FOUND);
    p->spec.vStorageObjSpec.datastoreMoRef = "datastore-11";
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, "snapshot-7", NULL, &c), VIX_E_INVALID_ARG);
    CHECK(c == NULL, "refused ConnectEx leaves NULL");
    VixDiskLib_FreeConnectParams(p);
    /* a 4Kn disk: GetInfo says so, capacity and reads stay in 512-byte sectors */
    CHECK_ERR(connect_server("ivd-4k", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    VixDiskLibInfo *i4 = NULL;
    CHECK_ERR(VixDiskLib_GetInfo(h, &i4), VIX_OK);
    CHECK(i4 && i4->logicalSectorSize == 4096 && i4->physicalSectorSize == 4096 &&
              i4->capacity == IMG_SIZE / SECTOR,
          "4Kn GetInfo");
    VixDiskLib_FreeInfo(i4);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    free(buf);
    VixDiskLib_Exit();

    char *log = slurp(g_logpath);
    char tidstr[64];
    snprintf(tidstr, sizeof(tidstr), " tid=%d InitEx major=8 minor=0 variant=8", (int)g_main_tid);
    CHECK(strstr(log, tidstr) != NULL, "InitEx line with tid");
    CHECK(log[0] >= '0' && log[0] <= '9', "lines start with the monotonic time");
    CHECK(strstr(log, "libDir=/opt/vddk-test") != NULL, "libDir logged");
    CHECK(count(log, "VIOLATION double-init") == 1, "double-init violation");
    CHECK(count(log, "VIOLATION request-too-large") == 1, "too-large violation");
    CHECK(count(log, "VIOLATION bad-handle func=Close") == 1, "stale handle violation");
    CHECK(count(log, "VIOLATION open-not-readonly") == 1, "non-read-only open violation");
    CHECK(count(log, "VIOLATION write handle=") == 1, "write violation");
    CHECK(count(log, "VIOLATION concurrent-read") == 0, "no concurrent reads here");
    CHECK(count(log, "VIOLATION close-thread") == 0, "Close on the Open thread");
    static const char *const qab_rules[] = {
        "rule=chunk-too-small", "rule=chunk-not-power-of-two", "rule=chunk-too-large",
        "rule=start-unaligned", "rule=length-unaligned",
        "rule=beyond-disk", "rule=null-blocklist", "rule=chunk-larger-than-disk",
        "rule=too-many-chunks", NULL};
    for (int i = 0; qab_rules[i]; i++)
        CHECK(count(log, qab_rules[i]) >= 1, "QAB violation %s", qab_rules[i]);
    CHECK(count(log, "VIOLATION query-allocated-blocks handle=") == 13, "13 QAB violations, got %d",
          count(log, "VIOLATION query-allocated-blocks handle="));
    CHECK(count(log, "chunk=1024 capacity=9217 rule=beyond-disk") == 1, "partial last chunk");
    CHECK(count(log, "VIOLATION access-identity") == 2, "empty identity violations");
    CHECK(count(log, "VIOLATION access-args") == 1, "empty datastore violation");
    CHECK(count(log, "VIOLATION end-access-identity id=ivd-1 identity=ivdfs-b pending=1") == 1,
          "wrong identity violation");
    CHECK(count(log, "VIOLATION wrong-datastore") == 2, "wrong datastore violations");
    CHECK(count(log, "VIOLATION connect-snapshot-ref") == 1, "snapshotRef violation");
    CHECK(count(log, "GetInfo handle=") >= 1 && count(log, "logical=4096 physical=4096") == 1,
          "4Kn GetInfo line");
    CHECK(count(log, "VIOLATION") == 25, "exactly 25 violations, got %d", count(log, "VIOLATION"));
    CHECK(strstr(log, " plugin=loaded ") != NULL, "InitEx logs the loaded plugin");
    CHECK(strstr(log, "secretpw") == NULL, "password must never be logged");
    CHECK(strstr(log, "ConnectEx conn=1 mode=local") != NULL, "local ConnectEx line");
    CHECK(strstr(log, "server=vcsim.example port=443 nfcHostPort=0 thumb=AA:BB:CC credType=1 "
                      "user=u readOnly=1 specType=1 id=ivd-1 ds=datastore-11 ssid=snap-1") != NULL,
          "server ConnectEx line");
    CHECK(strstr(log, "err=35") != NULL, "refused login logged");
    CHECK(strstr(log, "Read handle=1 start=3 n=100 seq=1 err=0") != NULL, "Read line");
    CHECK(strstr(log, "Open conn=2 path=ivd-1 flags=4 handle=2 transport=nbdssl") != NULL,
          "Open line");
    CHECK(strstr(log, "PrepareForAccess id=ivd-1 identity=ivdfs-test server=vcsim.example err=0"),
          "Prepare line");
    CHECK(strstr(log, "EndAccess id=ivd-1 identity=ivdfs-test server=vcsim.example err=0"),
          "EndAccess line");
    CHECK(strstr(log, "Exit prepares=4 endaccess=8 open_handles=0 connections=0") != NULL,
          "Exit summary");
    CHECK(strstr(log, "Disconnect conn=2 handles=0") != NULL, "Disconnect line");
    free(log);
}

/* 8 async requests with 20 ms latency overlap on one handle; Wait and Close wait for them. */
static void phase_async(void) {
    env_reset("async");
    setenv("VDDK_STANDIN_LATENCY_US", "20000", 1);
    init();
    VixDiskLibConnection c = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, "nbdssl:nbd", &c), VIX_OK);
    VixDiskLibHandle h = open_ro(c, NULL);
    uint8_t *buf = malloc(8 * 128 * SECTOR);

    double t0 = now_ms();
    CHECK_ERR(VixDiskLib_Read(h, 0, 8, buf), VIX_OK);
    double dt = now_ms() - t0;
    CHECK(dt >= 19.5, "sync read pays the latency: %.1f ms", dt);

    slot_t slots[8];
    memset(slots, 0, sizeof(slots));
    t0 = now_ms();
    for (int i = 0; i < 8; i++)
        CHECK_ERR(VixDiskLib_ReadAsync(h, (uint64_t)i * 128, 128, buf + i * 128 * SECTOR, on_done,
                                       &slots[i]),
                  VIX_ASYNC);
    double submit = now_ms() - t0;
    CHECK_ERR(VixDiskLib_Wait(h), VIX_OK);
    dt = now_ms() - t0;
    CHECK(submit < 15, "ReadAsync returns at once: %.1f ms", submit);
    CHECK(dt >= 19.5 && dt < 120, "8 async reads overlap their latency: %.1f ms (serial: 160)", dt);
    for (int i = 0; i < 8; i++) {
        CHECK(atomic_load(&slots[i].done) && slots[i].err == VIX_OK, "async %d done/err", i);
        CHECK(slots[i].tid != g_main_tid, "callback %d on a library thread", i);
    }
    CHECK(matches_file(g_current, 0, buf, 8 * 128 * SECTOR), "async data");

    /* Close waits for outstanding requests. */
    memset(slots, 0, sizeof(slots));
    for (int i = 0; i < 4; i++)
        VixDiskLib_ReadAsync(h, (uint64_t)i * 8, 8, buf + i * 8 * SECTOR, on_done, &slots[i]);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    for (int i = 0; i < 4; i++) CHECK(atomic_load(&slots[i].done), "Close waited for %d", i);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    free(buf);
    VixDiskLib_Exit();
    char *log = slurp(g_logpath);
    CHECK(count(log, " ReadAsync handle=") == 12 && count(log, " ReadAsyncDone handle=") == 12,
          "ReadAsync lines");
    CHECK(count(log, "mode=queued") == 12, "queued");
    CHECK(strstr(log, " Wait handle=") != NULL, "Wait line");
    CHECK(count(log, "VIOLATION") == 0, "no violation in async phase");
    free(log);
}

/* Inline completion (nbd with ASYNC_INLINE_EVERY, and san), transport choice, bandwidth. */
typedef struct {
    VixDiskLibHandle h;
    int n;
    uint8_t *buf;
} reader_arg_t;
static void *reader(void *a) {
    reader_arg_t *r = a;
    for (int i = 0; i < r->n; i++) CHECK_ERR(VixDiskLib_Read(r->h, 0, 2048, r->buf), VIX_OK);
    return NULL;
}

static void phase_inline_bw(void) {
    env_reset("inline");
    setenv("VDDK_STANDIN_ASYNC_INLINE_EVERY", "2", 1);
    init();
    VixDiskLibConnection c = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    VixDiskLibHandle h = open_ro(c, NULL);
    uint8_t *buf = malloc(4 * 8 * SECTOR);
    slot_t slots[4];
    memset(slots, 0, sizeof(slots));
    for (int i = 0; i < 4; i++) {
        atomic_store(&g_submitting, 1);
        CHECK_ERR(VixDiskLib_ReadAsync(h, (uint64_t)i * 8, 8, buf + i * 8 * SECTOR, on_done,
                                       &slots[i]),
                  VIX_ASYNC);
        atomic_store(&g_submitting, 0);
    }
    CHECK_ERR(VixDiskLib_Wait(h), VIX_OK);
    for (int i = 0; i < 4; i++) {
        int want_inline = (i % 2) == 1; /* every 2nd request */
        CHECK(slots[i].done && slots[i].err == VIX_OK, "inline test %d", i);
        CHECK((slots[i].tid == g_main_tid) == want_inline, "request %d inline=%d", i, want_inline);
        if (want_inline) CHECK(slots[i].during_submit, "inline %d completes before return", i);
    }
    CHECK(matches_file(g_current, 0, buf, 4 * 8 * SECTOR), "inline data");
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();

    /* san: ReadAsync is synchronous and calls back inline; a caller asking for nbd gets it. */
    env_reset("san");
    setenv("VDDK_STANDIN_TRANSPORT", "san", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, "san:hotadd:nbdssl", &c), VIX_OK);
    h = open_ro(c, NULL);
    CHECK(strcmp(VixDiskLib_GetTransportMode(h), "san") == 0, "san mode");
    memset(slots, 0, sizeof(slots));
    atomic_store(&g_submitting, 1);
    CHECK_ERR(VixDiskLib_ReadAsync(h, 0, 8, buf, on_done, &slots[0]), VIX_ASYNC);
    atomic_store(&g_submitting, 0);
    CHECK(slots[0].done && slots[0].during_submit && slots[0].tid == g_main_tid, "san inline");
    CHECK_ERR(VixDiskLib_Wait(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    CHECK_ERR(connect_server("ivd-1", NULL, "nbd", &c), VIX_OK);
    h = open_ro(c, NULL);
    CHECK(strcmp(VixDiskLib_GetTransportMode(h), "nbd") == 0, "nbd requested");
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    CHECK_ERR(connect_server("ivd-1", NULL, "hotadd", &c), VIX_OK);
    VixDiskLibHandle hx = NULL;
    CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &hx), VIX_E_NOT_SUPPORTED);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    free(buf);

    /* bandwidth: 50 MiB/s per handle and for the process */
    env_reset("bw");
    setenv("VDDK_STANDIN_HANDLE_BW", "52428800", 1);
    setenv("VDDK_STANDIN_GLOBAL_BW", "52428800", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    VixDiskLibHandle ha = open_ro(c, NULL), hb = open_ro(c, NULL);
    reader_arg_t ra = {ha, 4, malloc(1 << 20)}, rb = {hb, 4, malloc(1 << 20)};
    double t0 = now_ms();
    reader(&ra);
    double dt = now_ms() - t0;
    CHECK(dt >= 78 && dt < 200, "4 MiB at 50 MiB/s on one handle: %.1f ms (want 80)", dt);
    t0 = now_ms();
    pthread_t th;
    pthread_create(&th, NULL, reader, &rb);
    reader(&ra);
    pthread_join(th, NULL);
    dt = now_ms() - t0;
    CHECK(dt >= 155 && dt < 320, "2 x 4 MiB at 50 MiB/s global: %.1f ms (want 160)", dt);
    CHECK_ERR(VixDiskLib_Close(ha), VIX_OK);
    CHECK_ERR(VixDiskLib_Close(hb), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    free(ra.buf);
    free(rb.buf);
}

/* ESXi's host-wide NFC memory: two sessions of one host share it. A local file crosses no
   network: latency and bandwidth caps do not slow it. */
static void phase_nfc_host(void) {
    env_reset("nfchost");
    setenv("VDDK_STANDIN_NFC_HOST_BYTES", "3145728", 1); /* 3 MiB */
    setenv("VDDK_STANDIN_LATENCY_US", "100000", 1);
    init();
    VixDiskLibConnection c1 = NULL, c2 = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, "nbdssl", &c1), VIX_OK);
    CHECK_ERR(connect_server("ivd-1", NULL, "nbdssl", &c2), VIX_OK);
    VixDiskLibHandle h1 = open_ro(c1, NULL), h2 = open_ro(c2, NULL);
    uint8_t *buf = malloc(3 * 4096 * SECTOR);
    slot_t s[3];
    memset(s, 0, sizeof(s));
    CHECK_ERR(VixDiskLib_ReadAsync(h1, 0, 4096, buf, on_done, &s[0]), VIX_ASYNC);
    CHECK_ERR(VixDiskLib_ReadAsync(h2, 0, 4096, buf + 4096 * SECTOR, on_done, &s[1]), VIX_ASYNC);
    CHECK_ERR(VixDiskLib_Wait(h1), VIX_OK);
    CHECK_ERR(VixDiskLib_Wait(h2), VIX_OK);
    CHECK(s[0].err == VIX_OK, "the first 2 MiB fit the host: %llu", (unsigned long long)s[0].err);
    CHECK(s[1].err == VIX_E_OUT_OF_MEMORY, "2 + 2 MiB exceed a 3 MiB host: %llu",
          (unsigned long long)s[1].err);
    /* Given back at completion: the host has room again. */
    CHECK_ERR(VixDiskLib_ReadAsync(h2, 0, 4096, buf, on_done, &s[2]), VIX_ASYNC);
    CHECK_ERR(VixDiskLib_Wait(h2), VIX_OK);
    CHECK(s[2].err == VIX_OK, "room again: %llu", (unsigned long long)s[2].err);
    CHECK_ERR(VixDiskLib_Close(h1), VIX_OK);
    CHECK_ERR(VixDiskLib_Close(h2), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c1), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c2), VIX_OK);
    VixDiskLib_Exit();
    char *log = slurp(g_logpath);
    CHECK(count(log, "VIOLATION nfc-host-memory func=ReadAsync") == 1, "one host violation");
    CHECK(count(log, "VIOLATION nfc-session-memory") == 0, "no session violation");
    free(log);

    env_reset("localfast");
    setenv("VDDK_STANDIN_LATENCY_US", "5000000", 1); /* 5 s a read, 1 byte/s: never local */
    setenv("VDDK_STANDIN_HANDLE_BW", "1", 1);
    setenv("VDDK_STANDIN_GLOBAL_BW", "1", 1);
    init();
    VixDiskLibConnectParams *p = VixDiskLib_AllocateConnectParams();
    VixDiskLibConnection c = NULL;
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    VixDiskLibHandle h = open_ro(c, g_local);
    double t0 = now_ms();
    CHECK_ERR(VixDiskLib_Read(h, 0, 2048, buf), VIX_OK);
    double dt = now_ms() - t0;
    CHECK(dt < 2500, "a local read pays no network latency or bandwidth: %.0f ms", dt);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    free(buf);
}

static void phase_faults(void) {
    VixDiskLibConnection c = NULL;
    VixDiskLibHandle h = NULL;
    uint8_t buf[8 * SECTOR];

    /* FAIL_READ_NTH: sync and async counted together; failed buffers are poisoned */
    env_reset("fault-nth");
    setenv("VDDK_STANDIN_FAIL_READ_NTH", "2,4,6", 1);
    init();
    int warns = g_nwarn;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    for (int i = 1; i <= 5; i++) {
        VixError e = VixDiskLib_Read(h, (uint64_t)i, 1, buf);
        if (i == 2 || i == 4) {
            CHECK(e == VIX_E_HOST_CONNECTION_LOST, "read %d: %llu", i, (unsigned long long)e);
            CHECK(!matches_file(g_current, (uint64_t)i, buf, SECTOR), "failed read %d poisoned", i);
        } else {
            CHECK(e == VIX_OK && matches_file(g_current, (uint64_t)i, buf, SECTOR), "read %d", i);
        }
    }
    slot_t s;
    memset(&s, 0, sizeof(s));
    CHECK_ERR(VixDiskLib_ReadAsync(h, 0, 1, buf, on_done, &s), VIX_ASYNC);
    CHECK_ERR(VixDiskLib_Wait(h), VIX_OK);
    CHECK(s.done && s.err == VIX_E_HOST_CONNECTION_LOST, "async read 6 fails: %llu",
          (unsigned long long)s.err);
    CHECK(g_nwarn >= warns + 3, "warn callback on injected faults");
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    char *log = slurp(g_logpath);
    CHECK(strstr(log, "start=2 n=1 seq=2 err=36") != NULL, "failed read logged");
    CHECK(strstr(log, "read_errors=3") != NULL, "Exit counts errors");
    free(log);

    /* FAIL_CODE + NO_QAB */
    env_reset("fault-code");
    setenv("VDDK_STANDIN_FAIL_READ_NTH", "1", 1);
    setenv("VDDK_STANDIN_FAIL_CODE", "14011", 1);
    setenv("VDDK_STANDIN_NO_QAB", "1", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_E_HOST_TCP_CONN_LOST);
    CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_OK);
    VixDiskLibBlockList *bl = NULL;
    CHECK_ERR(VixDiskLib_QueryAllocatedBlocks(h, 0, 128, 128, &bl), VIX_E_NOT_SUPPORTED);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();

    /* DROP_AFTER: the connection is lost after 3 good reads, until reconnected */
    env_reset("fault-drop");
    setenv("VDDK_STANDIN_DROP_AFTER", "3", 1);
    init();
    for (int round = 0; round < 2; round++) {
        CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
        h = open_ro(c, NULL);
        for (int i = 0; i < 3; i++) CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_OK);
        CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_E_HOST_CONNECTION_LOST);
        CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_E_HOST_CONNECTION_LOST);
        VixDiskLibHandle h2 = NULL;
        CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h2),
                  VIX_E_HOST_CONNECTION_LOST);
        CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
        CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    }
    VixDiskLib_Exit();

    /* SHORT_READ_NTH: half the buffer filled, the call fails */
    env_reset("fault-short");
    setenv("VDDK_STANDIN_SHORT_READ_NTH", "1", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    memset(buf, 0x11, sizeof(buf));
    VixError e = VixDiskLib_Read(h, 16, 8, buf);
    CHECK(e != VIX_OK, "short read fails");
    CHECK(matches_file(g_current, 16, buf, 4 * SECTOR), "first half filled");
    CHECK(buf[4 * SECTOR] == 0x11 && buf[8 * SECTOR - 1] == 0x11, "second half untouched");
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();

    /* STALL_NTH / STALL_MS */
    env_reset("fault-stall");
    setenv("VDDK_STANDIN_STALL_NTH", "2", 1);
    setenv("VDDK_STANDIN_STALL_MS", "60", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    double t0 = now_ms();
    CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_OK);
    double d1 = now_ms() - t0;
    t0 = now_ms();
    CHECK_ERR(VixDiskLib_Read(h, 0, 1, buf), VIX_OK);
    double d2 = now_ms() - t0;
    CHECK(d1 < 30 && d2 >= 59.5, "stall: %.1f ms then %.1f ms", d1, d2);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();

    /* FAIL_READ_RATE with a seed: about half fail, never a bad VIX_OK */
    env_reset("fault-rate");
    setenv("VDDK_STANDIN_FAIL_READ_RATE", "0.5", 1);
    setenv("VDDK_STANDIN_SEED", "7", 1);
    setenv("VDDK_STANDIN_LOG_READS", "0", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    int fails = 0, bad = 0;
    for (int i = 0; i < 200; i++) {
        memset(buf, 0, sizeof(buf));
        e = VixDiskLib_Read(h, (uint64_t)i, 1, buf);
        if (e != VIX_OK) fails++;
        else if (!matches_file(g_current, (uint64_t)i, buf, SECTOR)) bad++;
    }
    CHECK(fails > 60 && fails < 140 && bad == 0, "rate: %d failures, %d bad", fails, bad);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    log = slurp(g_logpath);
    CHECK(count(log, " Read handle=") == 0, "LOG_READS=0 suppresses Read lines");
    CHECK(strstr(log, " reads=200 read_bytes=") != NULL, "reads still counted");
    free(log);

    /* FAIL_CONNECT; FAIL_OPEN + FAIL_PREPARE */
    env_reset("fault-connect");
    setenv("VDDK_STANDIN_FAIL_CONNECT", "1", 1);
    init();
    c = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_E_CANNOT_CONNECT_TO_HOST);
    CHECK(c == NULL, "no connection");
    VixDiskLib_Exit();
    env_reset("fault-open");
    setenv("VDDK_STANDIN_FAIL_OPEN", "1", 1);
    setenv("VDDK_STANDIN_FAIL_PREPARE", "1", 1);
    init();
    VixDiskLibConnectParams *p = server_params("ivd-1", NULL, "u", "pw", NULL);
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, "ivdfs"), VIX_E_HOST_USER_PERMISSIONS);
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs"), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = NULL;
    CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h),
              VIX_E_HOST_NETWORK_CONN_REFUSED);
    CHECK(h == NULL, "no handle");
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    log = slurp(g_logpath);
    CHECK(count(log, "VIOLATION") == 0, "Prepare/EndAccess paired even on failure");
    free(log);

    /* Given codes: alone they fail every call; with _FIRST/_AFTER only those calls. */
    env_reset("fault-codes");
    setenv("VDDK_STANDIN_FAIL_CONNECT_CODE", "35", 1);
    setenv("VDDK_STANDIN_FAIL_OPEN_CODE", "16053", 1);
    init();
    c = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_E_AUTHENTICATION_FAIL);
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_E_AUTHENTICATION_FAIL);
    VixDiskLib_Exit();
    env_reset("fault-first");
    setenv("VDDK_STANDIN_FAIL_CONNECT_FIRST", "1", 1);
    setenv("VDDK_STANDIN_FAIL_OPEN_CODE", "3014", 1);
    setenv("VDDK_STANDIN_FAIL_OPEN_FIRST", "2", 1);
    init();
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_E_CANNOT_CONNECT_TO_HOST);
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = NULL;
    for (int i = 1; i <= 3; i++) {
        VixError want = i <= 2 ? VIX_E_HOST_USER_PERMISSIONS : VIX_OK;
        CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h), want);
    }
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    env_reset("fault-after");
    setenv("VDDK_STANDIN_FAIL_OPEN_CODE", "36", 1);
    setenv("VDDK_STANDIN_FAIL_OPEN_AFTER", "1", 1);
    init(); /* counters restart at InitEx */
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    h = open_ro(c, NULL);
    VixDiskLibHandle h2 = NULL;
    CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h2),
              VIX_E_HOST_CONNECTION_LOST);
    CHECK_ERR(VixDiskLib_Open(c, NULL, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h2),
              VIX_E_HOST_CONNECTION_LOST);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    log = slurp(g_logpath);
    CHECK(count(log, " Open conn=") == 3 && count(log, "err=36\n") == 2, "Open lines");
    free(log);
}

/* InitEx's configFile: tmpDirectory gets VDDK's files; a file that cannot be read fails InitEx. */
static void phase_config(void) {
    char tmpdir[PATH_MAX], cfg[PATH_MAX + 16], leftover[PATH_MAX + 64];
    snprintf(tmpdir, sizeof(tmpdir), "%s/vddk-tmp", g_dir);
    mkdir(tmpdir, 0700);
    snprintf(cfg, sizeof(cfg), "%s/vddk.conf", g_dir);
    FILE *f = fopen(cfg, "w");
    fprintf(f, "# ivdfs\nvixDiskLib.transport.LogLevel = 1\ntmpDirectory = \"%s\"\n", tmpdir);
    fclose(f);
    env_reset("config");
    CHECK_ERR(VixDiskLib_InitEx(8, 0, NULL, NULL, NULL, "/opt/vddk-test", "/nonexistent.conf"),
              VIX_E_FILE_NOT_FOUND);
    CHECK_ERR(VixDiskLib_InitEx(8, 0, NULL, NULL, NULL, "/opt/vddk-test", cfg), VIX_OK);
    VixDiskLibConnectParams *p = server_params("ivd-1", NULL, "u", "pw", NULL);
    p->nfcHostPort = 902;
    VixDiskLibConnection c = NULL;
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    VixDiskLib_Exit();
    snprintf(leftover, sizeof(leftover), "%s/vixDiskLib-standin-%d.log", tmpdir, (int)getpid());
    CHECK(access(leftover, F_OK) == 0, "a file in tmpDirectory: %s", leftover);
    char *log = slurp(g_logpath);
    CHECK(count(log, "configFile=/nonexistent.conf tmpDirectory=\"\" err=4") == 1, "bad config");
    char want[PATH_MAX + 64];
    snprintf(want, sizeof(want), "tmpDirectory=%s transport=", tmpdir);
    CHECK(strstr(log, want) != NULL, "tmpDirectory logged");
    CHECK(strstr(log, "port=443 nfcHostPort=902 ") != NULL, "nfcHostPort logged");
    CHECK(count(log, "VIOLATION") == 0, "no violations in the config phase");
    free(log);
}

/* Run in a copy of this program started without LD_LIBRARY_PATH: the plugin cannot load. */
static void phase_no_plugin(void) {
    env_reset("no-plugin");
    init(); /* still VIX_OK */
    CHECK(g_saw_plugin_error, "InitEx reports the failed plugin load through the log callback");
    VixDiskLibConnectParams *p = server_params("ivd-1", NULL, "u", "pw", NULL);
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, "ivdfs"), VIX_E_DISK_SUBSYSTEM_INIT_FAIL);
    CHECK_ERR(VixDiskLib_EndAccess(p, "ivdfs"), VIX_E_DISK_SUBSYSTEM_INIT_FAIL);
    VixDiskLib_FreeConnectParams(p);
    VixDiskLibConnection c = NULL;
    VixDiskLibHandle h = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    CHECK_ERR(VixDiskLib_Open(c, "ivd-1", VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h),
              VIX_E_DISK_SUBSYSTEM_INIT_FAIL);
    CHECK(h == NULL, "no handle");
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    /* Local files do not need vSphere access. */
    p = VixDiskLib_AllocateConnectParams();
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    h = open_ro(c, g_local);
    CHECK_ERR(VixDiskLib_Close(h), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK);
    char *t = VixDiskLib_GetErrorText(VIX_E_DISK_SUBSYSTEM_INIT_FAIL, NULL);
    CHECK(t && strstr(t, "subsystems failed to initialize"), "16053 text: %s", t ? t : "(null)");
    VixDiskLib_FreeErrorText(t);
    VixDiskLib_Exit();
    char *log = slurp(g_logpath);
    CHECK(strstr(log, " plugin=failed ") != NULL, "InitEx logs the failed plugin");
    CHECK(strstr(log, "PrepareForAccess id=ivd-1 identity=ivdfs server=vcsim.example err=16053") &&
              strstr(log, "EndAccess id=ivd-1 identity=ivdfs server=vcsim.example err=16053") &&
              strstr(log, "capacity=0 err=16053"),
          "Prepare, EndAccess and Open fail with 16053");
    CHECK(count(log, "VIOLATION") == 0, "no violations without the plugin");
    free(log);
}

/* Starts this program again with LD_LIBRARY_PATH removed (the loader reads it at exec only). */
static void run_without_library_path(void) {
    pid_t pid = fork();
    if (pid == 0) {
        unsetenv("LD_LIBRARY_PATH");
        setenv("STANDIN_SELFTEST_DIR", g_dir, 1);
        execl("/proc/self/exe", "standin-selftest", "no-plugin", (char *)NULL);
        _exit(127);
    }
    int st = 0;
    waitpid(pid, &st, 0);
    CHECK(WIFEXITED(st) && WEXITSTATUS(st) == 0, "the plugin-less phase failed (status %d)", st);
}

/* Rule checks: concurrent reads on one handle, Close on another thread, teardown order. */
typedef struct {
    VixDiskLibHandle h;
    uint8_t buf[SECTOR];
} conc_arg_t;
static void *conc_read(void *a) {
    conc_arg_t *x = a;
    CHECK_ERR(VixDiskLib_Read(x->h, 0, 1, x->buf), VIX_OK);
    return NULL;
}
static void *close_other_thread(void *a) {
    CHECK_ERR(VixDiskLib_Close((VixDiskLibHandle)a), VIX_OK);
    return NULL;
}

static void phase_rules(void) {
    env_reset("rules");
    setenv("VDDK_STANDIN_LATENCY_US", "30000", 1);
    init();
    VixDiskLibConnection c = NULL;
    CHECK_ERR(connect_server("ivd-1", NULL, NULL, &c), VIX_OK);
    VixDiskLibHandle h = open_ro(c, NULL);
    conc_arg_t a1 = {.h = h}, a2 = {.h = h};
    pthread_t t1, t2;
    /* Two reads started together overlap within the 30 ms latency, unless a loaded machine
       runs them one after the other: try again until the stand-in saw them overlap (no
       timing assumption; each try either overlaps or not). */
    for (int tries = 0; tries < 200; tries++) {
        pthread_create(&t1, NULL, conc_read, &a1);
        pthread_create(&t2, NULL, conc_read, &a2);
        pthread_join(t1, NULL);
        pthread_join(t2, NULL);
        char *sofar = slurp(g_logpath);
        int seen = count(sofar, "VIOLATION concurrent-read handle=");
        free(sofar);
        if (seen) break;
    }
    pthread_create(&t1, NULL, close_other_thread, h);
    pthread_join(t1, NULL);
    VixDiskLibHandle h2 = open_ro(c, NULL);
    (void)h2;
    VixDiskLibConnectParams *p = server_params("ivd-1", NULL, "u", "pw", NULL);
    CHECK_ERR(VixDiskLib_PrepareForAccess(p, "ivdfs"), VIX_OK);
    VixDiskLib_FreeConnectParams(p);
    /* The reserved fields belong to the library (real VDDK keeps a magic and state there). */
    p = server_params("ivd-1", NULL, "u", "pw", NULL);
    VixDiskLibConnection c2 = NULL;
    p->reserved2 = NULL;
    CHECK_ERR(VixDiskLib_ConnectEx(p, 1, NULL, NULL, &c2), VIX_E_INVALID_ARG);
    VixDiskLib_FreeConnectParams(p); /* still written: a second VIOLATION */
    VixDiskLibConnectParams own;
    memset(&own, 0, sizeof(own));
    own.specType = VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
    CHECK_ERR(VixDiskLib_ConnectEx(&own, 1, NULL, NULL, &c2), VIX_OK); /* works, but a VIOLATION */
    CHECK_ERR(VixDiskLib_Disconnect(c2), VIX_OK);
    CHECK_ERR(VixDiskLib_Disconnect(c), VIX_OK); /* with h2 still open */
    VixDiskLib_Exit();                            /* with h2 still open, Prepare unpaired */
    VixDiskLib_Exit();                            /* without InitEx */
    char *log = slurp(g_logpath);
    CHECK(count(log, "VIOLATION concurrent-read handle=") == 1 && count(log, "inflight=2 func=Read") == 1,
          "concurrent-read violation (once: the try that overlapped)");
    CHECK(count(log, "VIOLATION close-thread handle=") == 1, "close-thread violation");
    CHECK(count(log, "VIOLATION disconnect-with-open-handles conn=") == 1 && count(log, " handles=1\n") == 2,
          "disconnect violation");
    CHECK(count(log, "VIOLATION exit-with-open handles=1 connections=0") == 1, "exit violation");
    CHECK(count(log, "VIOLATION unpaired-prepare prepares=1 endaccess=0") == 1, "unpaired");
    CHECK(count(log, "VIOLATION exit-without-init") == 1, "exit-without-init");
    CHECK(count(log, "VIOLATION connect-params-reserved-written func=ConnectEx") == 1 &&
              count(log, "VIOLATION connect-params-reserved-written func=FreeConnectParams") == 1,
          "reserved fields written");
    CHECK(count(log, "VIOLATION connect-params-not-allocated func=ConnectEx") == 1,
          "params not from AllocateConnectParams");
    free(log);
}

/* The VDDK 6 variant: loaded privately, it lacks the 6.7 entry points. */
static void phase_vddk6(void) {
    char exe[PATH_MAX], lib[PATH_MAX + 64];
    ssize_t n = readlink("/proc/self/exe", exe, sizeof(exe) - 1);
    if (n <= 0) { CHECK(0, "readlink"); return; }
    exe[n] = 0;
    snprintf(lib, sizeof(lib), "%s/vddk6/lib64/libvixDiskLib.so.6", dirname(exe));
    void *so = dlopen(lib, RTLD_NOW | RTLD_LOCAL);
    CHECK(so != NULL, "dlopen %s: %s", lib, dlerror());
    if (!so) return;
    CHECK(dlsym(so, "VixDiskLib_AllocateConnectParams") == NULL, "6: no AllocateConnectParams");
    CHECK(dlsym(so, "VixDiskLib_FreeConnectParams") == NULL, "6: no FreeConnectParams");
    typedef VixError (*init_t)(uint32_t, uint32_t, VixDiskLibGenericLogFunc *,
                               VixDiskLibGenericLogFunc *, VixDiskLibGenericLogFunc *,
                               const char *, const char *);
    typedef VixError (*connect_t)(const VixDiskLibConnectParams *, Bool, const char *,
                                  const char *, VixDiskLibConnection *);
    typedef VixError (*open_t)(VixDiskLibConnection, const char *, uint32_t, VixDiskLibHandle *);
    typedef VixError (*info_t)(VixDiskLibHandle, VixDiskLibInfo **);
    init_t i6 = (init_t)dlsym(so, "VixDiskLib_InitEx");
    connect_t c6 = (connect_t)dlsym(so, "VixDiskLib_ConnectEx");
    open_t o6 = (open_t)dlsym(so, "VixDiskLib_Open");
    info_t g6 = (info_t)dlsym(so, "VixDiskLib_GetInfo");
    void (*x6)(void) = (void (*)(void))dlsym(so, "VixDiskLib_Exit");
    CHECK(i6 && c6 && o6 && g6 && x6, "6: symbols");
    if (!(i6 && c6 && o6 && g6 && x6)) return;
    env_reset("vddk6");
    CHECK_ERR(i6(6, 7, NULL, NULL, NULL, NULL, NULL), VIX_OK);
    VixDiskLibConnectParams p;
    memset(&p, 0, sizeof(p));
    VixDiskLibConnection c = NULL;
    VixDiskLibHandle h = NULL;
    VixDiskLibInfo *info = NULL;
    CHECK_ERR(c6(&p, 1, NULL, NULL, &c), VIX_OK);
    CHECK_ERR(o6(c, g_local, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h), VIX_OK);
    CHECK_ERR(g6(h, &info), VIX_OK);
    CHECK(info && info->capacity == LOCAL_SIZE / SECTOR && info->uuid, "6: GetInfo");
    /* the 6.x struct is 56 bytes; the library must not have written the 7+ fields */
    CHECK(malloc_usable_size(info) < 64, "6: info allocated with the 56-byte 6.x layout");
    void (*f6)(VixDiskLibInfo *) = (void (*)(VixDiskLibInfo *))dlsym(so, "VixDiskLib_FreeInfo");
    if (f6) f6(info);
    x6(); /* releases the handle and connection (logs exit-with-open) */
    char *log = slurp(g_logpath);
    CHECK(strstr(log, "InitEx major=6 minor=7 variant=6") != NULL, "6: log");
    free(log);
    dlclose(so);
}

static void set_paths(void) {
    snprintf(g_images, sizeof(g_images), "%s/images", g_dir);
    snprintf(g_local, sizeof(g_local), "%s/local.raw", g_dir);
    snprintf(g_current, sizeof(g_current), "%s/ivd-1/current.raw", g_images);
    snprintf(g_sparse, sizeof(g_sparse), "%s/ivd-1/snap-1.raw", g_images);
    snprintf(g_odd, sizeof(g_odd), "%s/ivd-1/odd.raw", g_images);
    snprintf(g_huge, sizeof(g_huge), "%s/ivd-1/huge.raw", g_images);
}

int main(int argc, char **argv) {
    g_main_tid = tid();
    if (argc == 2 && !strcmp(argv[1], "no-plugin")) {
        const char *d = getenv("STANDIN_SELFTEST_DIR");
        snprintf(g_dir, sizeof(g_dir), "%s", d ? d : "/nonexistent");
        set_paths();
        phase_no_plugin();
        return g_failures ? 1 : 0;
    }
    const char *llp = getenv("LD_LIBRARY_PATH");
    if (!llp || !strstr(llp, "lib64")) {
        fprintf(stderr, "standin-selftest: run it with VDDK's lib64 on LD_LIBRARY_PATH "
                        "(make -C tests/testbed/standin check)\n");
        return 2;
    }
    snprintf(g_dir, sizeof(g_dir), "%s/standin-selftest-XXXXXX", getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
    if (!mkdtemp(g_dir)) { perror("mkdtemp"); return 2; }
    set_paths();
    char ivd[1536];
    snprintf(ivd, sizeof(ivd), "%s/ivd-1", g_images);
    mkdir(g_images, 0755);
    mkdir(ivd, 0755);
    write_text(ivd, "datastore", "datastore-11\n");
    char ivd4k[1536];
    snprintf(ivd4k, sizeof(ivd4k), "%s/ivd-4k", g_images);
    mkdir(ivd4k, 0755);
    write_text(ivd4k, "datastore", "datastore-11\n");
    write_text(ivd4k, "sector-size", "4096 4096\n");
    char cur4k[1600];
    snprintf(cur4k, sizeof(cur4k), "%s/current.raw", ivd4k);
    write_pattern(cur4k, IMG_SIZE, 5);
    write_pattern(g_local, LOCAL_SIZE, 1);
    write_pattern(g_odd, ODD_SECTORS * SECTOR, 4);
    write_pattern(g_current, IMG_SIZE, 2);
    int fd = open(g_sparse, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, SPARSE_SIZE) != 0) { perror(g_sparse); return 2; }
    write_at(fd, 1 << 20, 64 * 1024, 3);
    write_at(fd, (9 << 20) + 32 * 1024, 128 * 1024, 3);
    close(fd);
    fd = open(g_huge, O_WRONLY | O_CREAT | O_TRUNC, 0644);
    if (fd < 0 || ftruncate(fd, (off_t)(HUGE_SECTORS * SECTOR)) != 0) { perror(g_huge); return 2; }
    close(fd);

    double t0 = now_ms();
    phase_basic();
    phase_async();
    phase_inline_bw();
    phase_nfc_host();
    phase_faults();
    phase_rules();
    phase_config();
    run_without_library_path();
    phase_vddk6();

    if (!g_failures) {
        char cmd[PATH_MAX + 16];
        snprintf(cmd, sizeof(cmd), "rm -rf '%s'", g_dir);
        if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", g_dir);
    }
    printf("standin-selftest: %s (%d failures, %.0f ms)%s%s\n", g_failures ? "FAILED" : "ok",
           g_failures, now_ms() - t0, g_failures ? "; files kept in " : "",
           g_failures ? g_dir : "");
    return g_failures ? 1 : 0;
}
