/*
 * mkvmdk.c -- writes the real-VDDK tier's test images with VMware's own library.
 *
 *   mkvmdk base  OUT.vmdk RAW              a monolithic sparse disk holding RAW's bytes
 *   mkvmdk child PARENT.vmdk OUT.vmdk RAW  a child link of PARENT whose chain holds RAW's bytes
 *
 * In VDDK's local-file mode (no server): VixDiskLib_Create or VixDiskLib_CreateChild, then
 * VixDiskLib_Write of each grain (64 KiB, the sparse format's default) that differs from what
 * the chain already reads there; in a base disk, all-zero grains are left unwritten (holes).
 * The disk's capacity is RAW's size in sectors (RAW must be a whole number of sectors). After
 * writing, the chain is opened read-only and read back in full against RAW; any difference
 * fails the run. On success one JSON line goes to stdout:
 *   {"capacity": <sectors>, "links": <numLinks>, "grain": 128, "written": [<grain index>...]}
 *
 * Run with the VDDK's lib64 on LD_LIBRARY_PATH (VDDK finds its bundled libraries only so).
 * VDDK's messages go to stderr when MKVMDK_VERBOSE is set; its temporary files go to a private
 * directory removed at exit.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vixDiskLib.h"

#define GRAIN_SECTORS 128ULL
#define GRAIN (GRAIN_SECTORS * VIXDISKLIB_SECTOR_SIZE)
#define VERIFY_SECTORS 2048ULL

static int g_verbose;
static char g_tmp[] = "/tmp/mkvmdk-XXXXXX";

static void msg_log(const char *fmt, va_list args) {
    if (g_verbose) vfprintf(stderr, fmt, args);
}

static void msg_warn(const char *fmt, va_list args) {
    /* Local-file mode never needs the vSphere plugin: its load failure is not news. */
    char buf[1024];
    va_list copy;
    va_copy(copy, args);
    vsnprintf(buf, sizeof(buf), fmt, copy);
    va_end(copy);
    if (g_verbose || !strstr(buf, "libvddkVimAccess.so")) fprintf(stderr, "VDDK: %s", buf);
}

static void msg_panic(const char *fmt, va_list args) {
    fprintf(stderr, "VDDK panic: ");
    vfprintf(stderr, fmt, args);
    abort();
}

static int rm_entry(const char *path, const struct stat *st, int flag, struct FTW *ftw) {
    (void)st, (void)flag, (void)ftw;
    return remove(path);
}

static void cleanup_tmp(void) { nftw(g_tmp, rm_entry, 16, FTW_DEPTH | FTW_PHYS); }

static void die(const char *fmt, ...) __attribute__((noreturn, format(printf, 1, 2)));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "mkvmdk: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void check(VixError err, const char *what, const char *path) {
    if (err == VIX_OK) return;
    char *text = VixDiskLib_GetErrorText(err, NULL);
    fprintf(stderr, "mkvmdk: %s %s: error %llu (%s)\n", what, path, (unsigned long long)err,
            text ? text : "?");
    VixDiskLib_FreeErrorText(text);
    exit(1);
}

static int all_zero(const unsigned char *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (b[i]) return 0;
    return 1;
}

static void pread_full(int fd, unsigned char *buf, size_t n, off_t off, const char *path) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = pread(fd, buf + got, n - got, off + (off_t)got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) die("cannot read %s: %s", path, r < 0 ? strerror(errno) : "short file");
        got += (size_t)r;
    }
}

/* Writes every grain of `raw` that differs from what `h` reads there (a base disk reads zeros
   everywhere: only grains holding data are written). Returns how many, indexes in `written`. */
static size_t write_grains(VixDiskLibHandle h, int base, int fd, const char *raw,
                           uint64 capacity, size_t *written) {
    static unsigned char want[GRAIN], have[GRAIN];
    size_t count = 0;
    uint64 grains = (capacity + GRAIN_SECTORS - 1) / GRAIN_SECTORS;
    for (uint64 g = 0; g < grains; g++) {
        uint64 start = g * GRAIN_SECTORS;
        uint64 n = capacity - start < GRAIN_SECTORS ? capacity - start : GRAIN_SECTORS;
        size_t len = (size_t)(n * VIXDISKLIB_SECTOR_SIZE);
        if (base) {
            /* Skip the file's holes without reading them. */
            off_t d = lseek(fd, (off_t)(start * VIXDISKLIB_SECTOR_SIZE), SEEK_DATA);
            if (d < 0) break; /* ENXIO: no data from here on */
            uint64 next = (uint64)d / GRAIN;
            if (next > g) {
                g = next - 1;
                continue;
            }
        }
        pread_full(fd, want, len, (off_t)(start * VIXDISKLIB_SECTOR_SIZE), raw);
        if (base) {
            if (all_zero(want, len)) continue;
        } else {
            check(VixDiskLib_Read(h, start, n, have), "read", raw);
            if (!memcmp(want, have, len)) continue;
        }
        check(VixDiskLib_Write(h, start, n, want), "write", raw);
        written[count++] = (size_t)g;
    }
    return count;
}

static void verify(VixDiskLibConnection conn, const char *vmdk, int fd, const char *raw,
                   uint64 capacity, int *links) {
    static unsigned char want[VERIFY_SECTORS * VIXDISKLIB_SECTOR_SIZE];
    static unsigned char have[VERIFY_SECTORS * VIXDISKLIB_SECTOR_SIZE];
    VixDiskLibHandle h;
    check(VixDiskLib_Open(conn, vmdk, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h), "open", vmdk);
    VixDiskLibInfo *info;
    check(VixDiskLib_GetInfo(h, &info), "GetInfo", vmdk);
    if (info->capacity != capacity)
        die("%s: capacity %llu, want %llu", vmdk, (unsigned long long)info->capacity,
            (unsigned long long)capacity);
    *links = info->numLinks;
    VixDiskLib_FreeInfo(info);
    for (uint64 s = 0; s < capacity; s += VERIFY_SECTORS) {
        uint64 n = capacity - s < VERIFY_SECTORS ? capacity - s : VERIFY_SECTORS;
        size_t len = (size_t)(n * VIXDISKLIB_SECTOR_SIZE);
        check(VixDiskLib_Read(h, s, n, have), "read back", vmdk);
        /* A hole of RAW reads as zeros: compared without copying it (the disks of tens of GiB
           that QueryAllocatedBlocks' limits need are nearly all hole). */
        off_t off = (off_t)(s * VIXDISKLIB_SECTOR_SIZE);
        off_t data = lseek(fd, off, SEEK_DATA);
        if (data >= 0 && data < off + (off_t)len)
            pread_full(fd, want, len, off, raw);
        else
            memset(want, 0, len);
        if (memcmp(want, have, len)) die("%s reads back differently from %s at sector %llu",
                                         vmdk, raw, (unsigned long long)s);
    }
    check(VixDiskLib_Close(h), "close", vmdk);
}

int main(int argc, char **argv) {
    int base = argc == 4 && !strcmp(argv[1], "base");
    if (!base && !(argc == 5 && !strcmp(argv[1], "child")))
        die("usage: mkvmdk base OUT.vmdk RAW | mkvmdk child PARENT.vmdk OUT.vmdk RAW");
    const char *parent = base ? NULL : argv[2];
    const char *out = argv[base ? 2 : 3];
    const char *raw = argv[base ? 3 : 4];
    g_verbose = getenv("MKVMDK_VERBOSE") != NULL;

    int fd = open(raw, O_RDONLY | O_CLOEXEC);
    struct stat st;
    if (fd < 0 || fstat(fd, &st) != 0) die("cannot open %s: %s", raw, strerror(errno));
    if (st.st_size <= 0 || st.st_size % VIXDISKLIB_SECTOR_SIZE)
        die("%s: size %lld is not a whole number of sectors", raw, (long long)st.st_size);
    uint64 capacity = (uint64)st.st_size / VIXDISKLIB_SECTOR_SIZE;

    /* VDDK's temporary files (logs, locks) in a directory of our own. */
    if (!mkdtemp(g_tmp)) die("mkdtemp: %s", strerror(errno));
    atexit(cleanup_tmp);
    char conf[sizeof(g_tmp) + 32];
    snprintf(conf, sizeof(conf), "%s/vixDiskLib.conf", g_tmp);
    FILE *cf = fopen(conf, "w");
    if (!cf || fprintf(cf, "tmpDirectory = \"%s\"\n", g_tmp) < 0 || fclose(cf) != 0)
        die("cannot write %s", conf);

    /* 6.7: every VDDK that can do what ivdfs needs. */
    check(VixDiskLib_InitEx(6, 7, msg_log, msg_warn, msg_panic, NULL, conf), "InitEx", conf);
    VixDiskLibConnectParams *params = VixDiskLib_AllocateConnectParams();
    VixDiskLibConnection conn;
    check(VixDiskLib_ConnectEx(params, 0, NULL, NULL, &conn), "ConnectEx", "(local)");

    VixDiskLibHandle h;
    if (base) {
        VixDiskLibCreateParams cp = {
            .diskType = VIXDISKLIB_DISK_MONOLITHIC_SPARSE,
            .adapterType = VIXDISKLIB_ADAPTER_SCSI_LSILOGIC,
            .hwVersion = VIXDISKLIB_HWVERSION_WORKSTATION_5,
            .capacity = capacity,
        };
        check(VixDiskLib_Create(conn, out, &cp, NULL, NULL), "create", out);
    } else {
        /* The parent is opened read-only: a writable open would change its content ID and
           break every child already made from it. */
        check(VixDiskLib_Open(conn, parent, VIXDISKLIB_FLAG_OPEN_READ_ONLY, &h), "open", parent);
        VixDiskLibInfo *info;
        check(VixDiskLib_GetInfo(h, &info), "GetInfo", parent);
        if (info->capacity != capacity)
            die("%s has %llu sectors, %s %llu", parent, (unsigned long long)info->capacity, raw,
                (unsigned long long)capacity);
        VixDiskLib_FreeInfo(info);
        check(VixDiskLib_CreateChild(h, out, VIXDISKLIB_DISK_MONOLITHIC_SPARSE, NULL, NULL),
              "create child", out);
        check(VixDiskLib_Close(h), "close", parent);
    }
    size_t *written = calloc((size_t)((capacity + GRAIN_SECTORS - 1) / GRAIN_SECTORS) + 1,
                             sizeof(*written));
    if (!written) die("out of memory");
    check(VixDiskLib_Open(conn, out, 0, &h), "open", out);
    size_t count = write_grains(h, base, fd, raw, capacity, written);
    check(VixDiskLib_Close(h), "close", out);
    int links = 0;
    verify(conn, out, fd, raw, capacity, &links);
    check(VixDiskLib_Disconnect(conn), "disconnect", "(local)");
    VixDiskLib_FreeConnectParams(params);
    VixDiskLib_Exit();

    printf("{\"capacity\": %llu, \"links\": %d, \"grain\": %llu, \"written\": [",
           (unsigned long long)capacity, links, GRAIN_SECTORS);
    for (size_t i = 0; i < count; i++) printf("%s%zu", i ? ", " : "", written[i]);
    printf("]}\n");
    free(written);
    close(fd);
    return 0;
}
