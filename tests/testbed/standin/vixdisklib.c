/*
 * vixdisklib.c -- the ivdfs test bed's stand-in for VMware's libvixDiskLib.so.
 *
 * Exports the public VixDiskLib names with the public struct layouts (see vixDiskLib.h) and
 * serves raw images: in server mode the IVD <id> at snapshot <ssId> is
 * $VDDK_STANDIN_IMAGES/<id>/<ssId>.raw (current.raw without a snapshot); in VDDK's local-file
 * mode VixDiskLib_Open names the file: a VMDK (descriptor or hosted sparse file, and its chain
 * of parents) is read through vmdk.c as real VDDK reads it, any other file as a raw disk.
 * Everything else (latency, bandwidth, faults, call log) is configured from VDDK_STANDIN_*
 * environment variables read at VixDiskLib_InitEx; see README.md. Disks are only ever opened
 * O_RDONLY; in local-file mode, like real VDDK, the stand-in makes a <link>.lck directory beside
 * every VMDK link it opens, unless the filesystem is read-only (see lock_link).
 *
 * Handles and connections handed to the caller are tagged ids, not pointers, so that a stale
 * or foreign handle is detected (and logged as a VIOLATION) instead of being dereferenced.
 *
 * Like VMware's library (VDDK 6.7+), InitEx dlopen()s its plugin libvddkVimAccess.so by bare
 * name. The libraries carry no RPATH, so the plugin (and the bundled libvmacore.so it needs) is
 * found only when <libDir>/lib64 is on LD_LIBRARY_PATH. A failed load does not fail InitEx; it
 * is reported through the log callback, and every call that needs vSphere access later fails
 * with VIX_E_DISK_SUBSYSTEM_INIT_FAIL (16053).
 */
#define _GNU_SOURCE
#include <ctype.h>
#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <time.h>
#include <unistd.h>

#include "vixDiskLib.h"
#include "vmdk.h"

#define EXPORT __attribute__((visibility("default")))

/* ---- ABI checks against ivdfs/vddk/_cdefs.py (LP64 x86_64) ---------------------------- */
_Static_assert(sizeof(Bool) == 1, "Bool is char");
_Static_assert(sizeof(VixError) == 8, "VixError is uint64");
_Static_assert(sizeof(VixDiskLibGeometry) == 12, "geometry");
_Static_assert(offsetof(VixDiskLibInfo, physGeo) == 12, "info.physGeo");
_Static_assert(offsetof(VixDiskLibInfo, capacity) == 24, "info.capacity");
_Static_assert(offsetof(VixDiskLibInfo, adapterType) == 32, "info.adapterType");
_Static_assert(offsetof(VixDiskLibInfo, numLinks) == 36, "info.numLinks");
_Static_assert(offsetof(VixDiskLibInfo, parentFileNameHint) == 40, "info.parentFileNameHint");
_Static_assert(offsetof(VixDiskLibInfo, uuid) == 48, "info.uuid");
#ifdef STANDIN_VDDK6
_Static_assert(sizeof(VixDiskLibInfo) == 56, "VDDK 6 info size");
#else
_Static_assert(offsetof(VixDiskLibInfo, logicalSectorSize) == 56, "info.logicalSectorSize");
_Static_assert(offsetof(VixDiskLibInfo, physicalSectorSize) == 60, "info.physicalSectorSize");
_Static_assert(sizeof(VixDiskLibInfo) == 64, "info size");
#endif
_Static_assert(offsetof(VixDiskLibConnectParams, serverName) == 8, "cp.serverName");
_Static_assert(offsetof(VixDiskLibConnectParams, thumbPrint) == 16, "cp.thumbPrint");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved1) == 24, "cp.reserved1");
_Static_assert(offsetof(VixDiskLibConnectParams, credType) == 32, "cp.credType");
_Static_assert(offsetof(VixDiskLibConnectParams, creds) == 40, "cp.creds");
_Static_assert(offsetof(VixDiskLibConnectParams, port) == 64, "cp.port");
_Static_assert(offsetof(VixDiskLibConnectParams, nfcHostPort) == 68, "cp.nfcHostPort");
_Static_assert(offsetof(VixDiskLibConnectParams, vimApiVer) == 72, "cp.vimApiVer");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved3) == 80, "cp.reserved3");
_Static_assert(offsetof(VixDiskLibConnectParams, reserved2) == 88, "cp.reserved2");
_Static_assert(offsetof(VixDiskLibConnectParams, spec) == 96, "cp.spec");
_Static_assert(offsetof(VixDiskLibConnectParams, specType) == 120, "cp.specType");
_Static_assert(sizeof(VixDiskLibConnectParams) == 128, "cp size");
_Static_assert(offsetof(VixDiskLibBlockList, blocks) == 8, "blocklist.blocks");
_Static_assert(sizeof(VixDiskLibBlock) == 16, "block size");

/* ---- constants ------------------------------------------------------------------------ */
#define SECTOR 512ULL
#define MAX_REQUEST_SECTORS 4096ULL /* 2 MiB: NFC servers fail larger requests */
/* ESXi's NFC server limits the memory of each session, so the bytes of a handle's outstanding
   requests are bounded. The real figure is not documented and varies by release; we assume
   the stricter one issue 9 gives (16 x 2 MiB can exceed it, a default of 8 MiB in flight must
   not). */
#define DEFAULT_NFC_SESSION_BYTES (8ULL << 20)
/* ESXi also caps the NFC memory of all sessions of a host together: 48 MB on 6.x and 7.0,
   96 MB on 8 (issue 24 quotes these figures; not verified here). The stand-in is one host
   for every network handle of the process and takes the stricter figure. */
#define DEFAULT_NFC_HOST_BYTES (48ULL << 20)
/* Assumed, not verified against real VDDK: a request the NFC server cannot allocate for fails
   as "Memory allocation failed. Out of memory" (reports of real failures quote NFC error 5,
   "Failed to allocate the requested N bytes", but not the VixError VDDK makes of it). */
#define NFC_MEMORY_CODE VIX_E_OUT_OF_MEMORY
#define HOLD_TIMEOUT_NS (120LL * 1000000000LL)
#define MAX_IDENTITY_LEN 50
#define MAX_NTH 64
#define LOGBUF 4096
#define TRANSPORT_MODES "file:san:hotadd:nbdssl:nbd"
#define CONN_TAG 0xC
#define HANDLE_TAG 0xD
#define DEFAULT_FAIL_CODE VIX_E_HOST_CONNECTION_LOST
#define CONN_LOST_CODE VIX_E_HOST_CONNECTION_LOST
#define FAIL_CONNECT_CODE VIX_E_CANNOT_CONNECT_TO_HOST
#define FAIL_OPEN_CODE VIX_E_HOST_NETWORK_CONN_REFUSED
#define PLUGIN_NAME "libvddkVimAccess.so"
#define PLUGIN_INIT "VddkVimAccess_StandinInit"
#define MAX_CHUNK_SIZE VIXDISKLIB_MAX_CHUNK_SIZE
#define PERMISSION_CODE VIX_E_HOST_USER_PERMISSIONS
#define LOGIN_CODE VIX_E_AUTHENTICATION_FAIL /* real VDDK: 35 for a refused login */
/* Real AllocateConnectParams is calloc(1, 128) plus a magic at +0x50 (reserved3) and private
   state at +0x58 (reserved2): callers must never write the reserved fields. */
#define PARAMS_MAGIC "VixCPv67"
#define PARAMS_STATE_KEY 0x5ca1ab1e0ddba11ULL
#ifdef STANDIN_VDDK6
#define VARIANT 6
#else
#define VARIANT 8
#endif

/* ---- time and threads ----------------------------------------------------------------- */
static int64_t mono_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static struct timespec ns_to_ts(int64_t ns) {
    struct timespec ts = {.tv_sec = ns / 1000000000LL, .tv_nsec = ns % 1000000000LL};
    return ts;
}

static void sleep_until_ns(int64_t deadline) {
    struct timespec ts = ns_to_ts(deadline);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {
    }
}

static void sleep_ns(int64_t d) {
    if (d > 0) sleep_until_ns(mono_ns() + d);
}

static __thread pid_t t_tid;
static pid_t my_tid(void) {
    if (!t_tid) t_tid = (pid_t)syscall(SYS_gettid);
    return t_tid;
}

/* ---- configuration (read at InitEx) --------------------------------------------------- */
typedef struct {
    char *images;
    char *user;
    char *password;
    char *thumb;
    char *slow_ivd;
    int64_t slow_ns;
    char transport[16];
    uint64_t inline_every;
    int64_t latency_ns;
    uint64_t handle_bw;
    uint64_t global_bw;
    int64_t connect_latency_ns;
    int no_qab, fail_prepare, fail_connect, fail_open, log_reads;
    uint64_t fail_connect_after, fail_connect_first, fail_open_after, fail_open_first;
    VixError fail_connect_code, fail_open_code;
    uint64_t fail_nth[MAX_NTH];
    int n_fail_nth;
    double fail_rate;
    VixError fail_code;
    uint64_t drop_after;
    uint64_t stall_nth;
    int64_t stall_ns;
    uint64_t short_nth;
    int async_threads;
    uint64_t nfc_session_bytes;
    uint64_t nfc_host_bytes;
    char *hold_access;
} config_t;

static config_t g_cfg;

static const char *env_str(const char *name) {
    const char *v = getenv(name);
    return (v && *v) ? v : NULL;
}

static uint64_t env_u64(const char *name, uint64_t def) {
    const char *v = env_str(name);
    if (!v) return def;
    char *end;
    errno = 0;
    unsigned long long x = strtoull(v, &end, 0);
    if (errno || end == v) return def;
    return (uint64_t)x;
}

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void config_free(config_t *c) {
    free(c->images);
    free(c->user);
    free(c->password);
    free(c->thumb);
    free(c->slow_ivd);
    free(c->hold_access);
    memset(c, 0, sizeof(*c));
}

static int valid_transport(const char *t) {
    return !strcmp(t, "file") || !strcmp(t, "san") || !strcmp(t, "hotadd") ||
           !strcmp(t, "nbdssl") || !strcmp(t, "nbd");
}

static void config_load(config_t *c) {
    memset(c, 0, sizeof(*c));
    c->images = dup_or_null(env_str("VDDK_STANDIN_IMAGES"));
    c->user = dup_or_null(env_str("VDDK_STANDIN_USER"));
    c->password = dup_or_null(env_str("VDDK_STANDIN_PASSWORD"));
    c->thumb = dup_or_null(env_str("VDDK_STANDIN_THUMBPRINT"));
    c->slow_ivd = dup_or_null(env_str("VDDK_STANDIN_SLOW_IVD"));
    c->slow_ns = (int64_t)env_u64("VDDK_STANDIN_SLOW_US", 0) * 1000;
    const char *t = env_str("VDDK_STANDIN_TRANSPORT");
    snprintf(c->transport, sizeof(c->transport), "%s", (t && valid_transport(t)) ? t : "nbdssl");
    c->inline_every = env_u64("VDDK_STANDIN_ASYNC_INLINE_EVERY", 0);
    c->latency_ns = (int64_t)env_u64("VDDK_STANDIN_LATENCY_US", 0) * 1000;
    c->handle_bw = env_u64("VDDK_STANDIN_HANDLE_BW", 0);
    c->global_bw = env_u64("VDDK_STANDIN_GLOBAL_BW", 0);
    c->connect_latency_ns = (int64_t)env_u64("VDDK_STANDIN_CONNECT_LATENCY_US", 0) * 1000;
    c->no_qab = env_u64("VDDK_STANDIN_NO_QAB", 0) != 0;
    c->fail_prepare = env_u64("VDDK_STANDIN_FAIL_PREPARE", 0) != 0;
    /* An explicit code alone fails every call; with _FIRST/_AFTER it is the code they use. */
    c->fail_connect_code = env_u64("VDDK_STANDIN_FAIL_CONNECT_CODE", 0);
    c->fail_connect_after = env_u64("VDDK_STANDIN_FAIL_CONNECT_AFTER", 0);
    c->fail_connect_first = env_u64("VDDK_STANDIN_FAIL_CONNECT_FIRST", 0);
    c->fail_connect = env_u64("VDDK_STANDIN_FAIL_CONNECT", 0) != 0 ||
                      (c->fail_connect_code && !c->fail_connect_after && !c->fail_connect_first);
    if (!c->fail_connect_code || c->fail_connect_code == VIX_ASYNC)
        c->fail_connect_code = FAIL_CONNECT_CODE;
    c->fail_open_code = env_u64("VDDK_STANDIN_FAIL_OPEN_CODE", 0);
    c->fail_open_after = env_u64("VDDK_STANDIN_FAIL_OPEN_AFTER", 0);
    c->fail_open_first = env_u64("VDDK_STANDIN_FAIL_OPEN_FIRST", 0);
    c->fail_open = env_u64("VDDK_STANDIN_FAIL_OPEN", 0) != 0 ||
                   (c->fail_open_code && !c->fail_open_after && !c->fail_open_first);
    if (!c->fail_open_code || c->fail_open_code == VIX_ASYNC) c->fail_open_code = FAIL_OPEN_CODE;
    c->log_reads = env_u64("VDDK_STANDIN_LOG_READS", 1) != 0;
    const char *nth = env_str("VDDK_STANDIN_FAIL_READ_NTH");
    while (nth && *nth && c->n_fail_nth < MAX_NTH) {
        char *end;
        unsigned long long x = strtoull(nth, &end, 10);
        if (end == nth) break;
        if (x) c->fail_nth[c->n_fail_nth++] = x;
        nth = end;
        while (*nth == ',' || *nth == ' ') nth++;
    }
    const char *rate = env_str("VDDK_STANDIN_FAIL_READ_RATE");
    c->fail_rate = rate ? strtod(rate, NULL) : 0.0;
    c->fail_code = env_u64("VDDK_STANDIN_FAIL_CODE", DEFAULT_FAIL_CODE);
    if (c->fail_code == VIX_OK || c->fail_code == VIX_ASYNC) c->fail_code = DEFAULT_FAIL_CODE;
    c->drop_after = env_u64("VDDK_STANDIN_DROP_AFTER", 0);
    c->stall_nth = env_u64("VDDK_STANDIN_STALL_NTH", 0);
    c->stall_ns = (int64_t)env_u64("VDDK_STANDIN_STALL_MS", 0) * 1000000;
    c->short_nth = env_u64("VDDK_STANDIN_SHORT_READ_NTH", 0);
    c->async_threads = (int)env_u64("VDDK_STANDIN_ASYNC_THREADS", 4);
    if (c->async_threads < 1) c->async_threads = 1;
    if (c->async_threads > 64) c->async_threads = 64;
    c->nfc_session_bytes = env_u64("VDDK_STANDIN_NFC_SESSION_BYTES", 0);
    if (!c->nfc_session_bytes) c->nfc_session_bytes = DEFAULT_NFC_SESSION_BYTES;
    c->nfc_host_bytes = env_u64("VDDK_STANDIN_NFC_HOST_BYTES", 0);
    if (!c->nfc_host_bytes) c->nfc_host_bytes = DEFAULT_NFC_HOST_BYTES;
    c->hold_access = dup_or_null(env_str("VDDK_STANDIN_HOLD_ACCESS"));
}

/* ---- global state --------------------------------------------------------------------- */
static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER; /* init state + registries */
static int g_inited;
static _Atomic int g_logfd = -1;
static VixDiskLibGenericLogFunc *_Atomic g_log;
static VixDiskLibGenericLogFunc *_Atomic g_warn;
static _Atomic uint64_t g_prepares, g_endaccess, g_reads, g_read_bytes, g_read_errors,
    g_violations, g_read_seq, g_async_seq, g_async_reads;
static uint64_t g_next_conn_id, g_next_handle_id;
static pthread_mutex_t g_bw_mu = PTHREAD_MUTEX_INITIALIZER;
static int64_t g_global_next_free;
static uint64_t g_nfc_host_held; /* bytes all network sessions hold on the host, under g_bw_mu */
static pthread_mutex_t g_rand_mu = PTHREAD_MUTEX_INITIALIZER;
static unsigned g_rand_state;
static _Atomic uint64_t g_connects, g_opens; /* injection counters, from InitEx */
static _Atomic uint64_t g_holds;              /* VDDK_STANDIN_HOLD_ACCESS, from InitEx */
static void *g_plugin;        /* dlopen handle of libvddkVimAccess.so */
static _Atomic int g_plugin_ok; /* the plugin loaded: vSphere access works */

/* ---- messages through the InitEx callbacks -------------------------------------------- */
static void cb_call(VixDiskLibGenericLogFunc *f, const char *fmt, ...)
    __attribute__((format(printf, 2, 3)));
static void cb_call(VixDiskLibGenericLogFunc *f, const char *fmt, ...) {
    if (!f) return;
    va_list ap;
    va_start(ap, fmt);
    f(fmt, ap);
    va_end(ap);
}
#define LOG_MSG(...) cb_call(atomic_load(&g_log), __VA_ARGS__)
#define WARN_MSG(...) cb_call(atomic_load(&g_warn), __VA_ARGS__)

/* ---- call log ------------------------------------------------------------------------- */
typedef struct {
    char b[LOGBUF];
    size_t n;
} logline_t;

static void ll_raw(logline_t *l, const char *s, size_t len) {
    size_t room = sizeof(l->b) - 2 - l->n; /* keep space for '\n' */
    if (len > room) len = room;
    memcpy(l->b + l->n, s, len);
    l->n += len;
}

static void ll_add(logline_t *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void ll_add(logline_t *l, const char *fmt, ...) {
    char tmp[LOGBUF];
    va_list ap;
    va_start(ap, fmt);
    int k = vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    if (k < 0) return;
    ll_raw(l, " ", 1);
    ll_raw(l, tmp, (size_t)k < sizeof(tmp) ? (size_t)k : sizeof(tmp) - 1);
}

static void ll_begin(logline_t *l, const char *name) {
    l->n = 0;
    char tmp[96];
    int k = snprintf(tmp, sizeof(tmp), "%lld tid=%d", (long long)(mono_ns() / 1000), (int)my_tid());
    ll_raw(l, tmp, (size_t)k);
    ll_add(l, "%s", name);
}

/* key=value; values that are empty or hold blanks, quotes, '=' or control bytes are written
   double-quoted with C escapes; NULL is written as (null). */
static void ll_str(logline_t *l, const char *key, const char *val) {
    char tmp[LOGBUF];
    size_t n = 0;
    if (!val) {
        ll_add(l, "%s=(null)", key);
        return;
    }
    int quote = !*val;
    for (const unsigned char *p = (const unsigned char *)val; *p; p++)
        if (*p <= ' ' || *p == '"' || *p == '\\' || *p == '=' || *p >= 0x7f) quote = 1;
    if (!quote) {
        ll_add(l, "%s=%s", key, val);
        return;
    }
    tmp[n++] = '"';
    for (const unsigned char *p = (const unsigned char *)val; *p && n < sizeof(tmp) - 8; p++) {
        if (*p == '"' || *p == '\\') {
            tmp[n++] = '\\';
            tmp[n++] = (char)*p;
        } else if (*p == '\n') {
            tmp[n++] = '\\';
            tmp[n++] = 'n';
        } else if (*p == '\t') {
            tmp[n++] = '\\';
            tmp[n++] = 't';
        } else if (*p < ' ' || *p >= 0x7f) {
            n += (size_t)snprintf(tmp + n, 5, "\\x%02x", *p);
        } else {
            tmp[n++] = (char)*p;
        }
    }
    tmp[n++] = '"';
    tmp[n] = 0;
    ll_add(l, "%s=%s", key, tmp);
}

static void ll_emit(logline_t *l) {
    l->b[l->n++] = '\n';
    int fd = atomic_load(&g_logfd);
    if (fd >= 0) {
        ssize_t r = write(fd, l->b, l->n);
        (void)r;
        return;
    }
    /* Before InitEx (or after Exit) violations still reach the log named in the environment. */
    const char *path = getenv("VDDK_STANDIN_LOG");
    if (!path || !*path) return;
    fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd < 0) return;
    ssize_t r = write(fd, l->b, l->n);
    (void)r;
    close(fd);
}

static int logging(void) { return atomic_load(&g_logfd) >= 0; }

/* One VIOLATION line: "VIOLATION <kind> key=value ..." */
static void violation(const char *kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void violation(const char *kind, const char *fmt, ...) {
    atomic_fetch_add(&g_violations, 1);
    logline_t l;
    char tmp[LOGBUF];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    ll_begin(&l, "VIOLATION");
    ll_add(&l, "%s", kind);
    if (*tmp) ll_add(&l, "%s", tmp);
    ll_emit(&l);
    WARN_MSG("VixDiskLib stand-in: VIOLATION %s %s\n", kind, tmp);
}

/* ---- connections and handles ---------------------------------------------------------- */
typedef struct conn {
    struct conn *next;
    uint64_t id;
    _Atomic int refs;
    int server;
    char *server_name, *ivd_id, *ds, *ssid, *image, *transport_req;
    uint32_t logical_sector, physical_sector; /* what GetInfo reports (VDDK 7+ fields) */
    _Atomic uint64_t ok_reads;
    _Atomic int lost;
    _Atomic int nhandles;
} conn_t;

typedef struct handle {
    struct handle *next;
    uint64_t id;
    _Atomic int refs;
    conn_t *conn;
    int fd;
    uint64_t capacity;
    char *path;
    const char *transport;
    pid_t open_tid;
    _Atomic int inflight;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    int outstanding;   /* queued async requests not yet completed (callback returned) */
    int64_t next_free; /* per-handle bandwidth reservation, under mu */
    uint64_t nfc_bytes; /* bytes of this session's requests the NFC server holds, under mu */
    vmdk_disk_t *vmdk;  /* local-file mode on a VMDK: its chain (NULL: a raw file) */
    char **locks;       /* the lock files this handle made (NULL entries: none made) */
    int nlocks;
} handle_t;

static conn_t *g_conns;
static handle_t *g_handles;

static void *conn_token(conn_t *c) { return (void *)(uintptr_t)((c->id << 4) | CONN_TAG); }
static void *handle_token(handle_t *h) { return (void *)(uintptr_t)((h->id << 4) | HANDLE_TAG); }

static void conn_put(conn_t *c) {
    if (atomic_fetch_sub(&c->refs, 1) != 1) return;
    free(c->server_name);
    free(c->ivd_id);
    free(c->ds);
    free(c->ssid);
    free(c->image);
    free(c->transport_req);
    free(c);
}

static void unlock_links(char **locks, int n);

static void handle_put(handle_t *h) {
    if (atomic_fetch_sub(&h->refs, 1) != 1) return;
    unlock_links(h->locks, h->nlocks);
    if (h->fd >= 0) close(h->fd);
    vmdk_close(h->vmdk);
    pthread_mutex_destroy(&h->mu);
    pthread_cond_destroy(&h->cv);
    free(h->path);
    conn_put(h->conn);
    free(h);
}

static conn_t *conn_get(const void *token, const char *func) {
    uintptr_t v = (uintptr_t)token;
    conn_t *found = NULL;
    pthread_mutex_lock(&g_mu);
    if ((v & 0xF) == CONN_TAG)
        for (conn_t *c = g_conns; c; c = c->next)
            if (c->id == (v >> 4)) {
                found = c;
                atomic_fetch_add(&c->refs, 1);
                break;
            }
    pthread_mutex_unlock(&g_mu);
    if (!found) violation("bad-connection", "func=%s conn=%#lx", func, (unsigned long)v);
    return found;
}

static handle_t *handle_get(const void *token, const char *func) {
    uintptr_t v = (uintptr_t)token;
    handle_t *found = NULL;
    pthread_mutex_lock(&g_mu);
    if ((v & 0xF) == HANDLE_TAG)
        for (handle_t *h = g_handles; h; h = h->next)
            if (h->id == (v >> 4)) {
                found = h;
                atomic_fetch_add(&h->refs, 1);
                break;
            }
    pthread_mutex_unlock(&g_mu);
    if (!found) violation("bad-handle", "func=%s handle=%#lx", func, (unsigned long)v);
    return found;
}

/* Removes from the registry (caller holds g_mu); returns 1 if it was there. */
static int handle_unlink_locked(handle_t *h) {
    for (handle_t **pp = &g_handles; *pp; pp = &(*pp)->next)
        if (*pp == h) {
            *pp = h->next;
            return 1;
        }
    return 0;
}

static int conn_unlink_locked(conn_t *c) {
    for (conn_t **pp = &g_conns; *pp; pp = &(*pp)->next)
        if (*pp == c) {
            *pp = c->next;
            return 1;
        }
    return 0;
}

/* Calls that talk to vSphere need the plugin; without it they fail like real VDDK's. */
static VixError plugin_err(void) {
    return atomic_load(&g_plugin_ok) ? VIX_OK : VIX_E_DISK_SUBSYSTEM_INIT_FAIL;
}

/* Whether call number `nth` (1-based) of a kind gets an injected failure. */
static int inject(int always, uint64_t first, uint64_t after, uint64_t nth) {
    return always || (first && nth <= first) || (after && nth > after);
}

static int check_inited(const char *func) {
    pthread_mutex_lock(&g_mu);
    int ok = g_inited;
    pthread_mutex_unlock(&g_mu);
    if (!ok) violation("not-initialized", "func=%s", func);
    return ok;
}

/* ---- read requests -------------------------------------------------------------------- */
enum { FAULT_NONE, FAULT_FAIL, FAULT_SHORT, FAULT_NFC_MEMORY };

static int is_network(const char *t) { return !strcmp(t, "nbd") || !strcmp(t, "nbdssl"); }

typedef struct {
    handle_t *h;
    uint64_t start, n;
    uint8_t *buf;
    VixDiskLibCompletionCB cb;
    void *cb_data;
    uint64_t seq;
    int64_t due;
    int fault;
    uint64_t nfc_bytes; /* held in the session's NFC memory until completion */
} req_t;

static int64_t transfer_ns(uint64_t bytes, uint64_t bw) {
    return (int64_t)((bytes * 1000000000ULL) / bw);
}

/* Bandwidth as "next free time" reservations: returns when this request's bytes have gone
   through the per-handle and the process-wide pipe. */
static int64_t reserve_transfer(handle_t *h, uint64_t bytes, int64_t now) {
    int64_t end = now;
    if (g_cfg.handle_bw) {
        pthread_mutex_lock(&h->mu);
        int64_t s = h->next_free > now ? h->next_free : now;
        h->next_free = s + transfer_ns(bytes, g_cfg.handle_bw);
        if (h->next_free > end) end = h->next_free;
        pthread_mutex_unlock(&h->mu);
    }
    if (g_cfg.global_bw) {
        pthread_mutex_lock(&g_bw_mu);
        int64_t s = g_global_next_free > now ? g_global_next_free : now;
        g_global_next_free = s + transfer_ns(bytes, g_cfg.global_bw);
        if (g_global_next_free > end) end = g_global_next_free;
        pthread_mutex_unlock(&g_bw_mu);
    }
    return end;
}

static void plan_request(req_t *r) {
    r->seq = atomic_fetch_add(&g_read_seq, 1) + 1;
    atomic_fetch_add(&g_reads, 1);
    r->fault = FAULT_NONE;
    for (int i = 0; i < g_cfg.n_fail_nth; i++)
        if (g_cfg.fail_nth[i] == r->seq) r->fault = FAULT_FAIL;
    if (r->fault == FAULT_NONE && g_cfg.fail_rate > 0) {
        pthread_mutex_lock(&g_rand_mu);
        double x = rand_r(&g_rand_state) / ((double)RAND_MAX + 1.0);
        pthread_mutex_unlock(&g_rand_mu);
        if (x < g_cfg.fail_rate) r->fault = FAULT_FAIL;
    }
    if (r->fault == FAULT_NONE && g_cfg.short_nth == r->seq) r->fault = FAULT_SHORT;
    int64_t now = mono_ns();
    r->due = now;
    /* Latency and bandwidth model the way to the ESXi host (its NFC server, or the SAN and
       HotAdd paths it arranges). A local-file connection reads a file this host can read
       itself: none of it applies. */
    if (r->h->conn->server)
        r->due = reserve_transfer(r->h, r->n * SECTOR, now) + g_cfg.latency_ns;
    /* One slow disk among fast ones (a busy datastore): extra latency for one IVD's reads. */
    if (g_cfg.slow_ivd && r->h->conn->ivd_id && !strcmp(g_cfg.slow_ivd, r->h->conn->ivd_id))
        r->due += g_cfg.slow_ns;
    if (g_cfg.stall_nth && g_cfg.stall_nth == r->seq) {
        WARN_MSG("VixDiskLib stand-in: injected stall of %lld ms on read #%llu.\n",
                 (long long)(g_cfg.stall_ns / 1000000), (unsigned long long)r->seq);
        r->due += g_cfg.stall_ns;
    }
}

/* On a network transport a request takes its bytes of the NFC session's memory from when it
   reaches the server until it completes. One that would take the session past its limit is a
   VIOLATION and fails with NFC_MEMORY_CODE. Returns the bytes to give back at completion. */
static uint64_t nfc_reserve(req_t *r, const char *func) {
    handle_t *h = r->h;
    if (!is_network(h->transport)) return 0;
    uint64_t bytes = r->n * SECTOR;
    pthread_mutex_lock(&h->mu);
    uint64_t held = h->nfc_bytes;
    int over = held + bytes > g_cfg.nfc_session_bytes;
    if (!over) h->nfc_bytes += bytes;
    pthread_mutex_unlock(&h->mu);
    if (over) {
        violation("nfc-session-memory",
                  "func=%s handle=%llu start=%llu n=%llu held=%llu limit=%llu", func,
                  (unsigned long long)h->id, (unsigned long long)r->start,
                  (unsigned long long)r->n, (unsigned long long)held,
                  (unsigned long long)g_cfg.nfc_session_bytes);
        r->fault = FAULT_NFC_MEMORY;
        return 0;
    }
    /* The host's cap over all its sessions: assumed to fail the same way as a session's. */
    pthread_mutex_lock(&g_bw_mu);
    uint64_t host = g_nfc_host_held;
    over = host + bytes > g_cfg.nfc_host_bytes;
    if (!over) g_nfc_host_held += bytes;
    pthread_mutex_unlock(&g_bw_mu);
    if (!over) return bytes;
    pthread_mutex_lock(&h->mu);
    h->nfc_bytes -= bytes;
    pthread_mutex_unlock(&h->mu);
    violation("nfc-host-memory", "func=%s handle=%llu start=%llu n=%llu held=%llu limit=%llu",
              func, (unsigned long long)h->id, (unsigned long long)r->start,
              (unsigned long long)r->n, (unsigned long long)host,
              (unsigned long long)g_cfg.nfc_host_bytes);
    r->fault = FAULT_NFC_MEMORY;
    return 0;
}

static void nfc_release(handle_t *h, uint64_t bytes) {
    if (!bytes) return;
    pthread_mutex_lock(&h->mu);
    h->nfc_bytes -= bytes;
    pthread_mutex_unlock(&h->mu);
    pthread_mutex_lock(&g_bw_mu);
    g_nfc_host_held -= bytes;
    pthread_mutex_unlock(&g_bw_mu);
}

static int pread_full(int fd, uint8_t *buf, size_t len, off_t off) {
    while (len) {
        ssize_t k = pread(fd, buf, len, off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        buf += k;
        len -= (size_t)k;
        off += k;
    }
    return 0;
}

/* ---- local-file mode on VMDK files (vmdk.c) ------------------------------------------ */
/* `len` bytes of the disk from byte `off` (both whole sectors except for an injected short
   read): from the VMDK chain, or from the raw file. */
static VixError read_image(handle_t *h, uint8_t *buf, uint64_t off, size_t len) {
    if (!h->vmdk) return pread_full(h->fd, buf, len, (off_t)off) < 0 ? VIX_E_FILE_ERROR : VIX_OK;
    uint64_t first = off / SECTOR, last = (off + len + SECTOR - 1) / SECTOR;
    if (off % SECTOR == 0 && len % SECTOR == 0) return vmdk_read(h->vmdk, first, last - first, buf);
    uint8_t *tmp = malloc((last - first) * SECTOR);
    if (!tmp) return VIX_E_OUT_OF_MEMORY;
    VixError err = vmdk_read(h->vmdk, first, last - first, tmp);
    if (err == VIX_OK) memcpy(buf, tmp + off % SECTOR, len);
    free(tmp);
    return err;
}

/* ---- lock files (real VDDK's local-file mode) ------------------------------------------ */
/* Measured with VDDK 7.0.2: opening a VMDK, read-only or not, makes "<link>.lck/" (mode 0777)
   beside every link of the chain (the descriptor, not its extent files), holding one member
   "M<5 digits>.lck" of 512 bytes that names the process ("<id> <pid>-<start>(<name>) 1 S ...",
   S: shared). Close removes member and directory; a process that dies leaves them, and the
   next opener removes a member whose process is gone. Where the directory cannot be made (a
   read-only filesystem) it warns with the two lines below (through the warning callback,
   twice per link) and takes an implicit shared lock, writing nothing. The stand-in does the
   same, so that a test of "writes nothing" means something. */
static void reap_stale_locks(const char *dir) {
    DIR *d = opendir(dir);
    if (!d) return;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        size_t n = strlen(e->d_name);
        if (e->d_name[0] != 'M' || n < 5 || strcmp(e->d_name + n - 4, ".lck") != 0) continue;
        char member[PATH_MAX];
        if (snprintf(member, sizeof(member), "%s/%s", dir, e->d_name) >= (int)sizeof(member))
            continue;
        char text[512] = "";
        int fd = open(member, O_RDONLY | O_CLOEXEC);
        if (fd < 0) continue;
        ssize_t k = read(fd, text, sizeof(text) - 1);
        close(fd);
        if (k <= 0) continue;
        text[k] = 0;
        const char *sp = strchr(text, ' ');
        long pid = sp ? strtol(sp + 1, NULL, 10) : 0;
        if (pid > 0 && kill((pid_t)pid, 0) != 0 && errno == ESRCH) unlink(member);
    }
    closedir(d);
}

static char *lock_link(const char *path) {
    char dir[PATH_MAX - 16], member[PATH_MAX];
    if (snprintf(dir, sizeof(dir), "%s.lck", path) >= (int)sizeof(dir)) return NULL;
    int made = mkdir(dir, 0777) == 0;
    if (!made && errno != EEXIST) {
        /* VDDK 7.0.2 sends both through the warning callback, twice per link (measured). */
        int e = errno;
        for (int i = 0; i < 2; i++) {
            WARN_MSG("FILE: FileLockCreateEntryDirectory creation failure on '%s': %s\n", dir,
                     strerror(e));
            WARN_MSG("FILE: FileLockIntrinsicPortable implicit S lock succeeded on '%s'.\n",
                     path);
        }
        return NULL;
    }
    if (made) chmod(dir, 0777); /* as VDDK leaves it, whatever the umask */
    reap_stale_locks(dir);
    unsigned seed = (unsigned)getpid() ^ (unsigned)mono_ns();
    for (int tries = 0; tries < 100; tries++) {
        snprintf(member, sizeof(member), "%s/M%05u.lck", dir, (unsigned)rand_r(&seed) % 100000);
        int fd = open(member, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0644);
        if (fd < 0 && errno == EEXIST) continue;
        if (fd < 0) break;
        char text[512];
        memset(text, 0, sizeof(text));
        snprintf(text, sizeof(text), "standin %d-0(vddk-standin) 1 S 0 lc=0", (int)getpid());
        ssize_t k = write(fd, text, sizeof(text));
        close(fd);
        if (k == (ssize_t)sizeof(text)) return strdup(member);
        unlink(member);
        break;
    }
    rmdir(dir); /* only if empty: another opener's lock stays */
    return NULL;
}

static void unlock_links(char **locks, int n) {
    if (!locks) return;
    for (int i = 0; i < n; i++) {
        if (!locks[i]) continue;
        unlink(locks[i]);
        char *slash = strrchr(locks[i], '/');
        if (slash) {
            *slash = 0;
            rmdir(locks[i]); /* fails, as it should, while another opener holds a lock */
        }
        free(locks[i]);
    }
    free(locks);
}

/* Opens the VMDK chain of a local-file handle when `fd` holds a VMDK or its name ends in
   ".vmdk" (else leaves *out NULL: the file is served raw). Real VDDK reads only VMDKs (16063
   for anything else); raw files are the stand-in's own convenience, so that a damaged VMDK is
   never served raw, the name decides as much as the contents. */
static VixError open_vmdk(int fd, const char *path, uint32_t flags, vmdk_disk_t **out) {
    *out = NULL;
    size_t n = strlen(path);
    int named = n >= 5 && !strcasecmp(path + n - 5, ".vmdk");
    if (!named && !vmdk_probe(fd)) return VIX_OK;
    char why[512] = "";
    VixError err = vmdk_open(path, (flags & VIXDISKLIB_FLAG_OPEN_SINGLE_LINK) != 0, out, why,
                             sizeof(why));
    if (err) LOG_MSG("VixDiskLib: cannot open %s: %s (error %llu).\n", path, why,
                     (unsigned long long)err);
    return err;
}

/* Does the I/O (or the injected fault) of a planned request. Never returns VIX_OK unless the
   whole buffer holds the image's bytes. */
static VixError execute_request(req_t *r) {
    handle_t *h = r->h;
    conn_t *c = h->conn;
    size_t bytes = (size_t)(r->n * SECTOR);
    off_t off = (off_t)(r->start * SECTOR);
    VixError err = VIX_OK;
    if (atomic_load(&c->lost)) {
        err = CONN_LOST_CODE;
        WARN_MSG("VixDiskLib stand-in: connection %llu is lost; read #%llu fails with %llu.\n",
                 (unsigned long long)c->id, (unsigned long long)r->seq,
                 (unsigned long long)err);
    } else if (r->fault == FAULT_NFC_MEMORY) {
        memset(r->buf, 0xA5, bytes);
        err = NFC_MEMORY_CODE;
        WARN_MSG("VixDiskLib stand-in: read #%llu (handle %llu) exceeds the NFC memory of its "
                 "session (%llu bytes) or of the host (%llu bytes): error %llu.\n",
                 (unsigned long long)r->seq, (unsigned long long)h->id,
                 (unsigned long long)g_cfg.nfc_session_bytes,
                 (unsigned long long)g_cfg.nfc_host_bytes, (unsigned long long)err);
    } else if (r->fault == FAULT_FAIL) {
        memset(r->buf, 0xA5, bytes); /* poison: a caller that uses the data anyway notices */
        err = g_cfg.fail_code;
        WARN_MSG("VixDiskLib stand-in: injected failure of read #%llu (handle %llu): error %llu.\n",
                 (unsigned long long)r->seq, (unsigned long long)h->id,
                 (unsigned long long)err);
    } else if (r->fault == FAULT_SHORT) {
        size_t half = bytes / 2;
        if (half && read_image(h, r->buf, (uint64_t)off, half) != VIX_OK) memset(r->buf, 0xA5, half);
        err = g_cfg.fail_code;
        WARN_MSG("VixDiskLib stand-in: injected short read #%llu (handle %llu, %zu of %zu bytes): "
                 "error %llu.\n",
                 (unsigned long long)r->seq, (unsigned long long)h->id, half, bytes,
                 (unsigned long long)err);
    } else if (bytes && (err = read_image(h, r->buf, (uint64_t)off, bytes)) != VIX_OK) {
        /* err says why */
    } else {
        atomic_fetch_add(&g_read_bytes, bytes);
        uint64_t ok = atomic_fetch_add(&c->ok_reads, 1) + 1;
        if (g_cfg.drop_after && ok == g_cfg.drop_after) {
            atomic_store(&c->lost, 1);
            WARN_MSG("VixDiskLib stand-in: injected loss of connection %llu after %llu reads.\n",
                     (unsigned long long)c->id, (unsigned long long)ok);
        }
    }
    if (err != VIX_OK) atomic_fetch_add(&g_read_errors, 1);
    return err;
}

/* Argument checks shared by Read and ReadAsync. */
static VixError check_read_args(handle_t *h, uint64_t start, uint64_t n, const void *buf,
                                const char *func) {
    if (!buf) return VIX_E_INVALID_ARG;
    /* The bound is the NFC server's; a local file has none (real VDDK 7.0.2 reads 4097
       sectors in file mode). SAN and HotAdd keep it: unknown there, the stricter choice. */
    if (n > MAX_REQUEST_SECTORS && strcmp(h->transport, "file") != 0) {
        violation("request-too-large", "func=%s handle=%llu start=%llu n=%llu max=%llu", func,
                  (unsigned long long)h->id, (unsigned long long)start, (unsigned long long)n,
                  (unsigned long long)MAX_REQUEST_SECTORS);
        return VIX_E_INVALID_ARG;
    }
    if (start > h->capacity || n > h->capacity - start) return VIX_E_DISK_OUTOFRANGE;
    return VIX_OK;
}

static void enter_request(handle_t *h, const char *func) {
    int k = atomic_fetch_add(&h->inflight, 1) + 1;
    if (k > 1)
        violation("concurrent-read", "handle=%llu inflight=%d func=%s",
                  (unsigned long long)h->id, k, func);
}

static void leave_request(handle_t *h) { atomic_fetch_sub(&h->inflight, 1); }

static void log_read(const char *name, handle_t *h, uint64_t start, uint64_t n, uint64_t seq,
                     VixError err, const char *extra) {
    if (!g_cfg.log_reads || !logging()) return;
    logline_t l;
    ll_begin(&l, name);
    ll_add(&l, "handle=%llu start=%llu n=%llu seq=%llu err=%llu", (unsigned long long)h->id,
           (unsigned long long)start, (unsigned long long)n, (unsigned long long)seq,
           (unsigned long long)err);
    if (extra) ll_add(&l, "%s", extra);
    ll_emit(&l);
}

/* ---- async queue: a min-heap by due time served by a small pool of library threads ----- */
static pthread_mutex_t q_mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t q_cv;      /* CLOCK_MONOTONIC; work or shutdown */
static pthread_cond_t q_idle_cv; /* queue drained */
static pthread_once_t q_once = PTHREAD_ONCE_INIT;
static req_t **q_heap;
static size_t q_n, q_cap;
static int q_busy, q_shutdown, q_nworkers;
static pthread_t q_workers[64];

static void q_init_once(void) {
    pthread_condattr_t a;
    pthread_condattr_init(&a);
    pthread_condattr_setclock(&a, CLOCK_MONOTONIC);
    pthread_cond_init(&q_cv, &a);
    pthread_condattr_destroy(&a);
    pthread_cond_init(&q_idle_cv, NULL);
}

static int req_before(const req_t *a, const req_t *b) {
    return a->due < b->due || (a->due == b->due && a->seq < b->seq);
}

static int q_push_locked(req_t *r) {
    if (q_n == q_cap) {
        size_t cap = q_cap ? q_cap * 2 : 64;
        req_t **nh = realloc(q_heap, cap * sizeof(*nh));
        if (!nh) return -1;
        q_heap = nh;
        q_cap = cap;
    }
    size_t i = q_n++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (!req_before(r, q_heap[p])) break;
        q_heap[i] = q_heap[p];
        i = p;
    }
    q_heap[i] = r;
    return 0;
}

static req_t *q_pop_locked(void) {
    req_t *top = q_heap[0];
    req_t *last = q_heap[--q_n];
    size_t i = 0;
    for (;;) {
        size_t c = 2 * i + 1;
        if (c >= q_n) break;
        if (c + 1 < q_n && req_before(q_heap[c + 1], q_heap[c])) c++;
        if (!req_before(q_heap[c], last)) break;
        q_heap[i] = q_heap[c];
        i = c;
    }
    if (q_n) q_heap[i] = last;
    return top;
}

static void complete_async(req_t *r, VixError err, int is_inline) {
    handle_t *h = r->h;
    /* Before the callback: once it has run, the caller may start the next request. */
    nfc_release(h, r->nfc_bytes);
    r->nfc_bytes = 0;
    log_read("ReadAsyncDone", h, r->start, r->n, r->seq, err,
             is_inline ? "inline=1" : "inline=0");
    r->cb(r->cb_data, err);
}

static void *q_worker(void *arg) {
    (void)arg;
    pthread_mutex_lock(&q_mu);
    for (;;) {
        if (q_n == 0) {
            if (q_shutdown) break;
            pthread_cond_wait(&q_cv, &q_mu);
            continue;
        }
        int64_t now = mono_ns();
        if (q_heap[0]->due > now) {
            struct timespec ts = ns_to_ts(q_heap[0]->due);
            pthread_cond_timedwait(&q_cv, &q_mu, &ts);
            continue;
        }
        req_t *r = q_pop_locked();
        q_busy++;
        pthread_mutex_unlock(&q_mu);

        handle_t *h = r->h;
        VixError err = execute_request(r);
        complete_async(r, err, 0);
        pthread_mutex_lock(&h->mu);
        if (--h->outstanding == 0) pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        handle_put(h);
        free(r);

        pthread_mutex_lock(&q_mu);
        q_busy--;
        if (q_n == 0 && q_busy == 0) pthread_cond_broadcast(&q_idle_cv);
    }
    pthread_mutex_unlock(&q_mu);
    return NULL;
}

static int q_submit(req_t *r) {
    pthread_once(&q_once, q_init_once);
    pthread_mutex_lock(&q_mu);
    if (q_nworkers == 0) {
        q_shutdown = 0;
        for (int i = 0; i < g_cfg.async_threads; i++) {
            if (pthread_create(&q_workers[i], NULL, q_worker, NULL) != 0) break;
            q_nworkers++;
        }
    }
    int rc = (q_nworkers > 0) ? q_push_locked(r) : -1;
    if (rc == 0) pthread_cond_broadcast(&q_cv);
    pthread_mutex_unlock(&q_mu);
    return rc;
}

static void q_drain_and_stop(void) {
    pthread_once(&q_once, q_init_once);
    pthread_mutex_lock(&q_mu);
    while (q_n > 0 || q_busy > 0) pthread_cond_wait(&q_idle_cv, &q_mu);
    q_shutdown = 1;
    pthread_cond_broadcast(&q_cv);
    int n = q_nworkers;
    pthread_mutex_unlock(&q_mu);
    for (int i = 0; i < n; i++) pthread_join(q_workers[i], NULL);
    pthread_mutex_lock(&q_mu);
    q_nworkers = 0;
    q_shutdown = 0;
    free(q_heap);
    q_heap = NULL;
    q_n = q_cap = 0;
    pthread_mutex_unlock(&q_mu);
}

/* ---- error texts ---------------------------------------------------------------------- */
static const struct {
    unsigned code;
    const char *text;
} k_errors[] = {
    {VIX_OK, "The operation was successful"},
    {VIX_E_FAIL, "Unknown error"},
    {VIX_E_OUT_OF_MEMORY, "Memory allocation failed. Out of memory."},
    {VIX_E_INVALID_ARG, "One of the parameters was invalid"},
    {VIX_E_FILE_NOT_FOUND, "A file was not found"},
    {VIX_E_OBJECT_IS_BUSY, "This object is being used"},
    {VIX_E_NOT_SUPPORTED, "The operation is not supported"},
    {VIX_E_FILE_ERROR, "A file access error occurred on the host or guest operating system"},
    {VIX_E_CANCELLED, "The operation was canceled"},
    {VIX_E_FILE_READ_ONLY, "The file is write-protected"},
    {VIX_E_FILE_ACCESS_ERROR, "You do not have access rights to this file"},
    {VIX_E_HOST_NOT_CONNECTED, "The host is not connected"},
    {VIX_E_AUTHENTICATION_FAIL, "Authentication for encrypted virtual machine failed"},
    {VIX_E_HOST_CONNECTION_LOST, "The connection to the host was lost"},
    {VIX_E_INVALID_HANDLE, "The handle is not a valid VIX object"},
    {VIX_E_HOST_USER_PERMISSIONS, "Insufficient permissions in the host operating system"},
    {VIX_E_GUEST_USER_PERMISSIONS, "Insufficient permissions in the guest operating system"},
    {VIX_E_HOST_FILE_ERROR_EOF, "Unexpected end of file"},
    {VIX_E_HOST_SERVER_NOT_FOUND, "The specified server could not be contacted"},
    {VIX_E_HOST_NETWORK_CONN_REFUSED, "The server refused connection"},
    {VIX_E_HOST_TCP_SOCKET_ERROR, "A TCP socket error occurred"},
    {VIX_E_HOST_TCP_CONN_LOST, "The TCP connection was lost"},
    {VIX_E_DISK_INVAL, "One of the parameters supplied is invalid"},
    {VIX_E_DISK_NOIO, "The disk could not be read"},
    {VIX_E_DISK_OUTOFRANGE,
     "You have requested access to an area of the virtual disk that is out of bounds"},
    {VIX_E_DISK_SUBSYSTEM_INIT_FAIL, "One or more required subsystems failed to initialize"},
    {VIX_E_DISK_INVALID_CONNECTION, "Invalid connection handle"},
    {VIX_E_CANNOT_CONNECT_TO_HOST, "Cannot connect to the host"},
    {24009 /* VIX_E_MNTAPI_UMOUNT */, "The umount command failed"},
    {24010 /* VIX_E_MNTAPI_NO_MOUNTABLE_PARTITONS */,
     "The virtual disk does not have any partitions that the host system knows how to mount"},
    /* sic: VDDK 7.0.2's text for VIX_ASYNC */
    {VIX_ASYNC, "The registry value type specified did not match the existing registry value type"},
    {VIX_E_ASYNC_MIXEDMODE_UNSUPPORTED, "Mixed synchronous and asynchronous I/O is not supported"},
    /* VixMntapi's codes, as the real libvixDiskLib 7.0.2 words them (its GetErrorText). */
    {24001, "The mountpoint is already in use"},
    {24009, "The umount command failed"},
    {24010, "The virtual disk does not have any partitions that the host system knows how to mount"},
    {24016, "Cannot create directory '/var/run/vmware/fuse'"},
    {24019, "The VMware fuse daemon failed to start"},
};

static const char *error_text(VixError err) {
    unsigned code = (unsigned)VIX_ERROR_CODE(err);
    for (size_t i = 0; i < sizeof(k_errors) / sizeof(k_errors[0]); i++)
        if (k_errors[i].code == code) return k_errors[i].text;
    return vmdk_error_text(code); /* the VMDK errors */
}

/* ---- helpers for ConnectEx / PrepareForAccess ----------------------------------------- */
static const char *nz(const char *s) { return s ? s : ""; }

/* Thumbprint first (the TLS handshake), then the login. */
static VixError check_server_auth(const VixDiskLibConnectParams *p) {
    if (g_cfg.thumb && (!p->thumbPrint || strcasecmp(p->thumbPrint, g_cfg.thumb) != 0)) {
        LOG_MSG("SSL: Certificate thumbprint mismatch for host %s: expected %s, got %s.\n",
                nz(p->serverName), g_cfg.thumb, p->thumbPrint ? p->thumbPrint : "(none)");
        return VIX_E_FAIL; /* real VDDK reports a thumbprint mismatch as the generic error */
    }
    if (p->credType != VIXDISKLIB_CRED_UID) {
        if (p->credType == VIXDISKLIB_CRED_SESSIONID || p->credType == VIXDISKLIB_CRED_TICKETID)
            return VIX_E_NOT_SUPPORTED;
        return VIX_E_INVALID_ARG;
    }
    if (!p->creds.uid.userName || !p->creds.uid.password) return VIX_E_INVALID_ARG;
    if ((g_cfg.user && strcmp(p->creds.uid.userName, g_cfg.user) != 0) ||
        (g_cfg.password && strcmp(p->creds.uid.password, g_cfg.password) != 0)) {
        LOG_MSG("VixDiskLibVim: Login failed for user %s on %s.\n", p->creds.uid.userName,
                nz(p->serverName));
        return LOGIN_CODE;
    }
    return VIX_OK;
}

static int safe_component(const char *s) {
    return s && *s && !strchr(s, '/') && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static char *image_path(const char *id, const char *ssid) {
    if (!g_cfg.images || !safe_component(id)) return NULL;
    if (ssid && *ssid && !safe_component(ssid)) return NULL;
    char *path = NULL;
    if (asprintf(&path, "%s/%s/%s.raw", g_cfg.images, id, (ssid && *ssid) ? ssid : "current") < 0)
        return NULL;
    return path;
}

/* What the test bed records beside an IVD's images (tests/testbed/vsphere.py place_image), i.e.
   what vCenter knows of the IVD: `datastore` holds the moref of the datastore it lives on, and
   an optional `sector-size` its logical and physical sector sizes ("4096 4096" for a 4Kn
   disk). Returns a malloc'd, trimmed first line, or NULL when the file is missing. */
static char *ivd_fact(const char *id, const char *name) {
    if (!g_cfg.images || !safe_component(id)) return NULL;
    char *path = NULL;
    if (asprintf(&path, "%s/%s/%s", g_cfg.images, id, name) < 0) return NULL;
    FILE *f = fopen(path, "re");
    free(path);
    if (!f) return NULL;
    char line[256];
    char *out = NULL;
    if (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\r\n")] = 0;
        out = strdup(line);
    }
    fclose(f);
    return out;
}

/* The IVD lives on datastore `ds`? Real vCenter looks the IVD up on the datastore the caller
   names and fails when it is not there (the error code is assumed: not found). A test bed that
   never recorded the IVD's datastore is a VIOLATION too: the check could not be made. */
static VixError check_datastore(const char *func, const char *id, const char *ds) {
    char *known = ivd_fact(id, "datastore");
    VixError err = VIX_OK;
    if (!known) {
        violation("datastore-unknown", "func=%s id=%s ds=%s", func, nz(id), nz(ds));
        err = VIX_E_FILE_NOT_FOUND;
    } else if (strcmp(known, nz(ds)) != 0) {
        violation("wrong-datastore", "func=%s id=%s ds=%s expected=%s", func, nz(id), nz(ds),
                  known);
        LOG_MSG("VixDiskLib: vStorageObject %s not found on datastore %s.\n", nz(id), nz(ds));
        err = VIX_E_FILE_NOT_FOUND;
    }
    free(known);
    return err;
}

/* The mode a server connection's handles use: the configured one if the caller's list allows
   it (or gives none); otherwise the first network mode in the caller's list; else none. */
static const char *pick_transport(const char *requested) {
    static const char *const modes[] = {"file", "san", "hotadd", "nbdssl", "nbd"};
    const char *configured = NULL;
    for (size_t i = 0; i < 5; i++)
        if (!strcmp(modes[i], g_cfg.transport)) configured = modes[i];
    if (!requested || !*requested) return configured;
    const char *p = requested;
    while (*p) {
        size_t len = strcspn(p, ":");
        if (len == strlen(configured) && !strncmp(p, configured, len)) return configured;
        if (len == 3 && !strncmp(p, "nbd", 3)) return "nbd";
        if (len == 6 && !strncmp(p, "nbdssl", 6)) return "nbdssl";
        p += len;
        if (*p == ':') p++;
    }
    return NULL;
}


static void make_uuid(const char *seed, char *out, size_t outlen) {
    uint64_t h1 = 1469598103934665603ULL, h2 = 0x9e3779b97f4a7c15ULL;
    for (const unsigned char *p = (const unsigned char *)seed; *p; p++) {
        h1 = (h1 ^ *p) * 1099511628211ULL;
        h2 = (h2 ^ *p) * 0x100000001b3ULL + 0x5bd1e995;
    }
    unsigned char b[16];
    for (int i = 0; i < 8; i++) {
        b[i] = (unsigned char)(h1 >> (8 * i));
        b[8 + i] = (unsigned char)(h2 >> (8 * i));
    }
    snprintf(out, outlen,
             "%02x %02x %02x %02x %02x %02x %02x %02x-%02x %02x %02x %02x %02x %02x %02x %02x",
             b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12],
             b[13], b[14], b[15]);
}

/* ---- InitEx helpers ------------------------------------------------------------------- */
/* VDDK's config file: "key = value" lines, '#' comments, values optionally double-quoted.
   Only tmpDirectory matters here. Returns 0, or -1 when the file cannot be read (real VDDK's
   behaviour then is unknown; failing InitEx is the stricter choice). */
static int read_config(const char *path, char *tmpdir, size_t tmpdir_len) {
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    char line[1024];
    while (fgets(line, sizeof(line), f)) {
        char *k = line;
        while (isspace((unsigned char)*k)) k++;
        if (*k == '#' || !*k) continue;
        char *eq = strchr(k, '=');
        if (!eq) continue;
        char *ke = eq;
        while (ke > k && isspace((unsigned char)ke[-1])) ke--;
        *ke = 0;
        char *v = eq + 1;
        while (isspace((unsigned char)*v)) v++;
        size_t n = strlen(v);
        while (n && isspace((unsigned char)v[n - 1])) v[--n] = 0;
        if (n >= 2 && v[0] == '"' && v[n - 1] == '"') {
            v[n - 1] = 0;
            v++;
        }
        if (!strcmp(k, "tmpDirectory")) snprintf(tmpdir, tmpdir_len, "%s", v);
    }
    fclose(f);
    return 0;
}

/* VDDK keeps temporary and log files in tmpDirectory; the stand-in leaves one there too, so a
   caller that gives it a private directory must clean up a non-empty one. */
static VixError touch_tmpdir(const char *dir) {
    char path[PATH_MAX];
    snprintf(path, sizeof(path), "%s/vixDiskLib-standin-%d.log", dir, (int)getpid());
    int fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0600);
    if (fd < 0) return VIX_E_FILE_ACCESS_ERROR;
    ssize_t r = write(fd, "stand-in VixDiskLib temporary file\n", 35);
    (void)r;
    close(fd);
    return VIX_OK;
}

/* dlopen by bare name, as VDDK does: found only through LD_LIBRARY_PATH (no RPATH anywhere).
   Returns NULL on success, else the loader's message (static storage). */
static const char *load_plugin(void) {
#ifdef STANDIN_VDDK6
    atomic_store(&g_plugin_ok, 1); /* the "too old" variant has no plugin */
    return NULL;
#else
    static char why[512];
    void *so = dlopen(PLUGIN_NAME, RTLD_NOW | RTLD_LOCAL);
    if (!so) {
        const char *e = dlerror();
        snprintf(why, sizeof(why), "%s", e ? e : "unknown error");
        return why;
    }
    const char *(*init)(void) = (const char *(*)(void))dlsym(so, PLUGIN_INIT);
    if (!init || !init()) {
        snprintf(why, sizeof(why), "%s: no %s", PLUGIN_NAME, PLUGIN_INIT);
        dlclose(so);
        return why;
    }
    g_plugin = so;
    atomic_store(&g_plugin_ok, 1);
    return NULL;
#endif
}

/* ==== the API =========================================================================== */

EXPORT VixError VixDiskLib_InitEx(uint32_t majorVersion, uint32_t minorVersion,
                                  VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                                  VixDiskLibGenericLogFunc *panic, const char *libDir,
                                  const char *configFile) {
    (void)panic;
    pthread_mutex_lock(&g_mu);
    if (g_inited) {
        pthread_mutex_unlock(&g_mu);
        violation("double-init", "major=%u minor=%u", majorVersion, minorVersion);
        return VIX_OK;
    }
    char tmpdir[PATH_MAX] = "";
    VixError err = VIX_OK;
    if (configFile && read_config(configFile, tmpdir, sizeof(tmpdir)) != 0)
        err = VIX_E_FILE_NOT_FOUND;
    else if (*tmpdir)
        err = touch_tmpdir(tmpdir);
    if (err != VIX_OK) {
        pthread_mutex_unlock(&g_mu);
        logline_t l;
        ll_begin(&l, "InitEx");
        ll_add(&l, "major=%u minor=%u variant=%d", majorVersion, minorVersion, VARIANT);
        ll_str(&l, "libDir", libDir);
        ll_str(&l, "configFile", configFile);
        ll_str(&l, "tmpDirectory", tmpdir);
        ll_add(&l, "err=%llu", (unsigned long long)err);
        ll_emit(&l);
        return err;
    }
    config_load(&g_cfg);
    const char *logpath = env_str("VDDK_STANDIN_LOG");
    if (logpath) atomic_store(&g_logfd, open(logpath, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    atomic_store(&g_log, log);
    atomic_store(&g_warn, warn);
    atomic_store(&g_prepares, 0);
    atomic_store(&g_endaccess, 0);
    atomic_store(&g_reads, 0);
    atomic_store(&g_read_bytes, 0);
    atomic_store(&g_read_errors, 0);
    atomic_store(&g_violations, 0);
    atomic_store(&g_read_seq, 0);
    atomic_store(&g_async_seq, 0);
    atomic_store(&g_async_reads, 0);
    atomic_store(&g_connects, 0);
    atomic_store(&g_opens, 0);
    atomic_store(&g_holds, 0);
    g_rand_state = (unsigned)env_u64("VDDK_STANDIN_SEED", 1);
    g_global_next_free = 0;
    g_inited = 1;
    const char *plugin_error = load_plugin();
    pthread_mutex_unlock(&g_mu);

    logline_t l;
    ll_begin(&l, "InitEx");
    ll_add(&l, "major=%u minor=%u variant=%d", majorVersion, minorVersion, VARIANT);
    ll_str(&l, "libDir", libDir);
    ll_str(&l, "configFile", configFile);
    ll_str(&l, "tmpDirectory", tmpdir);
    ll_str(&l, "transport", g_cfg.transport);
    ll_add(&l, "plugin=%s", plugin_error ? "failed" : "loaded");
    ll_add(&l, "pid=%d err=0", (int)getpid());
    ll_emit(&l);
    if (my_tid() != getpid()) violation("initex-not-main-thread", "pid=%d", (int)getpid());

    LOG_MSG("VixDiskLib: Initializing stand-in VixDiskLib %d.0 for client version %u.%u.\n",
            VARIANT, majorVersion, minorVersion);
    LOG_MSG("VixDiskLib: libDir is %s, configFile is %s.\n", libDir ? libDir : "(none)",
            configFile ? configFile : "(none)");
    LOG_MSG("CEIP: phone home is not enabled; VixDiskLib will not send usage data (%s).\n",
            "stand-in");
    /* Like the real library: InitEx still succeeds, and only the log callback hears of it.
       The wording is modelled on real VDDK's (not verified against its binary). */
    if (plugin_error)
        LOG_MSG("VixDiskLib: Failed to load %s : Error = %s.\n", PLUGIN_NAME, plugin_error);
    return VIX_OK;
}

EXPORT void VixDiskLib_Exit(void) {
    pthread_mutex_lock(&g_mu);
    int inited = g_inited;
    pthread_mutex_unlock(&g_mu);
    if (!inited) {
        violation("exit-without-init", "%s", "");
        return;
    }
    q_drain_and_stop();

    /* Anything still open is a teardown bug of the caller; release it so a later InitEx
       starts clean. */
    int nh = 0, nc = 0;
    pthread_mutex_lock(&g_mu);
    handle_t *hs = g_handles;
    conn_t *cs = g_conns;
    g_handles = NULL;
    g_conns = NULL;
    pthread_mutex_unlock(&g_mu);
    for (handle_t *h = hs; h; h = h->next) nh++;
    for (conn_t *c = cs; c; c = c->next) nc++;
    if (nh || nc) violation("exit-with-open", "handles=%d connections=%d", nh, nc);
    while (hs) {
        handle_t *next = hs->next;
        atomic_fetch_sub(&hs->conn->nhandles, 1);
        handle_put(hs);
        hs = next;
    }
    while (cs) {
        conn_t *next = cs->next;
        conn_put(cs);
        cs = next;
    }
    uint64_t p = atomic_load(&g_prepares), e = atomic_load(&g_endaccess);
    /* EndAccess without a Prepare in this process is recovery (ivdfs end-access, umount of a
       dead mount); a Prepare left without its EndAccess is the bug. */
    if (p > e)
        violation("unpaired-prepare", "prepares=%llu endaccess=%llu", (unsigned long long)p,
                  (unsigned long long)e);

    logline_t l;
    ll_begin(&l, "Exit");
    ll_add(&l,
           "prepares=%llu endaccess=%llu open_handles=%d connections=%d reads=%llu "
           "read_bytes=%llu read_errors=%llu async_reads=%llu violations=%llu",
           (unsigned long long)p, (unsigned long long)e, nh, nc,
           (unsigned long long)atomic_load(&g_reads), (unsigned long long)atomic_load(&g_read_bytes),
           (unsigned long long)atomic_load(&g_read_errors),
           (unsigned long long)atomic_load(&g_async_reads),
           (unsigned long long)atomic_load(&g_violations));
    ll_emit(&l);
    LOG_MSG("VixDiskLib: VixDiskLib_Exit: Unmatched Init calls so far: %d.\n", 0);

    pthread_mutex_lock(&g_mu);
    int fd = atomic_exchange(&g_logfd, -1);
    if (fd >= 0) close(fd);
    atomic_store(&g_log, NULL);
    atomic_store(&g_warn, NULL);
    config_free(&g_cfg);
    if (g_plugin) dlclose(g_plugin);
    g_plugin = NULL;
    atomic_store(&g_plugin_ok, 0);
    g_inited = 0;
    pthread_mutex_unlock(&g_mu);
}

EXPORT const char *VixDiskLib_ListTransportModes(void) {
    if (logging()) {
        logline_t l;
        ll_begin(&l, "ListTransportModes");
        ll_str(&l, "modes", TRANSPORT_MODES);
        ll_emit(&l);
    }
    return TRANSPORT_MODES;
}

#ifndef STANDIN_VDDK6
static void *params_state(const VixDiskLibConnectParams *p) {
    return (void *)((uintptr_t)p ^ PARAMS_STATE_KEY);
}

/* The reserved fields as AllocateConnectParams left them? A VIOLATION (and 3) if written; a
   VIOLATION only if the structure did not come from AllocateConnectParams at all. */
static VixError check_params(const VixDiskLibConnectParams *p, const char *func) {
    static const char zero[8];
    if (!p) return VIX_OK;
    int magic = !memcmp(p->reserved3, PARAMS_MAGIC, 8);
    if (!magic && !memcmp(p->reserved3, zero, 8) && !p->reserved2 && !p->reserved1) {
        violation("connect-params-not-allocated", "func=%s", func);
        return VIX_OK;
    }
    if (!magic || p->reserved2 != params_state(p) || p->reserved1) {
        violation("connect-params-reserved-written", "func=%s", func);
        return VIX_E_INVALID_ARG;
    }
    return VIX_OK;
}

EXPORT VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void) {
    VixDiskLibConnectParams *p = calloc(1, sizeof(*p));
    if (p) {
        memcpy(p->reserved3, PARAMS_MAGIC, 8);
        p->reserved2 = params_state(p);
    }
    if (logging()) {
        logline_t l;
        ll_begin(&l, "AllocateConnectParams");
        ll_add(&l, "ok=%d", p != NULL);
        ll_emit(&l);
    }
    return p;
}

/* Frees the structure only: the strings in it belong to whoever set them. */
EXPORT void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *connectParams) {
    if (logging()) {
        logline_t l;
        ll_begin(&l, "FreeConnectParams");
        ll_emit(&l);
    }
    if (connectParams) check_params(connectParams, "FreeConnectParams");
    free(connectParams);
}
#else
static VixError check_params(const VixDiskLibConnectParams *p, const char *func) {
    (void)p; /* VDDK 6: callers allocate the structure themselves */
    (void)func;
    return VIX_OK;
}
#endif

EXPORT VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *p, Bool readOnly,
                                     const char *snapshotRef, const char *transportModes,
                                     VixDiskLibConnection *connection) {
    if (!check_inited("ConnectEx")) return VIX_E_FAIL;
    VixError err = VIX_OK;
    conn_t *c = NULL;
    char *image = NULL;
    int server = p && p->serverName;

    if (connection) *connection = NULL;
    if (!p || !connection) {
        err = VIX_E_INVALID_ARG;
        goto out;
    }
    if ((err = check_params(p, "ConnectEx")) != VIX_OK) goto out;
    if (!readOnly) violation("connect-not-readonly", "server=%s", nz(p->serverName));
    sleep_ns(g_cfg.connect_latency_ns);
    /* FAIL_CONNECT_AFTER=N: the first N connects work, then the host is "down" for good;
       FAIL_CONNECT_FIRST=N: the first N fail, later ones work. */
    uint64_t nth = atomic_fetch_add(&g_connects, 1) + 1;
    if (inject(g_cfg.fail_connect, g_cfg.fail_connect_first, g_cfg.fail_connect_after, nth)) {
        err = g_cfg.fail_connect_code;
        WARN_MSG("VixDiskLib stand-in: injected ConnectEx failure: error %llu.\n",
                 (unsigned long long)err);
        goto out;
    }
    if (server) {
        const VixDiskLibVStorageObjectSpec *s = &p->spec.vStorageObjSpec;
        if (p->specType != VIXDISKLIB_SPEC_VSTORAGE_OBJECT || !s->id || !*s->id ||
            !s->datastoreMoRef || !*s->datastoreMoRef) {
            err = VIX_E_INVALID_ARG;
            goto out;
        }
        LOG_MSG("VixDiskLib: VixDiskLib_ConnectEx: connecting to %s:%u as %s.\n", p->serverName,
                p->port ? p->port : 443u,
                p->credType == VIXDISKLIB_CRED_UID ? nz(p->creds.uid.userName) : "(session)");
        err = check_server_auth(p);
        if (err) goto out;
        image = image_path(s->id, s->ssId);
        struct stat st;
        if (!image || stat(image, &st) != 0) {
            LOG_MSG("VixDiskLib: no image for vStorageObject %s snapshot %s.\n", s->id,
                    (s->ssId && *s->ssId) ? s->ssId : "(current)");
            err = VIX_E_FILE_NOT_FOUND;
            goto out;
        }
        if ((err = check_datastore("ConnectEx", s->id, s->datastoreMoRef)) != VIX_OK) goto out;
        /* An IVD's snapshot is named by vStorageObjSpec.ssId; snapshotRef is the moref of a VM
           snapshot (VMware's sample passes it for VMX specs), which means nothing for an IVD.
           Real VDDK's answer to both at once is unknown: refusing it is the stricter choice. */
        if (snapshotRef && *snapshotRef) {
            violation("connect-snapshot-ref", "id=%s snapshotRef=%s", s->id, snapshotRef);
            err = VIX_E_INVALID_ARG;
            goto out;
        }
    } else if (p->vmxSpec) {
        err = VIX_E_NOT_SUPPORTED; /* hosted VMs are not served by the stand-in */
        goto out;
    }

    c = calloc(1, sizeof(*c));
    if (!c) {
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
    atomic_init(&c->refs, 1);
    c->server = server;
    if (server) {
        c->server_name = strdup(p->serverName);
        c->ivd_id = strdup(p->spec.vStorageObjSpec.id);
        c->ds = strdup(p->spec.vStorageObjSpec.datastoreMoRef);
        c->ssid = dup_or_null(p->spec.vStorageObjSpec.ssId);
        c->image = image;
        image = NULL;
    }
    c->logical_sector = c->physical_sector = (uint32_t)SECTOR;
    char *sizes = server ? ivd_fact(c->ivd_id, "sector-size") : NULL;
    if (sizes) {
        unsigned lss = 0, pss = 0;
        int n = sscanf(sizes, "%u %u", &lss, &pss);
        if (n >= 1 && lss) c->logical_sector = c->physical_sector = lss;
        if (n == 2 && pss) c->physical_sector = pss;
        free(sizes);
    }
    c->transport_req = dup_or_null(transportModes);
    pthread_mutex_lock(&g_mu);
    c->id = ++g_next_conn_id;
    c->next = g_conns;
    g_conns = c;
    pthread_mutex_unlock(&g_mu);
    *connection = conn_token(c);
    LOG_MSG("VixDiskLib: Connection %llu established (%s).\n", (unsigned long long)c->id,
            server ? "vStorageObject" : "local files");

out:
    free(image);
    logline_t l;
    ll_begin(&l, "ConnectEx");
    ll_add(&l, "conn=%llu mode=%s", c ? (unsigned long long)c->id : 0ULL,
           server ? "server" : "local");
    if (p) {
        ll_str(&l, "server", p->serverName);
        ll_add(&l, "port=%u nfcHostPort=%u", p->port, p->nfcHostPort);
        ll_str(&l, "thumb", p->thumbPrint);
        ll_add(&l, "credType=%d", p->credType);
        if (p->credType == VIXDISKLIB_CRED_UID) ll_str(&l, "user", p->creds.uid.userName);
        ll_add(&l, "readOnly=%d specType=%d", readOnly ? 1 : 0, p->specType);
        if (p->specType == VIXDISKLIB_SPEC_VSTORAGE_OBJECT) {
            ll_str(&l, "id", p->spec.vStorageObjSpec.id);
            ll_str(&l, "ds", p->spec.vStorageObjSpec.datastoreMoRef);
            ll_str(&l, "ssid", p->spec.vStorageObjSpec.ssId);
        }
        ll_str(&l, "vmxSpec", p->vmxSpec);
    }
    ll_str(&l, "snapshotRef", snapshotRef);
    ll_str(&l, "transport", transportModes);
    ll_add(&l, "err=%llu", (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_Disconnect(VixDiskLibConnection connection) {
    conn_t *c = conn_get(connection, "Disconnect");
    if (!c) return VIX_E_INVALID_ARG;
    int nh = atomic_load(&c->nhandles);
    logline_t l;
    ll_begin(&l, "Disconnect");
    ll_add(&l, "conn=%llu handles=%d", (unsigned long long)c->id, nh);
    ll_emit(&l);
    if (nh) violation("disconnect-with-open-handles", "conn=%llu handles=%d",
                      (unsigned long long)c->id, nh);
    pthread_mutex_lock(&g_mu);
    int was = conn_unlink_locked(c);
    pthread_mutex_unlock(&g_mu);
    if (was) conn_put(c); /* the registry's reference */
    conn_put(c);
    return VIX_OK;
}

EXPORT VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                                uint32_t flags, VixDiskLibHandle *diskHandle) {
    VixError err = VIX_OK;
    handle_t *h = NULL;
    const char *transport = NULL;
    const char *file = NULL;
    int fd = -1;
    uint64_t size = 0;
    vmdk_disk_t *vmdk = NULL;

    /* *diskHandle is set on success only: real VDDK 7.0.2 leaves it as it was on failure. */
    conn_t *c = conn_get(connection, "Open");
    if (!c) return VIX_E_INVALID_ARG;
    if (!diskHandle) {
        err = VIX_E_INVALID_ARG;
        goto out;
    }
    if (!(flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY))
        violation("open-not-readonly", "conn=%llu flags=%u", (unsigned long long)c->id, flags);
    sleep_ns(g_cfg.connect_latency_ns);
    uint64_t nth = atomic_fetch_add(&g_opens, 1) + 1;
    if (inject(g_cfg.fail_open, g_cfg.fail_open_first, g_cfg.fail_open_after, nth)) {
        err = g_cfg.fail_open_code;
        WARN_MSG("VixDiskLib stand-in: injected Open failure: error %llu.\n",
                 (unsigned long long)err);
        goto out;
    }
    if (atomic_load(&c->lost)) {
        err = CONN_LOST_CODE;
        goto out;
    }
    if (c->server) {
        /* An IVD is opened through vSphere (the plugin). A local file is not: VDDK's local
           mode predates the plugin, so it keeps working without it. */
        if ((err = plugin_err()) != VIX_OK) {
            LOG_MSG("VixDiskLib: VixDiskLib_Open: cannot open vStorageObject %s: %s.\n",
                    c->ivd_id, error_text(err));
            goto out;
        }
        if (path && strcmp(path, c->ivd_id) != 0) {
            err = VIX_E_FILE_NOT_FOUND;
            goto out;
        }
        transport = pick_transport(c->transport_req);
        if (!transport) {
            LOG_MSG("VixDiskLib: none of the transport modes %s is available.\n",
                    c->transport_req);
            err = VIX_E_NOT_SUPPORTED;
            goto out;
        }
        file = c->image;
    } else {
        if (!path || !*path) {
            err = VIX_E_INVALID_ARG;
            goto out;
        }
        transport = "file";
        file = path;
    }
    fd = open(file, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        err = (errno == ENOENT || errno == ENOTDIR) ? VIX_E_FILE_NOT_FOUND : VIX_E_FILE_ACCESS_ERROR;
        goto out;
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        err = VIX_E_FILE_ERROR;
        goto out;
    }
    if (S_ISREG(st.st_mode) && !c->server) {
        if ((err = open_vmdk(fd, file, flags, &vmdk)) != VIX_OK) goto out;
        size = vmdk ? vmdk_capacity(vmdk) * SECTOR : (uint64_t)st.st_size;
    } else if (S_ISREG(st.st_mode)) {
        size = (uint64_t)st.st_size;
    } else if (S_ISBLK(st.st_mode)) {
        off_t end = lseek(fd, 0, SEEK_END);
        size = end > 0 ? (uint64_t)end : 0;
    } else {
        err = VIX_E_FILE_ERROR;
        goto out;
    }
    h = calloc(1, sizeof(*h));
    if (!h) {
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
    atomic_init(&h->refs, 1);
    pthread_mutex_init(&h->mu, NULL);
    pthread_cond_init(&h->cv, NULL);
    h->fd = fd;
    fd = -1;
    h->vmdk = vmdk;
    vmdk = NULL;
    if (h->vmdk) {
        h->nlocks = vmdk_num_links(h->vmdk);
        h->locks = calloc((size_t)h->nlocks, sizeof(char *));
        for (int i = 0; h->locks && i < h->nlocks; i++)
            h->locks[i] = lock_link(vmdk_link_path(h->vmdk, i));
    }
    h->capacity = size / SECTOR;
    h->path = strdup(file);
    h->transport = transport;
    h->open_tid = my_tid();
    h->conn = c;
    atomic_fetch_add(&c->refs, 1);
    atomic_fetch_add(&c->nhandles, 1);
    pthread_mutex_lock(&g_mu);
    h->id = ++g_next_handle_id;
    h->next = g_handles;
    g_handles = h;
    pthread_mutex_unlock(&g_mu);
    *diskHandle = handle_token(h);

out:
    if (fd >= 0) close(fd);
    vmdk_close(vmdk);
    logline_t l;
    ll_begin(&l, "Open");
    ll_add(&l, "conn=%llu", (unsigned long long)c->id);
    ll_str(&l, "path", path);
    ll_add(&l, "flags=%u handle=%llu", flags, h ? (unsigned long long)h->id : 0ULL);
    ll_str(&l, "transport", transport);
    ll_add(&l, "capacity=%llu err=%llu", h ? (unsigned long long)h->capacity : 0ULL,
           (unsigned long long)err);
    ll_emit(&l);
    conn_put(c);
    return err;
}

/* The geometry VMware gives a disk it creates, as VDDK 7.0.2 reports it (its biosGeo stays
   0/0/0): 64 heads of 32 sectors below 1 GiB, 128 x 32 below 2 GiB, 255 x 63 from there;
   cylinders = capacity / (heads x sectors). A disk smaller than one cylinder has one, with as
   many 32-sector heads as fit (300 sectors: 1/9/32); below 32 sectors, assumed 1 head. */
static void disk_geometry(uint64_t capacity, VixDiskLibGeometry *g) {
    uint32_t heads = capacity < (1ULL << 21) ? 64 : capacity < (1ULL << 22) ? 128 : 255;
    uint32_t sectors = heads == 255 ? 63 : 32;
    uint64_t cyl = capacity / ((uint64_t)heads * sectors);
    if (cyl == 0) {
        cyl = 1;
        heads = (uint32_t)(capacity / sectors);
        if (heads == 0) heads = 1;
    }
    g->cylinders = (uint32_t)(cyl > UINT32_MAX ? UINT32_MAX : cyl);
    g->heads = heads;
    g->sectors = sectors;
}

EXPORT VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info) {
    handle_t *h = handle_get(diskHandle, "GetInfo");
    if (!h) return VIX_E_INVALID_ARG;
    VixError err = VIX_OK;
    VixDiskLibInfo *i = NULL;
    char uuid[64];
    if (!info) {
        err = VIX_E_INVALID_ARG;
        goto out;
    }
    i = calloc(1, sizeof(*i));
    make_uuid(h->conn->server ? h->conn->image : h->path, uuid, sizeof(uuid));
    if (!i || !(i->uuid = strdup(uuid))) {
        free(i);
        i = NULL;
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
    disk_geometry(h->capacity, &i->physGeo);
    i->capacity = h->capacity;
    i->adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC;
    i->numLinks = h->vmdk ? vmdk_num_links(h->vmdk) : 1;
    /* Measured on VDDK 7.0.2: a whole chain reports its bottom link's hint (none), a
       single-link open the link's own parentFileNameHint. */
    i->parentFileNameHint = NULL;
    if (h->vmdk && vmdk_parent_hint(h->vmdk) &&
        !(i->parentFileNameHint = strdup(vmdk_parent_hint(h->vmdk)))) {
        free(i->uuid);
        free(i);
        i = NULL;
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
#ifndef STANDIN_VDDK6
    /* capacity and every Read/ReadAsync/QueryAllocatedBlocks sector stay 512 bytes
       (VIXDISKLIB_SECTOR_SIZE) whatever the disk's own sector size: VMware's guide, "Sector
       size could vary, but is defined in <vixDiskLib.h> as 512 bytes because VMDK files have
       that sector size". Measured with real VDDK 7.0.2 (local mode, a disk created with
       logicalSectorSize 4096): GetInfo says 4096/4096 and capacity 16384 for 8 MiB, sector 1
       is byte 512, and a one-sector read at sector 1 succeeds. These two fields only say what
       the guest sees. */
    i->logicalSectorSize = h->conn->logical_sector;
    i->physicalSectorSize = h->conn->physical_sector;
#endif
    *info = i;
out:;
    logline_t l;
    ll_begin(&l, "GetInfo");
    ll_add(&l, "handle=%llu capacity=%llu logical=%u physical=%u err=%llu",
           (unsigned long long)h->id, (unsigned long long)h->capacity, h->conn->logical_sector,
           h->conn->physical_sector, (unsigned long long)err);
    ll_emit(&l);
    handle_put(h);
    return err;
}

EXPORT void VixDiskLib_FreeInfo(VixDiskLibInfo *info) {
    if (logging()) {
        logline_t l;
        ll_begin(&l, "FreeInfo");
        ll_emit(&l);
    }
    if (!info) return;
    free(info->parentFileNameHint);
    free(info->uuid);
    free(info);
}

EXPORT const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle) {
    handle_t *h = handle_get(diskHandle, "GetTransportMode");
    if (!h) return "";
    const char *t = h->transport;
    logline_t l;
    ll_begin(&l, "GetTransportMode");
    ll_add(&l, "handle=%llu mode=%s", (unsigned long long)h->id, t);
    ll_emit(&l);
    handle_put(h);
    return t;
}

EXPORT VixError VixDiskLib_Close(VixDiskLibHandle diskHandle) {
    handle_t *h = handle_get(diskHandle, "Close");
    if (!h) return VIX_E_INVALID_ARG;
    pthread_mutex_lock(&h->mu);
    int outstanding = h->outstanding;
    pthread_mutex_unlock(&h->mu);
    logline_t l;
    ll_begin(&l, "Close");
    ll_add(&l, "handle=%llu open_tid=%d outstanding=%d", (unsigned long long)h->id,
           (int)h->open_tid, outstanding);
    ll_emit(&l);
    if (h->open_tid != my_tid())
        violation("close-thread", "handle=%llu open_tid=%d close_tid=%d",
                  (unsigned long long)h->id, (int)h->open_tid, (int)my_tid());
    if (atomic_load(&h->inflight) > 0)
        violation("close-during-read", "handle=%llu", (unsigned long long)h->id);
    pthread_mutex_lock(&g_mu);
    int was = handle_unlink_locked(h);
    pthread_mutex_unlock(&g_mu);
    pthread_mutex_lock(&h->mu);
    while (h->outstanding > 0) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    if (was) {
        atomic_fetch_sub(&h->conn->nhandles, 1);
        handle_put(h); /* the registry's reference */
    }
    handle_put(h);
    return VIX_OK;
}

EXPORT VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                                VixDiskLibSectorType numSectors, uint8_t *readBuffer) {
    handle_t *h = handle_get(diskHandle, "Read");
    if (!h) return VIX_E_INVALID_ARG;
    enter_request(h, "Read");
    uint64_t seq = 0;
    VixError err = check_read_args(h, startSector, numSectors, readBuffer, "Read");
    if (err == VIX_OK) {
        req_t r = {.h = h, .start = startSector, .n = numSectors, .buf = readBuffer};
        plan_request(&r);
        seq = r.seq;
        uint64_t held = nfc_reserve(&r, "Read");
        sleep_until_ns(r.due);
        err = execute_request(&r);
        nfc_release(h, held);
    }
    leave_request(h);
    log_read("Read", h, startSector, numSectors, seq, err, NULL);
    handle_put(h);
    return err;
}

EXPORT VixError VixDiskLib_ReadAsync(VixDiskLibHandle diskHandle,
                                     VixDiskLibSectorType startSector,
                                     VixDiskLibSectorType numSectors, uint8_t *readBuffer,
                                     VixDiskLibCompletionCB callback, void *cbData) {
    handle_t *h = handle_get(diskHandle, "ReadAsync");
    if (!h) return VIX_E_INVALID_ARG;
    enter_request(h, "ReadAsync");
    VixError err = check_read_args(h, startSector, numSectors, readBuffer, "ReadAsync");
    if (err == VIX_E_DISK_OUTOFRANGE && callback) {
        /* Real VDDK (7.0.2, file mode) takes the request and reports the range through the
           callback, before ReadAsync returns VIX_ASYNC; assumed the same on every transport. */
        req_t r = {.h = h, .start = startSector, .n = numSectors, .buf = readBuffer,
                   .cb = callback, .cb_data = cbData};
        log_read("ReadAsync", h, startSector, numSectors, 0, VIX_ASYNC, "mode=inline");
        leave_request(h);
        complete_async(&r, err, 1);
        handle_put(h);
        return VIX_ASYNC;
    }
    if (err == VIX_OK && !callback) err = VIX_E_INVALID_ARG;
    req_t *r = err == VIX_OK ? calloc(1, sizeof(*r)) : NULL;
    if (err == VIX_OK && !r) err = VIX_E_OUT_OF_MEMORY;
    if (err != VIX_OK) {
        leave_request(h);
        log_read("ReadAsync", h, startSector, numSectors, 0, err, NULL);
        handle_put(h);
        return err;
    }
    *r = (req_t){.h = h, .start = startSector, .n = numSectors, .buf = readBuffer,
                 .cb = callback, .cb_data = cbData};
    plan_request(r);
    r->nfc_bytes = nfc_reserve(r, "ReadAsync");
    atomic_fetch_add(&g_async_reads, 1);
    uint64_t k = atomic_fetch_add(&g_async_seq, 1) + 1;
    int is_inline = !is_network(h->transport) || (g_cfg.inline_every && k % g_cfg.inline_every == 0);
    log_read("ReadAsync", h, startSector, numSectors, r->seq, VIX_ASYNC,
             is_inline ? "mode=inline" : "mode=queued");
    if (is_inline) {
        /* Served on the caller's thread; the callback runs before ReadAsync returns. */
        sleep_until_ns(r->due);
        VixError e = execute_request(r);
        leave_request(h);
        complete_async(r, e, 1);
        free(r);
        handle_put(h);
        return VIX_ASYNC;
    }
    pthread_mutex_lock(&h->mu);
    h->outstanding++;
    pthread_mutex_unlock(&h->mu);
    atomic_fetch_add(&h->refs, 1); /* the request's reference */
    if (q_submit(r) != 0) {
        /* Could not queue: serve it here rather than lose it. */
        sleep_until_ns(r->due);
        VixError e = execute_request(r);
        complete_async(r, e, 1);
        pthread_mutex_lock(&h->mu);
        if (--h->outstanding == 0) pthread_cond_broadcast(&h->cv);
        pthread_mutex_unlock(&h->mu);
        handle_put(h);
        free(r);
    }
    leave_request(h);
    handle_put(h);
    return VIX_ASYNC;
}

EXPORT VixError VixDiskLib_Wait(VixDiskLibHandle diskHandle) {
    handle_t *h = handle_get(diskHandle, "Wait");
    if (!h) return VIX_E_INVALID_ARG;
    pthread_mutex_lock(&h->mu);
    int outstanding = h->outstanding;
    while (h->outstanding > 0) pthread_cond_wait(&h->cv, &h->mu);
    pthread_mutex_unlock(&h->mu);
    logline_t l;
    ll_begin(&l, "Wait");
    ll_add(&l, "handle=%llu outstanding=%d", (unsigned long long)h->id, outstanding);
    ll_emit(&l);
    handle_put(h);
    return VIX_OK;
}

/* ivdfs must never write: always refused. */
EXPORT VixError VixDiskLib_Write(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                                 VixDiskLibSectorType numSectors, const uint8_t *writeBuffer) {
    (void)writeBuffer;
    uintptr_t v = (uintptr_t)diskHandle;
    violation("write", "handle=%llu start=%llu n=%llu",
              (v & 0xF) == HANDLE_TAG ? (unsigned long long)(v >> 4) : 0ULL,
              (unsigned long long)startSector, (unsigned long long)numSectors);
    return VIX_E_FILE_READ_ONLY;
}

EXPORT char *VixDiskLib_GetErrorText(VixError err, const char *locale) {
    (void)locale;
    const char *t = error_text(err);
    char *s = NULL;
    if (t)
        s = strdup(t);
    else if (asprintf(&s, "Unknown error %llu", (unsigned long long)VIX_ERROR_CODE(err)) < 0)
        s = NULL;
    if (logging()) {
        logline_t l;
        ll_begin(&l, "GetErrorText");
        ll_add(&l, "err=%llu", (unsigned long long)err);
        ll_emit(&l);
    }
    return s;
}

EXPORT void VixDiskLib_FreeErrorText(char *errMsg) {
    if (logging()) {
        logline_t l;
        ll_begin(&l, "FreeErrorText");
        ll_emit(&l);
    }
    free(errMsg);
}

/* VDDK_STANDIN_HOLD_ACCESS=FILE: PrepareForAccess and EndAccess first log `Hold ... hold=K`
   (K = 1, 2, ... from InitEx) and wait until FILE holds a number >= K, so that a test can look
   at the world (vCenter's snapshots) while the call is under way and order the two. */
static void hold_access(const char *name, const char *id) {
    if (!g_cfg.hold_access) return;
    uint64_t k = atomic_fetch_add(&g_holds, 1) + 1;
    logline_t l;
    ll_begin(&l, "Hold");
    ll_add(&l, "func=%s", name);
    ll_str(&l, "id", id);
    ll_add(&l, "hold=%llu", (unsigned long long)k);
    ll_emit(&l);
    int64_t deadline = mono_ns() + HOLD_TIMEOUT_NS;
    for (;;) {
        unsigned long long released = 0;
        FILE *f = fopen(g_cfg.hold_access, "re");
        int got = f && fscanf(f, "%llu", &released) == 1;
        if (f) fclose(f);
        if (got && released >= k) return;
        if (mono_ns() > deadline) {
            violation("hold-timeout", "func=%s hold=%llu", name, (unsigned long long)k);
            return;
        }
        sleep_ns(1000000);
    }
}

/* vCenter's side of PrepareForAccess: it disables vMotion for the IVD's VMs under the caller's
   identity, and only an EndAccess with that same identity enables it again. That state outlives
   the process (a killed mount's Prepare is undone by `ivdfs umount` or `end-access` later), so
   it is kept beside the IVD's images in `access`: a line "P <identity>" per successful Prepare
   and "E <identity>" per EndAccess that ended one, under flock. Returns 1 (Prepare recorded,
   or an EndAccess that ended one of this identity), 0 (EndAccess with nothing pending at all:
   assumed harmless, as enabling enabled methods), -1 (EndAccess whose identity matches none of
   the pending Prepares: vMotion would stay blocked), -2 (the file cannot be used). */
static int access_record(const char *id, const char *identity, int prepare, long *pending) {
    char *path = NULL;
    if (asprintf(&path, "%s/%s/access", g_cfg.images, id) < 0) return -2;
    int fd = open(path, O_RDWR | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    free(path);
    if (fd < 0) return -2;
    int rc = -2;
    if (flock(fd, LOCK_EX) != 0) goto done;
    long total = 0, mine = 0;
    FILE *f = fdopen(dup(fd), "re");
    if (!f) goto done;
    char line[256];
    while (fgets(line, sizeof(line), f)) {
        line[strcspn(line, "\n")] = 0;
        if ((line[0] != 'P' && line[0] != 'E') || line[1] != ' ') continue;
        long d = line[0] == 'P' ? 1 : -1;
        total += d;
        if (!strcmp(line + 2, identity)) mine += d;
    }
    fclose(f);
    *pending = total;
    char rec[MAX_IDENTITY_LEN + 4];
    int n = snprintf(rec, sizeof(rec), "%c %s\n", prepare ? 'P' : 'E', identity);
    if (prepare || mine > 0) {
        rc = write(fd, rec, (size_t)n) == n ? 1 : -2;
    } else {
        rc = total > 0 ? -1 : 0;
    }
done:
    close(fd); /* drops the lock */
    return rc;
}

static VixError access_common(const char *name, const VixDiskLibConnectParams *p,
                              const char *identity, int prepare) {
    if (!check_inited(name)) return VIX_E_FAIL;
    atomic_fetch_add(prepare ? &g_prepares : &g_endaccess, 1);
    VixError err = VIX_OK;
    const char *id = NULL, *ds = NULL;
    int vso = p && p->specType == VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
    if (p) id = vso ? p->spec.vStorageObjSpec.id : p->vmxSpec;
    if (vso) ds = p->spec.vStorageObjSpec.datastoreMoRef;
    hold_access(name, id);
    if (!p || !identity || strlen(identity) > MAX_IDENTITY_LEN) {
        err = VIX_E_INVALID_ARG;
    } else if ((err = check_params(p, name)) != VIX_OK) {
    } else if (!*identity || strchr(identity, '\n')) {
        /* vCenter files the disabled methods under this identity; an empty one cannot be
           matched by the EndAccess that must undo them (assumed refused; the stricter choice) */
        violation("access-identity", "func=%s id=%s identity=%s", name, nz(id), identity);
        err = VIX_E_INVALID_ARG;
    } else if (!vso || !id || !*id || !ds || !*ds) {
        violation("access-args", "func=%s specType=%d id=%s ds=%s", name, p->specType, nz(id),
                  nz(ds));
        err = VIX_E_INVALID_ARG;
    } else {
        sleep_ns(g_cfg.connect_latency_ns);
        /* EndAccess too: real VDDK's EndAccess also goes through the vSphere plugin (assumed;
           the stricter choice). */
        err = plugin_err();
        if (!err && p->serverName) err = check_server_auth(p);
        if (!err) err = check_datastore(name, id, ds);
        if (!err && prepare && g_cfg.fail_prepare) {
            err = PERMISSION_CODE;
            WARN_MSG("VixDiskLib stand-in: injected PrepareForAccess failure: error %llu.\n",
                     (unsigned long long)err);
        }
        long pending = 0;
        int rc = err ? 1 : access_record(id, identity, prepare, &pending);
        if (rc == -1) {
            violation("end-access-identity", "id=%s identity=%s pending=%ld", id, identity,
                      pending);
            err = VIX_E_INVALID_ARG;
        } else if (rc == -2) {
            LOG_MSG("VixDiskLib stand-in: cannot record access state of %s: %s.\n", id,
                    strerror(errno));
            err = VIX_E_FILE_ACCESS_ERROR;
        }
    }
    logline_t l;
    ll_begin(&l, name);
    ll_str(&l, "id", id);
    ll_str(&l, "identity", identity);
    ll_str(&l, "server", p ? p->serverName : NULL);
    ll_add(&l, "err=%llu nfcHostPort=%u", (unsigned long long)err, p ? p->nfcHostPort : 0U);
    ll_str(&l, "ds", ds);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                            const char *identity) {
    return access_common("PrepareForAccess", connectParams, identity, 1);
}

EXPORT VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams,
                                     const char *identity) {
    return access_common("EndAccess", connectParams, identity, 0);
}

EXPORT VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                                VixDiskLibSectorType startSector,
                                                VixDiskLibSectorType numSectors,
                                                VixDiskLibSectorType chunkSize,
                                                VixDiskLibBlockList **blockList) {
    handle_t *h = handle_get(diskHandle, "QueryAllocatedBlocks");
    if (!h) return VIX_E_INVALID_ARG;
    enter_request(h, "QueryAllocatedBlocks");
    VixError err = VIX_OK;
    VixDiskLibBlock *runs = NULL;
    size_t nruns = 0, cap = 0;
    uint64_t end = startSector + numSectors;
    /* The real library's rules (strings in its binary, checked against VDDK 7.0.2 by
       tests/t2_vddk_oracle.py); anything else is VIX_E_INVALID_ARG. A disk whose size is not a
       multiple of the chunk has a partial last chunk that cannot be queried at all: VMware's
       sample stops at the last whole chunk. An empty range within the rules is no error: an
       empty list. As in 7.0.2, the arguments are checked in two steps: a breach of the first
       leaves *blockList as it was, after it *blockList is NULL until a list is made. */
    const char *rule = !blockList                                   ? "null-blocklist"
                       : chunkSize < VIXDISKLIB_MIN_CHUNK_SIZE      ? "chunk-too-small"
                       : chunkSize > MAX_CHUNK_SIZE                 ? "chunk-too-large"
                       : (chunkSize & (chunkSize - 1))              ? "chunk-not-power-of-two"
                       : startSector % chunkSize                    ? "start-unaligned"
                       : numSectors % chunkSize                     ? "length-unaligned"
                       : numSectors / chunkSize > VIXDISKLIB_MAX_CHUNK_NUMBER ? "too-many-chunks"
                                                                              : NULL;
    if (!rule) {
        *blockList = NULL;
        rule = chunkSize > h->capacity ? "chunk-larger-than-disk"
               : (startSector > h->capacity || numSectors > h->capacity - startSector)
                   ? "beyond-disk"
                   : NULL;
    }
    if (rule) {
        violation("query-allocated-blocks",
                  "handle=%llu start=%llu n=%llu chunk=%llu capacity=%llu rule=%s",
                  (unsigned long long)h->id, (unsigned long long)startSector,
                  (unsigned long long)numSectors, (unsigned long long)chunkSize,
                  (unsigned long long)h->capacity, rule);
        err = VIX_E_INVALID_ARG;
        goto out;
    }
    if (g_cfg.no_qab) {
        err = VIX_E_NOT_SUPPORTED;
        goto out;
    }
    if (atomic_load(&h->conn->lost)) {
        err = CONN_LOST_CODE;
        goto out;
    }
    if (h->conn->server) sleep_ns(g_cfg.latency_ns); /* a local file crosses no network */
    if (h->vmdk) {
        err = vmdk_query_allocated(h->vmdk, startSector, numSectors, chunkSize, &runs, &nruns);
        if (err != VIX_OK) goto out;
        goto list;
    }
    {
        off_t pos = (off_t)(startSector * SECTOR);
        off_t lim = (off_t)(end * SECTOR);
        while (pos < lim) {
            off_t d = lseek(h->fd, pos, SEEK_DATA);
            if (d < 0 || d >= lim) break; /* ENXIO: no data beyond pos */
            off_t e = lseek(h->fd, d, SEEK_HOLE);
            if (e < 0 || e > lim) e = lim;
            uint64_t c0 = (uint64_t)d / SECTOR / chunkSize * chunkSize;
            uint64_t c1 = ((uint64_t)e + SECTOR * chunkSize - 1) / (SECTOR * chunkSize) * chunkSize;
            if (c1 > end) c1 = end;
            if (nruns && runs[nruns - 1].offset + runs[nruns - 1].length >= c0) {
                uint64_t ne = c1 > runs[nruns - 1].offset + runs[nruns - 1].length
                                  ? c1
                                  : runs[nruns - 1].offset + runs[nruns - 1].length;
                runs[nruns - 1].length = ne - runs[nruns - 1].offset;
            } else {
                if (nruns == cap) {
                    cap = cap ? cap * 2 : 16;
                    VixDiskLibBlock *nr = realloc(runs, cap * sizeof(*nr));
                    if (!nr) {
                        err = VIX_E_OUT_OF_MEMORY;
                        goto out;
                    }
                    runs = nr;
                }
                runs[nruns].offset = c0;
                runs[nruns].length = c1 - c0;
                nruns++;
            }
            pos = (off_t)(c1 * SECTOR);
        }
    }
list:
    {
        size_t sz = offsetof(VixDiskLibBlockList, blocks) + (nruns ? nruns : 1) * sizeof(VixDiskLibBlock);
        VixDiskLibBlockList *bl = calloc(1, sz);
        if (!bl) {
            err = VIX_E_OUT_OF_MEMORY;
            goto out;
        }
        bl->numBlocks = (uint32_t)nruns;
        if (nruns) memcpy(bl->blocks, runs, nruns * sizeof(*runs));
        *blockList = bl;
    }
out:
    leave_request(h);
    free(runs);
    logline_t l;
    ll_begin(&l, "QueryAllocatedBlocks");
    ll_add(&l, "handle=%llu start=%llu n=%llu chunk=%llu blocks=%zu err=%llu",
           (unsigned long long)h->id, (unsigned long long)startSector,
           (unsigned long long)numSectors, (unsigned long long)chunkSize, nruns,
           (unsigned long long)err);
    ll_emit(&l);
    handle_put(h);
    return err;
}

EXPORT VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList) {
    if (logging()) {
        logline_t l;
        ll_begin(&l, "FreeBlockList");
        ll_emit(&l);
    }
    free(blockList);
    return VIX_OK;
}

/* ---- test-bed extension for the stand-in libvixMntapi (not a VDDK symbol) ------------------
 * The image file a connection serves (server mode), malloc'ed for the caller to free, or NULL
 * for a local-file connection or a bad token. Lets ../mntapi/ loop-mount the very bytes that
 * VixDiskLib_Read would return. */
/* For the stand-in VixMntapi's .info file: the disk's name as the real VixMntapi 7.0.2 writes
   it for an IVD connection ("<user>@<server>:[<datastore>] VStorageObject:<id>", measured), or
   NULL for a local-file connection (the name given to OpenDisks is the file). */
EXPORT char *VixDiskLibStandin_ConnectionDiskName(VixDiskLibConnection connection) {
    conn_t *c = conn_get(connection, "StandinConnectionDiskName");
    if (!c) return NULL;
    char *s = NULL;
    if (c->server && c->ivd_id &&
        asprintf(&s, "%s@%s:[%s] VStorageObject:%s", g_cfg.user ? g_cfg.user : "user",
                 c->server_name ? c->server_name : "", c->ds ? c->ds : "", c->ivd_id) < 0)
        s = NULL;
    conn_put(c);
    return s;
}

EXPORT char *VixDiskLibStandin_ConnectionImage(VixDiskLibConnection connection) {
    conn_t *c = conn_get(connection, "StandinConnectionImage");
    if (!c) return NULL;
    char *s = c->image ? strdup(c->image) : NULL;
    conn_put(c);
    return s;
}
