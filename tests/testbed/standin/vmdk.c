/*
 * vmdk.c -- the stand-in VDDK's reader of VMDK chains, for VDDK's local-file mode.
 *
 * Written from VMware's "Virtual Disk Format 1.1" specification: text descriptors (CID,
 * parentCID, createType, parentFileNameHint, extent lines), hosted sparse extents (header,
 * grain directory and tables, grains) and flat extents; a chain through parentFileNameHint. The
 * rules below follow what the real VDDK 7.0.2 does in its local-file mode, measured on files
 * it wrote and on mutations of them (README.md lists the measurements). Where the real library
 * is more lenient than the specification (a descriptor size of "2x48", a zero-sized extent),
 * this reader is the stricter one, and says so where it decides.
 *
 * Nothing here writes: every file is opened O_RDONLY | O_CLOEXEC. The <link>.lck directories
 * real VDDK makes beside each link it opens (when the filesystem lets it) are made by
 * vixdisklib.c, from vmdk_link_path.
 *
 * Errors are the VixErrors real VDDK gives: 16063 for a file that is not a virtual disk,
 * 16006 (needs repair) for an unclean shutdown or a bad grain size, 16011 for an unknown
 * sparse version, 16012 for a parent that cannot be opened, 16008 for a parentCID that is not
 * the parent's CID, 16067 for a parent of another capacity, 4 for a missing extent file, 1
 * (VIX_E_FAIL) for metadata or grains beyond the end of a file, 13 for a NOACCESS extent. What
 * the stand-in cannot read (compressed grains, COWD/vmfsSparse and SESparse extents, raw device
 * mappings) is 16013.
 *
 * Concurrency: a disk's grain tables are loaded on first use under a per-extent mutex, so reads
 * and queries of one disk may run on several threads; open and close are single-threaded.
 */
#define _GNU_SOURCE
#include "vmdk.h"

#include <ctype.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/stat.h>
#include <unistd.h>

#define SECTOR 512ULL
#define SPARSE_MAGIC 0x564d444bU /* "KDMV": hosted sparse extent */
#define COWD_MAGIC 0x44574f43U   /* "COWD": ESX vmfsSparse extent */
#define SESPARSE_MAGIC 0x00000000cafebabeULL
#define GTES_PER_GT 512U
#define MAX_DESCRIPTOR (1U << 20) /* a text file larger than this is no descriptor */
#define PROBE_BYTES 4096U
#define MAX_LINKS 256             /* ESXi allows 32 snapshots; a longer chain is a loop */
#define MAX_EXTENTS 4096
#define MAX_GRAIN (1ULL << 20)    /* sectors (512 MiB); guards the arithmetic */
/* VMware's largest disk is 62 TB (about 2^37 sectors); anything past 2^40 sectors (512 TiB) is
   refused as not a disk (assumed: what VDDK does with such a descriptor is not known). */
#define MAX_CAPACITY (1ULL << 40)

enum { EXT_FLAT, EXT_SPARSE, EXT_ZERO };
enum { ACC_RW, ACC_RDONLY, ACC_NOACCESS };

typedef struct {
    int kind, access;
    uint64_t start, sectors; /* where the extent lies in the link */
    int fd;                  /* -1 for ZERO */
    uint64_t offset;         /* FLAT: first sector of the extent in its file */
    /* SPARSE */
    uint64_t grain;          /* sectors per grain */
    uint64_t gd;             /* sector of the grain directory */
    uint32_t ngts;           /* grain tables this extent needs */
    uint32_t *gd_entries;    /* sector of each grain table (0: none) */
    uint32_t **gts;          /* loaded on first use */
    pthread_mutex_t mu;
} extent_t;

typedef struct {
    char *path;
    uint32_t cid, parent_cid;
    char *hint;
    uint64_t capacity;
    extent_t *ext;
    int next;
    dev_t dev;
    ino_t ino;
} link_t;

struct vmdk_disk {
    link_t *links; /* links[0] is the file Open named, the last the base */
    int nlinks;
};

/* ---- small helpers ------------------------------------------------------------------- */
static void say(char *why, size_t len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));
static void say(char *why, size_t len, const char *fmt, ...) {
    if (!why || !len) return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, len, fmt, ap);
    va_end(ap);
}

static uint32_t le32(const uint8_t *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const uint8_t *p) { return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32; }

static int pread_all(int fd, void *buf, size_t len, uint64_t off) {
    uint8_t *b = buf;
    if (off > (uint64_t)INT64_MAX || len > (uint64_t)INT64_MAX - off) return -1;
    while (len) {
        ssize_t k = pread(fd, b, len, (off_t)off);
        if (k < 0 && errno == EINTR) continue;
        if (k <= 0) return -1;
        b += k;
        len -= (size_t)k;
        off += (uint64_t)k;
    }
    return 0;
}

static VixError open_error(int e) {
    return (e == ENOENT || e == ENOTDIR) ? VIX_E_FILE_NOT_FOUND
           : (e == EACCES || e == EPERM) ? VIX_E_FILE_ACCESS_ERROR
                                        : VIX_E_FILE_ERROR;
}

/* The size in bytes of a regular file or block device; -1 for anything else. */
static int64_t file_size(int fd, struct stat *st) {
    if (fstat(fd, st) != 0) return -1;
    if (S_ISREG(st->st_mode)) return st->st_size;
    if (S_ISBLK(st->st_mode)) {
        off_t end = lseek(fd, 0, SEEK_END);
        return end < 0 ? -1 : end;
    }
    return -1;
}

/* `rel` resolved against the directory of `base` (absolute paths stay as they are). */
static char *resolve(const char *base, const char *rel) {
    if (rel[0] == '/') return strdup(rel);
    const char *slash = strrchr(base, '/');
    char *out = NULL;
    if (!slash) return strdup(rel);
    if (asprintf(&out, "%.*s/%s", (int)(slash - base), base, rel) < 0) return NULL;
    return out;
}

/* ---- error texts --------------------------------------------------------------------- */
const char *vmdk_error_text(unsigned code) {
    static const struct {
        unsigned code;
        const char *text;
    } k[] = {
        {VIX_E_DISK_NEEDSREPAIR, "The specified virtual disk needs repair"},
        {VIX_E_DISK_CID_MISMATCH, "The parent virtual disk has been modified since the child was "
                                  "created. Parent virtual disk's content ID does not match with "
                                  "the parent content ID in the child"},
        {VIX_E_DISK_UNSUPPORTEDDISKVERSION,
         "The version of the virtual disk is newer than the version supported by this program"},
        {VIX_E_DISK_OPENPARENT, "The parent of this virtual disk could not be opened"},
        {VIX_E_DISK_NOTSUPPORTED, "The specified feature is not supported by this version"},
        {VIX_E_DISK_INVALIDDISK, "The specified file is not a virtual disk"},
        {VIX_E_DISK_CAPACITY_MISMATCH,
         "The parent virtual disk's capacity is not the same as child's capacity"},
    };
    for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++)
        if (k[i].code == code) return k[i].text;
    return NULL;
}

/* ---- probe ----------------------------------------------------------------------------- */
int vmdk_probe(int fd) {
    uint8_t head[PROBE_BYTES];
    ssize_t k = pread(fd, head, sizeof(head), 0);
    if (k < 4) return 0;
    uint32_t magic = le32(head);
    if (magic == SPARSE_MAGIC || magic == COWD_MAGIC) return 1;
    if (k >= 8 && le64(head) == SESPARSE_MAGIC) return 1;
    struct stat st;
    if (fstat(fd, &st) != 0 || !S_ISREG(st.st_mode) || (uint64_t)st.st_size > MAX_DESCRIPTOR)
        return 0;
    /* A text descriptor: no NUL in its head, and the keyword every descriptor has. Real VDDK
       also reads a descriptor without the "# Disk DescriptorFile" line, so that line is not
       required; a raw image is never taken for one unless its first 4 KiB are text that
       names a createType. */
    if (memchr(head, 0, (size_t)k)) return 0;
    return memmem(head, (size_t)k, "createType", 10) != NULL ||
           memmem(head, (size_t)k, "# Disk DescriptorFile", 21) != NULL;
}

/* ---- descriptor ---------------------------------------------------------------------- */
typedef struct {
    int access, type;
    uint64_t sectors, offset;
    char *file;
} ext_spec_t;

enum { T_FLAT, T_VMFS, T_SPARSE, T_VMFSSPARSE, T_SESPARSE, T_ZERO, T_UNSUPPORTED };

typedef struct {
    int has_cid, has_parent_cid;
    uint32_t cid, parent_cid;
    char *create_type, *hint;
    ext_spec_t *ext;
    int next;
    char **keys;
    int nkeys;
} desc_t;

static void desc_free(desc_t *d) {
    for (int i = 0; i < d->next; i++) free(d->ext[i].file);
    for (int i = 0; i < d->nkeys; i++) free(d->keys[i]);
    free(d->ext);
    free(d->keys);
    free(d->create_type);
    free(d->hint);
    memset(d, 0, sizeof(*d));
}

static char *trim(char *s) {
    while (*s && isspace((unsigned char)*s)) s++;
    char *e = s + strlen(s);
    while (e > s && isspace((unsigned char)e[-1])) *--e = 0;
    return s;
}

/* A decimal number, all of `s`, no sign. */
static int parse_u64(const char *s, uint64_t *out) {
    if (!*s || !isdigit((unsigned char)*s)) return -1;
    errno = 0;
    char *end;
    unsigned long long v = strtoull(s, &end, 10);
    if (errno || *end) return -1;
    *out = v;
    return 0;
}

/* A CID: one to eight hex digits. */
static int parse_cid(const char *s, uint32_t *out) {
    size_t n = strlen(s);
    if (n == 0 || n > 8) return -1;
    for (size_t i = 0; i < n; i++)
        if (!isxdigit((unsigned char)s[i])) return -1;
    *out = (uint32_t)strtoul(s, NULL, 16);
    return 0;
}

/* Next whitespace-separated token, or a double-quoted string (quotes removed). */
static char *token(char **p, int *quoted) {
    char *s = *p;
    while (*s && isspace((unsigned char)*s)) s++;
    if (!*s) return NULL;
    *quoted = *s == '"';
    char *t;
    if (*quoted) {
        t = ++s;
        char *q = strchr(s, '"');
        if (!q) return NULL;
        *q = 0;
        s = q + 1;
    } else {
        t = s;
        while (*s && !isspace((unsigned char)*s)) s++;
        if (*s) *s++ = 0;
    }
    *p = s;
    return t;
}

static int extent_type(const char *t) {
    static const struct {
        const char *name;
        int type;
    } k[] = {{"FLAT", T_FLAT},          {"VMFS", T_VMFS},         {"SPARSE", T_SPARSE},
             {"VMFSSPARSE", T_VMFSSPARSE}, {"SESPARSE", T_SESPARSE}, {"ZERO", T_ZERO},
             {"VMFSRDM", T_UNSUPPORTED}, {"VMFSRAW", T_UNSUPPORTED}, {"VSANSPARSE", T_UNSUPPORTED}};
    for (size_t i = 0; i < sizeof(k) / sizeof(k[0]); i++)
        if (!strcasecmp(t, k[i].name)) return k[i].type;
    return -1;
}

/* "RW 131072 SPARSE "x.vmdk"" and friends; 0 when it is not an extent line at all. */
static int parse_extent(char *line, desc_t *d, VixError *err, char *why, size_t whylen) {
    size_t w = strcspn(line, " \t");
    int access = w == 2 && !strncasecmp(line, "RW", 2)       ? ACC_RW
                 : w == 6 && !strncasecmp(line, "RDONLY", 6)   ? ACC_RDONLY
                 : w == 8 && !strncasecmp(line, "NOACCESS", 8) ? ACC_NOACCESS
                                                               : -1;
    if (access < 0 || !line[w]) return 0;
    char *p = line + w;
    int q;
    ext_spec_t e = {.access = access};
    char *size = token(&p, &q), *type = size ? token(&p, &q) : NULL;
    /* Real VDDK reads "2x48" as 2 and a size of 0 as the whole file; the stand-in refuses
       both (the stricter reading). */
    if (!type || parse_u64(size, &e.sectors) || e.sectors == 0 || e.sectors > MAX_CAPACITY ||
        (e.type = extent_type(type)) < 0) {
        say(why, whylen, "bad extent line");
        *err = VIX_E_DISK_INVALIDDISK;
        return -1;
    }
    if (e.type != T_ZERO) {
        char *file = token(&p, &q);
        char *off = file ? token(&p, &q) : NULL;
        /* Measured: FLAT needs its offset, VMFS defaults to 0, the others take none. */
        if (!file || !*file || (!off && e.type == T_FLAT) ||
            (off && (parse_u64(off, &e.offset) || (e.type != T_FLAT && e.type != T_VMFS)))) {
            say(why, whylen, "bad extent line");
            *err = VIX_E_DISK_INVALIDDISK;
            return -1;
        }
        e.file = strdup(file);
    }
    if (trim(p)[0] || d->next >= MAX_EXTENTS) {
        free(e.file);
        say(why, whylen, "bad extent line");
        *err = VIX_E_DISK_INVALIDDISK;
        return -1;
    }
    ext_spec_t *n = realloc(d->ext, (size_t)(d->next + 1) * sizeof(*n));
    if (!n) {
        free(e.file);
        *err = VIX_E_OUT_OF_MEMORY;
        return -1;
    }
    d->ext = n;
    d->ext[d->next++] = e;
    return 1;
}

/* Parses descriptor text (modified in place). Unknown keys are ignored, but a line that is
   neither a comment, an extent nor "key = value", a duplicate key, an unbalanced quote or a
   CID that is not hex makes the file "not a virtual disk", as with real VDDK. */
static VixError parse_descriptor(char *text, desc_t *d, char *why, size_t whylen) {
    VixError err = VIX_OK;
    memset(d, 0, sizeof(*d));
    char *save = NULL;
    for (char *line = strtok_r(text, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        line = trim(line);
        if (!*line || *line == '#') continue;
        int r = parse_extent(line, d, &err, why, whylen);
        if (r < 0) goto bad;
        if (r > 0) continue;
        char *eq = strchr(line, '=');
        if (!eq) {
            say(why, whylen, "descriptor line is neither a setting nor an extent");
            goto invalid;
        }
        *eq = 0;
        char *key = trim(line), *val = trim(eq + 1);
        if (!*key || strpbrk(key, " \t\"")) {
            say(why, whylen, "bad descriptor key");
            goto invalid;
        }
        size_t vn = strlen(val);
        if (vn && val[0] == '"') {
            if (vn < 2 || val[vn - 1] != '"' || memchr(val + 1, '"', vn - 2)) {
                say(why, whylen, "unbalanced quotes in %s", key);
                goto invalid;
            }
            val[vn - 1] = 0;
            val++;
        }
        for (int i = 0; i < d->nkeys; i++)
            if (!strcmp(d->keys[i], key)) {
                say(why, whylen, "%s given twice", key);
                goto invalid;
            }
        char **nk = realloc(d->keys, (size_t)(d->nkeys + 1) * sizeof(*nk));
        if (!nk) {
            err = VIX_E_OUT_OF_MEMORY;
            goto bad;
        }
        d->keys = nk;
        if (!(d->keys[d->nkeys] = strdup(key))) {
            err = VIX_E_OUT_OF_MEMORY;
            goto bad;
        }
        d->nkeys++;
        if (!strcmp(key, "CID")) {
            if (parse_cid(val, &d->cid)) goto badcid;
            d->has_cid = 1;
        } else if (!strcmp(key, "parentCID")) {
            if (parse_cid(val, &d->parent_cid)) goto badcid;
            d->has_parent_cid = 1;
        } else if (!strcmp(key, "createType")) {
            d->create_type = strdup(val);
        } else if (!strcmp(key, "parentFileNameHint")) {
            d->hint = *val ? strdup(val) : NULL;
        }
    }
    if (!d->has_cid || !d->create_type || d->next == 0) {
        /* Real VDDK needs the extents and createType; without CID it failed the parent check
           of a child. The stand-in requires CID of every link (stricter). */
        say(why, whylen, "descriptor without %s",
            !d->has_cid ? "CID" : !d->create_type ? "createType" : "extents");
        goto invalid;
    }
    if (!d->has_parent_cid) d->parent_cid = 0xffffffffU;
    return VIX_OK;
badcid:
    say(why, whylen, "CID is not hex");
invalid:
    err = VIX_E_DISK_INVALIDDISK;
bad:
    desc_free(d);
    return err;
}

/* ---- extents ------------------------------------------------------------------------- */
static void extent_free(extent_t *e) {
    if (e->fd >= 0) close(e->fd);
    if (e->gts) {
        for (uint32_t i = 0; i < e->ngts; i++) free(e->gts[i]);
        free(e->gts);
        pthread_mutex_destroy(&e->mu);
    }
    free(e->gd_entries);
}

static void link_free(link_t *l) {
    for (int i = 0; i < l->next; i++) extent_free(&l->ext[i]);
    free(l->ext);
    free(l->path);
    free(l->hint);
    memset(l, 0, sizeof(*l));
}

/* The hosted sparse header of `fd` (file of `fsize` bytes), checked as real VDDK does. With
   `dsec`/`dlen`, also where its embedded descriptor is. */
static VixError sparse_header(int fd, uint64_t fsize, extent_t *e, uint64_t *dsec, uint64_t *dlen,
                              char *why, size_t whylen) {
    uint8_t h[512];
    if (fsize < sizeof(h) || pread_all(fd, h, sizeof(h), 0)) {
        say(why, whylen, "shorter than a sparse header");
        return VIX_E_DISK_INVALIDDISK;
    }
    uint32_t magic = le32(h), version = le32(h + 4), gtes = le32(h + 44);
    uint64_t grain = le64(h + 20), gd = le64(h + 56);
    uint16_t compress = (uint16_t)(h[77] | h[78] << 8);
    if (magic == COWD_MAGIC || le64(h) == SESPARSE_MAGIC) {
        say(why, whylen, "COWD/SESparse extents are not read by the stand-in");
        return VIX_E_DISK_NOTSUPPORTED;
    }
    if (magic != SPARSE_MAGIC) {
        say(why, whylen, "no sparse magic");
        return VIX_E_DISK_INVALIDDISK;
    }
    /* Real VDDK 7.0.2 reads versions 0 to 3 and refuses 4 with 16011; version 0 is refused
       here too (the stricter choice: the specification starts at 1). */
    if (version < 1 || version > 3) {
        say(why, whylen, "sparse version %u", version);
        return VIX_E_DISK_UNSUPPORTEDDISKVERSION;
    }
    if (h[72]) { /* uncleanShutdown: real VDDK refuses even a read-only open */
        say(why, whylen, "unclean shutdown");
        return VIX_E_DISK_NEEDSREPAIR;
    }
    if (grain < 8 || grain > MAX_GRAIN || (grain & (grain - 1))) {
        say(why, whylen, "grain of %llu sectors", (unsigned long long)grain);
        return VIX_E_DISK_NEEDSREPAIR;
    }
    /* The specification fixes 512 entries per table (real VDDK did not object to 256; the
       stricter choice). */
    if (gtes != GTES_PER_GT) {
        say(why, whylen, "%u entries per grain table", gtes);
        return VIX_E_DISK_INVALIDDISK;
    }
    if (compress != 0) {
        say(why, whylen, "compressed grains are not read by the stand-in");
        return VIX_E_DISK_NOTSUPPORTED;
    }
    if (dsec) {
        *dsec = le64(h + 28);
        *dlen = le64(h + 36);
        if (*dsec == 0 || *dlen == 0 || *dlen > MAX_DESCRIPTOR / SECTOR || *dsec > fsize / SECTOR ||
            *dlen > fsize / SECTOR - *dsec) {
            say(why, whylen, "no embedded descriptor");
            return VIX_E_DISK_INVALIDDISK;
        }
    }
    e->grain = grain;
    e->gd = gd;
    return VIX_OK;
}

/* Loads the grain directory of a sparse extent whose size and header are known. */
static VixError sparse_directory(extent_t *e, uint64_t fsize, char *why, size_t whylen) {
    uint64_t grains = e->sectors / e->grain + (e->sectors % e->grain != 0);
    uint64_t ngts = (grains + GTES_PER_GT - 1) / GTES_PER_GT;
    if (ngts > UINT32_MAX / 8) {
        say(why, whylen, "too many grain tables");
        return VIX_E_DISK_INVALIDDISK;
    }
    e->ngts = (uint32_t)ngts;
    /* Real VDDK fails such an open with VIX_E_FAIL. */
    if (e->gd > fsize / SECTOR || ngts * 4 > fsize - e->gd * SECTOR) {
        say(why, whylen, "grain directory beyond the end of the file");
        return VIX_E_FAIL;
    }
    e->gd_entries = malloc(ngts * 4);
    e->gts = calloc(ngts, sizeof(*e->gts));
    if (!e->gd_entries || !e->gts) return VIX_E_OUT_OF_MEMORY;
    pthread_mutex_init(&e->mu, NULL);
    uint8_t *raw = (uint8_t *)e->gd_entries;
    if (pread_all(e->fd, raw, ngts * 4, e->gd * SECTOR)) return VIX_E_FAIL;
    for (uint64_t i = 0; i < ngts; i++) e->gd_entries[i] = le32(raw + 4 * i);
    return VIX_OK;
}

/* The grain table entry of grain `g`: 0, the grain is not in this extent (a read goes on to
   the parent); 1, a zeroed grain (measured on VDDK 7.0.2, with or without the header's
   zeroed-grain flag: it reads as zeros, hiding the parent, and QueryAllocatedBlocks does not
   list it); else the grain's first sector. -1: the table cannot be read (VIX_E_FAIL, as real
   VDDK fails reads and queries then). */
static int64_t sparse_gte(extent_t *e, uint64_t g) {
    uint64_t t = g / GTES_PER_GT;
    if (t >= e->ngts || e->gd_entries[t] == 0) return 0;
    pthread_mutex_lock(&e->mu);
    uint32_t *gt = e->gts[t];
    if (!gt) {
        uint8_t raw[GTES_PER_GT * 4];
        if (pread_all(e->fd, raw, sizeof(raw), (uint64_t)e->gd_entries[t] * SECTOR) == 0 &&
            (gt = malloc(sizeof(raw)))) {
            for (uint32_t i = 0; i < GTES_PER_GT; i++) gt[i] = le32(raw + 4 * i);
            e->gts[t] = gt;
        }
    }
    pthread_mutex_unlock(&e->mu);
    if (!gt) return -1;
    return gt[g % GTES_PER_GT];
}

/* Opens the file of one extent spec, relative to the descriptor at `dpath`. */
static VixError open_extent(const char *dpath, const ext_spec_t *s, extent_t *e, char *why,
                            size_t whylen) {
    e->access = s->access;
    e->sectors = s->sectors;
    e->offset = s->offset;
    e->fd = -1;
    if (s->type == T_ZERO) {
        e->kind = EXT_ZERO;
        return VIX_OK;
    }
    if (s->type == T_UNSUPPORTED) {
        say(why, whylen, "raw device mappings are not read by the stand-in");
        return VIX_E_DISK_NOTSUPPORTED;
    }
    char *path = resolve(dpath, s->file);
    if (!path) return VIX_E_OUT_OF_MEMORY;
    e->fd = open(path, O_RDONLY | O_CLOEXEC);
    int saved = errno;
    struct stat st;
    int64_t size = e->fd >= 0 ? file_size(e->fd, &st) : -1;
    if (e->fd < 0) {
        say(why, whylen, "extent %s: %s", path, strerror(saved));
        free(path);
        return open_error(saved);
    }
    if (size < 0) {
        say(why, whylen, "extent %s is not a file", path);
        free(path);
        return VIX_E_DISK_INVALIDDISK;
    }
    free(path);
    if (s->type == T_FLAT || s->type == T_VMFS) {
        e->kind = EXT_FLAT;
        /* Real VDDK refuses a flat extent that its file does not hold entirely. */
        if (e->offset > (uint64_t)size / SECTOR || e->sectors > (uint64_t)size / SECTOR - e->offset) {
            say(why, whylen, "flat extent %s is shorter than %llu sectors", s->file,
                (unsigned long long)(e->offset + e->sectors));
            return VIX_E_DISK_INVALIDDISK;
        }
        return VIX_OK;
    }
    /* SPARSE, VMFSSPARSE, SESPARSE: real VDDK goes by the file's magic, not the declared
       type; so does the stand-in, which reads only hosted sparse files. */
    e->kind = EXT_SPARSE;
    VixError err = sparse_header(e->fd, (uint64_t)size, e, NULL, NULL, why, whylen);
    return err ? err : sparse_directory(e, (uint64_t)size, why, whylen);
}

static int create_type_is(const char *t, const char *const *list) {
    for (; *list; list++)
        if (!strcasecmp(t, *list)) return 1;
    return 0;
}

/* Opens one link: a text descriptor, or a hosted sparse file with its descriptor inside. */
static VixError open_link(const char *path, link_t *l, char *why, size_t whylen) {
    /* The createTypes VDDK 7.0.2 accepts in a text descriptor (measured; the extents decide
       how the disk is read). vmfsThin, vmfsPreallocated, vmfsEagerZeroedThick, streamOptimized
       and monolithicSparse it refuses with 16063. */
    static const char *const text_types[] = {
        "monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "vmfs", "vmfsSparse",
        "seSparse", "vsanSparse", "custom", "vmfsRaw", "vmfsRawDeviceMap",
        "vmfsPassthroughRawDeviceMap", "fullDevice", NULL};
    memset(l, 0, sizeof(*l));
    VixError err = VIX_OK;
    desc_t d = {0};
    char *text = NULL;
    extent_t self = {.fd = -1};
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        say(why, whylen, "%s: %s", path, strerror(errno));
        return open_error(errno);
    }
    struct stat st;
    int64_t size = file_size(fd, &st);
    uint8_t head[8] = {0};
    if (size < 0 || !S_ISREG(st.st_mode)) {
        say(why, whylen, "%s is not a file", path);
        err = VIX_E_DISK_INVALIDDISK;
        goto out;
    }
    l->dev = st.st_dev;
    l->ino = st.st_ino;
    int embedded = size >= 8 && pread_all(fd, head, 8, 0) == 0 &&
                   (le32(head) == SPARSE_MAGIC || le32(head) == COWD_MAGIC ||
                    le64(head) == SESPARSE_MAGIC);
    uint64_t dsec = 0, dlen = 0;
    if (embedded) {
        self.fd = fd;
        err = sparse_header(fd, (uint64_t)size, &self, &dsec, &dlen, why, whylen);
        self.fd = -1;
        if (err) goto out;
        dlen *= SECTOR;
    } else {
        if ((uint64_t)size > MAX_DESCRIPTOR || size == 0) {
            say(why, whylen, "%s is not a descriptor", path);
            err = VIX_E_DISK_INVALIDDISK;
            goto out;
        }
        dlen = (uint64_t)size;
    }
    text = calloc(1, dlen + 1);
    if (!text) {
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
    if (pread_all(fd, text, dlen, dsec * SECTOR)) {
        err = VIX_E_DISK_INVALIDDISK;
        goto out;
    }
    /* An embedded descriptor is padded with NULs; a text file must hold none. */
    if (!embedded && memchr(text, 0, dlen)) {
        say(why, whylen, "%s is not text", path);
        err = VIX_E_DISK_INVALIDDISK;
        goto out;
    }
    if ((err = parse_descriptor(text, &d, why, whylen))) goto out;
    /* Compressed grains (streamOptimized) and partitioned devices (VDDK: 16010) are beyond
       the stand-in. */
    if (!strcasecmp(d.create_type, embedded ? "streamOptimized" : "partitionedDevice")) {
        say(why, whylen, "createType %s is not read by the stand-in", d.create_type);
        err = VIX_E_DISK_NOTSUPPORTED;
        goto out;
    }
    /* A sparse file must say monolithicSparse (assumed: VDDK 7.0.2 read one that said
       monolithicFlat; the stricter choice). */
    if (embedded ? strcasecmp(d.create_type, "monolithicSparse") != 0
                 : !create_type_is(d.create_type, text_types)) {
        say(why, whylen, "createType %s%s", d.create_type, embedded ? " in a sparse file" : "");
        err = VIX_E_DISK_INVALIDDISK;
        goto out;
    }
    l->ext = calloc((size_t)d.next, sizeof(*l->ext));
    if (!(l->path = strdup(path)) || !l->ext) {
        err = VIX_E_OUT_OF_MEMORY;
        goto out;
    }
    for (int i = 0; i < d.next; i++) l->ext[i].fd = -1;
    if (embedded) {
        /* The file is its own extent; real VDDK ignores the name the line gives. One SPARSE
           extent is all a monolithicSparse file has (more is refused: assumed). */
        if (d.next != 1 || (d.ext[0].type != T_SPARSE)) {
            say(why, whylen, "a sparse file's descriptor must have one SPARSE extent");
            err = VIX_E_DISK_INVALIDDISK;
            goto out;
        }
        extent_t *e = &l->ext[0];
        l->next = 1;
        e->kind = EXT_SPARSE;
        e->access = d.ext[0].access;
        e->sectors = d.ext[0].sectors;
        e->grain = self.grain;
        e->gd = self.gd;
        e->fd = fd;
        fd = -1;
        if ((err = sparse_directory(e, (uint64_t)size, why, whylen))) goto out;
    } else {
        for (int i = 0; i < d.next; i++) {
            l->next = i + 1;
            if ((err = open_extent(path, &d.ext[i], &l->ext[i], why, whylen))) goto out;
        }
    }
    uint64_t at = 0;
    for (int i = 0; i < l->next; i++) {
        l->ext[i].start = at;
        at += l->ext[i].sectors;
        if (at < l->ext[i].sectors || at > MAX_CAPACITY) {
            say(why, whylen, "a disk of more than %llu sectors", MAX_CAPACITY);
            err = VIX_E_DISK_INVALIDDISK;
            goto out;
        }
    }
    l->capacity = at;
    l->cid = d.cid;
    l->parent_cid = d.parent_cid;
    l->hint = d.hint;
    d.hint = NULL;
out:
    if (fd >= 0) close(fd);
    free(text);
    desc_free(&d);
    if (err) link_free(l);
    return err;
}

/* ---- the chain ----------------------------------------------------------------------- */
void vmdk_close(vmdk_disk_t *d) {
    if (!d) return;
    for (int i = 0; i < d->nlinks; i++) link_free(&d->links[i]);
    free(d->links);
    free(d);
}

VixError vmdk_open(const char *path, int single_link, vmdk_disk_t **out, char *why,
                   size_t whylen) {
    *out = NULL;
    vmdk_disk_t *d = calloc(1, sizeof(*d));
    if (!d || !(d->links = calloc(MAX_LINKS, sizeof(*d->links)))) {
        free(d);
        return VIX_E_OUT_OF_MEMORY;
    }
    VixError err = open_link(path, &d->links[0], why, whylen);
    if (err) goto fail;
    d->nlinks = 1;
    while (!single_link && d->links[d->nlinks - 1].hint) {
        link_t *child = &d->links[d->nlinks - 1];
        char *ppath = resolve(child->path, child->hint);
        if (!ppath) {
            err = VIX_E_OUT_OF_MEMORY;
            goto fail;
        }
        if (d->nlinks == MAX_LINKS) {
            say(why, whylen, "a chain of more than %d links", MAX_LINKS);
            free(ppath);
            err = VIX_E_DISK_INVALIDDISK;
            goto fail;
        }
        link_t *parent = &d->links[d->nlinks];
        char pwhy[256] = "";
        err = open_link(ppath, parent, pwhy, sizeof(pwhy));
        if (err) {
            /* Any parent that will not open is 16012 (measured for a missing and a garbage
               parent). */
            say(why, whylen, "parent %s: %s", ppath, pwhy);
            free(ppath);
            err = VIX_E_DISK_OPENPARENT;
            goto fail;
        }
        free(ppath);
        d->nlinks++;
        for (int i = 0; i < d->nlinks - 1; i++)
            if (d->links[i].dev == parent->dev && d->links[i].ino == parent->ino) {
                say(why, whylen, "%s is its own ancestor", parent->path);
                err = VIX_E_DISK_INVALIDDISK; /* measured for a link naming itself */
                goto fail;
            }
        if (child->parent_cid != parent->cid) {
            say(why, whylen, "%s has parentCID %08x, its parent %s has CID %08x", child->path,
                child->parent_cid, parent->path, parent->cid);
            err = VIX_E_DISK_CID_MISMATCH;
            goto fail;
        }
        if (child->capacity != parent->capacity) {
            say(why, whylen, "%s has %llu sectors, its parent %llu", child->path,
                (unsigned long long)child->capacity, (unsigned long long)parent->capacity);
            err = VIX_E_DISK_CAPACITY_MISMATCH;
            goto fail;
        }
    }
    *out = d;
    return VIX_OK;
fail:
    vmdk_close(d);
    return err;
}

uint64_t vmdk_capacity(const vmdk_disk_t *d) { return d->links[0].capacity; }

int vmdk_num_links(const vmdk_disk_t *d) { return d->nlinks; }

const char *vmdk_link_path(const vmdk_disk_t *d, int i) {
    return i >= 0 && i < d->nlinks ? d->links[i].path : NULL;
}

const char *vmdk_parent_hint(const vmdk_disk_t *d) { return d->links[d->nlinks - 1].hint; }

/* ---- reading ------------------------------------------------------------------------- */
enum { AT_HOLE, AT_DATA, AT_ZERO, AT_ERROR };

/* What link `l` holds at its sector `s`, for at most `*len` sectors: on return `*len` is how
   many sectors from `s` share the answer; AT_DATA gives the file and byte offset. */
static int link_at(link_t *l, uint64_t s, uint64_t *len, int *fd, uint64_t *off, VixError *err) {
    extent_t *e = NULL;
    for (int i = 0; i < l->next; i++)
        if (s >= l->ext[i].start && s - l->ext[i].start < l->ext[i].sectors) {
            e = &l->ext[i];
            break;
        }
    if (!e) { /* cannot happen: callers stay inside the capacity */
        *err = VIX_E_DISK_OUTOFRANGE;
        return AT_ERROR;
    }
    uint64_t rel = s - e->start;
    uint64_t left = e->sectors - rel;
    if (*len > left) *len = left;
    if (e->access == ACC_NOACCESS) { /* measured: reads fail with 13 */
        *err = VIX_E_FILE_ACCESS_ERROR;
        return AT_ERROR;
    }
    if (e->kind == EXT_ZERO) return AT_ZERO;
    if (e->kind == EXT_FLAT) {
        *fd = e->fd;
        *off = (e->offset + rel) * SECTOR;
        return AT_DATA;
    }
    uint64_t g = rel / e->grain, within = rel % e->grain;
    if (*len > e->grain - within) *len = e->grain - within;
    int64_t gte = sparse_gte(e, g);
    if (gte < 0) {
        *err = VIX_E_FAIL;
        return AT_ERROR;
    }
    if (gte == 0) return AT_HOLE;
    if (gte == 1) return AT_ZERO;
    *fd = e->fd;
    *off = ((uint64_t)gte + within) * SECTOR;
    return AT_DATA;
}

VixError vmdk_read(vmdk_disk_t *d, uint64_t start, uint64_t n, uint8_t *buf) {
    uint64_t pos = start, end = start + n;
    while (pos < end) {
        uint64_t len = end - pos;
        int i;
        uint8_t *dst = buf + (pos - start) * SECTOR;
        for (i = 0; i < d->nlinks; i++) {
            int fd = -1;
            uint64_t off = 0;
            VixError err = VIX_OK;
            int r = link_at(&d->links[i], pos, &len, &fd, &off, &err);
            if (r == AT_HOLE) continue;
            if (r == AT_ERROR) return err;
            if (r == AT_ZERO) {
                memset(dst, 0, len * SECTOR);
            } else if (pread_all(fd, dst, len * SECTOR, off)) {
                return VIX_E_FAIL; /* a grain past the end of its file: measured */
            }
            break;
        }
        if (i == d->nlinks) memset(dst, 0, len * SECTOR); /* a hole in every link */
        pos += len;
    }
    return VIX_OK;
}

/* ---- allocation ---------------------------------------------------------------------- */
typedef struct {
    uint64_t start, end, chunk;
    uint8_t *bits;
} chunkmap_t;

static void mark(chunkmap_t *m, uint64_t a, uint64_t b) {
    if (a < m->start) a = m->start;
    if (b > m->end) b = m->end;
    if (a >= b) return;
    for (uint64_t c = (a - m->start) / m->chunk; c < (b - m->start + m->chunk - 1) / m->chunk; c++)
        m->bits[c / 8] |= (uint8_t)(1u << (c % 8));
}

static VixError mark_link(link_t *l, chunkmap_t *m) {
    for (int i = 0; i < l->next; i++) {
        extent_t *e = &l->ext[i];
        uint64_t a = e->start, b = e->start + e->sectors;
        if (b <= m->start || a >= m->end) continue;
        /* Measured: flat and ZERO extents count as allocated throughout, holes or not. */
        if (e->kind != EXT_SPARSE) {
            mark(m, a, b);
            continue;
        }
        uint64_t lo = (m->start > a ? m->start - a : 0) / e->grain;
        uint64_t hi = ((m->end < b ? m->end : b) - a + e->grain - 1) / e->grain;
        for (uint64_t g = lo; g < hi; g++) {
            if (g % GTES_PER_GT == 0 || g == lo) {
                uint64_t t = g / GTES_PER_GT;
                if (t < e->ngts && e->gd_entries[t] == 0) { /* no table: nothing allocated */
                    g = (t + 1) * GTES_PER_GT - 1;
                    continue;
                }
            }
            int64_t gte = sparse_gte(e, g);
            if (gte < 0) return VIX_E_FAIL; /* measured: the query fails then */
            if (gte > 1) mark(m, a + g * e->grain, a + (g + 1) * e->grain);
        }
    }
    return VIX_OK;
}

VixError vmdk_query_allocated(vmdk_disk_t *d, uint64_t start, uint64_t n, uint64_t chunk,
                              VixDiskLibBlock **runs, size_t *nruns) {
    *runs = NULL;
    *nruns = 0;
    uint64_t nchunks = n / chunk;
    chunkmap_t m = {.start = start, .end = start + n, .chunk = chunk,
                    .bits = calloc((size_t)(nchunks + 7) / 8, 1)};
    if (!m.bits) return VIX_E_OUT_OF_MEMORY;
    VixError err = VIX_OK;
    for (int i = 0; i < d->nlinks && !err; i++) err = mark_link(&d->links[i], &m);
    size_t cap = 0;
    for (uint64_t c = 0; c < nchunks && !err;) {
        if (!(m.bits[c / 8] & (1u << (c % 8)))) {
            c++;
            continue;
        }
        uint64_t first = c;
        while (c < nchunks && (m.bits[c / 8] & (1u << (c % 8)))) c++;
        if (*nruns == cap) {
            cap = cap ? cap * 2 : 16;
            VixDiskLibBlock *nr = realloc(*runs, cap * sizeof(*nr));
            if (!nr) {
                err = VIX_E_OUT_OF_MEMORY;
                break;
            }
            *runs = nr;
        }
        (*runs)[*nruns].offset = start + first * chunk;
        (*runs)[*nruns].length = (c - first) * chunk;
        (*nruns)++;
    }
    free(m.bits);
    if (err) {
        free(*runs);
        *runs = NULL;
        *nruns = 0;
    }
    return err;
}
