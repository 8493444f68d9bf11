/*
 * bridge.c -- VMware's real libvixDiskLib behind ivdfs, with the test bed's IVD snapshots.
 *
 * The real-VDDK test tier (IVDFS_TEST_VDDK=<unpacked VDDK>) lays out a libdir whose lib64 holds
 * this library under the real one's names (SONAME and symbol versions copied from it at build
 * time; see Makefile) beside symlinks to every other file of the real lib64. ivdfs loads it as
 * it loads VMware's; it dlopen()s the real library (REAL_LIBRARY, RTLD_DEEPBIND so the real
 * one's calls to its own functions stay inside it) and forwards every call, changing only what
 * a VDDK without vSphere cannot do:
 *
 *  - A connection to a server for a vStorageObject (serverName set, specType
 *    VIXDISKLIB_SPEC_VSTORAGE_OBJECT) becomes a real local-file connection (ConnectEx with empty
 *    allocated params), and Open on it (path NULL or the IVD id; the real library ignores the
 *    path for an IVD too) opens the VMDK the test bed keeps for that snapshot:
 *    $VDDK_STANDIN_IMAGES/<id>/<ssId>.vmdk (current.vmdk without a snapshot), as the stand-in
 *    keys its raw images. GetConnectParams on it gives back the caller's parameters (VixMntapi
 *    asks for them), and GetTransportMode says "nbdssl": ivdfs then keeps several ReadAsync
 *    requests in flight, which the real library completes inline, as it does for files.
 *  - PrepareForAccess/EndAccess are answered here (VIX_OK) and logged, not forwarded: they only
 *    talk to vCenter, and the public VDDK copy cannot (its plugin libvddkVimAccess.so needs
 *    libvmacore.so, which it lacks), so the real ones fail with 16053 whatever the caller did.
 *    Forwarding them would only test that missing file; answering keeps the pairing check.
 *  - InitEx's one report that the plugin did not load is dropped (ivdfs rightly refuses to run
 *    on a VDDK that says so); every other message reaches the caller's callbacks unchanged.
 *
 * Everything else, every error code included, is the real library's. Each call is written to
 * the stand-in's call log ($VDDK_STANDIN_LOG, same line format, see ../standin/README.md) so the
 * test bed's log checks run unchanged, including VIOLATION lines for what ivdfs must never do
 * (concurrent reads on a handle, Close on another thread than Open, a writable open, a write,
 * a QueryAllocatedBlocks the real library refuses).
 *
 * Concurrency: thread-safe; the connection and handle registries are under one mutex, and a
 * handle's record lives until its Close returns.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "vixDiskLib.h"

#ifndef REAL_LIBRARY
#error "build with -DREAL_LIBRARY='\"<vddk>/lib64/libvixDiskLib.so.N.x.y\"' (see Makefile)"
#endif

#define EXPORT __attribute__((visibility("default")))
#define LOGBUF 4096
#define BRIDGE_TRANSPORT "nbdssl"

/* ---- the real library ----------------------------------------------------------------- */
/* Every function of the public header; the header of the same VDDK declares them. */
#define REAL_FUNCS(X)                                                                        \
    X(InitEx) X(Init) X(Exit) X(ListTransportModes) X(Cleanup) X(Connect) X(ConnectEx)        \
    X(Disconnect) X(PrepareForAccess) X(EndAccess) X(Create) X(CreateChild) X(Open)           \
    X(QueryAllocatedBlocks) X(FreeBlockList) X(GetInfo) X(FreeInfo) X(GetTransportMode)       \
    X(Close) X(Read) X(ReadAsync) X(Write) X(WriteAsync) X(Flush) X(Wait) X(ReadMetadata)    \
    X(WriteMetadata) X(GetMetadataKeys) X(Unlink) X(Grow) X(Shrink) X(Defragment) X(Rename)  \
    X(Clone) X(GetErrorText) X(FreeErrorText) X(IsAttachPossible) X(Attach)                  \
    X(SpaceNeededForClone) X(CheckRepair) X(GetConnectParams) X(FreeConnectParams)            \
    X(AllocateConnectParams)

static struct {
#define X(n) __typeof__(VixDiskLib_##n) *n;
    REAL_FUNCS(X)
#undef X
} R;

static pthread_once_t g_once = PTHREAD_ONCE_INIT;

static void load_real(void) {
    void *h = dlopen(REAL_LIBRARY, RTLD_NOW | RTLD_LOCAL | RTLD_DEEPBIND);
    if (!h) {
        fprintf(stderr, "vixDiskLib bridge: cannot load %s: %s\n", REAL_LIBRARY, dlerror());
        abort();
    }
#define X(n)                                                                                 \
    if (!(R.n = (__typeof__(R.n))dlsym(h, "VixDiskLib_" #n))) {                              \
        fprintf(stderr, "vixDiskLib bridge: %s lacks VixDiskLib_%s\n", REAL_LIBRARY, #n);     \
        abort();                                                                             \
    }
    REAL_FUNCS(X)
#undef X
}

#define REAL (pthread_once(&g_once, load_real), &R)

/* ---- call log (the stand-in's format) -------------------------------------------------- */
static _Atomic int g_logfd = -1;
static _Atomic uint64_t g_violations, g_reads, g_read_bytes, g_read_errors, g_async_reads;
static _Atomic uint64_t g_prepares, g_endaccess, g_seq;
static _Thread_local pid_t t_tid;

static pid_t my_tid(void) {
    if (!t_tid) t_tid = (pid_t)syscall(SYS_gettid);
    return t_tid;
}

typedef struct {
    char b[LOGBUF];
    size_t n;
} logline_t;

static void ll_raw(logline_t *l, const char *s, size_t len) {
    size_t room = sizeof(l->b) - 2 - l->n;
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
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    l->n = 0;
    char tmp[96];
    int k = snprintf(tmp, sizeof(tmp), "%lld tid=%d",
                     (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000, (int)my_tid());
    ll_raw(l, tmp, (size_t)k);
    ll_add(l, "%s", name);
}

/* key=value, quoted with C escapes when empty or holding blanks, quotes, '=' or control
   bytes; NULL as (null). */
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
    int own = 0;
    if (fd < 0) { /* before InitEx or after Exit: the log named in the environment */
        const char *path = getenv("VDDK_STANDIN_LOG");
        if (!path || !*path) return;
        fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        if (fd < 0) return;
        own = 1;
    }
    ssize_t r = write(fd, l->b, l->n); /* one write(2) on an O_APPEND fd: lines never mix */
    (void)r;
    if (own) close(fd);
}

static void violation(const char *kind, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void violation(const char *kind, const char *fmt, ...) {
    atomic_fetch_add(&g_violations, 1);
    char tmp[LOGBUF];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(tmp, sizeof(tmp), fmt, ap);
    va_end(ap);
    logline_t l;
    ll_begin(&l, "VIOLATION");
    ll_add(&l, "%s", kind);
    if (*tmp) ll_add(&l, "%s", tmp);
    ll_emit(&l);
}

static void log_err(const char *name, const char *fmt, VixError err) {
    logline_t l;
    ll_begin(&l, name);
    if (fmt && *fmt) ll_add(&l, "%s", fmt);
    ll_add(&l, "err=%llu", (unsigned long long)err);
    ll_emit(&l);
}

/* ---- InitEx callbacks: the caller's, minus the plugin report -------------------------- */
static VixDiskLibGenericLogFunc *_Atomic g_user_log, *_Atomic g_user_warn, *_Atomic g_user_panic;

/* The one message that says the vSphere plugin did not load, e.g. "VixDiskLib: Failed to load
   libvddkVimAccess.so : Error = libvmacore.so: cannot open shared object file: ...". */
static int is_plugin_report(const char *fmt, va_list args) {
    char msg[1024];
    va_list copy;
    va_copy(copy, args);
    vsnprintf(msg, sizeof(msg), fmt, copy);
    va_end(copy);
    return strstr(msg, "Failed to load libvddkVimAccess.so") != NULL;
}

static void forward_msg(VixDiskLibGenericLogFunc *f, const char *fmt, va_list args) {
    if (!f || is_plugin_report(fmt, args)) return;
    f(fmt, args);
}

static void cb_log(const char *fmt, va_list args) { forward_msg(atomic_load(&g_user_log), fmt, args); }
static void cb_warn(const char *fmt, va_list args) { forward_msg(atomic_load(&g_user_warn), fmt, args); }
static void cb_panic(const char *fmt, va_list args) {
    VixDiskLibGenericLogFunc *f = atomic_load(&g_user_panic);
    if (f) f(fmt, args);
}

/* ---- connections and handles ---------------------------------------------------------- */
typedef struct conn {
    struct conn *next;
    VixDiskLibConnection real;
    uint64_t id;
    int bridged;
    /* the caller's parameters, for GetConnectParams (bridged connections only) */
    char *server, *thumb, *user, *password, *ivd, *ds, *ssid, *vmdk;
    uint32 port, nfc_port;
    VixDiskLibCredType cred_type;
    _Atomic int nhandles;
} conn_t;

typedef struct handle {
    struct handle *next;
    VixDiskLibHandle real;
    uint64_t id;
    conn_t *conn;
    pid_t open_tid;
    _Atomic int inflight;
} handle_t;

/* GetConnectParams results of bridged connections: their strings are ours to free. */
typedef struct given {
    struct given *next;
    VixDiskLibConnectParams *p;
} given_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static conn_t *g_conns;
static handle_t *g_handles;
static given_t *g_given;
static uint64_t g_next_conn, g_next_handle;
static char *g_images;

static conn_t *conn_find(VixDiskLibConnection real) {
    pthread_mutex_lock(&g_mu);
    conn_t *c = g_conns;
    while (c && c->real != real) c = c->next;
    pthread_mutex_unlock(&g_mu);
    return c;
}

static handle_t *handle_find(VixDiskLibHandle real) {
    pthread_mutex_lock(&g_mu);
    handle_t *h = g_handles;
    while (h && h->real != real) h = h->next;
    pthread_mutex_unlock(&g_mu);
    return h;
}

static uint64_t hid(const handle_t *h) { return h ? h->id : 0; }

static char *dup_or_null(const char *s) { return s ? strdup(s) : NULL; }

static void wipe_free(char *s) {
    if (s) explicit_bzero(s, strlen(s));
    free(s);
}

static void conn_free(conn_t *c) {
    free(c->server);
    free(c->thumb);
    free(c->user);
    wipe_free(c->password);
    free(c->ivd);
    free(c->ds);
    free(c->ssid);
    free(c->vmdk);
    free(c);
}

/* The VMDK the test bed keeps for an IVD snapshot, or NULL for a name that is not one plain
   path component (no "..", no '/'). */
static char *vmdk_path(const char *ivd, const char *ssid) {
    const char *snap = ssid && *ssid ? ssid : "current";
    if (!g_images || !*ivd || strchr(ivd, '/') || strchr(snap, '/') || !strcmp(ivd, "..") ||
        !strcmp(snap, "..") || !strcmp(ivd, ".") || !strcmp(snap, "."))
        return NULL;
    char *s = NULL;
    if (asprintf(&s, "%s/%s/%s.vmdk", g_images, ivd, snap) < 0) return NULL;
    return s;
}

/* ---- library ---------------------------------------------------------------------------- */
static VixError init_common(const char *name, uint32 major, uint32 minor,
                            VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                            VixDiskLibGenericLogFunc *panic, const char *libDir,
                            const char *configFile, int ex) {
    atomic_store(&g_user_log, log);
    atomic_store(&g_user_warn, warn);
    atomic_store(&g_user_panic, panic);
    const char *path = getenv("VDDK_STANDIN_LOG");
    if (path && *path && atomic_load(&g_logfd) < 0)
        atomic_store(&g_logfd, open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644));
    const char *images = getenv("VDDK_STANDIN_IMAGES");
    pthread_mutex_lock(&g_mu);
    free(g_images);
    g_images = dup_or_null(images);
    pthread_mutex_unlock(&g_mu);
    VixError err = ex ? REAL->InitEx(major, minor, log ? cb_log : NULL, warn ? cb_warn : NULL,
                                     panic ? cb_panic : NULL, libDir, configFile)
                      : REAL->Init(major, minor, log ? cb_log : NULL, warn ? cb_warn : NULL,
                                   panic ? cb_panic : NULL, libDir);
    logline_t l;
    ll_begin(&l, name);
    ll_add(&l, "major=%u minor=%u variant=bridge", major, minor);
    ll_str(&l, "real", REAL_LIBRARY);
    ll_str(&l, "libDir", libDir);
    ll_str(&l, "configFile", configFile);
    ll_add(&l, "pid=%d err=%llu", (int)getpid(), (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_InitEx(uint32 majorVersion, uint32 minorVersion,
                                  VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                                  VixDiskLibGenericLogFunc *panic, const char *libDir,
                                  const char *configFile) {
    return init_common("InitEx", majorVersion, minorVersion, log, warn, panic, libDir,
                       configFile, 1);
}

EXPORT VixError VixDiskLib_Init(uint32 majorVersion, uint32 minorVersion,
                                VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warn,
                                VixDiskLibGenericLogFunc *panic, const char *libDir) {
    return init_common("Init", majorVersion, minorVersion, log, warn, panic, libDir, NULL, 0);
}

EXPORT void VixDiskLib_Exit(void) {
    REAL->Exit();
    int handles = 0, conns = 0;
    pthread_mutex_lock(&g_mu);
    for (handle_t *h = g_handles; h; h = h->next) handles++;
    for (conn_t *c = g_conns; c; c = c->next) conns++;
    pthread_mutex_unlock(&g_mu);
    if (handles || conns)
        violation("exit-with-open", "handles=%d connections=%d", handles, conns);
    logline_t l;
    ll_begin(&l, "Exit");
    ll_add(&l,
           "prepares=%llu endaccess=%llu open_handles=%d connections=%d reads=%llu "
           "read_bytes=%llu read_errors=%llu async_reads=%llu violations=%llu",
           (unsigned long long)g_prepares, (unsigned long long)g_endaccess, handles, conns,
           (unsigned long long)g_reads, (unsigned long long)g_read_bytes,
           (unsigned long long)g_read_errors, (unsigned long long)g_async_reads,
           (unsigned long long)g_violations);
    ll_emit(&l);
    int fd = atomic_exchange(&g_logfd, -1);
    if (fd >= 0) close(fd);
}

EXPORT const char *VixDiskLib_ListTransportModes(void) { return REAL->ListTransportModes(); }

EXPORT VixDiskLibConnectParams *VixDiskLib_AllocateConnectParams(void) {
    return REAL->AllocateConnectParams();
}

EXPORT void VixDiskLib_FreeConnectParams(VixDiskLibConnectParams *p) {
    given_t *g = NULL;
    pthread_mutex_lock(&g_mu);
    for (given_t **pp = &g_given; *pp; pp = &(*pp)->next) {
        if ((*pp)->p == p) {
            g = *pp;
            *pp = g->next;
            break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (g && p) { /* ours: the real FreeConnectParams leaves the strings to their owner */
        free(p->serverName);
        free(p->thumbPrint);
        if (p->credType == VIXDISKLIB_CRED_UID) {
            free(p->creds.uid.userName);
            wipe_free(p->creds.uid.password);
        }
        free(p->spec.vStorageObjSpec.id);
        free(p->spec.vStorageObjSpec.datastoreMoRef);
        free(p->spec.vStorageObjSpec.ssId);
        p->serverName = p->thumbPrint = NULL;
        memset(&p->creds, 0, sizeof(p->creds));
        memset(&p->spec, 0, sizeof(p->spec));
        free(g);
    }
    REAL->FreeConnectParams(p);
}

static int is_bridged(const VixDiskLibConnectParams *p) {
    return p && p->serverName && p->specType == VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
}

static VixError connect_common(const char *api, const VixDiskLibConnectParams *p, Bool readOnly,
                               const char *snapshotRef, const char *transportModes,
                               VixDiskLibConnection *connection, int ex) {
    VixError err;
    conn_t *c = NULL;
    int bridged = is_bridged(p);
    if (bridged) {
        const VixDiskLibVStorageObjectSpec *s = &p->spec.vStorageObjSpec;
        c = calloc(1, sizeof(*c));
        if (!c) return VIX_E_OUT_OF_MEMORY;
        c->bridged = 1;
        c->server = strdup(p->serverName);
        c->thumb = dup_or_null(p->thumbPrint);
        c->cred_type = p->credType;
        if (p->credType == VIXDISKLIB_CRED_UID) {
            c->user = dup_or_null(p->creds.uid.userName);
            c->password = dup_or_null(p->creds.uid.password);
        }
        c->port = p->port;
        c->nfc_port = p->nfcHostPort;
        c->ivd = dup_or_null(s->id);
        c->ds = dup_or_null(s->datastoreMoRef);
        c->ssid = dup_or_null(s->ssId);
        pthread_mutex_lock(&g_mu);
        c->vmdk = s->id ? vmdk_path(s->id, s->ssId) : NULL;
        pthread_mutex_unlock(&g_mu);
        /* The real library's own local-file connection: no server, nothing else set. */
        VixDiskLibConnectParams *local = REAL->AllocateConnectParams();
        if (!local) {
            err = VIX_E_OUT_OF_MEMORY;
        } else {
            err = ex ? REAL->ConnectEx(local, readOnly, NULL, NULL, connection)
                     : REAL->Connect(local, connection);
            REAL->FreeConnectParams(local);
        }
    } else if (p && p->serverName) {
        err = VIX_E_NOT_SUPPORTED; /* a VM's disks on a server: not served by the test bed */
        if (connection) *connection = NULL;
    } else {
        err = ex ? REAL->ConnectEx(p, readOnly, snapshotRef, transportModes, connection)
                 : REAL->Connect(p, connection);
        if (err == VIX_OK) c = calloc(1, sizeof(*c)); /* registered, for the log's numbers */
    }
    if (err == VIX_OK && c && connection) {
        c->real = *connection;
        pthread_mutex_lock(&g_mu);
        c->id = ++g_next_conn;
        c->next = g_conns;
        g_conns = c;
        pthread_mutex_unlock(&g_mu);
    } else if (c) {
        conn_free(c);
        c = NULL;
    }
    if (ex && !readOnly && bridged) violation("connect-not-readonly", "server=%s", p->serverName);
    logline_t l;
    ll_begin(&l, "ConnectEx");
    ll_add(&l, "conn=%llu mode=%s", c ? (unsigned long long)c->id : 0ULL,
           bridged ? "server" : "local");
    if (!ex) ll_add(&l, "api=%s", api);
    if (p) {
        ll_str(&l, "server", p->serverName);
        ll_add(&l, "port=%u nfcHostPort=%u", p->port, p->nfcHostPort);
        ll_str(&l, "thumb", p->thumbPrint);
        ll_add(&l, "credType=%d", p->credType);
        if (p->credType == VIXDISKLIB_CRED_UID) ll_str(&l, "user", p->creds.uid.userName);
        ll_add(&l, "readOnly=%d specType=%d", ex ? (readOnly ? 1 : 0) : 1, p->specType);
        if (p->specType == VIXDISKLIB_SPEC_VSTORAGE_OBJECT) {
            ll_str(&l, "id", p->spec.vStorageObjSpec.id);
            ll_str(&l, "ds", p->spec.vStorageObjSpec.datastoreMoRef);
            ll_str(&l, "ssid", p->spec.vStorageObjSpec.ssId);
        }
        ll_str(&l, "vmxSpec", p->vmxSpec);
    }
    ll_str(&l, "snapshotRef", snapshotRef);
    ll_str(&l, "transport", transportModes);
    ll_str(&l, "vmdk", c ? c->vmdk : NULL);
    ll_add(&l, "err=%llu", (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_ConnectEx(const VixDiskLibConnectParams *connectParams, Bool readOnly,
                                     const char *snapshotRef, const char *transportModes,
                                     VixDiskLibConnection *connection) {
    return connect_common("ConnectEx", connectParams, readOnly, snapshotRef, transportModes,
                          connection, 1);
}

/* VixDiskLib_Connect (VixMntapi's way in): logged as a read-only ConnectEx line with
   api=Connect, so the log's pairing of connections and Disconnects holds. */
EXPORT VixError VixDiskLib_Connect(const VixDiskLibConnectParams *connectParams,
                                   VixDiskLibConnection *connection) {
    return connect_common("Connect", connectParams, 1, NULL, NULL, connection, 0);
}

EXPORT VixError VixDiskLib_Disconnect(VixDiskLibConnection connection) {
    pthread_mutex_lock(&g_mu);
    conn_t *c = NULL;
    for (conn_t **pp = &g_conns; *pp; pp = &(*pp)->next) {
        if ((*pp)->real == connection) {
            c = *pp;
            *pp = c->next;
            break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    int nh = c ? atomic_load(&c->nhandles) : 0;
    if (!c) violation("bad-connection", "func=Disconnect");
    if (nh) violation("disconnect-with-open-handles", "conn=%llu handles=%d",
                      (unsigned long long)c->id, nh);
    VixError err = REAL->Disconnect(connection);
    logline_t l;
    ll_begin(&l, "Disconnect");
    ll_add(&l, "conn=%llu handles=%d err=%llu", c ? (unsigned long long)c->id : 0ULL, nh,
           (unsigned long long)err);
    ll_emit(&l);
    if (c) conn_free(c);
    return err;
}

EXPORT VixError VixDiskLib_GetConnectParams(const VixDiskLibConnection connection,
                                            VixDiskLibConnectParams **connectParams) {
    conn_t *c = conn_find(connection);
    if (!c || !c->bridged) {
        VixError err = REAL->GetConnectParams(connection, connectParams);
        log_err("GetConnectParams", c ? "mode=local" : "mode=unknown", err);
        return err;
    }
    if (!connectParams) return VIX_E_INVALID_ARG;
    /* What a server connection gives back: the caller's parameters, in the real library's
       allocated structure (its private fields intact), with strings the bridge owns. */
    VixDiskLibConnectParams *p = REAL->AllocateConnectParams();
    given_t *g = calloc(1, sizeof(*g));
    if (!p || !g) {
        free(g);
        if (p) REAL->FreeConnectParams(p);
        return VIX_E_OUT_OF_MEMORY;
    }
    p->serverName = dup_or_null(c->server);
    p->thumbPrint = dup_or_null(c->thumb);
    p->credType = c->cred_type;
    if (c->cred_type == VIXDISKLIB_CRED_UID) {
        p->creds.uid.userName = dup_or_null(c->user);
        p->creds.uid.password = dup_or_null(c->password);
    }
    p->port = c->port;
    p->nfcHostPort = c->nfc_port;
    p->specType = VIXDISKLIB_SPEC_VSTORAGE_OBJECT;
    p->spec.vStorageObjSpec.id = dup_or_null(c->ivd);
    p->spec.vStorageObjSpec.datastoreMoRef = dup_or_null(c->ds);
    p->spec.vStorageObjSpec.ssId = dup_or_null(c->ssid);
    g->p = p;
    pthread_mutex_lock(&g_mu);
    g->next = g_given;
    g_given = g;
    pthread_mutex_unlock(&g_mu);
    *connectParams = p;
    char what[64];
    snprintf(what, sizeof(what), "conn=%llu mode=server", (unsigned long long)c->id);
    log_err("GetConnectParams", what, VIX_OK);
    return VIX_OK;
}

/* PrepareForAccess/EndAccess only talk to vCenter, which this VDDK cannot reach (see the top
   of this file): answered here, logged for the pairing check. */
static VixError access_common(const char *name, const VixDiskLibConnectParams *p,
                              const char *identity) {
    VixError err = VIX_OK;
    if (!p || !identity || !p->serverName) err = VIX_E_INVALID_ARG;
    logline_t l;
    ll_begin(&l, name);
    ll_str(&l, "id", p && p->specType == VIXDISKLIB_SPEC_VSTORAGE_OBJECT
                         ? p->spec.vStorageObjSpec.id
                         : NULL);
    ll_str(&l, "identity", identity);
    ll_str(&l, "server", p ? p->serverName : NULL);
    ll_add(&l, "err=%llu nfcHostPort=%u answered=bridge", (unsigned long long)err,
           p ? p->nfcHostPort : 0);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_PrepareForAccess(const VixDiskLibConnectParams *connectParams,
                                            const char *identity) {
    atomic_fetch_add(&g_prepares, 1);
    return access_common("PrepareForAccess", connectParams, identity);
}

EXPORT VixError VixDiskLib_EndAccess(const VixDiskLibConnectParams *connectParams,
                                     const char *identity) {
    atomic_fetch_add(&g_endaccess, 1);
    return access_common("EndAccess", connectParams, identity);
}

/* ---- disks ------------------------------------------------------------------------------- */
EXPORT VixError VixDiskLib_Open(const VixDiskLibConnection connection, const char *path,
                                uint32 flags, VixDiskLibHandle *diskHandle) {
    conn_t *c = conn_find(connection);
    const char *file = path;
    VixError err;
    if (c && c->bridged) {
        /* The real library ignores the path of an IVD's Open; so does the bridge. */
        file = c->vmdk;
        if (!(flags & VIXDISKLIB_FLAG_OPEN_READ_ONLY))
            violation("open-not-readonly", "conn=%llu flags=%u", (unsigned long long)c->id,
                      flags);
    }
    if (c && c->bridged && !file) {
        err = VIX_E_FILE_NOT_FOUND;
        if (diskHandle) *diskHandle = NULL;
    } else {
        err = REAL->Open(connection, file, flags, diskHandle);
    }
    handle_t *h = NULL;
    if (err == VIX_OK && diskHandle && (h = calloc(1, sizeof(*h)))) {
        h->real = *diskHandle;
        h->conn = c;
        h->open_tid = my_tid();
        if (c) atomic_fetch_add(&c->nhandles, 1);
        pthread_mutex_lock(&g_mu);
        h->id = ++g_next_handle;
        h->next = g_handles;
        g_handles = h;
        pthread_mutex_unlock(&g_mu);
    }
    logline_t l;
    ll_begin(&l, "Open");
    ll_add(&l, "conn=%llu", c ? (unsigned long long)c->id : 0ULL);
    ll_str(&l, "path", path);
    ll_str(&l, "file", file);
    ll_add(&l, "flags=%u handle=%llu err=%llu", flags, (unsigned long long)hid(h),
           (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_Close(VixDiskLibHandle diskHandle) {
    pthread_mutex_lock(&g_mu);
    handle_t *h = NULL;
    for (handle_t **pp = &g_handles; *pp; pp = &(*pp)->next) {
        if ((*pp)->real == diskHandle) {
            h = *pp;
            *pp = h->next;
            break;
        }
    }
    pthread_mutex_unlock(&g_mu);
    if (!h) violation("bad-handle", "func=Close");
    if (h && h->open_tid != my_tid())
        violation("close-thread", "handle=%llu open_tid=%d close_tid=%d",
                  (unsigned long long)h->id, (int)h->open_tid, (int)my_tid());
    if (h && atomic_load(&h->inflight) > 0)
        violation("close-during-read", "handle=%llu", (unsigned long long)h->id);
    VixError err = REAL->Close(diskHandle);
    logline_t l;
    ll_begin(&l, "Close");
    ll_add(&l, "handle=%llu open_tid=%d outstanding=0 err=%llu", (unsigned long long)hid(h),
           h ? (int)h->open_tid : 0, (unsigned long long)err);
    ll_emit(&l);
    if (h) {
        if (h->conn) atomic_fetch_sub(&h->conn->nhandles, 1);
        free(h);
    }
    return err;
}

EXPORT VixError VixDiskLib_GetInfo(VixDiskLibHandle diskHandle, VixDiskLibInfo **info) {
    VixError err = REAL->GetInfo(diskHandle, info);
    logline_t l;
    ll_begin(&l, "GetInfo");
    ll_add(&l, "handle=%llu capacity=%llu links=%d err=%llu",
           (unsigned long long)hid(handle_find(diskHandle)),
           err == VIX_OK && info && *info ? (unsigned long long)(*info)->capacity : 0ULL,
           err == VIX_OK && info && *info ? (*info)->numLinks : 0, (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT void VixDiskLib_FreeInfo(VixDiskLibInfo *info) { REAL->FreeInfo(info); }

EXPORT const char *VixDiskLib_GetTransportMode(VixDiskLibHandle diskHandle) {
    handle_t *h = handle_find(diskHandle);
    const char *real = REAL->GetTransportMode(diskHandle);
    const char *mode = h && h->conn && h->conn->bridged ? BRIDGE_TRANSPORT : real;
    logline_t l;
    ll_begin(&l, "GetTransportMode");
    ll_add(&l, "handle=%llu", (unsigned long long)hid(h));
    ll_str(&l, "mode", mode);
    ll_str(&l, "real", real);
    ll_emit(&l);
    return mode;
}

static void enter_read(handle_t *h, const char *func) {
    if (!h) return;
    int n = atomic_fetch_add(&h->inflight, 1) + 1;
    if (n > 1)
        violation("concurrent-read", "handle=%llu inflight=%d func=%s", (unsigned long long)h->id,
                  n, func);
}

static void leave_read(handle_t *h) {
    if (h) atomic_fetch_sub(&h->inflight, 1);
}

static void count_read(VixError err, VixDiskLibSectorType n) {
    atomic_fetch_add(&g_reads, 1);
    if (err == VIX_OK || err == VIX_ASYNC)
        atomic_fetch_add(&g_read_bytes, n * VIXDISKLIB_SECTOR_SIZE);
    else
        atomic_fetch_add(&g_read_errors, 1);
}

static void log_read(const char *name, handle_t *h, VixDiskLibSectorType start,
                     VixDiskLibSectorType n, uint64_t seq, VixError err, const char *extra) {
    logline_t l;
    ll_begin(&l, name);
    ll_add(&l, "handle=%llu start=%llu n=%llu seq=%llu err=%llu", (unsigned long long)hid(h),
           (unsigned long long)start, (unsigned long long)n, (unsigned long long)seq,
           (unsigned long long)err);
    if (extra) ll_add(&l, "%s", extra);
    ll_emit(&l);
}

EXPORT VixError VixDiskLib_Read(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                                VixDiskLibSectorType numSectors, uint8 *readBuffer) {
    handle_t *h = handle_find(diskHandle);
    enter_read(h, "Read");
    uint64_t seq = atomic_fetch_add(&g_seq, 1) + 1;
    VixError err = REAL->Read(diskHandle, startSector, numSectors, readBuffer);
    leave_read(h);
    count_read(err, numSectors);
    log_read("Read", h, startSector, numSectors, seq, err, NULL);
    return err;
}

/* A ReadAsync in flight: the caller's callback, and what its log lines need. */
typedef struct {
    VixDiskLibCompletionCB cb;
    void *data;
    handle_t *h;
    VixDiskLibSectorType start, n;
    uint64_t seq;
    VixError result;
    int done;
} async_t;

/* The request this thread is inside ReadAsync for: a callback that finds its own request here
   ran inline, before ReadAsync returned. */
static _Thread_local async_t *t_in_read_async;

static void async_done(void *cbData, VixError result) {
    async_t *a = cbData;
    int is_inline = t_in_read_async == a;
    a->result = result;
    a->done = 1;
    if (!is_inline) /* queued: logged now; inline: after the ReadAsync line */
        log_read("ReadAsyncDone", a->h, a->start, a->n, a->seq, result, "inline=0");
    if (result != VIX_OK) atomic_fetch_add(&g_read_errors, 1);
    VixDiskLibCompletionCB cb = a->cb;
    void *data = a->data;
    if (!is_inline) free(a);
    cb(data, result);
}

EXPORT VixError VixDiskLib_ReadAsync(VixDiskLibHandle diskHandle,
                                     VixDiskLibSectorType startSector,
                                     VixDiskLibSectorType numSectors, uint8 *readBuffer,
                                     VixDiskLibCompletionCB callback, void *cbData) {
    handle_t *h = handle_find(diskHandle);
    async_t *a = callback ? calloc(1, sizeof(*a)) : NULL;
    if (callback && !a) return VIX_E_OUT_OF_MEMORY;
    uint64_t seq = atomic_fetch_add(&g_seq, 1) + 1;
    if (a) *a = (async_t){.cb = callback, .data = cbData, .h = h, .start = startSector,
                          .n = numSectors, .seq = seq};
    enter_read(h, "ReadAsync");
    t_in_read_async = a;
    VixError err = REAL->ReadAsync(diskHandle, startSector, numSectors, readBuffer,
                                   a ? async_done : NULL, a);
    t_in_read_async = NULL;
    leave_read(h);
    atomic_fetch_add(&g_async_reads, 1);
    count_read(err, numSectors);
    int is_inline = a && a->done;
    log_read("ReadAsync", h, startSector, numSectors, seq, err,
             is_inline ? "mode=inline" : err == VIX_ASYNC ? "mode=queued" : NULL);
    if (is_inline) {
        log_read("ReadAsyncDone", h, startSector, numSectors, seq, a->result, "inline=1");
        free(a);
    } else if (err != VIX_ASYNC) {
        free(a); /* refused: no callback will come */
    }
    return err;
}

EXPORT VixError VixDiskLib_Wait(VixDiskLibHandle diskHandle) {
    VixError err = REAL->Wait(diskHandle);
    logline_t l;
    ll_begin(&l, "Wait");
    ll_add(&l, "handle=%llu outstanding=0 err=%llu",
           (unsigned long long)hid(handle_find(diskHandle)), (unsigned long long)err);
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_QueryAllocatedBlocks(VixDiskLibHandle diskHandle,
                                                VixDiskLibSectorType startSector,
                                                VixDiskLibSectorType numSectors,
                                                VixDiskLibSectorType chunkSize,
                                                VixDiskLibBlockList **blockList) {
    handle_t *h = handle_find(diskHandle);
    enter_read(h, "QueryAllocatedBlocks");
    VixError err = REAL->QueryAllocatedBlocks(diskHandle, startSector, numSectors, chunkSize,
                                              blockList);
    leave_read(h);
    if (VIX_ERROR_CODE(err) == VIX_E_INVALID_ARG)
        violation("query-allocated-blocks", "handle=%llu start=%llu n=%llu chunk=%llu rule=real",
                  (unsigned long long)hid(h), (unsigned long long)startSector,
                  (unsigned long long)numSectors, (unsigned long long)chunkSize);
    logline_t l;
    ll_begin(&l, "QueryAllocatedBlocks");
    ll_add(&l, "handle=%llu start=%llu n=%llu chunk=%llu blocks=%u err=%llu",
           (unsigned long long)hid(h), (unsigned long long)startSector,
           (unsigned long long)numSectors, (unsigned long long)chunkSize,
           err == VIX_OK && blockList && *blockList ? (*blockList)->numBlocks : 0U,
           (unsigned long long)err);
    /* The runs themselves, "offset+length,..." in sectors: tests check reads against them. */
    if (err == VIX_OK && blockList && *blockList && (*blockList)->numBlocks) {
        char runs[LOGBUF - 512];
        size_t k = 0;
        uint32 i = 0, n = (*blockList)->numBlocks;
        for (; i < n && k < sizeof(runs) - 48; i++)
            k += (size_t)snprintf(runs + k, sizeof(runs) - k, "%s%llu+%llu", i ? "," : "",
                                  (unsigned long long)(*blockList)->blocks[i].offset,
                                  (unsigned long long)(*blockList)->blocks[i].length);
        ll_add(&l, "runs=%s", runs);
        if (i < n) ll_add(&l, "runs_truncated=%u", n - i);
    }
    ll_emit(&l);
    return err;
}

EXPORT VixError VixDiskLib_FreeBlockList(VixDiskLibBlockList *blockList) {
    return REAL->FreeBlockList(blockList);
}

EXPORT VixError VixDiskLib_Write(VixDiskLibHandle diskHandle, VixDiskLibSectorType startSector,
                                 VixDiskLibSectorType numSectors, const uint8 *writeBuffer) {
    violation("write", "handle=%llu start=%llu n=%llu",
              (unsigned long long)hid(handle_find(diskHandle)), (unsigned long long)startSector,
              (unsigned long long)numSectors);
    return REAL->Write(diskHandle, startSector, numSectors, writeBuffer);
}

EXPORT VixError VixDiskLib_WriteAsync(VixDiskLibHandle diskHandle,
                                      VixDiskLibSectorType startSector,
                                      VixDiskLibSectorType numSectors, const uint8 *writeBuffer,
                                      VixDiskLibCompletionCB callback, void *cbData) {
    violation("write", "handle=%llu start=%llu n=%llu async=1",
              (unsigned long long)hid(handle_find(diskHandle)), (unsigned long long)startSector,
              (unsigned long long)numSectors);
    return REAL->WriteAsync(diskHandle, startSector, numSectors, writeBuffer, callback, cbData);
}

EXPORT char *VixDiskLib_GetErrorText(VixError err, const char *locale) {
    return REAL->GetErrorText(err, locale);
}

EXPORT void VixDiskLib_FreeErrorText(char *errMsg) { REAL->FreeErrorText(errMsg); }

/* ---- the rest of the API: forwarded as it is ------------------------------------------ */
EXPORT VixError VixDiskLib_Cleanup(const VixDiskLibConnectParams *connectParams,
                                   uint32 *numCleanedUp, uint32 *numRemaining) {
    return REAL->Cleanup(connectParams, numCleanedUp, numRemaining);
}

EXPORT VixError VixDiskLib_Create(const VixDiskLibConnection connection, const char *path,
                                  const VixDiskLibCreateParams *createParams,
                                  VixDiskLibProgressFunc progressFunc,
                                  void *progressCallbackData) {
    return REAL->Create(connection, path, createParams, progressFunc, progressCallbackData);
}

EXPORT VixError VixDiskLib_CreateChild(VixDiskLibHandle diskHandle, const char *childPath,
                                       VixDiskLibDiskType diskType,
                                       VixDiskLibProgressFunc progressFunc,
                                       void *progressCallbackData) {
    return REAL->CreateChild(diskHandle, childPath, diskType, progressFunc, progressCallbackData);
}

EXPORT VixError VixDiskLib_Flush(VixDiskLibHandle diskHandle) { return REAL->Flush(diskHandle); }

EXPORT VixError VixDiskLib_ReadMetadata(VixDiskLibHandle diskHandle, const char *key, char *buf,
                                        size_t bufLen, size_t *requiredLen) {
    return REAL->ReadMetadata(diskHandle, key, buf, bufLen, requiredLen);
}

EXPORT VixError VixDiskLib_WriteMetadata(VixDiskLibHandle diskHandle, const char *key,
                                         const char *val) {
    violation("write", "handle=%llu metadata=1", (unsigned long long)hid(handle_find(diskHandle)));
    return REAL->WriteMetadata(diskHandle, key, val);
}

EXPORT VixError VixDiskLib_GetMetadataKeys(VixDiskLibHandle diskHandle, char *keysBuffer,
                                           size_t bufLen, size_t *requiredLen) {
    return REAL->GetMetadataKeys(diskHandle, keysBuffer, bufLen, requiredLen);
}

EXPORT VixError VixDiskLib_Unlink(VixDiskLibConnection connection, const char *path) {
    return REAL->Unlink(connection, path);
}

EXPORT VixError VixDiskLib_Grow(VixDiskLibConnection connection, const char *path,
                                VixDiskLibSectorType capacity, Bool updateGeometry,
                                VixDiskLibProgressFunc progressFunc, void *progressCallbackData) {
    return REAL->Grow(connection, path, capacity, updateGeometry, progressFunc,
                      progressCallbackData);
}

EXPORT VixError VixDiskLib_Shrink(VixDiskLibHandle diskHandle, VixDiskLibProgressFunc progressFunc,
                                  void *progressCallbackData) {
    return REAL->Shrink(diskHandle, progressFunc, progressCallbackData);
}

EXPORT VixError VixDiskLib_Defragment(VixDiskLibHandle diskHandle,
                                      VixDiskLibProgressFunc progressFunc,
                                      void *progressCallbackData) {
    return REAL->Defragment(diskHandle, progressFunc, progressCallbackData);
}

EXPORT VixError VixDiskLib_Rename(const char *srcFileName, const char *dstFileName) {
    return REAL->Rename(srcFileName, dstFileName);
}

EXPORT VixError VixDiskLib_Clone(const VixDiskLibConnection dstConnection, const char *dstPath,
                                 const VixDiskLibConnection srcConnection, const char *srcPath,
                                 const VixDiskLibCreateParams *vixCreateParams,
                                 VixDiskLibProgressFunc progressFunc, void *progressCallbackData,
                                 Bool overWrite) {
    return REAL->Clone(dstConnection, dstPath, srcConnection, srcPath, vixCreateParams,
                       progressFunc, progressCallbackData, overWrite);
}

EXPORT VixError VixDiskLib_IsAttachPossible(VixDiskLibHandle parent, VixDiskLibHandle child) {
    return REAL->IsAttachPossible(parent, child);
}

EXPORT VixError VixDiskLib_Attach(VixDiskLibHandle parent, VixDiskLibHandle child) {
    return REAL->Attach(parent, child);
}

EXPORT VixError VixDiskLib_SpaceNeededForClone(VixDiskLibHandle diskHandle,
                                               VixDiskLibDiskType cloneDiskType,
                                               uint64 *spaceNeeded) {
    return REAL->SpaceNeededForClone(diskHandle, cloneDiskType, spaceNeeded);
}

EXPORT VixError VixDiskLib_CheckRepair(const VixDiskLibConnection connection,
                                       const char *filename, Bool repair) {
    return REAL->CheckRepair(connection, filename, repair);
}
