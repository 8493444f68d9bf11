/*
 * vixmntapi.c -- the ivdfs test bed's stand-in for VMware's libvixMntapi.so (Linux).
 *
 * Real ABI (vixMntapi.h). OpenDisks opens the named disk through the stand-in libvixDiskLib
 * (so its call log shows the Open/Close), asks it which image file the connection serves
 * (VixDiskLibStandin_ConnectionImage), and lists that image's partitions (MBR with logicals,
 * GPT; a table-less disk is one whole-disk volume). MountVolume really mounts a volume
 * read-only: a read-only loop device on the IMAGE file (offset/sizelimit), then
 *   ext2/3/4: mount -t ext4 -o ro,noload     xfs: -o ro,norecovery    btrfs: -o ro,nologreplay
 *   ntfs: ntfs-3g -o ro                      vfat: kernel vfat if present, else fusefat -o ro,
 * into a fresh temp directory, which GetVolumeInfo reports as symbolicLink. A filesystem with no
 * driver here fails MountVolume with VIX_E_NOT_SUPPORTED and a warn-callback message.
 * OpenDisks with diskNames == NULL calls abort(), as the real library crashes.
 *
 * Built as libvixMntapi.so.1 (VMware's name) with DT_NEEDED libfuse.so.2: like the real one,
 * it does not load on a host without libfuse2.
 *
 * Call log: one line per call on $VDDK_STANDIN_MNTAPI_LOG, else $VDDK_STANDIN_LOG, formatted
 * like the disk library's: "<µs> tid=<tid> Mntapi_<Function> key=value ...".
 * Handles are tagged ids (disk sets ...0xA, volumes ...0xB), never pointers.
 * Single-threaded use is assumed (one mutex guards everything anyway).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <pthread.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "vixMntapi.h"

#define EXPORT __attribute__((visibility("default")))
#define DISKSET_TAG 0xA
#define VOLUME_TAG 0xB
#define MAX_VOLUMES 64

_Static_assert(sizeof(VixVolumeInfo) == 32, "VixVolumeInfo layout");
_Static_assert(__builtin_offsetof(VixVolumeInfo, symbolicLink) == 8, "symbolicLink");
_Static_assert(sizeof(VixDiskSetInfo) == 16, "VixDiskSetInfo layout");

extern char **environ;
int fuse_version(void); /* libfuse2; its headers (libfuse-dev) are not needed for this */

typedef struct {
    uint64_t id;
    int number;
    uint64_t start, length;
    char fs[16];
    int mounted;
    char loop[64];
    char dir[256];
} vol_t;

typedef struct diskset {
    struct diskset *next;
    uint64_t id;
    VixDiskLibHandle disk;
    char *image;
    int gpt;
    int nvol;
    vol_t vols[MAX_VOLUMES];
} diskset_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_inited, g_logfd = -1;
static uint64_t g_next_id;
static diskset_t *g_sets;
static VixDiskLibGenericLogFunc *g_warn;

/* ---- log -------------------------------------------------------------------------------- */
static void logline(const char *name, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void logline(const char *name, const char *fmt, ...) {
    char buf[2048];
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    int n = snprintf(buf, sizeof(buf), "%lld tid=%d Mntapi_%s ",
                     (long long)ts.tv_sec * 1000000 + ts.tv_nsec / 1000, (int)syscall(SYS_gettid),
                     name);
    va_list ap;
    va_start(ap, fmt);
    n += vsnprintf(buf + n, sizeof(buf) - (size_t)n - 1, fmt, ap);
    va_end(ap);
    if (n > (int)sizeof(buf) - 2) n = (int)sizeof(buf) - 2;
    buf[n++] = '\n';
    int fd = g_logfd;
    int own = 0;
    if (fd < 0) { /* before Init (abort path): still reach the log */
        const char *p = getenv("VDDK_STANDIN_MNTAPI_LOG");
        if (!p || !*p) p = getenv("VDDK_STANDIN_LOG");
        if (!p || !*p) return;
        fd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        own = 1;
    }
    if (fd >= 0) {
        ssize_t r = write(fd, buf, (size_t)n);
        (void)r;
    }
    if (own && fd >= 0) close(fd);
}

static void warn(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void warn(const char *fmt, ...) {
    if (!g_warn) return;
    va_list ap;
    va_start(ap, fmt);
    g_warn(fmt, ap);
    va_end(ap);
}

/* ---- commands ----------------------------------------------------------------------------- */
/* Runs argv; stdout into out (if given), stderr to /dev/null. Returns the exit status or -1. */
static int run(char *const argv[], char *out, size_t outlen) {
    int pfd[2] = {-1, -1};
    posix_spawn_file_actions_t fa;
    posix_spawn_file_actions_init(&fa);
    posix_spawn_file_actions_addopen(&fa, 0, "/dev/null", O_RDONLY, 0);
    posix_spawn_file_actions_addopen(&fa, 2, "/dev/null", O_WRONLY, 0);
    if (out) {
        if (pipe2(pfd, O_CLOEXEC) != 0) return -1;
        posix_spawn_file_actions_adddup2(&fa, pfd[1], 1);
    } else {
        posix_spawn_file_actions_addopen(&fa, 1, "/dev/null", O_WRONLY, 0);
    }
    pid_t pid;
    int rc = posix_spawnp(&pid, argv[0], &fa, NULL, argv, environ);
    posix_spawn_file_actions_destroy(&fa);
    if (out) close(pfd[1]);
    if (rc != 0) {
        if (out) close(pfd[0]);
        return -1;
    }
    if (out) {
        size_t n = 0;
        ssize_t r;
        while ((r = read(pfd[0], out + n, outlen - 1 - n)) > 0) n += (size_t)r;
        out[n] = 0;
        close(pfd[0]);
        while (n && (out[n - 1] == '\n' || out[n - 1] == ' ')) out[--n] = 0;
    }
    int st;
    while (waitpid(pid, &st, 0) < 0)
        if (errno != EINTR) return -1;
    return WIFEXITED(st) ? WEXITSTATUS(st) : -1;
}

static int have_kernel_fs(const char *fs) {
    FILE *f = fopen("/proc/filesystems", "re");
    if (!f) return 0;
    char line[128];
    int found = 0;
    while (fgets(line, sizeof(line), f)) {
        char *t = strrchr(line, '\t');
        t = t ? t + 1 : line;
        t[strcspn(t, "\n")] = 0;
        if (!strcmp(t, fs)) found = 1;
    }
    fclose(f);
    return found;
}

static int in_path(const char *tool) {
    const char *path = getenv("PATH");
    if (!path) path = "/usr/sbin:/usr/bin:/sbin:/bin";
    char buf[4096];
    snprintf(buf, sizeof(buf), "%s", path);
    for (char *save = NULL, *d = strtok_r(buf, ":", &save); d; d = strtok_r(NULL, ":", &save)) {
        char p[4200];
        snprintf(p, sizeof(p), "%s/%s", d, tool);
        if (access(p, X_OK) == 0) return 1;
    }
    return 0;
}

/* ---- partitions and filesystems ------------------------------------------------------------ */
static uint32_t le32(const uint8_t *p) { return p[0] | p[1] << 8 | p[2] << 16 | (uint32_t)p[3] << 24; }
static uint64_t le64(const uint8_t *p) { return le32(p) | (uint64_t)le32(p + 4) << 32; }

static int pread_all(int fd, void *buf, size_t n, uint64_t off) {
    return pread(fd, buf, n, (off_t)off) == (ssize_t)n ? 0 : -1;
}

static void detect_fs(int fd, uint64_t start, char *fs, size_t fslen) {
    static uint8_t b[0x10100];
    memset(b, 0, sizeof(b));
    ssize_t r = pread(fd, b, sizeof(b), (off_t)start);
    (void)r;
    const char *t = "";
    if (!memcmp(b + 3, "NTFS    ", 8)) t = "ntfs";
    else if (!memcmp(b, "XFSB", 4)) t = "xfs";
    else if (b[1024 + 0x38] == 0x53 && b[1024 + 0x39] == 0xEF) t = "ext4";
    else if (!memcmp(b + 0x10040, "_BHRfS_M", 8)) t = "btrfs";
    else if (b[510] == 0x55 && b[511] == 0xAA &&
             (!memcmp(b + 0x36, "FAT", 3) || !memcmp(b + 0x52, "FAT32   ", 8)))
        t = "vfat";
    snprintf(fs, fslen, "%s", t);
}

static void add_vol(diskset_t *s, int fd, int number, uint64_t start, uint64_t length, uint64_t size) {
    if (s->nvol >= MAX_VOLUMES || !length || start >= size || start + length > size) return;
    vol_t *v = &s->vols[s->nvol++];
    memset(v, 0, sizeof(*v));
    v->number = number;
    v->start = start;
    v->length = length;
    detect_fs(fd, start, v->fs, sizeof(v->fs));
}

static void list_volumes(diskset_t *s, int fd, uint64_t size) {
    uint8_t mbr[512];
    if (pread_all(fd, mbr, 512, 0) != 0) return;
    int sig = mbr[510] == 0x55 && mbr[511] == 0xAA;
    int protective = 0, any = 0;
    for (int i = 0; i < 4 && sig; i++) {
        if (mbr[446 + 16 * i + 4] == 0xEE) protective = 1;
        if (mbr[446 + 16 * i + 4]) any = 1;
    }
    if (sig && protective) {
        uint8_t h[512];
        if (pread_all(fd, h, 512, 512) != 0 || memcmp(h, "EFI PART", 8)) return;
        uint64_t lba = le64(h + 72);
        uint32_t n = le32(h + 80), esz = le32(h + 84);
        if (esz < 128 || n > 1024) return;
        s->gpt = 1;
        for (uint32_t i = 0; i < n; i++) {
            uint8_t e[128];
            if (pread_all(fd, e, 128, lba * 512 + (uint64_t)i * esz) != 0) return;
            static const uint8_t zero[16];
            if (!memcmp(e, zero, 16)) continue;
            uint64_t first = le64(e + 32), last = le64(e + 40);
            if (last >= first) add_vol(s, fd, (int)i + 1, first * 512, (last - first + 1) * 512, size);
        }
        return;
    }
    char fs[16];
    detect_fs(fd, 0, fs, sizeof(fs));
    if (sig && any && strcmp(fs, "vfat") && strcmp(fs, "ntfs")) {
        int logical = 5;
        for (int i = 0; i < 4; i++) {
            const uint8_t *e = mbr + 446 + 16 * i;
            uint8_t type = e[4];
            uint64_t start = (uint64_t)le32(e + 8) * 512, len = (uint64_t)le32(e + 12) * 512;
            if (!type) continue;
            if (type == 0x05 || type == 0x0F || type == 0x85) {
                uint64_t ebr = start;
                for (int hops = 0; hops < 128; hops++) {
                    uint8_t b[512];
                    if (pread_all(fd, b, 512, ebr) != 0 || b[510] != 0x55 || b[511] != 0xAA) break;
                    const uint8_t *l = b + 446, *nx = b + 462;
                    if (l[4]) add_vol(s, fd, logical++, ebr + (uint64_t)le32(l + 8) * 512,
                                      (uint64_t)le32(l + 12) * 512, size);
                    if (!nx[4]) break;
                    ebr = start + (uint64_t)le32(nx + 8) * 512;
                }
                continue;
            }
            add_vol(s, fd, i + 1, start, len, size);
        }
        return;
    }
    if (*fs) add_vol(s, fd, 0, 0, size, size); /* a filesystem spanning the whole disk */
}

/* ---- handles ------------------------------------------------------------------------------- */
static diskset_t *set_get(const void *token) {
    uintptr_t v = (uintptr_t)token;
    if ((v & 0xF) != DISKSET_TAG) return NULL;
    for (diskset_t *s = g_sets; s; s = s->next)
        if (s->id == (v >> 4)) return s;
    return NULL;
}

static vol_t *vol_get(const void *token, diskset_t **owner) {
    uintptr_t v = (uintptr_t)token;
    if ((v & 0xF) != VOLUME_TAG) return NULL;
    for (diskset_t *s = g_sets; s; s = s->next)
        for (int i = 0; i < s->nvol; i++)
            if (s->vols[i].id == (v >> 4)) {
                if (owner) *owner = s;
                return &s->vols[i];
            }
    return NULL;
}

/* ---- mounting ------------------------------------------------------------------------------- */
static void wait_loop_gone(const char *loop) {
    char p[128];
    const char *base = strrchr(loop, '/');
    snprintf(p, sizeof(p), "/sys/block/%s/loop/backing_file", base ? base + 1 : loop);
    for (int i = 0; i < 1000 && access(p, F_OK) == 0; i++) usleep(10000);
}

static VixError dismount(vol_t *v) {
    if (!v->mounted) return VIX_OK;
    char *um[] = {"umount", v->dir, NULL};
    if (run(um, NULL, 0) != 0) {
        char *lazy[] = {"umount", "--lazy", v->dir, NULL};
        if (run(lazy, NULL, 0) != 0) return VIX_E_FAIL;
    }
    char *det[] = {"losetup", "--detach", v->loop, NULL};
    run(det, NULL, 0);
    wait_loop_gone(v->loop);
    rmdir(v->dir);
    v->mounted = 0;
    return VIX_OK;
}

static VixError mount_vol(diskset_t *s, vol_t *v, char *why, size_t whylen) {
    char *argv[12];
    int k = 0;
    const char *fs = v->fs;
    if (!*fs) {
        snprintf(why, whylen, "no recognised filesystem");
        return VIX_E_NOT_SUPPORTED;
    }
    int fuse_ntfs = !strcmp(fs, "ntfs");
    int fuse_fat = !strcmp(fs, "vfat") && !have_kernel_fs("vfat");
    if (fuse_ntfs && !in_path("ntfs-3g")) {
        snprintf(why, whylen, "NTFS needs ntfs-3g");
        return VIX_E_NOT_SUPPORTED;
    }
    if (fuse_fat && !in_path("fusefat")) {
        snprintf(why, whylen, "FAT: no vfat driver in the kernel and no fusefat");
        return VIX_E_NOT_SUPPORTED;
    }
    if (!fuse_ntfs && !fuse_fat && !have_kernel_fs(fs)) {
        snprintf(why, whylen, "the kernel has no %s driver", fs);
        return VIX_E_NOT_SUPPORTED;
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(v->dir, sizeof(v->dir), "%s/vixmntapi-standin-XXXXXX", tmp && *tmp ? tmp : "/tmp");
    if (!mkdtemp(v->dir)) {
        snprintf(why, whylen, "mkdtemp: %s", strerror(errno));
        return VIX_E_FAIL;
    }
    char off[32], len[32];
    snprintf(off, sizeof(off), "%llu", (unsigned long long)v->start);
    snprintf(len, sizeof(len), "%llu", (unsigned long long)v->length);
    char *lo[] = {"losetup", "--read-only", "--find", "--show", "--offset", off,
                  "--sizelimit", len, s->image, NULL};
    if (run(lo, v->loop, sizeof(v->loop)) != 0 || strncmp(v->loop, "/dev/", 5)) {
        snprintf(why, whylen, "losetup failed");
        rmdir(v->dir);
        return VIX_E_FAIL;
    }
    if (fuse_ntfs || fuse_fat) {
        argv[k++] = fuse_ntfs ? "ntfs-3g" : "fusefat";
        argv[k++] = "-o";
        argv[k++] = "ro";
    } else {
        argv[k++] = "mount";
        argv[k++] = "-t";
        argv[k++] = (char *)fs;
        argv[k++] = "-o";
        argv[k++] = !strcmp(fs, "xfs")     ? "ro,norecovery"
                    : !strcmp(fs, "btrfs") ? "ro,nologreplay"
                    : !strcmp(fs, "vfat")  ? "ro"
                                           : "ro,noload";
    }
    argv[k++] = v->loop;
    argv[k++] = v->dir;
    argv[k] = NULL;
    if (run(argv, NULL, 0) != 0) {
        snprintf(why, whylen, "%s failed", argv[0]);
        char *det[] = {"losetup", "--detach", v->loop, NULL};
        run(det, NULL, 0);
        wait_loop_gone(v->loop);
        rmdir(v->dir);
        return VIX_E_FAIL;
    }
    v->mounted = 1;
    return VIX_OK;
}

/* ---- API ------------------------------------------------------------------------------------ */
EXPORT VixError VixMntapi_Init(uint32_t majorVersion, uint32_t minorVersion,
                               VixDiskLibGenericLogFunc *log, VixDiskLibGenericLogFunc *warnf,
                               VixDiskLibGenericLogFunc *panic, const char *libDir,
                               const char *configFile) {
    (void)log;
    (void)panic;
    (void)configFile;
    pthread_mutex_lock(&g_mu);
    int again = g_inited;
    if (!again) {
        const char *p = getenv("VDDK_STANDIN_MNTAPI_LOG");
        if (!p || !*p) p = getenv("VDDK_STANDIN_LOG");
        if (p && *p) g_logfd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        g_warn = warnf;
        g_inited = 1;
    }
    logline("Init", "major=%u minor=%u libDir=%s fuse=%d again=%d", majorVersion, minorVersion,
            libDir ? libDir : "(null)", fuse_version(), again);
    pthread_mutex_unlock(&g_mu);
    return VIX_OK;
}

EXPORT VixError VixMntapi_OpenDisks(VixDiskLibConnection connection, const char *diskNames[],
                                    size_t numberOfDisks, uint32_t openFlags,
                                    VixDiskSetHandle *handle) {
    if (!diskNames) {
        /* Real VDDK dereferences it and crashes; make the mistake impossible to miss. */
        logline("VIOLATION", "null-disk-names numberOfDisks=%zu", numberOfDisks);
        abort();
    }
    if (handle) *handle = NULL;
    pthread_mutex_lock(&g_mu);
    VixError err = VIX_OK;
    diskset_t *s = NULL;
    if (!g_inited) err = VIX_E_FAIL;
    else if (!handle || numberOfDisks != 1 || !diskNames[0]) err = VIX_E_INVALID_ARG; /* Linux: 1 */
    if (!err) {
        s = calloc(1, sizeof(*s));
        if (!s) err = VIX_E_OUT_OF_MEMORY;
    }
    if (!err) err = VixDiskLib_Open(connection, diskNames[0], openFlags, &s->disk);
    if (!err) {
        s->image = VixDiskLibStandin_ConnectionImage(connection);
        if (!s->image) s->image = strdup(diskNames[0]); /* local-file mode: the name is the file */
        int fd = open(s->image, O_RDONLY | O_CLOEXEC);
        struct stat st;
        if (fd < 0 || fstat(fd, &st) != 0) {
            err = VIX_E_FILE_NOT_FOUND;
        } else {
            list_volumes(s, fd, (uint64_t)st.st_size);
        }
        if (fd >= 0) close(fd);
        if (err) VixDiskLib_Close(s->disk);
    }
    if (!err) {
        s->id = ++g_next_id;
        for (int i = 0; i < s->nvol; i++) s->vols[i].id = ++g_next_id;
        s->next = g_sets;
        g_sets = s;
        *handle = (VixDiskSetHandle)(uintptr_t)((s->id << 4) | DISKSET_TAG);
    }
    logline("OpenDisks", "diskset=%llu name=%s n=%zu flags=%u volumes=%d err=%llu",
            s && !err ? (unsigned long long)s->id : 0ULL, diskNames[0] ? diskNames[0] : "(null)",
            numberOfDisks, openFlags, s ? s->nvol : 0, (unsigned long long)err);
    if (err && s) {
        free(s->image);
        free(s);
    }
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT VixError VixMntapi_GetDiskSetInfo(VixDiskSetHandle handle, VixDiskSetInfo **diskSetInfo) {
    pthread_mutex_lock(&g_mu);
    diskset_t *s = set_get(handle);
    VixError err = s && diskSetInfo ? VIX_OK : VIX_E_INVALID_ARG;
    if (!err) {
        *diskSetInfo = calloc(1, sizeof(VixDiskSetInfo));
        (*diskSetInfo)->openFlags = VIXDISKLIB_FLAG_OPEN_READ_ONLY;
        (*diskSetInfo)->mountPath = strdup(s->image);
    }
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT void VixMntapi_FreeDiskSetInfo(VixDiskSetInfo *info) {
    if (info) free(info->mountPath);
    free(info);
}

EXPORT VixError VixMntapi_GetVolumeHandles(VixDiskSetHandle diskSet, size_t *numberOfVolumes,
                                           VixVolumeHandle *volumeHandles[]) {
    pthread_mutex_lock(&g_mu);
    diskset_t *s = set_get(diskSet);
    VixError err = s && numberOfVolumes && volumeHandles ? VIX_OK : VIX_E_INVALID_ARG;
    if (!err) {
        VixVolumeHandle *a = calloc((size_t)s->nvol + 1, sizeof(*a));
        for (int i = 0; i < s->nvol; i++)
            a[i] = (VixVolumeHandle)(uintptr_t)((s->vols[i].id << 4) | VOLUME_TAG);
        *volumeHandles = a;
        *numberOfVolumes = (size_t)s->nvol;
    }
    logline("GetVolumeHandles", "diskset=%llu volumes=%d err=%llu",
            s ? (unsigned long long)s->id : 0ULL, s ? s->nvol : 0, (unsigned long long)err);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT void VixMntapi_FreeVolumeHandles(VixVolumeHandle *volumeHandles) {
    logline("FreeVolumeHandles", "%s", "");
    free(volumeHandles);
}

EXPORT VixError VixMntapi_GetOsInfo(VixDiskSetHandle diskSet, VixOsInfo **info) {
    (void)diskSet;
    (void)info;
    return VIX_E_NOT_SUPPORTED; /* like real VDDK for a non-Windows guest */
}

EXPORT void VixMntapi_FreeOsInfo(VixOsInfo *info) { free(info); }

EXPORT VixError VixMntapi_MountVolume(VixVolumeHandle volumeHandle, Bool readOnly) {
    pthread_mutex_lock(&g_mu);
    diskset_t *s = NULL;
    vol_t *v = vol_get(volumeHandle, &s);
    VixError err = VIX_OK;
    char why[256] = "";
    if (!v) err = VIX_E_INVALID_ARG;
    else if (!readOnly) {
        logline("VIOLATION", "mount-not-readonly volume=%llu", (unsigned long long)v->id);
        err = VIX_E_NOT_SUPPORTED;
    } else if (v->mounted) err = VIX_E_FAIL;
    else err = mount_vol(s, v, why, sizeof(why));
    if (err && *why)
        warn("VixMntapi stand-in: volume %d (%s) not mounted: %s\n", v ? v->number : 0,
             v && *v->fs ? v->fs : "unknown", why);
    logline("MountVolume", "volume=%llu number=%d fs=%s readOnly=%d loop=%s path=%s err=%llu",
            v ? (unsigned long long)v->id : 0ULL, v ? v->number : 0, v && *v->fs ? v->fs : "-",
            readOnly ? 1 : 0, v && *v->loop && !err ? v->loop : "-",
            v && !err ? v->dir : "-", (unsigned long long)err);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT VixError VixMntapi_DismountVolume(VixVolumeHandle volumeHandle, Bool force) {
    pthread_mutex_lock(&g_mu);
    vol_t *v = vol_get(volumeHandle, NULL);
    VixError err = !v ? VIX_E_INVALID_ARG : !v->mounted ? VIX_E_FAIL : dismount(v);
    logline("DismountVolume", "volume=%llu force=%d err=%llu", v ? (unsigned long long)v->id : 0ULL,
            force ? 1 : 0, (unsigned long long)err);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT VixError VixMntapi_GetVolumeInfo(VixVolumeHandle volumeHandle, VixVolumeInfo **info) {
    pthread_mutex_lock(&g_mu);
    diskset_t *s = NULL;
    vol_t *v = vol_get(volumeHandle, &s);
    VixError err = v && info ? VIX_OK : VIX_E_INVALID_ARG;
    if (!err) {
        VixVolumeInfo *vi = calloc(1, sizeof(*vi));
        vi->type = s->gpt ? VIXMNTAPI_GPT_PARTITION : VIXMNTAPI_BASIC_PARTITION;
        vi->isMounted = v->mounted ? 1 : 0;
        vi->symbolicLink = v->mounted ? strdup(v->dir) : NULL;
        *info = vi;
    }
    logline("GetVolumeInfo", "volume=%llu err=%llu", v ? (unsigned long long)v->id : 0ULL,
            (unsigned long long)err);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT void VixMntapi_FreeVolumeInfo(VixVolumeInfo *info) {
    if (info) free(info->symbolicLink);
    free(info);
}

static int close_set_locked(diskset_t *s) {
    int left = 0;
    for (int i = 0; i < s->nvol; i++)
        if (s->vols[i].mounted) {
            left++;
            dismount(&s->vols[i]);
        }
    VixDiskLib_Close(s->disk);
    for (diskset_t **pp = &g_sets; *pp; pp = &(*pp)->next)
        if (*pp == s) {
            *pp = s->next;
            break;
        }
    free(s->image);
    free(s);
    return left;
}

EXPORT VixError VixMntapi_CloseDiskSet(VixDiskSetHandle diskSet) {
    pthread_mutex_lock(&g_mu);
    diskset_t *s = set_get(diskSet);
    uint64_t id = s ? s->id : 0;
    int left = s ? close_set_locked(s) : 0;
    if (left) logline("VIOLATION", "close-with-mounted diskset=%llu mounted=%d",
                      (unsigned long long)id, left);
    logline("CloseDiskSet", "diskset=%llu mounted=%d err=%d", (unsigned long long)id, left,
            s ? 0 : VIX_E_INVALID_ARG);
    pthread_mutex_unlock(&g_mu);
    return s ? VIX_OK : VIX_E_INVALID_ARG;
}

EXPORT void VixMntapi_Exit(void) {
    pthread_mutex_lock(&g_mu);
    int sets = 0, mounted = 0;
    while (g_sets) {
        sets++;
        mounted += close_set_locked(g_sets);
    }
    if (sets) logline("VIOLATION", "exit-with-open disksets=%d mounted=%d", sets, mounted);
    logline("Exit", "inited=%d disksets=%d mounted=%d", g_inited, sets, mounted);
    if (g_logfd >= 0) close(g_logfd);
    g_logfd = -1;
    g_inited = 0;
    g_warn = NULL;
    pthread_mutex_unlock(&g_mu);
}
