/*
 * vixmntapi.c -- the ivdfs test bed's stand-in for VMware's libvixMntapi.so (Linux).
 *
 * Real ABI (vixMntapi.h), and VixMntapi's behaviour as measured with the real library (VDDK
 * 7.0.2's libvixMntapi.so.1, ../../shared/DESIGN.md):
 *  - Init takes the same configFile as VixDiskLib_InitEx and works in its `tmpDirectory`
 *    (without one: /tmp/vmware-<user>, as the real library does). An unreadable configFile
 *    fails Init with VIX_E_FILE_NOT_FOUND (the real library's reaction is unknown; stricter).
 *  - OpenDisks opens the named disk through the stand-in libvixDiskLib (so its call log shows
 *    the Open/Close) and FUSE-mounts the disk's flat image read-only at
 *    /run/vmware/fuse/<n>/flat (n: a decimal 64-bit hash of the disk; <n>.info beside it),
 *    served by a forked child of the calling process (libfuse2, session leader), as the real
 *    library does. It then lists the image's partitions (MBR with logicals, GPT; a disk
 *    without a partition table has no volume, as with the real library, even when a
 *    filesystem spans it).
 *  - MountVolume really mounts a volume read-only: a read-only loop device on the FUSE flat
 *    file (offset/sizelimit), then
 *      ext2/3/4: mount -t ext4 -o ro,noload     xfs: -o ro,norecovery    btrfs: -o ro,nologreplay
 *      ntfs: ntfs-3g -o ro                      vfat: kernel vfat if present, else fusefat -o ro,
 *    on <tmpDirectory>/<n>_<partition>, which GetVolumeInfo reports as symbolicLink. A
 *    filesystem with no driver here, or one named in VDDK_STANDIN_MNTAPI_MOUNT_FAILS (a comma
 *    list of ext4/xfs/btrfs/ntfs/vfat, or "all"), fails with 24010, the real library's answer on
 *    this kernel, after a warn-callback message worded like the real one.
 *  - CloseDiskSet unmounts the FUSE mount and fails with 24009 ("The umount command failed")
 *    when it cannot, leaving /run/vmware/fuse/<n> mounted and its server running; Exit then
 *    warns "Failed to clean up mountless disks". The real library fails so on this machine
 *    every time (its forked umount helpers crash), so that is the default here too: whoever
 *    calls VixMntapi must find and unmount those mounts itself. VDDK_STANDIN_MNTAPI_UMOUNT=works
 *    lets CloseDiskSet unmount as documented.
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
#include <pwd.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FUSE_USE_VERSION 26
#include <fuse.h> /* libfuse2's, from libfuse-dev */

#include "vixMntapi.h"

#define EXPORT __attribute__((visibility("default")))
#define DISKSET_TAG 0xA
#define VOLUME_TAG 0xB
#define MAX_VOLUMES 64
/* Where the real library FUSE-mounts the disks it opens (measured; VIX_E 24016 names it). */
#define FUSE_ROOT "/run/vmware/fuse"

/* VixMntapi's own codes (the real library's GetErrorText knows them; so does the stand-in's). */
#define VIX_E_MNTAPI_UMOUNT 24009
#define VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS 24010
#define VIX_E_MNTAPI_DAEMON 24019

_Static_assert(sizeof(VixVolumeInfo) == 32, "VixVolumeInfo layout");
_Static_assert(__builtin_offsetof(VixVolumeInfo, symbolicLink) == 8, "symbolicLink");
_Static_assert(sizeof(VixDiskSetInfo) == 16, "VixDiskSetInfo layout");

extern char **environ;

typedef struct {
    uint64_t id;
    int number;
    uint64_t start, length;
    char fs[16];
    int mounted;
    char loop[64];
    char dir[600];
} vol_t;

/* A disk's FUSE mount under FUSE_ROOT, shared by the disk sets open on it (refs). */
typedef struct fusemnt {
    struct fusemnt *next;
    uint64_t n;
    char dir[256];   /* FUSE_ROOT/<n> */
    char info[300];  /* FUSE_ROOT/<n>.info */
    pid_t server;    /* the forked child serving it */
    int refs;
} fusemnt_t;

typedef struct diskset {
    struct diskset *next;
    uint64_t id;
    VixDiskLibHandle disk;
    char *image;
    fusemnt_t *fm;
    int gpt;
    int nvol;
    vol_t vols[MAX_VOLUMES];
} diskset_t;

static pthread_mutex_t g_mu = PTHREAD_MUTEX_INITIALIZER;
static int g_inited, g_logfd = -1;
static uint64_t g_next_id;
static diskset_t *g_sets;
static VixDiskLibGenericLogFunc *g_warn, *g_info;
static fusemnt_t *g_fuse;          /* FUSE mounts this process made, incl. ones left behind */
static char g_tmpdir[512];         /* tmpDirectory from Init's configFile */
static char g_config[512];

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

static void info(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void info(const char *fmt, ...) {
    if (!g_info) return;
    va_list ap;
    va_start(ap, fmt);
    g_info(fmt, ap);
    va_end(ap);
}

/* VDDK's config file format: `key = value`, the value optionally double-quoted, # comments. */
static int config_value(const char *path, const char *key, char *out, size_t outlen) {
    FILE *f = fopen(path, "re");
    if (!f) return -1;
    char line[1024];
    int found = 0;
    while (!found && fgets(line, sizeof(line), f)) {
        char *p = line + strspn(line, " \t");
        if (*p == '#' || strncmp(p, key, strlen(key))) continue;
        p += strlen(key);
        p += strspn(p, " \t");
        if (*p != '=') continue;
        p++;
        p += strspn(p, " \t");
        p[strcspn(p, "\r\n")] = 0;
        size_t n = strlen(p);
        while (n && (p[n - 1] == ' ' || p[n - 1] == '\t')) p[--n] = 0;
        if (n >= 2 && p[0] == '"' && p[n - 1] == '"') {
            p[n - 1] = 0;
            p++;
        }
        snprintf(out, outlen, "%s", p);
        found = 1;
    }
    fclose(f);
    return found ? 0 : 1;
}

/* VDDK_STANDIN_MNTAPI_MOUNT_FAILS: "all" or a comma list of filesystem names. */
static int mount_fails(const char *fs) {
    const char *v = getenv("VDDK_STANDIN_MNTAPI_MOUNT_FAILS");
    if (!v || !*v) return 0;
    if (!strcmp(v, "all")) return 1;
    size_t n = strlen(fs);
    for (const char *p = v; *p;) {
        size_t k = strcspn(p, ",");
        if (k == n && !strncmp(p, fs, n)) return 1;
        p += k + (p[k] == ',');
    }
    return 0;
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
    /* A filesystem spanning the whole disk: the real library lists no volume for a disk without
       a partition table (measured with an empty one; that a filesystem there changes nothing
       is the stricter assumption). */
    (void)fs;
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

/* ---- the disk's FUSE mount (FUSE_ROOT/<n>/flat), as the real library makes it ------------- */
static int g_srv_fd = -1; /* the forked server's image */
static uint64_t g_srv_size;

static int srv_getattr(const char *path, struct stat *st) {
    memset(st, 0, sizeof(*st));
    if (!strcmp(path, "/")) {
        st->st_mode = S_IFDIR | 0555;
        st->st_nlink = 2;
    } else if (!strcmp(path, "/flat")) {
        st->st_mode = S_IFREG | 0400;
        st->st_nlink = 1;
        st->st_size = (off_t)g_srv_size;
    } else {
        return -ENOENT;
    }
    return 0;
}

static int srv_readdir(const char *path, void *buf, fuse_fill_dir_t fill, off_t off,
                       struct fuse_file_info *fi) {
    (void)off;
    (void)fi;
    if (strcmp(path, "/")) return -ENOTDIR;
    fill(buf, ".", NULL, 0);
    fill(buf, "..", NULL, 0);
    fill(buf, "flat", NULL, 0);
    return 0;
}

static int srv_open(const char *path, struct fuse_file_info *fi) {
    if (strcmp(path, "/flat")) return -ENOENT;
    return (fi->flags & O_ACCMODE) == O_RDONLY ? 0 : -EROFS;
}

static int srv_read(const char *path, char *buf, size_t size, off_t off,
                    struct fuse_file_info *fi) {
    (void)path;
    (void)fi;
    ssize_t r = pread(g_srv_fd, buf, size, off);
    return r < 0 ? -errno : (int)r;
}

static uint64_t fnv1a(const char *a, const char *b) {
    uint64_t h = 1469598103934665603ULL;
    for (const char *p = a; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    h = (h ^ '\n') * 1099511628211ULL;
    for (const char *p = b; *p; p++) h = (h ^ (uint8_t)*p) * 1099511628211ULL;
    return h >> 1; /* printed as a positive decimal, like the real names */
}

static int mounted_at(const char *dir) {
    FILE *f = fopen("/proc/self/mountinfo", "re");
    if (!f) return 0;
    char line[4096];
    int found = 0;
    while (!found && fgets(line, sizeof(line), f)) {
        char mp[4096];
        if (sscanf(line, "%*s %*s %*s %*s %4095s", mp) == 1 && !strcmp(mp, dir)) found = 1;
    }
    fclose(f);
    return found;
}

/* The disk's FUSE mount, made (by a forked server) if this process has none for it yet. The
   key is the disk name and the image it serves: two snapshots of one IVD (the same name, the
   IVD id) must not share one (the real library's key is not known). */
char *VixDiskLibStandin_ConnectionDiskName(VixDiskLibConnection connection);

static VixError fuse_attach(diskset_t *s, VixDiskLibConnection conn, const char *name) {
    uint64_t n = fnv1a(name, s->image);
    for (fusemnt_t *m = g_fuse; m; m = m->next)
        if (m->n == n && m->refs > 0) {
            m->refs++;
            s->fm = m;
            return VIX_OK;
        }
    fusemnt_t *m = calloc(1, sizeof(*m));
    if (!m) return VIX_E_OUT_OF_MEMORY;
    m->n = n;
    snprintf(m->dir, sizeof(m->dir), FUSE_ROOT "/%llu", (unsigned long long)n);
    snprintf(m->info, sizeof(m->info), FUSE_ROOT "/%llu.info", (unsigned long long)n);
    mkdir("/run/vmware", 0755);
    mkdir(FUSE_ROOT, 0755);
    if (mounted_at(m->dir)) { /* left by another process: the real library would fail too */
        warn("FuseMount: %s is already mounted\n", m->dir);
        free(m);
        return 24001; /* "The mountpoint is already in use" */
    }
    if (mkdir(m->dir, 0555) != 0 && errno != EEXIST) {
        free(m);
        return 24016;
    }
    FILE *inf = fopen(m->info, "we");
    if (inf) {
        /* For an IVD the real library names the disk after the connection, not after the name
           it was given: "<user>@<server>:[<datastore>] VStorageObject:<id>". */
        char *disk = VixDiskLibStandin_ConnectionDiskName(conn);
        fprintf(inf, ".encoding = \"UTF-8\"\nbackingPath = \"%s\"\ndiskName = \"%s\"\n"
                     "mountPath = \"%s\"\nrefCount = \"1\"\nprivateFlatFile = \"TRUE\"\n"
                     "isRemote = \"%s\"\nopenFlags = \"4\"\nreadOnly = \"TRUE\"\n",
                disk ? strchr(disk, '[') : s->image, disk ? disk : name, m->dir,
                disk ? "TRUE" : "FALSE");
        free(disk);
        fclose(inf);
    }
    int fd = open(s->image, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) {
        if (fd >= 0) close(fd);
        unlink(m->info);
        rmdir(m->dir);
        free(m);
        return VIX_E_FILE_NOT_FOUND;
    }
    pid_t pid = fork();
    if (pid == 0) {
        /* The server: a copy of the caller, as with the real library; only C from here on. */
        setsid();
        g_srv_fd = fd;
        g_srv_size = (uint64_t)st.st_size;
        static struct fuse_operations ops;
        ops.getattr = srv_getattr;
        ops.readdir = srv_readdir;
        ops.open = srv_open;
        ops.read = srv_read;
        char *argv[] = {"vixmntapi-standin-fuse", m->dir, "-f", "-s", "-o",
                        "ro,allow_other,fsname=/dev/fuse", NULL};
        int nul = open("/dev/null", O_RDWR);
        if (nul >= 0) {
            dup2(nul, 0);
            dup2(nul, 1);
            dup2(nul, 2);
        }
        int rc = fuse_main(6, argv, &ops, NULL);
        /* Unmounted (by CloseDiskSet or by anyone else): gone without a trace, as the real
           server leaves FUSE_ROOT. */
        unlink(m->info);
        rmdir(m->dir);
        _exit(rc == 0 ? 0 : 1);
    }
    close(fd);
    if (pid < 0) {
        unlink(m->info);
        rmdir(m->dir);
        free(m);
        return VIX_E_MNTAPI_DAEMON;
    }
    m->server = pid;
    for (int i = 0; i < 1000 && !mounted_at(m->dir); i++) {
        int st2;
        if (waitpid(pid, &st2, WNOHANG) == pid) {
            m->server = 0;
            break;
        }
        usleep(10000);
    }
    if (!m->server || !mounted_at(m->dir)) {
        if (m->server) {
            kill(m->server, SIGKILL);
            waitpid(m->server, NULL, 0);
        }
        warn("FuseMount: the fuse daemon for %s did not start\n", name);
        unlink(m->info);
        rmdir(m->dir);
        free(m);
        return VIX_E_MNTAPI_DAEMON;
    }
    info("FuseMount: Disk flat file mounted under %s\n", m->dir);
    m->refs = 1;
    m->next = g_fuse;
    g_fuse = m;
    s->fm = m;
    return VIX_OK;
}

/* Drops a disk set's reference; the last one unmounts, unless unmounting "fails" (the
   default: see the top of the file). 0, or the VixError CloseDiskSet returns. */
static VixError fuse_detach(fusemnt_t *m) {
    if (!m || --m->refs > 0) return VIX_OK;
    const char *how = getenv("VDDK_STANDIN_MNTAPI_UMOUNT");
    if (!how || strcmp(how, "works") != 0 || umount2(m->dir, 0) != 0) {
        warn("FuseMount: Failed to unmount disk %s: umount command failed\n", m->dir);
        return VIX_E_MNTAPI_UMOUNT;
    }
    waitpid(m->server, NULL, 0); /* it removes the directory and the .info as it ends */
    m->server = 0;
    return VIX_OK;
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
        return VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS;
    }
    int fuse_ntfs = !strcmp(fs, "ntfs");
    int fuse_fat = !strcmp(fs, "vfat") && !have_kernel_fs("vfat");
    if (fuse_ntfs && !in_path("ntfs-3g")) {
        snprintf(why, whylen, "NTFS needs ntfs-3g");
        return VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS;
    }
    if (fuse_fat && !in_path("fusefat")) {
        snprintf(why, whylen, "FAT: no vfat driver in the kernel and no fusefat");
        return VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS;
    }
    if (!fuse_ntfs && !fuse_fat && !have_kernel_fs(fs)) {
        snprintf(why, whylen, "the kernel has no %s driver", fs);
        return VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS;
    }
    if (mount_fails(fs)) {
        snprintf(why, whylen, "VDDK_STANDIN_MNTAPI_MOUNT_FAILS");
        return VIX_E_MNTAPI_NO_MOUNTABLE_PARTITIONS;
    }
    /* Where the real library mounts a volume: <tmpDirectory>/<n>_<partition>. */
    mkdir(g_tmpdir, 0700);
    snprintf(v->dir, sizeof(v->dir), "%s/%llu_%d", g_tmpdir, (unsigned long long)s->fm->n,
             v->number);
    if (mkdir(v->dir, 0700) != 0 && errno != EEXIST) {
        snprintf(why, whylen, "mkdir %s: %s", v->dir, strerror(errno));
        return VIX_E_FAIL;
    }
    char off[32], len[32], flat[300];
    snprintf(off, sizeof(off), "%llu", (unsigned long long)v->start);
    snprintf(len, sizeof(len), "%llu", (unsigned long long)v->length);
    snprintf(flat, sizeof(flat), "%s/flat", s->fm->dir);
    char *lo[] = {"losetup", "--read-only", "--find", "--show", "--offset", off,
                  "--sizelimit", len, flat, NULL};
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
    (void)panic;
    pthread_mutex_lock(&g_mu);
    int again = g_inited;
    VixError err = VIX_OK;
    if (!again) {
        const char *p = getenv("VDDK_STANDIN_MNTAPI_LOG");
        if (!p || !*p) p = getenv("VDDK_STANDIN_LOG");
        if (p && *p) g_logfd = open(p, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
        struct passwd *pw = getpwuid(geteuid());
        snprintf(g_tmpdir, sizeof(g_tmpdir), "/tmp/vmware-%s", pw ? pw->pw_name : "root");
        snprintf(g_config, sizeof(g_config), "%s", configFile ? configFile : "(null)");
        if (configFile) {
            char t[512];
            int r = config_value(configFile, "tmpDirectory", t, sizeof(t));
            if (r < 0) err = VIX_E_FILE_NOT_FOUND;
            else if (r == 0 && *t) snprintf(g_tmpdir, sizeof(g_tmpdir), "%s", t);
        }
        if (!err) {
            g_warn = warnf;
            g_info = log;
            g_inited = 1;
            info("VixMntapi: Using tempDirectory %s.\n", g_tmpdir);
        }
    }
    logline("Init", "major=%u minor=%u libDir=%s configFile=%s tmpDirectory=%s fuse=%d again=%d "
            "err=%llu", majorVersion, minorVersion, libDir ? libDir : "(null)", g_config,
            g_tmpdir, fuse_version(), again, (unsigned long long)err);
    if (err && g_logfd >= 0) {
        close(g_logfd);
        g_logfd = -1;
    }
    pthread_mutex_unlock(&g_mu);
    return err;
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
        if (!err) err = fuse_attach(s, connection, diskNames[0]);
        if (err) VixDiskLib_Close(s->disk);
        /* VDDK_STANDIN_MNTAPI_HOLD_OPEN=FILE: with the disk's FUSE mount made, log `Hold` and
           wait until FILE exists, so that a test can kill the caller in the middle of
           OpenDisks. */
        const char *hold = getenv("VDDK_STANDIN_MNTAPI_HOLD_OPEN");
        if (!err && hold && *hold) {
            logline("Hold", "call=OpenDisks fuse=%s", s->fm->dir);
            while (access(hold, F_OK) != 0) usleep(10000);
        }
    }
    if (!err) {
        s->id = ++g_next_id;
        for (int i = 0; i < s->nvol; i++) s->vols[i].id = ++g_next_id;
        s->next = g_sets;
        g_sets = s;
        *handle = (VixDiskSetHandle)(uintptr_t)((s->id << 4) | DISKSET_TAG);
    }
    logline("OpenDisks", "diskset=%llu name=%s n=%zu flags=%u volumes=%d fuse=%s err=%llu",
            s && !err ? (unsigned long long)s->id : 0ULL, diskNames[0] ? diskNames[0] : "(null)",
            numberOfDisks, openFlags, s ? s->nvol : 0, s && s->fm ? s->fm->dir : "-",
            (unsigned long long)err);
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
        (*diskSetInfo)->mountPath = strdup(s->fm->dir);
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
        warn("VixMntapi: VixMntapi_MountVolume: Failed to mount partition %d of disk on '%s': "
             "Error %llu (%s)\n", v ? v->number : 0, v ? v->dir : "-", (unsigned long long)err,
             why);
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

/* Closes a disk set; `*err` gets what CloseDiskSet returns (its FUSE mount's fate). */
static int close_set_locked(diskset_t *s, VixError *err) {
    int left = 0;
    for (int i = 0; i < s->nvol; i++)
        if (s->vols[i].mounted) {
            left++;
            dismount(&s->vols[i]);
        }
    VixDiskLib_Close(s->disk);
    VixError e = fuse_detach(s->fm);
    if (e)
        warn("VixMntapi: VixMntapi_CloseDiskSet: Error unmounting disk '%s': Error %llu (The "
             "umount command failed)\n", s->image, (unsigned long long)e);
    if (err) *err = e;
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
    VixError err = s ? VIX_OK : VIX_E_INVALID_ARG;
    int left = s ? close_set_locked(s, &err) : 0;
    if (left) logline("VIOLATION", "close-with-mounted diskset=%llu mounted=%d",
                      (unsigned long long)id, left);
    logline("CloseDiskSet", "diskset=%llu mounted=%d err=%llu", (unsigned long long)id, left,
            (unsigned long long)err);
    pthread_mutex_unlock(&g_mu);
    return err;
}

EXPORT void VixMntapi_Exit(void) {
    pthread_mutex_lock(&g_mu);
    int sets = 0, mounted = 0, fuse_left = 0;
    while (g_sets) {
        sets++;
        mounted += close_set_locked(g_sets, NULL);
    }
    if (sets) logline("VIOLATION", "exit-with-open disksets=%d mounted=%d", sets, mounted);
    /* Like the real library: what CloseDiskSet could not unmount stays mounted, served. */
    for (fusemnt_t *m = g_fuse; m; m = m->next)
        if (m->server && mounted_at(m->dir)) fuse_left++;
    if (fuse_left)
        warn("VixMntapi: VixMntapi_Exit: Failed to clean up mountless disks: FUSE error 19 "
             "(Another process is performing an operation on this mounted virtual disk)\n");
    logline("Exit", "inited=%d disksets=%d mounted=%d fuse_left=%d", g_inited, sets, mounted,
            fuse_left);
    if (g_logfd >= 0) close(g_logfd);
    g_logfd = -1;
    g_inited = 0;
    g_warn = g_info = NULL;
    pthread_mutex_unlock(&g_mu);
}
